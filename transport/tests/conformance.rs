//! Transport conformance suite: one set of tests, instantiated for every backend this machine
//! can run (UCX's `UCT_INSTANTIATE_TEST_CASE` pattern).
//!
//! Each conformance test is a generic function taking a [`Backend`]; [`instantiate!`] turns the
//! list of tests that apply to a backend into `#[test]`s of a module named after it, so
//! `cargo test -p bps-transport --test conformance tcp::` runs the tcp instance of every test.
//!
//! * `tcp`: two [`Net`]s (`PeerId(0)` dials, `PeerId(1)` accepts), `force = Some(LinkKind::Tcp)`.
//! * `shm`: the same with `force = Some(LinkKind::Shm)` (needs `/dev/shm`; skipped without it).
//! * `loopback`: one `Net` talking to itself (`peer == me`).
//! * `rdma`: two [`Net`]s with `force = Some(LinkKind::Rdma)`: a tcp control link plus one RC
//!   queue pair (feature `rdma` and an RDMA device, e.g. Soft-RoCE in `ci/softroce`'s guest;
//!   skipped elsewhere unless `BPS_RDMA_REQUIRE=1`).
//!
//! Both endpoints live in the test thread and are driven by polling each in turn with short
//! timeouts; every test has an overall deadline, so a broken transport fails instead of hanging.
//! Tests at the bottom (`wire::*`, `api::*`) do not depend on a backend: malformed frames sent
//! from a raw `TcpStream`, the crate's self-send example, and the waker.
//!
//! What is checked is what `lib.rs` promises (the `Transport` docs) and DESIGN.md §4 says; where
//! a test relies on a property of this implementation (socket buffers, ring sizes) it says so.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bps_transport::codec::{Encoder, FrameHeader, FrameKind, MAX_HELLO, WIRE_VERSION};
use bps_transport::{
    Error, Event, LinkKind, Net, NetConfig, PeerId, Region, RemoteSlice, Result, Transport,
};

// ------------------------------------------------------------------------------------------------
// Largest-allocation probe: proves that a length read from the wire is bounded before anything is
// allocated (DESIGN.md §6).

/// Forwards to the system allocator and, while the current thread asked for it, records the
/// largest single request.
struct ProbeAlloc;

thread_local! {
    static PROBING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_request(size: usize) {
    // const-initialised thread-locals without destructors: no allocation, no re-entrancy.
    let _ = PROBING.try_with(|on| {
        if on.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the bookkeeping only touches plain thread-local cells.
unsafe impl GlobalAlloc for ProbeAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_request(layout.size());
        // SAFETY: forwarded as is; the caller's obligations for `layout` carry over.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_request(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by `System` (every allocation goes through it) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_request(new_size);
        // SAFETY: as in `dealloc`; `new_size` is the caller's, under the caller's obligations.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: ProbeAlloc = ProbeAlloc;

/// Runs `f` and returns its result with the largest allocation this thread asked for meanwhile.
fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    PROBING.with(|p| p.set(true));
    let out = f();
    PROBING.with(|p| p.set(false));
    (out, LARGEST.with(Cell::get))
}

// ------------------------------------------------------------------------------------------------
// Backends and the two-endpoint harness.

/// A backend under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Tcp,
    Shm,
    Loopback,
    /// tcp with the job secret: every link authenticates first.
    TcpAuth,
    /// shm with the job secret.
    ShmAuth,
    /// RDMA (queue pair) over a tcp control link.
    Rdma,
    /// rdma with the job secret (the RDMA offer is answered only after authentication).
    RdmaAuth,
}

/// The secret of the authenticated instantiations.
const SECRET: &[u8] = b"conformance-job-secret";

impl Backend {
    /// The link kind `link_kind` and `Event::Connected` must report.
    fn link(self) -> LinkKind {
        match self {
            Backend::Tcp | Backend::TcpAuth => LinkKind::Tcp,
            Backend::Shm | Backend::ShmAuth => LinkKind::Shm,
            Backend::Loopback => LinkKind::Loopback,
            Backend::Rdma | Backend::RdmaAuth => LinkKind::Rdma,
        }
    }

    /// `NetConfig::force` for this backend (loopback is chosen for `peer == me` whatever it is).
    fn force(self) -> Option<LinkKind> {
        match self {
            Backend::Tcp | Backend::TcpAuth => Some(LinkKind::Tcp),
            Backend::Shm | Backend::ShmAuth => Some(LinkKind::Shm),
            Backend::Loopback => None,
            Backend::Rdma | Backend::RdmaAuth => Some(LinkKind::Rdma),
        }
    }

    /// Factor on the harness deadline: Soft-RoCE under emulation moves 25-70 MB/s, and
    /// `back_pressure` alone writes about 120 MiB.
    fn slowdown(self) -> u32 {
        match self {
            Backend::Rdma | Backend::RdmaAuth => 6,
            _ => 1,
        }
    }

    /// Whether this machine can run it; prints why not.
    fn available(self) -> bool {
        let ok = match self {
            Backend::Shm | Backend::ShmAuth => std::path::Path::new("/dev/shm").is_dir(),
            Backend::Tcp | Backend::TcpAuth | Backend::Loopback => true,
            Backend::Rdma | Backend::RdmaAuth => match bps_transport::rdma::probe(&rdma_config()) {
                Ok(_) => true,
                Err(e) if std::env::var("BPS_RDMA_REQUIRE").as_deref() == Ok("1") => {
                    panic!("BPS_RDMA_REQUIRE=1 but no usable RDMA device: {e}")
                }
                Err(e) => {
                    eprintln!("skipped: backend Rdma cannot run on this machine: {e}");
                    return false;
                }
            },
        };
        if !ok {
            eprintln!("skipped: backend {self:?} cannot run on this machine (no /dev/shm)");
        }
        ok
    }
}

/// Knobs a test may change.
#[derive(Clone, Copy, Debug)]
struct Opts {
    lanes: u32,
    queue_depth: usize,
    max_msg: usize,
}

impl Default for Opts {
    fn default() -> Self {
        let d = NetConfig::new(PeerId(0), "127.0.0.1:0".parse().expect("literal address"));
        Opts {
            lanes: 2,
            queue_depth: d.queue_depth,
            max_msg: d.max_msg,
        }
    }
}

/// RDMA tunables of the `rdma` instance: the guest's device and GID index when given.
fn rdma_config() -> bps_transport::rdma::RdmaConfig {
    bps_transport::rdma::RdmaConfig {
        device: std::env::var("RXE_DEV").ok(),
        gid_index: std::env::var("RXE_GID_INDEX")
            .ok()
            .and_then(|v| v.parse().ok()),
        ..Default::default()
    }
}

fn config(backend: Backend, me: PeerId, opts: Opts) -> NetConfig {
    let mut c = NetConfig::new(me, "127.0.0.1:0".parse().expect("literal address"));
    c.rdma = rdma_config();
    c.force = backend.force();
    c.lanes = opts.lanes;
    c.queue_depth = opts.queue_depth;
    c.max_msg = opts.max_msg;
    c.connect_timeout = Duration::from_secs(5);
    if matches!(
        backend,
        Backend::TcpAuth | Backend::ShmAuth | Backend::RdmaAuth
    ) {
        c.secret = bps_transport::auth::Secret::new(SECRET.to_vec());
    }
    c
}

/// Overall deadline of one test's harness.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long a dead peer may take to be reported.
const LOSS_DEADLINE: Duration = Duration::from_secs(3);
const POLL_SLICE: Duration = Duration::from_millis(1);
const MIB: usize = 1 << 20;
/// The sending endpoint; the receiver knows the sender by this id on every backend.
const P0: PeerId = PeerId(0);
/// The receiving endpoint of tcp and shm.
const P1: PeerId = PeerId(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// `PeerId(0)`: posts sends and writes.
    Tx,
    /// `PeerId(1)` (tcp, shm) or `PeerId(0)` itself (loopback): receives them.
    Rx,
}

/// Heap memory handed to a transport by raw pointer, freed on drop.
struct Mem {
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    fn zeroed(len: usize) -> Mem {
        let b: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        Mem {
            len: b.len(),
            ptr: Box::into_raw(b).cast::<u8>(),
        }
    }

    /// Pseudo-random bytes with a period (65 521, prime) that no offset used here is a
    /// multiple of, so a payload landing at a wrong offset is seen.
    fn pattern(len: usize, seed: u64) -> Mem {
        const PERIOD: usize = 65_521;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let block: Vec<u8> = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let m = Mem::zeroed(len);
        // SAFETY: `m` owns `len` bytes at `ptr`; no transport knows it yet, so this is the only
        // access.
        let s = unsafe { std::slice::from_raw_parts_mut(m.ptr, m.len) };
        for chunk in s.chunks_mut(PERIOD) {
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        m
    }

    /// The bytes. Callers read only what no transport may be writing: bytes an
    /// `Event::WriteReceived` reported, or any byte once nothing is in flight.
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is the live allocation made in `zeroed`; the harness reads it
        // only while no transport writes it (see above), and only from this thread, the one that
        // polls the transports.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` come from `Box::into_raw` of a `Box<[u8]>` of this length, and
        // this is the only place that frees it.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )))
        }
    }
}

/// One write, as passed to `try_write_imm` (avoids an 8-argument helper).
#[derive(Clone, Copy, Debug)]
struct Wr {
    lane: u32,
    src: u64,
    src_offset: u64,
    len: u64,
    dst: RemoteSlice,
    imm: u32,
    wr_id: u64,
}

/// Two endpoints (or one, for loopback) and the events each reported that a test has not
/// consumed yet.
///
/// Field order matters: the `Net`s are dropped before the memory registered with them.
struct Pair {
    backend: Backend,
    a: Option<Net>,
    b: Option<Net>,
    ev_a: Vec<Event>,
    ev_b: Vec<Event>,
    deadline: Instant,
    mems: Vec<Mem>,
}

impl Pair {
    /// Binds the endpoints and tells each about the other; does not wait for the link.
    fn new(backend: Backend, opts: Opts) -> Option<Pair> {
        if !backend.available() {
            return None;
        }
        let a = Net::bind(config(backend, P0, opts)).expect("bind endpoint 0");
        let b = match backend {
            Backend::Loopback => None,
            _ => Some(Net::bind(config(backend, P1, opts)).expect("bind endpoint 1")),
        };
        Some(Pair::with_nets(backend, a, b))
    }

    /// As [`Pair::new`], from endpoints bound by the caller (`a` is `PeerId(0)`).
    fn with_nets(backend: Backend, mut a: Net, mut b: Option<Net>) -> Pair {
        assert_eq!(a.local_peer(), P0);
        match b.as_mut() {
            None => {
                let me = a.local_addr();
                a.add_peer(P0, me).expect("add self");
            }
            Some(b) => {
                assert_eq!(b.local_peer(), P1);
                a.add_peer(P1, b.local_addr())
                    .expect("endpoint 0 adds endpoint 1");
                b.add_peer(P0, a.local_addr())
                    .expect("endpoint 1 adds endpoint 0");
            }
        }
        Pair {
            backend,
            a: Some(a),
            b,
            ev_a: Vec::new(),
            ev_b: Vec::new(),
            deadline: Instant::now() + DEADLINE * backend.slowdown(),
            mems: Vec::new(),
        }
    }

    /// Waits until both sides report `Connected` with the backend's kind, and checks
    /// `link_kind` on both.
    fn establish(&mut self) {
        let (kind, dst) = (self.backend.link(), self.dst());
        let got = self.wait(Side::Tx, "Connected on endpoint 0", |e| match e {
            Event::Connected { peer, kind } if *peer == dst => Some(*kind),
            _ => None,
        });
        assert_eq!(got, kind, "endpoint 0 reports the link to {dst} as {got}");
        if self.backend != Backend::Loopback {
            let got = self.wait(Side::Rx, "Connected on endpoint 1", |e| match e {
                Event::Connected { peer, kind } if *peer == P0 => Some(*kind),
                _ => None,
            });
            assert_eq!(got, kind, "endpoint 1 reports the link to 0 as {got}");
            assert_eq!(self.rx().link_kind(P0), Some(kind));
        }
        assert_eq!(self.tx().link_kind(dst), Some(kind));
    }

    fn connected(backend: Backend, opts: Opts) -> Option<Pair> {
        let mut p = Pair::new(backend, opts)?;
        p.establish();
        Some(p)
    }

    /// The id the sender addresses the receiver by.
    fn dst(&self) -> PeerId {
        match self.backend {
            Backend::Loopback => P0,
            _ => P1,
        }
    }

    fn net(&mut self, side: Side) -> &mut Net {
        let n = match (side, self.backend) {
            (Side::Tx, _) | (Side::Rx, Backend::Loopback) => self.a.as_mut(),
            (Side::Rx, _) => self.b.as_mut(),
        };
        n.expect("endpoint was dropped")
    }

    fn tx(&mut self) -> &mut Net {
        self.net(Side::Tx)
    }

    fn rx(&mut self) -> &mut Net {
        self.net(Side::Rx)
    }

    fn events(&mut self, side: Side) -> &mut Vec<Event> {
        match (side, self.backend) {
            (Side::Tx, _) | (Side::Rx, Backend::Loopback) => &mut self.ev_a,
            (Side::Rx, _) => &mut self.ev_b,
        }
    }

    /// Drops one endpoint (its link closes as the process would on exit).
    fn drop_side(&mut self, side: Side) {
        assert_ne!(self.backend, Backend::Loopback);
        match side {
            Side::Tx => self.a = None,
            Side::Rx => self.b = None,
        }
    }

    /// Polls one side once.
    fn poll_side(&mut self, side: Side, timeout: Duration) {
        let (net, ev) = match (side, self.backend) {
            (Side::Tx, _) | (Side::Rx, Backend::Loopback) => (self.a.as_mut(), &mut self.ev_a),
            (Side::Rx, _) => (self.b.as_mut(), &mut self.ev_b),
        };
        if let Some(net) = net {
            net.poll(ev, Some(timeout)).expect("poll");
        }
    }

    /// Polls every live endpoint once with a short timeout.
    fn pump(&mut self) {
        self.poll_side(Side::Tx, POLL_SLICE);
        if self.backend != Backend::Loopback {
            self.poll_side(Side::Rx, POLL_SLICE);
        }
    }

    /// Pumps for `d`, consuming nothing.
    fn pump_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump();
        }
    }

    fn check_deadline(&self, limit: Instant, what: &str) {
        if Instant::now() > limit {
            panic!(
                "timed out waiting for {what}\n  endpoint 0 events: {:?}\n  endpoint 1 events: {:?}",
                self.ev_a, self.ev_b
            );
        }
    }

    /// Pumps until `side` reports an event `f` accepts (consumed and returned), before `limit`.
    /// An unexpected `PeerLost` fails at once instead of at the deadline.
    fn wait_until<T>(
        &mut self,
        side: Side,
        limit: Instant,
        what: &str,
        mut f: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        loop {
            let q = self.events(side);
            if let Some((i, t)) = q.iter().enumerate().find_map(|(i, e)| f(e).map(|t| (i, t))) {
                q.remove(i);
                return t;
            }
            if let Some(lost) = q.iter().find(|e| matches!(e, Event::PeerLost { .. })) {
                panic!("while waiting for {what}: unexpected {lost:?}");
            }
            self.check_deadline(limit, what);
            self.pump();
        }
    }

    fn wait<T>(&mut self, side: Side, what: &str, f: impl FnMut(&Event) -> Option<T>) -> T {
        let limit = self.deadline;
        self.wait_until(side, limit, what, f)
    }

    /// Pumps until `side` reported `n` events `keep` accepts; removes and returns the first `n`
    /// of them in the order they were reported.
    fn collect(
        &mut self,
        side: Side,
        n: usize,
        what: &str,
        keep: impl Fn(&Event) -> bool,
    ) -> Vec<Event> {
        loop {
            let q = self.events(side);
            if q.iter().filter(|e| keep(e)).count() >= n {
                let mut out = Vec::with_capacity(n);
                let mut rest = Vec::with_capacity(q.len());
                for e in q.drain(..) {
                    if out.len() < n && keep(&e) {
                        out.push(e);
                    } else {
                        rest.push(e);
                    }
                }
                *q = rest;
                return out;
            }
            if let Some(lost) = q.iter().find(|e| matches!(e, Event::PeerLost { .. })) {
                panic!("while collecting {n} × {what}: unexpected {lost:?}");
            }
            self.check_deadline(self.deadline, what);
            self.pump();
        }
    }

    /// Whether `side` holds an event `f` accepts.
    fn saw(&mut self, side: Side, f: impl Fn(&Event) -> bool) -> bool {
        self.events(side).iter().any(f)
    }

    /// `try_send` from the sender, retrying on `Busy` (back-pressure is not a failure).
    fn send(&mut self, lane: u32, msg: &[u8]) {
        self.send_from(Side::Tx, lane, msg);
    }

    fn send_from(&mut self, side: Side, lane: u32, msg: &[u8]) {
        let to = match side {
            Side::Tx => self.dst(),
            Side::Rx => P0,
        };
        loop {
            match self.net(side).try_send(to, lane, msg) {
                Ok(()) => return,
                Err(e) if e.is_busy() => {
                    self.check_deadline(self.deadline, "send queue to drain");
                    self.pump();
                }
                Err(e) => panic!("try_send of {} bytes on lane {lane}: {e}", msg.len()),
            }
        }
    }

    fn try_write(&mut self, w: &Wr) -> Result<()> {
        let dst = self.dst();
        self.tx().try_write_imm(
            dst,
            w.lane,
            w.src,
            w.src_offset,
            w.len,
            w.dst,
            w.imm,
            w.wr_id,
        )
    }

    /// `try_write_imm` from the sender, retrying on `Busy`.
    fn write(&mut self, w: &Wr) {
        loop {
            match self.try_write(w) {
                Ok(()) => return,
                Err(e) if e.is_busy() => {
                    self.check_deadline(self.deadline, "write queue to drain");
                    self.pump();
                }
                Err(e) => panic!("try_write_imm {w:?}: {e}"),
            }
        }
    }

    fn mem(&mut self, m: Mem) -> usize {
        self.mems.push(m);
        self.mems.len() - 1
    }

    /// Registers memory `idx` with one side's `Net`.
    fn register(&mut self, side: Side, idx: usize) -> Region {
        let (ptr, len) = (self.mems[idx].ptr, self.mems[idx].len);
        let net = self.net(side);
        // SAFETY: the memory is owned by `self.mems`, which is dropped after the `Net`s (field
        // order) and never moved (it is a boxed slice); tests read it only after a
        // `WriteReceived` for the bytes or when nothing is in flight, and never modify it.
        let r = unsafe { net.register(ptr, len) }.expect("register");
        assert_eq!(r.len, len as u64);
        r
    }

    fn bytes(&self, idx: usize) -> &[u8] {
        self.mems[idx].bytes()
    }
}

fn msg_of(e: &Event) -> Option<(PeerId, u32, &[u8])> {
    match e {
        Event::Message { peer, lane, data } => Some((*peer, *lane, data)),
        _ => None,
    }
}

fn is_msg(e: &Event) -> bool {
    matches!(e, Event::Message { .. })
}

fn is_write_received(e: &Event) -> bool {
    matches!(e, Event::WriteReceived { .. })
}

fn is_write_done(e: &Event) -> bool {
    matches!(e, Event::WriteDone { .. })
}

/// Asserts equal byte strings without printing megabytes.
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: first difference at byte {i} of {}: got {:#04x}, want {:#04x}",
            want.len(),
            got[i],
            want[i]
        );
    }
}

/// A tagged message: sender lane, sequence number, then filler up to `len` (at least 5).
fn tagged(lane: u32, seq: u32, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.max(5));
    v.push(lane as u8);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend((5..len).map(|i| (i as u32 ^ seq.wrapping_mul(31) ^ lane) as u8));
    v
}

// ------------------------------------------------------------------------------------------------
// Instantiation.

/// Instantiates the listed conformance tests for one backend: `mod $backend { #[test] fn t() }`
/// calling `t(Backend::...)`. Attributes before a test name (e.g. `#[ignore = "BUG: ..."]`) go on
/// its instance.
macro_rules! instantiate {
    ($backend:ident = $value:expr; $($(#[$meta:meta])* $test:ident),+ $(,)?) => {
        mod $backend {
            $(
                $(#[$meta])*
                #[test]
                fn $test() {
                    super::$test($value);
                }
            )+
        }
    };
}

instantiate!(tcp = crate::Backend::Tcp;
    connect_reports_kind,
    messages,
    send_before_connected,
    unknown_peer,
    write_imm,
    send_then_write_in_order,
    local_write_errors,
    remote_bad_destination,
    back_pressure,
    peer_loss,
    deregister,
    deregister_discards_partly_received_write,
    deregister_discards_write_already_sent,
    many_lanes,
);

instantiate!(shm = crate::Backend::Shm;
    connect_reports_kind,
    messages,
    send_before_connected,
    unknown_peer,
    write_imm,
    send_then_write_in_order,
    local_write_errors,
    remote_bad_destination,
    back_pressure,
    peer_loss,
    deregister,
    deregister_discards_partly_received_write,
    deregister_discards_write_already_sent,
);

// The whole suite again with authentication on every link.
instantiate!(tcp_auth = crate::Backend::TcpAuth;
    connect_reports_kind,
    messages,
    send_before_connected,
    unknown_peer,
    write_imm,
    send_then_write_in_order,
    local_write_errors,
    remote_bad_destination,
    back_pressure,
    peer_loss,
    deregister,
    deregister_discards_partly_received_write,
    deregister_discards_write_already_sent,
    many_lanes,
);

instantiate!(shm_auth = crate::Backend::ShmAuth;
    connect_reports_kind,
    messages,
    send_before_connected,
    unknown_peer,
    write_imm,
    send_then_write_in_order,
    local_write_errors,
    remote_bad_destination,
    back_pressure,
    peer_loss,
    deregister,
    deregister_discards_partly_received_write,
    deregister_discards_write_already_sent,
);

// RDMA: every test but two whose premise does not hold for RDMA.
// * `deregister_discards_partly_received_write`: deregistering a region while a peer's RDMA WRITE
//   is still landing in it makes the NIC refuse the rest (remote access error), which breaks the
//   queue pair: the link is lost instead of the write being discarded. tcp and shm can discard
//   because the receiving process copies the bytes itself.
// * `deregister_discards_write_already_sent`: only the sender polls, but the first write to a
//   token waits for the owner's answer to its resolution (token -> addr, rkey), which needs the
//   owner to poll. The discard itself is tested in `rdma_net.rs` after a warm-up write.
instantiate!(rdma = crate::Backend::Rdma;
    connect_reports_kind,
    messages,
    send_before_connected,
    unknown_peer,
    write_imm,
    send_then_write_in_order,
    local_write_errors,
    remote_bad_destination,
    back_pressure,
    peer_loss,
    deregister,
    many_lanes,
);

// RDMA with authentication: the offer travels in the (unauthenticated) Hello but is answered only
// once the dialler proved it holds the secret.
instantiate!(rdma_auth = crate::Backend::RdmaAuth;
    connect_reports_kind,
    send_before_connected,
    write_imm,
    send_then_write_in_order,
    peer_loss,
);

instantiate!(loopback = crate::Backend::Loopback;
    connect_reports_kind,
    messages,
    send_before_connected,
    unknown_peer,
    write_imm,
    send_then_write_in_order,
    local_write_errors,
    remote_bad_destination,
    back_pressure,
    deregister,
);

// ------------------------------------------------------------------------------------------------
// Conformance tests (generic over the backend).

/// `Event::Connected` names the peer and the forced kind on both sides; `link_kind` agrees
/// (checked in `establish`); `local_peer` is the configured id.
fn connect_reports_kind(backend: Backend) {
    let Some(mut p) = Pair::connected(backend, Opts::default()) else {
        return;
    };
    assert_eq!(p.tx().local_peer(), P0);
    if backend != Backend::Loopback {
        assert_eq!(p.rx().local_peer(), P1);
    }
    // A peer nobody mentioned has no link kind.
    assert_eq!(p.tx().link_kind(PeerId(77)), None);
}

/// Many small messages on two lanes — empty, odd-sized and exactly `max_msg` bytes — arrive
/// intact and in order per lane; one byte over `max_msg` is refused at send.
fn messages(backend: Backend) {
    let opts = Opts {
        max_msg: 64 * 1024 + 7,
        ..Opts::default()
    };
    let max = opts.max_msg;
    let Some(mut p) = Pair::connected(backend, opts) else {
        return;
    };
    let dst = p.dst();

    match p.tx().try_send(dst, 0, &vec![1u8; max + 1]) {
        Err(Error::MessageTooLarge { len, max: m }) => {
            assert_eq!((len, m), (max + 1, max));
        }
        other => panic!("a message of max_msg + 1 bytes: expected MessageTooLarge, got {other:?}"),
    }

    // Lane 0 carries the untagged (empty) messages, so every message can be told apart: tagged
    // ones name their lane in byte 0, empty ones belong to lane 0.
    const PER_LANE: u32 = 300;
    let sizes = [5usize, 6, 17, 64, 300, 1500, 4096, 9000];
    let mut want: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    for seq in 0..PER_LANE {
        for lane in 0..2u32 {
            let len = match seq {
                7 | 150 | 299 => max,
                _ => sizes[(seq as usize * 7 + lane as usize * 3) % sizes.len()],
            };
            let m = tagged(lane, seq, len);
            p.send(lane, &m);
            want[lane as usize].push(m);
            if lane == 0 && seq % 50 == 0 {
                p.send(0, &[]);
                want[0].push(Vec::new());
            }
        }
    }
    let n = want[0].len() + want[1].len();
    let got = p.collect(Side::Rx, n, "messages", is_msg);

    let mut got_by_lane: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    let mut reported_lane: [BTreeSet<u32>; 2] = [BTreeSet::new(), BTreeSet::new()];
    for e in &got {
        let (peer, lane, data) = msg_of(e).expect("collected messages only");
        assert_eq!(peer, P0, "message from the wrong peer");
        let from = if data.is_empty() { 0 } else { data[0] as usize };
        assert!(from < 2, "message with a tag no one sent: {data:?}");
        got_by_lane[from].push(data.to_vec());
        reported_lane[from].insert(lane);
    }
    for lane in 0..2 {
        assert_eq!(
            got_by_lane[lane].len(),
            want[lane].len(),
            "lane {lane}: message count"
        );
        for (i, (g, w)) in got_by_lane[lane].iter().zip(&want[lane]).enumerate() {
            assert_same_bytes(g, w, &format!("lane {lane}, message {i} (in send order)"));
        }
        assert_eq!(
            reported_lane[lane].len(),
            1,
            "messages sent on lane {lane} report different lanes: {:?}",
            reported_lane[lane]
        );
    }
    assert_eq!(
        reported_lane[0],
        BTreeSet::from([0]),
        "lane 0 reported as another lane"
    );
    assert!(!p.saw(Side::Rx, is_msg), "more messages than were sent");
}

/// Messages posted right after `add_peer`, before `Connected` (both from the dialling and the
/// accepting side), are delivered once the link is up.
fn send_before_connected(backend: Backend) {
    let Some(mut p) = Pair::new(backend, Opts::default()) else {
        return;
    };
    for lane in 0..2 {
        p.send(lane, format!("from 0 on lane {lane}").as_bytes());
        p.send_from(Side::Rx, lane, format!("to 0 on lane {lane}").as_bytes());
    }
    p.establish();
    let dst = p.dst();
    for lane in 0..2 {
        let want = format!("from 0 on lane {lane}").into_bytes();
        p.wait(Side::Rx, "early message from 0", |e| {
            msg_of(e)
                .filter(|(peer, _, d)| *peer == P0 && *d == want)
                .map(|_| ())
        });
        let want = format!("to 0 on lane {lane}").into_bytes();
        p.wait(Side::Tx, "early message to 0", |e| {
            msg_of(e)
                .filter(|(peer, _, d)| *peer == dst && *d == want)
                .map(|_| ())
        });
    }
}

/// A peer never added (and never connected) is `UnknownPeer` for sends and writes, the process
/// itself included until it was added.
fn unknown_peer(backend: Backend) {
    if !backend.available() {
        return;
    }
    // Declared before `net`, so dropped after it.
    let m = Mem::pattern(64, 3);
    let mut net = Net::bind(config(backend, P0, Opts::default())).expect("bind");
    let target = match backend {
        Backend::Loopback => P0,
        _ => P1,
    };
    // SAFETY: `m` outlives `net` (declared first, dropped last) and is not touched meanwhile.
    let src = unsafe { net.register(m.ptr, m.len) }.expect("register");
    for peer in [target, PeerId(42)] {
        match net.try_send(peer, 0, b"x") {
            Err(Error::UnknownPeer { peer: p }) => assert_eq!(p, peer),
            other => panic!("try_send to never-added peer {peer}: {other:?}"),
        }
        let dst = RemoteSlice {
            token: src.token,
            offset: 0,
        };
        match net.try_write_imm(peer, 0, src.token, 0, 8, dst, 1, 1) {
            Err(Error::UnknownPeer { peer: p }) => assert_eq!(p, peer),
            other => panic!("try_write_imm to never-added peer {peer}: {other:?}"),
        }
    }
    let mut ev = Vec::new();
    net.poll(&mut ev, Some(Duration::from_millis(20)))
        .expect("poll");
    assert!(ev.is_empty(), "events without any peer: {ev:?}");
}

/// Writes of 1 B, 4 KiB, 1 MiB, 8 MiB and 0 B (also one ending exactly at the region's end) at
/// unaligned offsets: the receiver gets `WriteReceived` with the imm, token, offset and length,
/// in posting order (one lane), with the bytes in place; the sender gets one `WriteDone` per
/// `wr_id`.
fn write_imm(backend: Backend) {
    let Some(mut p) = Pair::connected(backend, Opts::default()) else {
        return;
    };
    let dst_len = 12 * MIB;
    let src_m = p.mem(Mem::pattern(9 * MIB, 11));
    let dst_m = p.mem(Mem::zeroed(dst_len));
    let s = p.register(Side::Tx, src_m);
    let d = p.register(Side::Rx, dst_m);
    // (len, src offset, dst offset), dst ranges disjoint.
    let cases: [(usize, usize, usize); 7] = [
        (1, 0, 0),
        (4096, 3, 17),
        (MIB, 4099, 8192 + 5),
        (8 * MIB, 33, 2 * MIB + 1),
        (0, 5, 100),
        (0, 0, dst_len),
        (4096, 9 * MIB - 4096, dst_len - 4096),
    ];
    for (i, &(len, so, doff)) in cases.iter().enumerate() {
        p.write(&Wr {
            lane: 0,
            src: s.token,
            src_offset: so as u64,
            len: len as u64,
            dst: RemoteSlice {
                token: d.token,
                offset: doff as u64,
            },
            imm: 0xA5A5_0000 + i as u32,
            wr_id: 1000 + i as u64,
        });
    }

    let got = p.collect(Side::Rx, cases.len(), "WriteReceived", is_write_received);
    for (i, (e, &(len, _, doff))) in got.iter().zip(&cases).enumerate() {
        match e {
            Event::WriteReceived {
                peer,
                imm,
                token,
                offset,
                len: l,
            } => {
                assert_eq!(*peer, P0, "write {i}: writer");
                assert_eq!(*imm, 0xA5A5_0000 + i as u32, "write {i}: imm (or order)");
                assert_eq!(*token, d.token, "write {i}: token");
                assert_eq!(*offset, doff as u64, "write {i}: offset");
                assert_eq!(*l, len as u64, "write {i}: len");
            }
            _ => unreachable!("collected WriteReceived only"),
        }
    }
    let done = p.collect(Side::Tx, cases.len(), "WriteDone", is_write_done);
    let mut ids: Vec<u64> = done
        .iter()
        .map(|e| match e {
            Event::WriteDone { peer, wr_id } => {
                assert_eq!(*peer, p.dst(), "WriteDone names the peer written to");
                *wr_id
            }
            _ => unreachable!(),
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1000..1000 + cases.len() as u64).collect::<Vec<_>>());

    // Nothing is in flight now: the whole destination must be exactly the writes on zeroes.
    let mut want = vec![0u8; dst_len];
    let src = p.bytes(src_m);
    for &(len, so, doff) in &cases {
        want[doff..doff + len].copy_from_slice(&src[so..so + len]);
    }
    assert_same_bytes(p.bytes(dst_m), &want, "destination region");
    p.pump_for(Duration::from_millis(10));
    assert!(
        !p.saw(Side::Rx, is_write_received),
        "more WriteReceived than writes"
    );
    assert!(
        !p.saw(Side::Tx, is_write_done),
        "more WriteDone than writes"
    );
}

/// On one lane, sends and writes are seen by the receiver in posting order — a `try_send`
/// followed by a `try_write_imm` and the reverse, with large and empty writes in between.
fn send_then_write_in_order(backend: Backend) {
    let Some(mut p) = Pair::connected(backend, Opts::default()) else {
        return;
    };
    let src_m = p.mem(Mem::pattern(MIB, 5));
    let dst_m = p.mem(Mem::zeroed(MIB));
    let s = p.register(Side::Tx, src_m);
    let d = p.register(Side::Rx, dst_m);
    for lane in 0..2u32 {
        let write = |imm: u32, len: usize| Wr {
            lane,
            src: s.token,
            src_offset: 0,
            len: len as u64,
            dst: RemoteSlice {
                token: d.token,
                offset: 0,
            },
            imm,
            wr_id: u64::from(imm),
        };
        p.send(lane, b"A");
        p.write(&write(1, MIB));
        p.send(lane, b"B");
        p.write(&write(2, 1));
        p.send(lane, b"C");
        p.write(&write(3, 0));
        let got = p.collect(Side::Rx, 6, "messages and writes", |e| {
            is_msg(e) || is_write_received(e)
        });
        let seen: Vec<String> = got
            .iter()
            .map(|e| match e {
                Event::Message { data, .. } => String::from_utf8_lossy(data).into_owned(),
                Event::WriteReceived { imm, .. } => format!("w{imm}"),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            seen,
            ["A", "w1", "B", "w2", "C", "w3"],
            "lane {lane}: arrival order"
        );
        p.collect(Side::Tx, 3, "WriteDone", is_write_done);
    }
}

/// A source range outside its region is `OutOfBounds` (also when offset + len overflows), an
/// unknown source token `UnknownToken`; nothing is sent and the link stays usable.
fn local_write_errors(backend: Backend) {
    let Some(mut p) = Pair::connected(backend, Opts::default()) else {
        return;
    };
    let src_m = p.mem(Mem::pattern(4096, 9));
    let dst_m = p.mem(Mem::zeroed(4096));
    let s = p.register(Side::Tx, src_m);
    let d = p.register(Side::Rx, dst_m);
    let base = Wr {
        lane: 0,
        src: s.token,
        src_offset: 0,
        len: 8,
        dst: RemoteSlice {
            token: d.token,
            offset: 0,
        },
        imm: 1,
        wr_id: 1,
    };
    for (src_offset, len) in [
        (4090, 7),
        (4097, 0),
        (0, 4097),
        (u64::MAX, 2),
        (8, u64::MAX),
    ] {
        match p.try_write(&Wr {
            src_offset,
            len,
            ..base
        }) {
            Err(Error::OutOfBounds {
                token,
                offset,
                len: l,
                region_len,
            }) => {
                assert_eq!(
                    (token, offset, l, region_len),
                    (s.token, src_offset, len, 4096)
                );
            }
            other => panic!(
                "source {src_offset}+{len} of 4096 bytes: expected OutOfBounds, got {other:?}"
            ),
        }
    }
    // Tokens are never even in this implementation, but the point is: never registered here.
    let unknown = d.token.wrapping_add(2);
    match p.try_write(&Wr {
        src: unknown,
        ..base
    }) {
        Err(Error::UnknownToken { token }) => assert_eq!(token, unknown),
        other => panic!("unknown source token: expected UnknownToken, got {other:?}"),
    }
    p.pump_for(Duration::from_millis(30));
    assert!(
        !p.saw(Side::Tx, is_write_done) && !p.saw(Side::Rx, is_write_received),
        "a refused write produced events"
    );
    // The link still works, and a valid write still lands.
    p.write(&Wr { len: 4096, ..base });
    p.wait(Side::Rx, "WriteReceived after refused writes", |e| {
        is_write_received(e).then_some(())
    });
    assert_same_bytes(p.bytes(dst_m), p.bytes(src_m), "destination");
}

/// A write naming a destination the receiver never registered, one past its end, or one whose
/// offset + len overflows: the receiver closes the connection and reports `PeerLost` for the
/// writer; the writer then sees `PeerLost` too, and later sends fail (not `Busy`). Loopback has
/// no connection to close: the call fails and nothing is written.
fn remote_bad_destination(backend: Backend) {
    /// Where the bad write goes, given the receiver's region.
    type Target = fn(Region) -> RemoteSlice;
    let cases: [(&str, Target, u64); 3] = [
        (
            "unregistered token",
            |d| RemoteSlice {
                token: d.token.wrapping_add(2),
                offset: 0,
            },
            16,
        ),
        (
            "past the end",
            |d| RemoteSlice {
                token: d.token,
                offset: d.len - 10,
            },
            11,
        ),
        (
            "offset + len overflows",
            |d| RemoteSlice {
                token: d.token,
                offset: u64::MAX - 3,
            },
            8,
        ),
    ];
    for (what, dst_of, len) in &cases {
        let Some(mut p) = Pair::connected(backend, Opts::default()) else {
            return;
        };
        let src_m = p.mem(Mem::pattern(4096, 1));
        let dst_m = p.mem(Mem::zeroed(4096));
        let s = p.register(Side::Tx, src_m);
        let d = p.register(Side::Rx, dst_m);
        let w = Wr {
            lane: 0,
            src: s.token,
            src_offset: 0,
            len: *len,
            dst: dst_of(d),
            imm: 9,
            wr_id: 9,
        };
        let dst = p.dst();
        if backend == Backend::Loopback {
            match p.try_write(&w) {
                Err(e) => assert!(!e.is_busy(), "{what}: Busy is not a refusal"),
                Ok(()) => panic!("{what}: loopback accepted a write outside its regions"),
            }
            p.pump_for(Duration::from_millis(20));
            assert!(!p.saw(Side::Rx, is_write_received), "{what}: WriteReceived");
            assert!(
                p.bytes(dst_m).iter().all(|b| *b == 0),
                "{what}: region modified"
            );
            p.send(0, b"still here");
            p.wait(Side::Rx, "message after a refused write", |e| {
                msg_of(e)
                    .filter(|(_, _, d)| *d == b"still here")
                    .map(|_| ())
            });
            continue;
        }
        p.write(&w);
        let limit = Instant::now() + LOSS_DEADLINE;
        p.wait_until(
            Side::Rx,
            limit,
            &format!("{what}: receiver reports PeerLost"),
            |e| match e {
                Event::PeerLost { peer, .. } if *peer == P0 => Some(()),
                Event::WriteReceived { .. } => panic!("{what}: receiver accepted the write: {e:?}"),
                _ => None,
            },
        );
        p.wait_until(
            Side::Tx,
            limit,
            &format!("{what}: writer reports PeerLost"),
            |e| match e {
                Event::PeerLost { peer, .. } if *peer == dst => Some(()),
                _ => None,
            },
        );
        assert!(
            p.bytes(dst_m).iter().all(|b| *b == 0),
            "{what}: region modified"
        );
        match p.tx().try_send(dst, 0, b"after") {
            Err(e) => assert!(!e.is_busy(), "{what}: send after loss is Busy"),
            Ok(()) => panic!("{what}: send to a lost peer succeeded"),
        }
        match p.rx().try_send(P0, 0, b"after") {
            Err(e) => assert!(!e.is_busy(), "{what}: send after loss is Busy"),
            Ok(()) => panic!("{what}: send to a lost peer succeeded"),
        }
    }
}

/// With `queue_depth` 4 and 8 MiB writes, `try_write_imm` runs into `Busy` (tcp, shm: the
/// queue is bounded and nobody drains the link); after polling both sides the same write is
/// accepted, and every accepted write arrives in order and completes. Loopback has no queue:
/// `Busy` is allowed but not required there.
fn back_pressure(backend: Backend) {
    let opts = Opts {
        queue_depth: 4,
        ..Opts::default()
    };
    let Some(mut p) = Pair::connected(backend, opts) else {
        return;
    };
    const LEN: usize = 8 * MIB;
    let src_m = p.mem(Mem::pattern(LEN + MIB, 21));
    let dst_m = p.mem(Mem::zeroed(LEN));
    let s = p.register(Side::Tx, src_m);
    let d = p.register(Side::Rx, dst_m);
    let w = |i: u32| Wr {
        lane: 0,
        src: s.token,
        src_offset: (u64::from(i) * 4099) % MIB as u64,
        len: LEN as u64,
        dst: RemoteSlice {
            token: d.token,
            offset: 0,
        },
        imm: i,
        wr_id: 500 + u64::from(i),
    };
    let mut next = 0u32;
    let mut busy = false;
    while next < 12 {
        match p.try_write(&w(next)) {
            Ok(()) => next += 1,
            Err(e) if e.is_busy() => {
                busy = true;
                break;
            }
            Err(e) => panic!("write {next}: {e}"),
        }
    }
    if backend != Backend::Loopback {
        assert!(
            busy,
            "{next} writes of 8 MiB with queue_depth 4 never returned Busy"
        );
        assert!(next >= 1, "the first write was refused");
    }
    if busy {
        // Draining makes room: the refused write goes through after polling.
        loop {
            p.pump();
            match p.try_write(&w(next)) {
                Ok(()) => break,
                Err(e) if e.is_busy() => p.check_deadline(p.deadline, "room after Busy"),
                Err(e) => panic!("retry of write {next}: {e}"),
            }
        }
        next += 1;
        for _ in 0..2 {
            p.write(&w(next));
            next += 1;
        }
    }
    let n = next as usize;
    let got = p.collect(Side::Rx, n, "WriteReceived", is_write_received);
    let imms: Vec<u32> = got
        .iter()
        .map(|e| match e {
            Event::WriteReceived {
                imm, token, len, ..
            } => {
                assert_eq!((*token, *len), (d.token, LEN as u64));
                *imm
            }
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        imms,
        (0..next).collect::<Vec<_>>(),
        "writes arrive once each, in order"
    );
    let done = p.collect(Side::Tx, n, "WriteDone", is_write_done);
    let mut ids: Vec<u64> = done
        .iter()
        .map(|e| match e {
            Event::WriteDone { wr_id, .. } => *wr_id,
            _ => unreachable!(),
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..next).map(|i| 500 + u64::from(i)).collect::<Vec<_>>()
    );
    let last = w(next - 1).src_offset as usize;
    assert_same_bytes(
        p.bytes(dst_m),
        &p.bytes(src_m)[last..last + LEN],
        "destination after the last write",
    );
}

/// Dropping one endpoint (either the dialling or the accepting one) makes the other report
/// `PeerLost` naming it within `LOSS_DEADLINE`; later sends and writes to it fail, not `Busy`.
fn peer_loss(backend: Backend) {
    for dropped in [Side::Rx, Side::Tx] {
        let Some(mut p) = Pair::connected(backend, Opts::default()) else {
            return;
        };
        let (survivor, gone) = match dropped {
            Side::Rx => (Side::Tx, P1),
            Side::Tx => (Side::Rx, P0),
        };
        let src_m = p.mem(Mem::pattern(4096, 2));
        let s = p.register(survivor, src_m);
        // Prove the link worked, then cut it.
        p.send_from(survivor, 0, b"ping");
        p.drop_side(dropped);
        let start = Instant::now();
        let error = p.wait_until(survivor, start + LOSS_DEADLINE, "PeerLost", |e| match e {
            Event::PeerLost { peer, error } if *peer == gone => Some(error.to_string()),
            _ => None,
        });
        eprintln!(
            "{backend:?}: loss of peer {gone} reported after {:?}: {error}",
            start.elapsed()
        );
        let net = p.net(survivor);
        for r in [
            net.try_send(gone, 0, b"anyone?"),
            net.try_write_imm(
                gone,
                0,
                s.token,
                0,
                16,
                RemoteSlice {
                    token: 1,
                    offset: 0,
                },
                0,
                0,
            ),
        ] {
            match r {
                Err(Error::PeerLost { peer, .. }) | Err(Error::UnknownPeer { peer }) => {
                    assert_eq!(peer, gone)
                }
                other => panic!("posting to lost peer {gone}: expected PeerLost, got {other:?}"),
            }
        }
    }
}

/// Deregistering a destination with nothing in flight works; deregistering it again, or a token
/// never issued, is `UnknownToken`; a deregistered source is `UnknownToken` at `try_write_imm`.
fn deregister(backend: Backend) {
    let Some(mut p) = Pair::connected(backend, Opts::default()) else {
        return;
    };
    let src_m = p.mem(Mem::pattern(64 * 1024, 4));
    let dst_m = p.mem(Mem::zeroed(64 * 1024));
    let s = p.register(Side::Tx, src_m);
    let d = p.register(Side::Rx, dst_m);
    let w = Wr {
        lane: 0,
        src: s.token,
        src_offset: 0,
        len: 64 * 1024,
        dst: RemoteSlice {
            token: d.token,
            offset: 0,
        },
        imm: 3,
        wr_id: 3,
    };
    p.write(&w);
    p.wait(Side::Rx, "WriteReceived", |e| {
        is_write_received(e).then_some(())
    });
    p.wait(Side::Tx, "WriteDone", |e| is_write_done(e).then_some(()));
    assert_same_bytes(p.bytes(dst_m), p.bytes(src_m), "destination");

    p.rx()
        .deregister(d.token)
        .expect("deregister an idle destination");
    match p.rx().deregister(d.token) {
        Err(Error::UnknownToken { token }) => assert_eq!(token, d.token),
        other => panic!("second deregister: expected UnknownToken, got {other:?}"),
    }
    let never = s.token.wrapping_add(d.token).wrapping_add(2);
    match p.rx().deregister(never) {
        Err(Error::UnknownToken { token }) => assert_eq!(token, never),
        other => panic!("deregister of a token never issued: expected UnknownToken, got {other:?}"),
    }
    p.tx()
        .deregister(s.token)
        .expect("deregister an idle source");
    match p.try_write(&w) {
        Err(Error::UnknownToken { token }) => assert_eq!(token, s.token),
        other => panic!("write from a deregistered source: expected UnknownToken, got {other:?}"),
    }
    // The link is unaffected.
    p.send(0, b"after deregister");
    p.wait(Side::Rx, "message after deregister", |e| {
        msg_of(e)
            .filter(|(_, _, d)| *d == b"after deregister")
            .map(|_| ())
    });
}

/// "Writes still arriving for it are discarded": the receiver is in the middle of a large write
/// when it deregisters the destination; the rest of the write is dropped, no `WriteReceived`
/// is reported for it, and the link stays in sync (a later message on the lane arrives).
///
/// Relies on a 24 MiB write not fitting in the socket buffers / the 4 MiB ring while only the
/// receiver polls.
fn deregister_discards_partly_received_write(backend: Backend) {
    let Some(mut p) = Pair::connected(backend, Opts::default()) else {
        return;
    };
    const LEN: usize = 24 * MIB;
    let src_m = p.mem(Mem::pattern(LEN, 6));
    let dst_m = p.mem(Mem::zeroed(LEN));
    let s = p.register(Side::Tx, src_m);
    let d = p.register(Side::Rx, dst_m);
    p.write(&Wr {
        lane: 0,
        src: s.token,
        src_offset: 0,
        len: LEN as u64,
        dst: RemoteSlice {
            token: d.token,
            offset: 0,
        },
        imm: 77,
        wr_id: 77,
    });
    // Only the receiver polls: it reads the header and what the link holds, then runs dry.
    for _ in 0..5 {
        p.poll_side(Side::Rx, Duration::from_millis(20));
    }
    assert!(
        !p.saw(Side::Rx, is_write_received),
        "premise: the whole 24 MiB write arrived without the sender polling"
    );
    p.rx()
        .deregister(d.token)
        .expect("deregister during a write");
    p.send(0, b"behind the write");
    p.wait(
        Side::Rx,
        "message behind the discarded write",
        |e| match e {
            Event::WriteReceived { .. } => {
                panic!("write into a deregistered region reported: {e:?}")
            }
            _ => msg_of(e)
                .filter(|(_, _, d)| *d == b"behind the write")
                .map(|_| ()),
        },
    );
    p.wait(Side::Tx, "WriteDone of the discarded write", |e| match e {
        Event::WriteDone { wr_id: 77, .. } => Some(()),
        _ => None,
    });
    p.pump_for(Duration::from_millis(20));
    assert!(
        !p.saw(Side::Rx, is_write_received),
        "discarded write reported"
    );
}

/// "Writes still arriving for it are discarded", the other case: the write's frame is entirely
/// on the link (the sender got `WriteDone`) but the receiver has not read its header yet when
/// it deregisters the destination. The receiver must drop the write, not the connection.
fn deregister_discards_write_already_sent(backend: Backend) {
    let Some(mut p) = Pair::connected(backend, Opts::default()) else {
        return;
    };
    let src_m = p.mem(Mem::pattern(4096, 7));
    let dst_m = p.mem(Mem::zeroed(4096));
    let s = p.register(Side::Tx, src_m);
    let d = p.register(Side::Rx, dst_m);
    p.write(&Wr {
        lane: 0,
        src: s.token,
        src_offset: 0,
        len: 4096,
        dst: RemoteSlice {
            token: d.token,
            offset: 0,
        },
        imm: 5,
        wr_id: 5,
    });
    // Only the sender polls until its write left (WriteDone): the frame is in flight.
    let limit = p.deadline;
    while !p.saw(Side::Tx, is_write_done) {
        p.check_deadline(limit, "WriteDone");
        p.poll_side(Side::Tx, POLL_SLICE);
    }
    p.rx()
        .deregister(d.token)
        .expect("deregister with a write in flight");
    p.send(0, b"behind the write");
    p.wait(
        Side::Rx,
        "message behind the discarded write",
        |e| match e {
            Event::WriteReceived { .. } => {
                panic!("write into a deregistered region reported: {e:?}")
            }
            _ => msg_of(e)
                .filter(|(_, _, d)| *d == b"behind the write")
                .map(|_| ()),
        },
    );
}

/// tcp with 4 lanes: messages posted round-robin on lanes 0..8 (more lanes than connections)
/// each keep their order; every message of one lane reports the same lane.
fn many_lanes(backend: Backend) {
    let opts = Opts {
        lanes: 4,
        ..Opts::default()
    };
    let Some(mut p) = Pair::connected(backend, opts) else {
        return;
    };
    assert_eq!(p.tx().lanes(), 4);
    const ROUNDS: u32 = 60;
    for seq in 0..ROUNDS {
        for lane in 0..8u32 {
            p.send(
                lane,
                &tagged(lane, seq, 5 + ((seq * 37 + lane * 11) % 700) as usize),
            );
        }
    }
    let got = p.collect(Side::Rx, (ROUNDS * 8) as usize, "messages", is_msg);
    let mut next = [0u32; 8];
    let mut reported: HashMap<u32, BTreeSet<u32>> = HashMap::new();
    for e in &got {
        let (_, lane, data) = msg_of(e).expect("messages only");
        let from = u32::from(data[0]);
        let seq = u32::from_le_bytes(data[1..5].try_into().expect("4 bytes"));
        assert_eq!(seq, next[from as usize], "lane {from}: out of order");
        assert_eq!(
            data,
            tagged(from, seq, data.len()),
            "lane {from} message {seq}: bytes"
        );
        next[from as usize] += 1;
        reported.entry(from).or_default().insert(lane);
    }
    assert_eq!(next, [ROUNDS; 8]);
    for (from, lanes) in &reported {
        assert_eq!(lanes.len(), 1, "lane {from} reported as {lanes:?}");
    }
    assert_eq!(reported[&0], BTreeSet::from([0]));
}

// ------------------------------------------------------------------------------------------------
// Backend-independent: the wire, seen from a raw TCP socket.

mod wire {
    use super::*;

    fn hello(from: u32, lane: u32, lanes: u32) -> Vec<u8> {
        let mut body = Encoder::new();
        body.u32(from).u32(lane).u32(lanes).str("");
        let body = body.finish();
        let mut f = header(FrameKind::Hello, body.len() as u64, 0, 0).to_vec();
        f.extend_from_slice(&body);
        f
    }

    fn header(kind: FrameKind, len: u64, token: u64, offset: u64) -> [u8; 40] {
        FrameHeader {
            kind,
            imm: 0,
            len,
            token,
            offset,
            lane: 0,
        }
        .encode()
    }

    /// Polls `net` until `raw` reads end-of-file (or a reset), or `limit`; returns whether it
    /// was closed.
    fn closed_by(net: &mut Net, raw: &mut TcpStream, limit: Duration, ev: &mut Vec<Event>) -> bool {
        raw.set_read_timeout(Some(Duration::from_millis(2)))
            .expect("read timeout");
        let end = Instant::now() + limit;
        let mut buf = [0u8; 512];
        while Instant::now() < end {
            net.poll(ev, Some(POLL_SLICE)).expect("poll");
            match raw.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("reading the raw socket: {e}"),
            }
        }
        false
    }

    /// Sends `bytes` to a fresh `Net` (`PeerId(1)`) from a raw socket: the `Net` must close that
    /// connection without allocating anything near a length the bytes announce; afterwards a
    /// well-behaved peer still connects and talks to it.
    fn net_closes(what: &str, bytes: &[u8]) {
        let opts = Opts::default();
        let mut target = Net::bind(config(Backend::Tcp, P1, opts)).expect("bind");
        let mut raw = TcpStream::connect(target.local_addr().tcp).expect("connect raw");
        raw.write_all(bytes).expect("send raw bytes");
        let mut ev = Vec::with_capacity(64);
        let (closed, largest) = largest_allocation_during(|| {
            closed_by(&mut target, &mut raw, Duration::from_secs(3), &mut ev)
        });
        assert!(closed, "{what}: the connection was not closed");
        assert!(
            largest < MIB,
            "{what}: the Net allocated {largest} bytes at once while handling it"
        );
        // Still serving.
        let a = Net::bind(config(Backend::Tcp, P0, opts)).expect("bind");
        let mut p = Pair::with_nets(Backend::Tcp, a, Some(target));
        p.establish();
        p.send(0, b"after the intruder");
        p.wait(Side::Rx, "message", |e| {
            msg_of(e)
                .filter(|(_, _, d)| *d == b"after the intruder")
                .map(|_| ())
        });
    }

    /// The probe `net_closes` relies on does see a large request made on this thread.
    #[test]
    fn allocation_probe_sees_large_requests() {
        let (v, largest) =
            largest_allocation_during(|| std::hint::black_box(Vec::<u8>::with_capacity(3 * MIB)));
        drop(v);
        assert!(largest >= 3 * MIB, "probe saw only {largest} bytes");
    }

    #[test]
    fn garbage_closes_connection() {
        net_closes(
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n",
        );
    }

    #[test]
    fn hello_longer_than_allowed_closes_connection() {
        // Only the header: the announced 512 MiB payload never comes.
        let h = header(FrameKind::Hello, 512 * MIB as u64, 0, 0);
        const { assert!(512 * MIB > MAX_HELLO) };
        net_closes("a Hello announcing 512 MiB", &h);
    }

    #[test]
    fn message_before_hello_closes_connection() {
        let mut f = header(FrameKind::Msg, 5, 0, 0).to_vec();
        f.extend_from_slice(b"hello");
        net_closes("a Msg before any Hello", &f);
    }

    #[test]
    fn write_before_hello_closes_connection() {
        let mut f = header(FrameKind::Write, 8, 1, 0).to_vec();
        f.extend_from_slice(&[7; 8]);
        net_closes("a Write before any Hello", &f);
    }

    #[test]
    fn wrong_wire_version_closes_connection() {
        let mut f = hello(0, 0, 2);
        f[2] = WIRE_VERSION.wrapping_add(1);
        net_closes("a Hello of another wire version", &f);
    }

    #[test]
    fn unknown_frame_kind_closes_connection() {
        let mut f = hello(0, 0, 2);
        f[3] = 0xEE;
        net_closes("a frame of unknown kind", &f);
    }

    #[test]
    fn undecodable_hello_body_closes_connection() {
        // A Hello whose string length runs past the body.
        let mut body = Encoder::new();
        body.u32(0).u32(0).u32(2).u32(1000);
        let body = body.finish();
        let mut f = header(FrameKind::Hello, body.len() as u64, 0, 0).to_vec();
        f.extend_from_slice(&body);
        net_closes("a Hello with a truncated body", &f);
    }

    #[test]
    fn hello_with_wrong_lane_count_closes_connection() {
        net_closes(
            "a Hello announcing 3 lanes to a 2-lane Net",
            &hello(0, 0, 3),
        );
        net_closes("a Hello on lane 2 of 2", &hello(0, 2, 2));
    }

    #[test]
    fn hello_claiming_to_be_the_receiver_closes_connection() {
        net_closes("a Hello from the Net's own id", &hello(1, 0, 2));
    }

    #[test]
    fn oversized_message_after_hello_closes_connection() {
        let mut f = hello(7, 0, 2);
        f.extend_from_slice(&header(FrameKind::Msg, 1 << 40, 0, 0));
        net_closes("a 1 TiB Msg after a Hello", &f);
    }

    #[test]
    fn huge_write_to_unknown_token_closes_connection() {
        let mut f = hello(7, 0, 2);
        f.extend_from_slice(&header(FrameKind::Write, 1 << 40, 0x1234_5679, 0));
        net_closes("a 1 TiB Write to an unregistered token after a Hello", &f);
    }

    /// A stranger's Hello claiming a lane that a connected peer already holds must get *that*
    /// connection closed (like every other protocol error on an unidentified stream).
    #[test]
    fn duplicate_hello_closes_only_the_intruder() {
        let Some(mut p) = Pair::connected(Backend::Tcp, Opts::default()) else {
            return;
        };
        let rx_addr = p.rx().local_addr().tcp;
        let mut raw = TcpStream::connect(rx_addr).expect("connect raw");
        // A Hello claiming endpoint 0's lane 0, then a message in its name.
        let mut f = hello(0, 0, 2);
        f.extend_from_slice(&header(FrameKind::Msg, 6, 0, 0));
        f.extend_from_slice(b"forged");
        raw.write_all(&f).expect("send duplicate Hello");
        let mut ev = Vec::new();
        let closed = closed_by(p.rx(), &mut raw, Duration::from_secs(3), &mut ev);
        assert!(
            !ev.iter()
                .any(|e| msg_of(e).is_some_and(|(_, _, d)| d == b"forged")),
            "the intruder's frame was reported as a message from peer 0: {ev:?}"
        );
        assert!(closed, "the intruder's connection was left open: {ev:?}");
        // The genuine link is untouched.
        p.send(0, b"still the real peer");
        p.wait(Side::Rx, "message from the real peer", |e| {
            msg_of(e)
                .filter(|(_, _, d)| *d == b"still the real peer")
                .map(|_| ())
        });
    }
}

// ------------------------------------------------------------------------------------------------
// Backend-independent: the API as the crate documents it.

mod api {
    use super::*;

    /// The crate-level example: a process talks to itself after `add_peer(me, local_addr)`.
    #[test]
    fn self_send_as_in_the_crate_example() {
        let mut net = Net::bind(NetConfig::new(PeerId(0), "127.0.0.1:0".parse().unwrap())).unwrap();
        let me = net.local_addr();
        net.add_peer(PeerId(0), me).unwrap();
        net.try_send(PeerId(0), 0, b"hello").unwrap();
        let mut events = Vec::new();
        net.poll(&mut events, Some(Duration::from_secs(1))).unwrap();
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Message { data, .. } if data == b"hello")));
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Connected {
                peer: PeerId(0),
                kind: LinkKind::Loopback
            }
        )));
        assert_eq!(net.link_kind(PeerId(0)), Some(LinkKind::Loopback));
    }

    /// `poll` blocks at most its timeout, and a `Waker` from another thread ends it early.
    #[test]
    fn poll_honours_timeout_and_waker() {
        let mut net = Net::bind(config(Backend::Tcp, P0, Opts::default())).expect("bind");
        let mut ev = Vec::new();
        let start = Instant::now();
        net.poll(&mut ev, Some(Duration::from_millis(30)))
            .expect("poll");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "poll overran its timeout"
        );

        let waker = net.waker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.wake();
        });
        let start = Instant::now();
        net.poll(&mut ev, Some(Duration::from_secs(8)))
            .expect("poll");
        let took = start.elapsed();
        t.join().expect("waker thread");
        assert!(
            took < Duration::from_secs(4),
            "the waker did not end poll ({took:?})"
        );
        assert!(ev.is_empty(), "a wake-up is not an event: {ev:?}");
    }
}

// ------------------------------------------------------------------------------------------------
// Authentication.

mod auth {
    use super::*;
    use bps_transport::auth::Secret;

    fn net(backend: Backend, me: PeerId, secret: Option<&[u8]>) -> Net {
        let mut c = config(backend, me, Opts::default());
        c.secret = secret.and_then(|s| Secret::new(s.to_vec()));
        Net::bind(c).expect("bind")
    }

    /// The dialer (0) and acceptor (1) disagree on the secret: neither side gets a link, both
    /// report the peer lost, the acceptor counts a refused connection, and no message gets
    /// through.
    fn refused(backend: Backend, dialer: Option<&[u8]>, acceptor: Option<&[u8]>) {
        if !backend.available() {
            return;
        }
        let a = net(backend, P0, dialer);
        let b = net(backend, P1, acceptor);
        let mut p = Pair::with_nets(backend, a, Some(b));
        // queued before the handshake: must never be delivered
        p.send(0, b"must not arrive");
        let why = p.wait(Side::Tx, "PeerLost on the dialer", |e| match e {
            Event::PeerLost { peer, error } if *peer == P1 => Some(error.to_string()),
            _ => None,
        });
        assert!(why.contains("lost"), "{why}");
        p.pump_for(Duration::from_millis(200));
        assert!(
            !p.saw(Side::Rx, is_msg),
            "a message crossed an unauthenticated link"
        );
        assert!(
            !p.saw(Side::Rx, |e| matches!(e, Event::Connected { .. })),
            "the acceptor reported a link it never authenticated"
        );
        // Whichever side found the other without the secret counts the refusal.
        let refused = p.tx().refused_connections() + p.rx().refused_connections();
        if acceptor.is_some() {
            assert!(refused >= 1, "refusal not counted");
        }
    }

    #[test]
    fn wrong_secret_is_refused_tcp() {
        refused(Backend::Tcp, Some(b"job-a"), Some(b"job-b"));
    }

    #[test]
    fn wrong_secret_is_refused_shm() {
        refused(Backend::Shm, Some(b"job-a"), Some(b"job-b"));
    }

    #[test]
    fn missing_secret_is_refused_tcp() {
        refused(Backend::Tcp, None, Some(b"job-b"));
    }

    #[test]
    fn missing_secret_is_refused_shm() {
        refused(Backend::Shm, None, Some(b"job-b"));
    }

    #[test]
    fn acceptor_without_secret_refuses_an_authenticating_dialer() {
        refused(Backend::Tcp, Some(b"job-a"), None);
    }

    /// A raw client that speaks the wire format but holds no secret: its Hello is answered with
    /// a challenge it cannot meet, and anything else it sends closes the connection.
    #[test]
    fn raw_client_without_secret_gets_nothing() {
        use std::io::{Read, Write};
        let mut target = net(Backend::Tcp, P1, Some(SECRET));
        let addr = target.local_addr().tcp;
        let mut tried = 0;
        let mut closed = 0;
        for attempt in 0..20u32 {
            tried += 1;
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            // A Hello without a nonce, then a message.
            let mut e = bps_transport::codec::Encoder::new();
            e.u32(7 + attempt).u32(0).u32(2).str("").bytes(&[]);
            let body = e.finish();
            let hdr = bps_transport::codec::FrameHeader {
                kind: bps_transport::codec::FrameKind::Hello,
                imm: 0,
                len: body.len() as u64,
                token: 0,
                offset: 0,
                lane: 0,
            };
            let _ = s.write_all(&hdr.encode());
            let _ = s.write_all(&body);
            let mut ev = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 64];
            loop {
                target.poll(&mut ev, Some(POLL_SLICE)).unwrap();
                assert!(
                    !ev.iter()
                        .any(|e| matches!(e, Event::Connected { .. } | Event::Message { .. })),
                    "an unauthenticated client got a link"
                );
                match s.read(&mut buf) {
                    Ok(0) => {
                        closed += 1;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => {}
                }
                assert!(Instant::now() < deadline, "connection not closed");
            }
        }
        assert_eq!(closed, tried);
        assert_eq!(target.refused_connections(), tried as u64);
    }
}

/// A stranger that connects and says nothing is closed once the connect timeout passes.
#[test]
fn silent_connections_are_closed_after_the_handshake_timeout() {
    use std::io::Read;
    let mut c = config(Backend::Tcp, P1, Opts::default());
    c.connect_timeout = Duration::from_millis(300);
    let mut net = Net::bind(c).expect("bind");
    let mut s = std::net::TcpStream::connect(net.local_addr().tcp).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ev = Vec::new();
    let mut buf = [0u8; 8];
    loop {
        net.poll(&mut ev, Some(Duration::from_millis(10))).unwrap();
        if let Ok(0) = s.read(&mut buf) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a silent connection was kept open"
        );
    }
}
