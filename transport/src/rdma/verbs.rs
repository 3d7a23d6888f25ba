//! Safe types over the verbs (the third FFI step): a device [`Context`] (device, port, GID,
//! protection domain, completion channel), [`MemoryRegion`], and [`QueuePair`] (RC, with its
//! own completion queue on the context's channel).
//!
//! These are public so that the loopback test and benches can drive a QP directly; `Net` uses
//! them through its engine.

use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue as _, GenericCompletionQueue,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};
use sideway::ibverbs::memory_region::RegisterMemoryRegionErrorKind;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, PostSendGuard, QueuePair as _, QueuePairAttribute, QueuePairState,
    SetInlineData, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use super::sys;
use super::wire::Endpoint;
use super::{DeviceSummary, RdmaConfig};
use crate::{Error, Result};

/// Local ACK timeout exponent: 4.096 µs × 2^16 ≈ 268 ms per try (7 tries), generous enough for
/// Soft-RoCE under emulation; a dead peer is normally noticed earlier by its tcp link.
const ACK_TIMEOUT: u8 = 16;
/// Receiver-not-ready timer code 12 = 0.64 ms.
const MIN_RNR_TIMER: u8 = 12;

fn unsupported(reason: impl Into<String>) -> Error {
    Error::Unsupported {
        feature: "rdma",
        reason: reason.into(),
    }
}

fn verr(what: impl std::fmt::Display, e: impl std::fmt::Debug) -> Error {
    Error::Io {
        op: format!("rdma: {what}"),
        source: std::io::Error::other(format!("{e:?}")),
    }
}

fn mtu_bytes(m: Mtu) -> u32 {
    128u32 << (m as u32)
}

fn mtu_of(bytes: u32) -> Mtu {
    match bytes {
        0..=256 => Mtu::Mtu256,
        257..=512 => Mtu::Mtu512,
        513..=1024 => Mtu::Mtu1024,
        1025..=2048 => Mtu::Mtu2048,
        _ => Mtu::Mtu4096,
    }
}

fn port_state_name(s: PortState) -> &'static str {
    match s {
        PortState::Nop => "NOP",
        PortState::Down => "DOWN",
        PortState::Initializing => "INIT",
        PortState::Armed => "ARMED",
        PortState::Active => "ACTIVE",
        PortState::ActiveDefer => "ACTIVE_DEFER",
    }
}

fn is_v4_mapped(g: &Ipv6Addr) -> bool {
    let o = g.octets();
    o[..10].iter().all(|b| *b == 0) && o[10] == 0xff && o[11] == 0xff
}

struct Inner {
    // Field order is drop order: the channel goes after every CQ (CQs hold their own Arc of it),
    // the PD after every MR and QP (which hold Arcs of it), the device context last.
    channel: Arc<CompletionChannel>,
    pd: Arc<ProtectionDomain>,
    _ctx: Arc<DeviceContext>,
    summary: DeviceSummary,
    ethernet: bool,
    cfg: RdmaConfig,
    /// Registration bound in bytes (None: unbounded) and where it comes from.
    limit: Option<(u64, &'static str)>,
    registered: AtomicU64,
}

/// An opened RDMA device: the chosen port and GID, a protection domain and a completion channel.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rdma::Context({})", self.inner.summary)
    }
}

/// Finds and checks the device, port and GID `cfg` asks for, without keeping anything open.
///
/// # Errors
/// `Error::Unsupported { feature: "rdma", reason }` saying what is missing and what to change.
pub fn probe(cfg: &RdmaConfig) -> Result<DeviceSummary> {
    open_device(&cfg.clamped()).map(|(_, s, _)| s)
}

fn open_device(cfg: &RdmaConfig) -> Result<(Arc<DeviceContext>, DeviceSummary, bool)> {
    sys::verbs_library().map_err(unsupported)?;
    let list = DeviceList::new().map_err(|e| {
        let src = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("{e:?}"));
        unsupported(format!(
            "no RDMA device: ibv_get_device_list failed ({src}); the kernel has no RDMA support \
             or no RDMA driver is loaded"
        ))
    })?;
    if list.is_empty() {
        return Err(unsupported(
            "no RDMA device (ibv_get_device_list returned 0): load the NIC's RDMA driver \
             (or create a Soft-RoCE device: rdma link add rxe0 type rxe netdev eth0)",
        ));
    }
    let names: Vec<String> = list.iter().map(|d| d.name()).collect();
    let candidates: Vec<usize> = match &cfg.device {
        Some(want) => match names.iter().position(|n| n == want) {
            Some(i) => vec![i],
            None => {
                return Err(unsupported(format!(
                    "BPS_RDMA_DEVICE={want} names no RDMA device; this host has: {} (set \
                     BPS_RDMA_DEVICE to one of them, or unset it to use the first with an active port)",
                    names.join(", ")
                )))
            }
        },
        None => (0..names.len()).collect(),
    };
    let mut why_not = Vec::new();
    for i in candidates {
        let dev = list.get(i).expect("index from the list");
        let name = names[i].clone();
        let ctx = match dev.open() {
            Ok(c) => c,
            Err(e) => {
                why_not.push(format!("{name}: ibv_open_device failed ({e:?})"));
                continue;
            }
        };
        match choose_port(&ctx, &name, cfg) {
            Ok((summary, ethernet)) => return Ok((ctx, summary, ethernet)),
            Err(e) if cfg.device.is_some() || cfg.port.is_some() || cfg.gid_index.is_some() => {
                return Err(e)
            }
            Err(e) => why_not.push(e.to_string()),
        }
    }
    Err(unsupported(format!(
        "no usable RDMA device: {}",
        why_not.join("; ")
    )))
}

fn choose_port(
    ctx: &Arc<DeviceContext>,
    name: &str,
    cfg: &RdmaConfig,
) -> Result<(DeviceSummary, bool)> {
    let dev = ctx
        .query_device()
        .map_err(|e| verr(format!("ibv_query_device on {name}"), e))?;
    let nports = dev.phys_port_cnt();
    let mut states = Vec::new();
    let ports: Vec<u8> = match cfg.port {
        Some(p) if p > nports => {
            return Err(unsupported(format!(
                "BPS_RDMA_PORT={p} but {name} has {nports} port(s) (numbered from 1)"
            )))
        }
        Some(p) => vec![p],
        None => (1..=nports).collect(),
    };
    for port in ports {
        let attr = ctx
            .query_port(port)
            .map_err(|e| verr(format!("ibv_query_port {name} port {port}"), e))?;
        let state = attr.port_state();
        if state != PortState::Active {
            states.push(format!("port {port} is {}", port_state_name(state)));
            continue;
        }
        let ethernet = attr.link_layer() == LinkLayer::Ethernet;
        let gid_len = attr.gid_tbl_len().max(0) as u32;
        // Every non-empty GID of the port: (index, gid, type).
        let table: Vec<(u32, Gid, Option<GidType>)> = (0..gid_len)
            .filter_map(|i| {
                let gid = ctx.query_gid(port, i).ok()?;
                if gid.is_zero() {
                    return None;
                }
                let ty = ctx.query_gid_ex(port, i).ok().map(|e| e.gid_type());
                Some((i, gid, ty))
            })
            .collect();
        let listing = || {
            table
                .iter()
                .map(|(i, g, t)| {
                    let t = match t {
                        Some(GidType::RoceV2) => " RoCEv2",
                        Some(GidType::RoceV1) => " RoCEv1",
                        Some(GidType::InfiniBand) => " IB",
                        None => "",
                    };
                    format!("[{i}] {}{t}", Ipv6Addr::from(*g))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (gid_index, gid) = match cfg.gid_index {
            Some(i) => {
                if i >= gid_len {
                    return Err(unsupported(format!(
                        "GID index {i} is out of range: {name} port {port} has {gid_len} GID \
                         entries; valid: {} (set BPS_RDMA_GID_INDEX to one of them, or unset it)",
                        listing()
                    )));
                }
                match table.iter().find(|(j, _, _)| *j == i) {
                    Some((_, g, _)) => (i, *g),
                    None => {
                        return Err(unsupported(format!(
                            "GID index {i} of {name} port {port} is empty; valid: {} (set \
                             BPS_RDMA_GID_INDEX to one of them, or unset it)",
                            listing()
                        )))
                    }
                }
            }
            None if !ethernet => match table.first() {
                Some((i, g, _)) => (*i, *g),
                None => (0, Gid::default()),
            },
            None => {
                let v2 = |t: &Option<GidType>| *t == Some(GidType::RoceV2);
                let pick = table
                    .iter()
                    .find(|(_, g, t)| v2(t) && is_v4_mapped(&Ipv6Addr::from(*g)))
                    .or_else(|| table.iter().find(|(_, _, t)| v2(t)))
                    .or_else(|| table.first());
                match pick {
                    Some((i, g, _)) => (*i, *g),
                    None => {
                        states.push(format!(
                            "port {port} is active but has no GID (RoCE needs an IP address on its netdev)"
                        ));
                        continue;
                    }
                }
            }
        };
        let summary = DeviceSummary {
            device: name.to_string(),
            port,
            gid_index,
            gid: Ipv6Addr::from(gid),
            link_layer: if ethernet { "Ethernet" } else { "InfiniBand" },
            lid: attr.lid(),
            active_mtu: mtu_bytes(attr.active_mtu()),
            max_msg_bytes: port_max_msg(ctx, port),
        };
        return Ok((summary, ethernet));
    }
    Err(unsupported(format!(
        "no active port on {name} ({}): bring the link up, or choose another device/port with \
         BPS_RDMA_DEVICE / BPS_RDMA_PORT",
        if states.is_empty() {
            "no ports".to_string()
        } else {
            states.join(", ")
        }
    )))
}

/// `max_msg_sz` of a port (sideway does not expose it; 1 GiB if the query fails).
fn port_max_msg(ctx: &Arc<DeviceContext>, port: u8) -> u64 {
    // SAFETY: `context()` is the live context `ctx` holds; ibv_query_port fills one ibv_port_attr.
    unsafe {
        let mut attr: rdma_mummy_sys::ibv_port_attr = std::mem::zeroed();
        let rc = rdma_mummy_sys::ibv_query_port(ctx.context().as_ptr(), port, &mut attr);
        if rc == 0 && attr.max_msg_sz > 0 {
            u64::from(attr.max_msg_sz)
        } else {
            1 << 30
        }
    }
}

impl Context {
    /// Opens the device `cfg` asks for (see [`probe`]) and allocates a protection domain and a
    /// non-blocking completion channel.
    ///
    /// # Errors
    /// As [`probe`]; or a verbs call that failed.
    pub fn open(cfg: &RdmaConfig) -> Result<Context> {
        let cfg = cfg.clamped();
        let (ctx, summary, ethernet) = open_device(&cfg)?;
        let pd = ctx
            .alloc_pd()
            .map_err(|e| verr(format!("ibv_alloc_pd on {}", summary.device), e))?;
        let channel = ctx
            .create_comp_channel()
            .map_err(|e| verr("ibv_create_comp_channel", e))?;
        channel
            .set_nonblocking(true)
            .map_err(|e| Error::io("make the completion channel non-blocking", e))?;
        let limit = if cfg.max_registered_bytes > 0 {
            Some((cfg.max_registered_bytes, "BPS_RDMA_MAX_REGISTERED_BYTES"))
        } else {
            sys::memlock_limit().map(|l| (l, "RLIMIT_MEMLOCK"))
        };
        Ok(Context {
            inner: Arc::new(Inner {
                channel,
                pd,
                _ctx: ctx,
                summary,
                ethernet,
                cfg,
                limit,
                registered: AtomicU64::new(0),
            }),
        })
    }

    /// The device, port and GID in use.
    pub fn summary(&self) -> &DeviceSummary {
        &self.inner.summary
    }

    /// The configuration (clamped).
    pub fn config(&self) -> &RdmaConfig {
        &self.inner.cfg
    }

    /// Bytes registered through this context now.
    pub fn registered_bytes(&self) -> u64 {
        self.inner.registered.load(Ordering::Relaxed)
    }

    /// The completion channel's file descriptor (non-blocking; readable when an armed CQ got a
    /// completion).
    pub fn channel_fd(&self) -> RawFd {
        self.inner.channel.as_raw_fd()
    }

    /// Reads and acknowledges every pending completion-channel event; returns how many.
    ///
    /// # Errors
    /// `ibv_get_cq_event` failing for another reason than "nothing pending".
    pub fn drain_channel(&self) -> Result<usize> {
        self.channel().drain(|_| {})
    }

    /// The completion channel, for a thread that waits on it.
    pub(crate) fn channel(&self) -> ChannelHandle {
        ChannelHandle(self.inner.channel.clone())
    }

    /// Registers `ptr..ptr+len` for local access and remote writes and reads.
    ///
    /// # Errors
    /// When the registration would pass the bound (RLIMIT_MEMLOCK or
    /// [`RdmaConfig::max_registered_bytes`]; the error says what to change), or `ibv_reg_mr`
    /// fails.
    ///
    /// # Safety
    /// The range must stay allocated until the returned region is dropped; while a peer may
    /// write into it the caller must not rely on its contents except as the protocol allows.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<MemoryRegion> {
        let now = self.inner.registered.load(Ordering::Relaxed);
        if let Some((limit, source)) = self.inner.limit {
            if now.saturating_add(len as u64) > limit {
                return Err(Error::Unsupported {
                    feature: "rdma",
                    reason: format!(
                        "registering {len} more bytes for RDMA would pass {source} ({limit} bytes; \
                         {now} registered): raise the locked-memory limit (`ulimit -l unlimited`, \
                         docker --ulimit memlock=-1, systemd LimitMEMLOCK=infinity) or, when \
                         {source} is BPS_RDMA_MAX_REGISTERED_BYTES, raise it; or register less \
                         (BPS_RDMA_RECV_DEPTH / BPS_RDMA_SEND_DEPTH / BPS_RDMA_MSG_CHUNK size \
                         the per-peer buffers)"
                    ),
                });
            }
        }
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
        // SAFETY: the caller keeps the range valid for the region's lifetime (this fn's contract).
        let mr = unsafe { self.inner.pd.reg_mr(ptr as usize, len, access) }.map_err(|e| {
            let src = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            let hint = if src.contains("Cannot allocate memory")
                || src.contains("Operation not permitted")
            {
                " (the locked-memory limit is the usual cause: `ulimit -l unlimited`, docker \
                 --ulimit memlock=-1)"
            } else {
                ""
            };
            Error::Io {
                op: format!("rdma: ibv_reg_mr of {len} bytes{hint}"),
                source: std::io::Error::other(src),
            }
        })?;
        self.inner
            .registered
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(MemoryRegion {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            addr: ptr as u64,
            len,
            locked: len as u64,
            _mr: mr,
            ctx: self.inner.clone(),
        })
    }

    /// Registers `len` bytes at `offset` of the dma-buf `fd` (device memory exported by its
    /// driver, e.g. `cuMemGetHandleForAddressRange(…DMA_BUF_FD…)`) for local access and remote
    /// writes and reads (`ibv_reg_dmabuf_mr`). The region is addressed by `iova`: work requests
    /// and peers name `iova..iova + len` (the returned region's [`addr`](MemoryRegion::addr)),
    /// usually the device pointer of the buffer; `iova` and `offset` must agree within a page.
    /// The region is used exactly like one from [`register`](Self::register) (lkey, rkey). The
    /// kernel holds its own reference on the dma-buf, so `fd` may be closed once this returns.
    /// The bytes are not counted against the locked-memory bound (they are not host memory this
    /// process locks).
    ///
    /// # Errors
    /// A zero length, or `ibv_reg_dmabuf_mr` failing, worded by
    /// [`dmabuf_registration_error`](super::gpudirect::dmabuf_registration_error): the device,
    /// fd, offset, length, iova and what the errno means; EOPNOTSUPP ("device rxe0 cannot
    /// register dma-buf memory (driver has no dma-buf support …)") is
    /// `Error::Unsupported { feature: "rdma", .. }`.
    ///
    /// # Safety
    /// The memory behind the dma-buf may be written by the NIC, on behalf of any peer holding
    /// the region's rkey, until the region is dropped: whoever else uses that memory (the GPU,
    /// or the process through a mapping of the same pages) must not rely on its contents except
    /// as the protocol allows.
    pub unsafe fn register_dmabuf(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
    ) -> Result<MemoryRegion> {
        let device = &self.inner.summary.device;
        let raw = fd.as_raw_fd();
        if len == 0 {
            return Err(super::gpudirect::dmabuf_registration_error(
                device,
                raw,
                offset,
                len,
                iova,
                &std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "zero length (a dma-buf region needs at least one byte)",
                ),
            ));
        }
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
        // SAFETY: `fd` is an open descriptor for the duration of the call (BorrowedFd); the
        // kernel checks that it is a dma-buf covering `offset + len` and takes its own
        // reference; what the NIC may then write is this fn's contract.
        let mr = unsafe { self.inner.pd.reg_dmabuf_mr(offset, len, iova, raw, access) }.map_err(
            |e| {
                let io = match e.0 {
                    RegisterMemoryRegionErrorKind::Ibverbs(io) => io,
                    other => std::io::Error::other(other.to_string()),
                };
                super::gpudirect::dmabuf_registration_error(device, raw, offset, len, iova, &io)
            },
        )?;
        Ok(MemoryRegion {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            addr: iova,
            len,
            locked: 0,
            _mr: mr,
            ctx: self.inner.clone(),
        })
    }

    /// Creates an RC queue pair with its own completion queue (bound to this context's channel)
    /// and moves it to INIT.
    ///
    /// # Errors
    /// A verbs call that failed.
    pub fn create_qp(&self, send_depth: u32, recv_depth: u32) -> Result<QueuePair> {
        let cfg = &self.inner.cfg;
        let cqe = send_depth + recv_depth + 8;
        let cq = self
            .inner
            ._ctx
            .create_cq_builder()
            .setup_cqe(cqe)
            .setup_comp_channel(&self.inner.channel, 0)
            .build()
            .map_err(|e| verr(format!("ibv_create_cq ({cqe} entries)"), e))?;
        let mut b = self.inner.pd.create_qp_builder();
        b.setup_max_send_wr(send_depth)
            .setup_max_recv_wr(recv_depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(cfg.inline_bytes)
            .setup_send_cq(GenericCompletionQueue::from(cq.clone()))
            .setup_recv_cq(GenericCompletionQueue::from(cq.clone()));
        let qp: GenericQueuePair = match b.build_ex() {
            Ok(q) => q.into(),
            Err(_) => b.build().map_err(|e| verr("ibv_create_qp (RC)", e))?.into(),
        };
        let psn = {
            let mut b = [0u8; 4];
            let _ = getrandom::fill(&mut b);
            u32::from_le_bytes(b) & 0xff_ffff
        };
        let mut q = QueuePair {
            qp,
            cq,
            ctx: self.inner.clone(),
            psn,
            inline: cfg.inline_bytes,
        };
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.inner.summary.port)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        q.qp.modify(&attr)
            .map_err(|e| verr("ibv_modify_qp to INIT", e))?;
        Ok(q)
    }
}

/// A registered memory region; deregistered (`ibv_dereg_mr`) when dropped.
pub struct MemoryRegion {
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: usize,
    /// Bytes counted in `Inner::registered` (0 for a dma-buf region).
    locked: u64,
    _mr: Arc<sideway::ibverbs::memory_region::MemoryRegion>,
    ctx: Arc<Inner>,
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemoryRegion({:#x}+{}, rkey {:#x})",
            self.addr, self.len, self.rkey
        )
    }
}

impl MemoryRegion {
    /// Local key.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
    /// Start address (for a dma-buf region, its iova).
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        self.ctx
            .registered
            .fetch_sub(self.locked, Ordering::Relaxed);
    }
}

/// One send-queue work request. Local ranges are given as (lkey, address, length).
#[derive(Clone, Copy, Debug)]
pub enum WorkRequest {
    /// A two-sided SEND (inline when `len` fits the inline size).
    Send {
        /// Id reported in the completion.
        wr_id: u64,
        /// Local key of the source.
        lkey: u32,
        /// Source address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// RDMA WRITE (no completion at the receiver).
    Write {
        /// Id reported in the completion.
        wr_id: u64,
        /// Local key of the source.
        lkey: u32,
        /// Source address.
        addr: u64,
        /// Length.
        len: u32,
        /// Remote key.
        rkey: u32,
        /// Remote address.
        remote_addr: u64,
    },
    /// RDMA WRITE_WITH_IMM (consumes a receive request at the receiver).
    WriteImm {
        /// Id reported in the completion.
        wr_id: u64,
        /// Local key of the source.
        lkey: u32,
        /// Source address.
        addr: u64,
        /// Length.
        len: u32,
        /// Remote key.
        rkey: u32,
        /// Remote address.
        remote_addr: u64,
        /// The immediate (host order; sent in network order).
        imm: u32,
    },
}

/// A work completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// `IBV_WC_*` status (0 = success).
    pub status: u32,
    /// `IBV_WC_*` opcode.
    pub opcode: u32,
    /// Bytes received (receive completions).
    pub byte_len: u32,
    /// The immediate of a SEND/WRITE with immediate, in host order.
    pub imm: Option<u32>,
}

impl Completion {
    /// Opcode of a receive completion for a WRITE_WITH_IMM.
    pub const RECV_RDMA_WITH_IMM: u32 = rdma_mummy_sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
    /// Opcode of a receive completion for a SEND.
    pub const RECV: u32 = rdma_mummy_sys::ibv_wc_opcode::IBV_WC_RECV;
    /// Status of a request flushed because its QP went to the error state.
    pub const FLUSHED: u32 = rdma_mummy_sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR;

    /// Whether it succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == 0
    }
    /// Whether it is a receive completion.
    pub fn is_recv(&self) -> bool {
        self.opcode & rdma_mummy_sys::ibv_wc_opcode::IBV_WC_RECV != 0
    }
    /// The status in words.
    pub fn status_str(&self) -> String {
        sys::wc_status_str(self.status)
    }
}

/// A reliable-connected queue pair with its own completion queue.
pub struct QueuePair {
    // Field order is drop order: the QP before its CQ.
    qp: GenericQueuePair,
    cq: Arc<BasicCompletionQueue>,
    ctx: Arc<Inner>,
    psn: u32,
    inline: u32,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueuePair(qpn {})", self.qp.qp_number())
    }
}

impl QueuePair {
    /// What the peer needs to connect to this QP.
    pub fn endpoint(&self) -> Endpoint {
        let s = &self.ctx.summary;
        Endpoint {
            qpn: self.qp.qp_number(),
            psn: self.psn,
            lid: s.lid,
            gid: s.gid,
            mtu: s.active_mtu,
        }
    }

    /// Moves the QP to RTR and RTS, connected to `remote`.
    ///
    /// # Errors
    /// `ibv_modify_qp` failing (the error names the state and, on RoCE, the GID index).
    pub fn connect(&mut self, remote: &Endpoint) -> Result<()> {
        let s = &self.ctx.summary;
        let mtu = mtu_of(remote.mtu.min(s.active_mtu));
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(s.port)
            .setup_service_level(0);
        if self.ctx.ethernet || !remote.gid.is_unspecified() && remote.lid == 0 {
            ah.setup_grh_src_gid_index(s.gid_index as u8)
                .setup_grh_dest_gid(&Gid::from(remote.gid))
                .setup_grh_hop_limit(64);
        }
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(MIN_RNR_TIMER)
            .setup_address_vector(&ah);
        self.qp.modify(&attr).map_err(|e| {
            verr(
                format!(
                    "ibv_modify_qp to RTR (remote GID {}, local GID index {} of {}; a wrong \
                     BPS_RDMA_GID_INDEX is the usual cause)",
                    remote.gid, s.gid_index, s.device
                ),
                e,
            )
        })?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(ACK_TIMEOUT)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(1);
        self.qp
            .modify(&attr)
            .map_err(|e| verr("ibv_modify_qp to RTS", e))
    }

    /// Posts work requests to the send queue in one batch; every one is signaled.
    ///
    /// # Errors
    /// The post failing (e.g. the send queue is full: the caller must keep at most the send
    /// depth outstanding).
    ///
    /// # Safety
    /// Every local range must lie in a registered region that stays registered and unmodified
    /// until the request's completion is polled (inline sends excepted: they are copied here);
    /// every remote range must be one the peer allows this QP to write.
    pub unsafe fn post_send(&mut self, wrs: &[WorkRequest]) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.post_send_with(wrs, |_| true) }
    }

    /// Posts work requests to the send queue in one batch (one doorbell), asking a completion
    /// only for those `signaled(index)` accepts (selective signaling). An unsignaled request
    /// still occupies its send-queue entry until a later signaled request of this QP completes:
    /// the caller must signal at least one request in every send-depth requests, and count the
    /// entries of unsignaled ones as freed only at that later completion.
    ///
    /// # Errors
    /// The post failing (e.g. the send queue is full).
    ///
    /// # Safety
    /// As [`post_send`](Self::post_send); an unsignaled request's local range must stay valid
    /// until a later signaled request's completion is polled.
    pub unsafe fn post_send_with(
        &mut self,
        wrs: &[WorkRequest],
        signaled: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let inline = self.inline;
        let mut g = self.qp.start_post_send();
        for (i, wr) in wrs.iter().enumerate() {
            let base = if signaled(i) {
                WorkRequestFlags::Signaled
            } else {
                WorkRequestFlags::none()
            };
            match *wr {
                WorkRequest::Send {
                    wr_id,
                    lkey,
                    addr,
                    len,
                } => {
                    let inline = len > 0 && len <= inline;
                    let flags = if inline {
                        base | WorkRequestFlags::Inline
                    } else {
                        base
                    };
                    let h = g.construct_wr(wr_id, flags).setup_send();
                    if inline {
                        // SAFETY: `addr..addr+len` is registered and valid (this fn's contract);
                        // it is copied into the work request before this returns.
                        let data =
                            unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
                        h.setup_inline_data(data);
                    } else if len == 0 {
                        // SAFETY: an empty scatter list references no memory.
                        unsafe { h.setup_sge_list(&[]) };
                    } else {
                        // SAFETY: registered and kept valid until completion (contract).
                        unsafe { h.setup_sge(lkey, addr, len) };
                    }
                }
                WorkRequest::Write {
                    wr_id,
                    lkey,
                    addr,
                    len,
                    rkey,
                    remote_addr,
                } => {
                    let h = g.construct_wr(wr_id, base).setup_write(rkey, remote_addr);
                    if len == 0 {
                        // SAFETY: an empty scatter list references no memory.
                        unsafe { h.setup_sge_list(&[]) };
                    } else {
                        // SAFETY: as above.
                        unsafe { h.setup_sge(lkey, addr, len) };
                    }
                }
                WorkRequest::WriteImm {
                    wr_id,
                    lkey,
                    addr,
                    len,
                    rkey,
                    remote_addr,
                    imm,
                } => {
                    let h =
                        g.construct_wr(wr_id, base)
                            .setup_write_imm(rkey, remote_addr, imm.to_be());
                    if len == 0 {
                        // SAFETY: an empty scatter list references no memory.
                        unsafe { h.setup_sge_list(&[]) };
                    } else {
                        // SAFETY: as above.
                        unsafe { h.setup_sge(lkey, addr, len) };
                    }
                }
            }
        }
        g.post().map_err(|e| verr("ibv_post_send", e))
    }

    /// Posts receive requests, one buffer each.
    ///
    /// # Errors
    /// The post failing (more than the receive depth outstanding).
    ///
    /// # Safety
    /// Each `(wr_id, lkey, addr, len)` must lie in a registered region that stays registered,
    /// and is not read or written by the caller, until the request's completion is polled.
    pub unsafe fn post_recv(&mut self, bufs: &[(u64, u32, u64, u32)]) -> Result<()> {
        let mut g = self.qp.start_post_recv();
        for &(wr_id, lkey, addr, len) in bufs {
            let h = g.construct_wr(wr_id);
            // SAFETY: registered and reserved for the NIC until completion (contract).
            unsafe { h.setup_sge(lkey, addr, len) };
        }
        g.post().map_err(|e| verr("ibv_post_recv", e))
    }

    /// Appends up to `max` completions of this QP's completion queue to `out`; returns how many.
    ///
    /// # Errors
    /// `ibv_poll_cq` failing.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        let cq = CqHandle(self.cq.clone());
        let mut wcs = [sys::empty_wc(); 32];
        let mut total = 0;
        while total < max {
            let want = (max - total).min(wcs.len());
            let n = cq.poll(&mut wcs[..want])?;
            out.extend(wcs[..n].iter().map(completion_of));
            total += n;
            if n < want {
                break;
            }
        }
        Ok(total)
    }

    /// Asks for a completion-channel event at the next completion (`ibv_req_notify_cq`).
    ///
    /// # Errors
    /// The verb failing.
    pub fn arm(&self) -> Result<()> {
        CqHandle(self.cq.clone()).arm()
    }

    /// A handle on this QP's completion queue, for the poller thread. The CQ lives as long as
    /// any handle or the QP does.
    pub(crate) fn cq(&self) -> CqHandle {
        CqHandle(self.cq.clone())
    }
}

/// The fields of a work completion that the backend uses.
pub(crate) fn completion_of(wc: &rdma_mummy_sys::ibv_wc) -> Completion {
    let imm = if wc.wc_flags & rdma_mummy_sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
        // SAFETY: the union holds the immediate when IBV_WC_WITH_IMM is set.
        let raw = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
        Some(u32::from_be(raw))
    } else {
        None
    };
    Completion {
        wr_id: wc.wr_id,
        status: wc.status,
        opcode: wc.opcode,
        byte_len: wc.byte_len,
        imm,
    }
}

/// A shared handle on a completion queue: polled and armed from the poller thread while the
/// event loop posts on its queue pair (both verbs are thread-safe in libibverbs providers).
#[derive(Clone)]
pub(crate) struct CqHandle(Arc<BasicCompletionQueue>);

impl CqHandle {
    /// `ibv_poll_cq` into `wcs`; returns how many were filled.
    pub(crate) fn poll(&self, wcs: &mut [rdma_mummy_sys::ibv_wc]) -> Result<usize> {
        // SAFETY: the CQ is alive (held by self).
        unsafe { sys::poll_cq(self.0.cq(), wcs) }
            .map_err(|e| Error::io("rdma: poll the completion queue", e))
    }

    /// `ibv_req_notify_cq`: an event on the channel at the next completion.
    pub(crate) fn arm(&self) -> Result<()> {
        // SAFETY: the CQ is alive (held by self).
        unsafe { sys::req_notify_cq(self.0.cq()) }
            .map_err(|e| Error::io("rdma: arm the completion queue", e))
    }

    /// The CQ's address, as completion-channel events name it.
    pub(crate) fn id(&self) -> usize {
        // SAFETY: only the address is taken.
        unsafe { self.0.cq() }.as_ptr() as usize
    }
}

/// A shared handle on the context's completion channel.
#[derive(Clone)]
pub(crate) struct ChannelHandle(Arc<CompletionChannel>);

impl ChannelHandle {
    /// Its file descriptor (non-blocking; readable when an armed CQ got a completion).
    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Reads and acknowledges every pending event, telling `fired` the [`CqHandle::id`] of each.
    pub(crate) fn drain(&self, fired: impl FnMut(usize)) -> Result<usize> {
        // SAFETY: the channel is alive (held by self) and non-blocking (set in `Context::open`);
        // see `sys::drain_channel` on the CQs.
        unsafe { sys::drain_channel(self.0.comp_channel(), fired) }
            .map_err(|e| Error::io("rdma: read the completion channel", e))
    }
}
