//! [`Net`]: the transport of a process — tcp lanes, shm rings and the loopback link in one
//! mio event loop.
//!
//! Every stream (a TCP connection or a shared-memory ring pair) runs the same framing state
//! machine: frames of [`codec`](crate::codec) are queued per stream and written with
//! `writev` straight from their source (a message's bytes, or a registered region); received
//! write payloads are read straight into the destination region, after the header was checked
//! against the registration table. Small frames are read through a 64 KiB staging buffer so that
//! one system call brings many of them.
//!
//! Links are set up by the peer with the lower id: it dials `lanes` TCP connections (or one
//! Unix socket plus a shared-memory segment) and opens each with a `Hello` frame; the other side
//! accepts and learns who is speaking from that frame.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Poll, Token};

use crate::auth::{Secret, MAC_LEN, NONCE_LEN};
use crate::codec::{Decoder, Encoder, FrameHeader, FrameKind, HEADER_LEN};
use crate::shm::{ShmSegment, ShmStream, Side};
use crate::{
    Error, Event, LinkKind, PeerAddr, PeerId, Region, RemoteSlice, Result, Transport, Waker,
};

const WAKER: Token = Token(usize::MAX - 1);
const TCP_LISTENER: Token = Token(usize::MAX - 2);
const UNIX_LISTENER: Token = Token(usize::MAX - 3);
const RX_BUF: usize = 64 << 10;
/// Payload remainders at least this large are read straight into their destination.
const DIRECT_READ: usize = 16 << 10;
const MAX_IOV: usize = 16;
/// Accepted connections that have not finished their handshake, at most.
const MAX_ANONYMOUS: usize = 1024;

/// Configuration of a [`Net`].
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// This process's id.
    pub me: PeerId,
    /// TCP address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Directory for the Unix socket of shared-memory links; `None` disables shm.
    pub unix_dir: Option<PathBuf>,
    /// Directory for shared-memory segments.
    pub shm_dir: PathBuf,
    /// Bytes of each shared-memory ring.
    pub ring_bytes: usize,
    /// Force one backend for every remote peer (`BPS_TRANSPORT`); `None` = automatic.
    pub force: Option<LinkKind>,
    /// TCP connections per peer.
    pub lanes: u32,
    /// Largest control message accepted.
    pub max_msg: usize,
    /// Frames queued per stream before [`Error::Busy`].
    pub queue_depth: usize,
    /// How long to keep redialling a peer that refuses connections.
    pub connect_timeout: Duration,
    /// The job secret: when set, every link proves both ends hold it before anything else
    /// is accepted (see [`crate::auth`]). Both ends must agree on having one.
    pub secret: Option<Secret>,
    // rdma: tunables of the RDMA backend (device, port, GID index, queue depths, ...).
    /// RDMA tunables (used when `force` is `Rdma`, or automatic and this host has a device).
    pub rdma: crate::rdma::RdmaConfig,
}

impl NetConfig {
    /// Defaults: automatic backend, 2 TCP lanes, shm through `/dev/shm` with the Unix socket in
    /// the system temporary directory.
    pub fn new(me: PeerId, listen: SocketAddr) -> Self {
        NetConfig {
            me,
            listen,
            unix_dir: Some(std::env::temp_dir()),
            shm_dir: PathBuf::from("/dev/shm"),
            ring_bytes: crate::shm::DEFAULT_RING_BYTES,
            force: None,
            lanes: 2,
            max_msg: crate::codec::DEFAULT_MAX_MESSAGE,
            queue_depth: 4096,
            connect_timeout: Duration::from_secs(30),
            secret: None,
            rdma: crate::rdma::RdmaConfig::default(), // rdma:
        }
    }
}

/// Remove the listening sockets that processes killed before they could clean up (kill -9, a
/// crash) left in `dir`: `bps-<pid>-*.sock` whose process no longer exists. A socket of a live
/// process is never touched (its pid exists, or something accepts connections on the file); one
/// whose pid was reused by an unrelated process stays (harmless).
/// Best effort: errors are ignored.
fn remove_stale_sockets(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("bps-")
            .and_then(|r| r.strip_suffix(".sock"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Dead here, and nobody listening (a process of another pid namespace sharing this
        // directory could have the same pid): a stale file.
        if pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::os::unix::net::UnixStream::connect(e.path())
                .is_err_and(|err| err.kind() == io::ErrorKind::ConnectionRefused)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Identity of this host as seen by peers: the kernel's boot id and the network namespace, so
/// processes in different network namespaces (emulated hosts) never share memory links.
pub fn local_host_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-boot".into());
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "unknown-netns".into());
    format!("{boot}/{netns}")
}

/// A registered region: raw memory the event loop reads from and writes into.
#[derive(Clone, Copy, Debug)]
struct RegionEntry {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a RegionEntry is an address range the registrant promised (in the unsafe
// `Transport::register`) to keep valid and to access only under the transport's rules; the
// pointer is never dereferenced outside those rules, whichever thread owns the Net.
unsafe impl Send for RegionEntry {}

enum Io {
    Tcp(TcpStream),
    Shm(ShmStream),
    /// An accepted Unix socket whose Hello (with the segment path) has not fully arrived.
    UnixHello(UnixStream),
    /// Transient state while a stream's Io is being replaced.
    Swapping,
}

impl Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.read(buf),
            Io::Shm(s) => s.read(buf),
            Io::UnixHello(s) => s.read(buf),
            Io::Swapping => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.write_vectored(bufs),
            Io::Shm(s) => s.write_vectored(bufs),
            Io::UnixHello(s) => s.write_vectored(bufs),
            Io::Swapping => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

enum Body {
    Owned(Vec<u8>),
    Region { ptr: *const u8, len: usize },
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Owned(v) => v.len(),
            Body::Region { len, .. } => *len,
        }
    }
    fn slice_from(&self, off: usize) -> &[u8] {
        match self {
            Body::Owned(v) => &v[off..],
            // SAFETY: the region was registered (the registrant guarantees it stays valid and
            // unmodified until WriteDone, which is only reported after this op left the queue),
            // and `off <= len` because `sent` never passes the body's length.
            Body::Region { ptr, len } => unsafe {
                std::slice::from_raw_parts(ptr.add(off), len - off)
            },
        }
    }
}

struct TxOp {
    hdr: [u8; HEADER_LEN],
    body: Body,
    /// Bytes of header + body already written.
    sent: usize,
    done: Option<u64>,
}

// SAFETY: the raw pointer in `Body::Region` points into a registered region (see RegionEntry).
unsafe impl Send for TxOp {}

impl TxOp {
    fn total(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

enum Rx {
    Header,
    Msg {
        hdr: FrameHeader,
        buf: Vec<u8>,
    },
    Write {
        hdr: FrameHeader,
        ptr: *mut u8,
        got: usize,
    },
    /// A write whose region was deregistered meanwhile: its bytes are read and dropped.
    Discard {
        left: u64,
    },
}

/// Where a stream is in the authentication handshake.
#[derive(Clone, Copy)]
enum Auth {
    /// No secret in this job, or the handshake finished.
    Done,
    /// Dialer: Hello sent with our nonce; waiting for the acceptor's challenge and proof.
    AwaitChallenge { nonce_d: [u8; NONCE_LEN] },
    /// Acceptor: challenge sent; waiting for the dialer's proof. The stream is not tied to
    /// the peer yet.
    AwaitProof {
        from: PeerId,
        lane: u32,
        nonce_d: [u8; NONCE_LEN],
        nonce_a: [u8; NONCE_LEN],
    },
}

const LABEL_ACCEPTOR: &[u8] = b"bps-link-acceptor-v1";
const LABEL_DIALER: &[u8] = b"bps-link-dialer-v1";

struct Stream {
    io: Io,
    /// When the stream was opened (anonymous streams must finish their handshake in time).
    born: Instant,
    auth: Auth,
    /// The remote address, for logs of refused connections.
    remote: String,
    peer: Option<PeerId>,
    lane: u32,
    kind: LinkKind,
    rx: Rx,
    rxbuf: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    tx: VecDeque<TxOp>,
    /// Dialled and not yet known to be connected.
    connecting: bool,
    dead: bool,
    // rdma: the dialler's RDMA offer (lane 0 Hello), kept until the stream is attached.
    rdma_offer: Option<String>,
}

// SAFETY: the raw pointer in `Rx::Write` points into a registered region (see RegionEntry);
// everything else in a Stream is Send.
unsafe impl Send for Stream {}

impl Stream {
    fn new(io: Io, peer: Option<PeerId>, lane: u32, kind: LinkKind) -> Self {
        Stream {
            io,
            born: Instant::now(),
            auth: Auth::Done,
            remote: String::new(),
            peer,
            lane,
            kind,
            rx: Rx::Header,
            rxbuf: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            tx: VecDeque::new(),
            connecting: false,
            dead: false,
            rdma_offer: None, // rdma:
        }
    }
}

#[derive(Default)]
struct Peer {
    addr: Option<PeerAddr>,
    kind: Option<LinkKind>,
    /// Stream slot of each lane, once it exists.
    lanes: Vec<Option<usize>>,
    /// Frames queued before the lane's stream existed (acceptor side).
    early: Vec<VecDeque<TxOp>>,
    up: Vec<bool>,
    connected_reported: bool,
    lost: Option<String>,
    dial_deadline: Option<Instant>,
    redial_at: Option<Instant>,
}

/// The transport of one process: tcp, shm and loopback links in one event loop.
pub struct Net {
    cfg: NetConfig,
    host: String,
    poll: Poll,
    mio_events: mio::Events,
    waker: Arc<mio::Waker>,
    listener: TcpListener,
    local_addr: SocketAddr,
    unix: Option<(UnixListener, PathBuf)>,
    regions: HashMap<u64, RegionEntry>,
    /// Recently deregistered tokens: writes to them still on the wire are discarded, not
    /// treated as protocol errors. Bounded (oldest forgotten first).
    retired: (std::collections::HashSet<u64>, VecDeque<u64>),
    next_token: u64,
    peers: HashMap<PeerId, Peer>,
    streams: Vec<Option<Stream>>,
    free_slots: Vec<usize>,
    local: VecDeque<Event>,
    refused: u64,
    // rdma: the RDMA side of every link (a stub that claims nothing without feature `rdma`).
    rdma: crate::rdma::Engine,
}

/// Binds a handshake proof to one link: dialer id, acceptor id, lane.
fn link_context(dialer: PeerId, acceptor: PeerId, lane: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0..4].copy_from_slice(&dialer.0.to_le_bytes());
    c[4..8].copy_from_slice(&acceptor.0.to_le_bytes());
    c[8..12].copy_from_slice(&lane.to_le_bytes());
    c
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("me", &self.cfg.me)
            .field("addr", &self.local_addr)
            .field("peers", &self.peers.len())
            .finish()
    }
}

fn hello_body(
    me: PeerId,
    lane: u32,
    lanes: u32,
    shm_path: Option<&str>,
    nonce: Option<&[u8; NONCE_LEN]>,
) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(me.0)
        .u32(lane)
        .u32(lanes)
        .str(shm_path.unwrap_or(""))
        .bytes(nonce.map_or(&[][..], |n| &n[..]));
    e.finish()
}

struct Hello {
    from: PeerId,
    lane: u32,
    lanes: u32,
    shm_path: String,
    nonce: Vec<u8>,
}

fn parse_hello(b: &[u8]) -> std::result::Result<Hello, crate::codec::DecodeError> {
    let mut d = Decoder::new(b);
    let h = Hello {
        from: PeerId(d.u32("hello peer id")?),
        lane: d.u32("hello lane")?,
        lanes: d.u32("hello lane count")?,
        shm_path: d.str("hello shm path", 1024)?.to_string(),
        nonce: d.bytes("hello nonce", NONCE_LEN)?.to_vec(),
    };
    d.finish()?;
    Ok(h)
}

impl Net {
    /// Listen and get ready. Fails with [`Error::AddrInUse`] when the port is taken.
    ///
    /// The first `Net` of a process also makes a write to a reset connection an error instead
    /// of a fatal SIGPIPE, when the process left SIGPIPE at its default (C and Python hosts do;
    /// Rust binaries already ignore it): `writev` has no MSG_NOSIGNAL flag.
    pub fn bind(cfg: NetConfig) -> Result<Net> {
        ignore_sigpipe();
        let poll = Poll::new().map_err(|e| Error::io("create epoll instance", e))?;
        let waker = Arc::new(
            mio::Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("create waker", e))?,
        );
        let mut listener = TcpListener::bind(cfg.listen).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                Error::AddrInUse { addr: cfg.listen }
            } else {
                Error::io(format!("listen on {}", cfg.listen), e)
            }
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("read listening address", e))?;
        poll.registry()
            .register(&mut listener, TCP_LISTENER, Interest::READABLE)
            .map_err(|e| Error::io("register listener", e))?;
        let unix = match (&cfg.unix_dir, cfg.force) {
            (Some(dir), None | Some(LinkKind::Shm)) => {
                remove_stale_sockets(dir);
                let path = dir.join(format!(
                    "bps-{}-{}-{}.sock",
                    std::process::id(),
                    cfg.me.0,
                    local_addr.port()
                ));
                let _ = std::fs::remove_file(&path);
                let mut l = UnixListener::bind(&path)
                    .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
                poll.registry()
                    .register(&mut l, UNIX_LISTENER, Interest::READABLE)
                    .map_err(|e| Error::io("register unix listener", e))?;
                Some((l, path))
            }
            _ => None,
        };
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.finish() | 1
        };
        // rdma: probe the device (when rdma is forced or automatic) and start its completion
        // poller thread, which wakes this loop through the waker.
        let rdma = crate::rdma::Engine::new(
            &cfg.rdma,
            cfg.force,
            cfg.queue_depth,
            cfg.max_msg,
            waker.clone(),
        );
        Ok(Net {
            rdma,
            host: local_host_id(),
            cfg,
            poll,
            mio_events: mio::Events::with_capacity(256),
            waker,
            listener,
            local_addr,
            unix,
            regions: HashMap::new(),
            retired: Default::default(),
            next_token: seed,
            peers: HashMap::new(),
            streams: Vec::new(),
            free_slots: Vec::new(),
            local: VecDeque::new(),
            refused: 0,
        })
    }

    /// Where peers reach this process.
    pub fn local_addr(&self) -> PeerAddr {
        PeerAddr {
            tcp: self.local_addr,
            unix: self.unix.as_ref().map(|(_, p)| p.clone()),
            host: self.host.clone(),
        }
    }

    /// Set this process's id (known only after the rendezvous, which needs the address first).
    /// Call before adding peers.
    pub fn set_local_peer(&mut self, me: PeerId) {
        self.cfg.me = me;
    }

    /// Number of TCP lanes per peer.
    pub fn lanes(&self) -> u32 {
        self.cfg.lanes
    }

    fn choose_kind(&self, peer: PeerId, addr: &PeerAddr) -> Result<LinkKind> {
        if peer == self.cfg.me {
            return Ok(LinkKind::Loopback);
        }
        let same_host = addr.host == self.host;
        let shm_possible = same_host && addr.unix.is_some() && self.unix.is_some();
        match self.cfg.force {
            Some(LinkKind::Tcp) => Ok(LinkKind::Tcp),
            Some(LinkKind::Shm) if shm_possible => Ok(LinkKind::Shm),
            Some(LinkKind::Shm) => Err(Error::Unsupported {
                feature: "shm",
                reason: format!(
                    "peer {peer} is on another host ({}) or does not accept shared memory; \
                     BPS_TRANSPORT=shm needs every peer on this host",
                    addr.tcp
                ),
            }),
            // rdma: an RDMA link runs over a tcp control link; the engine negotiates the QP on it
            // (and falls back to tcp, with a log line, where either side has no device).
            Some(LinkKind::Rdma) => Ok(LinkKind::Tcp),
            Some(LinkKind::Loopback) | None if shm_possible => Ok(LinkKind::Shm),
            Some(LinkKind::Loopback) | None => Ok(LinkKind::Tcp),
        }
    }

    fn slot_insert(&mut self, s: Stream) -> usize {
        match self.free_slots.pop() {
            Some(i) => {
                self.streams[i] = Some(s);
                i
            }
            None => {
                self.streams.push(Some(s));
                self.streams.len() - 1
            }
        }
    }

    fn dial(&mut self, peer: PeerId) -> Result<()> {
        let me = self.cfg.me;
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(Error::UnknownPeer { peer })?;
        let addr = p.addr.clone().ok_or(Error::UnknownPeer { peer })?;
        let kind = p.kind.unwrap_or(LinkKind::Tcp);
        p.redial_at = None;
        match kind {
            LinkKind::Tcp => {
                let lanes = self.cfg.lanes.max(1);
                for lane in 0..lanes {
                    let has = self.peers[&peer]
                        .lanes
                        .get(lane as usize)
                        .copied()
                        .flatten();
                    if has.is_some() {
                        continue;
                    }
                    let mut s = TcpStream::connect(addr.tcp).map_err(|e| {
                        Error::io(format!("connect to peer {peer} at {}", addr.tcp), e)
                    })?;
                    let _ = s.set_nodelay(true);
                    let slot = self
                        .free_slots
                        .last()
                        .copied()
                        .unwrap_or(self.streams.len());
                    self.poll
                        .registry()
                        .register(&mut s, Token(slot), Interest::READABLE | Interest::WRITABLE)
                        .map_err(|e| Error::io("register stream", e))?;
                    let mut st = Stream::new(Io::Tcp(s), Some(peer), lane, LinkKind::Tcp);
                    st.connecting = true;
                    st.remote = addr.tcp.to_string();
                    let nonce = self.cfg.secret.as_ref().map(|_| crate::auth::nonce());
                    // rdma: lane 0's Hello carries our RDMA offer (tcp acceptors ignore the field).
                    let offer = if lane == 0 {
                        self.rdma.offer(peer)
                    } else {
                        None
                    };
                    let body = hello_body(me, lane, lanes, offer.as_deref(), nonce.as_ref());
                    st.tx
                        .push_back(frame_op(FrameKind::Hello, 0, lane, Body::Owned(body), None));
                    match nonce {
                        // Nothing but the Hello goes out before the peer proved itself.
                        Some(nonce_d) => st.auth = Auth::AwaitChallenge { nonce_d },
                        None => {
                            let p = self.peers.get_mut(&peer).expect("peer exists");
                            if let Some(early) = p.early.get_mut(lane as usize) {
                                st.tx.extend(early.drain(..));
                            }
                        }
                    }
                    let got = self.slot_insert(st);
                    debug_assert_eq!(got, slot);
                    let p = self.peers.get_mut(&peer).expect("peer exists");
                    p.lanes[lane as usize] = Some(slot);
                }
                Ok(())
            }
            LinkKind::Shm => {
                let path = addr.unix.clone().ok_or_else(|| Error::Unsupported {
                    feature: "shm",
                    reason: format!("peer {peer} has no shared-memory socket"),
                })?;
                let (seg, seg_path) = ShmSegment::create(&self.cfg.shm_dir, self.cfg.ring_bytes)?;
                let mut sock = match UnixStream::connect(&path) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = seg.unlink();
                        return Err(Error::io(
                            format!("connect to peer {peer} at {}", path.display()),
                            e,
                        ));
                    }
                };
                // The Hello goes on the socket itself, before the rings are used; the socket is
                // fresh, so its send buffer takes these few bytes at once.
                let nonce = self.cfg.secret.as_ref().map(|_| crate::auth::nonce());
                let body = hello_body(me, 0, 1, Some(&seg_path.to_string_lossy()), nonce.as_ref());
                let hdr = FrameHeader {
                    kind: FrameKind::Hello,
                    imm: 0,
                    len: body.len() as u64,
                    token: 0,
                    offset: 0,
                    lane: 0,
                }
                .encode();
                let mut msg = hdr.to_vec();
                msg.extend_from_slice(&body);
                write_all_nonblocking(&mut sock, &msg).map_err(|e| {
                    let _ = seg.unlink();
                    Error::io(format!("send shm hello to peer {peer}"), e)
                })?;
                let slot = self
                    .free_slots
                    .last()
                    .copied()
                    .unwrap_or(self.streams.len());
                let mut stream = ShmStream::new(seg, Side::A, sock);
                self.poll
                    .registry()
                    .register(stream.doorbell_mut(), Token(slot), Interest::READABLE)
                    .map_err(|e| Error::io("register doorbell", e))?;
                let mut st = Stream::new(Io::Shm(stream), Some(peer), 0, LinkKind::Shm);
                st.remote = path.display().to_string();
                match nonce {
                    Some(nonce_d) => st.auth = Auth::AwaitChallenge { nonce_d },
                    None => {
                        let p = self.peers.get_mut(&peer).expect("peer exists");
                        if let Some(early) = p.early.get_mut(0) {
                            st.tx.extend(early.drain(..));
                        }
                    }
                }
                let authed = matches!(st.auth, Auth::Done);
                let got = self.slot_insert(st);
                debug_assert_eq!(got, slot);
                let p = self.peers.get_mut(&peer).expect("peer exists");
                p.lanes[0] = Some(slot);
                if authed {
                    p.up[0] = true;
                    self.check_connected(peer);
                }
                self.flush(slot);
                // Read once: an empty ring arms "reader waiting", so the peer rings the doorbell
                // when it writes. Without it the first frames would wait for an unrelated wake-up.
                self.read(slot);
                Ok(())
            }
            LinkKind::Loopback | LinkKind::Rdma => Ok(()),
        }
    }

    /// Drop every link to a peer now: queued frames are discarded (their source memory is no
    /// longer read) and [`Event::PeerLost`] is reported once.
    pub fn disconnect(&mut self, peer: PeerId) {
        if self.peers.contains_key(&peer) {
            self.lose_peer(peer, "disconnected by this process".into());
        }
    }

    fn check_connected(&mut self, peer: PeerId) {
        // rdma: a peer the RDMA engine carries (or negotiates) is reported by the engine.
        if self.rdma.claims(peer) {
            return;
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            if !p.connected_reported && !p.up.is_empty() && p.up.iter().all(|u| *u) {
                p.connected_reported = true;
                p.dial_deadline = None;
                if let Some(kind) = p.kind {
                    self.local.push_back(Event::Connected { peer, kind });
                }
            }
        }
    }

    fn peer_entry(&mut self, peer: PeerId, kind: LinkKind) -> &mut Peer {
        let lanes = match kind {
            LinkKind::Tcp => self.cfg.lanes.max(1) as usize,
            _ => 1,
        };
        let p = self.peers.entry(peer).or_default();
        if p.kind.is_none() {
            p.kind = Some(kind);
            p.lanes = vec![None; lanes];
            p.up = vec![false; lanes];
            p.early = (0..lanes).map(|_| VecDeque::new()).collect();
        }
        p
    }

    fn lose_peer(&mut self, peer: PeerId, reason: String) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.lost.is_some() {
            return;
        }
        p.lost = Some(reason.clone());
        self.rdma.lose(peer, &reason); // rdma: destroy the peer's queue pair too
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let slots: Vec<usize> = p.lanes.iter().flatten().copied().collect();
        for e in p.early.iter_mut() {
            e.clear();
        }
        for s in slots {
            self.close_slot(s);
        }
        tracing::debug!(%peer, %reason, "peer lost");
        self.local.push_back(Event::PeerLost {
            peer,
            error: Error::PeerLost { peer, reason },
        });
    }

    fn close_slot(&mut self, slot: usize) {
        if let Some(mut st) = self.streams.get_mut(slot).and_then(Option::take) {
            let _ = match &mut st.io {
                Io::Tcp(s) => self.poll.registry().deregister(s),
                Io::Shm(s) => {
                    s.close();
                    self.poll.registry().deregister(s.doorbell_mut())
                }
                Io::UnixHello(s) => self.poll.registry().deregister(s),
                Io::Swapping => Ok(()),
            };
            self.free_slots.push(slot);
        }
    }

    fn stream_failed(&mut self, slot: usize, reason: String) {
        let peer = self.streams[slot].as_ref().and_then(|s| s.peer);
        let connecting = self.streams[slot].as_ref().is_some_and(|s| s.connecting);
        match peer {
            Some(peer) if connecting => {
                // Dial failed before the link was up: retry until the deadline.
                let now = Instant::now();
                let p = self.peers.get_mut(&peer).expect("peer exists");
                let deadline = *p
                    .dial_deadline
                    .get_or_insert(now + self.cfg.connect_timeout);
                if now < deadline {
                    for l in p.lanes.iter_mut() {
                        if *l == Some(slot) {
                            *l = None;
                        }
                    }
                    // keep frames queued on this lane for the next attempt
                    if let Some(st) = self.streams[slot].as_mut() {
                        let lane = st.lane as usize;
                        let ops: Vec<TxOp> = st
                            .tx
                            .drain(..)
                            .filter(|o| o.hdr[3] != FrameKind::Hello as u8)
                            .collect();
                        let p = self.peers.get_mut(&peer).expect("peer exists");
                        if let Some(e) = p.early.get_mut(lane) {
                            for op in ops.into_iter().rev() {
                                e.push_front(op);
                            }
                        }
                    }
                    self.close_slot(slot);
                    let p = self.peers.get_mut(&peer).expect("peer exists");
                    p.redial_at = Some(now + Duration::from_millis(50));
                } else {
                    self.lose_peer(
                        peer,
                        format!(
                            "could not connect within {:?}: {reason}",
                            self.cfg.connect_timeout
                        ),
                    );
                }
            }
            Some(peer) => self.lose_peer(peer, reason),
            None => self.close_slot(slot),
        }
    }

    fn accept_tcp(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut s, remote)) => {
                    if self.anonymous_streams() >= MAX_ANONYMOUS {
                        tracing::warn!(
                            "refusing a connection from {remote}: {MAX_ANONYMOUS} connections are already waiting for their handshake"
                        );
                        continue;
                    }
                    let _ = s.set_nodelay(true);
                    let slot = self
                        .free_slots
                        .last()
                        .copied()
                        .unwrap_or(self.streams.len());
                    if self
                        .poll
                        .registry()
                        .register(&mut s, Token(slot), Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    let mut st = Stream::new(Io::Tcp(s), None, 0, LinkKind::Tcp);
                    st.remote = remote.to_string();
                    let got = self.slot_insert(st);
                    debug_assert_eq!(got, slot);
                    self.read(slot);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn accept_unix(&mut self) {
        loop {
            let Some((l, _)) = self.unix.as_mut() else {
                return;
            };
            match l.accept() {
                Ok((mut s, _)) => {
                    let slot = self
                        .free_slots
                        .last()
                        .copied()
                        .unwrap_or(self.streams.len());
                    if self
                        .poll
                        .registry()
                        .register(&mut s, Token(slot), Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    let got =
                        self.slot_insert(Stream::new(Io::UnixHello(s), None, 0, LinkKind::Shm));
                    debug_assert_eq!(got, slot);
                    self.read(slot);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept on unix socket failed: {e}");
                    return;
                }
            }
        }
    }

    /// Handle a Hello frame on an accepted stream.
    fn on_hello(&mut self, slot: usize, body: &[u8]) -> std::result::Result<(), String> {
        let h = parse_hello(body).map_err(|e| format!("bad hello: {e}"))?;
        if h.from == self.cfg.me {
            return Err("hello claims to be ourselves".into());
        }
        let st = self.streams[slot].as_mut().expect("slot live");
        // rdma: on a dialled lane 0 a Hello is the acceptor's answer to our RDMA offer.
        if st.peer == Some(h.from) && st.lane == 0 && self.rdma.awaits_reply(h.from) {
            self.rdma.on_reply(h.from, &h.shm_path)?;
            self.rdma_settle();
            self.check_connected(h.from);
            return Ok(());
        }
        if st.peer.is_some() {
            return Err("second hello on a stream".into());
        }
        let kind = st.kind;
        let expected_lanes = match kind {
            LinkKind::Tcp => self.cfg.lanes.max(1),
            _ => 1,
        };
        if h.lanes != expected_lanes || h.lane >= expected_lanes {
            return Err(format!(
                "peer {} uses lane {} of {} but this process expects {} lanes (set BPS_TCP_LANES alike on every process)",
                h.from, h.lane, h.lanes, expected_lanes
            ));
        }
        match (&self.cfg.secret, h.nonce.len()) {
            (Some(_), NONCE_LEN) | (None, 0) => {}
            (Some(_), _) => {
                self.refused += 1;
                let remote = self.streams[slot].as_ref().map(|s| s.remote.clone());
                tracing::warn!(
                    "refused a connection from {} claiming to be peer {}: no credentials",
                    remote.unwrap_or_default(),
                    h.from
                );
                return Err(format!(
                    "peer {} presented no credentials: it does not hold this job's secret (BPS_JOB_SECRET)",
                    h.from
                ));
            }
            (None, _) => {
                return Err(format!(
                    "peer {} authenticates but this process has no BPS_JOB_SECRET: set the same secret on every process",
                    h.from
                ))
            }
        }
        if let Io::UnixHello(_) = st.io {
            if h.shm_path.is_empty() {
                return Err("shm hello without a segment path".into());
            }
            // Only a segment of ours: a file named by us, in our shm directory.
            let path = std::path::Path::new(&h.shm_path);
            let ok = path.parent() == Some(self.cfg.shm_dir.as_path())
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("bps-shm-"))
                && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
            if !ok {
                return Err(format!(
                    "shm hello names {:?}, not a bps segment in {}",
                    h.shm_path,
                    self.cfg.shm_dir.display()
                ));
            }
            let seg = ShmSegment::open(path).map_err(|e| e.to_string())?;
            let _ = seg.unlink();
            let Io::UnixHello(sock) = std::mem::replace(&mut st.io, Io::Swapping) else {
                unreachable!("checked above")
            };
            st.io = Io::Shm(ShmStream::new(seg, Side::B, sock));
        }
        // Every check passes before the stream is tied to the peer: a refused Hello closes only
        // the stream that sent it, never the peer's real link.
        if let Some(p) = self.peers.get(&h.from) {
            if p.kind.is_some_and(|k| k != kind) {
                return Err(format!(
                    "peer {} connected over {kind} but is known as {:?}",
                    h.from, p.kind
                ));
            }
            if p.lost.is_some() {
                return Err(format!("peer {} was already lost", h.from));
            }
            if p.lanes
                .get(h.lane as usize)
                .copied()
                .flatten()
                .is_some_and(|old| old != slot)
            {
                return Err(format!("peer {} opened lane {} twice", h.from, h.lane));
            }
        }
        // rdma: keep a tcp dialler's lane 0 field (an RDMA offer, or empty) for `attach`.
        if kind == LinkKind::Tcp && h.lane == 0 {
            if let Some(st) = self.streams[slot].as_mut() {
                st.rdma_offer = Some(h.shm_path.clone());
            }
        }
        if let Some(secret) = &self.cfg.secret {
            // Challenge: our nonce and our proof; the stream stays anonymous until the dialer's
            // proof checks out.
            let mut nonce_d = [0u8; NONCE_LEN];
            nonce_d.copy_from_slice(&h.nonce);
            let nonce_a = crate::auth::nonce();
            let ctx = link_context(h.from, self.cfg.me, h.lane);
            let proof = secret.prove(LABEL_ACCEPTOR, &[&nonce_d, &nonce_a, &ctx]);
            let mut e = Encoder::new();
            e.bytes(&nonce_a).bytes(&proof);
            let st = self.streams[slot].as_mut().expect("slot live");
            st.tx.push_back(frame_op(
                FrameKind::Auth,
                0,
                h.lane,
                Body::Owned(e.finish()),
                None,
            ));
            st.auth = Auth::AwaitProof {
                from: h.from,
                lane: h.lane,
                nonce_d,
                nonce_a,
            };
            self.flush(slot);
            return Ok(());
        }
        self.attach(slot, h.from, h.lane, kind);
        Ok(())
    }

    /// Tie an accepted (and, with a secret, authenticated) stream to its peer's lane.
    fn attach(&mut self, slot: usize, from: PeerId, lane: u32, kind: LinkKind) {
        let st = self.streams[slot].as_mut().expect("slot live");
        st.peer = Some(from);
        st.lane = lane;
        st.auth = Auth::Done;
        // rdma: answer the dialler's RDMA offer before any queued frame.
        if let Some(offer) = st.rdma_offer.take() {
            let offer = Some(offer).filter(|o| !o.is_empty());
            if let Some(reply) = self.rdma.on_attach(from, offer.as_deref()) {
                let body = hello_body(self.cfg.me, 0, self.cfg.lanes.max(1), Some(&reply), None);
                st.tx
                    .push_back(frame_op(FrameKind::Hello, 0, 0, Body::Owned(body), None));
            }
        }
        let p = self.peer_entry(from, kind);
        p.lanes[lane as usize] = Some(slot);
        p.up[lane as usize] = true;
        let early: Vec<TxOp> = p.early[lane as usize].drain(..).collect();
        let st = self.streams[slot].as_mut().expect("slot live");
        st.tx.extend(early);
        self.check_connected(from);
        self.flush(slot);
        self.rdma_settle(); // rdma: re-post operations of a peer that settled on tcp
    }

    /// An Auth frame: the acceptor's challenge (at the dialer) or the dialer's proof (at the
    /// acceptor).
    fn on_auth(&mut self, slot: usize, body: &[u8]) -> std::result::Result<(), String> {
        let Some(secret) = self.cfg.secret.clone() else {
            return Err("authentication frame, but this job has no secret".into());
        };
        let me = self.cfg.me;
        let st = self.streams[slot].as_mut().expect("slot live");
        let (kind, remote) = (st.kind, st.remote.clone());
        match st.auth {
            Auth::AwaitChallenge { nonce_d } => {
                let peer = st.peer.expect("dialled streams know their peer");
                let lane = st.lane;
                let mut d = Decoder::new(body);
                let nonce_a = d
                    .bytes("challenge nonce", NONCE_LEN)
                    .map_err(|e| e.to_string())?;
                let proof = d
                    .bytes("challenge proof", MAC_LEN)
                    .map_err(|e| e.to_string())?;
                d.finish().map_err(|e| e.to_string())?;
                let ctx = link_context(me, peer, lane);
                if nonce_a.len() != NONCE_LEN
                    || !secret.verify(LABEL_ACCEPTOR, &[&nonce_d, nonce_a, &ctx], proof)
                {
                    self.refused += 1;
                    tracing::warn!(
                        "refused peer {peer} at {remote}: it does not hold this job's secret"
                    );
                    return Err(format!(
                        "authentication failed: peer {peer} at {remote} does not hold this job's secret (BPS_JOB_SECRET)"
                    ));
                }
                let mine = secret.prove(LABEL_DIALER, &[&nonce_d, nonce_a, &ctx]);
                let mut e = Encoder::new();
                e.bytes(&mine);
                st.tx.push_back(frame_op(
                    FrameKind::Auth,
                    0,
                    lane,
                    Body::Owned(e.finish()),
                    None,
                ));
                st.auth = Auth::Done;
                let connected = !st.connecting;
                let p = self.peers.get_mut(&peer).expect("peer exists");
                let early: Vec<TxOp> = p
                    .early
                    .get_mut(lane as usize)
                    .map(|q| q.drain(..).collect())
                    .unwrap_or_default();
                if connected {
                    p.up[lane as usize] = true;
                }
                let st = self.streams[slot].as_mut().expect("slot live");
                st.tx.extend(early);
                if connected {
                    self.check_connected(peer);
                }
                self.flush(slot);
                Ok(())
            }
            Auth::AwaitProof {
                from,
                lane,
                nonce_d,
                nonce_a,
            } => {
                let mut d = Decoder::new(body);
                let proof = d.bytes("proof", MAC_LEN).map_err(|e| e.to_string())?;
                d.finish().map_err(|e| e.to_string())?;
                let ctx = link_context(from, me, lane);
                if !secret.verify(LABEL_DIALER, &[&nonce_d, &nonce_a, &ctx], proof) {
                    self.refused += 1;
                    tracing::warn!(
                        "refused a connection from {remote} claiming to be peer {from}: it does not hold this job's secret"
                    );
                    return Err("authentication failed".into());
                }
                self.attach(slot, from, lane, kind);
                Ok(())
            }
            Auth::Done => Err("unexpected authentication frame".into()),
        }
    }

    /// Connections refused because the peer could not prove it holds the job secret.
    pub fn refused_connections(&self) -> u64 {
        self.refused
    }

    // rdma: ------------------------------------------------------------------------------------
    /// Counters of the RDMA backend (all zero without feature `rdma` or without a device).
    pub fn rdma_stats(&self) -> crate::rdma::RdmaStats {
        self.rdma.stats()
    }

    /// Registers device memory for one-sided writes over rdma links (GPUDirect RDMA): `len`
    /// bytes at `offset` of the dma-buf `fd` (e.g. from `cuMemGetHandleForAddressRange(…
    /// DMA_BUF_FD…)`) are registered with the NIC at once (`ibv_reg_dmabuf_mr`), addressed by
    /// `iova` (usually the device pointer; it must agree with `offset` within a page). The
    /// returned [`Region`] is used as one from [`Transport::register`]: its token is a source of
    /// [`Transport::try_write_imm`] and a destination peers write into, and
    /// [`Transport::deregister`] drops it. The bytes are not CPU-addressable, so only rdma links
    /// carry them: a write from this region to a peer on tcp, shm or loopback, or into it from
    /// such a peer, is refused with an error saying so (stage through host memory for those).
    /// The kernel keeps its own reference on the dma-buf: `fd` may be closed after this returns.
    ///
    /// # Errors
    /// `Error::Unsupported { feature: "rdma", .. }` without the `rdma` feature, without an RDMA
    /// device (or with tcp forced), or where the device cannot register dma-bufs ("device rxe0
    /// cannot register dma-buf memory (driver has no dma-buf support …)"); `Error::Io` naming
    /// the device, fd, offset, length and what the errno means for other failures.
    ///
    /// # Safety
    /// The memory behind the dma-buf may be written by the NIC on behalf of peers until the
    /// region is deregistered: its other users (the GPU, or a CPU mapping of the same pages)
    /// must not rely on its contents except as the protocol allows (after `WriteReceived`, and
    /// not while a write from it is in flight).
    pub unsafe fn register_dmabuf(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
    ) -> Result<Region> {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(0x9E37_79B9_7F4A_7C16) | 1;
        // SAFETY: forwarded contract.
        unsafe { self.rdma.register_dmabuf(token, fd, offset, len, iova) }?;
        Ok(Region {
            token,
            len: len as u64,
        })
    }

    /// rdma: drops peers whose RDMA link failed, and re-posts over tcp the operations of peers
    /// that settled on tcp during the RDMA negotiation.
    fn rdma_settle(&mut self) {
        for (peer, reason) in self.rdma.take_lost() {
            self.lose_peer(peer, reason);
        }
        for (peer, ops) in self.rdma.take_replay() {
            for op in ops {
                let r = match op {
                    crate::rdma::Replay::Send { lane, data } => self.try_send(peer, lane, &data),
                    crate::rdma::Replay::Write {
                        lane,
                        src,
                        src_offset,
                        len,
                        dst,
                        imm,
                        wr_id,
                    } => self.try_write_imm(peer, lane, src, src_offset, len, dst, imm, wr_id),
                };
                if let Err(e) = r {
                    tracing::warn!(%peer, "an operation queued during the RDMA negotiation was dropped: {e}");
                }
            }
            self.check_connected(peer);
        }
    }
    // rdma: end -----------------------------------------------------------------------------

    /// Read everything available on a stream.
    fn read(&mut self, slot: usize) {
        let max_msg = self.cfg.max_msg;
        loop {
            let Some(st) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if st.dead {
                return;
            }
            let peer_label = st
                .peer
                .map(|p| p.to_string())
                .unwrap_or_else(|| "(unidentified)".into());
            match &mut st.rx {
                Rx::Header => {
                    let avail = st.rx_end - st.rx_start;
                    if avail >= HEADER_LEN {
                        let mut hb = [0u8; HEADER_LEN];
                        hb.copy_from_slice(&st.rxbuf[st.rx_start..st.rx_start + HEADER_LEN]);
                        st.rx_start += HEADER_LEN;
                        let hdr = match FrameHeader::decode(&hb, max_msg) {
                            Ok(h) => h,
                            Err(e) => {
                                self.protocol_error(slot, format!("malformed frame: {e}"));
                                return;
                            }
                        };
                        let anonymous =
                            st.peer.is_none() && !matches!(st.auth, Auth::AwaitProof { .. });
                        if anonymous && hdr.kind != FrameKind::Hello {
                            self.protocol_error(slot, "first frame is not a hello".into());
                            return;
                        }
                        // Until the handshake is over, only handshake frames are accepted.
                        if !matches!(st.auth, Auth::Done) && hdr.kind != FrameKind::Auth {
                            self.protocol_error(
                                slot,
                                format!("{:?} frame before authentication", hdr.kind),
                            );
                            return;
                        }
                        match hdr.kind {
                            FrameKind::Hello | FrameKind::Msg | FrameKind::Auth => {
                                st.rx = Rx::Msg {
                                    hdr,
                                    buf: Vec::with_capacity(hdr.len as usize),
                                };
                            }
                            FrameKind::Write => {
                                let region = self.regions.get(&hdr.token).copied();
                                if region.is_none() && self.retired.0.contains(&hdr.token) {
                                    let st = self.streams[slot].as_mut().expect("live");
                                    st.rx = Rx::Discard { left: hdr.len };
                                    continue;
                                }
                                let Some(r) = region else {
                                    let why = if self.rdma.is_dmabuf(hdr.token) {
                                        // rdma: device memory, written by the NIC only.
                                        format!(
                                            "write over tcp/shm into memory token {:#x}, device \
                                             memory registered through a dma-buf that only an \
                                             rdma link can write into",
                                            hdr.token
                                        )
                                    } else {
                                        format!("write to unknown memory token {:#x}", hdr.token)
                                    };
                                    self.protocol_error(slot, why);
                                    return;
                                };
                                let end = hdr.offset.checked_add(hdr.len);
                                if end.is_none_or(|e| e > r.len as u64) {
                                    self.protocol_error(
                                        slot,
                                        Error::OutOfBounds {
                                            token: hdr.token,
                                            offset: hdr.offset,
                                            len: hdr.len,
                                            region_len: r.len as u64,
                                        }
                                        .to_string(),
                                    );
                                    return;
                                }
                                let st = self.streams[slot].as_mut().expect("live");
                                // SAFETY: offset + len <= region length (checked above), so the
                                // pointer stays inside the registered allocation.
                                let ptr = unsafe { r.ptr.add(hdr.offset as usize) };
                                st.rx = Rx::Write { hdr, ptr, got: 0 };
                            }
                        }
                        continue;
                    }
                    // need more bytes
                    if st.rx_start > 0 {
                        st.rxbuf.copy_within(st.rx_start..st.rx_end, 0);
                        st.rx_end -= st.rx_start;
                        st.rx_start = 0;
                    }
                    let end = st.rx_end;
                    // An accepted unix socket carries exactly one Hello frame; read no further
                    // than it so the doorbell bytes that follow are left alone.
                    let want = if matches!(st.io, Io::UnixHello(_)) {
                        HEADER_LEN - end
                    } else {
                        RX_BUF - end
                    };
                    match st.io.read(&mut st.rxbuf[end..end + want]) {
                        Ok(0) => {
                            self.eof(slot);
                            return;
                        }
                        Ok(n) => st.rx_end += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            self.stream_failed(slot, format!("read from peer {peer_label}: {e}"));
                            return;
                        }
                    }
                }
                Rx::Msg { hdr, buf } => {
                    let need = hdr.len as usize - buf.len();
                    let avail = st.rx_end - st.rx_start;
                    let take = need.min(avail);
                    buf.extend_from_slice(&st.rxbuf[st.rx_start..st.rx_start + take]);
                    st.rx_start += take;
                    if buf.len() == hdr.len as usize {
                        let hdr = *hdr;
                        let Rx::Msg { buf, .. } = std::mem::replace(&mut st.rx, Rx::Header) else {
                            unreachable!()
                        };
                        if hdr.kind == FrameKind::Hello {
                            if let Err(reason) = self.on_hello(slot, &buf) {
                                self.protocol_error(slot, reason);
                                return;
                            }
                        } else if hdr.kind == FrameKind::Auth {
                            if let Err(reason) = self.on_auth(slot, &buf) {
                                self.protocol_error(slot, reason);
                                return;
                            }
                        } else {
                            let peer = st.peer.expect("identified after hello");
                            self.local.push_back(Event::Message {
                                peer,
                                lane: st.lane,
                                data: buf,
                            });
                        }
                        continue;
                    }
                    // need more: read into the staging buffer
                    st.rx_start = 0;
                    st.rx_end = 0;
                    let want = if matches!(st.io, Io::UnixHello(_)) {
                        (hdr.len as usize - buf.len()).min(RX_BUF)
                    } else {
                        RX_BUF
                    };
                    match st.io.read(&mut st.rxbuf[..want]) {
                        Ok(0) => {
                            self.eof(slot);
                            return;
                        }
                        Ok(n) => st.rx_end = n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            self.stream_failed(slot, format!("read from peer {peer_label}: {e}"));
                            return;
                        }
                    }
                }
                Rx::Write { hdr, ptr, got } => {
                    let len = hdr.len as usize;
                    let avail = st.rx_end - st.rx_start;
                    let take = (len - *got).min(avail);
                    if take > 0 {
                        // SAFETY: ptr..ptr+len lies in a registered region (bounds checked when
                        // the header arrived; a deregistration turns this state into Discard),
                        // and got + take <= len.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                st.rxbuf.as_ptr().add(st.rx_start),
                                ptr.add(*got),
                                take,
                            );
                        }
                        st.rx_start += take;
                        *got += take;
                    }
                    if *got == len {
                        let hdr = *hdr;
                        st.rx = Rx::Header;
                        let peer = st.peer.expect("identified after hello");
                        self.local.push_back(Event::WriteReceived {
                            peer,
                            imm: hdr.imm,
                            token: hdr.token,
                            offset: hdr.offset,
                            len: hdr.len,
                        });
                        continue;
                    }
                    let left = len - *got;
                    let res = if left >= DIRECT_READ {
                        // SAFETY: as above; the slice covers the rest of the payload only.
                        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.add(*got), left) };
                        st.io.read(dst).map(|n| {
                            *got += n;
                            (n, false)
                        })
                    } else {
                        st.rx_start = 0;
                        st.rx_end = 0;
                        st.io.read(&mut st.rxbuf[..]).map(|n| (n, true))
                    };
                    match res {
                        Ok((0, _)) => {
                            self.eof(slot);
                            return;
                        }
                        Ok((n, true)) => st.rx_end = n,
                        Ok((_, false)) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            self.stream_failed(slot, format!("read from peer {peer_label}: {e}"));
                            return;
                        }
                    }
                }
                Rx::Discard { left } => {
                    let avail = (st.rx_end - st.rx_start) as u64;
                    let take = avail.min(*left);
                    st.rx_start += take as usize;
                    *left -= take;
                    if *left == 0 {
                        st.rx = Rx::Header;
                        continue;
                    }
                    st.rx_start = 0;
                    st.rx_end = 0;
                    match st.io.read(&mut st.rxbuf[..]) {
                        Ok(0) => {
                            self.eof(slot);
                            return;
                        }
                        Ok(n) => st.rx_end = n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            self.stream_failed(slot, format!("read from peer {peer_label}: {e}"));
                            return;
                        }
                    }
                }
            }
        }
    }

    fn eof(&mut self, slot: usize) {
        self.stream_failed(slot, "connection closed by the peer".into());
    }

    fn protocol_error(&mut self, slot: usize, reason: String) {
        let peer = self.streams[slot].as_ref().and_then(|s| s.peer);
        tracing::warn!(peer = ?peer, "closing connection: {reason}");
        match peer {
            Some(peer) => {
                let err = Error::Protocol { peer, reason };
                self.lose_peer(peer, err.to_string());
            }
            None => self.close_slot(slot),
        }
    }

    /// Write as much queued data as the stream takes.
    fn flush(&mut self, slot: usize) {
        loop {
            let Some(st) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if st.tx.is_empty() || st.connecting {
                return;
            }
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for op in st.tx.iter() {
                if n + 2 > MAX_IOV {
                    break;
                }
                if op.sent < HEADER_LEN {
                    iov[n] = IoSlice::new(&op.hdr[op.sent..]);
                    n += 1;
                    if op.body.len() > 0 {
                        iov[n] = IoSlice::new(op.body.slice_from(0));
                        n += 1;
                    }
                } else if op.sent < op.total() {
                    iov[n] = IoSlice::new(op.body.slice_from(op.sent - HEADER_LEN));
                    n += 1;
                }
            }
            let res = st.io.write_vectored(&iov[..n]);
            match res {
                Ok(0) => {
                    self.stream_failed(slot, "write returned 0".into());
                    return;
                }
                Ok(mut w) => {
                    let peer = st.peer;
                    while w > 0 {
                        let op = st.tx.front_mut().expect("wrote more than queued");
                        let left = op.total() - op.sent;
                        if w >= left {
                            w -= left;
                            let op = st.tx.pop_front().expect("front exists");
                            if let (Some(wr_id), Some(peer)) = (op.done, peer) {
                                self.local.push_back(Event::WriteDone { peer, wr_id });
                            }
                        } else {
                            op.sent += w;
                            w = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let peer = st.peer.map(|p| p.to_string()).unwrap_or_default();
                    self.stream_failed(slot, format!("write to peer {peer}: {e}"));
                    return;
                }
            }
        }
    }

    fn enqueue(&mut self, peer: PeerId, lane: u32, op: TxOp) -> Result<()> {
        let depth = self.cfg.queue_depth;
        let Some(p) = self.peers.get_mut(&peer) else {
            return Err(Error::UnknownPeer { peer });
        };
        if let Some(reason) = &p.lost {
            return Err(Error::PeerLost {
                peer,
                reason: reason.clone(),
            });
        }
        let nl = p.lanes.len().max(1);
        let lane = lane as usize % nl;
        let ready = p.lanes.get(lane).copied().flatten().filter(|slot| {
            matches!(
                self.streams[*slot].as_ref().map(|s| s.auth),
                Some(Auth::Done)
            )
        });
        match ready {
            Some(slot) => {
                let st = self.streams[slot].as_mut().expect("lane slot live");
                if st.tx.len() >= depth {
                    return Err(Error::Busy { peer });
                }
                let mut op = op;
                op.hdr[32..36].copy_from_slice(&(lane as u32).to_le_bytes());
                st.tx.push_back(op);
                if st.tx.len() == 1 {
                    self.flush(slot);
                }
                Ok(())
            }
            None => {
                let q = &mut p.early[lane];
                if q.len() >= depth {
                    return Err(Error::Busy { peer });
                }
                q.push_back(op);
                Ok(())
            }
        }
    }

    fn anonymous_streams(&self) -> usize {
        self.streams
            .iter()
            .flatten()
            .filter(|s| s.peer.is_none())
            .count()
    }

    fn handle_timers(&mut self) {
        let now = Instant::now();
        // Accepted connections that never finish their handshake are closed after the connect
        // timeout, so silent strangers cannot hold memory without limit.
        let stale: Vec<usize> = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, st)| st.as_ref().map(|st| (i, st)))
            .filter(|(_, st)| {
                st.peer.is_none() && now.duration_since(st.born) > self.cfg.connect_timeout
            })
            .map(|(i, _)| i)
            .collect();
        for slot in stale {
            if let Some(st) = self.streams[slot].as_ref() {
                tracing::warn!(
                    "closing a connection from {} that did not complete its handshake within {:?}",
                    st.remote,
                    self.cfg.connect_timeout
                );
            }
            self.close_slot(slot);
        }
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.lost.is_none() && p.redial_at.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for peer in due {
            if let Err(e) = self.dial(peer) {
                self.lose_peer(peer, e.to_string());
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        self.peers.values().filter_map(|p| p.redial_at).min()
    }
}

fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a null new action only reads the current disposition into a
        // zeroed struct we own; the second call installs SIG_IGN, which is async-signal-safe
        // and changes nothing but SIGPIPE's disposition. A handler the host installed itself
        // (anything but SIG_DFL) is left alone.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_DFL
            {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
        }
    });
}

fn write_all_nonblocking(s: &mut UnixStream, mut b: &[u8]) -> io::Result<()> {
    let start = Instant::now();
    while !b.is_empty() {
        match s.write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() > Duration::from_secs(5) {
                    return Err(e);
                }
                std::thread::yield_now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn frame_op(kind: FrameKind, imm: u32, lane: u32, body: Body, done: Option<u64>) -> TxOp {
    let hdr = FrameHeader {
        kind,
        imm,
        len: body.len() as u64,
        token: 0,
        offset: 0,
        lane,
    }
    .encode();
    TxOp {
        hdr,
        body,
        sent: 0,
        done,
    }
}

impl Transport for Net {
    fn local_peer(&self) -> PeerId {
        self.cfg.me
    }

    fn add_peer(&mut self, peer: PeerId, addr: PeerAddr) -> Result<()> {
        let kind = self.choose_kind(peer, &addr)?;
        if let Some(p) = self.peers.get(&peer) {
            if p.addr.is_some() {
                return Ok(());
            }
            if let Some(k) = p.kind {
                if k != kind {
                    return Err(Error::Protocol {
                        peer,
                        reason: format!("connected over {k} but configuration chooses {kind}"),
                    });
                }
            }
        }
        let (me, connect_timeout) = (self.cfg.me, self.cfg.connect_timeout);
        // rdma: a tcp peer may carry an RDMA link (offered by the dialler, before it dials).
        if kind == LinkKind::Tcp {
            self.rdma.add_peer(peer, me < peer);
        }
        let p = self.peer_entry(peer, kind);
        p.addr = Some(addr);
        if kind == LinkKind::Loopback {
            p.up = vec![true];
            self.check_connected(peer);
            return Ok(());
        }
        if me < peer {
            p.dial_deadline = Some(Instant::now() + connect_timeout);
            self.dial(peer)?;
        }
        Ok(())
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region> {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(0x9E37_79B9_7F4A_7C16) | 1;
        self.rdma.register(token, ptr, len)?; // rdma: NIC registration (cached per range)
        self.regions.insert(token, RegionEntry { ptr, len });
        Ok(Region {
            token,
            len: len as u64,
        })
    }

    fn deregister(&mut self, token: u64) -> Result<()> {
        // rdma: a region of device memory (register_dmabuf) lives in the rdma engine only.
        if self.regions.remove(&token).is_none() && !self.rdma.is_dmabuf(token) {
            return Err(Error::UnknownToken { token });
        }
        self.rdma.deregister(token); // rdma:
        const RETIRED_MAX: usize = 1 << 16;
        if self.retired.0.insert(token) {
            self.retired.1.push_back(token);
            if self.retired.1.len() > RETIRED_MAX {
                if let Some(old) = self.retired.1.pop_front() {
                    self.retired.0.remove(&old);
                }
            }
        }
        for st in self.streams.iter_mut().flatten() {
            if let Rx::Write { hdr, got, .. } = st.rx {
                if hdr.token == token {
                    st.rx = Rx::Discard {
                        left: hdr.len - got as u64,
                    };
                }
            }
        }
        Ok(())
    }

    fn try_send(&mut self, peer: PeerId, lane: u32, msg: &[u8]) -> Result<()> {
        if msg.len() > self.cfg.max_msg {
            return Err(Error::MessageTooLarge {
                len: msg.len(),
                max: self.cfg.max_msg,
            });
        }
        // rdma: a peer on (or negotiating) an RDMA link sends over its queue pair.
        if let Some(r) = self.rdma.try_send(peer, lane, msg) {
            return r;
        }
        if peer == self.cfg.me {
            if !self.peers.contains_key(&peer) {
                return Err(Error::UnknownPeer { peer });
            }
            self.local.push_back(Event::Message {
                peer,
                lane,
                data: msg.to_vec(),
            });
            return Ok(());
        }
        let op = frame_op(FrameKind::Msg, 0, lane, Body::Owned(msg.to_vec()), None);
        self.enqueue(peer, lane, op)
    }

    fn try_write_imm(
        &mut self,
        peer: PeerId,
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
    ) -> Result<()> {
        let Some(r) = self.regions.get(&src).copied() else {
            // rdma: device memory (a dma-buf region) is written from over an rdma link only.
            let link = self.link_kind(peer);
            return self
                .rdma
                .try_write_dmabuf(peer, lane, src, src_offset, len, dst, imm, wr_id, link)
                .unwrap_or(Err(Error::UnknownToken { token: src }));
        };
        if src_offset.checked_add(len).is_none_or(|e| e > r.len as u64) {
            return Err(Error::OutOfBounds {
                token: src,
                offset: src_offset,
                len,
                region_len: r.len as u64,
            });
        }
        // SAFETY: src_offset + len <= region length (checked above).
        let src_ptr = unsafe { r.ptr.add(src_offset as usize) };
        if peer == self.cfg.me {
            if !self.peers.contains_key(&peer) {
                return Err(Error::UnknownPeer { peer });
            }
            let Some(d) = self.regions.get(&dst.token).copied() else {
                if self.rdma.is_dmabuf(dst.token) {
                    // rdma: device memory cannot be copied into by the CPU.
                    return Err(crate::rdma::gpudirect::dmabuf_write_refused(
                        dst.token,
                        false,
                        peer,
                        LinkKind::Loopback.name(),
                    ));
                }
                return Err(Error::UnknownToken { token: dst.token });
            };
            if dst.offset.checked_add(len).is_none_or(|e| e > d.len as u64) {
                return Err(Error::OutOfBounds {
                    token: dst.token,
                    offset: dst.offset,
                    len,
                    region_len: d.len as u64,
                });
            }
            // SAFETY: both ranges lie inside registered regions (checked above); they may
            // overlap (the same region), so `copy` (memmove) is used.
            unsafe {
                std::ptr::copy(src_ptr, d.ptr.add(dst.offset as usize), len as usize);
            }
            self.local.push_back(Event::WriteDone { peer, wr_id });
            self.local.push_back(Event::WriteReceived {
                peer,
                imm,
                token: dst.token,
                offset: dst.offset,
                len,
            });
            return Ok(());
        }
        // rdma: a peer on (or negotiating) an RDMA link gets an RDMA WRITE_WITH_IMM.
        if let Some(r) = self
            .rdma
            .try_write_imm(peer, lane, src, src_offset, len, dst, imm, wr_id)
        {
            return r;
        }
        let body = Body::Region {
            ptr: src_ptr,
            len: len as usize,
        };
        let mut op = frame_op(FrameKind::Write, imm, lane, body, Some(wr_id));
        op.hdr[16..24].copy_from_slice(&dst.token.to_le_bytes());
        op.hdr[24..32].copy_from_slice(&dst.offset.to_le_bytes());
        self.enqueue(peer, lane, op)
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> Result<()> {
        self.handle_timers();
        // rdma: completions first.
        self.rdma.poll(&mut self.local);
        self.rdma_settle();
        let mut timeout = if self.local.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        if let Some(t) = self.next_timer() {
            let d = t.saturating_duration_since(Instant::now());
            timeout = Some(timeout.map_or(d, |x| x.min(d)));
        }
        // rdma: before sleeping, tell the completion poller to wake us (unless completions wait).
        if timeout != Some(Duration::ZERO) && !self.rdma.prepare_sleep() {
            timeout = Some(Duration::ZERO);
        }
        match self.poll.poll(&mut self.mio_events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("epoll_wait", e)),
        }
        let ready: Vec<(Token, bool, bool, bool)> = self
            .mio_events
            .iter()
            .map(|e| {
                (
                    e.token(),
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable(),
                    e.is_error(),
                )
            })
            .collect();
        for (tok, readable, writable, error) in ready {
            match tok {
                WAKER => {}
                TCP_LISTENER => self.accept_tcp(),
                UNIX_LISTENER => self.accept_unix(),
                Token(slot) => {
                    let Some(st) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
                        continue;
                    };
                    if st.connecting && (writable || error) {
                        if let Io::Tcp(s) = &st.io {
                            let err = s.take_error().ok().flatten();
                            // A dial to a port nobody listens on yet can connect the socket to
                            // itself (simultaneous open on the same ephemeral port).
                            let selfie = s
                                .peer_addr()
                                .ok()
                                .is_some_and(|p| s.local_addr().ok() == Some(p));
                            let err = err.or_else(|| {
                                selfie.then(|| {
                                    io::Error::new(
                                        io::ErrorKind::ConnectionRefused,
                                        "connected to itself",
                                    )
                                })
                            });
                            match (err, s.peer_addr()) {
                                (None, Ok(_)) => {
                                    st.connecting = false;
                                    let (peer, lane) = (st.peer, st.lane);
                                    let authed = matches!(st.auth, Auth::Done);
                                    if let Some(peer) = peer.filter(|_| authed) {
                                        if let Some(p) = self.peers.get_mut(&peer) {
                                            p.up[lane as usize] = true;
                                        }
                                        self.check_connected(peer);
                                    }
                                }
                                (Some(e), _) | (None, Err(e)) => {
                                    if e.kind() != io::ErrorKind::NotConnected || error {
                                        self.stream_failed(slot, format!("connect: {e}"));
                                        continue;
                                    }
                                }
                            }
                        }
                    }
                    let is_shm = matches!(
                        self.streams
                            .get(slot)
                            .and_then(Option::as_ref)
                            .map(|s| &s.io),
                        Some(Io::Shm(_))
                    );
                    if is_shm {
                        let st = self.streams[slot].as_mut().expect("live");
                        let alive = match &mut st.io {
                            Io::Shm(s) => s.on_doorbell(),
                            _ => Ok(true),
                        };
                        // Data and space may both have changed: try both directions. A dead
                        // doorbell is reported after the ring was drained, by read() seeing EOF.
                        self.flush(slot);
                        self.read(slot);
                        if let Ok(false) | Err(_) = alive {
                            if self.streams.get(slot).is_some_and(Option::is_some) {
                                self.stream_failed(
                                    slot,
                                    "peer process closed its shared-memory link".into(),
                                );
                            }
                        }
                        continue;
                    }
                    if writable {
                        self.flush(slot);
                    }
                    if readable {
                        self.read(slot);
                    }
                }
            }
        }
        // rdma: the completions the poller handed over meanwhile.
        self.rdma.poll(&mut self.local);
        self.rdma_settle();
        events.extend(self.local.drain(..));
        Ok(())
    }

    fn waker(&self) -> Waker {
        Waker(self.waker.clone())
    }

    fn link_kind(&self, peer: PeerId) -> Option<LinkKind> {
        if self.rdma.is_up(peer) {
            return Some(LinkKind::Rdma); // rdma:
        }
        self.peers.get(&peer).and_then(|p| p.kind)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for slot in 0..self.streams.len() {
            self.close_slot(slot);
        }
        if let Some((_, path)) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod stale_socket_tests {
    use super::*;

    /// kill -9 leaves `bps-<pid>-*.sock` behind: the next bind in the same directory removes
    /// those of dead processes and keeps those of live ones (and unrelated files).
    #[test]
    fn bind_removes_sockets_of_dead_processes_only() {
        let dir = std::env::temp_dir().join(format!("bps-stale-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.join(format!("bps-{dead}-0-40000.sock"));
        let live = dir.join(format!("bps-{}-0-1.sock", std::process::id()));
        let other = dir.join("bps-notapid.sock");
        // a socket file nobody listens on any more (its listener is gone, as after kill -9)
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        for f in [&live, &other] {
            std::fs::write(f, b"").unwrap();
        }
        let mut cfg = NetConfig::new(PeerId(0), "127.0.0.1:0".parse().unwrap());
        cfg.unix_dir = Some(dir.clone());
        let net = Net::bind(cfg).unwrap();
        assert!(!stale.exists(), "the dead process's socket is removed");
        assert!(live.exists(), "a live process's socket is kept");
        assert!(other.exists(), "other files are kept");
        drop(net);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
