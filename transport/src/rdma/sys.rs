//! Raw verbs calls that sideway does not wrap, plus the two host checks (is libibverbs there, how
//! much may be locked). The only place of this backend that calls C directly; each function
//! returns a `Result` naming the failing verb (the second of the three FFI steps in STYLE.md).

use std::io;
use std::ptr::NonNull;

use rdma_mummy_sys::{ibv_comp_channel, ibv_cq, ibv_wc};

/// Turns a verbs return code (0, or an errno, or -1 with errno set) into a `Result` naming the
/// verb.
macro_rules! verb {
    ($name:literal, $call:expr) => {{
        let rc: i32 = $call;
        if rc == 0 {
            Ok(())
        } else {
            let e = if rc > 0 {
                io::Error::from_raw_os_error(rc)
            } else {
                io::Error::last_os_error()
            };
            Err(io::Error::new(e.kind(), format!("{}: {e}", $name)))
        }
    }};
}

/// Whether the verbs library can be loaded at all. The shim under sideway `dlopen`s it lazily and
/// turns its absence into EOPNOTSUPP everywhere; this check gives the reason in words.
pub(crate) fn verbs_library() -> Result<(), String> {
    const NAME: &[u8] = b"libibverbs.so.1\0";
    // SAFETY: NAME is NUL-terminated; dlopen with RTLD_LAZY only maps the library (the shim
    // opens it the same way), and the handle is released at once with dlclose.
    unsafe {
        let h = libc::dlopen(NAME.as_ptr().cast(), libc::RTLD_LAZY);
        if h.is_null() {
            return Err(
                "libibverbs.so.1 not found: install rdma-core's libibverbs1 and \
                        ibverbs-providers (or MLNX_OFED/DOCA) to use RDMA"
                    .into(),
            );
        }
        libc::dlclose(h);
    }
    Ok(())
}

/// The most bytes this process may lock (`None`: no limit: RLIMIT_MEMLOCK unlimited, or the
/// process holds CAP_IPC_LOCK, which `ibv_reg_mr` honours).
pub(crate) fn memlock_limit() -> Option<u64> {
    let cap_ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0);
    if cap_ipc_lock {
        return None;
    }
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(r.rlim_cur)
    }
}

/// An all-zero work completion (the type is plain data).
pub(crate) fn empty_wc() -> ibv_wc {
    // SAFETY: ibv_wc is a repr(C) struct of integers and a union of integers: all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// `ibv_poll_cq`: fills `wcs` from the front, returns how many.
///
/// # Safety
/// `cq` must be a live completion queue.
pub(crate) unsafe fn poll_cq(cq: NonNull<ibv_cq>, wcs: &mut [ibv_wc]) -> io::Result<usize> {
    let n = wcs.len().min(i32::MAX as usize) as i32;
    // SAFETY: the caller guarantees `cq`; `wcs` has room for `n` entries.
    let rc = unsafe { rdma_mummy_sys::ibv_poll_cq(cq.as_ptr(), n, wcs.as_mut_ptr()) };
    if rc < 0 {
        Err(io::Error::other(format!("ibv_poll_cq failed ({rc})")))
    } else {
        Ok(rc as usize)
    }
}

/// `ibv_req_notify_cq` for every completion (not only solicited ones).
///
/// # Safety
/// `cq` must be a live completion queue.
pub(crate) unsafe fn req_notify_cq(cq: NonNull<ibv_cq>) -> io::Result<()> {
    // SAFETY: the caller guarantees `cq`.
    verb!("ibv_req_notify_cq", unsafe {
        rdma_mummy_sys::ibv_req_notify_cq(cq.as_ptr(), 0)
    })
}

/// Reads every pending event of a (non-blocking) completion channel and acknowledges it at once,
/// telling `fired` which CQ each event was for. Returns how many were read.
///
/// # Safety
/// `channel` must be a live completion channel whose fd is non-blocking. The CQs of the events
/// are alive while this runs: the kernel drops the unread events of a CQ being destroyed, and
/// `ibv_destroy_cq` waits until every event it handed out was acknowledged (done here, before
/// `fired` is called), so a CQ may be destroyed by another thread meanwhile.
pub(crate) unsafe fn drain_channel(
    channel: NonNull<ibv_comp_channel>,
    mut fired: impl FnMut(usize),
) -> io::Result<usize> {
    let mut n = 0;
    loop {
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: the caller guarantees `channel`; the out-pointers are valid locals.
        let rc = unsafe { rdma_mummy_sys::ibv_get_cq_event(channel.as_ptr(), &mut cq, &mut ctx) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || n > 0 {
                return Ok(n);
            }
            return Err(io::Error::new(e.kind(), format!("ibv_get_cq_event: {e}")));
        }
        if !cq.is_null() {
            // SAFETY: `cq` was just returned by ibv_get_cq_event, and its destruction waits for
            // this acknowledgement (see above).
            unsafe { rdma_mummy_sys::ibv_ack_cq_events(cq, 1) };
            fired(cq as usize);
        }
        n += 1;
    }
}

/// Words for a work-completion status.
pub(crate) fn wc_status_str(status: u32) -> String {
    use rdma_mummy_sys::ibv_wc_status as s;
    let name = match status {
        s::IBV_WC_SUCCESS => "success",
        s::IBV_WC_LOC_LEN_ERR => "local length error",
        s::IBV_WC_LOC_QP_OP_ERR => "local QP operation error",
        s::IBV_WC_LOC_PROT_ERR => "local protection error",
        s::IBV_WC_WR_FLUSH_ERR => "work request flushed",
        s::IBV_WC_BAD_RESP_ERR => "bad response",
        s::IBV_WC_LOC_ACCESS_ERR => "local access error",
        s::IBV_WC_REM_INV_REQ_ERR => "remote invalid request",
        s::IBV_WC_REM_ACCESS_ERR => "remote access error (the peer's memory key or bounds were refused)",
        s::IBV_WC_REM_OP_ERR => "remote operation error",
        s::IBV_WC_RETRY_EXC_ERR => {
            "transport retry counter exceeded (the peer's QP is gone or unreachable: check the GID index and routing)"
        }
        s::IBV_WC_RNR_RETRY_EXC_ERR => "receiver-not-ready retry counter exceeded",
        s::IBV_WC_REM_ABORT_ERR => "remote aborted",
        s::IBV_WC_FATAL_ERR => "fatal error",
        s::IBV_WC_GENERAL_ERR => "general error",
        _ => "error",
    };
    format!("{name} (status {status})")
}
