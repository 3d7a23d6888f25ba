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
    peer: Option<u32>,
    rank: Option<u32>,
    goodbye: bool,
    alive: bool,
    label: String,
}

struct TensorRec {
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
    barriers: HashMap<u64, HashSet<usize>>,
    finished: bool,
    started: Instant,
    timeout: Duration,
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
        let first_worker = self.workers().next().map(|(_, n)| n.reg.partition_bytes);
        if let Some(p) = first_worker {
            self.partition_bytes = p as usize;
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
            Msg::Register(_) => {} // handled at connect
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
            if t.name != name || t.bytes != bytes || t.dtype != dtype {
                let dt = |d: u8| DType::from_u8(d).map_or("?".to_string(), |d| d.to_string());
                let reason = format!(
                    "tensor #{tensor} is {:?} ({} bytes of {}) on {} but {:?} ({} bytes of {}) on {}: \
                     every worker must declare the same tensors, in the same order, with the same size and dtype",
                    t.name, t.bytes, dt(t.dtype), t.first, name, bytes, dt(dtype), who
                );
                let mut to: Vec<usize> = t.placed_by.iter().copied().collect();
                to.push(conn);
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
        let chunks = match partition(bytes as usize, dt.size(), self.partition_bytes) {
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
        // A job that lost a process cannot finish: the scheduler is done once everyone left.
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
                barriers: HashMap::new(),
                finished: false,
                started: Instant::now(),
                timeout: cfg.timeout,
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

/// Run a standalone scheduler until the job ends (`DMLC_ROLE=scheduler`).
///
/// # Errors
/// When the port cannot be bound.
pub fn run_scheduler(cfg: &Config) -> Result<()> {
    let s = Scheduler::start(cfg)?;
    s.wait(None);
    Ok(())
}

/// Connect to the scheduler, retrying until `deadline` (it may not be up yet).
pub(crate) fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
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
