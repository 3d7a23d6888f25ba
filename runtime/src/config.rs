//! Configuration: every tunable declared once, with its environment names, default, bounds
//! and doc.
//!
//! BytePS's names (`DMLC_*`, `BYTEPS_*`) and torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) are accepted as they are, so existing launch
//! scripts work unchanged. A bad value is an error naming the variable, the value and what is
//! allowed. [`TUNABLES`] is the table `bps-bench info` prints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bps_transport::LinkKind;

use crate::Error;

/// A process's role in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs the framework; pushes and pulls.
    Worker,
    /// Sums pushes and answers pulls.
    Server,
    /// Rendezvous only.
    Scheduler,
}

impl Role {
    /// The name used in `DMLC_ROLE`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Server => "server",
            Role::Scheduler => "scheduler",
        }
    }
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            Role::Worker => 0,
            Role::Server => 1,
            Role::Scheduler => 2,
        }
    }
    pub(crate) fn from_u8(v: u8) -> Option<Role> {
        match v {
            0 => Some(Role::Worker),
            1 => Some(Role::Server),
            2 => Some(Role::Scheduler),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tunable: its names (the first is bps's own, the others accepted aliases, first match
/// wins), default and meaning.
#[derive(Debug)]
pub struct Tunable {
    /// Environment names, in order of precedence.
    pub names: &'static [&'static str],
    /// Default, as text ("" = unset).
    pub default: &'static str,
    /// What values are allowed.
    pub allowed: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// Every tunable bps reads.
pub const TUNABLES: &[Tunable] = &[
    Tunable { names: &["DMLC_ROLE"], default: "worker", allowed: "worker | server | scheduler", doc: "role of this process" },
    Tunable { names: &["BPS_NUM_WORKER", "WORLD_SIZE"], default: "", allowed: "integer >= 1", doc: "total worker processes (torchrun's WORLD_SIZE); default DMLC_NUM_WORKER x local size" },
    Tunable { names: &["DMLC_NUM_WORKER"], default: "1", allowed: "integer >= 1", doc: "worker nodes (machines), as in BytePS; workers = nodes x BYTEPS_LOCAL_SIZE" },
    Tunable { names: &["DMLC_NUM_SERVER"], default: "0", allowed: "integer >= 0", doc: "server processes; 0 = colocated (workers serve the keys)" },
    Tunable { names: &["DMLC_PS_ROOT_URI", "MASTER_ADDR"], default: "127.0.0.1", allowed: "IPv4/IPv6 address or host name", doc: "scheduler (rendezvous) address" },
    Tunable { names: &["DMLC_PS_ROOT_PORT", "BPS_SCHEDULER_PORT"], default: "", allowed: "port 1..65535", doc: "scheduler port (default: MASTER_PORT + 1 under torchrun, else 9000)" },
    Tunable { names: &["MASTER_PORT"], default: "", allowed: "port 1..65534", doc: "torchrun's store port; bps's scheduler then listens on MASTER_PORT + 1" },
    Tunable { names: &["BPS_RANK", "RANK"], default: "", allowed: "integer in 0..workers", doc: "global worker rank (torchrun's RANK); default DMLC_WORKER_ID x local size + local rank, or order of arrival" },
    Tunable { names: &["DMLC_WORKER_ID"], default: "", allowed: "integer in 0..DMLC_NUM_WORKER", doc: "worker node index (BytePS)" },
    Tunable { names: &["BYTEPS_LOCAL_RANK", "LOCAL_RANK"], default: "0", allowed: "integer in 0..local size", doc: "rank among the workers of this host" },
    Tunable { names: &["BYTEPS_LOCAL_SIZE", "LOCAL_WORLD_SIZE"], default: "1", allowed: "integer >= 1", doc: "workers on this host" },
    Tunable { names: &["BYTEPS_PARTITION_BYTES"], default: "4194304", allowed: "bytes, 4096 ..= 1 GiB", doc: "chunk size tensors are cut into (rounded down to the element size)" },
    Tunable { names: &["BPS_MIN_CHUNKS_PER_SERVER"], default: "64", allowed: "integer >= 0 (0 = fixed partitions, as BytePS)", doc: "a tensor is cut into partitions smaller than BYTEPS_PARTITION_BYTES (down to 128 KiB) until each server gets this many chunks of it" },
    Tunable { names: &["BYTEPS_SCHEDULING_CREDIT"], default: "4", allowed: "integer >= 0 (0 = flow control off)", doc: "partitions a worker may be pushing at once (BytePS semantics; a partition's credit returns when its push has left, so pulls overlap later pushes)" },
    Tunable { names: &["BPS_SERVER_CREDIT"], default: "3", allowed: "integer 0..=65536 (0 = no limit)", doc: "partitions of a tensor a worker may have at one server without their sums back; keeps the workers' pushes of a round arriving together" },
    Tunable { names: &["BPS_CREDIT_BYTES"], default: "", allowed: "bytes >= 1", doc: "bytes a worker may be pushing at once; overrides BYTEPS_SCHEDULING_CREDIT" },
    Tunable { names: &["BYTEPS_SERVER_ENGINE_THREAD"], default: "4", allowed: "integer 1..=256", doc: "summation threads per server" },
    Tunable { names: &["BPS_TIMEOUT"], default: "60s", allowed: "duration: 500ms, 30s, 2m or plain seconds", doc: "a peer silent this long fails every pending operation that needs it" },
    Tunable { names: &["BPS_TRANSPORT"], default: "auto", allowed: "auto | tcp | shm | rdma", doc: "force one backend for remote peers (auto: shm on the same host, else rdma where a device is up, else tcp)" },
    Tunable { names: &["BPS_TCP_LANES"], default: "2", allowed: "integer 1..=64", doc: "TCP connections per peer" },
    Tunable { names: &["BPS_SHM_RING_BYTES"], default: "4194304", allowed: "power of two, 4096 ..= 1 GiB", doc: "bytes of each shared-memory ring" },
    Tunable { names: &["BPS_HOST", "DMLC_NODE_HOST"], default: "", allowed: "IP address", doc: "address peers use to reach this process (default: DMLC_INTERFACE's, else the one that reaches the scheduler)" },
    Tunable { names: &["DMLC_INTERFACE"], default: "", allowed: "network interface name", doc: "interface whose IPv4 address peers use" },
    Tunable { names: &["BPS_PORT"], default: "0", allowed: "port 0..65535 (0 = any free)", doc: "data port of this process" },
    Tunable { names: &["BPS_MAX_MESSAGE_BYTES"], default: "1048576", allowed: "bytes 4096 ..= 64 MiB", doc: "largest control message accepted from a peer" },
    Tunable { names: &["BPS_EMBED_SCHEDULER"], default: "auto", allowed: "auto | 0 | 1", doc: "run the scheduler inside worker rank 0 (auto: yes under torchrun-style variables or a lone worker; no when DMLC_PS_ROOT_PORT is set, as BytePS jobs start a scheduler process)" },
    Tunable { names: &["BPS_POLL_SPIN_US"], default: "50", allowed: "microseconds 0..=100000", doc: "how long the event loop polls without sleeping after activity while it waits for answers, or after one of this process's operations completed or a round was answered (0 = always sleep)" },
    Tunable { names: &["BPS_INLINE_SUM_BYTES"], default: "65536", allowed: "bytes 0..=1 GiB", doc: "chunks up to this size are summed on the event-loop thread instead of an engine thread" },
    Tunable { names: &["BPS_RDMA_DEVICE", "DMLC_RDMA_DEVICE"], default: "", allowed: "an RDMA device name (ibv_devices)", doc: "RDMA device (default: the first with an active port)" },
    Tunable { names: &["BPS_RDMA_PORT"], default: "", allowed: "port number 1..=255", doc: "RDMA port of the device (default: the first active)" },
    Tunable { names: &["BPS_RDMA_GID_INDEX", "BYTEPS_RDMA_GID_INDEX", "DMLC_GID_INDEX"], default: "", allowed: "a GID index of the port (show_gids)", doc: "RoCE GID index (default: a RoCE v2 GID with an IPv4 address)" },
    Tunable { names: &["BPS_RDMA_SEND_DEPTH", "BYTEPS_RDMA_SEND_DEPTH"], default: "256", allowed: "1..=65536", doc: "send queue depth per queue pair" },
    Tunable { names: &["BPS_RDMA_RECV_DEPTH", "BYTEPS_RDMA_RX_DEPTH"], default: "256", allowed: "1..=65536", doc: "pre-posted receives per queue pair" },
    Tunable { names: &["BPS_RDMA_INLINE_BYTES"], default: "64", allowed: "0..=1024", doc: "largest inline send" },
    Tunable { names: &["BPS_RDMA_MAX_REGISTERED_BYTES"], default: "0", allowed: "bytes (0 = follow ulimit -l)", doc: "most memory registered with the NIC" },
    Tunable { names: &["BPS_RDMA_BUSY_POLL_US"], default: "20", allowed: "microseconds 0..=10000", doc: "how long the rdma completion poller keeps polling after the last completion before it sleeps on the completion channel" },
    Tunable { names: &["BPS_RDMA_CACHE_USER_MEMORY"], default: "0", allowed: "0 or 1", doc: "keep the NIC registration of the application's tensors between operations over rdma (1 only if tensor memory is never freed and reused while bps runs: a registration pins the old pages)" },
    Tunable { names: &["BPS_SERVER_MAX_BYTES"], default: "", allowed: "bytes >= 1 MiB", doc: "most memory a process spends on key buffers as a server (default: 3/4 of physical memory); keys beyond it are refused with an error" },
    Tunable { names: &["BPS_JOB_SECRET"], default: "", allowed: "any non-empty string (bps-launch generates one per job)", doc: "job secret: every connection proves it holds it (HMAC challenge-response) before anything else is accepted; unset = no authentication. Never printed" },
    Tunable { names: &["BPS_LOG", "RUST_LOG"], default: "warn", allowed: "tracing filter, e.g. info, bps_runtime=debug", doc: "log filter" },
];

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The named environment variable.
    Env(&'static str),
    /// The built-in default.
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Env(n) => write!(f, "env {n}"),
            Source::Default => f.write_str("default"),
        }
    }
}

type LookupFn<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Reads tunables from a variable lookup (the process environment, or a map in tests).
pub struct Lookup<'a> {
    get: LookupFn<'a>,
}

impl<'a> Lookup<'a> {
    /// The process environment.
    pub fn env() -> Lookup<'static> {
        Lookup {
            get: Box::new(|k| std::env::var(k).ok()),
        }
    }
    /// A fixed map (tests, or an explicit configuration).
    pub fn map(m: &'a HashMap<String, String>) -> Lookup<'a> {
        Lookup {
            get: Box::new(move |k| m.get(k).cloned()),
        }
    }

    fn tunable(name: &str) -> &'static Tunable {
        TUNABLES
            .iter()
            .find(|t| t.names[0] == name)
            .expect("every tunable read is declared in TUNABLES")
    }

    /// The raw value of a tunable and where it came from.
    pub fn raw(&self, name: &str) -> (Option<(String, &'static str)>, &'static Tunable) {
        let t = Self::tunable(name);
        for n in t.names {
            if let Some(v) = (self.get)(n) {
                if !v.trim().is_empty() {
                    return (Some((v.trim().to_string(), n)), t);
                }
            }
        }
        (None, t)
    }

    /// The value of a tunable (or its default) with its source.
    pub fn value(&self, name: &str) -> (String, Source) {
        match self.raw(name) {
            (Some((v, n)), _) => (v, Source::Env(n)),
            (None, t) => (t.default.to_string(), Source::Default),
        }
    }

    fn parse<T: std::str::FromStr>(
        &self,
        name: &str,
        check: impl Fn(&T) -> bool,
    ) -> Result<Option<T>, Error> {
        let (raw, t) = self.raw(name);
        let (text, var) = match raw {
            Some((v, n)) => (v, n),
            None if t.default.is_empty() => return Ok(None),
            None => (t.default.to_string(), t.names[0]),
        };
        match text.parse::<T>() {
            Ok(v) if check(&v) => Ok(Some(v)),
            _ => Err(Error::Config {
                var: var.to_string(),
                value: text,
                allowed: t.allowed.to_string(),
            }),
        }
    }
}

/// Physical memory of this machine, from /proc/meminfo.
fn physical_memory() -> Option<u64> {
    let t = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Parse "500ms", "30s", "2m" or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    if !(v.is_finite() && v > 0.0) {
        return None;
    }
    Some(Duration::from_micros((v * mult_ms * 1000.0) as u64))
}

/// The resolved configuration of a process.
#[derive(Clone, Debug)]
pub struct Config {
    /// This process's role.
    pub role: Role,
    /// Total worker processes.
    pub num_workers: u32,
    /// Server processes (0 = colocated).
    pub num_servers: u32,
    /// Scheduler address.
    pub scheduler: SocketAddr,
    /// Requested global rank (workers).
    pub rank: Option<u32>,
    /// Rank on this host.
    pub local_rank: u32,
    /// Workers on this host.
    pub local_size: u32,
    /// Partition size in bytes.
    pub partition_bytes: usize,
    /// Adaptive partitioning: chunks per server a tensor is cut into at least (0 = off).
    pub min_chunks_per_server: u32,
    /// Credit in bytes in flight (u64::MAX = off).
    pub credit_bytes: u64,
    /// Partitions a worker may have at one server without their sums back (0 = no limit).
    pub server_credit: u32,
    /// Summation threads.
    pub engine_threads: usize,
    /// Failure timeout.
    pub timeout: Duration,
    /// Forced backend.
    pub transport: Option<LinkKind>,
    /// TCP lanes per peer.
    pub tcp_lanes: u32,
    /// Shared-memory ring size.
    pub ring_bytes: usize,
    /// Advertised host address (None: found at start-up).
    pub host: Option<std::net::IpAddr>,
    /// Data port (0 = any).
    pub port: u16,
    /// Largest control message.
    pub max_msg: usize,
    /// Whether this process hosts the scheduler.
    pub embed_scheduler: bool,
    /// Busy-poll window of the event loop.
    pub poll_spin: Duration,
    /// Chunks up to this many bytes are summed inline.
    pub inline_sum_bytes: usize,
    /// The job secret (BPS_JOB_SECRET); `None`: connections are not authenticated.
    pub secret: Option<bps_transport::auth::Secret>,
    /// Most bytes of key buffers a server part may hold.
    pub server_max_bytes: u64,
    /// RDMA device choice and queue sizes.
    pub rdma: bps_transport::rdma::RdmaConfig,
    /// Keep registrations of application memory between operations when rdma links exist.
    pub rdma_cache_user_memory: bool,
}

fn resolve_host(h: &str, port: u16, var: &str) -> Result<SocketAddr, Error> {
    use std::net::ToSocketAddrs;
    (h, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::Config {
            var: var.into(),
            value: h.into(),
            allowed: "an address or a host name that resolves".into(),
        })
}

/// IPv4 address of a network interface (`DMLC_INTERFACE`).
pub fn interface_addr(name: &str) -> Option<std::net::IpAddr> {
    if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .filter(|i| i.name == name)
        .map(|i| i.ip())
        .find(|ip| ip.is_ipv4())
}

impl Config {
    /// The partition size of a tensor of `total_bytes` in this job:
    /// [`bps_scheduler::adaptive_partition_bytes`] with the job's servers (every worker serves
    /// when servers are colocated). The scheduler places chunks by the same rule.
    pub fn tensor_partition_bytes(&self, total_bytes: usize) -> usize {
        let servers = if self.num_servers == 0 {
            self.num_workers
        } else {
            self.num_servers
        };
        bps_scheduler::adaptive_partition_bytes(
            total_bytes,
            self.partition_bytes,
            servers,
            self.min_chunks_per_server,
        )
    }

    /// Read the configuration from the process environment.
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable, its value and what is allowed.
    pub fn from_env() -> Result<Config, Error> {
        Self::from_lookup(&Lookup::env())
    }

    /// Read the configuration from a lookup.
    pub fn from_lookup(l: &Lookup<'_>) -> Result<Config, Error> {
        let role = match l.value("DMLC_ROLE").0.to_ascii_lowercase().as_str() {
            "worker" => Role::Worker,
            "server" => Role::Server,
            "scheduler" => Role::Scheduler,
            other => {
                return Err(Error::Config {
                    var: "DMLC_ROLE".into(),
                    value: other.into(),
                    allowed: "worker | server | scheduler".into(),
                })
            }
        };
        let local_size: u32 = l
            .parse("BYTEPS_LOCAL_SIZE", |v: &u32| *v >= 1)?
            .unwrap_or(1);
        let local_rank: u32 = l
            .parse("BYTEPS_LOCAL_RANK", |v: &u32| *v < local_size)?
            .unwrap_or(0);
        let nodes: u32 = l.parse("DMLC_NUM_WORKER", |v: &u32| *v >= 1)?.unwrap_or(1);
        let num_workers: u32 = l
            .parse("BPS_NUM_WORKER", |v: &u32| *v >= 1)?
            .unwrap_or(nodes.saturating_mul(local_size));
        let num_servers: u32 = l.parse("DMLC_NUM_SERVER", |_: &u32| true)?.unwrap_or(0);
        let worker_id: Option<u32> = l.parse("DMLC_WORKER_ID", |v: &u32| *v < nodes.max(1))?;
        let rank: Option<u32> = l
            .parse("BPS_RANK", |v: &u32| *v < num_workers)?
            .or(worker_id.map(|w| w * local_size + local_rank));
        if let Some(r) = rank {
            if r >= num_workers {
                return Err(Error::Config {
                    var: "DMLC_WORKER_ID".into(),
                    value: worker_id.map(|w| w.to_string()).unwrap_or_default(),
                    allowed: format!(
                        "a node index giving a rank below {num_workers} workers (rank {r} = id x {local_size} + {local_rank})"
                    ),
                });
            }
        }
        let master_port: Option<u16> = l.parse("MASTER_PORT", |v: &u16| *v >= 1 && *v < 65535)?;
        let port: u16 = l
            .parse("DMLC_PS_ROOT_PORT", |v: &u16| *v >= 1)?
            .or(master_port.map(|p| p + 1))
            .unwrap_or(9000);
        let (host, host_src) = l.value("DMLC_PS_ROOT_URI");
        let host_var = match host_src {
            Source::Env(n) => n,
            Source::Default => "DMLC_PS_ROOT_URI",
        };
        let scheduler = resolve_host(&host, port, host_var)?;
        let partition_bytes: usize = l
            .parse("BYTEPS_PARTITION_BYTES", |v: &usize| {
                (4096..=1 << 30).contains(v)
            })?
            .unwrap_or(4 << 20);
        let min_chunks_per_server: u32 = l
            .parse("BPS_MIN_CHUNKS_PER_SERVER", |v: &u32| *v <= 1 << 20)?
            .unwrap_or(bps_scheduler::DEFAULT_MIN_CHUNKS_PER_SERVER);
        let credit_parts: u64 = l
            .parse("BYTEPS_SCHEDULING_CREDIT", |_: &u64| true)?
            .unwrap_or(4);
        let credit_bytes = match l.parse("BPS_CREDIT_BYTES", |v: &u64| *v >= 1)? {
            Some(b) => b,
            None => {
                bps_scheduler::SchedulingConfig::from_partition_credit(
                    partition_bytes,
                    credit_parts,
                )
                .credit_bytes
            }
        };
        let server_credit: u32 = l
            .parse("BPS_SERVER_CREDIT", |v: &u32| *v <= 1 << 16)?
            .unwrap_or(3);
        let engine_threads: usize = l
            .parse("BYTEPS_SERVER_ENGINE_THREAD", |v: &usize| {
                (1..=256).contains(v)
            })?
            .unwrap_or(4);
        let (t, t_src) = l.value("BPS_TIMEOUT");
        let timeout = parse_duration(&t).ok_or_else(|| Error::Config {
            var: match t_src {
                Source::Env(n) => n.into(),
                Source::Default => "BPS_TIMEOUT".into(),
            },
            value: t.clone(),
            allowed: "duration: 500ms, 30s, 2m or plain seconds".into(),
        })?;
        let transport = match l.value("BPS_TRANSPORT").0.to_ascii_lowercase().as_str() {
            "auto" | "" => None,
            "tcp" => Some(LinkKind::Tcp),
            "shm" => Some(LinkKind::Shm),
            "rdma" => Some(LinkKind::Rdma),
            other => {
                return Err(Error::Config {
                    var: "BPS_TRANSPORT".into(),
                    value: other.into(),
                    allowed: "auto | tcp | shm | rdma".into(),
                })
            }
        };
        let tcp_lanes: u32 = l
            .parse("BPS_TCP_LANES", |v: &u32| (1..=64).contains(v))?
            .unwrap_or(2);
        let ring_bytes: usize = l
            .parse("BPS_SHM_RING_BYTES", |v: &usize| {
                v.is_power_of_two() && (4096..=1 << 30).contains(v)
            })?
            .unwrap_or(4 << 20);
        let mut host_ip: Option<std::net::IpAddr> = l.parse("BPS_HOST", |_| true)?;
        if host_ip.is_none() {
            if let (Some((iface, var)), t) = l.raw("DMLC_INTERFACE") {
                host_ip = Some(interface_addr(&iface).ok_or_else(|| Error::Config {
                    var: var.into(),
                    value: iface.clone(),
                    allowed: format!(
                        "{} (an interface of this host with an IPv4 address)",
                        t.allowed
                    ),
                })?);
            }
        }
        let port_data: u16 = l.parse("BPS_PORT", |_| true)?.unwrap_or(0);
        let max_msg: usize = l
            .parse("BPS_MAX_MESSAGE_BYTES", |v: &usize| {
                (4096..=64 << 20).contains(v)
            })?
            .unwrap_or(1 << 20);
        // BytePS jobs (DMLC_PS_ROOT_PORT given) always start a scheduler process; torchrun
        // jobs do not, so there worker rank 0 hosts it.
        let byteps_style = l.raw("DMLC_PS_ROOT_PORT").0.is_some();
        let embed = match l.value("BPS_EMBED_SCHEDULER").0.as_str() {
            "auto" => role == Role::Worker && rank == Some(0) && !byteps_style,
            "1" | "true" | "yes" => true,
            "0" | "false" | "no" => false,
            other => {
                return Err(Error::Config {
                    var: "BPS_EMBED_SCHEDULER".into(),
                    value: other.into(),
                    allowed: "auto | 0 | 1".into(),
                })
            }
        };
        // A single worker with nobody else to talk to hosts its own scheduler.
        let embed = embed
            || (role == Role::Worker
                && num_workers == 1
                && num_servers == 0
                && l.raw("BPS_EMBED_SCHEDULER").0.is_none());
        let spin_us: u64 = l
            .parse("BPS_POLL_SPIN_US", |v: &u64| *v <= 100_000)?
            .unwrap_or(50);
        let inline_sum_bytes: usize = l
            .parse("BPS_INLINE_SUM_BYTES", |v: &usize| *v <= 1 << 30)?
            .unwrap_or(64 << 10);
        let secret = l
            .raw("BPS_JOB_SECRET")
            .0
            .and_then(|(v, _)| bps_transport::auth::Secret::new(v.into_bytes()));
        let server_max_bytes: u64 = l
            .parse("BPS_SERVER_MAX_BYTES", |v: &u64| *v >= 1 << 20)?
            .unwrap_or_else(|| physical_memory().map_or(u64::MAX, |m| m / 4 * 3));
        let mut rdma = bps_transport::rdma::RdmaConfig::default();
        if let (Some((v, _)), _) = l.raw("BPS_RDMA_DEVICE") {
            rdma.device = Some(v);
        }
        rdma.port = l.parse("BPS_RDMA_PORT", |v: &u8| *v >= 1)?;
        rdma.gid_index = l.parse("BPS_RDMA_GID_INDEX", |_: &u32| true)?;
        rdma.send_depth = l
            .parse("BPS_RDMA_SEND_DEPTH", |v: &u32| (1..=65536).contains(v))?
            .unwrap_or(rdma.send_depth);
        rdma.recv_depth = l
            .parse("BPS_RDMA_RECV_DEPTH", |v: &u32| (1..=65536).contains(v))?
            .unwrap_or(rdma.recv_depth);
        rdma.inline_bytes = l
            .parse("BPS_RDMA_INLINE_BYTES", |v: &u32| *v <= 1024)?
            .unwrap_or(rdma.inline_bytes);
        rdma.max_registered_bytes = l
            .parse("BPS_RDMA_MAX_REGISTERED_BYTES", |_: &u64| true)?
            .unwrap_or(rdma.max_registered_bytes);
        if let Some(us) = l.parse("BPS_RDMA_BUSY_POLL_US", |v: &u64| *v <= 10_000)? {
            rdma.busy_poll = Duration::from_micros(us);
        }
        let rdma_cache_user_memory = l
            .parse("BPS_RDMA_CACHE_USER_MEMORY", |v: &u8| *v <= 1)?
            .unwrap_or(0)
            == 1;
        Ok(Config {
            rdma,
            rdma_cache_user_memory,
            server_max_bytes,
            secret,
            poll_spin: Duration::from_micros(spin_us),
            inline_sum_bytes,
            role,
            num_workers,
            num_servers,
            scheduler,
            rank,
            local_rank,
            local_size,
            partition_bytes,
            min_chunks_per_server,
            credit_bytes,
            server_credit,
            engine_threads,
            timeout,
            transport,
            tcp_lanes,
            ring_bytes,
            host: host_ip,
            port: port_data,
            max_msg,
            embed_scheduler: embed,
        })
    }

    /// Every tunable with its current value and source (for `bps-bench info`).
    pub fn describe(l: &Lookup<'_>) -> Vec<(&'static Tunable, String, Source)> {
        TUNABLES
            .iter()
            .map(|t| {
                let (v, s) = l.value(t.names[0]);
                // The job secret is never shown.
                let v = if t.names[0] == "BPS_JOB_SECRET" && !v.is_empty() {
                    "(set, hidden)".to_string()
                } else {
                    v
                };
                (t, v, s)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, Error> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let c = Config::from_lookup(&Lookup::map(&m));
        c
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.role, Role::Worker);
        assert_eq!((c.num_workers, c.num_servers), (1, 0));
        assert_eq!(c.partition_bytes, 4 << 20);
        assert_eq!(c.credit_bytes, 16 << 20);
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert!(c.embed_scheduler, "a lone worker hosts its scheduler");
    }

    #[test]
    fn rdma_poller_and_registration_tunables() {
        let c = cfg(&[
            ("BPS_RDMA_BUSY_POLL_US", "50"),
            ("BPS_RDMA_CACHE_USER_MEMORY", "1"),
        ])
        .unwrap();
        assert_eq!(c.rdma.busy_poll, Duration::from_micros(50));
        assert!(c.rdma_cache_user_memory);
        assert!(!cfg(&[]).unwrap().rdma_cache_user_memory, "off by default");
        let e = cfg(&[("BPS_RDMA_BUSY_POLL_US", "20000")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("BPS_RDMA_BUSY_POLL_US"), "{e}");
        let e = cfg(&[("BPS_RDMA_CACHE_USER_MEMORY", "yes")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("BPS_RDMA_CACHE_USER_MEMORY"), "{e}");
    }

    #[test]
    fn byteps_names() {
        let c = cfg(&[
            ("DMLC_ROLE", "worker"),
            ("DMLC_NUM_WORKER", "2"),
            ("BYTEPS_LOCAL_SIZE", "4"),
            ("BYTEPS_LOCAL_RANK", "3"),
            ("DMLC_WORKER_ID", "1"),
            ("DMLC_NUM_SERVER", "2"),
            ("DMLC_PS_ROOT_URI", "127.0.0.1"),
            ("DMLC_PS_ROOT_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!(c.num_workers, 8);
        assert_eq!(c.rank, Some(7));
        assert_eq!(c.scheduler.port(), 1234);
        assert!(!c.embed_scheduler, "BytePS jobs have a scheduler process");
    }

    #[test]
    fn torchrun_names() {
        let c = cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!((c.num_workers, c.rank, c.local_size), (4, Some(0), 4));
        assert_eq!(c.scheduler.port(), 29501);
        assert!(c.embed_scheduler);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("DMLC_ROLE", "boss"),
            ("DMLC_NUM_WORKER", "zero"),
            ("DMLC_NUM_WORKER", "0"),
            ("BYTEPS_PARTITION_BYTES", "12"),
            ("BPS_TIMEOUT", "soon"),
            ("BPS_TRANSPORT", "carrier-pigeon"),
            ("BYTEPS_SERVER_ENGINE_THREAD", "0"),
            ("MASTER_PORT", "70000"),
            ("RANK", "5"),
        ] {
            let e = cfg(&[(k, v)]).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
            assert!(e.contains(v), "{e}");
        }
        let e = cfg(&[("BYTEPS_LOCAL_SIZE", "2"), ("BYTEPS_LOCAL_RANK", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("BYTEPS_LOCAL_RANK"), "{e}");
    }

    #[test]
    fn the_secret_is_read_and_never_shown() {
        let c = cfg(&[("BPS_JOB_SECRET", "hunter2")]).unwrap();
        assert!(c.secret.is_some());
        assert!(!format!("{c:?}").contains("hunter2"));
        let m: HashMap<String, String> =
            [("BPS_JOB_SECRET".to_string(), "hunter2".to_string())].into();
        let d = Config::describe(&Lookup::map(&m));
        assert!(d.iter().all(|(_, v, _)| !v.contains("hunter2")));
        assert!(cfg(&[]).unwrap().secret.is_none());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("x"), None);
    }

    #[test]
    fn every_tunable_is_described_once() {
        let m = HashMap::new();
        let d = Config::describe(&Lookup::map(&m));
        assert_eq!(d.len(), TUNABLES.len());
        let mut names: Vec<_> = TUNABLES.iter().flat_map(|t| t.names.iter()).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len(), "a name is declared twice");
    }
}
