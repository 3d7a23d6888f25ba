//! Shared-memory byte stream between two processes on the same host.
//!
//! A [`ShmSegment`] is one file (normally in `/dev/shm`) mapped by both processes. It holds two
//! single-producer single-consumer **byte rings**, one per direction. A [`ShmStream`] wraps the
//! segment plus a *doorbell*, a connected non-blocking Unix stream socket, and behaves like a
//! non-blocking socket: [`Read`] and [`Write`] move as many bytes as they can, return
//! [`io::ErrorKind::WouldBlock`] when they can move none, and `read` returns `Ok(0)` only at end of
//! stream. A framing layer runs on it exactly as on a TCP stream and reads payload bytes straight
//! from the ring into their destination buffer (one copy per direction).
//!
//! What it does not do: framing, authentication, more than one producer or consumer per ring,
//! or talking across hosts. Both processes must run the same layout version (checked by
//! [`ShmSegment::open`]). The segment file is created with mode `0600`, so both processes must run
//! as the same user.
//!
//! # Layout
//!
//! All offsets are fixed by [`LAYOUT_VERSION`]:
//!
//! | offset | what |
//! | --- | --- |
//! | 0 | header: magic `u64`, layout version `u32`, creator pid `u32`, ring size `u64`, closed flag of side A and of side B (`u32` each) |
//! | 1024 | control block of ring 0 (A → B) |
//! | 1536 | control block of ring 1 (B → A) |
//! | 4096 | data of ring 0 (`ring_bytes`) |
//! | 4096 + `ring_bytes` | data of ring 1 (`ring_bytes`) |
//!
//! A control block holds `head` (bytes consumed) and `tail` (bytes produced), each an `AtomicU64`
//! on a 128-byte line of its own so producer and consumer do not false-share, then the flags
//! `reader_waiting` and `writer_waiting` (`AtomicU32`) on a third line.
//!
//! # Ring protocol
//!
//! Lamport's single-producer single-consumer queue (L. Lamport, "Specifying concurrent program
//! modules", TOPLAS 1983) with free-running counters, as in Linux's `kfifo` and the io_uring
//! submission and completion rings. `head` and `tail` only ever grow (modulo 2^64); the bytes in
//! the ring are `tail - head`, and byte `i` lives at `i & (ring_bytes - 1)`. A copy touches at
//! most two pieces (before and after the wrap).
//!
//! - Producer: load `head` (Acquire), copy into `[tail, head + ring_bytes)`, store `tail`
//!   (Release).
//! - Consumer: load `tail` (Acquire), copy out of `[head, tail)`, store `head` (Release).
//!
//! The Release store of one side paired with the Acquire load of the other makes the copied bytes
//! visible before the counter that announces them, and makes the consumer's reads of a region
//! finish before the producer overwrites it. Each side loads its own counter Relaxed.
//!
//! Every operation checks `tail - head <= ring_bytes` before it copies and fails with
//! [`ShmError::Corrupt`] (as [`io::ErrorKind::InvalidData`]) otherwise. Offsets are masked and
//! lengths bounded by `ring_bytes`, so a corrupt or hostile peer can make us read garbage bytes or
//! report an error, but never make us touch memory outside the mapping.
//!
//! # Sleeping and waking
//!
//! A side that cannot make progress sleeps in its event loop (mio/epoll) on the doorbell socket.
//! The handshake is Dekker's, the same one io_uring uses for `IORING_SQ_NEED_WAKEUP`:
//!
//! - A reader that finds the ring empty stores `reader_waiting = 1`, issues a SeqCst fence,
//!   checks the ring again and only then returns `WouldBlock`.
//! - A writer, after storing `tail`, issues a SeqCst fence, loads `reader_waiting`, and if it is
//!   1 swaps it to 0 and writes one byte to the doorbell.
//!
//! The two fences are ordered one way or the other, so either the reader's second check sees the
//! new `tail`, or the writer sees `reader_waiting == 1` and rings: no wake-up is lost. A full ring
//! is symmetric: the writer arms `writer_waiting` and the reader rings after it advances `head`.
//! A doorbell write that would block is fine (the socket already holds wake bytes), a spurious
//! byte only costs a wasted wake-up, and the bytes carry no data. One doorbell serves both
//! directions, so on a wake-up the caller retries both its reads and its writes.
//!
//! # End of stream
//!
//! [`ShmStream::close`] (also run on drop) stores our closed flag (Release, after our last
//! `tail`) and shuts the doorbell down. The peer's reads return the remaining bytes and then
//! `Ok(0)`; its writes return [`io::ErrorKind::BrokenPipe`]. A peer that died without closing is
//! seen as end-of-file (or a reset) on the doorbell by [`ShmStream::on_doorbell`], which then
//! returns `Ok(false)`; from then on reads and writes behave as after a close (until then a
//! read of the drained ring is `WouldBlock`, since only the doorbell can tell).
//!
//! # Why this module needs `unsafe`
//!
//! The rings live in memory that another process writes concurrently, which Rust's type system
//! cannot describe. The mapping is a [`memmap2::MmapRaw`]: unlike `MmapMut` it is created without
//! `unsafe` because it never hands out a `&[u8]` or `&mut [u8]` (such a reference would assert
//! that nobody else changes the bytes, which the peer does). The `unsafe` is in the few places
//! that turn raw pointers into the mapping into (a) shared references to the header and control
//! blocks, which hold only atomics (interior mutability, every bit pattern valid), and (b) raw
//! `copy_nonoverlapping` into or out of our own buffers, with bounds proven by masking. Bytes are
//! `u8`, so whatever a misbehaving peer writes, we copy a valid value. Each block says which
//! invariant holds.
//!
//! The atomics are shared across processes, so they cannot be swapped for loom's model atomics.
//! The handshake is instead covered by a two-thread stress test in which every sleep must end by
//! a wake-up, never by the timeout. It catches a missing doorbell at once; a missing fence or
//! re-check would only show as a rare hang, which is why the reasoning above is spelled out.
//!
//! # Limits
//!
//! A peer (or anyone with write access to the file) that truncates the file while it is mapped
//! makes our next access fault with `SIGBUS`; no userspace check can rule that out. The creator
//! should [`unlink`](ShmSegment::unlink) the name as soon as the peer has opened it.
//!
//! # Examples
//!
//! ```
//! use std::io::{Read, Write};
//! use bps_transport::shm::{ShmSegment, ShmStream, Side};
//!
//! let dir = std::env::temp_dir();
//! let (seg_a, path) = ShmSegment::create(&dir, 64 << 10)?;
//! // Normally in the peer process, after it received `path` over a control connection.
//! let seg_b = ShmSegment::open(&path)?;
//! seg_a.unlink()?;
//!
//! let (bell_a, bell_b) = mio::net::UnixStream::pair()?;
//! let mut a = ShmStream::new(seg_a, Side::A, bell_a);
//! let mut b = ShmStream::new(seg_b, Side::B, bell_b);
//! assert_eq!(a.write(b"hello")?, 5);
//! let mut buf = [0u8; 16];
//! let n = b.read(&mut buf)?;
//! assert_eq!(&buf[..n], b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::MmapRaw;
use mio::net::UnixStream;

/// Default size of each ring (one per direction), in bytes: 4 MiB.
pub const DEFAULT_RING_BYTES: usize = 4 << 20;

/// Smallest ring size [`ShmSegment::create`] accepts, in bytes.
pub const MIN_RING_BYTES: usize = 4096;

/// Largest ring size [`ShmSegment::create`] accepts, in bytes (1 GiB).
pub const MAX_RING_BYTES: usize = 1 << 30;

/// Version of the segment layout described in the module docs; [`ShmSegment::open`] rejects any
/// other.
pub const LAYOUT_VERSION: u32 = 1;

/// First eight bytes of every segment (`"bpsshm01"` read as a little-endian `u64`).
const MAGIC: u64 = u64::from_le_bytes(*b"bpsshm01");

/// Offset of the control block of ring 0; ring 1 follows at `CTRL_OFFSET + CTRL_STRIDE`.
const CTRL_OFFSET: usize = 1024;

/// Distance between the two control blocks.
const CTRL_STRIDE: usize = 512;

/// Offset of the data of ring 0; ring 1 follows at `DATA_OFFSET + ring_bytes`. One page.
const DATA_OFFSET: usize = 4096;

/// Prefix of the file names [`ShmSegment::create`] makes.
const NAME_PREFIX: &str = "bps-shm";

/// Segment header at offset 0. Only atomics, so the peer may change any field at any time
/// without invalidating a reference to it.
#[repr(C)]
struct SegmentHeader {
    /// [`MAGIC`]; stored last by the creator, with Release.
    magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    version: AtomicU32,
    /// Process id of the creator (for diagnostics only).
    creator_pid: AtomicU32,
    /// Size of each ring in bytes.
    ring_bytes: AtomicU64,
    /// `closed[side]` is 1 once that side called [`ShmStream::close`].
    closed: [AtomicU32; 2],
}

/// One 128-byte line (two 64-byte lines, so adjacent-line prefetch does not false-share either).
#[repr(C, align(128))]
struct Line<T>(T);

/// Wake-up flags of one ring.
#[repr(C)]
struct WaitFlags {
    /// Set by the consumer before it sleeps on an empty ring; cleared by whoever rings.
    reader_waiting: AtomicU32,
    /// Set by the producer before it sleeps on a full ring; cleared by whoever rings.
    writer_waiting: AtomicU32,
}

/// Control block of one ring.
#[repr(C)]
struct RingControl {
    /// Bytes consumed so far; written only by the consumer.
    head: Line<AtomicU64>,
    /// Bytes produced so far; written only by the producer.
    tail: Line<AtomicU64>,
    /// Sleep/wake handshake flags.
    flags: Line<WaitFlags>,
}

// The layout is a file format: pin it at compile time.
const _: () = {
    assert!(std::mem::size_of::<SegmentHeader>() <= CTRL_OFFSET);
    assert!(std::mem::size_of::<RingControl>() <= CTRL_STRIDE);
    assert!(CTRL_OFFSET.is_multiple_of(std::mem::align_of::<RingControl>()));
    assert!(CTRL_STRIDE.is_multiple_of(std::mem::align_of::<RingControl>()));
    assert!(CTRL_OFFSET + 2 * CTRL_STRIDE <= DATA_OFFSET);
    assert!(std::mem::offset_of!(SegmentHeader, ring_bytes) == 16);
    assert!(std::mem::offset_of!(RingControl, tail) == 128);
    assert!(MIN_RING_BYTES.is_power_of_two() && MAX_RING_BYTES.is_power_of_two());
};

/// Errors of the shared-memory transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// A ring size passed to [`ShmSegment::create`] is out of range or not a power of two.
    #[error(
        "invalid shm ring size {value} bytes: must be a power of two between \
         {MIN_RING_BYTES} and {MAX_RING_BYTES} bytes"
    )]
    InvalidRingSize {
        /// The rejected value.
        value: usize,
    },
    /// No new segment file could be created in the directory.
    #[error("cannot create a shm segment file in {}", dir.display())]
    Create {
        /// The directory given to [`ShmSegment::create`].
        dir: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A system call on a segment file failed.
    #[error("cannot {verb} shm segment {}", path.display())]
    Io {
        /// What we tried: `open`, `stat`, `size`, `allocate`, `map` or `unlink`.
        verb: &'static str,
        /// The segment file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The path names something other than a regular file.
    #[error("{} is not a regular file, so it cannot be a bps shm segment", path.display())]
    NotAFile {
        /// The path given to [`ShmSegment::open`].
        path: PathBuf,
    },
    /// The file is too short to hold even the header.
    #[error(
        "shm segment {} is {len} bytes, shorter than the {min}-byte header: \
         truncated or not a bps segment",
        path.display()
    )]
    Truncated {
        /// The segment file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// The least length that can hold a header.
        min: u64,
    },
    /// The header does not start with the bps magic.
    #[error(
        "{} is not a bps shm segment: magic {found:#018x}, expected {expected:#018x}",
        path.display()
    )]
    BadMagic {
        /// The segment file.
        path: PathBuf,
        /// The first eight bytes, read as a little-endian `u64`.
        found: u64,
        /// The magic a segment starts with.
        expected: u64,
    },
    /// The segment was written by a build with another layout.
    #[error(
        "shm segment {} has layout version {found}, this build reads only version {expected}",
        path.display()
    )]
    BadVersion {
        /// The segment file.
        path: PathBuf,
        /// The version in the header.
        found: u32,
        /// [`LAYOUT_VERSION`].
        expected: u32,
    },
    /// The ring size in the header is out of range or not a power of two.
    #[error(
        "shm segment {} declares a ring size of {value} bytes: must be a power of two between \
         {MIN_RING_BYTES} and {MAX_RING_BYTES} bytes",
        path.display()
    )]
    BadRingSize {
        /// The segment file.
        path: PathBuf,
        /// The ring size in the header.
        value: u64,
    },
    /// The file length does not match the ring size in the header.
    #[error(
        "shm segment {} is {len} bytes, but a segment with {ring_bytes}-byte rings must be \
         {expected} bytes",
        path.display()
    )]
    BadLength {
        /// The segment file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// The ring size in the header.
        ring_bytes: u64,
        /// The length that ring size implies.
        expected: u64,
    },
    /// A ring's counters break the invariant `tail - head <= ring size`: the peer broke the
    /// protocol or the memory was overwritten. Nothing was copied.
    #[error(
        "shm ring {ring} of segment {} is corrupt: head {head} and tail {tail} must satisfy \
         0 <= tail - head <= {ring_bytes}",
        path.display()
    )]
    Corrupt {
        /// The segment file (its name may already be unlinked).
        path: PathBuf,
        /// Which ring: 0 carries A → B, 1 carries B → A.
        ring: usize,
        /// The consumer's counter as read.
        head: u64,
        /// The producer's counter as read.
        tail: u64,
        /// The ring size.
        ring_bytes: usize,
    },
}

impl From<ShmError> for io::Error {
    /// Wraps the error, keeping the kind of an underlying OS error; a bad argument is
    /// `InvalidInput` and a bad segment `InvalidData`.
    fn from(err: ShmError) -> io::Error {
        let kind = match &err {
            ShmError::InvalidRingSize { .. } => io::ErrorKind::InvalidInput,
            ShmError::Create { source, .. } | ShmError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, err)
    }
}

/// Which end of a segment a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side that created the segment. It writes ring 0 and reads ring 1.
    A,
    /// The side that opened the segment. It writes ring 1 and reads ring 0.
    B,
}

impl Side {
    /// Index of this side's closed flag and of the ring it writes.
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }

    /// The other side.
    fn peer(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

fn ring_size_ok(value: u64) -> bool {
    value.is_power_of_two() && value >= MIN_RING_BYTES as u64 && value <= MAX_RING_BYTES as u64
}

/// File length of a segment with rings of `ring_bytes`.
fn segment_len(ring_bytes: u64) -> u64 {
    DATA_OFFSET as u64 + 2 * ring_bytes
}

/// A mapped shared-memory segment holding the two rings.
///
/// Dropping it unmaps it; a segment made by [`create`](Self::create) also removes its file name
/// on drop if that has not happened yet.
#[derive(Debug)]
pub struct ShmSegment {
    /// The whole file. Only raw pointers are taken from it, never slices.
    map: MmapRaw,
    /// Ring size, validated when the segment was created or opened; never re-read from the
    /// header.
    ring_bytes: usize,
    /// Path of the file (its name may be unlinked).
    path: PathBuf,
    /// Whether this process created the file.
    created: bool,
    /// Whether [`unlink`](Self::unlink) succeeded already.
    unlinked: AtomicBool,
}

impl ShmSegment {
    /// Creates a new segment file with a unique name in `dir` (e.g. `/dev/shm`) holding two rings
    /// of `ring_bytes` each, and maps it. Returns the segment and the file's path, which the peer
    /// passes to [`open`](Self::open).
    ///
    /// The file is created with mode `0600` and its memory is reserved up front, so a full
    /// `/dev/shm` is an error here rather than a `SIGBUS` later.
    ///
    /// # Errors
    ///
    /// [`ShmError::InvalidRingSize`] if `ring_bytes` is not a power of two between
    /// [`MIN_RING_BYTES`] and [`MAX_RING_BYTES`]; [`ShmError::Create`] or [`ShmError::Io`] if a
    /// system call fails (the file is removed again).
    pub fn create(dir: &Path, ring_bytes: usize) -> Result<(ShmSegment, PathBuf), ShmError> {
        if !ring_size_ok(ring_bytes as u64) {
            return Err(ShmError::InvalidRingSize { value: ring_bytes });
        }
        let (file, path) = create_unique_file(dir)?;
        match Self::init(&file, &path, ring_bytes) {
            Ok(map) => {
                tracing::debug!(path = %path.display(), ring_bytes, "created shm segment");
                let segment = ShmSegment {
                    map,
                    ring_bytes,
                    path: path.clone(),
                    created: true,
                    unlinked: AtomicBool::new(false),
                };
                Ok((segment, path))
            }
            Err(err) => {
                let _ = std::fs::remove_file(&path);
                Err(err)
            }
        }
    }

    /// Sizes, maps and initialises a freshly created (all-zero) file.
    fn init(file: &File, path: &Path, ring_bytes: usize) -> Result<MmapRaw, ShmError> {
        let io_err = |verb, source| ShmError::Io {
            verb,
            path: path.to_path_buf(),
            source,
        };
        let len = segment_len(ring_bytes as u64);
        file.set_len(len).map_err(|e| io_err("size", e))?;
        reserve(file, len).map_err(|e| io_err("allocate", e))?;
        let map = MmapRaw::map_raw(file).map_err(|e| io_err("map", e))?;
        if map.len() as u64 != len {
            return Err(ShmError::BadLength {
                path: path.to_path_buf(),
                len: map.len() as u64,
                ring_bytes: ring_bytes as u64,
                expected: len,
            });
        }
        // SAFETY: the mapping is `len >= DATA_OFFSET` bytes long, page aligned (so aligned for
        // the header, whose alignment is 8), and outlives this function's use of the reference.
        // The header holds only atomics, so sharing it with a concurrently writing peer is fine.
        let header = unsafe { &*map.as_ptr().cast::<SegmentHeader>() };
        header.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        header
            .creator_pid
            .store(std::process::id(), Ordering::Relaxed);
        header
            .ring_bytes
            .store(ring_bytes as u64, Ordering::Relaxed);
        // The magic goes last, so a half-initialised segment never looks valid.
        header.magic.store(MAGIC, Ordering::Release);
        Ok(map)
    }

    /// Maps an existing segment created by the peer.
    ///
    /// The file length, magic, layout version and ring size are checked, in that order, before
    /// anything else in the header is used.
    ///
    /// # Errors
    ///
    /// [`ShmError::Io`] if the file cannot be opened or mapped; [`ShmError::NotAFile`],
    /// [`ShmError::Truncated`], [`ShmError::BadMagic`], [`ShmError::BadVersion`],
    /// [`ShmError::BadRingSize`] or [`ShmError::BadLength`] if it is not a valid segment. Each
    /// names the path.
    pub fn open(path: &Path) -> Result<ShmSegment, ShmError> {
        let io_err = |verb, source| ShmError::Io {
            verb,
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        let meta = file.metadata().map_err(|e| io_err("stat", e))?;
        if !meta.is_file() {
            return Err(ShmError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let min = segment_len(0);
        if meta.len() < min {
            return Err(ShmError::Truncated {
                path: path.to_path_buf(),
                len: meta.len(),
                min,
            });
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| io_err("map", e))?;
        // The file may have changed between the stat and the map: check what was mapped.
        let len = map.len() as u64;
        if len < min {
            return Err(ShmError::Truncated {
                path: path.to_path_buf(),
                len,
                min,
            });
        }
        // SAFETY: the mapping is at least `DATA_OFFSET` bytes long (checked just above) and page
        // aligned, so the header is in bounds and aligned; the reference does not outlive `map`.
        // The header holds only atomics, so any bytes are a valid value and concurrent writes by
        // the peer are allowed.
        let header = unsafe { &*map.as_ptr().cast::<SegmentHeader>() };
        let found = header.magic.load(Ordering::Acquire);
        if found != MAGIC {
            return Err(ShmError::BadMagic {
                path: path.to_path_buf(),
                found,
                expected: MAGIC,
            });
        }
        let version = header.version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(ShmError::BadVersion {
                path: path.to_path_buf(),
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        let ring_bytes = header.ring_bytes.load(Ordering::Relaxed);
        if !ring_size_ok(ring_bytes) {
            return Err(ShmError::BadRingSize {
                path: path.to_path_buf(),
                value: ring_bytes,
            });
        }
        let expected = segment_len(ring_bytes);
        if len != expected {
            return Err(ShmError::BadLength {
                path: path.to_path_buf(),
                len,
                ring_bytes,
                expected,
            });
        }
        tracing::debug!(path = %path.display(), ring_bytes, "opened shm segment");
        Ok(ShmSegment {
            map,
            // At most MAX_RING_BYTES (checked above), so it fits.
            ring_bytes: ring_bytes as usize,
            path: path.to_path_buf(),
            created: false,
            unlinked: AtomicBool::new(false),
        })
    }

    /// Removes the file name. Both sides keep their mappings; the memory is freed when the last
    /// one is unmapped. Idempotent, and a name the peer already removed is not an error.
    ///
    /// # Errors
    ///
    /// [`ShmError::Io`] (verb `unlink`) if the name exists but cannot be removed.
    pub fn unlink(&self) -> Result<(), ShmError> {
        if self.unlinked.load(Ordering::Acquire) {
            return Ok(());
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ShmError::Io {
                    verb: "unlink",
                    path: self.path.clone(),
                    source,
                })
            }
        }
        self.unlinked.store(true, Ordering::Release);
        Ok(())
    }

    /// Size of each ring in bytes.
    pub fn ring_bytes(&self) -> usize {
        self.ring_bytes
    }

    /// Path of the segment file (its name may already be unlinked).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Process id of the side that created the segment, as written in the header.
    pub fn creator_pid(&self) -> u32 {
        self.header().creator_pid.load(Ordering::Relaxed)
    }

    fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least `DATA_OFFSET` bytes (checked by `create`/`open`) and
        // page aligned, so the header is in bounds and aligned; the reference borrows `self`, so
        // it cannot outlive the mapping. It holds only atomics: any bytes are valid and the
        // peer's concurrent writes are atomic accesses, not data races.
        unsafe { &*self.map.as_ptr().cast::<SegmentHeader>() }
    }

    /// The ring with index `index` (0: A → B, 1: B → A).
    fn ring(&self, index: usize) -> Ring<'_> {
        assert!(index < 2, "shm ring index {index} out of range");
        let ctrl_offset = CTRL_OFFSET + index * CTRL_STRIDE;
        let data_offset = DATA_OFFSET + index * self.ring_bytes;
        // SAFETY: `ctrl_offset + size_of::<RingControl>() <= DATA_OFFSET <= map.len()` (layout
        // asserts and the length checks of `create`/`open`), and `ctrl_offset` is a multiple of
        // the control block's alignment in a page-aligned mapping. The reference borrows `self`,
        // so it cannot outlive the mapping. The block holds only atomics: any bytes are valid
        // and the peer's writes are atomic accesses.
        let ctrl = unsafe { &*self.map.as_ptr().add(ctrl_offset).cast::<RingControl>() };
        // SAFETY: `data_offset + ring_bytes <= DATA_OFFSET + 2 * ring_bytes == map.len()`
        // (checked by `create`/`open`), so the pointer stays inside the mapping.
        let data = unsafe { self.map.as_mut_ptr().add(data_offset) };
        Ring {
            ctrl,
            data,
            size: self.ring_bytes,
            index,
        }
    }

    fn corrupt(&self, ring: &Ring<'_>, c: Counters) -> io::Error {
        ShmError::Corrupt {
            path: self.path.clone(),
            ring: ring.index,
            head: c.head,
            tail: c.tail,
            ring_bytes: ring.size,
        }
        .into()
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        if self.created {
            if let Err(err) = self.unlink() {
                tracing::debug!(error = %err, "could not remove shm segment on drop");
            }
        }
    }
}

/// Creates a file with a new name in `dir`, exclusively.
fn create_unique_file(dir: &Path) -> Result<(File, PathBuf), ShmError> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let mut last_err = None;
    for _ in 0..16 {
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = dir.join(format!("{NAME_PREFIX}-{pid}-{seq}-{nanos:08x}"));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(source) => {
                return Err(ShmError::Create {
                    dir: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(ShmError::Create {
        dir: dir.to_path_buf(),
        source: last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
    })
}

/// Reserves the file's memory now, so running out of it is an error rather than a `SIGBUS` on
/// first touch. A file system that cannot reserve is accepted as it is.
#[cfg(target_os = "linux")]
fn reserve(file: &File, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: `file` is an open file descriptor for the duration of the call; the call takes
        // no pointers.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            libc::EOPNOTSUPP | libc::ENOSYS => return Ok(()),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Reserves the file's memory now (not available on this platform: no-op).
#[cfg(not(target_os = "linux"))]
fn reserve(_file: &File, _len: u64) -> io::Result<()> {
    Ok(())
}

/// Counter values read from a ring.
#[derive(Clone, Copy)]
struct Counters {
    head: u64,
    tail: u64,
}

/// A view of one ring inside a mapped segment.
struct Ring<'a> {
    ctrl: &'a RingControl,
    /// Start of the ring's data area: `size` bytes inside the mapping.
    data: *mut u8,
    /// Ring size, a power of two.
    size: usize,
    /// 0 or 1.
    index: usize,
}

impl Ring<'_> {
    /// Loads the counters, `tail` with `tail_order` and `head` with `head_order`. The side that
    /// owns a counter loads it Relaxed; the other one with Acquire.
    fn counters(&self, tail_order: Ordering, head_order: Ordering) -> Counters {
        let head = self.ctrl.head.0.load(head_order);
        let tail = self.ctrl.tail.0.load(tail_order);
        Counters { head, tail }
    }

    /// Bytes in the ring, or `None` if the counters break `0 <= tail - head <= size`.
    fn used(&self, c: Counters) -> Option<usize> {
        let used = c.tail.wrapping_sub(c.head);
        (used <= self.size as u64).then_some(used as usize)
    }

    /// Position of counter value `pos` in the data area; always `< size`.
    fn offset(&self, pos: u64) -> usize {
        (pos & (self.size as u64 - 1)) as usize
    }

    /// Copies `src` into the data area starting at counter value `pos`, wrapping at the end.
    fn copy_in(&self, pos: u64, src: &[u8]) {
        assert!(src.len() <= self.size, "shm copy larger than the ring");
        let off = self.offset(pos);
        let first = src.len().min(self.size - off);
        // SAFETY: `off < size`, and `first <= size - off` bytes from `data + off` and
        // `src.len() - first <= off` bytes from `data` all lie in the `size`-byte data area, which
        // lies in the mapping (see `ShmSegment::ring`). `src` is a caller's buffer, so it cannot
        // overlap the mapping, to which this module never hands out references. The destination
        // holds plain bytes: no Rust value's validity depends on them, and no reference to them
        // exists in this process.
        unsafe {
            ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(off), first);
            ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data, src.len() - first);
        }
    }

    /// Copies `dst.len()` bytes out of the data area starting at counter value `pos`, wrapping at
    /// the end.
    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        assert!(dst.len() <= self.size, "shm copy larger than the ring");
        let off = self.offset(pos);
        let first = dst.len().min(self.size - off);
        // SAFETY: same bounds as `copy_in`: both source pieces lie in the ring's data area inside
        // the mapping. `dst` is a caller's exclusive buffer, disjoint from the mapping. The bytes
        // are `u8`, so whatever a misbehaving peer wrote, `dst` receives valid values.
        unsafe {
            ptr::copy_nonoverlapping(self.data.add(off), dst.as_mut_ptr(), first);
            ptr::copy_nonoverlapping(self.data, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }
}

/// A non-blocking byte stream to a peer process over a [`ShmSegment`].
///
/// Use it like a non-blocking socket: register [`doorbell_mut`](Self::doorbell_mut) with mio for
/// READABLE; when a read or write returns `WouldBlock`, wait in the event loop; when the doorbell
/// fires, call [`on_doorbell`](Self::on_doorbell) and retry both reads and writes. Dropping the
/// stream [`close`](Self::close)s it.
#[derive(Debug)]
pub struct ShmStream {
    segment: ShmSegment,
    side: Side,
    doorbell: UnixStream,
    /// The doorbell reported end-of-file or a reset: the peer process is gone or closed.
    peer_gone: bool,
    /// We called `close`.
    closed: bool,
    /// Whether drop runs `close` (tests turn it off to mimic a process that died).
    close_on_drop: bool,
}

impl ShmStream {
    /// Builds our end of the stream. `side` says which ring we write ([`Side::A`] for the
    /// creator of the segment); `doorbell` is a connected non-blocking Unix stream to the peer
    /// process, used only for wake-ups and to detect the peer's death.
    pub fn new(segment: ShmSegment, side: Side, doorbell: UnixStream) -> ShmStream {
        ShmStream {
            segment,
            side,
            doorbell,
            peer_gone: false,
            closed: false,
            close_on_drop: true,
        }
    }

    /// The doorbell socket: register it with mio for READABLE; when it fires, call
    /// [`on_doorbell`](Self::on_doorbell).
    pub fn doorbell_mut(&mut self) -> &mut UnixStream {
        &mut self.doorbell
    }

    /// Which side of the segment we are.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The segment under this stream.
    pub fn segment(&self) -> &ShmSegment {
        &self.segment
    }

    /// Drains the doorbell. Returns `Ok(true)` while the peer is alive and open, `Ok(false)` once
    /// the doorbell reached end-of-file or was reset (the peer closed or died) or the peer set
    /// its closed flag. Afterwards, reads return what is left and then `Ok(0)`.
    ///
    /// # Errors
    ///
    /// An unexpected error reading the socket (`WouldBlock`, `Interrupted` and resets are
    /// handled here).
    pub fn on_doorbell(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 64];
        while !self.peer_gone {
            match self.doorbell.read(&mut buf) {
                Ok(0) => self.peer_gone = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
                    ) =>
                {
                    self.peer_gone = true
                }
                Err(e) => return Err(e),
            }
        }
        if self.peer_gone {
            tracing::debug!(path = %self.segment.path.display(), "shm peer hung up its doorbell");
        }
        Ok(!self.peer_finished())
    }

    /// Whether the peer closed its side (flag in the shared header) or its doorbell hung up.
    pub fn peer_closed(&self) -> bool {
        self.peer_finished()
    }

    /// Bytes that can be read right now without blocking (0 if the ring is corrupt; the next
    /// read reports that).
    pub fn readable_bytes(&self) -> usize {
        let ring = self.segment.ring(self.side.peer().index());
        let c = ring.counters(Ordering::Acquire, Ordering::Relaxed);
        ring.used(c).unwrap_or(0)
    }

    /// Bytes that can be written right now without blocking, ignoring whether the peer is still
    /// there (0 if the ring is corrupt; the next write reports that).
    pub fn writable_bytes(&self) -> usize {
        let ring = self.segment.ring(self.side.index());
        let c = ring.counters(Ordering::Relaxed, Ordering::Acquire);
        ring.used(c).map_or(0, |used| ring.size - used)
    }

    /// Closes our side: stores our closed flag in the shared header (after everything we wrote)
    /// and shuts the doorbell down, so the peer wakes up and sees end-of-stream once it has read
    /// the rest. Later reads return `Ok(0)`, later writes `BrokenPipe`. Idempotent.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        // Release: the peer that sees the flag also sees our last `tail`.
        self.segment.header().closed[self.side.index()].store(1, Ordering::Release);
        // The peer may already be gone (ENOTCONN): nothing left to tell it.
        let _ = self.doorbell.shutdown(Shutdown::Both);
    }

    /// Peer closed flag (Acquire) or doorbell hang-up.
    fn peer_finished(&self) -> bool {
        self.peer_gone
            || self.segment.header().closed[self.side.peer().index()].load(Ordering::Acquire) != 0
    }

    /// Finds readable bytes: `Some((head, available > 0))`, `None` at end of stream, or
    /// `WouldBlock` after arming `reader_waiting`.
    fn poll_read(&self) -> io::Result<Option<(u64, usize)>> {
        if self.closed {
            return Ok(None);
        }
        let ring = self.segment.ring(self.side.peer().index());
        let flag = &ring.ctrl.flags.0.reader_waiting;
        let mut armed = false;
        loop {
            // Loaded before `tail`: if the peer had closed, the `tail` below is its final one.
            let finished = self.peer_finished();
            let c = ring.counters(Ordering::Acquire, Ordering::Relaxed);
            let avail = ring.used(c).ok_or_else(|| self.segment.corrupt(&ring, c))?;
            if avail > 0 {
                if armed {
                    // Not going to sleep after all: spare the writer a doorbell write.
                    flag.store(0, Ordering::Relaxed);
                }
                return Ok(Some((c.head, avail)));
            }
            if finished {
                return Ok(None);
            }
            if armed {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            flag.store(1, Ordering::Relaxed);
            // Pairs with the writer's fence after it stores `tail` (Dekker).
            fence(Ordering::SeqCst);
            armed = true;
        }
    }

    /// Marks `n` bytes from `head` consumed and rings the peer if it waits for space.
    fn consume(&mut self, head: u64, n: usize) {
        let ring = self.segment.ring(self.side.peer().index());
        ring.ctrl
            .head
            .0
            .store(head.wrapping_add(n as u64), Ordering::Release);
        // Pairs with the writer's fence after it arms `writer_waiting` (Dekker).
        fence(Ordering::SeqCst);
        let flag = &ring.ctrl.flags.0.writer_waiting;
        let ring_it = flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::Relaxed) != 0;
        if ring_it {
            self.ring_doorbell();
        }
    }

    /// Finds free space: `(tail, free > 0)`, `BrokenPipe` if either side closed, or
    /// `WouldBlock` after arming `writer_waiting`.
    fn poll_write(&self) -> io::Result<(u64, usize)> {
        if self.closed || self.peer_finished() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let ring = self.segment.ring(self.side.index());
        let flag = &ring.ctrl.flags.0.writer_waiting;
        let mut armed = false;
        loop {
            let c = ring.counters(Ordering::Relaxed, Ordering::Acquire);
            let used = ring.used(c).ok_or_else(|| self.segment.corrupt(&ring, c))?;
            if used < ring.size {
                if armed {
                    flag.store(0, Ordering::Relaxed);
                }
                return Ok((c.tail, ring.size - used));
            }
            if armed {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            flag.store(1, Ordering::Relaxed);
            // Pairs with the reader's fence after it stores `head` (Dekker).
            fence(Ordering::SeqCst);
            armed = true;
        }
    }

    /// Publishes `n` bytes written from `tail` and rings the peer if it waits for data.
    fn publish(&mut self, tail: u64, n: usize) {
        let ring = self.segment.ring(self.side.index());
        ring.ctrl
            .tail
            .0
            .store(tail.wrapping_add(n as u64), Ordering::Release);
        // Pairs with the reader's fence after it arms `reader_waiting` (Dekker).
        fence(Ordering::SeqCst);
        let flag = &ring.ctrl.flags.0.reader_waiting;
        let ring_it = flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::Relaxed) != 0;
        if ring_it {
            self.ring_doorbell();
        }
    }

    /// Writes one wake byte to the doorbell. A full socket already holds wake bytes; a hung-up
    /// one means the peer is gone, which the next write reports.
    fn ring_doorbell(&mut self) {
        #[cfg(target_os = "linux")]
        const FLAGS: libc::c_int = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
        #[cfg(not(target_os = "linux"))]
        const FLAGS: libc::c_int = libc::MSG_DONTWAIT;
        let byte = [1u8];
        loop {
            // SAFETY: the descriptor belongs to `self.doorbell`, which is open for the whole
            // call; `byte` is a live 1-byte buffer. MSG_NOSIGNAL keeps a hung-up peer from
            // raising SIGPIPE in a host process that did not ignore it.
            let rc = unsafe {
                libc::send(
                    self.doorbell.as_raw_fd(),
                    byte.as_ptr().cast(),
                    byte.len(),
                    FLAGS,
                )
            };
            if rc >= 0 {
                return;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return,
                io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected => {
                    self.peer_gone = true;
                    return;
                }
                _ => {
                    tracing::debug!(error = %err, "shm doorbell write failed");
                    return;
                }
            }
        }
    }
}

impl Drop for ShmStream {
    fn drop(&mut self) {
        if self.close_on_drop {
            self.close();
        }
    }
}

impl Read for ShmStream {
    /// Copies up to `buf.len()` bytes out of the ring. `Ok(0)` means end of stream (or an empty
    /// `buf`); `WouldBlock` means the ring is empty and `reader_waiting` is armed, so the
    /// doorbell will fire when data arrives. A corrupt ring is `InvalidData`.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let Some((head, avail)) = self.poll_read()? else {
            return Ok(0);
        };
        let mut done = 0;
        {
            let ring = self.segment.ring(self.side.peer().index());
            for buf in bufs.iter_mut() {
                let n = buf.len().min(avail - done);
                ring.copy_out(head.wrapping_add(done as u64), &mut buf[..n]);
                done += n;
                if done == avail {
                    break;
                }
            }
        }
        self.consume(head, done);
        Ok(done)
    }
}

impl Write for ShmStream {
    /// Copies as much of `buf` as fits into the ring. `WouldBlock` means the ring is full and
    /// `writer_waiting` is armed, so the doorbell will fire when space frees up; `BrokenPipe`
    /// means either side closed; a corrupt ring is `InvalidData`.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let (tail, free) = self.poll_write()?;
        let mut done = 0;
        {
            let ring = self.segment.ring(self.side.index());
            for buf in bufs {
                let n = buf.len().min(free - done);
                ring.copy_in(tail.wrapping_add(done as u64), &buf[..n]);
                done += n;
                if done == free {
                    break;
                }
            }
        }
        self.publish(tail, done);
        Ok(done)
    }

    /// Nothing is buffered outside the ring: always `Ok(())`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Interest, Poll, Token};
    use std::mem::offset_of;
    use std::time::Duration;

    /// xorshift64*: seeded, reproducible test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform-ish in `lo..=hi`.
        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            let mut v = Vec::with_capacity(len + 8);
            while v.len() < len {
                v.extend_from_slice(&self.next().to_le_bytes());
            }
            v.truncate(len);
            v
        }
    }

    fn test_dir() -> PathBuf {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    }

    /// Two connected streams over a fresh segment (name already unlinked).
    fn pair(ring_bytes: usize) -> (ShmStream, ShmStream) {
        let (seg_a, path) = ShmSegment::create(&test_dir(), ring_bytes).unwrap();
        let seg_b = ShmSegment::open(&path).unwrap();
        seg_a.unlink().unwrap();
        assert!(!path.exists());
        let (bell_a, bell_b) = UnixStream::pair().unwrap();
        (
            ShmStream::new(seg_a, Side::A, bell_a),
            ShmStream::new(seg_b, Side::B, bell_b),
        )
    }

    fn is_would_block<T: std::fmt::Debug>(r: io::Result<T>) -> bool {
        matches!(r, Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads until `want` bytes arrived (single-threaded tests: data is already there).
    fn read_n(s: &mut ShmStream, want: usize) -> Vec<u8> {
        let mut out = vec![0u8; want];
        let mut got = 0;
        while got < want {
            let n = s.read(&mut out[got..]).unwrap();
            assert!(n > 0, "unexpected EOF after {got} of {want} bytes");
            got += n;
        }
        out
    }

    fn shm_error(err: &io::Error) -> &ShmError {
        err.get_ref()
            .and_then(|e| e.downcast_ref::<ShmError>())
            .unwrap_or_else(|| panic!("not a ShmError: {err:?}"))
    }

    #[test]
    fn shm_stream_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<ShmStream>();
        assert_send::<ShmSegment>();
    }

    #[test]
    fn shm_round_trip_both_directions() {
        let (mut a, mut b) = pair(MIN_RING_BYTES);
        assert_eq!(a.segment().ring_bytes(), MIN_RING_BYTES);
        assert_eq!(b.segment().ring_bytes(), MIN_RING_BYTES);
        assert_eq!(b.segment().creator_pid(), std::process::id());

        assert_eq!(a.write(b"hello from a").unwrap(), 12);
        assert_eq!(b.readable_bytes(), 12);
        assert_eq!(read_n(&mut b, 12), b"hello from a");

        let parts = [
            IoSlice::new(b"from "),
            IoSlice::new(b""),
            IoSlice::new(b"b"),
        ];
        assert_eq!(b.write_vectored(&parts).unwrap(), 6);
        let (mut x, mut y) = ([0u8; 2], [0u8; 10]);
        let mut bufs = [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)];
        assert_eq!(a.read_vectored(&mut bufs).unwrap(), 6);
        assert_eq!(&x, b"fr");
        assert_eq!(&y[..4], b"om b");
        assert!(is_would_block(a.read(&mut x)));
        assert!(a.on_doorbell().unwrap());
        assert!(b.on_doorbell().unwrap());
    }

    #[test]
    fn shm_default_ring_size_is_valid() {
        let (seg, _path) = ShmSegment::create(&test_dir(), DEFAULT_RING_BYTES).unwrap();
        assert_eq!(seg.ring_bytes(), DEFAULT_RING_BYTES);
    }

    #[test]
    fn shm_wrap_around_odd_sizes() {
        let (mut a, mut b) = pair(4096);
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let data = rng.bytes(1 << 20);
        let (mut wpos, mut rpos) = (0usize, 0usize);
        let mut buf = vec![0u8; 3000];
        let mut rounds = 0;
        while rpos < data.len() {
            rounds += 1;
            if wpos < data.len() {
                let len = rng.range(1, 3000).min(data.len() - wpos);
                match a.write(&data[wpos..wpos + len]) {
                    Ok(n) => {
                        assert!(n > 0 && n <= len);
                        wpos += n;
                    }
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
                }
            }
            let len = rng.range(1, 3000);
            match b.read(&mut buf[..len]) {
                Ok(n) => {
                    assert!(n > 0 && n <= len);
                    assert_eq!(&buf[..n], &data[rpos..rpos + n], "at byte {rpos}");
                    rpos += n;
                }
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        assert_eq!(wpos, data.len());
        assert!(rounds > 256, "too few rounds ({rounds}) to wrap many times");
    }

    #[test]
    fn shm_counters_wrap_past_u64_max() {
        let (mut a, mut b) = pair(4096);
        let start = u64::MAX - 50;
        let ring = a.segment.ring(0);
        ring.ctrl.head.0.store(start, Ordering::Relaxed);
        ring.ctrl.tail.0.store(start, Ordering::Relaxed);
        let data: Vec<u8> = (0..200u8).collect();
        assert_eq!(a.write(&data).unwrap(), 200);
        assert_eq!(read_n(&mut b, 200), data);
        assert_eq!(a.segment.ring(0).ctrl.tail.0.load(Ordering::Relaxed), 149);
    }

    /// Runs one side of the threaded test: sleeps in `poll` whenever the stream would block,
    /// and fails if a sleep ends by timeout (a lost wake-up).
    fn wait(poll: &mut Poll, events: &mut Events, s: &mut ShmStream, who: &str) -> bool {
        poll.poll(events, Some(Duration::from_secs(5))).unwrap();
        assert!(!events.is_empty(), "{who}: poll timed out: lost wake-up");
        s.on_doorbell().unwrap()
    }

    #[test]
    fn shm_threads_64mib_through_64kib_ring_sleep_and_wake() {
        const TOTAL: usize = 64 << 20;
        const RING: usize = 64 << 10;
        // Odd length, so pattern and ring boundaries drift against each other.
        const PATTERN: usize = (1 << 20) + 13;
        let pattern = std::sync::Arc::new(Rng(0xdead_beef_0042).bytes(PATTERN));
        let (mut a, mut b) = pair(RING);

        let src = pattern.clone();
        let writer = std::thread::spawn(move || {
            let mut poll = Poll::new().unwrap();
            let mut events = Events::with_capacity(4);
            poll.registry()
                .register(a.doorbell_mut(), Token(0), Interest::READABLE)
                .unwrap();
            let mut rng = Rng(0x1111_2222_3333);
            let (mut sent, mut sleeps) = (0usize, 0usize);
            while sent < TOTAL {
                let off = sent % PATTERN;
                let len = rng.range(1, 2 * RING).min(PATTERN - off).min(TOTAL - sent);
                match a.write(&src[off..off + len]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        sleeps += 1;
                        assert!(wait(&mut poll, &mut events, &mut a, "writer"));
                    }
                    Err(e) => panic!("writer: {e}"),
                }
            }
            a.close();
            sleeps
        });

        let reader = std::thread::spawn(move || {
            let mut poll = Poll::new().unwrap();
            let mut events = Events::with_capacity(4);
            poll.registry()
                .register(b.doorbell_mut(), Token(0), Interest::READABLE)
                .unwrap();
            let mut rng = Rng(0x4444_5555_6666);
            let mut buf = vec![0u8; 2 * RING];
            let (mut got, mut sleeps) = (0usize, 0usize);
            loop {
                let len = rng.range(1, 2 * RING);
                match b.read(&mut buf[..len]) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut checked = 0;
                        while checked < n {
                            let off = (got + checked) % PATTERN;
                            let k = (n - checked).min(PATTERN - off);
                            assert!(
                                buf[checked..checked + k] == pattern[off..off + k],
                                "content mismatch at byte {}",
                                got + checked
                            );
                            checked += k;
                        }
                        got += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        sleeps += 1;
                        wait(&mut poll, &mut events, &mut b, "reader");
                    }
                    Err(e) => panic!("reader: {e}"),
                }
            }
            (got, sleeps)
        });

        let writer_sleeps = writer.join().unwrap();
        let (got, reader_sleeps) = reader.join().unwrap();
        assert_eq!(got, TOTAL);
        // Both sides really slept: the wake-ups came through the doorbell.
        assert!(writer_sleeps > 0 && reader_sleeps > 0);
        eprintln!("writer slept {writer_sleeps} times, reader {reader_sleeps} times");
    }

    #[test]
    fn shm_full_and_empty_would_block_and_ring() {
        let (mut a, mut b) = pair(4096);
        let mut buf = [0u8; 64];

        // Empty: WouldBlock, reader_waiting armed.
        assert!(is_would_block(b.read(&mut buf)));
        let ring0 = |s: &ShmStream| {
            let r = s.segment.ring(0);
            (
                r.ctrl.flags.0.reader_waiting.load(Ordering::Relaxed),
                r.ctrl.flags.0.writer_waiting.load(Ordering::Relaxed),
            )
        };
        assert_eq!(ring0(&b), (1, 0));
        // A write disarms the flag and rings B's doorbell exactly once.
        assert_eq!(a.write(&[7u8; 100]).unwrap(), 100);
        assert_eq!(ring0(&b), (0, 0));
        assert_eq!(b.doorbell_mut().read(&mut buf).unwrap(), 1);
        assert!(is_would_block(b.doorbell_mut().read(&mut buf)));

        // Full: a partial write, then WouldBlock with writer_waiting armed.
        assert_eq!(a.writable_bytes(), 3996);
        assert_eq!(a.write(&[9u8; 5000]).unwrap(), 3996);
        assert_eq!(a.writable_bytes(), 0);
        assert!(is_would_block(a.write(&[1])));
        assert_eq!(ring0(&a), (0, 1));
        assert_eq!(b.readable_bytes(), 4096);
        // Reading frees space, disarms the flag and rings A's doorbell.
        assert_eq!(b.read(&mut buf[..10]).unwrap(), 10);
        assert_eq!(&buf[..10], &[7u8; 10]);
        assert_eq!(ring0(&a), (0, 0));
        assert_eq!(a.doorbell_mut().read(&mut buf).unwrap(), 1);
        assert_eq!(a.write(&[1u8; 20]).unwrap(), 10);
        // Nobody waits now: no more doorbell bytes.
        assert!(is_would_block(a.doorbell_mut().read(&mut buf)));
        assert!(is_would_block(b.doorbell_mut().read(&mut buf)));
    }

    #[test]
    fn shm_close_gives_rest_then_eof() {
        let (mut a, mut b) = pair(4096);
        assert_eq!(a.write(&[5u8; 300]).unwrap(), 300);
        a.close();
        a.close();
        assert!(!b.on_doorbell().unwrap());
        assert!(b.peer_closed());
        assert_eq!(read_n(&mut b, 300), vec![5u8; 300]);
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        assert_eq!(b.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        // Our own side after close.
        assert_eq!(a.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(a.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn shm_closed_flag_alone_ends_the_stream() {
        // Even a reader that never looks at its doorbell sees EOF via the shared flag.
        let (mut a, mut b) = pair(4096);
        assert_eq!(a.write(&[1u8; 10]).unwrap(), 10);
        drop(a);
        assert_eq!(read_n(&mut b, 10), vec![1u8; 10]);
        assert_eq!(b.read(&mut [0u8; 4]).unwrap(), 0);
    }

    #[test]
    fn shm_drop_is_seen_through_the_doorbell() {
        let (a, mut b) = pair(4096);
        drop(a);
        assert!(!b.on_doorbell().unwrap());
    }

    #[test]
    fn shm_peer_death_without_close() {
        for unread_wake_bytes in [false, true] {
            let (mut a, mut b) = pair(4096);
            a.close_on_drop = false; // behave like a process that was killed
            assert_eq!(a.write(&[3u8; 123]).unwrap(), 123);
            if unread_wake_bytes {
                // Closing a Unix socket with unread data resets the peer instead of EOF.
                b.ring_doorbell();
            }
            drop(a);
            // Flag not set: before the doorbell is drained, the rest is readable, then WouldBlock.
            assert!(!b.peer_closed());
            assert_eq!(read_n(&mut b, 123), vec![3u8; 123]);
            assert!(is_would_block(b.read(&mut [0u8; 4])));
            assert!(!b.on_doorbell().unwrap());
            assert!(b.peer_closed());
            assert_eq!(b.read(&mut [0u8; 4]).unwrap(), 0);
            assert_eq!(b.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
            assert!(!b.on_doorbell().unwrap());
        }
    }

    #[test]
    fn shm_create_rejects_bad_ring_sizes() {
        for value in [0, 1, 1000, 2048, 4097, 3 << 12, MAX_RING_BYTES * 2] {
            let err = ShmSegment::create(&test_dir(), value).unwrap_err();
            assert!(matches!(err, ShmError::InvalidRingSize { value: v } if v == value));
            let msg = err.to_string();
            assert!(
                msg.contains(&value.to_string()) && msg.contains("power of two"),
                "{msg}"
            );
        }
        let err = ShmSegment::create(Path::new("/nonexistent/bps"), 4096).unwrap_err();
        assert!(matches!(err, ShmError::Create { .. }));
        assert!(err.to_string().contains("/nonexistent/bps"));
        assert!(std::error::Error::source(&err).is_some());
    }

    /// Writes a file that looks like a segment header with the given fields.
    fn fake_segment(name: &str, magic: u64, version: u32, ring_bytes: u64, len: usize) -> PathBuf {
        let path = test_dir().join(format!("bps-shm-test-{}-{name}", std::process::id()));
        let mut bytes = vec![0u8; len];
        let mut put = |off: usize, v: &[u8]| {
            if off + v.len() <= len {
                bytes[off..off + v.len()].copy_from_slice(v);
            }
        };
        put(offset_of!(SegmentHeader, magic), &magic.to_le_bytes());
        put(offset_of!(SegmentHeader, version), &version.to_le_bytes());
        put(
            offset_of!(SegmentHeader, ring_bytes),
            &ring_bytes.to_le_bytes(),
        );
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Recognises the expected error variant.
    type Check = fn(&ShmError) -> bool;

    #[test]
    fn shm_open_rejects_bad_files() {
        let good_len = segment_len(4096) as usize;
        let v = LAYOUT_VERSION;
        let cases: Vec<(&str, PathBuf, Check, &str)> = vec![
            (
                "magic",
                fake_segment("magic", 0xabab_abab, v, 4096, good_len),
                |e| {
                    matches!(
                        e,
                        ShmError::BadMagic {
                            found: 0xabab_abab,
                            ..
                        }
                    )
                },
                "not a bps shm segment",
            ),
            (
                "short",
                fake_segment("short", MAGIC, v, 4096, 100),
                |e| matches!(e, ShmError::Truncated { len: 100, .. }),
                "100 bytes",
            ),
            (
                "empty",
                fake_segment("empty", MAGIC, v, 4096, 0),
                |e| matches!(e, ShmError::Truncated { len: 0, .. }),
                "0 bytes",
            ),
            (
                "version",
                fake_segment("version", MAGIC, 99, 4096, good_len),
                |e| matches!(e, ShmError::BadVersion { found: 99, .. }),
                "version 99",
            ),
            (
                "huge",
                fake_segment("huge", MAGIC, v, 1 << 40, good_len),
                |e| matches!(e, ShmError::BadRingSize { value, .. } if *value == 1 << 40),
                "1099511627776",
            ),
            (
                "odd",
                fake_segment("odd", MAGIC, v, 12345, good_len),
                |e| matches!(e, ShmError::BadRingSize { value: 12345, .. }),
                "12345",
            ),
            (
                "length",
                fake_segment("length", MAGIC, v, 8192, good_len),
                |e| {
                    matches!(
                        e,
                        ShmError::BadLength {
                            ring_bytes: 8192,
                            ..
                        }
                    )
                },
                "8192-byte rings",
            ),
        ];
        for (name, path, check, text) in cases {
            let err = ShmSegment::open(&path).unwrap_err();
            std::fs::remove_file(&path).unwrap();
            assert!(check(&err), "{name}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{name}: {msg}");
            assert!(msg.contains(text), "{name}: {msg}");
        }

        let missing = test_dir().join("bps-shm-test-does-not-exist");
        let err = ShmSegment::open(&missing).unwrap_err();
        assert!(matches!(err, ShmError::Io { verb: "open", .. }), "{err:?}");
        assert!(err.to_string().contains("bps-shm-test-does-not-exist"));

        let err = ShmSegment::open(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, ShmError::NotAFile { .. }), "{err:?}");
        assert!(err.to_string().contains("/dev/null"));

        // A fake with valid fields opens: the checks above are what rejected the others.
        let ok = fake_segment("ok", MAGIC, v, 4096, good_len);
        let seg = ShmSegment::open(&ok).unwrap();
        assert_eq!(seg.ring_bytes(), 4096);
        seg.unlink().unwrap();
        seg.unlink().unwrap();
        assert!(!ok.exists());
    }

    #[test]
    fn shm_corrupt_counters_are_errors() {
        let (mut a, mut b) = pair(4096);
        assert_eq!(a.write(&[1u8; 10]).unwrap(), 10);
        let set = |s: &ShmStream, head: u64, tail: u64| {
            let r = s.segment.ring(0);
            r.ctrl.head.0.store(head, Ordering::Relaxed);
            r.ctrl.tail.0.store(tail, Ordering::Relaxed);
        };
        let mut buf = vec![0u8; 8192];
        // tail too far ahead, head ahead of tail, both near the top of the range.
        for (head, tail) in [(0, 4097), (20, 10), (0, u64::MAX), (u64::MAX - 10, 5000)] {
            set(&a, head, tail);
            let err = b.read(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(
                matches!(shm_error(&err), ShmError::Corrupt { ring: 0, head: h, tail: t, .. }
                    if *h == head && *t == tail),
                "{err:?}"
            );
            assert!(err.to_string().contains("corrupt"), "{err}");
            let err = a.write(&buf[..100]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(b.readable_bytes(), 0);
            assert_eq!(a.writable_bytes(), 0);
        }
        // A lying but consistent state is only garbage, bounded by the ring.
        set(&a, 7, 7 + 4096);
        assert_eq!(b.read(&mut buf).unwrap(), 4096);
        assert!(is_would_block(b.read(&mut buf)));
        // The flags too: any value is harmless.
        let r = a.segment.ring(0);
        r.ctrl
            .flags
            .0
            .reader_waiting
            .store(u32::MAX, Ordering::Relaxed);
        assert_eq!(a.write(&[2u8; 5]).unwrap(), 5);
        assert_eq!(read_n(&mut b, 5), vec![2u8; 5]);
    }
}
