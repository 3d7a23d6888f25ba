//! The life cycle of the process-global instance through the C functions, in one process: a
//! single worker (which hosts its own scheduler), init twice, operations, shutdown, calls
//! after shutdown, and init again. One test function, since it sets the environment and owns
//! the global instance.

use std::ffi::{c_int, CStr};
use std::ptr;

use bps::*;

const OK: c_int = BpsStatus::BPS_OK.code();

fn last_error() -> String {
    // SAFETY: bps_last_error never returns null; the string is copied at once.
    unsafe { CStr::from_ptr(bps_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
        .to_string()
}

fn single_worker_env() {
    // Set before any bps thread exists (and re-set only after bps_shutdown joined them); this
    // file's only test.
    std::env::set_var("DMLC_ROLE", "worker");
    std::env::set_var("DMLC_NUM_WORKER", "1");
    std::env::set_var("DMLC_NUM_SERVER", "0");
    std::env::set_var("DMLC_PS_ROOT_URI", "127.0.0.1");
    std::env::set_var("DMLC_PS_ROOT_PORT", free_port());
    std::env::set_var("BPS_TIMEOUT", "10s");
}

fn push_pull_round(name: &CStr) {
    let input: Vec<f64> = (0..100).map(f64::from).collect();
    let mut output = vec![0.0f64; 100];
    let mut h = ptr::null_mut();
    // SAFETY: both buffers are 800 bytes and outlive the handle, which is waited on and freed
    // before they are touched.
    unsafe {
        let rc = bps_push_pull_async(
            name.as_ptr(),
            BPS_FLOAT64,
            input.as_ptr().cast(),
            output.as_mut_ptr().cast(),
            800,
            0,
            3,
            &mut h,
        );
        assert_eq!(rc, OK, "{}", last_error());
        assert_eq!(bps_wait(h), OK, "{}", last_error());
        assert_eq!(bps_poll(h), OK);
        bps_handle_free(h);
    }
    assert_eq!(output, input, "one worker: the sum is the input");
}

/// With bps running: on a machine without a usable GPU (or in a build without CUDA) the device
/// calls fail with BPS_ERR_UNSUPPORTED, say why, and leave the handle null; the job goes on.
/// On a machine with a GPU they are not called (the pointer here is host memory).
fn device_calls_without_a_gpu() {
    let unsupported = BpsStatus::BPS_ERR_UNSUPPORTED.code();
    let gpus = bps_gpu_count();
    if gpus > 0 {
        eprintln!("{gpus} GPU(s) visible: device calls not exercised on host memory");
        return;
    }
    assert_eq!(gpus, unsupported, "{}", last_error());
    let m = last_error();
    let why = m
        .strip_prefix("bps_gpu_count: no usable GPU: ")
        .unwrap_or_else(|| panic!("{m}"))
        .to_string();
    assert!(why.len() > 10, "no reason in {m:?}");
    let mut host = [1.0f32; 16];
    let mut h = ptr::dangling_mut();
    // SAFETY: a live local buffer (never used as device memory: the call fails first), a
    // local handle slot, a NUL-terminated name, the default stream.
    unsafe {
        let rc = bps_push_pull_device(
            c"gpu.grad".as_ptr(),
            host.as_mut_ptr().cast(),
            0,
            64,
            BPS_FLOAT32,
            ptr::null_mut(),
            1,
            0,
            &mut h,
        );
        assert_eq!(rc, unsupported, "{}", last_error());
        assert!(h.is_null());
        let m = last_error();
        assert!(m.starts_with("bps_push_pull_device: unsupported: "), "{m}");
        if bps_cuda_compiled() == 1 {
            // The reason bps_gpu_count gives (e.g. no driver on this machine).
            assert!(m.contains(&why), "{m:?} does not say why ({why:?})");
        } else {
            assert!(
                m.contains("cuda"),
                "{m:?} does not say the build lacks CUDA"
            );
        }
        let rc = bps_broadcast_device(
            c"gpu.bcast".as_ptr(),
            host.as_mut_ptr().cast(),
            0,
            64,
            BPS_FLOAT32,
            ptr::null_mut(),
            0,
            0,
            &mut h,
        );
        assert_eq!(rc, unsupported, "{}", last_error());
        assert!(h.is_null());
        assert!(
            last_error().starts_with("bps_broadcast_device: unsupported: "),
            "{}",
            last_error()
        );
        // Arguments are still checked first.
        let rc = bps_broadcast_device(
            c"gpu.bcast".as_ptr(),
            host.as_mut_ptr().cast(),
            0,
            64,
            BPS_FLOAT32,
            ptr::null_mut(),
            3,
            0,
            &mut h,
        );
        assert_eq!(rc, BpsStatus::BPS_ERR_INVALID_ARGUMENT.code());
        assert!(last_error().contains("root"), "{}", last_error());
    }
    assert_eq!(host, [1.0f32; 16]);
    push_pull_round(c"after.gpu");
}

#[test]
fn init_operate_shutdown_reinit() {
    single_worker_env();
    assert_eq!(bps_init(), OK, "{}", last_error());
    assert_eq!(bps_init(), OK, "a second init is a no-op");
    assert_eq!((bps_rank(), bps_size()), (0, 1));
    assert_eq!((bps_local_rank(), bps_local_size()), (0, 1));

    let mut id = u32::MAX;
    // SAFETY: NUL-terminated literals and a local.
    unsafe {
        assert_eq!(bps_declare(c"a".as_ptr(), &mut id), OK);
        assert_eq!(id, 0);
        assert_eq!(bps_declare(c"b".as_ptr(), &mut id), OK);
        assert_eq!(id, 1);
        assert_eq!(bps_declare(c"a".as_ptr(), &mut id), OK);
        assert_eq!(id, 0);
        assert_eq!(
            bps_declare(c"".as_ptr(), &mut id),
            BpsStatus::BPS_ERR_INVALID_ARGUMENT.code()
        );
        assert!(
            last_error().contains("invalid argument"),
            "{}",
            last_error()
        );
    }
    push_pull_round(c"a");

    // Runtime-side argument errors keep the runtime's message.
    let mut buf = [7u8; 6];
    let mut h = ptr::null_mut();
    // SAFETY: a 6-byte local buffer, a local handle slot.
    unsafe {
        let rc = bps_push_pull_async(
            c"odd".as_ptr(),
            BPS_FLOAT32,
            buf.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            6,
            0,
            0,
            &mut h,
        );
        assert_eq!(rc, BpsStatus::BPS_ERR_INVALID_ARGUMENT.code());
        assert!(last_error().contains("whole number"), "{}", last_error());
        assert!(h.is_null());
        // Broadcast from root 0 of a single worker leaves the data as it is.
        let rc = bps_broadcast_async(
            c"bc".as_ptr(),
            BPS_UINT8,
            buf.as_mut_ptr().cast(),
            6,
            0,
            0,
            &mut h,
        );
        assert_eq!(rc, OK, "{}", last_error());
        assert_eq!(bps_wait_timeout(h, 10_000), OK, "{}", last_error());
        bps_handle_free(h);
        let rc = bps_broadcast_async(
            c"bc".as_ptr(),
            BPS_UINT8,
            buf.as_mut_ptr().cast(),
            6,
            1,
            0,
            &mut h,
        );
        assert_eq!(rc, BpsStatus::BPS_ERR_INVALID_ARGUMENT.code());
        assert!(last_error().contains("root"), "{}", last_error());
    }
    assert_eq!(buf, [7u8; 6]);
    device_calls_without_a_gpu();

    assert_eq!(bps_shutdown(), OK, "{}", last_error());
    assert_eq!(bps_shutdown(), OK, "a second shutdown is a no-op");
    let down = BpsStatus::BPS_ERR_SHUT_DOWN.code();
    assert_eq!(bps_rank(), down);
    assert!(last_error().contains("shut down"), "{}", last_error());
    // SAFETY: a 6-byte local buffer, a local handle slot.
    unsafe {
        let rc = bps_broadcast_async(
            c"bc".as_ptr(),
            BPS_UINT8,
            buf.as_mut_ptr().cast(),
            6,
            0,
            0,
            &mut h,
        );
        assert_eq!(rc, down);
        assert!(h.is_null());
    }

    // A fresh instance (a fresh job of one worker).
    single_worker_env();
    assert_eq!(bps_init(), OK, "{}", last_error());
    assert_eq!(bps_size(), 1);
    push_pull_round(c"again");
    assert_eq!(bps_shutdown(), OK, "{}", last_error());
}
