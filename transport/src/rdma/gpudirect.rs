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
//! The policy is separate from the verbs ([`MrBackend`]) so it is tested with a fake. The verbs
//! side is `rdma::Context::register_dmabuf` (feature `rdma`), and `Net::register_dmabuf` makes
//! such a region a source and destination of one-sided writes over rdma links (and refuses
//! writes from it or into it over any other link: [`dmabuf_write_refused`]); its failures are
//! worded by [`dmabuf_registration_error`].
//!
//! Before any buffer is registered, [`select_route`] decides per peer link whether GPU buffers
//! for that peer go direct at all: only over an rdma link, only where device memory can be
//! exported as a dma-buf and only where the verbs device takes `ibv_reg_dmabuf_mr`; everything
//! else is staged, with the reason in words. The inputs are plain values (the CUDA side is probed
//! by the runtime), so this crate needs no CUDA.

use crate::{Error, LinkKind, Result};

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

/// How GPU buffers travel on one peer link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Register device memory through its dma-buf (`ibv_reg_dmabuf_mr`): the NIC reads and
    /// writes GPU memory, no host copy.
    GpuDirect,
    /// Copy through pinned host memory (device→host before a send, host→device after a receive).
    Staged {
        /// Why not GPUDirect, e.g. `link to server 1 is tcp`.
        reason: String,
    },
}

impl Route {
    /// Whether GPU buffers go direct.
    pub fn is_direct(&self) -> bool {
        matches!(self, Route::GpuDirect)
    }

    /// Why GPU buffers are staged (`None` for [`Route::GpuDirect`]).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Route::GpuDirect => None,
            Route::Staged { reason } => Some(reason),
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::GpuDirect => {
                f.write_str("GPUDirect RDMA (device memory registered through dma-buf)")
            }
            Route::Staged { reason } => write!(f, "staged through pinned host memory ({reason})"),
        }
    }
}

/// What the choice of [`select_route`] depends on besides the link. The same for every link of
/// a process (one GPU per process), so it is probed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuDirectInputs {
    /// `Some(setting)` when configuration turned GPUDirect off; `setting` is what the user wrote,
    /// e.g. `BPS_GPUDIRECT=0`, and is quoted in the reason.
    pub disabled_by: Option<String>,
    /// `Ok` when device memory can be exported as a dma-buf, else why not, e.g.
    /// `cuMemGetHandleForAddressRange: not supported`.
    pub dmabuf_export: std::result::Result<(), String>,
    /// `Ok` when the verbs device accepts `ibv_reg_dmabuf_mr` (as far as is known before trying:
    /// a failure of the first registration is handled by [`Registrar`]), else why not.
    pub verbs_dmabuf: std::result::Result<(), String>,
}

/// Chooses how GPU buffers travel on the link to `peer` (a name for messages, e.g. `server 1`)
/// of kind `link`: [`Route::GpuDirect`] when GPUDirect is not disabled, the link is rdma, device
/// memory exports as a dma-buf and the verbs device registers dma-bufs; otherwise
/// [`Route::Staged`] with the first reason that applies, in that order.
pub fn select_route(peer: &str, link: LinkKind, inputs: &GpuDirectInputs) -> Route {
    let staged = |reason: String| Route::Staged { reason };
    if let Some(setting) = &inputs.disabled_by {
        return staged(format!("GPUDirect RDMA disabled by {setting}"));
    }
    if link != LinkKind::Rdma {
        return staged(format!("link to {peer} is {}", link.name()));
    }
    if let Err(why) = &inputs.dmabuf_export {
        return staged(format!(
            "device memory cannot be exported as a dma-buf: {why}"
        ));
    }
    if let Err(why) = &inputs.verbs_dmabuf {
        return staged(format!("the RDMA device cannot register a dma-buf: {why}"));
    }
    Route::GpuDirect
}

/// Whether the running kernel can register dma-bufs with an RDMA device (`ibv_reg_dmabuf_mr`
/// needs Linux 5.12 or later), from its release string as in `/proc/sys/kernel/osrelease`
/// (`6.8.0-45-generic`).
///
/// # Errors
/// A kernel older than 5.12, or a release string that does not start with `MAJOR.MINOR`.
pub fn kernel_dmabuf_support(release: &str) -> std::result::Result<(), String> {
    let release = release.trim();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    let (Some(major), Some(minor)) = (number(parts.next()), number(parts.next())) else {
        return Err(format!(
            "kernel release {release:?} does not start with MAJOR.MINOR"
        ));
    };
    if (major, minor) >= (5, 12) {
        Ok(())
    } else {
        Err(format!(
            "Linux {major}.{minor} has no dma-buf memory registration (needs 5.12 or later)"
        ))
    }
}

/// The error of a failed `ibv_reg_dmabuf_mr`: names the device, the file descriptor, the
/// offset, length and iova, and says what the errno means. EOPNOTSUPP (the driver, or a
/// libibverbs older than rdma-core 34, has no dma-buf registration) is
/// `Error::Unsupported { feature: "rdma", .. }` (GPUDirect is not possible on this device: the
/// caller stages); anything else is `Error::Io` with the errno kept as the source's kind.
pub fn dmabuf_registration_error(
    device: &str,
    fd: i32,
    offset: u64,
    len: usize,
    iova: u64,
    err: &std::io::Error,
) -> Error {
    let call = format!(
        "ibv_reg_dmabuf_mr on {device} (dma-buf fd {fd}, offset {offset}, {len} bytes, iova \
         {iova:#x})"
    );
    let meaning = match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => {
            return Error::Unsupported {
                feature: "rdma",
                reason: format!(
                    "device {device} cannot register dma-buf memory (driver has no dma-buf \
                     support, or libibverbs is older than rdma-core 34): {call} failed: {err}"
                ),
            }
        }
        Some(libc::EINVAL) => format!(
            "invalid argument: fd {fd} is not a dma-buf, or offset {offset} + {len} bytes runs \
             past its end, or the offset and the iova differ within a page"
        ),
        Some(libc::EBADF) => format!("fd {fd} is not an open file descriptor"),
        Some(libc::ENOMEM) => {
            "out of memory (the device could not map the dma-buf or has no room for another \
             memory region)"
                .to_string()
        }
        Some(libc::EACCES | libc::EPERM) => {
            "access refused: the exporter does not allow the device local and remote write \
             access to this dma-buf"
                .to_string()
        }
        Some(libc::EFAULT) => "bad address (the iova range is not usable)".to_string(),
        Some(libc::ENODEV | libc::ENXIO) => {
            format!("device {device} is gone (removed, or its driver was unloaded)")
        }
        Some(_) => "the device refused the registration".to_string(),
        // Not from the verb (an argument refused before it): the error says it all.
        None => {
            return Error::Io {
                op: format!("rdma: {call}"),
                source: std::io::Error::new(err.kind(), err.to_string()),
            }
        }
    };
    Error::Io {
        op: format!("rdma: {call}"),
        source: std::io::Error::new(err.kind(), format!("{meaning} ({err})")),
    }
}

/// The error of a write from (`from = true`) or into a region of device memory registered
/// through a dma-buf, over a link that is not rdma (`link`: `tcp`, `shm`, `loopback`, or a
/// description such as `not connected`): only the NIC can read and write that memory, the CPU
/// cannot, so tcp, shm and local copies cannot carry it.
pub fn dmabuf_write_refused(token: u64, from: bool, peer: crate::PeerId, link: &str) -> Error {
    let dir = if from { "from" } else { "into" };
    Error::Unsupported {
        feature: "rdma",
        reason: format!(
            "a write {dir} memory token {token:#x} needs an rdma link: it is device memory \
             registered through a dma-buf (Net::register_dmabuf), which the CPU cannot read or \
             write, and the link to peer {peer} is {link} (stage device memory through pinned \
             host memory for peers that are not on rdma)"
        ),
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

    fn all_ok() -> GpuDirectInputs {
        GpuDirectInputs {
            disabled_by: None,
            dmabuf_export: Ok(()),
            verbs_dmabuf: Ok(()),
        }
    }

    #[test]
    fn route_is_direct_when_everything_holds() {
        let r = select_route("server 1", LinkKind::Rdma, &all_ok());
        assert_eq!(r, Route::GpuDirect);
        assert!(r.is_direct());
        assert_eq!(r.reason(), None);
        assert!(r.to_string().contains("GPUDirect"), "{r}");
    }

    #[test]
    fn route_is_staged_over_every_other_link_kind() {
        for (kind, name) in [
            (LinkKind::Tcp, "tcp"),
            (LinkKind::Shm, "shm"),
            (LinkKind::Loopback, "loopback"),
        ] {
            let r = select_route("server 1", kind, &all_ok());
            assert_eq!(
                r,
                Route::Staged {
                    reason: format!("link to server 1 is {name}")
                }
            );
            assert!(!r.is_direct());
        }
    }

    #[test]
    fn route_is_staged_when_disabled_even_over_rdma() {
        let inputs = GpuDirectInputs {
            disabled_by: Some("BPS_GPUDIRECT=0".into()),
            ..all_ok()
        };
        let r = select_route("server 0", LinkKind::Rdma, &inputs);
        assert_eq!(
            r.reason(),
            Some("GPUDirect RDMA disabled by BPS_GPUDIRECT=0")
        );
        // The setting wins over the link: it is what the user asked for.
        let r = select_route("server 0", LinkKind::Tcp, &inputs);
        assert!(r.reason().unwrap().contains("BPS_GPUDIRECT=0"), "{r}");
    }

    #[test]
    fn route_is_staged_when_device_memory_does_not_export() {
        let inputs = GpuDirectInputs {
            dmabuf_export: Err("cuMemGetHandleForAddressRange: not supported".into()),
            verbs_dmabuf: Err("never reached".into()),
            ..all_ok()
        };
        let r = select_route("server 2", LinkKind::Rdma, &inputs);
        assert_eq!(
            r.reason(),
            Some(
                "device memory cannot be exported as a dma-buf: \
                 cuMemGetHandleForAddressRange: not supported"
            )
        );
        assert!(r
            .to_string()
            .starts_with("staged through pinned host memory"));
    }

    #[test]
    fn route_is_staged_when_the_nic_cannot_register_dmabufs() {
        let inputs = GpuDirectInputs {
            verbs_dmabuf: Err("Linux 5.4 has no dma-buf memory registration".into()),
            ..all_ok()
        };
        let r = select_route("server 3", LinkKind::Rdma, &inputs);
        assert_eq!(
            r.reason(),
            Some(
                "the RDMA device cannot register a dma-buf: \
                 Linux 5.4 has no dma-buf memory registration"
            )
        );
    }

    #[test]
    fn kernel_release_gate() {
        assert!(kernel_dmabuf_support("6.8.0-45-generic\n").is_ok());
        assert!(kernel_dmabuf_support("5.12.0").is_ok());
        assert!(kernel_dmabuf_support("5.15.167.4-microsoft-standard-WSL2").is_ok());
        assert!(kernel_dmabuf_support("10.0").is_ok());
        let old = kernel_dmabuf_support("5.11.22-100.fc32.x86_64").unwrap_err();
        assert!(old.contains("5.11") && old.contains("5.12"), "{old}");
        assert!(kernel_dmabuf_support("4.18.0-553.el8_10.x86_64").is_err());
        for bad in ["", "linux", "6", ".6.8", "6.x"] {
            let e = kernel_dmabuf_support(bad).unwrap_err();
            assert!(e.contains("kernel release"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn dmabuf_registration_errors_name_the_call_and_the_errno() {
        let e = |errno| {
            dmabuf_registration_error(
                "rxe0",
                7,
                4096,
                65536,
                0x7f00_0000_1000,
                &std::io::Error::from_raw_os_error(errno),
            )
        };
        // No dma-buf support in the driver: Unsupported, in the words the caller logs.
        match e(libc::EOPNOTSUPP) {
            Error::Unsupported { feature, reason } => {
                assert_eq!(feature, "rdma");
                assert!(
                    reason.starts_with(
                        "device rxe0 cannot register dma-buf memory (driver has no dma-buf support"
                    ),
                    "{reason}"
                );
                for part in [
                    "dma-buf fd 7",
                    "offset 4096",
                    "65536 bytes",
                    "iova 0x7f0000001000",
                    "os error 95",
                ] {
                    assert!(reason.contains(part), "{part}: {reason}");
                }
            }
            other => panic!("{other:?}"),
        }
        // Bad arguments: Io, keeping the errno's kind, with what it means here.
        let inval = e(libc::EINVAL);
        let Error::Io { source, .. } = &inval else {
            panic!("{inval:?}")
        };
        assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput);
        let s = inval.to_string();
        assert!(
            s.starts_with(
                "rdma: ibv_reg_dmabuf_mr on rxe0 (dma-buf fd 7, offset 4096, 65536 bytes"
            ) && s.contains("fd 7 is not a dma-buf")
                && s.contains("os error 22"),
            "{s}"
        );
        assert!(e(libc::EBADF)
            .to_string()
            .contains("fd 7 is not an open file descriptor"));
        assert!(e(libc::ENOMEM).to_string().contains("out of memory"));
        assert!(e(libc::EACCES).to_string().contains("access refused"));
        let other = e(libc::EIO).to_string();
        assert!(
            other.contains("refused the registration") && other.contains("rxe0"),
            "{other}"
        );
        // Refused before the verb: the words given, nothing added.
        let before = dmabuf_registration_error(
            "rxe0",
            7,
            0,
            0,
            0x1000,
            &std::io::Error::new(std::io::ErrorKind::InvalidInput, "zero length"),
        )
        .to_string();
        assert_eq!(
            before,
            "rdma: ibv_reg_dmabuf_mr on rxe0 (dma-buf fd 7, offset 0, 0 bytes, iova 0x1000) \
             failed: zero length"
        );
    }

    #[test]
    fn dmabuf_writes_over_other_links_are_refused_in_words() {
        let e = dmabuf_write_refused(0x51, true, crate::PeerId(3), "tcp");
        let Error::Unsupported { feature, reason } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*feature, "rdma");
        assert!(
            reason.starts_with("a write from memory token 0x51 needs an rdma link")
                && reason.contains("device memory registered through a dma-buf")
                && reason.contains("the link to peer 3 is tcp"),
            "{reason}"
        );
        let into = dmabuf_write_refused(0x51, false, crate::PeerId(0), "loopback").to_string();
        assert!(into.contains("a write into memory token 0x51"), "{into}");
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
