//! GPU tensors end to end. The tests that need GPUs are ignored here and run by `ci/gpu` on a
//! GPU machine (`gpu-tests --ignored`); the rest run everywhere and check what a CUDA build
//! does on a machine without a usable GPU.

mod common;

use bps_runtime::{gpu, DType, DeviceBuf, Error, PushPullOpts};
use common::job;

#[test]
fn device_tensor_without_gpu_is_a_clear_error() {
    if gpu::probe().is_ok() {
        eprintln!("skipped: this machine has a usable GPU (the GPU tests cover it)");
        return;
    }
    job(1, 0, &[], |b| {
        let buf = DeviceBuf {
            ptr: 0x1000,
            device: 0,
            bytes: 64,
            dtype: DType::F32,
            stream: 0,
        };
        // SAFETY: the runtime must refuse before touching the (fake) device pointer.
        let r = unsafe { b.push_pull_device("g", buf, PushPullOpts::default()) };
        match r {
            Err(Error::Unsupported(msg)) => {
                assert!(
                    msg.contains("libcuda") || msg.contains("CUDA") || msg.contains("GPU"),
                    "the message says why: {msg}"
                );
            }
            Err(e) => panic!("expected Unsupported, got {e}"),
            Ok(_) => panic!("a device push_pull without a GPU must fail"),
        }
        // SAFETY: as above.
        let r = unsafe { b.broadcast_device("g", buf, 0, 0) };
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        assert!(b.gpus().is_err());
        // The host path still works after the refusal.
        let out = b
            .push_pull("h", vec![1.0f32; 8], PushPullOpts::default())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(out, vec![1.0f32; 8]);
    });
}

#[test]
fn device_tensor_arguments_are_checked_first() {
    job(1, 0, &[], |b| {
        let mut buf = DeviceBuf {
            ptr: 0x1000,
            device: 0,
            bytes: 6,
            dtype: DType::F32,
            stream: 0,
        };
        // SAFETY: refused before any use of the pointer.
        let r = unsafe { b.push_pull_device("g", buf, PushPullOpts::default()) };
        match r {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("6 bytes"), "{m}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        buf.bytes = 8;
        buf.ptr = 0;
        // SAFETY: refused before any use of the pointer.
        let r = unsafe { b.push_pull_device("g", buf, PushPullOpts::default()) };
        match r {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("null"), "{m}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        // SAFETY: refused before any use of the pointer.
        let r = unsafe { b.broadcast_device("g", buf, 7, 0) };
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    });
}

#[cfg(feature = "cuda")]
mod on_gpu {
    //! Device memory helpers over the raw driver API (the runtime's own GPU code is what is
    //! under test, so the tests do not go through it to set up data).
    use super::*;
    use bps_runtime::Bps;
    use cudarc::driver::sys as cu;
    use half::{bf16, f16};

    pub fn gpus() -> usize {
        gpu::probe().map(|g| g.len()).unwrap_or(0)
    }

    /// Make the primary context of `dev` current on this thread.
    pub fn use_device(dev: i32) {
        let mut d = 0;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: probe() initialised the driver; valid out-pointers; an existing ordinal.
        unsafe {
            assert_eq!(cu::cuInit(0), cu::CUresult::CUDA_SUCCESS);
            assert_eq!(cu::cuDeviceGet(&mut d, dev), cu::CUresult::CUDA_SUCCESS);
            assert_eq!(
                cu::cuDevicePrimaryCtxRetain(&mut ctx, d),
                cu::CUresult::CUDA_SUCCESS
            );
            assert_eq!(cu::cuCtxSetCurrent(ctx), cu::CUresult::CUDA_SUCCESS);
        }
    }

    pub struct Dev {
        pub ptr: u64,
    }

    impl Drop for Dev {
        fn drop(&mut self) {
            // SAFETY: allocated by upload() and no longer in use (its operation completed).
            unsafe {
                cu::cuMemFree_v2(self.ptr);
            }
        }
    }

    pub fn upload<T: bytemuck::Pod>(v: &[T]) -> Dev {
        let bytes = std::mem::size_of_val(v).max(1);
        let mut p = 0;
        // SAFETY: valid out-pointer; the copy reads `bytes` bytes of the slice (or none).
        unsafe {
            assert_eq!(cu::cuMemAlloc_v2(&mut p, bytes), cu::CUresult::CUDA_SUCCESS);
            if !v.is_empty() {
                assert_eq!(
                    cu::cuMemcpyHtoD_v2(p, v.as_ptr() as *const _, std::mem::size_of_val(v)),
                    cu::CUresult::CUDA_SUCCESS
                );
            }
        }
        Dev { ptr: p }
    }

    pub fn download<T: bytemuck::Pod + Default + Clone>(d: &Dev, n: usize) -> Vec<T> {
        let mut v = vec![T::default(); n];
        // SAFETY: the device buffer holds at least n elements; the slice has room for them.
        unsafe {
            assert_eq!(
                cu::cuMemcpyDtoH_v2(
                    v.as_mut_ptr() as *mut _,
                    d.ptr,
                    std::mem::size_of_val(v.as_slice())
                ),
                cu::CUresult::CUDA_SUCCESS
            );
        }
        v
    }

    /// Small integers: exact in f16/bf16/f32 whatever the order of the sum.
    /// `n` f32 elements of `d` on GPU `dev`, on the default stream.
    pub fn f32_buf(d: &Dev, dev: i32, n: usize) -> DeviceBuf {
        DeviceBuf {
            ptr: d.ptr,
            device: dev,
            bytes: n * 4,
            dtype: DType::F32,
            stream: 0,
        }
    }

    pub fn value(i: usize, rank: u32) -> f32 {
        ((i % 13) as u32 + rank) as f32
    }

    pub fn sum_check(b: &Bps, dev: i32, name: &str, n: usize, dtype: DType, average: bool) {
        let r = b.rank();
        let w = b.size();
        let expect = |i: usize| -> f32 {
            let s: f32 = (0..w)
                .map(|q| value(i, q) * if average { w as f32 } else { 1.0 })
                .sum();
            if average {
                s / w as f32
            } else {
                s
            }
        };
        let scale = if average { w as f32 } else { 1.0 };
        let opts = PushPullOpts {
            average,
            priority: 0,
        };
        macro_rules! run {
            ($t:ty, $from:expr, $to:expr) => {{
                let host: Vec<$t> = (0..n).map(|i| $from(value(i, r) * scale)).collect();
                let d = upload(&host);
                let buf = DeviceBuf {
                    ptr: d.ptr,
                    device: dev,
                    bytes: n * std::mem::size_of::<$t>(),
                    dtype,
                    stream: 0,
                };
                // SAFETY: `d` lives until after the wait; nothing else touches it.
                let h = unsafe { b.push_pull_device(name, buf, opts) }.unwrap();
                b.wait(&h).unwrap();
                let got: Vec<$t> = download(&d, n);
                for (i, x) in got.iter().enumerate() {
                    assert_eq!(
                        $to(*x),
                        expect(i),
                        "{name}: {dtype} element {i} of {n} on rank {r}"
                    );
                }
            }};
        }
        match dtype {
            DType::F32 => run!(f32, |x: f32| x, |x: f32| x),
            DType::F16 => run!(f16, f16::from_f32, |x: f16| x.to_f32()),
            DType::BF16 => run!(bf16, bf16::from_f32, |x: bf16| x.to_f32()),
            other => panic!("not used here: {other}"),
        }
    }

    /// The whole suite for one job layout: every dtype, odd sizes, average, many in flight,
    /// broadcast.
    pub fn suite(b: Bps, gpus_per_worker: impl Fn(u32) -> i32) {
        let dev = gpus_per_worker(b.rank());
        use_device(dev);
        for (k, n) in [1usize, 3, 1023, (5 << 20) / 4 + 1].into_iter().enumerate() {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let name = format!("t{k}-{dtype}");
                sum_check(&b, dev, &name, n, dtype, false);
                // Same tensor again: the second round must not mix with the first.
                sum_check(&b, dev, &name, n, dtype, false);
            }
        }
        sum_check(&b, dev, "avg", 100_003, DType::F32, true);
        // Many tensors in flight, mixed priorities.
        let r = b.rank();
        let w = b.size();
        let n = 300_007usize;
        let bufs: Vec<(Dev, bps_runtime::Handle)> = (0..12)
            .map(|t| {
                let host: Vec<f32> = (0..n).map(|i| value(i + t, r)).collect();
                let d = upload(&host);
                let buf = f32_buf(&d, dev, n);
                let opts = PushPullOpts {
                    average: false,
                    priority: (t % 3) as i32,
                };
                // SAFETY: `d` is kept in the vector until after the wait.
                let h = unsafe { b.push_pull_device(&format!("many{t}"), buf, opts) }.unwrap();
                (d, h)
            })
            .collect();
        for (t, (d, h)) in bufs.iter().enumerate() {
            b.wait(h).unwrap();
            let got: Vec<f32> = download(d, n);
            for (i, x) in got.iter().enumerate() {
                let e: f32 = (0..w).map(|q| value(i + t, q)).sum();
                assert_eq!(*x, e, "many{t} element {i}");
            }
        }
        // One tensor, several operations submitted back to back before any is waited for:
        // each sums the previous result (in place), so they must run in order, each on the
        // whole previous sum. Values stay small integers: exact in f32.
        let n = (3 << 20) / 4 + 5;
        let host: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let d = upload(&host);
        let buf = f32_buf(&d, dev, n);
        let reps = 5u32;
        let hs: Vec<_> = (0..reps)
            // SAFETY: `d` lives until after the waits below.
            .map(|_| unsafe { b.push_pull_device("again", buf, PushPullOpts::default()) }.unwrap())
            .collect();
        for h in &hs {
            b.wait(h).unwrap();
        }
        let got: Vec<f32> = download(&d, n);
        let f = (w as f32).powi(reps as i32);
        for (i, x) in got.iter().enumerate() {
            assert_eq!(*x, (i % 7) as f32 * f, "back-to-back element {i}");
        }
        // Broadcast from the last worker.
        let root = w - 1;
        let host: Vec<f32> = (0..n).map(|i| value(i, r) + 1000.0 * r as f32).collect();
        let d = upload(&host);
        let buf = f32_buf(&d, dev, n);
        // SAFETY: `d` lives until after the wait.
        let h = unsafe { b.broadcast_device("bcast", buf, root, 0) }.unwrap();
        b.wait(&h).unwrap();
        let got: Vec<f32> = download(&d, n);
        for (i, x) in got.iter().enumerate() {
            assert_eq!(
                *x,
                value(i, root) + 1000.0 * root as f32,
                "broadcast element {i}"
            );
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_job(workers: u32, servers: u32, local: u32, extra: &[(&str, &str)]) {
    let have = on_gpu::gpus();
    if have == 0 {
        panic!("needs a GPU: {}", gpu::probe().unwrap_err());
    }
    let l = local.to_string();
    let mut env: Vec<(&str, &str)> = vec![("BYTEPS_LOCAL_SIZE", l.as_str())];
    env.extend_from_slice(extra);
    let n = have as u32;
    job(workers, servers, &env, move |b| {
        on_gpu::suite(b, |rank| (rank % n) as i32)
    });
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs GPUs: run by ci/gpu on a GPU machine"]
fn gpu_one_node_each_gpu_count() {
    let have = on_gpu::gpus() as u32;
    for n in [1u32, 2, 4] {
        if n > have {
            eprintln!("{n} GPUs: skipped, this machine has {have}");
            continue;
        }
        eprintln!("one node, {n} GPUs");
        gpu_job(n, 0, n, &[]);
    }
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs GPUs: run by ci/gpu on a GPU machine"]
fn gpu_two_nodes_of_two_gpus_with_a_cpu_server_over_tcp() {
    gpu_job(
        4,
        1,
        2,
        &[
            ("BPS_TRANSPORT", "tcp"),
            ("BYTEPS_PARTITION_BYTES", "1048576"),
        ],
    );
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs GPUs: run by ci/gpu on a GPU machine"]
fn gpu_two_nodes_colocated_servers() {
    gpu_job(4, 0, 2, &[("BYTEPS_PARTITION_BYTES", "262144")]);
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs GPUs: run by ci/gpu on a GPU machine"]
fn gpu_one_gpu_per_node_staging_only() {
    gpu_job(2, 1, 1, &[("BPS_TRANSPORT", "tcp")]);
}
