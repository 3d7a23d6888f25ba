//! GPUDirect RDMA: register a GPU buffer with the NIC through its dma-buf, or fall back to
//! staging it through pinned host memory.
//!
//! A GPU buffer exported as a dma-buf (`cuMemGetHandleForAddressRange(…DMA_BUF_FD…)`) can be
//! registered with `ibv_reg_dmabuf_mr`, after which the NIC reads and writes GPU memory directly.
//! That needs Linux ≥ 5.12, a NIC driver with dma-buf support (mlx5) and a GPU driver that exports
//! dma-bufs; where any of it is missing the registration fails and the data has to go through a
//! pinned host buffer (a device↔host copy per transfer). [`Registrar`] makes that choice per
//! buffer, remembers that dma-buf registration failed so it is not retried for every buffer, and
//! says so **once** (one `warn` log line, and [`Registrar::fallback_reason`]).
//!
//! The policy is separate from the verbs ([`MrBackend`]) so it is tested with a fake; the verbs
//! implementation is `rdma::Context` (feature `rdma`).

use crate::{Error, Result};

/// Keys of a registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MrKeys {
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    /// The address peers write to (the iova for a dma-buf region).
    pub addr: u64,
}

/// A buffer to register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffer {
    /// Host memory.
    Host {
        /// Start.
        addr: u64,
        /// Length.
        len: usize,
    },
    /// GPU memory exported as a dma-buf.
    Gpu {
        /// The dma-buf file descriptor.
        fd: i32,
        /// Offset of the buffer in the dma-buf.
        offset: u64,
        /// Length.
        len: usize,
        /// The address peers will use for it (usually the device pointer).
        iova: u64,
    },
}

/// How a buffer ended up registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Host memory, registered as it is.
    Host(MrKeys),
    /// GPU memory, registered through its dma-buf: the NIC reads and writes it directly.
    GpuDirect(MrKeys),
    /// GPU memory that could not be registered: the caller stages it through a pinned host
    /// buffer of `len` bytes (copy device→host before a send, host→device after a receive).
    Staged {
        /// Bytes of host staging memory needed.
        len: usize,
    },
}

/// The verbs a [`Registrar`] needs.
pub trait MrBackend {
    /// `ibv_reg_mr` of host memory.
    ///
    /// # Safety
    /// `addr..addr+len` must stay valid until the region is deregistered.
    unsafe fn reg_host(&mut self, addr: u64, len: usize) -> Result<MrKeys>;
    /// `ibv_reg_dmabuf_mr`.
    ///
    /// # Safety
    /// `fd` must be a dma-buf exporting at least `offset + len` bytes, kept open and valid until
    /// the region is deregistered.
    unsafe fn reg_dmabuf(&mut self, fd: i32, offset: u64, len: usize, iova: u64) -> Result<MrKeys>;
}

/// Chooses between GPUDirect registration and host staging, falling back once.
#[derive(Debug)]
pub struct Registrar<B> {
    backend: B,
    /// Set after the first dma-buf registration failed: every later GPU buffer is staged.
    fallback: Option<String>,
    /// Set to skip GPUDirect altogether (`BPS_RDMA_GPUDIRECT=0`).
    disabled: bool,
}

impl<B: MrBackend> Registrar<B> {
    /// A registrar over `backend`; `gpudirect = false` stages every GPU buffer.
    pub fn new(backend: B, gpudirect: bool) -> Self {
        Registrar {
            backend,
            fallback: None,
            disabled: !gpudirect,
        }
    }

    /// Why GPU buffers are staged, once that was decided.
    pub fn fallback_reason(&self) -> Option<&str> {
        if self.disabled {
            Some("GPUDirect RDMA disabled by configuration")
        } else {
            self.fallback.as_deref()
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Register `buf`.
    ///
    /// # Errors
    /// A host registration that fails (there is nothing to fall back to).
    ///
    /// # Safety
    /// As [`MrBackend::reg_host`] / [`MrBackend::reg_dmabuf`] for the buffer given.
    pub unsafe fn register(&mut self, buf: Buffer) -> Result<Placement> {
        match buf {
            // SAFETY: forwarded; the caller upholds reg_host's contract.
            Buffer::Host { addr, len } => Ok(Placement::Host(unsafe {
                self.backend.reg_host(addr, len)
            }?)),
            Buffer::Gpu { len, .. } if self.disabled || self.fallback.is_some() => {
                Ok(Placement::Staged { len })
            }
            Buffer::Gpu {
                fd,
                offset,
                len,
                iova,
            } => {
                // SAFETY: forwarded; the caller upholds reg_dmabuf's contract.
                match unsafe { self.backend.reg_dmabuf(fd, offset, len, iova) } {
                    Ok(k) => Ok(Placement::GpuDirect(k)),
                    Err(e) => {
                        let why = format!(
                            "GPUDirect RDMA unavailable (ibv_reg_dmabuf_mr failed: {e}); GPU buffers \
                             are staged through pinned host memory (needs Linux >= 5.12, a NIC driver \
                             with dma-buf support and a GPU driver that exports dma-bufs)"
                        );
                        tracing::warn!("rdma: {why}");
                        self.fallback = Some(why);
                        Ok(Placement::Staged { len })
                    }
                }
            }
        }
    }
}

/// An error for backends that cannot do something.
pub fn unsupported(what: &str) -> Error {
    Error::Unsupported {
        feature: "rdma",
        reason: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records calls; dma-buf registration fails while `dmabuf_ok` is false.
    #[derive(Default)]
    struct Fake {
        dmabuf_ok: bool,
        host_calls: u32,
        dmabuf_calls: u32,
    }

    impl MrBackend for Fake {
        unsafe fn reg_host(&mut self, addr: u64, _len: usize) -> Result<MrKeys> {
            self.host_calls += 1;
            Ok(MrKeys {
                lkey: 1,
                rkey: 2,
                addr,
            })
        }
        unsafe fn reg_dmabuf(
            &mut self,
            _fd: i32,
            _off: u64,
            _len: usize,
            iova: u64,
        ) -> Result<MrKeys> {
            self.dmabuf_calls += 1;
            if self.dmabuf_ok {
                Ok(MrKeys {
                    lkey: 3,
                    rkey: 4,
                    addr: iova,
                })
            } else {
                Err(unsupported("Operation not supported (os error 95)"))
            }
        }
    }

    fn gpu(len: usize) -> Buffer {
        Buffer::Gpu {
            fd: 7,
            offset: 0,
            len,
            iova: 0x7f00_0000_0000,
        }
    }

    #[test]
    fn gpu_buffer_goes_direct_when_dmabuf_works() {
        let mut r = Registrar::new(
            Fake {
                dmabuf_ok: true,
                ..Fake::default()
            },
            true,
        );
        // SAFETY: the fake touches no memory.
        let p = unsafe { r.register(gpu(4096)) }.unwrap();
        assert_eq!(
            p,
            Placement::GpuDirect(MrKeys {
                lkey: 3,
                rkey: 4,
                addr: 0x7f00_0000_0000
            })
        );
        assert!(r.fallback_reason().is_none());
    }

    #[test]
    fn failed_dmabuf_falls_back_to_staging_once() {
        let mut r = Registrar::new(Fake::default(), true);
        for len in [4096, 8192, 1 << 20] {
            // SAFETY: the fake touches no memory.
            let p = unsafe { r.register(gpu(len)) }.unwrap();
            assert_eq!(p, Placement::Staged { len });
        }
        assert_eq!(
            r.backend().dmabuf_calls,
            1,
            "dma-buf registration is tried once, not per buffer"
        );
        let why = r.fallback_reason().expect("the reason is kept");
        assert!(
            why.contains("ibv_reg_dmabuf_mr failed") && why.contains("staged"),
            "{why}"
        );
        // Host buffers are unaffected.
        // SAFETY: the fake touches no memory.
        let p = unsafe { r.register(Buffer::Host { addr: 64, len: 8 }) }.unwrap();
        assert!(matches!(p, Placement::Host(_)));
        assert_eq!(r.backend().host_calls, 1);
    }

    #[test]
    fn disabled_gpudirect_stages_without_trying() {
        let mut r = Registrar::new(
            Fake {
                dmabuf_ok: true,
                ..Fake::default()
            },
            false,
        );
        // SAFETY: the fake touches no memory.
        let p = unsafe { r.register(gpu(64)) }.unwrap();
        assert_eq!(p, Placement::Staged { len: 64 });
        assert_eq!(r.backend().dmabuf_calls, 0);
        assert!(r.fallback_reason().is_some());
    }
}
