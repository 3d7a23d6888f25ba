//! `bps-bench raw`: the transport alone, between two processes of this machine. No scheduler,
//! no servers, no runtime: this process binds a [`Net`], starts a second copy of itself
//! (`bps-bench raw --peer ADDR ...`) and the two talk through `bps_transport` directly.
//!
//! Throughput: the peer (the receiver) registers a buffer of the largest size per lane and sends
//! its token; this process (the sender) registers its source once and, per size and round,
//! sends a `start` message and `--iters` one-sided writes (`try_write_imm`, `--inflight` at a
//! time, round-robin over the lanes). The receiver counts `WriteReceived` and answers `done` when
//! the last byte of the round is in place. A round's time runs from the sender's first write to
//! the receiver holding the last byte (both processes read the same system clock: the sender
//! stamps the `start`, the receiver the last `WriteReceived`); the time until the sender has
//! `done` back (one more one-way message: conservative) is reported beside it. The median of
//! `--rounds` rounds is printed, after `--warmup` untimed rounds. With `--check`, one more
//! untimed round ends with the receiver hashing the bytes that landed and comparing with the
//! sender's hash of the source (a mismatch fails the run).
//!
//! Ping-pong: messages (`try_send`) of each size bounced back and forth; round trips timed on
//! this process (median, p99, min).
//!
//! Both sides poll like the runtime's event loop: without sleeping for `--spin-us` after
//! activity (`BPS_POLL_SPIN_US`, default 50), blocking after that.
//!
//! `--transport rdma`: the writes are RDMA WRITE_WITH_IMM on one RC queue pair (the tcp link
//! stays as the bootstrap), the device and queues from the `BPS_RDMA_*` variables, parsed by
//! the runtime's own configuration code. Without the `rdma` backend in this build, or without a
//! usable device, it stops before starting anything, with one line saying why (never a silent
//! fallback to tcp: a link that comes up as anything but rdma is an error too).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bps_transport::rdma::RdmaConfig;
use bps_transport::{
    local_host_id, Event, LinkKind, Net, NetConfig, PeerAddr, PeerId, RemoteSlice,
};
use clap::ValueEnum;

use crate::regmem::RegNet;
use crate::{human, parse_sizes, splitmix, sysinfo};

const SENDER: PeerId = PeerId(1);
/// The spawned copy has the lower id, so it is the side that dials (see `Net`).
const RECEIVER: PeerId = PeerId(0);
/// Distinct source offsets of successive writes, so the last write of a round differs from the
/// one before it and a stale buffer cannot pass `--check`.
const SRC_SHIFTS: u64 = 4;
const SHIFT: u64 = 64;
/// No event at all for this long is a hang.
const IDLE_LIMIT: Duration = Duration::from_secs(30);

const TAG_READY: u8 = 1;
const TAG_START: u8 = 2;
const TAG_DONE: u8 = 3;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RawTransport {
    Tcp,
    Shm,
    /// RDMA WRITE_WITH_IMM on an RC queue pair (device from BPS_RDMA_DEVICE, ...).
    Rdma,
}

impl RawTransport {
    fn kind(self) -> LinkKind {
        match self {
            RawTransport::Tcp => LinkKind::Tcp,
            RawTransport::Shm => LinkKind::Shm,
            RawTransport::Rdma => LinkKind::Rdma,
        }
    }
}

/// The RDMA tunables from the environment, read by the runtime's configuration code (the same
/// names, aliases, bounds and error messages as a job's `BPS_RDMA_*`). Only the RDMA variables
/// are passed to it, so a stray job variable (`DMLC_ROLE`, ...) cannot fail a raw run.
fn rdma_config_from_env() -> Result<RdmaConfig, String> {
    use bps_runtime::config::{Config, Lookup, TUNABLES};
    let vars: HashMap<String, String> = TUNABLES
        .iter()
        .filter(|t| t.names[0].starts_with("BPS_RDMA_"))
        .flat_map(|t| t.names.iter())
        .filter_map(|n| std::env::var(n).ok().map(|v| (n.to_string(), v)))
        .collect();
    let lookup = Lookup::map(&vars);
    let cfg = Config::from_lookup(&lookup);
    cfg.map(|c| c.rdma)
        .map_err(|e| format!("raw --transport rdma: {e}"))
}

/// The device `--transport rdma` will use, or the one-line reason it cannot run.
fn rdma_device(cfg: &RdmaConfig) -> Result<bps_transport::rdma::DeviceSummary, String> {
    if !bps_transport::rdma::COMPILED {
        return Err("raw --transport rdma: this build has no RDMA backend (build with --features bps-transport/rdma)".into());
    }
    bps_transport::rdma::probe(cfg).map_err(|e| {
        let why = match e {
            bps_transport::Error::Unsupported { reason, .. } => reason,
            other => other.to_string(),
        };
        format!(
            "raw --transport rdma: cannot use RDMA: {}",
            why.replace('\n', " ")
        )
    })
}

#[derive(clap::Args, Debug, Clone)]
pub struct RawArgs {
    /// Transport between the two processes (rdma: device and queues from BPS_RDMA_DEVICE,
    /// BPS_RDMA_GID_INDEX, ...; fails if this build or machine has none).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: RawTransport,
    /// Sizes in bytes: `4K:64M` (doubling) or a list. Default 4K:64M, with --pingpong 4.
    #[arg(long)]
    sizes: Option<String>,
    /// Writes per round (default 20), or timed round trips per size with --pingpong (10000).
    #[arg(long)]
    iters: Option<u32>,
    /// Timed rounds per size; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Untimed rounds per size first (default 1), or round trips with --pingpong (1000).
    #[arg(long)]
    warmup: Option<u32>,
    /// Writes in flight at once (issued, not yet completed locally).
    #[arg(long, default_value_t = 4)]
    inflight: u32,
    /// TCP connections used, writes round-robin over them (1 compares with one iperf3 stream).
    #[arg(long, default_value_t = 1)]
    lanes: u32,
    /// Bytes of each shared-memory ring (default: BPS_SHM_RING_BYTES, else 4 MiB).
    #[arg(long)]
    ring_bytes: Option<String>,
    /// Poll without sleeping this long after activity, in µs (default: BPS_POLL_SPIN_US, else
    /// 50, as the runtime); 0 always sleeps in the kernel.
    #[arg(long)]
    spin_us: Option<u64>,
    /// Round-trip latency of messages instead of throughput.
    #[arg(long)]
    pingpong: bool,
    /// Verify that the data landed (a hash of what the receiver holds after a round).
    #[arg(long)]
    check: bool,
    /// Write the rows and the configuration as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run as the receiving peer of the process listening at ADDR.
    #[arg(long, hide = true)]
    peer: Option<SocketAddr>,
    /// Internal: that process's Unix socket (shm).
    #[arg(long, hide = true)]
    peer_unix: Option<PathBuf>,
    /// Testing --check itself: announce the hash of other source bytes than those written, so
    /// the receiver must report a mismatch.
    #[arg(long, hide = true)]
    test_wrong_hash: bool,
}

/// What both processes derive from the arguments.
struct Plan {
    kind: LinkKind,
    sizes: Vec<usize>,
    lanes: u32,
    ring_bytes: usize,
    spin: Duration,
    pingpong: bool,
    /// RDMA tunables (from the environment; used with `--transport rdma`).
    rdma: RdmaConfig,
}

impl Plan {
    fn from_args(a: &RawArgs) -> Result<Plan, String> {
        let default = if a.pingpong { "4" } else { "4K:64M" };
        let sizes = parse_sizes(a.sizes.as_deref().unwrap_or(default))?;
        if sizes.is_empty() || sizes.contains(&0) {
            return Err("raw: --sizes must all be at least 1 byte".into());
        }
        if a.pingpong {
            let max = bps_transport::codec::DEFAULT_MAX_MESSAGE;
            if let Some(s) = sizes.iter().find(|s| **s > max) {
                return Err(format!(
                    "raw --pingpong: size {s} is above the largest message ({max} bytes)"
                ));
            }
        }
        if !(1..=64).contains(&a.lanes) {
            return Err(format!("raw: --lanes {}: expected 1..=64", a.lanes));
        }
        let ring_bytes = match a
            .ring_bytes
            .clone()
            .or_else(|| std::env::var("BPS_SHM_RING_BYTES").ok())
        {
            Some(s) => crate::parse_size(&s)
                .filter(|v| v.is_power_of_two() && (4096..=1 << 30).contains(v))
                .ok_or_else(|| {
                    format!("raw: ring bytes {s:?}: expected a power of two, 4K ..= 1G")
                })?,
            None => bps_transport::shm::DEFAULT_RING_BYTES,
        };
        let spin_us = match a.spin_us {
            Some(v) => v,
            None => match std::env::var("BPS_POLL_SPIN_US") {
                Ok(s) => s
                    .trim()
                    .parse()
                    .map_err(|_| format!("BPS_POLL_SPIN_US={s:?}: expected microseconds"))?,
                Err(_) => 50,
            },
        };
        let rdma = if a.transport == RawTransport::Rdma {
            rdma_config_from_env()?
        } else {
            RdmaConfig::default()
        };
        Ok(Plan {
            rdma,
            kind: a.transport.kind(),
            sizes,
            lanes: a.lanes,
            ring_bytes,
            spin: Duration::from_micros(spin_us.min(10_000_000)),
            pingpong: a.pingpong,
        })
    }

    /// Lanes writes are spread over: shm links have one ring pair.
    fn write_lanes(&self) -> u32 {
        match self.kind {
            LinkKind::Tcp => self.lanes,
            _ => 1,
        }
    }

    fn max_size(&self) -> usize {
        self.sizes.iter().copied().max().unwrap_or(1)
    }

    fn net_config(&self, me: PeerId) -> NetConfig {
        let mut c = NetConfig::new(me, SocketAddr::from(([127, 0, 0, 1], 0)));
        c.force = Some(self.kind);
        if self.kind != LinkKind::Shm {
            c.unix_dir = None;
        }
        c.rdma = self.rdma.clone();
        c.lanes = self.lanes;
        c.ring_bytes = self.ring_bytes;
        c.connect_timeout = Duration::from_secs(20);
        c
    }
}

/// One side's event loop: the transport, its events and the runtime's polling policy.
struct Side {
    net: RegNet,
    events: Vec<Event>,
    spin: Duration,
    last_activity: Instant,
    other: PeerId,
}

impl Side {
    /// Poll once: without sleeping shortly after activity, else blocking (at most 100 ms).
    /// Fails when the peer is lost or nothing happened for [`IDLE_LIMIT`].
    fn pump(&mut self) -> Result<(), String> {
        let timeout = if self.last_activity.elapsed() < self.spin {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        self.events.clear();
        self.net
            .poll(&mut self.events, Some(timeout))
            .map_err(|e| e.to_string())?;
        if self.events.is_empty() {
            if self.last_activity.elapsed() > IDLE_LIMIT {
                return Err(format!(
                    "no progress for {IDLE_LIMIT:?} (peer {} silent)",
                    self.other
                ));
            }
        } else {
            self.last_activity = Instant::now();
        }
        for e in &self.events {
            if let Event::PeerLost { error, .. } = e {
                return Err(format!("lost the other process: {error}"));
            }
        }
        Ok(())
    }

    /// Send a message, polling while the queue is full.
    fn send(&mut self, msg: &[u8]) -> Result<(), String> {
        loop {
            match self.net.try_send(self.other, 0, msg) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_busy() => {
                    // Events seen here would be lost to the caller: only sends that cannot race
                    // with anything the caller waits for come through this path.
                    self.pump()?;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

fn put(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn get(b: &[u8], i: usize) -> Option<u64> {
    let s = b.get(1 + 8 * i..1 + 8 * (i + 1))?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// An order-sensitive 64-bit hash of bytes (to compare what landed with what was sent).
pub fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325 ^ b.len() as u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h.rotate_left(23) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    for &x in words.remainder() {
        h = (h.rotate_left(23) ^ x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    h ^ (h >> 29)
}

/// Kills the peer process unless it was reaped.
struct PeerProc(Option<Child>);

impl PeerProc {
    /// Wait for it to exit (at most `limit`), else kill it.
    fn finish(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if start.elapsed() > limit {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct ThroughputRow {
    bytes: usize,
    writes: u32,
    /// First write issued → last byte landed.
    times: Vec<Duration>,
    /// `start` sent → `done` back.
    ack_times: Vec<Duration>,
    checked: Option<bool>,
}

impl ThroughputRow {
    fn median(v: &[Duration]) -> Duration {
        let mut v = v.to_vec();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
    fn bytes_per_round(&self) -> f64 {
        self.bytes as f64 * self.writes as f64
    }
    fn gbs(&self) -> f64 {
        self.bytes_per_round() / Self::median(&self.times).as_secs_f64().max(1e-9) / 1e9
    }
    fn ack_gbs(&self) -> f64 {
        self.bytes_per_round() / Self::median(&self.ack_times).as_secs_f64().max(1e-9) / 1e9
    }
}

struct PingRow {
    bytes: usize,
    rtts: Vec<Duration>,
}

impl PingRow {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.rtts.clone();
        v.sort();
        let i = ((v.len() as f64 * p).ceil() as usize).saturating_sub(1);
        v.get(i.min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    }
    fn median(&self) -> f64 {
        let mut v = self.rtts.clone();
        v.sort();
        v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    }
    fn min(&self) -> f64 {
        self.rtts
            .iter()
            .min()
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    }
    fn mean(&self) -> f64 {
        if self.rtts.is_empty() {
            return 0.0;
        }
        self.rtts.iter().map(|d| d.as_secs_f64()).sum::<f64>() / self.rtts.len() as f64 * 1e6
    }
}

/// `bps-bench raw ...`.
pub fn main(args: RawArgs) -> ExitCode {
    let plan = match Plan::from_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bps-bench: {e}");
            return ExitCode::from(2);
        }
    };
    // Before anything starts: rdma runs on rdma or not at all.
    let device = if plan.kind == LinkKind::Rdma {
        match rdma_device(&plan.rdma) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("bps-bench: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    if let Some(addr) = args.peer {
        return match receiver(&plan, addr, args.peer_unix.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bps-bench raw (receiving process): {e}");
                ExitCode::from(1)
            }
        };
    }
    if args.inflight == 0 || args.rounds == 0 {
        eprintln!("bps-bench: raw: --inflight and --rounds must be at least 1");
        return ExitCode::from(2);
    }
    match sender(&plan, &args, device.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bps-bench raw: {e}");
            ExitCode::from(1)
        }
    }
}

// ------------------------------------------------------------------------------ receiver

/// Now on the system clock, in ns: the one clock both processes read alike.
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

struct RxRound {
    got: u64,
    /// When the last write so far landed ([`wall_ns`]).
    landed: u64,
    /// From `start`: (writes, verify, sender's start time, hashes of the source at each shift).
    start: Option<(u64, bool, u64, [u64; SRC_SHIFTS as usize])>,
    /// Immediate of the last write that landed in each slot.
    last: Vec<Option<u32>>,
    size: usize,
}

/// The spawned copy: receive writes (or echo messages) until told to stop.
fn receiver(plan: &Plan, peer: SocketAddr, peer_unix: Option<PathBuf>) -> Result<(), String> {
    let net = Net::bind(plan.net_config(RECEIVER)).map_err(|e| e.to_string())?;
    let mut side = Side {
        net: RegNet::new(net),
        events: Vec::new(),
        spin: plan.spin,
        last_activity: Instant::now(),
        other: SENDER,
    };
    let slots = plan.write_lanes() as usize;
    let slot_len = plan.max_size();
    let token = if plan.pingpong {
        0
    } else {
        side.net
            .alloc(slot_len * slots, |_| {})
            .map_err(|e| e.to_string())?
            .token
    };
    side.net
        .add_peer(
            SENDER,
            PeerAddr {
                tcp: peer,
                unix: peer_unix,
                host: local_host_id(),
            },
        )
        .map_err(|e| e.to_string())?;
    let mut ready = vec![TAG_READY];
    put(&mut ready, token);
    put(&mut ready, slot_len as u64);
    put(&mut ready, slots as u64);
    // Queued until the link is up.
    side.send(&ready)?;
    let mut round: Option<RxRound> = None;
    loop {
        side.pump()?;
        let events = std::mem::take(&mut side.events);
        for ev in &events {
            match ev {
                Event::Message { data, .. } if data.is_empty() => return Ok(()),
                Event::Message { data, .. } if plan.pingpong => side.send(data)?,
                Event::Message { data, .. } if data[0] == TAG_START => {
                    let f = |i| get(data, i).ok_or("short start message");
                    let (size, writes, verify) = (f(0)? as usize, f(1)?, f(2)? != 0);
                    let t_start = f(3)?;
                    let mut sums = [0u64; SRC_SHIFTS as usize];
                    for (i, s) in sums.iter_mut().enumerate() {
                        *s = f(4 + i)?;
                    }
                    if size > slot_len {
                        return Err(format!("start of size {size} above {slot_len}"));
                    }
                    let r = round.get_or_insert_with(|| RxRound {
                        got: 0,
                        landed: 0,
                        start: None,
                        last: vec![None; slots],
                        size,
                    });
                    r.start = Some((writes, verify, t_start, sums));
                    r.size = size;
                }
                Event::WriteReceived { imm, offset, .. } => {
                    let r = round.get_or_insert_with(|| RxRound {
                        got: 0,
                        landed: 0,
                        start: None,
                        last: vec![None; slots],
                        size: 0,
                    });
                    r.got += 1;
                    r.landed = wall_ns();
                    let slot = (*offset as usize / slot_len).min(slots - 1);
                    r.last[slot] = Some(*imm);
                }
                Event::Message { data, .. } => {
                    return Err(format!("unexpected message of {} bytes", data.len()))
                }
                _ => {}
            }
        }
        side.events = events;
        // A round ends when its `start` arrived and all its writes landed.
        let finished = round
            .as_ref()
            .is_some_and(|r| r.start.is_some_and(|(n, _, _, _)| r.got >= n));
        if finished {
            let r = round.take().expect("checked");
            let (_, verify, t_start, sums) = r.start.expect("checked");
            // 0 when the clock stepped back meanwhile: the sender then uses its own time.
            let one_way = r.landed.saturating_sub(t_start);
            // 0: not verified, 1: every slot matched, 2 + slot: that slot did not.
            let mut verdict = 0u64;
            if verify {
                verdict = 1;
                // Quiet period: every write of the round landed, the sender waits for `done`.
                let buf = side.net.bytes(token).ok_or("receive buffer vanished")?;
                for (slot, last) in r.last.iter().enumerate() {
                    if let Some(imm) = last {
                        let at = slot * slot_len;
                        let want = sums[(*imm as u64 % SRC_SHIFTS) as usize];
                        if checksum(&buf[at..at + r.size]) != want {
                            verdict = 2 + slot as u64;
                            break;
                        }
                    }
                }
            }
            let mut done = vec![TAG_DONE];
            put(&mut done, one_way);
            put(&mut done, verdict);
            side.send(&done)?;
        }
    }
}

// -------------------------------------------------------------------------------- sender

fn sender(
    plan: &Plan,
    args: &RawArgs,
    device: Option<&bps_transport::rdma::DeviceSummary>,
) -> Result<(), String> {
    let net = Net::bind(plan.net_config(SENDER)).map_err(|e| e.to_string())?;
    let addr = net.local_addr();
    let mut side = Side {
        net: RegNet::new(net),
        events: Vec::new(),
        spin: plan.spin,
        last_activity: Instant::now(),
        other: RECEIVER,
    };
    let me = std::env::current_exe().map_err(|e| format!("cannot find my executable: {e}"))?;
    let mut cmd = Command::new(me);
    cmd.arg("raw")
        .arg("--peer")
        .arg(addr.tcp.to_string())
        .arg("--transport")
        .arg(plan.kind.name())
        .arg("--sizes")
        .arg(
            plan.sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .arg("--lanes")
        .arg(plan.lanes.to_string())
        .arg("--ring-bytes")
        .arg(plan.ring_bytes.to_string())
        .arg("--spin-us")
        .arg(plan.spin.as_micros().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(u) = &addr.unix {
        cmd.arg("--peer-unix").arg(u);
    }
    if plan.pingpong {
        cmd.arg("--pingpong");
    }
    let mut child =
        PeerProc(Some(cmd.spawn().map_err(|e| {
            format!("cannot start the receiving process: {e}")
        })?));

    // Link up and the receiver's `ready` (its buffer token).
    let mut connected = false;
    let mut ready: Option<(u64, usize, usize)> = None;
    while !(connected && ready.is_some()) {
        if let Some(Ok(Some(st))) = child.0.as_mut().map(Child::try_wait) {
            return Err(format!("the receiving process exited early ({st})"));
        }
        side.pump()?;
        for ev in &side.events {
            match ev {
                Event::Connected { peer, kind } if *peer == RECEIVER => {
                    if *kind != plan.kind {
                        return Err(format!("link is {kind}, not {}", plan.kind));
                    }
                    connected = true;
                }
                Event::Message { data, .. } if data.first() == Some(&TAG_READY) => {
                    let f = |i| get(data, i).ok_or("short ready message");
                    ready = Some((f(0)?, f(1)? as usize, f(2)? as usize));
                }
                _ => {}
            }
        }
    }
    let link = side
        .net
        .link_kind(RECEIVER)
        .map_or("?".to_string(), |k| k.to_string());
    // Printed after the link kind: the rdma device in use.
    let on = device.map_or(String::new(), |d| format!(" ({d})"));
    let (dst_token, slot_len, _slots) = ready.expect("loop ends with it");

    let doc = if plan.pingpong {
        let iters = args.iters.unwrap_or(10_000).max(1);
        let warmup = args.warmup.unwrap_or(1000);
        let rows = pingpong(&mut side, plan, iters, warmup, args.check)?;
        println!(
            "# bps-bench raw --pingpong: {link}{on}, {iters} round trips per size ({warmup} warm-up), spin {} us",
            plan.spin.as_micros()
        );
        println!(
            "{:>10} {:>12} {:>12} {:>12} {:>12}",
            "size", "rtt(us)", "p99(us)", "min(us)", "mean(us)"
        );
        println!(
            "{:>10} {:>12} {:>12} {:>12} {:>12}",
            "(B)", "median", "", "", ""
        );
        for r in &rows {
            println!(
                "{:>10} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
                human(r.bytes),
                r.median(),
                r.pct(0.99),
                r.min(),
                r.mean()
            );
        }
        let jrows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"bytes": r.bytes, "rtt_us_median": r.median(),
                    "rtt_us_p99": r.pct(0.99), "rtt_us_min": r.min(), "rtt_us_mean": r.mean()})
            })
            .collect();
        serde_json::json!({"mode": "raw-pingpong", "iters": iters, "warmup": warmup, "rows": jrows})
    } else {
        let iters = args.iters.unwrap_or(20).max(1);
        let warmup = args.warmup.unwrap_or(1);
        let rows = throughput(&mut side, plan, args, iters, warmup, dst_token, slot_len)?;
        println!(
            "# bps-bench raw: {link}{on}, {} lane(s), {iters} writes per round, {} in flight, median of {} rounds ({warmup} warm-up), spin {} us",
            plan.write_lanes(),
            args.inflight,
            args.rounds,
            plan.spin.as_micros()
        );
        println!(
            "{:>10} {:>8} {:>12} {:>10} {:>10} {:>10} {:>7}",
            "size", "writes", "time(us)", "GB/s", "Gbit/s", "GB/s", "check"
        );
        println!(
            "{:>10} {:>8} {:>12} {:>10} {:>10} {:>10} {:>7}",
            "(B)", "/round", "median", "", "", "with ack", ""
        );
        let mut bad = false;
        for r in &rows {
            let med = ThroughputRow::median(&r.times);
            println!(
                "{:>10} {:>8} {:>12.1} {:>10.3} {:>10.3} {:>10.3} {:>7}",
                human(r.bytes),
                r.writes,
                med.as_secs_f64() * 1e6,
                r.gbs(),
                r.gbs() * 8.0,
                r.ack_gbs(),
                match r.checked {
                    None => "n/a",
                    Some(true) => "ok",
                    Some(false) => "WRONG",
                }
            );
            bad |= r.checked == Some(false);
        }
        let jrows: Vec<_> = rows
            .iter()
            .map(|r| {
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                serde_json::json!({"bytes": r.bytes, "writes": r.writes,
                    "time_us_median": us(ThroughputRow::median(&r.times)),
                    "time_us_min": us(r.times.iter().min().copied().unwrap_or_default()),
                    "time_us_max": us(r.times.iter().max().copied().unwrap_or_default()),
                    "time_us_median_with_ack": us(ThroughputRow::median(&r.ack_times)),
                    "gbs": r.gbs(), "gbits": r.gbs() * 8.0, "gbs_with_ack": r.ack_gbs(),
                    // point to point: the bus bandwidth is the link's, so --compare reads it
                    "busbw_gbs": r.gbs(), "checked": r.checked})
            })
            .collect();
        if bad {
            write_json(
                args,
                plan,
                &link,
                device,
                serde_json::json!({"rows": jrows}),
            );
            return Err("data did not land as sent (--check)".into());
        }
        serde_json::json!({"mode": "raw", "iters": iters, "warmup": warmup,
            "rounds": args.rounds, "inflight": args.inflight, "rows": jrows})
    };
    write_json(args, plan, &link, device, doc);

    // Tell the receiver to stop, and see it go.
    side.send(&[])?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Some(Ok(Some(_))) = child.0.as_mut().map(Child::try_wait) {
            break;
        }
        // PeerLost is the expected end here.
        if side.pump().is_err() {
            break;
        }
    }
    match child.finish(Duration::from_secs(5)) {
        Some(st) if !st.success() => Err(format!("the receiving process failed ({st})")),
        _ => Ok(()),
    }
}

fn write_json(
    args: &RawArgs,
    plan: &Plan,
    link: &str,
    device: Option<&bps_transport::rdma::DeviceSummary>,
    mut doc: serde_json::Value,
) {
    let Some(path) = &args.json else { return };
    if let Some(o) = doc.as_object_mut() {
        o.insert("version".into(), env!("CARGO_PKG_VERSION").into());
        o.insert("commit".into(), sysinfo::commit().into());
        o.insert("date".into(), sysinfo::now_rfc3339().into());
        o.insert("host".into(), sysinfo::hostname().into());
        o.insert("machine".into(), sysinfo::machine_json());
        o.insert("transport".into(), link.into());
        if let Some(d) = device {
            o.insert("rdma_device".into(), d.to_string().into());
        }
        o.insert("lanes".into(), plan.write_lanes().into());
        o.insert("spin_us".into(), (plan.spin.as_micros() as u64).into());
        o.insert("check".into(), args.check.into());
    }
    if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default()) {
        eprintln!("bps-bench: cannot write {}: {e}", path.display());
    }
}

/// A source pattern nothing else produces: every 8 bytes a different value, seeded per run.
fn fill_pattern(b: &mut [u8]) {
    let seed = splitmix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64)
            ^ std::process::id() as u64,
    );
    for (i, c) in b.chunks_mut(8).enumerate() {
        let v = splitmix(seed ^ i as u64).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

#[allow(clippy::too_many_arguments)]
fn throughput(
    side: &mut Side,
    plan: &Plan,
    args: &RawArgs,
    iters: u32,
    warmup: u32,
    dst_token: u64,
    slot_len: usize,
) -> Result<Vec<ThroughputRow>, String> {
    let max = plan.max_size();
    let src_len = max + ((SRC_SHIFTS - 1) * SHIFT) as usize;
    let src = side
        .net
        .alloc(src_len, fill_pattern)
        .map_err(|e| e.to_string())?;
    let lanes = plan.write_lanes();
    let inflight = args.inflight.max(1) as u64;
    let mut rows = Vec::new();
    for &size in &plan.sizes {
        let mut sums = [0u64; SRC_SHIFTS as usize];
        if args.check {
            let s = side.net.bytes(src.token).ok_or("source vanished")?;
            for (k, h) in sums.iter_mut().enumerate() {
                let at = k * SHIFT as usize;
                *h = checksum(&s[at..at + size]);
            }
            if args.test_wrong_hash {
                sums.rotate_left(1);
            }
        }
        let mut row = ThroughputRow {
            bytes: size,
            writes: iters,
            times: Vec::new(),
            ack_times: Vec::new(),
            checked: None,
        };
        let total = warmup + args.rounds + u32::from(args.check);
        for round in 0..total {
            let verify = args.check && round == total - 1;
            let mut start = vec![TAG_START];
            put(&mut start, size as u64);
            put(&mut start, iters as u64);
            put(&mut start, verify as u64);
            let t0 = Instant::now();
            put(&mut start, wall_ns());
            for h in sums {
                put(&mut start, h);
            }
            side.send(&start)?;
            let (mut issued, mut done) = (0u64, 0u64);
            let mut answer: Option<(Instant, u64, u64)> = None;
            loop {
                while issued < iters as u64 && issued - done < inflight {
                    let lane = (issued % lanes as u64) as u32;
                    let res = side.net.try_write_imm(
                        RECEIVER,
                        lane,
                        src.token,
                        (issued % SRC_SHIFTS) * SHIFT,
                        size as u64,
                        RemoteSlice {
                            token: dst_token,
                            offset: lane as u64 * slot_len as u64,
                        },
                        issued as u32,
                        issued,
                    );
                    match res {
                        Ok(()) => issued += 1,
                        Err(e) if e.is_busy() => break,
                        Err(e) => return Err(e.to_string()),
                    }
                }
                if done == iters as u64 && answer.is_some() {
                    break;
                }
                side.pump()?;
                let now = Instant::now();
                for ev in &side.events {
                    match ev {
                        Event::WriteDone { .. } => done += 1,
                        Event::Message { data, .. } if data.first() == Some(&TAG_DONE) => {
                            let f = |i| get(data, i).ok_or("short done message");
                            answer = Some((now, f(0)?, f(1)?));
                        }
                        _ => {}
                    }
                }
            }
            let (t1, one_way_ns, verdict) = answer.expect("loop ends with it");
            if round >= warmup && round < warmup + args.rounds {
                let ack = t1 - t0;
                let one_way = Duration::from_nanos(one_way_ns);
                // A clock step in between gives nonsense: fall back to the sender's own time.
                row.times.push(if one_way.is_zero() || one_way > ack {
                    ack
                } else {
                    one_way
                });
                row.ack_times.push(ack);
            }
            if verify {
                row.checked = Some(verdict == 1);
                if verdict >= 2 {
                    eprintln!(
                        "bps-bench raw: WRONG data for size {size} in the receiver's slot {} (hash differs from the source's)",
                        verdict - 2
                    );
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn pingpong(
    side: &mut Side,
    plan: &Plan,
    iters: u32,
    warmup: u32,
    check: bool,
) -> Result<Vec<PingRow>, String> {
    let mut rows = Vec::new();
    for &size in &plan.sizes {
        let mut msg = vec![0u8; size];
        fill_pattern(&mut msg);
        let mut row = PingRow {
            bytes: size,
            rtts: Vec::with_capacity(iters as usize),
        };
        for i in 0..warmup + iters {
            // A sequence number in the first bytes: a stale or foreign echo is caught.
            let seq = (i as u64).to_le_bytes();
            let n = size.min(8);
            msg[..n].copy_from_slice(&seq[..n]);
            let t0 = Instant::now();
            side.send(&msg)?;
            let mut back = None;
            while back.is_none() {
                side.pump()?;
                for ev in side.events.drain(..) {
                    if let Event::Message { data, .. } = ev {
                        back = Some(data);
                    }
                }
            }
            let rtt = t0.elapsed();
            let data = back.expect("loop ends with it");
            let ok = if check {
                data == msg
            } else {
                data.len() == size && data[..n] == msg[..n]
            };
            if !ok {
                return Err(format!(
                    "echo of size {size} round trip {i} differs from what was sent"
                ));
            }
            if i >= warmup {
                row.rtts.push(rtt);
            }
        }
        rows.push(row);
    }
    Ok(rows)
}
