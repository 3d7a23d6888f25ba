//! Synchronisation primitives used by the lock-free code of this crate, in one place so that
//! the same code runs on real atomics and under [loom] (`RUSTFLAGS="--cfg loom"`), the
//! pattern crossbeam-epoch uses.
//!
//! - `Arc`, `AtomicBool`, `AtomicPtr`, `AtomicU32`, `Ordering`: `std` or `loom`.
//! - [`UnsafeCell`]: loom's checked cell, or a thin `std` wrapper with the same
//!   `with`/`with_mut` API.
//! - [`Futex`]: a `u32` word one can sleep on. Linux `futex(2)` (`FUTEX_WAIT_PRIVATE` /
//!   `FUTEX_WAKE_PRIVATE`) on real builds; under loom a mutex + condvar model with the same
//!   contract (the compare-and-sleep is atomic with respect to a wake), so loom reports a lost
//!   wake-up as a deadlock.
//! - [`Backoff`]: `crossbeam_utils::Backoff`, or under loom a short `yield_now` loop (loom
//!   must see a yield in every spin loop).
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

#[cfg(not(loom))]
pub(crate) use crossbeam_utils::Backoff;

use std::ops::Deref;
use std::time::Duration;

/// `std::cell::UnsafeCell` with loom's closure-based API, so callers are written once.
#[cfg(not(loom))]
#[derive(Debug, Default)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    /// Wraps `data`.
    pub(crate) const fn new(data: T) -> Self {
        Self(std::cell::UnsafeCell::new(data))
    }

    /// Calls `f` with a shared pointer to the contents.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Calls `f` with a mutable pointer to the contents.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Loom stand-in for `crossbeam_utils::Backoff`: one bounded step, then `is_completed`.
///
/// It deliberately does not call `loom::thread::yield_now`: loom deprioritises a yielding
/// thread until the others block, which would let the completer always finish first and hide
/// the interleavings where the waiter goes to sleep. A bounded loop needs no yield under loom.
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    step: std::cell::Cell<u32>,
}

#[cfg(loom)]
impl Backoff {
    /// A fresh backoff.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Counts a step (the caller's loop re-reads its atomic, which is loom's branch point).
    pub(crate) fn snooze(&self) {
        self.step.set(self.step.get() + 1);
    }

    /// True once the caller should stop spinning and block.
    pub(crate) fn is_completed(&self) -> bool {
        self.step.get() >= 1
    }
}

/// A 32-bit atomic word threads can sleep on until it changes (a futex).
///
/// Derefs to the [`AtomicU32`]; [`Futex::wait`] and [`Futex::wake_all`] are the sleep and wake.
#[derive(Debug)]
pub(crate) struct Futex {
    word: AtomicU32,
    #[cfg(loom)]
    lock: loom::sync::Mutex<()>,
    #[cfg(loom)]
    cond: loom::sync::Condvar,
}

impl Deref for Futex {
    type Target = AtomicU32;

    #[inline(always)]
    fn deref(&self) -> &AtomicU32 {
        &self.word
    }
}

impl Futex {
    /// A futex word holding `value`.
    pub(crate) fn new(value: u32) -> Self {
        Self {
            word: AtomicU32::new(value),
            #[cfg(loom)]
            lock: loom::sync::Mutex::new(()),
            #[cfg(loom)]
            cond: loom::sync::Condvar::new(),
        }
    }
}

#[cfg(all(not(loom), target_os = "linux"))]
impl Futex {
    /// Sleeps while the word equals `expected`, at most `timeout` (`None`: no limit).
    ///
    /// May return early (value changed, signal, spurious wake-up, timeout): the caller
    /// re-reads the word and decides. The kernel compares and enqueues atomically with respect
    /// to [`Futex::wake_all`], so a wake issued after the word changed is never lost.
    pub(crate) fn wait(&self, expected: u32, timeout: Option<Duration>) {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            // Always < 1e9, fits every c_long.
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: FUTEX_WAIT reads the aligned u32 behind `as_ptr()`, which lives as long as
        // `self` (borrowed for the whole call); `ts_ptr` is null or points to `ts`, alive on this
        // stack frame. The result (0, EAGAIN, EINTR, ETIMEDOUT) is deliberately ignored: every
        // caller re-checks the word, which is the futex protocol.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                expected,
                ts_ptr,
            );
        }
    }

    /// Wakes every thread sleeping in [`Futex::wait`] on this word.
    pub(crate) fn wake_all(&self) {
        // SAFETY: FUTEX_WAKE only uses the address as a key (it does not dereference user
        // memory beyond hashing it); the word is alive because `self` is borrowed.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            );
        }
    }
}

/// Portable fallback (no futex): a short sleep, the caller polls. Correct, not fast.
#[cfg(all(not(loom), not(target_os = "linux")))]
impl Futex {
    /// Sleeps briefly if the word still equals `expected`; spurious returns are allowed.
    pub(crate) fn wait(&self, expected: u32, timeout: Option<Duration>) {
        if self.word.load(Ordering::Relaxed) == expected {
            let nap = Duration::from_micros(50);
            std::thread::sleep(timeout.map_or(nap, |t| t.min(nap)));
        }
    }

    /// Nothing to do: waiters poll.
    pub(crate) fn wake_all(&self) {}
}

#[cfg(loom)]
impl Futex {
    /// Loom model of `FUTEX_WAIT`: under the lock, sleep on the condvar if the word still
    /// equals `expected`. A timed wait is modelled as an immediate (spurious) return.
    pub(crate) fn wait(&self, expected: u32, timeout: Option<Duration>) {
        if timeout.is_some() {
            loom::thread::yield_now();
            return;
        }
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Relaxed on purpose: the kernel's guarantee is only the lock shared with wake_all,
        // and the model should not give the caller more ordering than that.
        if self.word.load(Ordering::Relaxed) == expected {
            drop(self.cond.wait(guard));
        }
    }

    /// Loom model of `FUTEX_WAKE`: take the lock (orders us after any in-progress compare)
    /// and wake everyone.
    pub(crate) fn wake_all(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }
}
