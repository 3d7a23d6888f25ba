//! Synchronisation primitives used by the lock-free code of this crate, in one place so that
//! the same code runs on real atomics and under [loom] (`RUSTFLAGS="--cfg loom"`), the
//! pattern crossbeam-epoch uses.
//!
//! - `Arc`, `AtomicBool`, `AtomicPtr`, `AtomicU32`, `AtomicUsize`, `Ordering`, `fence`: `std`
//!   or `loom`. (Thread-locals are declared per cfg where used: loom's `thread_local!` takes no
//!   `const` initialiser.)
//! - [`UnsafeCell`]: loom's checked cell, or a thin `std` wrapper with the same
//!   `with`/`with_mut` API.
//! - [`Futex`]: a `u32` word one can sleep on. Linux `futex(2)` (`FUTEX_WAIT_PRIVATE` /
//!   `FUTEX_WAKE_PRIVATE`) on real builds; under loom a mutex + condvar model with the same
//!   contract (the compare-and-sleep is atomic with respect to a wake), so loom reports a lost
//!   wake-up as a deadlock.
//! - [`Backoff`]: `crossbeam_utils::Backoff`, or under loom a short `yield_now` loop (loom
//!   must see a yield in every spin loop).
//! - [`asym`]: an asymmetric pair of fences (a free one for the hot side, a `membarrier(2)`
//!   system call for the rare side); two `SeqCst` fences under loom.
//! - [`LeakCheck`]: under loom, a tracked allocation that makes loom report a leaked owner;
//!   nothing on real builds.
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering,
};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering,
};
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

/// Under loom, an `Arc` that a structure owns so that loom's leak check (which only sees loom
/// objects) reports the structure if it is never freed. Nothing on real builds.
#[derive(Debug)]
pub(crate) struct LeakCheck {
    #[cfg(loom)]
    _tracked: loom::sync::Arc<()>,
}

impl LeakCheck {
    /// A new tracker.
    pub(crate) fn new() -> Self {
        Self {
            #[cfg(loom)]
            _tracked: loom::sync::Arc::new(()),
        }
    }
}

/// Asymmetric fences: [`asym::light`] on a hot path, [`asym::heavy`] on a rare one.
///
/// The pair gives what a `SeqCst` fence on each side gives — the store-buffering guarantee:
/// if thread A stores X, calls `light()` and loads Y, while thread B stores Y, calls
/// `heavy()` and loads X, then at least one of the two loads sees the other thread's store —
/// but `light()` costs nothing at run time. On Linux, `heavy()` is
/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`: the kernel runs a full memory barrier on
/// every CPU that is running a thread of this process, so a light side that is running is
/// interrupted and its earlier stores are drained before `heavy()` returns (one that is not
/// running went through a barrier when it was switched out), and `light()` only has to stop
/// the compiler from moving memory accesses across it. The process registers for that command
/// once, in [`asym::init`]. Where the system call is missing or refused (old kernel, seccomp
/// filter, other OS) both sides are real `SeqCst` fences, decided once per process, so the
/// two sides always agree. Under loom both are `SeqCst` fences, which is the contract the
/// system call provides.
pub(crate) mod asym {
    #[cfg(all(not(loom), target_os = "linux"))]
    mod imp {
        use std::sync::atomic::{compiler_fence, fence, Ordering};
        use std::sync::OnceLock;

        // From <linux/membarrier.h> (not in the `libc` crate).
        const CMD_QUERY: libc::c_long = 0;
        const CMD_GLOBAL: libc::c_long = 1;
        const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

        /// Whether this process uses `membarrier` (decided once, by the first caller).
        static MEMBARRIER: OnceLock<bool> = OnceLock::new();

        fn membarrier(cmd: libc::c_long) -> libc::c_long {
            // SAFETY: membarrier(2) takes two integers and a CPU id, touches no user memory,
            // and reports failure through its result, which every caller checks.
            unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    cmd,
                    0 as libc::c_long,
                    0 as libc::c_long,
                )
            }
        }

        fn probe() -> bool {
            let wanted = CMD_PRIVATE_EXPEDITED | CMD_REGISTER_PRIVATE_EXPEDITED;
            let supported = membarrier(CMD_QUERY);
            supported >= 0
                && supported & wanted == wanted
                && membarrier(CMD_REGISTER_PRIVATE_EXPEDITED) == 0
        }

        #[inline(always)]
        fn enabled() -> bool {
            *MEMBARRIER.get_or_init(probe)
        }

        pub(crate) fn init() -> bool {
            enabled()
        }

        #[inline(always)]
        pub(crate) fn light() {
            if enabled() {
                compiler_fence(Ordering::SeqCst);
            } else {
                fence(Ordering::SeqCst);
            }
        }

        pub(crate) fn heavy() -> bool {
            if !enabled() {
                fence(Ordering::SeqCst);
                return true;
            }
            // The barrier runs on the other CPUs between the two full barriers the kernel
            // issues on this one.
            if membarrier(CMD_PRIVATE_EXPEDITED) == 0 {
                return true;
            }
            // Refused although registered (a child forked after `init` has a new address
            // space, or the kernel is out of memory): register again, else fall back to the
            // slow system-wide variant.
            (membarrier(CMD_REGISTER_PRIVATE_EXPEDITED) == 0
                && membarrier(CMD_PRIVATE_EXPEDITED) == 0)
                || membarrier(CMD_GLOBAL) == 0
        }
    }

    #[cfg(any(loom, not(target_os = "linux")))]
    mod imp {
        use super::super::{fence, Ordering};

        pub(crate) fn init() -> bool {
            false
        }

        #[inline(always)]
        pub(crate) fn light() {
            fence(Ordering::SeqCst);
        }

        pub(crate) fn heavy() -> bool {
            fence(Ordering::SeqCst);
            true
        }
    }

    /// Decides, once per process, whether the light side may be free (true) or must be a
    /// real fence (false), registering for `membarrier` if available. Idempotent; the other
    /// two functions call it too, so calling it early only moves the system calls off the hot
    /// path.
    pub(crate) fn init() -> bool {
        imp::init()
    }

    /// The hot side: a compiler fence when `membarrier` is in use, else a `SeqCst` fence.
    #[inline(always)]
    pub(crate) fn light() {
        imp::light();
    }

    /// The rare side: orders this thread's earlier accesses against every thread's
    /// [`light`]. Returns false in the one case it could not (the system call, having
    /// worked at [`init`], failed in every variant): the caller must then not rely on the
    /// guarantee (e.g. poll instead of sleeping without a timeout).
    pub(crate) fn heavy() -> bool {
        imp::heavy()
    }
}
