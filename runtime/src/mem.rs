//! Memory shared with the transport: the one place in the runtime with `unsafe`.
//!
//! A one-sided write transport (RDMA, and tcp/shm which carry the same semantics) lands bytes
//! in registered memory while the program runs, exactly as a NIC would. Rust references to such
//! memory would promise exclusivity the hardware does not honour, so the runtime keeps it as
//! raw addresses ([`RawSlice`]) and makes a reference only for the short span in which the wire
//! protocol guarantees nobody writes it: a server's receive buffers between the last push of a
//! round and its answer, a sum buffer while it is being summed, a worker's output chunk between
//! the answer's arrival and the completion of the operation. Each such view is an `unsafe fn`
//! naming that rule, called from one place with a `// SAFETY:` note.

/// A raw byte range: an address and a length (the caller's promise stands behind it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawSlice {
    pub addr: usize,
    pub len: usize,
}

impl RawSlice {
    /// A sub-range. `off + len` must lie within `self` (checked).
    pub fn sub(self, off: usize, len: usize) -> RawSlice {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "sub-range {off}+{len} outside a slice of {} bytes",
            self.len
        );
        RawSlice {
            addr: self.addr + off,
            len,
        }
    }

    /// View as bytes.
    ///
    /// # Safety
    /// The range must be valid memory, and nobody may write it while the view lives (the wire
    /// protocol's quiet period for it, see the module docs).
    pub unsafe fn view<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees validity and the absence of writers.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// View as mutable bytes.
    ///
    /// # Safety
    /// The range must be valid memory, and nobody else may read or write it while the view
    /// lives.
    pub unsafe fn view_mut<'a>(self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: the caller guarantees validity and exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

/// Runtime-owned memory that the transport may write into: 8-byte aligned (enough for every
/// dtype), zeroed, never moved while alive. Accessed only through [`RawSlice`].
pub(crate) struct SharedMem {
    // Boxed slice of u64: the allocation never moves and is 8-aligned. After construction it is
    // only reached through raw pointers derived from this one.
    _buf: Box<[u64]>,
    len: usize,
    ptr: *mut u8,
}

// SAFETY: SharedMem is an owned heap allocation; the raw pointer refers to it and is only
// dereferenced under the rules of the module docs, whichever thread holds it.
unsafe impl Send for SharedMem {}
// SAFETY: as above; &SharedMem only hands out the address.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Allocate `len` zeroed bytes.
    pub fn new(len: usize) -> SharedMem {
        let mut buf = vec![0u64; len.div_ceil(8).max(1)].into_boxed_slice();
        let ptr = buf.as_mut_ptr() as *mut u8;
        SharedMem {
            _buf: buf,
            len,
            ptr,
        }
    }
    /// The whole buffer.
    pub fn raw(&self) -> RawSlice {
        RawSlice {
            addr: self.ptr as usize,
            len: self.len,
        }
    }
}

/// Register a raw range with the transport.
///
/// # Safety
/// As [`bps_transport::Transport::register`]: the range stays valid until deregistered, and is
/// accessed only under the rules of the module docs.
pub(crate) unsafe fn register(
    net: &mut bps_transport::Net,
    r: RawSlice,
) -> Result<bps_transport::Region, bps_transport::Error> {
    use bps_transport::Transport;
    // SAFETY: forwarded to the caller.
    unsafe { net.register(r.addr as *mut u8, r.len) }
}
