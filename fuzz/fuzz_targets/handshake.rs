//! `handshake`: a real `Net` gets the input from a stranger on a fresh TCP connection, either as
//! the acceptor of the stranger's connection or as the dialer of a peer whose address the
//! stranger answers.
//!
//! Input: byte 0 chooses the set-up:
//!
//! | bits | meaning |
//! | --- | --- |
//! | 0 | the `Net` holds a job secret (every link must complete the HMAC challenge/proof first) |
//! | 1..3 | into how many writes (1 to 4) the rest is split |
//! | 3 | one TCP lane per peer instead of two (so one accepted stream can bring a peer up) |
//! | 4 | `max_msg` of 64 bytes instead of the default 1 MiB |
//! | 5 | the `Net` dials: it is peer 0, is told that peer 1 listens where the stranger does, and the stranger answers its connection (one lane) |
//!
//! The rest is what the stranger sends. Between writes the `Net` is polled; after the last one
//! the stranger half-closes its socket and the `Net` is polled (1 ms each) until it has closed
//! the connection.
//!
//! Checked: nothing panics; the `Net` closes the connection once the stranger is done; no single
//! allocation exceeds 2 MiB while it handles the bytes (a counting global allocator, as the
//! conformance suite's probe); with a secret, no `Connected`, `Message`, `WriteReceived` or
//! `WriteDone` is ever reported (the stranger cannot prove it holds the secret), whichever side
//! dialled; without one, no write is reported (nothing is registered) and every message
//! respects `max_msg` and names the peer the stream belongs to.
//!
//! One `Net` (bound on 127.0.0.1:0, no Unix socket) and, when it dials, one listener per input,
//! so inputs do not depend on each other.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bps_transport::auth::Secret;
use bps_transport::codec::DEFAULT_MAX_MESSAGE;
use bps_transport::{Event, Net, NetConfig, PeerAddr, PeerId, Transport};
use libfuzzer_sys::fuzz_target;

// ------------------------------------------------------------------------------------------------
// Largest-allocation probe (as in transport/tests/conformance.rs).

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
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_request(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_request(new_size);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: ProbeAlloc = ProbeAlloc;

fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|m| m.set(0));
    PROBING.with(|p| p.set(true));
    let out = f();
    PROBING.with(|p| p.set(false));
    (out, LARGEST.with(Cell::get))
}

// ------------------------------------------------------------------------------------------------

/// The `Net`'s id when it accepts; when it dials it is peer 0 and the stranger is peer 1
/// (the lower id dials).
const ACCEPTOR: PeerId = PeerId(1);
const DIALER: PeerId = PeerId(0);
const SECRET: &[u8] = b"fuzz-job-secret";
const MAX_ALLOC: usize = 2 << 20;
/// How long the `Net` gets to close a connection whose sender is done (generous: the machine
/// may be busy; a healthy `Net` needs one or two polls).
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
const POLL_SLICE: Duration = Duration::from_millis(1);

/// The `Net` under test, as byte 0 of the input sets it up.
#[derive(Clone, Copy, Debug)]
struct Setup {
    secret: bool,
    writes: usize,
    lanes: u32,
    max_msg: usize,
    dial: bool,
}

impl Setup {
    fn from_byte(b: u8) -> Setup {
        Setup {
            secret: b & 1 == 1,
            writes: 1 + ((b >> 1) & 3) as usize,
            // A dialling Net opens one connection per lane: one lane, one stranger's socket.
            lanes: if b & 8 == 0 && b & 32 == 0 { 2 } else { 1 },
            max_msg: if b & 16 == 0 { DEFAULT_MAX_MESSAGE } else { 64 },
            dial: b & 32 != 0,
        }
    }

    fn me(self) -> PeerId {
        if self.dial {
            DIALER
        } else {
            ACCEPTOR
        }
    }

    fn bind(self) -> Net {
        let mut cfg = NetConfig::new(self.me(), "127.0.0.1:0".parse().expect("address"));
        cfg.unix_dir = None;
        cfg.lanes = self.lanes;
        cfg.max_msg = self.max_msg;
        cfg.secret = self
            .secret
            .then(|| Secret::new(SECRET.to_vec()).expect("secret"));
        Net::bind(cfg).expect("bind a Net on 127.0.0.1:0")
    }
}

/// Reads what the `Net` sent back (a challenge, or nothing); true once it closed the stream.
fn drain(raw: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match raw.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true, // reset
        }
    }
}

/// Sends `chunk`, polling the `Net` while the socket is full; false once the `Net` closed it.
fn send(net: &mut Net, raw: &mut TcpStream, mut chunk: &[u8], ev: &mut Vec<Event>) -> bool {
    let end = Instant::now() + CLOSE_WITHIN;
    while !chunk.is_empty() {
        match raw.write(chunk) {
            Ok(n) => chunk = &chunk[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "the Net stopped reading");
                net.poll(ev, Some(POLL_SLICE)).expect("poll");
                if drain(raw) {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// The `Net` dials peer 1 at a listener of ours; returns the accepted connection.
fn dialled_by(net: &mut Net, ev: &mut Vec<Event>) -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen on 127.0.0.1:0");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = PeerAddr {
        tcp: l.local_addr().expect("listening address"),
        unix: None,
        host: "fuzz-stranger-host".into(),
    };
    net.add_peer(ACCEPTOR, addr).expect("add_peer");
    let end = Instant::now() + CLOSE_WITHIN;
    loop {
        match l.accept() {
            Ok((s, _)) => return s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                net.poll(ev, Some(POLL_SLICE)).expect("poll");
            }
            Err(e) => panic!("the Net did not dial: {e}"),
        }
    }
}

/// Runs one connection; true when the `Net` closed it.
fn run(setup: Setup, rest: &[u8], ev: &mut Vec<Event>) -> bool {
    let mut net = setup.bind();
    let mut raw = if setup.dial {
        dialled_by(&mut net, ev)
    } else {
        TcpStream::connect(net.local_addr().tcp).expect("connect to the Net")
    };
    raw.set_nonblocking(true).expect("nonblocking");
    let _ = raw.set_nodelay(true);

    let (closed, largest) = largest_allocation_during(|| {
        let mut open = true;
        for chunk in rest.chunks(rest.len().div_ceil(setup.writes).max(1)) {
            open = send(&mut net, &mut raw, chunk, ev);
            if !open {
                break;
            }
            net.poll(ev, Some(Duration::ZERO)).expect("poll");
        }
        if !open {
            return true;
        }
        let _ = raw.shutdown(Shutdown::Write);
        let end = Instant::now() + CLOSE_WITHIN;
        while Instant::now() < end {
            net.poll(ev, Some(POLL_SLICE)).expect("poll");
            if drain(&mut raw) {
                return true;
            }
        }
        false
    });
    assert!(
        largest <= MAX_ALLOC,
        "the Net allocated {largest} bytes at once while handling {} bytes from a stranger",
        rest.len()
    );
    drop(raw);
    drop(net);
    closed
}

fuzz_target!(
    init: {
        // libFuzzer's main is not Rust's: SIGPIPE is not ignored there, and a write to a closed
        // socket must be an error, not the end of the process.
        // SAFETY: setting a signal disposition to SIG_IGN before any other thread runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    },
    |data: &[u8]| {
        let Some((&first, rest)) = data.split_first() else {
            return;
        };
        let setup = Setup::from_byte(first);
        let secret = setup.secret;
        let mut ev = Vec::new();
        let closed = run(setup, rest, &mut ev);
        for e in &ev {
            match e {
                Event::Connected { .. }
                | Event::Message { .. }
                | Event::WriteReceived { .. }
                | Event::WriteDone { .. }
                    if secret =>
                {
                    panic!("an unauthenticated stream got {e:?} from a Net that has a secret")
                }
                Event::WriteReceived { .. } | Event::WriteDone { .. } => {
                    panic!("{e:?} with nothing registered and nothing sent")
                }
                Event::Message { peer, data, .. } => {
                    assert_ne!(*peer, setup.me(), "a message in the Net's own name");
                    if setup.dial {
                        assert_eq!(*peer, ACCEPTOR, "a message on the dialled link from another peer");
                    }
                    assert!(data.len() <= setup.max_msg, "message over max_msg: {setup:?}");
                }
                _ => {}
            }
        }
        assert!(closed, "the Net kept the connection open after the stranger was done: {ev:?}");
    }
);
