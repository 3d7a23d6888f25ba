//! The only `unsafe` of bps-bench: memory registered with the transport for `bps-bench raw`.
//!
//! [`Transport::register`] is an `unsafe fn` (the memory must outlive the registration and be
//! touched only when the transport does not). [`RegNet`] owns both the [`Net`] and the memory it
//! registers, and upholds those rules by construction, so the rest of the tool stays safe:
//!
//! * the memory is allocated here, never moved, and freed only after the `Net` was dropped (the
//!   `net` field is declared, and so dropped, before `bufs`); the `Net` is never handed out by
//!   `&mut` (that would let a caller move it out and keep it past the memory), only its methods
//!   are forwarded;
//! * a `Net` reads and writes registered memory only inside its own `&mut self` methods, on the
//!   calling thread (it has no threads of its own). [`RegNet::bytes`] borrows `&self`, so no such
//!   call can run while the returned slice lives: the bytes cannot change under it;
//! * the initial contents are written before the memory is registered, never after.
//!
//! This would belong in `bps-transport` as a safe owned-buffer registration (e.g.
//! `Net::register_owned(len, init) -> Region` and `Net::region(&self, token) -> &[u8]`); with that,
//! this module goes and the crate can return to `#![forbid(unsafe_code)]`.

use std::time::Duration;

use bps_transport::{Event, LinkKind, Net, PeerAddr, PeerId, Region, RemoteSlice, Transport};

/// An 8-byte aligned, zero-initialised heap allocation reached only through its raw pointer.
struct Buf {
    token: u64,
    /// From `Box::into_raw`; turned back into the box on drop.
    ptr: *mut [u64],
    len: usize,
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `Box::into_raw` and is turned back exactly once, here. The Net
        // that knew it was dropped before (field order of RegNet), so nobody uses it after this.
        drop(unsafe { Box::from_raw(self.ptr) });
    }
}

/// A [`Net`] together with the memory registered with it.
pub struct RegNet {
    // Declared first: dropped before the memory it may still point to.
    net: Net,
    bufs: Vec<Buf>,
}

impl RegNet {
    /// Take ownership of a transport that has no registrations yet.
    pub fn new(net: Net) -> Self {
        RegNet {
            net,
            bufs: Vec::new(),
        }
    }

    /// Allocate `len` bytes (8-byte aligned), let `init` fill them, then register them.
    pub fn alloc(
        &mut self,
        len: usize,
        init: impl FnOnce(&mut [u8]),
    ) -> bps_transport::Result<Region> {
        let mut words = vec![0u64; len.div_ceil(8).max(1)].into_boxed_slice();
        {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words[..]);
            init(&mut bytes[..len]);
        }
        let ptr = Box::into_raw(words);
        let data = ptr as *mut u8;
        // SAFETY: `data..data+len` is a live allocation owned by the Buf pushed below, freed only
        // after the Net is dropped; from here on it is reached only through `ptr` (by the Net
        // inside its methods, and by `bytes` while no Net method can run).
        let region = match unsafe { self.net.register(data, len) } {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: not registered; `ptr` came from `Box::into_raw` just above.
                drop(unsafe { Box::from_raw(ptr) });
                return Err(e);
            }
        };
        self.bufs.push(Buf {
            token: region.token,
            ptr,
            len,
        });
        Ok(region)
    }

    /// The bytes of a region allocated here, as they are now.
    pub fn bytes(&self, token: u64) -> Option<&[u8]> {
        let b = self.bufs.iter().find(|b| b.token == token)?;
        // SAFETY: the allocation is live (freed only with `self`) and at least `len` bytes long.
        // Nothing writes it while the slice lives: over tcp and shm only the Net writes it,
        // inside `&mut self` methods of this RegNet, which the `&self` borrow excludes; over
        // rdma the NIC writes asynchronously, and `raw` reads a receive region only after every
        // write of the round has been reported received and before the next round is sent, so
        // no write into it is in flight while the slice lives.
        Some(unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.len) })
    }

    /// See [`Transport::add_peer`].
    pub fn add_peer(&mut self, peer: PeerId, addr: PeerAddr) -> bps_transport::Result<()> {
        self.net.add_peer(peer, addr)
    }

    /// See [`Transport::try_send`].
    pub fn try_send(&mut self, peer: PeerId, lane: u32, msg: &[u8]) -> bps_transport::Result<()> {
        self.net.try_send(peer, lane, msg)
    }

    /// See [`Transport::try_write_imm`].
    #[allow(clippy::too_many_arguments)]
    pub fn try_write_imm(
        &mut self,
        peer: PeerId,
        lane: u32,
        src: u64,
        src_offset: u64,
        len: u64,
        dst: RemoteSlice,
        imm: u32,
        wr_id: u64,
    ) -> bps_transport::Result<()> {
        self.net
            .try_write_imm(peer, lane, src, src_offset, len, dst, imm, wr_id)
    }

    /// See [`Transport::poll`].
    pub fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> bps_transport::Result<()> {
        self.net.poll(events, timeout)
    }

    /// See [`Transport::link_kind`].
    pub fn link_kind(&self, peer: PeerId) -> Option<LinkKind> {
        self.net.link_kind(peer)
    }
}
