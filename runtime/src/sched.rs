//! The scheduler: rendezvous, tensor placement, barriers, failure notices and shutdown.
//!
//! Every process opens one TCP connection to the scheduler, registers (role, requested rank,
//! addresses) and waits for the address book. The scheduler also places tensors (the
//! byte-balanced [`ServerAssigner`] runs here, once, so every worker gets the same answer) and
//! checks that every worker declares a tensor with the same name, size and dtype. A connection
//! that drops before its process said goodbye is a dead process: every other process is told,
//! and fails what depends on it. This is control traffic: blocking sockets, one thread per
//! connection.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bps_scheduler::{partition, ServerAssigner, TensorId};
use bps_transport::codec::{FrameHeader, FrameKind, HEADER_LEN};

use crate::config::{Config, Role};
use crate::dtype::DType;
use crate::proto::{BookEntry, Msg, Register};
use crate::{Error, Result};

/// Largest frame on a scheduler connection (address books of many processes).
const MAX_SCHED_MSG: usize = 16 << 20;

/// Write one message as a frame on a blocking stream.
pub(crate) fn write_msg(s: &mut TcpStream, m: &Msg) -> io::Result<()> {
    let body = m.encode();
    let hdr = FrameHeader {
        kind: FrameKind::Msg,
        imm: 0,
        len: body.len() as u64,
        token: 0,
        offset: 0,
        lane: 0,
    }
    .encode();
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(&hdr);
    buf.extend_from_slice(&body);
    s.write_all(&buf)
}

/// Read one message from a blocking stream.
pub(crate) fn read_msg(s: &mut TcpStream) -> io::Result<Msg> {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb)?;
    let h = FrameHeader::decode(&hb, MAX_SCHED_MSG)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if h.kind != FrameKind::Msg {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected frame kind on a scheduler connection",
        ));
    }
    let mut body = vec![0u8; h.len as usize];
    s.read_exact(&mut body)?;
    Msg::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

struct Node {
    reg: Register,
    writer: Arc<Mutex<TcpStream>>,
    /// Last time anything arrived from it (heartbeats included).
    last_seen: Instant,
    peer: Option<u32>,
    rank: Option<u32>,
    goodbye: bool,
    alive: bool,
    label: String,
}

struct TensorRec {
    /// Set once workers disagreed on the tensor: every later placement gets the same error.
    failed: Option<String>,
    name: String,
    bytes: u64,
    dtype: u8,
    servers: Vec<u32>,
    placed_by: HashSet<usize>,
    first: String,
}

struct State {
    expect_workers: u32,
    expect_servers: u32,
    nodes: HashMap<usize, Node>,
    welcomed: bool,
    first_reg: Option<(usize, Register)>,
    tensors: HashMap<u32, TensorRec>,
    assigner: Option<ServerAssigner>,
    partition_bytes: usize,
    /// The job's adaptive partitioning (chunks per server; 0 = fixed partitions).
    min_chunks: u32,
    barriers: HashMap<u64, HashSet<usize>>,
    /// Why the job failed, once it did (a lost process, a worker that aborted).
    failure: Option<String>,
    /// GPU steps waiting for the rest of their host group: (group, tensor, seq, phase) → who.
    gpu_ready: HashMap<(u32, u32, u32, u8), HashSet<usize>>,
    finished: bool,
    started: Instant,
    timeout: Duration,
    secret: Option<bps_transport::auth::Secret>,
    last_heartbeat: Instant,
    /// Connections refused at authentication.
    refused: u64,
}

impl State {
    fn send(&self, conn: usize, m: &Msg) {
        if let Some(n) = self.nodes.get(&conn) {
            if n.alive {
                let mut w = n.writer.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = write_msg(&mut w, m) {
                    tracing::debug!("scheduler: send to {} failed: {e}", n.label);
                }
            }
        }
    }

    /// The workers' BYTEPS_LOCAL_SIZE (checked equal at registration).
    fn local_size(&self) -> u32 {
        self.workers()
            .map(|(_, n)| n.reg.local_size)
            .next()
            .unwrap_or(1)
            .max(1)
    }

    /// Connections of the workers of host group `group`, in rank order.
    fn group_conns(&self, group: u32) -> Vec<usize> {
        let l = self.local_size();
        let mut v: Vec<(u32, usize)> = self
            .workers()
            .filter_map(|(c, n)| n.rank.filter(|r| r / l == group).map(|r| (r, *c)))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, c)| c).collect()
    }

    fn workers(&self) -> impl Iterator<Item = (&usize, &Node)> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.reg.role == Role::Worker)
    }

    fn check_consistent(&self, r: &Register) -> std::result::Result<(), String> {
        let Some((_, f)) = &self.first_reg else {
            return Ok(());
        };
        let mut diffs = Vec::new();
        if r.num_workers != f.num_workers {
            diffs.push(format!("workers {} vs {}", r.num_workers, f.num_workers));
        }
        if r.num_servers != f.num_servers {
            diffs.push(format!(
                "DMLC_NUM_SERVER {} vs {}",
                r.num_servers, f.num_servers
            ));
        }
        if r.role == Role::Worker {
            if let Some((_, w)) = self.workers().next() {
                if w.reg.partition_bytes != r.partition_bytes {
                    diffs.push(format!(
                        "BYTEPS_PARTITION_BYTES {} vs {}",
                        r.partition_bytes, w.reg.partition_bytes
                    ));
                }
                if w.reg.min_chunks != r.min_chunks {
                    diffs.push(format!(
                        "BPS_MIN_CHUNKS_PER_SERVER {} vs {}",
                        r.min_chunks, w.reg.min_chunks
                    ));
                }
            }
        }
        if r.lanes != f.lanes {
            diffs.push(format!("BPS_TCP_LANES {} vs {}", r.lanes, f.lanes));
        }
        if r.role == Role::Worker {
            if let Some((_, w)) = self.workers().next() {
                if w.reg.local_size != r.local_size {
                    diffs.push(format!(
                        "BYTEPS_LOCAL_SIZE {} vs {}",
                        r.local_size, w.reg.local_size
                    ));
                }
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "configuration differs from the first process to register ({}): set it alike on every process",
                diffs.join(", ")
            ))
        }
    }

    /// Everyone is here: number them and send the address book.
    fn welcome(&mut self) {
        let w = self.expect_workers;
        let mut workers: Vec<usize> = self.workers().map(|(c, _)| *c).collect();
        workers.sort();
        let mut servers: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.reg.role == Role::Server)
            .map(|(c, _)| *c)
            .collect();
        servers.sort();
        // Requested ranks first; the others fill the gaps in order of arrival.
        let mut taken: HashMap<u32, usize> = HashMap::new();
        let mut errors = Vec::new();
        for c in &workers {
            if let Some(r) = self.nodes[c].reg.rank {
                if let Some(other) = taken.insert(r, *c) {
                    errors.push(format!(
                        "rank {r} requested by both {} and {}",
                        self.nodes[&other].label, self.nodes[c].label
                    ));
                }
            }
        }
        if !errors.is_empty() {
            let reason = errors.join("; ");
            for c in workers.iter().chain(servers.iter()) {
                self.send(
                    *c,
                    &Msg::Refused {
                        reason: reason.clone(),
                    },
                );
            }
            self.finished = true;
            return;
        }
        let mut free = (0..w).filter(|r| !taken.contains_key(r));
        for c in &workers {
            let r = match self.nodes[c].reg.rank {
                Some(r) => r,
                None => free.next().expect("as many ranks as workers"),
            };
            let n = self.nodes.get_mut(c).expect("registered");
            n.rank = Some(r);
            n.peer = Some(r);
            n.label = format!("worker {r} ({})", n.reg.tcp);
        }
        for (i, c) in servers.iter().enumerate() {
            let n = self.nodes.get_mut(c).expect("registered");
            n.rank = Some(i as u32);
            n.peer = Some(w + i as u32);
            n.label = format!("server {i} ({})", n.reg.tcp);
        }
        let mut book: Vec<BookEntry> = self
            .nodes
            .values()
            .map(|n| BookEntry {
                peer: n.peer.expect("numbered"),
                role: n.reg.role,
                rank: n.rank.expect("numbered"),
                tcp: n.reg.tcp.clone(),
                unix: n.reg.unix.clone(),
                host: n.reg.host.clone(),
                hostname: n.reg.hostname.clone(),
            })
            .collect();
        book.sort_by_key(|b| b.peer);
        // The job's partition size is the workers' (servers and the scheduler adopt it).
        let first_worker = self
            .workers()
            .next()
            .map(|(_, n)| (n.reg.partition_bytes, n.reg.min_chunks));
        if let Some((p, k)) = first_worker {
            self.partition_bytes = p as usize;
            self.min_chunks = k;
        }
        for (c, n) in &self.nodes {
            self.send(
                *c,
                &Msg::Welcome {
                    rank: n.rank.expect("numbered"),
                    peer: n.peer.expect("numbered"),
                    num_workers: self.expect_workers,
                    num_servers: self.expect_servers,
                    local_size: self.local_size(),
                    partition_bytes: self.partition_bytes as u64,
                    min_chunks: self.min_chunks,
                    book: book.clone(),
                },
            );
        }
        let servers = if self.expect_servers == 0 {
            self.expect_workers
        } else {
            self.expect_servers
        };
        self.assigner = ServerAssigner::new(servers).ok();
        self.welcomed = true;
        tracing::info!(
            "scheduler: {} workers and {} servers registered",
            self.expect_workers,
            self.expect_servers
        );
    }

    fn on_msg(&mut self, conn: usize, m: Msg) {
        match m {
            Msg::Register(_) | Msg::Heartbeat => {} // handled at connect / by the reader
            Msg::Place {
                tensor,
                name,
                bytes,
                dtype,
            } => self.place(conn, tensor, name, bytes, dtype),
            Msg::Barrier { id } => {
                let set = self.barriers.entry(id).or_default();
                set.insert(conn);
                let all = set.len() as u32 >= self.expect_workers;
                if all {
                    let set = self.barriers.remove(&id).unwrap_or_default();
                    for c in set {
                        self.send(c, &Msg::BarrierDone { id });
                    }
                }
            }
            Msg::GpuId { group, id } => {
                for c in self.group_conns(group) {
                    if c != conn {
                        self.send(
                            c,
                            &Msg::GpuId {
                                group,
                                id: id.clone(),
                            },
                        );
                    }
                }
            }
            Msg::GpuReady { tensor, seq, phase } => {
                let l = self.local_size();
                let Some(group) = self.nodes.get(&conn).and_then(|n| n.rank).map(|r| r / l) else {
                    tracing::warn!("scheduler: GpuReady from a process that is not a worker");
                    return;
                };
                let set = self
                    .gpu_ready
                    .entry((group, tensor, seq, phase))
                    .or_default();
                set.insert(conn);
                if set.len() as u32 >= l {
                    self.gpu_ready.remove(&(group, tensor, seq, phase));
                    for c in self.group_conns(group) {
                        self.send(c, &Msg::GpuGo { tensor, seq, phase });
                    }
                }
            }
            Msg::Abort { reason } => {
                let (label, peer) = match self.nodes.get_mut(&conn) {
                    Some(n) => {
                        n.goodbye = true;
                        (n.label.clone(), n.peer)
                    }
                    None => return,
                };
                if self.failure.is_none() {
                    self.job_failed(conn, peer, format!("{label} failed: {reason}"));
                }
            }
            Msg::Goodbye => {
                if let Some(n) = self.nodes.get_mut(&conn) {
                    n.goodbye = true;
                }
                let all_workers_done = self.workers().count() as u32 >= self.expect_workers
                    && self.workers().all(|(_, n)| n.goodbye);
                if all_workers_done {
                    let conns: Vec<usize> = self.nodes.keys().copied().collect();
                    for c in conns {
                        self.send(c, &Msg::Terminate);
                    }
                    self.finished = true;
                }
            }
            other => {
                tracing::warn!("scheduler: unexpected message {other:?}");
            }
        }
    }

    fn place(&mut self, conn: usize, tensor: u32, name: String, bytes: u64, dtype: u8) {
        let who = self
            .nodes
            .get(&conn)
            .map(|n| n.label.clone())
            .unwrap_or_default();
        if let Some(t) = self.tensors.get_mut(&tensor) {
            if let Some(reason) = t.failed.clone() {
                t.placed_by.insert(conn);
                self.send(conn, &Msg::PlaceError { tensor, reason });
                return;
            }
            if t.name != name || t.bytes != bytes || t.dtype != dtype {
                let dt = |d: u8| DType::from_u8(d).map_or("?".to_string(), |d| d.to_string());
                let reason = format!(
                    "tensor #{tensor} is {:?} ({} bytes of {}) on {} but {:?} ({} bytes of {}) on {}: \
                     every worker must declare the same tensors, in the same order, with the same size and dtype",
                    t.name, t.bytes, dt(t.dtype), t.first, name, bytes, dt(dtype), who
                );
                t.failed = Some(reason.clone());
                t.placed_by.insert(conn);
                let to: Vec<usize> = t.placed_by.iter().copied().collect();
                for c in to {
                    self.send(
                        c,
                        &Msg::PlaceError {
                            tensor,
                            reason: reason.clone(),
                        },
                    );
                }
                return;
            }
            t.placed_by.insert(conn);
            let servers = t.servers.clone();
            self.send(conn, &Msg::Placement { tensor, servers });
            return;
        }
        let Some(dt) = DType::from_u8(dtype) else {
            self.send(
                conn,
                &Msg::PlaceError {
                    tensor,
                    reason: format!("unknown dtype code {dtype}"),
                },
            );
            return;
        };
        let servers = if self.expect_servers == 0 {
            self.expect_workers
        } else {
            self.expect_servers
        };
        let part = bps_scheduler::adaptive_partition_bytes(
            bytes as usize,
            self.partition_bytes,
            servers,
            self.min_chunks,
        );
        let chunks = match partition(bytes as usize, dt.size(), part) {
            Ok(c) => c,
            Err(e) => {
                self.send(
                    conn,
                    &Msg::PlaceError {
                        tensor,
                        reason: e.to_string(),
                    },
                );
                return;
            }
        };
        let Some(a) = self.assigner.as_mut() else {
            return;
        };
        let servers: Vec<u32> = a
            .assign_tensor(TensorId(tensor), &chunks)
            .into_iter()
            .map(|s| s.0)
            .collect();
        self.tensors.insert(
            tensor,
            TensorRec {
                failed: None,
                name,
                bytes,
                dtype,
                servers: servers.clone(),
                placed_by: HashSet::from([conn]),
                first: who,
            },
        );
        self.send(conn, &Msg::Placement { tensor, servers });
    }

    fn on_lost(&mut self, conn: usize, why: String) {
        let Some(n) = self.nodes.get_mut(&conn) else {
            return;
        };
        n.alive = false;
        if n.goodbye || self.finished {
            return;
        }
        let label = n.label.clone();
        let peer = n.peer;
        if !self.welcomed {
            tracing::warn!("scheduler: {label} left before the rendezvous completed: {why}");
            self.nodes.remove(&conn);
            return;
        }
        let reason = format!("{label} died or lost its connection to the scheduler ({why})");
        self.job_failed(conn, peer, reason);
    }

    /// Tell everyone but `conn` that the job failed; it cannot finish, so the scheduler is done
    /// once everyone left.
    fn job_failed(&mut self, conn: usize, peer: Option<u32>, reason: String) {
        tracing::warn!("scheduler: {reason}");
        let conns: Vec<usize> = self.nodes.keys().copied().collect();
        for c in conns {
            if c != conn {
                self.send(
                    c,
                    &Msg::PeerDead {
                        peer: peer.unwrap_or(u32::MAX),
                        reason: reason.clone(),
                    },
                );
            }
        }
        if self.failure.is_none() {
            self.failure = Some(reason);
        }
        self.finished = true;
    }
}

/// A scheduler running in threads of this process.
pub struct Scheduler {
    addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Scheduler {
    /// Listen on `cfg.scheduler` and serve in background threads.
    ///
    /// # Errors
    /// The port is taken, or the address cannot be bound.
    pub fn start(cfg: &Config) -> Result<Scheduler> {
        let listener = TcpListener::bind(cfg.scheduler).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                Error::Rendezvous {
                    addr: cfg.scheduler.to_string(),
                    reason: "cannot listen: address already in use (another job or scheduler holds this port; set DMLC_PS_ROOT_PORT to a free port)".into(),
                }
            } else {
                Error::Rendezvous {
                    addr: cfg.scheduler.to_string(),
                    reason: format!("cannot listen: {e}"),
                }
            }
        })?;
        let addr = listener.local_addr().map_err(|e| Error::Rendezvous {
            addr: cfg.scheduler.to_string(),
            reason: e.to_string(),
        })?;
        let shared = Arc::new((
            Mutex::new(State {
                expect_workers: cfg.num_workers,
                expect_servers: cfg.num_servers,
                nodes: HashMap::new(),
                welcomed: false,
                first_reg: None,
                tensors: HashMap::new(),
                assigner: None,
                partition_bytes: cfg.partition_bytes,
                min_chunks: cfg.min_chunks_per_server,
                barriers: HashMap::new(),
                gpu_ready: HashMap::new(),
                failure: None,
                finished: false,
                started: Instant::now(),
                timeout: cfg.timeout,
                secret: cfg.secret.clone(),
                last_heartbeat: Instant::now(),
                refused: 0,
            }),
            Condvar::new(),
        ));
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("bps-scheduler".into())
            .spawn(move || accept_loop(listener, sh))
            .map_err(|e| Error::Rendezvous {
                addr: addr.to_string(),
                reason: format!("spawn thread: {e}"),
            })?;
        tracing::info!("scheduler listening on {addr}");
        Ok(Scheduler {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections refused because they could not prove they hold the job secret.
    pub fn refused_connections(&self) -> u64 {
        self.shared
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
    }

    /// Why the job failed (a lost process, a worker that left after its job broke), if it did.
    pub fn failure(&self) -> Option<String> {
        let (m, _) = &*self.shared;
        m.lock().unwrap_or_else(|p| p.into_inner()).failure.clone()
    }

    /// Block until the job finished (every worker said goodbye, or a process died and every
    /// remaining connection closed), or `limit` passed. Returns whether it finished.
    pub fn wait(&self, limit: Option<Duration>) -> bool {
        let (m, cv) = &*self.shared;
        let start = Instant::now();
        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let all_gone = st.nodes.values().all(|n| !n.alive);
            if st.finished && (all_gone || st.nodes.is_empty()) {
                return true;
            }
            if st.finished && st.welcomed && st.nodes.values().all(|n| n.goodbye || !n.alive) {
                return true;
            }
            let step = Duration::from_millis(200);
            if let Some(l) = limit {
                if start.elapsed() >= l {
                    return st.finished;
                }
            }
            st = cv
                .wait_timeout(st, step)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Unblock the acceptor: mark finished and poke it with a connection.
        {
            let mut st = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
            st.finished = true;
            st.nodes.retain(|_, n| n.alive);
        }
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<(Mutex<State>, Condvar)>) {
    let _ = listener.set_nonblocking(true);
    let mut next_conn = 0usize;
    loop {
        {
            let mut st = shared.0.lock().unwrap_or_else(|p| p.into_inner());
            if st.finished && st.nodes.values().all(|n| !n.alive || n.goodbye) {
                return;
            }
            // Heartbeats: tell every node we are alive, and declare dead a node silent for the
            // whole timeout (a frozen process, a host whose link went down without a FIN).
            let period = st.timeout / 4;
            if st.last_heartbeat.elapsed() >= period {
                st.last_heartbeat = Instant::now();
                let conns: Vec<usize> = st
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.alive && !n.goodbye)
                    .map(|(c, _)| *c)
                    .collect();
                for c in conns {
                    st.send(c, &Msg::Heartbeat);
                }
            }
            if st.welcomed {
                let timeout = st.timeout;
                let silent: Vec<usize> = st
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.alive && !n.goodbye && n.last_seen.elapsed() > timeout)
                    .map(|(c, _)| *c)
                    .collect();
                for c in silent {
                    if let Some(n) = st.nodes.get(&c) {
                        let w = n.writer.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    }
                    st.on_lost(c, format!("silent for {timeout:?} (no heartbeat)"));
                }
                if !st.nodes.is_empty() {
                    shared.1.notify_all();
                }
            }
            // Rendezvous timeout: tell the ones that came who is missing.
            if !st.welcomed
                && !st.finished
                && !st.nodes.is_empty()
                && st.started.elapsed() > st.timeout
            {
                let have_w = st.workers().count();
                let have_s = st.nodes.len() - have_w;
                let reason = format!(
                    "only {have_w} of {} workers and {have_s} of {} servers registered within {:?} (BPS_TIMEOUT); check that every process was started with the same DMLC_PS_ROOT_URI/DMLC_PS_ROOT_PORT",
                    st.expect_workers, st.expect_servers, st.timeout
                );
                let conns: Vec<usize> = st.nodes.keys().copied().collect();
                for c in conns {
                    st.send(
                        c,
                        &Msg::Refused {
                            reason: reason.clone(),
                        },
                    );
                }
                st.finished = true;
                st.nodes.clear();
                shared.1.notify_all();
                return;
            }
        }
        match listener.accept() {
            Ok((s, peer_addr)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let conn = next_conn;
                next_conn += 1;
                let sh = shared.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("bps-sched-{conn}"))
                    .spawn(move || serve_conn(conn, s, peer_addr, sh));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("scheduler accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_conn(
    conn: usize,
    mut s: TcpStream,
    peer_addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    // A peer that stops reading must not block the scheduler's writes forever.
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let secret = shared
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .secret
        .clone();
    if let Err(why) = authenticate_node(&mut s, secret.as_ref()) {
        let mut st = shared.0.lock().unwrap_or_else(|p| p.into_inner());
        st.refused += 1;
        tracing::warn!("scheduler: refused a connection from {peer_addr}: {why}");
        let _ = write_msg(&mut s, &Msg::Refused { reason: why });
        return;
    }
    let reg = match read_msg(&mut s) {
        Ok(Msg::Register(r)) => r,
        Ok(other) => {
            tracing::warn!("scheduler: {peer_addr} sent {other:?} before registering; closed");
            return;
        }
        Err(e) => {
            tracing::debug!("scheduler: {peer_addr} did not register: {e}");
            return;
        }
    };
    let _ = s.set_read_timeout(None);
    let writer = match s.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(_) => return,
    };
    {
        let (m, cv) = &*shared;
        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
        let label = format!(
            "{} at {} (pid {} on {})",
            reg.role, reg.tcp, reg.pid, reg.hostname
        );
        let refuse = |w: &Arc<Mutex<TcpStream>>, reason: String| {
            let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
            let _ = write_msg(&mut w, &Msg::Refused { reason });
        };
        if st.welcomed || st.finished {
            refuse(
                &writer,
                format!(
                    "the job already has its {} workers and {} servers",
                    st.expect_workers, st.expect_servers
                ),
            );
            return;
        }
        if reg.role == Role::Scheduler {
            refuse(
                &writer,
                "a scheduler cannot register with a scheduler".into(),
            );
            return;
        }
        if reg.num_workers != st.expect_workers || reg.num_servers != st.expect_servers {
            refuse(
                &writer,
                format!(
                    "{label} expects {} workers and {} servers but the scheduler expects {} and {}: set DMLC_NUM_WORKER/WORLD_SIZE and DMLC_NUM_SERVER alike everywhere",
                    reg.num_workers, reg.num_servers, st.expect_workers, st.expect_servers
                ),
            );
            return;
        }
        if let Err(reason) = st.check_consistent(&reg) {
            refuse(&writer, format!("{label}: {reason}"));
            return;
        }
        let count =
            |st: &State, r: Role| st.nodes.values().filter(|n| n.reg.role == r).count() as u32;
        let full = match reg.role {
            Role::Worker => count(&st, Role::Worker) >= st.expect_workers,
            _ => count(&st, Role::Server) >= st.expect_servers,
        };
        if full {
            refuse(
                &writer,
                format!("{label}: the job already has enough {}s", reg.role),
            );
            return;
        }
        if st.first_reg.is_none() {
            st.first_reg = Some((conn, reg.clone()));
        }
        st.nodes.insert(
            conn,
            Node {
                reg: reg.clone(),
                writer: writer.clone(),
                last_seen: Instant::now(),
                peer: None,
                rank: None,
                goodbye: false,
                alive: true,
                label,
            },
        );
        if count(&st, Role::Worker) == st.expect_workers
            && count(&st, Role::Server) == st.expect_servers
        {
            st.welcome();
        }
        cv.notify_all();
    }
    loop {
        match read_msg(&mut s) {
            Ok(m) => {
                let (mx, cv) = &*shared;
                let mut st = mx.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = st.nodes.get_mut(&conn) {
                    n.last_seen = Instant::now();
                }
                st.on_msg(conn, m);
                cv.notify_all();
            }
            Err(e) => {
                let (mx, cv) = &*shared;
                let mut st = mx.lock().unwrap_or_else(|p| p.into_inner());
                let why = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "connection closed".to_string()
                } else {
                    e.to_string()
                };
                st.on_lost(conn, why);
                cv.notify_all();
                return;
            }
        }
    }
}

const LABEL_SCHEDULER: &[u8] = b"bps-scheduler-v1";
const LABEL_NODE: &[u8] = b"bps-scheduler-node-v1";

/// Scheduler side of the handshake: the node must prove it holds the job secret before its
/// registration is read.
fn authenticate_node(
    s: &mut TcpStream,
    secret: Option<&bps_transport::auth::Secret>,
) -> std::result::Result<(), String> {
    let nonce_n = match read_msg(s) {
        Ok(Msg::AuthHello { nonce }) => nonce,
        Ok(_) => return Err("it did not open with the authentication handshake".into()),
        Err(e) => return Err(format!("no handshake: {e}")),
    };
    let Some(secret) = secret else {
        if !nonce_n.is_empty() {
            return Err(
                "it authenticates but this scheduler has no BPS_JOB_SECRET: set the same secret on every process"
                    .into(),
            );
        }
        write_msg(
            s,
            &Msg::AuthChallenge {
                nonce: Vec::new(),
                proof: Vec::new(),
            },
        )
        .map_err(|e| e.to_string())?;
        return Ok(());
    };
    if nonce_n.len() != bps_transport::auth::NONCE_LEN {
        return Err("no credentials: it does not hold this job's secret (BPS_JOB_SECRET)".into());
    }
    let nonce_s = bps_transport::auth::nonce();
    let proof = secret.prove(LABEL_SCHEDULER, &[&nonce_n, &nonce_s]);
    write_msg(
        s,
        &Msg::AuthChallenge {
            nonce: nonce_s.to_vec(),
            proof: proof.to_vec(),
        },
    )
    .map_err(|e| e.to_string())?;
    match read_msg(s) {
        Ok(Msg::AuthProof { proof })
            if secret.verify(LABEL_NODE, &[&nonce_n, &nonce_s], &proof) =>
        {
            Ok(())
        }
        Ok(_) => Err("authentication failed: it does not hold this job's secret".into()),
        Err(e) => Err(format!("authentication failed: {e}")),
    }
}

/// Node side of the handshake with the scheduler.
pub(crate) fn authenticate_to_scheduler(
    s: &mut TcpStream,
    secret: Option<&bps_transport::auth::Secret>,
) -> std::result::Result<(), String> {
    let nonce_n = secret.map(|_| bps_transport::auth::nonce());
    write_msg(
        s,
        &Msg::AuthHello {
            nonce: nonce_n.map_or_else(Vec::new, |n| n.to_vec()),
        },
    )
    .map_err(|e| e.to_string())?;
    match (read_msg(s), secret, nonce_n) {
        (Ok(Msg::AuthChallenge { nonce, proof }), Some(secret), Some(nonce_n)) => {
            if !secret.verify(LABEL_SCHEDULER, &[&nonce_n, &nonce], &proof) {
                return Err(
                    "the scheduler does not hold this job's secret (BPS_JOB_SECRET differs, or it is another job's scheduler)"
                        .into(),
                );
            }
            let mine = secret.prove(LABEL_NODE, &[&nonce_n, &nonce]);
            write_msg(
                s,
                &Msg::AuthProof {
                    proof: mine.to_vec(),
                },
            )
            .map_err(|e| e.to_string())
        }
        (Ok(Msg::AuthChallenge { .. }), None, _) => Ok(()),
        (Ok(Msg::Refused { reason }), _, _) => Err(format!("refused: {reason}")),
        (Ok(other), _, _) => Err(format!("unexpected answer {other:?}")),
        (Err(e), _, _) => Err(format!(
            "the scheduler closed the connection during authentication ({e}); is BPS_JOB_SECRET the same everywhere?"
        )),
    }
}

/// Run a standalone scheduler until the job ends (`DMLC_ROLE=scheduler`).
///
/// # Errors
/// When the port cannot be bound.
pub fn run_scheduler(cfg: &Config) -> Result<()> {
    let s = Scheduler::start(cfg)?;
    s.wait(None);
    match s.failure() {
        Some(reason) => Err(Error::Peer {
            what: "job".into(),
            peer: String::new(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Connect to the scheduler, retrying until `deadline` (it may not be up yet).
pub(crate) fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            // Retrying a port nobody listens on yet can connect a socket to itself (TCP
            // simultaneous open when the kernel picks the same ephemeral port): not a scheduler.
            Ok(s) if s.local_addr().ok() == s.peer_addr().ok() => {
                last = "connected to itself (nobody listening yet)".into();
                drop(s);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Err(Error::Rendezvous {
        addr: addr.to_string(),
        reason: format!(
            "no scheduler answered before the timeout (BPS_TIMEOUT): {last}; is DMLC_PS_ROOT_URI/DMLC_PS_ROOT_PORT right and is the scheduler (or worker 0) running?"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Lookup;
    use crate::proto::Register;

    fn join(addr: SocketAddr, role: Role, rank: Option<u32>) -> TcpStream {
        let mut s = connect(addr, Instant::now() + Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        authenticate_to_scheduler(&mut s, None).unwrap();
        let reg = Register {
            role,
            rank,
            local_rank: 0,
            local_size: 1,
            num_workers: 1,
            num_servers: 1,
            partition_bytes: 4096,
            min_chunks: 64,
            lanes: 1,
            tcp: "127.0.0.1:1".into(),
            unix: String::new(),
            host: "h".into(),
            hostname: "h".into(),
            pid: 1,
        };
        write_msg(&mut s, &Msg::Register(reg)).unwrap();
        s
    }

    fn next(s: &mut TcpStream) -> Msg {
        loop {
            match read_msg(s).unwrap() {
                Msg::Heartbeat => continue,
                m => return m,
            }
        }
    }

    /// A worker that leaves because its job broke must not look like a clean end: the server
    /// hears of the failure (before any Terminate), and the scheduler reports it.
    #[test]
    fn a_worker_leaving_a_broken_job_fails_it_for_the_others() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let m: HashMap<String, String> = [
            ("DMLC_NUM_WORKER", "1"),
            ("DMLC_NUM_SERVER", "1"),
            ("DMLC_PS_ROOT_URI", "127.0.0.1"),
            ("DMLC_PS_ROOT_PORT", &port.to_string()),
            ("BPS_TIMEOUT", "10s"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let cfg = Config::from_lookup(&Lookup::map(&m)).unwrap();
        let sched = Scheduler::start(&cfg).unwrap();
        let addr = sched.addr();
        let server = std::thread::spawn(move || join(addr, Role::Server, None));
        let mut worker = join(addr, Role::Worker, Some(0));
        let mut server = server.join().unwrap();
        assert!(matches!(next(&mut worker), Msg::Welcome { .. }));
        assert!(matches!(next(&mut server), Msg::Welcome { .. }));
        write_msg(
            &mut worker,
            &Msg::Abort {
                reason: "server 0 lost".into(),
            },
        )
        .unwrap();
        match next(&mut server) {
            Msg::PeerDead { reason, .. } => {
                assert!(reason.contains("failed: server 0 lost"), "{reason}")
            }
            other => panic!("the server must hear of the failure first, got {other:?}"),
        }
        drop(worker);
        drop(server);
        assert!(sched.wait(Some(Duration::from_secs(10))));
        let f = sched.failure().expect("the scheduler reports the failure");
        assert!(f.contains("server 0 lost"), "{f}");
    }
}
