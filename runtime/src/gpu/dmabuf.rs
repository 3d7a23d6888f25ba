//! Device memory as a dma-buf, for GPUDirect RDMA (feature `cuda`).
//!
//! `cuMemGetHandleForAddressRange(…, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, …)` gives a dma-buf
//! file descriptor for a range of device memory; the RDMA device registers it with
//! `ibv_reg_dmabuf_mr(pd, offset, len, iova, fd, access)`, after which the NIC reads and writes
//! GPU memory directly. The driver wants the range aligned to the host page size, so the
//! dma-buf covers [`page_span`] of the buffer and the buffer sits at
//! [`PageSpan::offset`] in it.
//!
//! This needs the open NVIDIA kernel modules (the proprietary ones do not export dma-bufs), which
//! [`dmabuf_supported`] asks the driver about. Whether GPU buffers go direct or are staged is
//! decided per link by `bps_transport::rdma::gpudirect::select_route`; where it says direct, the
//! buffer is registered (`Net::register_dmabuf`) and [`direct_or_staged`] turns the outcome into
//! a [`GpuPath`]: the registered region, or staging through pinned host memory when the
//! registration failed, said once per process (one `warn` line) and not tried again.

use std::ffi::{c_int, c_void};
use std::fmt::Display;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

use bps_transport::rdma::gpudirect::Route;

use cudarc::driver::sys as cu;

/// Why the CUDA driver cannot be called, or `None` when it can.
fn driver_missing() -> Option<String> {
    // SAFETY: only tries to dlopen the driver library under the names cudarc knows; no CUDA call.
    if unsafe { cu::is_culib_present() } {
        None
    } else {
        Some("no CUDA driver (libcuda.so.1 not found)".into())
    }
}

/// Whether the loaded driver has the entry point `name` (cudarc panics on a missing symbol).
fn has_symbol(name: &str) -> bool {
    // SAFETY: called only after `is_culib_present` (so `culib` finds a library instead of
    // panicking); looking a symbol up runs no code of the library.
    unsafe {
        cu::culib()
            .get::<unsafe extern "C" fn()>(name.as_bytes())
            .is_ok()
    }
}

/// A CUDA status in words: `CUDA_ERROR_NOT_SUPPORTED (operation not supported)`.
fn describe(r: cu::CUresult) -> String {
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver is loaded (callers checked); `s` is a valid out-pointer; on success it
    // points at a static NUL-terminated string owned by the driver.
    let text = unsafe {
        if cu::cuGetErrorString(r, &mut s) == cu::CUresult::CUDA_SUCCESS && !s.is_null() {
            Some(std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
        } else {
            None
        }
    };
    match text {
        Some(t) => format!("{r:?} ({t})"),
        None => format!("{r:?}"),
    }
}

/// The host page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// The page-aligned range covering a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSpan {
    /// Start of the range (the buffer's address rounded down to a page).
    pub base: u64,
    /// Length of the range (a whole number of pages).
    pub len: usize,
    /// Where the buffer starts inside the range (its offset in the dma-buf).
    pub offset: u64,
}

/// The range of whole `page`-byte pages covering `ptr..ptr + len`.
///
/// # Errors
/// A null pointer, zero length, a page size that is not a power of two, or a range that runs past
/// the end of the address space.
pub fn page_span(ptr: u64, len: usize, page: usize) -> Result<PageSpan, String> {
    if ptr == 0 {
        return Err("dma-buf export: null device pointer".into());
    }
    if len == 0 {
        return Err(format!("dma-buf export of {ptr:#x}: zero length"));
    }
    if !page.is_power_of_two() {
        return Err(format!(
            "dma-buf export: page size {page} is not a power of two"
        ));
    }
    let mask = page as u64 - 1;
    let base = ptr & !mask;
    let end = ptr
        .checked_add(len as u64)
        .and_then(|e| e.checked_add(mask))
        .map(|e| e & !mask)
        .ok_or_else(|| {
            format!("dma-buf export: {ptr:#x} + {len} runs past the end of the address space")
        })?;
    let span = usize::try_from(end - base)
        .map_err(|_| format!("dma-buf export: {ptr:#x} + {len} is too long"))?;
    Ok(PageSpan {
        base,
        len: span,
        offset: ptr - base,
    })
}

/// Exports the device memory `ptr..ptr + len` (from `cuMemAlloc`, or mapped through
/// `cuMemCreate`/`cuMemMap`) as a dma-buf: the file descriptor covers [`page_span`] of the
/// range, so the buffer sits at `ptr % page_size()` in it. Needs a current CUDA context on
/// the device that owns the memory.
///
/// # Errors
/// Bad input (null pointer, zero length), no driver, a driver without
/// `cuMemGetHandleForAddressRange`, or the driver refusing, e.g.
/// `cuMemGetHandleForAddressRange: CUDA_ERROR_NOT_SUPPORTED (operation not supported)` where the
/// kernel modules cannot export dma-bufs.
pub fn export_dmabuf(ptr: u64, len: usize) -> Result<OwnedFd, String> {
    let span = page_span(ptr, len, page_size())?;
    if let Some(why) = driver_missing() {
        return Err(why);
    }
    if !has_symbol("cuMemGetHandleForAddressRange") {
        return Err(
            "cuMemGetHandleForAddressRange: not in this CUDA driver (needs CUDA 11.7 or later)"
                .into(),
        );
    }
    let mut fd: c_int = -1;
    // SAFETY: the driver is loaded and has the entry point (checked above). For the dma-buf
    // handle type the handle is an `int` the driver writes, and `fd` is one. The range is page
    // aligned as the driver requires; whether it is device memory of the current context is
    // the driver's to check (it answers with an error, it does not touch the range).
    let r = unsafe {
        cu::cuMemGetHandleForAddressRange(
            (&mut fd as *mut c_int).cast::<c_void>(),
            span.base,
            span.len,
            cu::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    };
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(format!(
            "cuMemGetHandleForAddressRange({:#x}, {} bytes): {}",
            span.base,
            span.len,
            describe(r)
        ));
    }
    if fd < 0 {
        return Err(format!(
            "cuMemGetHandleForAddressRange({:#x}, {} bytes) succeeded but gave fd {fd}",
            span.base, span.len
        ));
    }
    // SAFETY: the driver just created this descriptor for us; nothing else owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether CUDA device `ordinal` can export its memory as dma-bufs
/// (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`). Initialises the driver (`cuInit`).
///
/// # Errors
/// Why not: no driver, a bad ordinal, or the device saying no.
pub fn dmabuf_supported(ordinal: i32) -> Result<(), String> {
    if let Some(why) = driver_missing() {
        return Err(why);
    }
    // SAFETY: the driver library is present (checked above); cuInit has no preconditions.
    let r = unsafe { cu::cuInit(0) };
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(format!("cuInit: {}", describe(r)));
    }
    let mut dev: cu::CUdevice = 0;
    // SAFETY: the driver is initialised; `dev` is a valid out-pointer; a bad ordinal is an
    // error return.
    let r = unsafe { cu::cuDeviceGet(&mut dev, ordinal) };
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(format!("CUDA device {ordinal}: {}", describe(r)));
    }
    let mut v: c_int = 0;
    // SAFETY: `dev` came from cuDeviceGet; `v` is a valid out-pointer.
    let r = unsafe {
        cu::cuDeviceGetAttribute(
            &mut v,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED,
            dev,
        )
    };
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(format!(
            "CUDA device {ordinal}: DMA_BUF_SUPPORTED: {}",
            describe(r)
        ));
    }
    if v == 0 {
        return Err(format!(
            "cuMemGetHandleForAddressRange: not supported on CUDA device {ordinal} (dma-buf \
             export needs the open NVIDIA kernel modules)"
        ));
    }
    Ok(())
}

/// How one GPU buffer travels to and from the servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuPath<R> {
    /// Registered through its dma-buf (`R`: the registration, e.g. the transport's `Region`):
    /// the NIC reads and writes device memory, no host copy.
    Direct(R),
    /// Copied through pinned host memory (device → host before a push, host → device after a
    /// pull).
    Staged {
        /// Why not direct: the route's reason, or the failed registration.
        reason: String,
    },
}

impl<R> GpuPath<R> {
    /// Whether the buffer goes direct.
    pub fn is_direct(&self) -> bool {
        matches!(self, GpuPath::Direct(_))
    }
}

/// The fallback from GPUDirect RDMA to staging: once a registration of device memory failed,
/// every later GPU buffer is staged without trying again (the cause — no dma-buf support in the
/// NIC driver, a GPU driver that does not export — holds for the whole process), and the
/// fallback is logged once. [`direct_or_staged`] uses the one of the process.
#[derive(Debug, Default)]
pub struct DmabufFallback {
    failed: OnceLock<String>,
}

impl DmabufFallback {
    /// No failure yet.
    pub const fn new() -> Self {
        DmabufFallback {
            failed: OnceLock::new(),
        }
    }

    /// Why GPU buffers are staged although the route allowed GPUDirect, once a registration
    /// failed.
    pub fn reason(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// The path of one buffer of GPU `gpu` whose links go by `route`: staged with the route's
    /// reason when the route is staged (`register` is not called), staged with the earlier
    /// failure when a registration failed before (not called either), otherwise `register()`
    /// (export the buffer as a dma-buf and register it): direct with its result, or staged when
    /// it fails, logged (`warn`, with the error) the first time only.
    pub fn choose<R, E: Display>(
        &self,
        gpu: i32,
        route: &Route,
        register: impl FnOnce() -> Result<R, E>,
    ) -> GpuPath<R> {
        if let Some(reason) = route.reason() {
            return GpuPath::Staged {
                reason: reason.to_string(),
            };
        }
        if let Some(reason) = self.reason() {
            return GpuPath::Staged {
                reason: reason.to_string(),
            };
        }
        match register() {
            Ok(r) => GpuPath::Direct(r),
            Err(e) => {
                let why = format!("registering device memory for GPUDirect RDMA failed: {e}");
                if self.failed.set(why.clone()).is_ok() {
                    tracing::warn!(
                        "GPU {gpu}: {why}; GPU buffers are staged through pinned host memory from \
                         now on"
                    );
                }
                GpuPath::Staged {
                    reason: self.reason().map_or(why, str::to_string),
                }
            }
        }
    }
}

/// The fallback of this process (see [`DmabufFallback`]).
static FALLBACK: DmabufFallback = DmabufFallback::new();

/// The factor an average over `workers` workers pre-multiplies each GPU's part by (NCCL's
/// `PreMulSum`, as NCCL's own `ncclAvg` does for floating types), as the bytes of one `dtype`
/// element; `None` for integer types, whose average is an integer division of the sum that only
/// the staged path (the runtime, on the host) does. Direct buffers are never touched by the
/// CPU, so their average is taken on the GPU, before the push.
pub fn premul_scalar(dtype: crate::dtype::DType, workers: u32) -> Option<Vec<u8>> {
    use crate::dtype::DType;
    let f = 1.0 / f64::from(workers.max(1));
    Some(match dtype {
        DType::F32 => (f as f32).to_ne_bytes().to_vec(),
        DType::F64 => f.to_ne_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(f).to_bits().to_ne_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f64(f).to_bits().to_ne_bytes().to_vec(),
        DType::I32 | DType::I64 | DType::U8 => return None,
    })
}

/// Whether one operation's buffer may go direct, given that the route allows GPUDirect: a sum
/// of a floating type, or of any type without averaging. A broadcast across hosts and an
/// integer average are staged (the reason is returned).
pub fn direct_eligible(
    dtype: crate::dtype::DType,
    sum: bool,
    average: bool,
    workers: u32,
) -> Result<(), String> {
    if !sum {
        return Err("a broadcast across hosts is staged".into());
    }
    if average && premul_scalar(dtype, workers).is_none() {
        return Err(format!(
            "an average of {dtype} is an integer division the GPU path does not do: staged"
        ));
    }
    Ok(())
}

/// [`DmabufFallback::choose`] with the process's fallback: what the GPU engine calls per buffer
/// once `select_route` decided the route of its server links, with `register` exporting the
/// buffer ([`export_dmabuf`]) and registering it with the transport (`Net::register_dmabuf`).
pub fn direct_or_staged<R, E: Display>(
    gpu: i32,
    route: &Route,
    register: impl FnOnce() -> Result<R, E>,
) -> GpuPath<R> {
    FALLBACK.choose(gpu, route, register)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Runs `f` with this thread's log lines (warn and up) captured; returns them.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("sink").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let w = sink.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(sink.0.lock().expect("sink").clone()).expect("utf-8");
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn premul_scalars_are_one_over_the_workers_in_the_element_type() {
        use crate::dtype::DType;
        let f32v = premul_scalar(DType::F32, 4).expect("f32");
        assert_eq!(f32::from_ne_bytes(f32v.try_into().expect("4 bytes")), 0.25);
        let f64v = premul_scalar(DType::F64, 3).expect("f64");
        assert_eq!(
            f64::from_ne_bytes(f64v.try_into().expect("8 bytes")),
            1.0 / 3.0
        );
        let h = premul_scalar(DType::F16, 8).expect("f16");
        let h = half::f16::from_bits(u16::from_ne_bytes(h.try_into().expect("2 bytes")));
        assert_eq!(h.to_f32(), 0.125);
        let b = premul_scalar(DType::BF16, 2).expect("bf16");
        let b = half::bf16::from_bits(u16::from_ne_bytes(b.try_into().expect("2 bytes")));
        assert_eq!(b.to_f32(), 0.5);
        for t in [DType::I32, DType::I64, DType::U8] {
            assert_eq!(premul_scalar(t, 4), None, "{t}");
        }
        assert_eq!(
            f32::from_ne_bytes(
                premul_scalar(DType::F32, 0)
                    .expect("f32")
                    .try_into()
                    .expect("4")
            ),
            1.0,
            "no division by zero"
        );
    }

    #[test]
    fn direct_only_for_sums_a_gpu_can_average() {
        use crate::dtype::DType;
        assert!(direct_eligible(DType::F32, true, true, 4).is_ok());
        assert!(direct_eligible(DType::I32, true, false, 4).is_ok());
        let e = direct_eligible(DType::I32, true, true, 4).unwrap_err();
        assert!(e.contains("i32") && e.contains("staged"), "{e}");
        let e = direct_eligible(DType::F16, false, false, 4).unwrap_err();
        assert!(e.contains("broadcast"), "{e}");
    }

    fn staged(reason: &str) -> Route {
        Route::Staged {
            reason: reason.into(),
        }
    }

    #[test]
    fn direct_when_the_registration_works() {
        let fb = DmabufFallback::new();
        let lines = logged(|| {
            let p = fb.choose(0, &Route::GpuDirect, || Ok::<_, String>(42u64));
            assert_eq!(p, GpuPath::Direct(42));
            assert!(p.is_direct());
        });
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(fb.reason(), None);
    }

    #[test]
    fn a_failed_registration_stages_and_is_logged_once() {
        let fb = DmabufFallback::new();
        let err = "transport backend rdma is unsupported: device rxe0 cannot register dma-buf \
                   memory (driver has no dma-buf support)";
        let lines = logged(|| {
            let p = fb.choose(3, &Route::GpuDirect, || Err::<u64, _>(err));
            let GpuPath::Staged { reason } = &p else {
                panic!("{p:?}")
            };
            assert!(
                reason.starts_with("registering device memory for GPUDirect RDMA failed")
                    && reason.contains(err),
                "{reason}"
            );
            // Later buffers: staged with the same reason, without trying again, no new log.
            for _ in 0..3 {
                let q = fb.choose(3, &Route::GpuDirect, || -> Result<u64, String> {
                    panic!("registration retried after it failed")
                });
                assert_eq!(q, p);
            }
        });
        assert_eq!(lines.len(), 1, "one log line: {lines:?}");
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("GPU 3")
                && lines[0].contains(err)
                && lines[0].contains("staged through pinned host memory"),
            "{}",
            lines[0]
        );
        assert!(fb.reason().is_some_and(|r| r.contains("rxe0")));
    }

    #[test]
    fn a_staged_route_stages_without_registering() {
        let fb = DmabufFallback::new();
        let lines = logged(|| {
            let p = fb.choose(
                1,
                &staged("link to the servers is tcp"),
                || -> Result<u64, String> { panic!("registered although the route is staged") },
            );
            assert_eq!(
                p,
                GpuPath::Staged {
                    reason: "link to the servers is tcp".into()
                }
            );
            assert!(!p.is_direct());
        });
        assert!(
            lines.is_empty(),
            "the route was logged where it was chosen: {lines:?}"
        );
        // Not a failure: a later direct route still registers.
        assert_eq!(fb.reason(), None);
        assert_eq!(
            fb.choose(1, &Route::GpuDirect, || Ok::<_, String>(5u8)),
            GpuPath::Direct(5)
        );
    }

    #[test]
    fn the_process_fallback_is_the_same_policy() {
        // A staged route leaves the process's state alone (other tests may share it).
        let p = direct_or_staged(0, &staged("BPS_GPUDIRECT=0"), || -> Result<u8, String> {
            panic!("registered although the route is staged")
        });
        assert_eq!(
            p,
            GpuPath::Staged {
                reason: "BPS_GPUDIRECT=0".into()
            }
        );
    }

    #[test]
    fn spans_are_page_aligned() {
        assert_eq!(
            page_span(0x1000, 0x1000, 4096),
            Ok(PageSpan {
                base: 0x1000,
                len: 0x1000,
                offset: 0
            })
        );
        assert_eq!(
            page_span(0x1010, 0x10, 4096),
            Ok(PageSpan {
                base: 0x1000,
                len: 0x1000,
                offset: 0x10
            })
        );
        // Crossing a page boundary takes both pages.
        assert_eq!(
            page_span(0x1ff0, 0x20, 4096),
            Ok(PageSpan {
                base: 0x1000,
                len: 0x2000,
                offset: 0xff0
            })
        );
        assert_eq!(
            page_span(0x7f00_0001_0000, 3 << 20, 65536),
            Ok(PageSpan {
                base: 0x7f00_0001_0000,
                len: 3 << 20,
                offset: 0
            })
        );
        assert!(page_size().is_power_of_two());
    }

    #[test]
    fn bad_ranges_are_named() {
        assert!(page_span(0, 8, 4096).unwrap_err().contains("null"));
        assert!(page_span(0x1000, 0, 4096)
            .unwrap_err()
            .contains("zero length"));
        assert!(page_span(0x1000, 8, 3000).unwrap_err().contains("3000"));
        assert!(page_span(u64::MAX - 10, 100, 4096)
            .unwrap_err()
            .contains("past the end"));
        assert!(export_dmabuf(0, 8).unwrap_err().contains("null"));
    }

    #[test]
    fn export_without_a_driver_is_an_error_not_a_panic() {
        // On a machine with a driver but no context/allocation at this address the driver
        // refuses; without one the missing library is named. Either way: an error.
        let e = export_dmabuf(0x7000_0000_0000, 4096).unwrap_err();
        assert!(!e.is_empty());
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { cu::is_culib_present() } {
            assert_eq!(e, "no CUDA driver (libcuda.so.1 not found)");
            assert_eq!(
                dmabuf_supported(0).unwrap_err(),
                "no CUDA driver (libcuda.so.1 not found)"
            );
        }
    }

    /// On a machine with an NVIDIA GPU: export a real allocation (at an offset inside a page).
    #[test]
    #[ignore = "needs an NVIDIA GPU and driver"]
    fn export_real_allocation() {
        // SAFETY: only tries to dlopen the driver library.
        assert!(unsafe { cu::is_culib_present() }, "no CUDA driver");
        if let Err(why) = dmabuf_supported(0) {
            // The driver says no (proprietary kernel modules): export must say no as well.
            eprintln!("dma-buf not supported: {why}");
        }
        let mut dev: cu::CUdevice = 0;
        let mut ctx: cu::CUcontext = std::ptr::null_mut();
        let mut ptr: cu::CUdeviceptr = 0;
        let len = 4 << 20;
        // SAFETY: the driver is loaded and initialised (dmabuf_supported called cuInit); all
        // out-pointers are valid; the primary context of device 0 is retained, made current,
        // used for one allocation that is freed below, and released.
        unsafe {
            assert_eq!(cu::cuDeviceGet(&mut dev, 0), cu::CUresult::CUDA_SUCCESS);
            assert_eq!(
                cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                cu::CUresult::CUDA_SUCCESS
            );
            assert_eq!(cu::cuCtxSetCurrent(ctx), cu::CUresult::CUDA_SUCCESS);
            assert_eq!(cu::cuMemAlloc_v2(&mut ptr, len), cu::CUresult::CUDA_SUCCESS);
        }
        let result = export_dmabuf(ptr + 256, len - 256);
        match (&result, dmabuf_supported(0)) {
            (Ok(fd), _) => {
                use std::os::fd::AsRawFd;
                let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                eprintln!("exported {len} bytes at {ptr:#x}+256 as fd -> {target}");
                assert!(target.contains("dmabuf"), "{target}");
            }
            (Err(e), Ok(())) => panic!("the device says dma-buf works, export failed: {e}"),
            (Err(e), Err(_)) => eprintln!("export refused as expected: {e}"),
        }
        drop(result);
        // SAFETY: `ptr` came from cuMemAlloc in the current context; the context was retained.
        unsafe {
            assert_eq!(cu::cuMemFree_v2(ptr), cu::CUresult::CUDA_SUCCESS);
            cu::cuDevicePrimaryCtxRelease_v2(dev);
        }
    }
}
