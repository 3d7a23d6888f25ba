//! The RDMA engine of a [`Net`](crate::Net): one RC queue pair per RDMA peer, the messages on
//! it (see the protocol in the module docs of [`crate::rdma`]), registration of regions with the
//! NIC, and the translation of completions into [`Event`]s. `Net` owns one and calls it from a
//! handful of places marked `// rdma:` in `net.rs`.
//!
//! Posting: operations accepted by `try_send` / `try_write_imm` are posted at once when the
//! link's send queue is idle, otherwise at the next `poll`, together with everything queued
//! meanwhile: one `ibv_post_send` per link and round, every [`SIGNAL_EVERY`]th request and the
//! last of each post signaled. Completions come from the [`Poller`] thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::poller::{Polled, Poller};
use super::verbs::{Completion, Context, MemoryRegion, QueuePair, WorkRequest};
use super::wire::{self, Dest, Handshake, Send};
use super::{RdmaConfig, RdmaStats};
use crate::{Error, Event, LinkKind, PeerId, RemoteSlice, Result};

/// Slots of a link's destination table (each end keeps its half): the immediate of a
/// WRITE_WITH_IMM names a slot, which a `Define` message set to (token, offset, len, caller's
/// immediate) before. Beyond this many distinct destinations, slots are reused round-robin.
pub(crate) const DEST_SLOTS: u32 = 4096;
/// At most this many unsignaled work requests in a row (selective signaling); the last request
/// of every post is signaled too, so that every operation completes without waiting for more.
pub(crate) const SIGNAL_EVERY: u32 = 32;

/// Where the RDMA side of a peer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Dialler: offer sent in lane 0's Hello, waiting for the answer.
    Offered,
    /// Acceptor: the peer was added; its Hello (with or without an offer) has not come yet.
    AwaitOffer,
    /// Acceptor: accepted, QP in RTS, waiting for the dialler's READY.
    AwaitReady,
    /// Dialler: QP in RTS, READY posted, waiting for its completion.
    ReadySent,
    /// Traffic flows over the QP.
    Up,
    /// The peer uses tcp (declined, or no offer): the engine no longer claims it.
    Tcp,
    /// The link failed or was dropped.
    Dead,
}

/// An application operation accepted by `try_send` / `try_write_imm`, not yet fully posted.
enum Op {
    Send {
        lane: u32,
        data: Vec<u8>,
        /// Bytes already posted.
        sent: usize,
        /// At least one fragment was posted (an empty message still takes one).
        started: bool,
    },
    Write {
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
        /// Key of the source's memory region in `Engine::mrs` (one reference held by this op).
        mr_key: MrKey,
        /// The destination-table slot its WRITE_WITH_IMM names, once chosen (and defined).
        slot: Option<u32>,
        /// Payload bytes posted.
        posted: u64,
    },
}

/// What a posted send-queue entry means. Completions come back in posting order (RC); one of a
/// signaled request retires it and every unsignaled request posted before it.
enum Inflight {
    /// A send buffer slot (message fragment, descriptor or control message).
    Slot {
        slot: u32,
        op_done: bool,
        ready: bool,
    },
    /// A WRITE that is not the last piece of its write.
    Chunk,
    /// The WRITE_WITH_IMM that ends a write.
    Final { wr_id: u64, mr_key: MrKey },
}

/// A region of the peer, as it announced it.
#[derive(Clone, Copy, Debug)]
enum Remote {
    Pending,
    Known { addr: u64, rkey: u32, len: u64 },
    Retired,
}

/// Registered buffers of a link: `recv` receive slots then `send` send slots of `chunk` bytes.
struct Pool {
    // Field order is drop order: the region before the memory it covers.
    mr: MemoryRegion,
    mem: Box<[u8]>,
    chunk: usize,
}

impl Pool {
    fn addr(&self, slot: u32) -> u64 {
        self.mem.as_ptr() as u64 + u64::from(slot) * self.chunk as u64
    }
}

struct Link {
    /// Names this link's CQ to the poller (0: no QP yet).
    id: u32,
    state: State,
    reason: Option<String>,
    // Field order is drop order: the QP (and with it every request the NIC might still process)
    // goes before the buffers it uses.
    qp: Option<QueuePair>,
    pool: Option<Pool>,
    free_send: Vec<u32>,
    /// Send-queue entries not taken by a posted, unretired request.
    sq_free: u32,
    seq: u64,
    inflight: VecDeque<(u64, Inflight)>,
    ctrl: VecDeque<Vec<u8>>,
    ops: VecDeque<Op>,
    outstanding: usize,
    remote: HashMap<u64, Remote>,
    rx_msg: Option<(u32, Vec<u8>)>,
    /// Sender half of the destination table: slot of each destination, destination of each slot,
    /// the next slot to reuse once all are taken.
    tx_dest: HashMap<Dest, u32>,
    tx_slots: Vec<Dest>,
    tx_hand: u32,
    /// Receiver half: what the peer defined for each slot.
    rx_dest: Vec<Option<Dest>>,
    /// Receive slots consumed, to give back to the NIC in one post.
    reposts: Vec<u32>,
}

impl Link {
    fn new(state: State) -> Link {
        Link {
            id: 0,
            state,
            reason: None,
            qp: None,
            pool: None,
            free_send: Vec::new(),
            sq_free: 0,
            seq: 0,
            inflight: VecDeque::new(),
            ctrl: VecDeque::new(),
            ops: VecDeque::new(),
            outstanding: 0,
            remote: HashMap::new(),
            rx_msg: None,
            tx_dest: HashMap::new(),
            tx_slots: Vec::new(),
            tx_hand: 0,
            rx_dest: Vec::new(),
            reposts: Vec::new(),
        }
    }

    fn claims(&self) -> bool {
        self.state != State::Tcp
    }

    /// Whether something waits to be posted (or given back to the receive queue).
    fn has_work(&self) -> bool {
        self.qp.is_some()
            && (!self.ops.is_empty() || !self.ctrl.is_empty() || !self.reposts.is_empty())
    }

    /// The destination-table slot for `d`: the one it has, or a new one (reusing the oldest
    /// when the table is full). Returns (slot, whether it must be defined first).
    fn dest_slot(&mut self, d: Dest) -> (u32, bool) {
        if let Some(&i) = self.tx_dest.get(&d) {
            return (i, false);
        }
        let i = if (self.tx_slots.len() as u32) < DEST_SLOTS {
            self.tx_slots.push(d);
            self.tx_slots.len() as u32 - 1
        } else {
            let i = self.tx_hand;
            self.tx_hand = (i + 1) % DEST_SLOTS;
            let old = std::mem::replace(&mut self.tx_slots[i as usize], d);
            self.tx_dest.remove(&old);
            i
        };
        self.tx_dest.insert(d, i);
        (i, true)
    }
}

/// An operation handed back to `Net` when a peer settles on tcp.
pub(crate) enum Replay {
    Send {
        lane: u32,
        data: Vec<u8>,
    },
    Write {
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
    },
}

/// What a local region is made of.
#[derive(Clone, Copy, Debug)]
enum Mem {
    /// Host memory at this address (registered with the NIC on first use, cached per range).
    Host(*mut u8),
    /// Device memory registered through a dma-buf at `Net::register_dmabuf` (its own memory
    /// region, never shared with another token), addressed by its iova. The CPU cannot read it.
    DmaBuf { iova: u64 },
}

struct LocalRegion {
    mem: Mem,
    len: usize,
    /// Whether this token holds a reference on `mrs[self.key(token)]`.
    mr: bool,
}

impl LocalRegion {
    /// The address the NIC and the peers use for its first byte.
    fn addr(&self) -> u64 {
        match self.mem {
            Mem::Host(p) => p as u64,
            Mem::DmaBuf { iova } => iova,
        }
    }

    /// Its entry in `Engine::mrs`: host ranges are shared by every token of the same range,
    /// a dma-buf region belongs to its token.
    fn key(&self, token: u64) -> MrKey {
        match self.mem {
            Mem::Host(p) => MrKey::Host(p as u64, self.len),
            Mem::DmaBuf { .. } => MrKey::DmaBuf(token),
        }
    }

    fn is_dmabuf(&self) -> bool {
        matches!(self.mem, Mem::DmaBuf { .. })
    }
}

/// Key of a memory region in `Engine::mrs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum MrKey {
    /// Host memory: (address, length), shared by the tokens of that range.
    Host(u64, usize),
    /// A dma-buf region: its token.
    DmaBuf(u64),
}

struct MrEntry {
    mr: MemoryRegion,
    /// Tokens and in-flight writes using it.
    refs: usize,
}

/// The RDMA side of a `Net`.
pub(crate) struct Engine {
    // Field order is drop order: the poller thread is stopped and joined first.
    /// The completion poller thread, started with the first queue pair.
    poller: Option<Poller>,
    /// The event loop's waker, for the poller.
    waker: Arc<mio::Waker>,
    ctx: Option<Context>,
    /// Why RDMA is off in this process (device probe, or configuration).
    reason: String,
    /// Whether this process asks remote peers for RDMA.
    want: bool,
    forced: bool,
    queue_depth: usize,
    max_msg: usize,
    cfg: RdmaConfig,
    links: HashMap<PeerId, Link>,
    regions: HashMap<u64, LocalRegion>,
    mrs: HashMap<MrKey, MrEntry>,
    retired: (HashSet<u64>, VecDeque<u64>),
    stats: RdmaStats,
    lost: Vec<(PeerId, String)>,
    replay: Vec<(PeerId, Vec<Replay>)>,
    events: VecDeque<Event>,
    /// Link id -> peer, for the poller's completions.
    by_id: HashMap<u32, PeerId>,
    next_id: u32,
    scratch: Vec<Polled>,
    wrs: Vec<WorkRequest>,
    peers: Vec<PeerId>,
}

// SAFETY: the raw pointers in `regions` are ranges the registrant promised (unsafe
// `Transport::register`) to keep valid; the engine moves with its `Net` and is used by one
// thread at a time. The verbs objects are Send (sideway marks them so).
unsafe impl std::marker::Send for Engine {}

const RETIRED_MAX: usize = 1 << 16;

impl Engine {
    /// Probes the device when `force` asks for RDMA or leaves the choice automatic. The
    /// completion poller thread, which wakes the event loop through `waker`, starts with the
    /// first queue pair. Never fails: without a device the engine is off (one log line says why)
    /// and every peer uses tcp.
    pub(crate) fn new(
        cfg: &RdmaConfig,
        force: Option<LinkKind>,
        queue_depth: usize,
        max_msg: usize,
        waker: Arc<mio::Waker>,
    ) -> Engine {
        let forced = force == Some(LinkKind::Rdma);
        let want = matches!(force, None | Some(LinkKind::Rdma));
        let mut e = Engine {
            poller: None,
            waker,
            ctx: None,
            reason: String::new(),
            want,
            forced,
            queue_depth: queue_depth.max(1),
            max_msg,
            cfg: cfg.clamped(),
            links: HashMap::new(),
            regions: HashMap::new(),
            mrs: HashMap::new(),
            retired: Default::default(),
            stats: RdmaStats::default(),
            lost: Vec::new(),
            replay: Vec::new(),
            events: VecDeque::new(),
            by_id: HashMap::new(),
            next_id: 1,
            scratch: Vec::new(),
            wrs: Vec::new(),
            peers: Vec::new(),
        };
        if !want {
            e.reason = format!(
                "this process forces {}",
                force.map_or("tcp", LinkKind::name)
            );
            return e;
        }
        match Context::open(&e.cfg) {
            Ok(ctx) => {
                tracing::info!("rdma: using {}", ctx.summary());
                e.ctx = Some(ctx);
            }
            Err(err) => {
                e.reason = match err {
                    Error::Unsupported { reason, .. } => reason,
                    other => other.to_string(),
                };
            }
        }
        if e.ctx.is_none() {
            if forced {
                tracing::warn!("rdma: {}; BPS_TRANSPORT=rdma falls back to tcp", e.reason);
            } else {
                tracing::info!("rdma: {}; remote peers use tcp", e.reason);
            }
        }
        e
    }

    fn active(&self) -> bool {
        self.ctx.is_some() && self.want
    }

    /// Counters.
    pub(crate) fn stats(&self) -> RdmaStats {
        let mut s = self.stats;
        s.registered_bytes = self.ctx.as_ref().map_or(0, Context::registered_bytes);
        if let Some(p) = &self.poller {
            let c = p.counters();
            s.completions = c.completions.load(Ordering::Relaxed);
            s.poller_wakeups = c.wakeups.load(Ordering::Relaxed);
            s.poller_sleeps = c.sleeps.load(Ordering::Relaxed);
        }
        s
    }

    /// A remote (non-shm) peer was added: RDMA will be offered (dialler) or expected (acceptor).
    pub(crate) fn add_peer(&mut self, peer: PeerId, dialler: bool) {
        if !self.active() || self.links.contains_key(&peer) {
            return;
        }
        let state = if dialler {
            State::Offered
        } else {
            State::AwaitOffer
        };
        self.links.insert(peer, Link::new(state));
    }

    /// Whether the engine carries (or is negotiating) this peer's traffic.
    pub(crate) fn claims(&self, peer: PeerId) -> bool {
        self.links.get(&peer).is_some_and(Link::claims)
    }

    /// Whether the peer's traffic flows over its QP.
    pub(crate) fn is_up(&self, peer: PeerId) -> bool {
        self.links.get(&peer).is_some_and(|l| l.state == State::Up)
    }

    /// The offer for lane 0's Hello to `peer` (creates the QP on first use). `None`: no RDMA for
    /// this peer (the engine then no longer claims it).
    pub(crate) fn offer(&mut self, peer: PeerId) -> Option<String> {
        let state = self.links.get(&peer)?.state;
        if state != State::Offered {
            return None;
        }
        if let Err(e) = self.ensure_qp(peer) {
            tracing::warn!("rdma: cannot set up a queue pair for peer {peer}: {e}; using tcp");
            self.settle_tcp(peer);
            return None;
        }
        let ep = self.links[&peer].qp.as_ref()?.endpoint();
        Some(Handshake::Offer(ep).encode())
    }

    /// Whether lane 0 of `peer` waits for the acceptor's answer to our offer.
    pub(crate) fn awaits_reply(&self, peer: PeerId) -> bool {
        self.links
            .get(&peer)
            .is_some_and(|l| l.state == State::Offered)
    }

    /// The acceptor's answer arrived (dialler side).
    pub(crate) fn on_reply(
        &mut self,
        peer: PeerId,
        reply: &str,
    ) -> std::result::Result<(), String> {
        match Handshake::parse(reply)? {
            Handshake::Decline(why) => {
                tracing::warn!("rdma: peer {peer} declined RDMA ({why}); using tcp");
                self.settle_tcp(peer);
                Ok(())
            }
            Handshake::Accept(ep) => {
                let link = self.links.get_mut(&peer).ok_or("no RDMA link")?;
                let qp = link.qp.as_mut().ok_or("no queue pair")?;
                qp.connect(&ep).map_err(|e| e.to_string())?;
                link.state = State::ReadySent;
                link.ctrl
                    .push_back(wire::header(wire::Kind::Ready, 0, 0).to_vec());
                self.pump(peer);
                Ok(())
            }
            Handshake::Offer(_) => Err("an RDMA offer from the acceptor".into()),
        }
    }

    /// The dialler's lane 0 was attached (acceptor side) with `offer` from its Hello. Returns the
    /// answer to send back, if the dialler made an offer.
    pub(crate) fn on_attach(&mut self, peer: PeerId, offer: Option<&str>) -> Option<String> {
        let offer = offer.filter(|o| Handshake::is_handshake(o));
        let Some(offer) = offer else {
            // An ordinary tcp dialler.
            if self.links.contains_key(&peer) {
                self.settle_tcp(peer);
            } else if self.active() {
                self.links.insert(peer, Link::new(State::Tcp));
            }
            return None;
        };
        if !self.active() {
            return Some(Handshake::Decline(self.reason.clone()).encode());
        }
        let ep = match Handshake::parse(offer) {
            Ok(Handshake::Offer(ep)) => ep,
            Ok(_) => return Some(Handshake::Decline("expected an offer".into()).encode()),
            Err(e) => return Some(Handshake::Decline(e).encode()),
        };
        self.links
            .entry(peer)
            .or_insert_with(|| Link::new(State::AwaitOffer));
        let accepted = self.ensure_qp(peer).and_then(|()| {
            let link = self.links.get_mut(&peer).expect("inserted above");
            let qp = link.qp.as_mut().expect("ensure_qp made it");
            qp.connect(&ep)?;
            Ok(qp.endpoint())
        });
        match accepted {
            Ok(mine) => {
                self.links.get_mut(&peer).expect("exists").state = State::AwaitReady;
                Some(Handshake::Accept(mine).encode())
            }
            Err(e) => {
                let why = format!("acceptor could not connect a queue pair: {e}");
                tracing::warn!("rdma: peer {peer}: {why}; using tcp");
                self.settle_tcp(peer);
                Some(Handshake::Decline(why).encode())
            }
        }
    }

    /// The peer keeps tcp: drop its QP and hand its queued operations back to `Net`.
    fn settle_tcp(&mut self, peer: PeerId) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.state = State::Tcp;
        if link.qp.take().is_some() {
            self.by_id.remove(&link.id);
            if let Some(p) = &self.poller {
                p.unwatch(link.id);
            }
        }
        link.pool = None;
        link.inflight.clear();
        link.ctrl.clear();
        link.reposts.clear();
        let ops: Vec<Op> = link.ops.drain(..).collect();
        link.outstanding = 0;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Send { lane, data, .. } => out.push(Replay::Send { lane, data }),
                Op::Write {
                    lane,
                    src,
                    src_offset,
                    len,
                    dst,
                    imm,
                    wr_id,
                    mr_key,
                    ..
                } => {
                    self.release_mr(mr_key);
                    out.push(Replay::Write {
                        lane,
                        src,
                        src_offset,
                        len,
                        dst,
                        imm,
                        wr_id,
                    });
                }
            }
        }
        if !out.is_empty() {
            self.replay.push((peer, out));
        }
    }

    /// Operations to re-post over tcp (peers that settled on tcp).
    pub(crate) fn take_replay(&mut self) -> Vec<(PeerId, Vec<Replay>)> {
        std::mem::take(&mut self.replay)
    }

    /// Peers whose RDMA link failed, with the reason: `Net` drops them.
    pub(crate) fn take_lost(&mut self) -> Vec<(PeerId, String)> {
        std::mem::take(&mut self.lost)
    }

    /// `Net` dropped the peer (tcp link lost, protocol error, `disconnect`): destroy its QP;
    /// queued operations are discarded (as on tcp).
    pub(crate) fn lose(&mut self, peer: PeerId, reason: &str) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.state == State::Tcp {
            return;
        }
        link.state = State::Dead;
        link.reason.get_or_insert_with(|| reason.to_string());
        if link.qp.take().is_some() {
            self.by_id.remove(&link.id);
            if let Some(p) = &self.poller {
                p.unwatch(link.id);
            }
        }
        link.pool = None;
        link.reposts.clear();
        let mut keys = Vec::new();
        for (_, f) in link.inflight.drain(..) {
            if let Inflight::Final { mr_key, .. } = f {
                keys.push(mr_key);
            }
        }
        for op in link.ops.drain(..) {
            if let Op::Write { mr_key, .. } = op {
                keys.push(mr_key);
            }
        }
        link.ctrl.clear();
        link.outstanding = 0;
        for k in keys {
            self.release_mr(k);
        }
    }

    fn fail(&mut self, peer: PeerId, reason: String) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if matches!(link.state, State::Dead | State::Tcp) {
            return;
        }
        tracing::debug!(%peer, %reason, "rdma link failed");
        self.lost.push((peer, reason.clone()));
        self.lose(peer, &reason);
    }

    fn ensure_qp(&mut self, peer: PeerId) -> Result<()> {
        let ctx = self.ctx.clone().ok_or_else(|| Error::Unsupported {
            feature: "rdma",
            reason: self.reason.clone(),
        })?;
        let cfg = ctx.config().clone();
        match self.links.get(&peer) {
            None => return Err(Error::UnknownPeer { peer }),
            Some(l) if l.qp.is_some() => return Ok(()),
            Some(_) => {}
        }
        let chunk = cfg.msg_chunk as usize;
        let (recv, send) = (cfg.recv_depth, cfg.send_depth);
        let mem = vec![0u8; chunk * (recv + send) as usize].into_boxed_slice();
        // SAFETY: `mem` lives in the Pool next to the region and is dropped after it (field
        // order); only the NIC writes the receive slots while posted, and send slots are only
        // written while not posted.
        let mr = unsafe { ctx.register(mem.as_ptr() as *mut u8, mem.len()) }?;
        if self.poller.is_none() {
            let p = Poller::start(ctx.channel(), self.waker.clone(), cfg.busy_poll)
                .map_err(|e| Error::io("rdma: start the completion poller thread", e))?;
            self.poller = Some(p);
        }
        let link = self
            .links
            .get_mut(&peer)
            .ok_or(Error::UnknownPeer { peer })?;
        let mut qp = ctx.create_qp(send, recv)?;
        let pool = Pool { mr, mem, chunk };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        if let Some(p) = &self.poller {
            p.watch(id, qp.cq());
        }
        self.by_id.insert(id, peer);
        link.id = id;
        let bufs: Vec<(u64, u32, u64, u32)> = (0..recv)
            .map(|s| (u64::from(s), pool.mr.lkey(), pool.addr(s), chunk as u32))
            .collect();
        // SAFETY: every receive slot is inside the pool's region, reserved for the NIC until its
        // completion, and the pool outlives the QP (Link field order).
        unsafe { qp.post_recv(&bufs) }?;
        link.free_send = (recv..recv + send).rev().collect();
        link.sq_free = send;
        link.qp = Some(qp);
        link.pool = Some(pool);
        self.stats.queue_pairs += 1;
        Ok(())
    }

    // -------------------------------------------------------------------------- registration

    /// A region was registered with the `Net`. With `BPS_TRANSPORT=rdma` it is registered with
    /// the NIC at once (so that errors show here); otherwise on its first RDMA use.
    pub(crate) fn register(&mut self, token: u64, ptr: *mut u8, len: usize) -> Result<()> {
        self.regions.insert(
            token,
            LocalRegion {
                mem: Mem::Host(ptr),
                len,
                mr: false,
            },
        );
        if self.forced && self.active() {
            if let Err(e) = self.ensure_mr(token) {
                self.regions.remove(&token);
                return Err(e);
            }
        }
        Ok(())
    }

    /// A region was deregistered: its NIC registration is dropped once no token and no write in
    /// flight uses it.
    pub(crate) fn deregister(&mut self, token: u64) {
        if let Some(r) = self.regions.remove(&token) {
            if r.mr {
                self.release_mr(r.key(token));
            }
        }
        if self.retired.0.insert(token) {
            self.retired.1.push_back(token);
            if self.retired.1.len() > RETIRED_MAX {
                if let Some(old) = self.retired.1.pop_front() {
                    self.retired.0.remove(&old);
                }
            }
        }
    }

    /// Registers `len` bytes at `offset` of the dma-buf `fd` (device memory) under `token`, with
    /// the NIC at once (so that the caller learns here whether the device takes dma-bufs). The
    /// region is a source and a destination of writes over rdma links only
    /// ([`try_write_dmabuf`](Self::try_write_dmabuf)); peers address it by `iova`.
    ///
    /// # Safety
    /// As [`Context::register_dmabuf`].
    pub(crate) unsafe fn register_dmabuf(
        &mut self,
        token: u64,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
    ) -> Result<()> {
        let ctx = match (&self.ctx, self.want) {
            (Some(ctx), true) => ctx,
            _ => {
                return Err(Error::Unsupported {
                    feature: "rdma",
                    reason: format!(
                        "device memory (a dma-buf) can only be registered with an RDMA device, \
                         and this process uses none: {}",
                        self.reason
                    ),
                })
            }
        };
        // SAFETY: forwarded contract.
        let mr = unsafe { ctx.register_dmabuf(fd, offset, len, iova) }?;
        self.stats.mr_registrations += 1;
        self.mrs
            .insert(MrKey::DmaBuf(token), MrEntry { mr, refs: 1 });
        self.regions.insert(
            token,
            LocalRegion {
                mem: Mem::DmaBuf { iova },
                len,
                mr: true,
            },
        );
        Ok(())
    }

    /// Whether `token` is a region of device memory registered through a dma-buf.
    pub(crate) fn is_dmabuf(&self, token: u64) -> bool {
        self.regions.get(&token).is_some_and(LocalRegion::is_dmabuf)
    }

    /// `try_write_imm` from a source that `Net` does not know: `None` unless `src` is a dma-buf
    /// region; then the write goes over the peer's rdma link, or is refused in words where the
    /// peer is not on one (`link`: how `Net` reaches the peer, `None` if it does not).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_write_dmabuf(
        &mut self,
        peer: PeerId,
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
        link: Option<LinkKind>,
    ) -> Option<Result<()>> {
        let r = self.regions.get(&src).filter(|r| r.is_dmabuf())?;
        if src_offset.checked_add(len).is_none_or(|e| e > r.len as u64) {
            return Some(Err(Error::OutOfBounds {
                token: src,
                offset: src_offset,
                len,
                region_len: r.len as u64,
            }));
        }
        if !self.claims(peer) {
            let link = link.map_or("not connected", LinkKind::name);
            return Some(Err(super::gpudirect::dmabuf_write_refused(
                src, true, peer, link,
            )));
        }
        self.try_write_imm(peer, lane, src, src_offset, len, dst, imm, wr_id)
    }

    /// Registers the token's range with the NIC (once per distinct range); returns its key.
    fn ensure_mr(&mut self, token: u64) -> Result<MrKey> {
        let r = self
            .regions
            .get(&token)
            .ok_or(Error::UnknownToken { token })?;
        let key = r.key(token);
        // A dma-buf region holds its memory region from registration on (`r.mr` is set).
        let Mem::Host(ptr) = r.mem else {
            return Ok(key);
        };
        if r.mr || r.len == 0 {
            // Zero-length regions need no registration (a zero-length request names no memory).
            return Ok(key);
        }
        if let Some(e) = self.mrs.get_mut(&key) {
            e.refs += 1;
        } else {
            let ctx = self.ctx.as_ref().ok_or_else(|| Error::Unsupported {
                feature: "rdma",
                reason: self.reason.clone(),
            })?;
            // SAFETY: the range was registered with the Net (unsafe `Transport::register`): it
            // stays valid until deregistered, and the MR is dropped no earlier than that, or
            // later only while writes from it are in flight, which the caller must also wait for.
            let mr = unsafe { ctx.register(ptr, r.len) }?;
            self.stats.mr_registrations += 1;
            self.mrs.insert(key, MrEntry { mr, refs: 1 });
        }
        self.regions.get_mut(&token).expect("checked").mr = true;
        Ok(key)
    }

    fn retain_mr(&mut self, key: MrKey) {
        if let Some(e) = self.mrs.get_mut(&key) {
            e.refs += 1;
        }
    }

    fn release_mr(&mut self, key: MrKey) {
        if let Some(e) = self.mrs.get_mut(&key) {
            e.refs -= 1;
            if e.refs == 0 {
                self.mrs.remove(&key);
                self.stats.mr_deregistrations += 1;
            }
        }
    }

    // ------------------------------------------------------------------------------- posting

    fn admit(&mut self, peer: PeerId) -> Option<Result<()>> {
        let link = self.links.get(&peer)?;
        match link.state {
            State::Tcp => None,
            State::Dead => Some(Err(Error::PeerLost {
                peer,
                reason: link
                    .reason
                    .clone()
                    .unwrap_or_else(|| "RDMA link failed".into()),
            })),
            _ if link.outstanding >= self.queue_depth => Some(Err(Error::Busy { peer })),
            _ => Some(Ok(())),
        }
    }

    /// `try_send` for a peer the engine claims; `None` when it does not.
    pub(crate) fn try_send(&mut self, peer: PeerId, lane: u32, msg: &[u8]) -> Option<Result<()>> {
        match self.admit(peer)? {
            Ok(()) => {}
            Err(e) => return Some(Err(e)),
        }
        let link = self.links.get_mut(&peer).expect("admitted");
        link.ops.push_back(Op::Send {
            lane,
            data: msg.to_vec(),
            sent: 0,
            started: false,
        });
        link.outstanding += 1;
        self.stats.messages_posted += 1;
        self.post_if_idle(peer);
        Some(Ok(()))
    }

    /// `try_write_imm` for a peer the engine claims (the source range was checked by `Net`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_write_imm(
        &mut self,
        peer: PeerId,
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
    ) -> Option<Result<()>> {
        match self.admit(peer)? {
            Ok(()) => {}
            Err(e) => return Some(Err(e)),
        }
        let mr_key = match self.ensure_mr(src) {
            Ok(k) => k,
            Err(e) => return Some(Err(e)),
        };
        self.retain_mr(mr_key);
        let link = self.links.get_mut(&peer).expect("admitted");
        link.ops.push_back(Op::Write {
            lane,
            src,
            src_offset,
            len,
            dst,
            imm,
            wr_id,
            mr_key,
            slot: None,
            posted: 0,
        });
        link.outstanding += 1;
        self.post_if_idle(peer);
        Some(Ok(()))
    }

    /// Posts at once when nothing of the link is in flight (latency); otherwise the operation
    /// waits for the next `poll`, which posts everything queued meanwhile in one go.
    fn post_if_idle(&mut self, peer: PeerId) {
        if self.links.get(&peer).is_some_and(|l| l.inflight.is_empty()) {
            self.pump(peer);
        }
    }

    // ---------------------------------------------------------------------------- completions

    /// Takes the completions the poller handed over, turns them into events (appended to
    /// `out`), gives receive buffers back and posts what waits.
    pub(crate) fn poll(&mut self, out: &mut VecDeque<Event>) {
        self.poll_internal();
        out.extend(self.events.drain(..));
    }

    fn poll_internal(&mut self) {
        let Some(poller) = &self.poller else {
            return;
        };
        poller.unpark();
        let mut got = std::mem::take(&mut self.scratch);
        got.clear();
        poller.drain(&mut got);
        for p in got.drain(..) {
            self.on_polled(p);
        }
        self.scratch = got;
        let mut peers = std::mem::take(&mut self.peers);
        peers.clear();
        peers.extend(
            self.links
                .iter()
                .filter(|(_, l)| l.has_work())
                .map(|(p, _)| *p),
        );
        for &peer in &peers {
            self.repost(peer);
            self.pump(peer);
        }
        self.peers = peers;
    }

    fn on_polled(&mut self, p: Polled) {
        let Some(&peer) = self.by_id.get(&p.link) else {
            return; // a link that is gone
        };
        if p.failed {
            self.fail(
                peer,
                format!("RDMA link to peer {peer}: its completion queue failed"),
            );
            return;
        }
        self.on_completion(peer, p.c);
    }

    /// Gives the consumed receive buffers of `peer` back to the NIC, in one post.
    fn repost(&mut self, peer: PeerId) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.reposts.is_empty() {
            return;
        }
        let (Some(qp), Some(pool)) = (link.qp.as_mut(), link.pool.as_ref()) else {
            link.reposts.clear();
            return;
        };
        let bufs: Vec<(u64, u32, u64, u32)> = link
            .reposts
            .drain(..)
            .map(|slot| {
                (
                    u64::from(slot),
                    pool.mr.lkey(),
                    pool.addr(slot),
                    pool.chunk as u32,
                )
            })
            .collect();
        // SAFETY: every slot is inside the pool's registered region, and the engine does not
        // touch it until its next completion; the pool outlives the QP (Link field order).
        if let Err(e) = unsafe { qp.post_recv(&bufs) } {
            self.fail(peer, format!("RDMA link to peer {peer}: {e}"));
        }
    }

    fn on_completion(&mut self, peer: PeerId, c: Completion) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.qp.is_none() || matches!(link.state, State::Dead | State::Tcp) {
            return;
        }
        if c.is_recv() {
            if !c.is_ok() {
                self.fail(
                    peer,
                    format!("RDMA receive from peer {peer} failed: {}", c.status_str()),
                );
                return;
            }
            let slot = c.wr_id as u32;
            self.on_recv(peer, slot, &c);
            // The buffer goes back to the NIC after this batch, unless the link died meanwhile.
            if let Some(link) = self.links.get_mut(&peer) {
                if link.qp.is_some() {
                    link.reposts.push(slot);
                }
            }
            return;
        }
        if !c.is_ok() {
            let what = match link.inflight.iter().find(|(s, _)| *s == c.wr_id) {
                Some((_, Inflight::Slot { ready: true, .. })) => "the first message (READY)",
                Some((_, Inflight::Slot { .. })) => "a SEND",
                Some((_, Inflight::Chunk | Inflight::Final { .. })) => "an RDMA WRITE",
                None => "a request",
            };
            self.fail(
                peer,
                format!("{what} to peer {peer} failed: {}", c.status_str()),
            );
            return;
        }
        // A signaled request completed: it and every unsignaled one before it are done.
        let mut retired = 0u32;
        let mut release = Vec::new();
        while link.inflight.front().is_some_and(|(s, _)| *s <= c.wr_id) {
            let (_, what) = link.inflight.pop_front().expect("checked");
            retired += 1;
            match what {
                Inflight::Slot {
                    slot,
                    op_done,
                    ready,
                } => {
                    link.free_send.push(slot);
                    if op_done {
                        link.outstanding -= 1;
                    }
                    if ready && link.state == State::ReadySent {
                        link.state = State::Up;
                        self.events.push_back(Event::Connected {
                            peer,
                            kind: LinkKind::Rdma,
                        });
                    }
                }
                Inflight::Chunk => {}
                Inflight::Final { wr_id, mr_key } => {
                    link.outstanding -= 1;
                    self.events.push_back(Event::WriteDone { peer, wr_id });
                    release.push(mr_key);
                }
            }
        }
        link.sq_free += retired;
        for k in release {
            self.release_mr(k);
        }
        if retired == 0 {
            self.fail(
                peer,
                format!("RDMA link to peer {peer}: a completion without a request"),
            );
        }
    }

    fn protocol_error(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(peer = ?peer, "closing connection: {reason}");
        let err = Error::Protocol { peer, reason };
        self.fail(peer, err.to_string());
    }

    fn on_recv(&mut self, peer: PeerId, slot: u32, c: &Completion) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if c.opcode == Completion::RECV_RDMA_WITH_IMM {
            let d = c
                .imm
                .and_then(|i| link.rx_dest.get(i as usize).copied().flatten());
            let Some(d) = d else {
                self.protocol_error(
                    peer,
                    format!(
                        "RDMA write with immediate {:?} names no destination the peer defined",
                        c.imm
                    ),
                );
                return;
            };
            // A region deregistered meanwhile: the write is discarded.
            if self.regions.contains_key(&d.token) {
                self.events.push_back(Event::WriteReceived {
                    peer,
                    imm: d.imm,
                    token: d.token,
                    offset: d.offset,
                    len: d.len,
                });
            }
            return;
        }
        let Some(pool) = link.pool.as_ref() else {
            return;
        };
        let off = slot as usize * pool.chunk;
        let n = (c.byte_len as usize).min(pool.chunk);
        let bytes = &pool.mem[off..off + n];
        let msg = match wire::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_error(peer, e);
                return;
            }
        };
        match msg {
            Send::Msg { lane, last, data } => {
                let max = self.max_msg;
                let (l, buf) = link.rx_msg.get_or_insert_with(|| (lane, Vec::new()));
                if buf.len() + data.len() > max {
                    self.protocol_error(
                        peer,
                        format!("message of more than {max} bytes (the control-message limit)"),
                    );
                    return;
                }
                buf.extend_from_slice(data);
                let lane = *l;
                if last {
                    let (_, data) = link.rx_msg.take().expect("just filled");
                    self.events.push_back(Event::Message { peer, lane, data });
                }
            }
            Send::Define {
                index,
                imm,
                token,
                offset,
                len,
                no_data,
            } => {
                if index >= DEST_SLOTS {
                    self.protocol_error(
                        peer,
                        format!("RDMA destination slot {index} (the table has {DEST_SLOTS})"),
                    );
                    return;
                }
                let d = Dest {
                    token,
                    offset,
                    len,
                    imm,
                };
                let keep = match self.regions.get(&token) {
                    Some(r) => {
                        if offset.checked_add(len).is_none_or(|e| e > r.len as u64) || no_data {
                            let e = Error::OutOfBounds {
                                token,
                                offset,
                                len,
                                region_len: r.len as u64,
                            };
                            self.protocol_error(peer, e.to_string());
                            return;
                        }
                        true
                    }
                    // Deregistered: the write that follows is discarded.
                    None if self.retired.0.contains(&token) => !no_data,
                    None => {
                        self.protocol_error(
                            peer,
                            format!("write to unknown memory token {token:#x}"),
                        );
                        return;
                    }
                };
                if keep {
                    let i = index as usize;
                    if link.rx_dest.len() <= i {
                        link.rx_dest.resize(i + 1, None);
                    }
                    link.rx_dest[i] = Some(d);
                }
            }
            Send::Resolve { token } => {
                if self.regions.contains_key(&token) {
                    match self.ensure_mr(token) {
                        Ok(key) => {
                            let r = &self.regions[&token];
                            let rkey = self.mrs.get(&key).map_or(0, |e| e.mr.rkey());
                            let a = wire::encode_announce(
                                token,
                                r.addr(),
                                r.len as u64,
                                rkey,
                                wire::ANN_OK,
                            );
                            if let Some(link) = self.links.get_mut(&peer) {
                                link.ctrl.push_back(a.to_vec());
                            }
                        }
                        Err(e) => self.fail(
                            peer,
                            format!(
                                "cannot register region {token:#x} for RDMA writes from peer \
                                 {peer}: {e}"
                            ),
                        ),
                    }
                } else if self.retired.0.contains(&token) {
                    let a = wire::encode_announce(token, 0, 0, 0, wire::ANN_RETIRED);
                    link.ctrl.push_back(a.to_vec());
                } else {
                    self.protocol_error(peer, format!("write to unknown memory token {token:#x}"));
                }
            }
            Send::Announce {
                token,
                addr,
                len,
                rkey,
                status,
            } => {
                let r = if status == wire::ANN_OK {
                    Remote::Known { addr, rkey, len }
                } else {
                    Remote::Retired
                };
                link.remote.insert(token, r);
            }
            Send::Ready => {
                if link.state == State::AwaitReady {
                    link.state = State::Up;
                    self.events.push_back(Event::Connected {
                        peer,
                        kind: LinkKind::Rdma,
                    });
                } else {
                    self.protocol_error(peer, "unexpected READY on an RDMA link".into());
                }
            }
        }
    }

    /// Before `Net::poll` sleeps: returns false when there is something to report (do not
    /// sleep); otherwise the poller thread wakes the loop at the next completion.
    pub(crate) fn prepare_sleep(&mut self) -> bool {
        if !self.events.is_empty() || !self.lost.is_empty() || !self.replay.is_empty() {
            return false;
        }
        match &self.poller {
            Some(p) => p.park(),
            None => true,
        }
    }

    /// Posts what the link's resources allow, in one `ibv_post_send`: control messages first,
    /// then application operations in order.
    fn pump(&mut self, peer: PeerId) {
        let max_wr = self
            .ctx
            .as_ref()
            .map_or(1 << 30, |c| c.summary().max_msg_bytes.clamp(4096, 1 << 30));
        let every = SIGNAL_EVERY.min((self.cfg.send_depth / 4).max(1));
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let mut wrs = std::mem::take(&mut self.wrs);
        wrs.clear();
        let mut out = PumpOut::default();
        let result = fill_batch(link, peer, &self.mrs, max_wr, &mut wrs, &mut out)
            .and_then(|()| post_batch(link, &wrs, every, &mut out));
        self.wrs = wrs;
        let s = &mut self.stats;
        s.resolves_sent += out.resolves;
        s.writes_posted += out.writes;
        s.dest_defines += out.defines;
        s.post_calls += out.posts;
        s.send_requests += out.requests;
        s.signaled_requests += out.signaled;
        for k in out.release {
            self.release_mr(k);
        }
        self.events.extend(out.events);
        if let Err(e) = result {
            self.fail(peer, format!("RDMA post to peer {peer} failed: {e}"));
        }
    }
}

#[derive(Default)]
struct PumpOut {
    events: Vec<Event>,
    release: Vec<MrKey>,
    resolves: u64,
    writes: u64,
    defines: u64,
    posts: u64,
    requests: u64,
    signaled: u64,
}

fn has_room(link: &Link) -> bool {
    !link.free_send.is_empty() && link.sq_free > 0
}

/// Posts `wrs` (built by `fill_batch`, already accounted for in `inflight`) in one call,
/// signaling every `every`th request and the last one.
fn post_batch(link: &mut Link, wrs: &[WorkRequest], every: u32, out: &mut PumpOut) -> Result<()> {
    if wrs.is_empty() {
        return Ok(());
    }
    let n = wrs.len();
    let every = every.max(1) as usize;
    let signaled = |i: usize| i + 1 == n || (i + 1).is_multiple_of(every);
    let qp = link.qp.as_mut().expect("a link with requests has a QP");
    // SAFETY: every request was built by `fill_batch` from a send slot of the link's registered
    // pool (untouched until the request is retired) or from a source region an operation holds
    // a reference on until its last request is retired; remote ranges are those the peer
    // announced, checked against the announced length. The last request is signaled, so
    // unsignaled ones are retired by a later completion.
    unsafe { qp.post_send_with(wrs, signaled) }?;
    out.posts += 1;
    out.requests += n as u64;
    out.signaled += (0..n).filter(|i| signaled(*i)).count() as u64;
    Ok(())
}

fn fill_batch(
    link: &mut Link,
    peer: PeerId,
    mrs: &HashMap<MrKey, MrEntry>,
    max_wr: u64,
    wrs: &mut Vec<WorkRequest>,
    out: &mut PumpOut,
) -> Result<()> {
    if !matches!(link.state, State::Up | State::ReadySent | State::AwaitReady) {
        return Ok(());
    }
    // Control messages (READY, RESOLVE, ANNOUNCE) go first, whatever the application queue holds.
    while !link.ctrl.is_empty() {
        if !has_room(link) {
            return Ok(());
        }
        let c = link.ctrl.pop_front().expect("not empty");
        let ready = c.first() == Some(&(wire::Kind::Ready as u8));
        add_slot_send(link, wrs, &c, false, ready);
    }
    if link.state != State::Up {
        return Ok(());
    }
    loop {
        let finished = match link.ops.front() {
            None => return Ok(()),
            Some(Op::Send { .. }) => fill_send(link, wrs),
            Some(Op::Write { .. }) => fill_write(link, peer, mrs, max_wr, wrs, out),
        };
        if !finished {
            return Ok(());
        }
        link.ops.pop_front();
    }
}

/// Adds fragments of the message at the front; true when all of it is in the batch.
fn fill_send(link: &mut Link, wrs: &mut Vec<WorkRequest>) -> bool {
    let room = link.pool.as_ref().expect("up links have a pool").chunk - wire::HDR;
    loop {
        let Some(Op::Send {
            lane,
            data,
            sent,
            started,
        }) = link.ops.front()
        else {
            unreachable!("called for a send at the front")
        };
        if *started && *sent >= data.len() {
            return true;
        }
        if !has_room(link) {
            return false;
        }
        let n = room.min(data.len() - *sent);
        let last = *sent + n == data.len();
        let mut frag = Vec::with_capacity(wire::HDR + n);
        frag.extend_from_slice(&wire::header(
            wire::Kind::Msg,
            if last { wire::F_LAST } else { 0 },
            *lane,
        ));
        frag.extend_from_slice(&data[*sent..*sent + n]);
        add_slot_send(link, wrs, &frag, last, false);
        if let Some(Op::Send { sent, started, .. }) = link.ops.front_mut() {
            *sent += n;
            *started = true;
        }
    }
}

/// Resolves the destination of the write at the front, defines its destination slot if the
/// peer does not know it yet, and adds its requests; true when all of it is in the batch (or
/// it completed without sending).
fn fill_write(
    link: &mut Link,
    peer: PeerId,
    mrs: &HashMap<MrKey, MrEntry>,
    max_wr: u64,
    wrs: &mut Vec<WorkRequest>,
    out: &mut PumpOut,
) -> bool {
    let Some(&Op::Write {
        src_offset,
        len,
        dst,
        imm,
        wr_id,
        mr_key,
        slot,
        ..
    }) = link.ops.front()
    else {
        unreachable!("called for a write at the front")
    };
    let slot = match slot {
        Some(s) => s,
        None => match link.remote.get(&dst.token).copied() {
            None => {
                link.remote.insert(dst.token, Remote::Pending);
                out.resolves += 1;
                let c = wire::encode_resolve(dst.token).to_vec();
                if has_room(link) {
                    add_slot_send(link, wrs, &c, false, false);
                } else {
                    link.ctrl.push_back(c);
                }
                return false;
            }
            Some(Remote::Pending) => return false,
            Some(Remote::Retired) => {
                // The peer deregistered it: dropped, as tcp drops it at the receiver.
                out.events.push(Event::WriteDone { peer, wr_id });
                out.release.push(mr_key);
                link.outstanding -= 1;
                return true;
            }
            Some(Remote::Known { len: rlen, .. }) => {
                let d = Dest {
                    token: dst.token,
                    offset: dst.offset,
                    len,
                    imm,
                };
                let oob = dst.offset.checked_add(len).is_none_or(|e| e > rlen);
                if oob {
                    if !has_room(link) {
                        return false;
                    }
                    // The receiver closes the link on this definition, as it would on tcp.
                    add_slot_send(link, wrs, &wire::encode_define(0, &d, true), false, false);
                    out.release.push(mr_key);
                    link.outstanding -= 1;
                    return true;
                }
                if !link.tx_dest.contains_key(&d) && !has_room(link) {
                    return false;
                }
                let (s, define) = link.dest_slot(d);
                if define {
                    add_slot_send(link, wrs, &wire::encode_define(s, &d, false), false, false);
                    out.defines += 1;
                }
                if let Some(Op::Write { slot, .. }) = link.ops.front_mut() {
                    *slot = Some(s);
                }
                s
            }
        },
    };
    let Some(Remote::Known { addr, rkey, .. }) = link.remote.get(&dst.token).copied() else {
        unreachable!("a slot is only chosen for a known region")
    };
    let (lkey, base) = if len == 0 {
        (0, 0)
    } else {
        match mrs.get(&mr_key) {
            Some(e) => (e.mr.lkey(), e.mr.addr()),
            None => unreachable!("the op holds a reference on its source region"),
        }
    };
    loop {
        let Some(&Op::Write { posted, .. }) = link.ops.front() else {
            unreachable!("called for a write at the front")
        };
        if link.sq_free == 0 {
            return false;
        }
        let n = (len - posted).min(max_wr);
        let last = posted + n == len;
        link.seq += 1;
        let (laddr, raddr) = (base + src_offset + posted, addr + dst.offset + posted);
        let wr = if last {
            WorkRequest::WriteImm {
                wr_id: link.seq,
                lkey,
                addr: laddr,
                len: n as u32,
                rkey,
                remote_addr: raddr,
                imm: slot,
            }
        } else {
            WorkRequest::Write {
                wr_id: link.seq,
                lkey,
                addr: laddr,
                len: n as u32,
                rkey,
                remote_addr: raddr,
            }
        };
        wrs.push(wr);
        link.sq_free -= 1;
        let what = if last {
            Inflight::Final { wr_id, mr_key }
        } else {
            Inflight::Chunk
        };
        link.inflight.push_back((link.seq, what));
        if let Some(Op::Write { posted, .. }) = link.ops.front_mut() {
            *posted += n;
        }
        if last {
            out.writes += 1;
            return true;
        }
    }
}

/// Copies `bytes` into a free send slot of the link and adds a SEND of it to the batch.
fn add_slot_send(
    link: &mut Link,
    wrs: &mut Vec<WorkRequest>,
    bytes: &[u8],
    op_done: bool,
    ready: bool,
) {
    let slot = link.free_send.pop().expect("caller checked a free slot");
    let pool = link.pool.as_mut().expect("a link with a QP has a pool");
    let addr = pool.addr(slot);
    let off = slot as usize * pool.chunk;
    pool.mem[off..off + bytes.len()].copy_from_slice(bytes);
    link.seq += 1;
    link.sq_free -= 1;
    wrs.push(WorkRequest::Send {
        wr_id: link.seq,
        lkey: pool.mr.lkey(),
        addr,
        len: bytes.len() as u32,
    });
    link.inflight.push_back((
        link.seq,
        Inflight::Slot {
            slot,
            op_done,
            ready,
        },
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine without a device (the name matches none; the reason is the first thing that
    /// is missing: libibverbs, any device, or this name), as on a host without RDMA.
    fn engine() -> (mio::Poll, Engine) {
        let poll = mio::Poll::new().expect("mio poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let cfg = RdmaConfig {
            device: Some("bps-test-no-such-device".into()),
            ..RdmaConfig::default()
        };
        let e = Engine::new(&cfg, None, 64, 1 << 20, waker);
        assert!(e.ctx.is_none());
        (poll, e)
    }

    /// A dma-buf region as `register_dmabuf` records it, without the NIC registration (which
    /// needs a device that takes dma-bufs; the refusal happens before the region is used).
    fn fake_dmabuf(e: &mut Engine, token: u64, len: usize) {
        e.regions.insert(
            token,
            LocalRegion {
                mem: Mem::DmaBuf {
                    iova: 0x7f00_0000_0000,
                },
                len,
                mr: false,
            },
        );
    }

    fn write(
        e: &mut Engine,
        peer: u32,
        src: u64,
        len: u64,
        link: Option<LinkKind>,
    ) -> Option<Result<()>> {
        let dst = RemoteSlice {
            token: 0x99,
            offset: 0,
        };
        e.try_write_dmabuf(PeerId(peer), 0, src, 0, len, dst, 1, 1, link)
    }

    #[test]
    fn register_dmabuf_without_a_device_says_why() {
        let (_poll, mut e) = engine();
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        // SAFETY: nothing is registered (no device); the fd is open for the call.
        let err = unsafe { e.register_dmabuf(5, std::os::fd::AsFd::as_fd(&f), 0, 4096, 0x1000) }
            .expect_err("no device");
        let Error::Unsupported { feature, reason } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*feature, "rdma");
        assert!(
            reason.starts_with(
                "device memory (a dma-buf) can only be registered with an RDMA device, and this \
                 process uses none: "
            ) && reason.len() > 100,
            "{reason}"
        );
        assert!(!e.is_dmabuf(5));
        assert_eq!(e.stats().mr_registrations, 0);
    }

    #[test]
    fn writes_from_a_dmabuf_region_over_tcp_shm_or_loopback_are_refused() {
        let (_poll, mut e) = engine();
        fake_dmabuf(&mut e, 0x51, 4096);
        assert!(e.is_dmabuf(0x51));
        for (link, name) in [
            (Some(LinkKind::Tcp), "tcp"),
            (Some(LinkKind::Shm), "shm"),
            (Some(LinkKind::Loopback), "loopback"),
            (None, "not connected"),
        ] {
            let r = write(&mut e, 2, 0x51, 64, link).expect("a dma-buf source is the engine's");
            let err = r.expect_err("not an rdma link");
            let Error::Unsupported { feature, reason } = &err else {
                panic!("{err:?}")
            };
            assert_eq!(*feature, "rdma");
            assert!(
                reason.starts_with("a write from memory token 0x51 needs an rdma link")
                    && reason.contains(&format!("the link to peer 2 is {name}")),
                "{reason}"
            );
        }
        // A peer whose RDMA negotiation settled on tcp: refused as well, nothing queued.
        e.links.insert(PeerId(3), Link::new(State::Tcp));
        let err = write(&mut e, 3, 0x51, 64, Some(LinkKind::Tcp))
            .expect("engine's")
            .expect_err("tcp");
        assert!(
            err.to_string().contains("the link to peer 3 is tcp"),
            "{err}"
        );
        assert!(e.links[&PeerId(3)].ops.is_empty());
        // Out of bounds is named first, as for host regions.
        let err = write(&mut e, 2, 0x51, 4097, Some(LinkKind::Tcp))
            .expect("engine's")
            .expect_err("past the end");
        assert!(
            matches!(
                err,
                Error::OutOfBounds {
                    token: 0x51,
                    region_len: 4096,
                    ..
                }
            ),
            "{err:?}"
        );
        // Host regions and unknown tokens are not the engine's to answer: `Net` handles them.
        let mut host = [0u8; 8];
        e.register(0x61, host.as_mut_ptr(), host.len())
            .expect("host region");
        assert!(!e.is_dmabuf(0x61));
        assert!(write(&mut e, 2, 0x61, 8, Some(LinkKind::Tcp)).is_none());
        assert!(write(&mut e, 2, 0x71, 8, Some(LinkKind::Tcp)).is_none());
        // Deregistered: gone.
        e.deregister(0x51);
        assert!(!e.is_dmabuf(0x51));
        assert!(write(&mut e, 2, 0x51, 64, Some(LinkKind::Tcp)).is_none());
    }
}
