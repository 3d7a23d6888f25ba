//! RDMA verbs, below `Net`: two RC queue pairs of one process connected to each other over the
//! device (Soft-RoCE `rxe0` in CI's guest, see `ci/softroce`), the device/GID/port errors, and a
//! raw WRITE_WITH_IMM throughput measurement.
//!
//! Without a device (or without feature `rdma`) every test prints why and passes, unless
//! `BPS_RDMA_REQUIRE=1` (set by `ci/softroce` inside the guest), which turns the skip into a
//! failure so a broken guest can never look green.

use std::time::{Duration, Instant};

use bps_transport::rdma::{self, Completion, Context, QueuePair, RdmaConfig, WorkRequest};
use bps_transport::Error;

/// The device to test on, or `None` (skip) with the reason printed.
fn device() -> Option<RdmaConfig> {
    let cfg = RdmaConfig {
        device: std::env::var("RXE_DEV").ok(),
        gid_index: std::env::var("RXE_GID_INDEX")
            .ok()
            .and_then(|v| v.parse().ok()),
        ..RdmaConfig::default()
    };
    match rdma::probe(&cfg) {
        Ok(s) => {
            eprintln!("rdma device: {s}");
            Some(cfg)
        }
        Err(e) if std::env::var("BPS_RDMA_REQUIRE").as_deref() == Ok("1") => {
            panic!("BPS_RDMA_REQUIRE=1 but no usable RDMA device: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Heap memory with a stable address.
struct Buf(Box<[u8]>);

impl Buf {
    fn pattern(len: usize, seed: u8) -> Buf {
        Buf((0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect())
    }
    fn zeroed(len: usize) -> Buf {
        Buf(vec![0u8; len].into_boxed_slice())
    }
    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
}

/// Waits for `n` completions on `qp`, failing on an error status or after 30 s.
fn wait(qp: &QueuePair, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let want = n - out.len();
        qp.poll(&mut out, want).expect("poll");
        assert!(
            Instant::now() < end,
            "timed out: {} of {n} completions: {out:?}",
            out.len()
        );
    }
    for c in &out {
        assert!(c.is_ok(), "completion failed: {c:?}");
    }
    out
}

fn pair(ctx: &Context) -> (QueuePair, QueuePair) {
    let mut a = ctx.create_qp(64, 64).expect("create QP a");
    let mut b = ctx.create_qp(64, 64).expect("create QP b");
    let (ea, eb) = (a.endpoint(), b.endpoint());
    a.connect(&eb).expect("connect a to b");
    b.connect(&ea).expect("connect b to a");
    (a, b)
}

#[test]
fn loopback_send_write_imm_and_large_write() {
    let Some(cfg) = device() else { return };
    let ctx = Context::open(&cfg).expect("open the device");
    let (mut a, mut b) = pair(&ctx);
    const LEN: usize = 9 << 20; // over rxe's 8 MiB max_msg_sz: one WR of 9 MiB still works on rxe
    let mut src = Buf::pattern(LEN, 7);
    let mut dst = Buf::zeroed(LEN);
    let mut rx = Buf::zeroed(4096);
    // SAFETY: the buffers outlive the regions (dropped at the end of the test, after them).
    let (ms, md, mr) = unsafe {
        (
            ctx.register(src.ptr(), LEN).expect("register src"),
            ctx.register(dst.ptr(), LEN).expect("register dst"),
            ctx.register(rx.ptr(), 4096).expect("register rx"),
        )
    };
    assert!(ctx.registered_bytes() >= 2 * LEN as u64);
    // Four receives: a SEND, two WRITE_WITH_IMM, a zero-length WRITE_WITH_IMM.
    let bufs: Vec<(u64, u32, u64, u32)> = (0..4).map(|i| (i, mr.lkey(), mr.addr(), 4096)).collect();
    // SAFETY: `rx` is registered and not touched until the completions.
    unsafe { b.post_recv(&bufs) }.expect("post receives");

    // SEND of 100 bytes.
    // SAFETY: ranges inside registered regions, unmodified until completion.
    unsafe {
        a.post_send(&[WorkRequest::Send {
            wr_id: 1,
            lkey: ms.lkey(),
            addr: ms.addr(),
            len: 100,
        }])
    }
    .expect("post send");
    let c = wait(&b, 1);
    assert_eq!((c[0].opcode, c[0].byte_len), (Completion::RECV, 100));
    assert_eq!(&rx.0[..100], &src.0[..100]);
    wait(&a, 1);

    // WRITE_WITH_IMM of 4 KiB at an odd offset, then one of the whole 9 MiB, then 0 bytes.
    let t = Instant::now();
    // SAFETY: as above; the remote ranges lie in `md`.
    unsafe {
        a.post_send(&[
            WorkRequest::WriteImm {
                wr_id: 2,
                lkey: ms.lkey(),
                addr: ms.addr() + 3,
                len: 4096,
                rkey: md.rkey(),
                remote_addr: md.addr() + 17,
                imm: 0xA5A5_0001,
            },
            WorkRequest::WriteImm {
                wr_id: 3,
                lkey: ms.lkey(),
                addr: ms.addr(),
                len: LEN as u32,
                rkey: md.rkey(),
                remote_addr: md.addr(),
                imm: 0xA5A5_0002,
            },
            WorkRequest::WriteImm {
                wr_id: 4,
                lkey: ms.lkey(),
                addr: ms.addr(),
                len: 0,
                rkey: md.rkey(),
                remote_addr: md.addr() + LEN as u64,
                imm: 0xA5A5_0003,
            },
        ])
    }
    .expect("post writes");
    let c = wait(&b, 3);
    let got: Vec<(u32, u32, Option<u32>)> =
        c.iter().map(|c| (c.opcode, c.byte_len, c.imm)).collect();
    assert_eq!(
        got,
        vec![
            (Completion::RECV_RDMA_WITH_IMM, 4096, Some(0xA5A5_0001)),
            (
                Completion::RECV_RDMA_WITH_IMM,
                LEN as u32,
                Some(0xA5A5_0002)
            ),
            (Completion::RECV_RDMA_WITH_IMM, 0, Some(0xA5A5_0003)),
        ]
    );
    let done = wait(&a, 3);
    assert_eq!(
        done.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    let secs = t.elapsed().as_secs_f64();
    assert!(
        dst.0 == src.0,
        "destination equals the source after the full write"
    );
    eprintln!(
        "loopback WRITE_WITH_IMM of {} MiB: {:.1} MB/s",
        LEN >> 20,
        (LEN + 4096) as f64 / secs / 1e6
    );
    drop((ms, md, mr));
    assert_eq!(
        ctx.registered_bytes(),
        0,
        "dropping the regions deregisters them"
    );
}

/// Raw WRITE_WITH_IMM throughput: 64 MiB in 1 MiB requests, 16 in flight. Prints MB/s (the
/// comparison with `ib_write_bw` is done by `ci/softroce`).
#[test]
fn raw_write_imm_throughput_64mib() {
    let Some(cfg) = device() else { return };
    let ctx = Context::open(&cfg).expect("open the device");
    let (mut a, mut b) = pair(&ctx);
    const TOTAL: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    const DEPTH: usize = 16;
    let mut src = Buf::pattern(TOTAL, 3);
    let mut dst = Buf::zeroed(TOTAL);
    // SAFETY: the buffers outlive the regions.
    let (ms, md) = unsafe {
        (
            ctx.register(src.ptr(), TOTAL).expect("register src"),
            ctx.register(dst.ptr(), TOTAL).expect("register dst"),
        )
    };
    let n = TOTAL / CHUNK;
    let mut rates = Vec::new();
    for round in 0..3u32 {
        let recvs: Vec<(u64, u32, u64, u32)> = (0..n as u64)
            .map(|i| (i, md.lkey(), md.addr(), 0))
            .collect();
        for c in recvs.chunks(32) {
            // SAFETY: zero-length receives (a WRITE_WITH_IMM places no data in them).
            unsafe { b.post_recv(c) }.expect("post receives");
        }
        let start = Instant::now();
        let (mut posted, mut done, mut got) = (0usize, 0usize, 0usize);
        let mut comps = Vec::new();
        let end = start + Duration::from_secs(120);
        while done < n || got < n {
            while posted < n && posted - done < DEPTH {
                let off = (posted * CHUNK) as u64;
                // SAFETY: ranges inside the registered regions.
                unsafe {
                    a.post_send(&[WorkRequest::WriteImm {
                        wr_id: posted as u64,
                        lkey: ms.lkey(),
                        addr: ms.addr() + off,
                        len: CHUNK as u32,
                        rkey: md.rkey(),
                        remote_addr: md.addr() + off,
                        imm: posted as u32 + round,
                    }])
                }
                .expect("post");
                posted += 1;
            }
            comps.clear();
            a.poll(&mut comps, 32).expect("poll");
            for c in &comps {
                assert!(c.is_ok(), "{}", c.status_str());
            }
            done += comps.len();
            comps.clear();
            b.poll(&mut comps, 32).expect("poll");
            got += comps.len();
            assert!(
                Instant::now() < end,
                "64 MiB did not arrive within 120 s ({got} of {n})"
            );
        }
        let secs = start.elapsed().as_secs_f64();
        rates.push(TOTAL as f64 / secs / 1e6);
    }
    assert!(dst.0 == src.0);
    rates.sort_by(f64::total_cmp);
    println!(
        "RESULT raw WRITE_WITH_IMM 64 MiB (1 MiB x {n}, {DEPTH} in flight, one process, two QPs), 3 rounds: {:.1} / {:.1} / {:.1} MB/s (min / median / max)",
        rates[0], rates[1], rates[2]
    );
    drop((ms, md));
}

fn reason(e: Error) -> String {
    match e {
        Error::Unsupported { feature, reason } => {
            assert_eq!(feature, "rdma");
            reason
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn unknown_device_names_the_devices_present() {
    let Some(cfg) = device() else { return };
    let bad = RdmaConfig {
        device: Some("nosuchdev0".into()),
        ..cfg.clone()
    };
    let r = reason(rdma::probe(&bad).expect_err("a device that does not exist"));
    eprintln!("{r}");
    assert!(r.contains("BPS_RDMA_DEVICE=nosuchdev0"), "{r}");
    let present = rdma::probe(&cfg).expect("the real device").device;
    assert!(r.contains(&present), "lists {present}: {r}");
}

#[test]
fn wrong_gid_index_says_which_are_valid() {
    let Some(cfg) = device() else { return };
    let s = rdma::probe(&cfg).expect("the real device");
    for bad in [200u32, 2] {
        if bad == s.gid_index {
            continue;
        }
        let c = RdmaConfig {
            gid_index: Some(bad),
            ..cfg.clone()
        };
        match rdma::probe(&c) {
            Ok(s2) => {
                // An index that exists and is not empty is not wrong.
                eprintln!("GID index {bad} is valid here: {s2}");
            }
            Err(e) => {
                let r = reason(e);
                eprintln!("{r}");
                assert!(r.contains(&format!("GID index {bad}")), "{r}");
                assert!(r.contains("BPS_RDMA_GID_INDEX"), "{r}");
                assert!(
                    r.contains(&format!("[{}]", s.gid_index)),
                    "lists the valid index {}: {r}",
                    s.gid_index
                );
            }
        }
    }
    let c = RdmaConfig {
        port: Some(9),
        ..cfg
    };
    let r = reason(rdma::probe(&c).expect_err("port 9"));
    assert!(r.contains("BPS_RDMA_PORT=9"), "{r}");
}

#[test]
fn registration_past_the_bound_says_what_to_change() {
    let Some(cfg) = device() else { return };
    let ctx = Context::open(&RdmaConfig {
        max_registered_bytes: 1 << 20,
        ..cfg
    })
    .expect("open");
    let mut b = Buf::zeroed(2 << 20);
    // SAFETY: `b` outlives the (refused) registration.
    let r =
        reason(unsafe { ctx.register(b.ptr(), 2 << 20) }.expect_err("2 MiB over a 1 MiB bound"));
    assert!(
        r.contains("BPS_RDMA_MAX_REGISTERED_BYTES") && r.contains("ulimit -l"),
        "{r}"
    );
    // SAFETY: as above.
    let ok = unsafe { ctx.register(b.ptr(), 1 << 20) }.expect("1 MiB fits");
    drop(ok);
}

/// On a machine without RDMA the probe names the missing piece; with the feature off it says the
/// build has no backend.
#[test]
fn probe_without_device_says_why() {
    if let Err(e) = rdma::probe(&RdmaConfig::default()) {
        let r = reason(e);
        eprintln!("probe: {r}");
        assert!(
            r.contains("libibverbs.so.1 not found")
                || r.contains("no RDMA device")
                || r.contains("no usable RDMA device")
                || r.contains("no active port")
                || r.contains("feature `rdma`"),
            "{r}"
        );
    }
}

/// A memfd (host memory, not a dma-buf) handed to `register_dmabuf`: the device refuses it, and
/// the error names the device, the fd, offset and length and what the errno means: on a device
/// without dma-buf support (Soft-RoCE) "device rxe0 cannot register dma-buf memory (driver has
/// no dma-buf support …)", on one with it (mlx5) "fd N is not a dma-buf". A zero length is
/// refused before the verb.
#[test]
fn dmabuf_registration_of_a_non_dmabuf_fd_is_refused_in_words() {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    let Some(cfg) = device() else { return };
    let ctx = Context::open(&cfg).expect("open");
    let dev = ctx.summary().device.clone();
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked and
    // owned by `memfd` from here on.
    let memfd = unsafe {
        let fd = libc::memfd_create(c"bps-not-a-dmabuf".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: `memfd` is an open descriptor; ftruncate only sizes the file.
    assert_eq!(unsafe { libc::ftruncate(memfd.as_raw_fd(), 65536) }, 0);
    let fd = memfd.as_raw_fd();
    // SAFETY: the registration is refused (not a dma-buf); were it not, nothing writes into it.
    let err = unsafe { ctx.register_dmabuf(memfd.as_fd(), 4096, 8192, 0x10_0000_1000) }
        .expect_err("a memfd is not a dma-buf");
    let text = err.to_string();
    println!("RESULT register_dmabuf of a memfd on {dev}: {text}");
    for part in [
        format!("dma-buf fd {fd}"),
        "offset 4096".into(),
        "8192 bytes".into(),
        "iova 0x1000001000".into(),
    ] {
        assert!(text.contains(&part), "{part}: {text}");
    }
    match &err {
        Error::Unsupported { reason, .. } => assert!(
            reason.starts_with(&format!(
                "device {dev} cannot register dma-buf memory (driver has no dma-buf support"
            )),
            "{reason}"
        ),
        Error::Io { .. } => assert!(
            text.contains(&format!("ibv_reg_dmabuf_mr on {dev}"))
                && text.contains(&format!("fd {fd} is not a dma-buf")),
            "{text}"
        ),
        other => panic!("{other:?}"),
    }
    // SAFETY: refused before the verb.
    let zero = unsafe { ctx.register_dmabuf(memfd.as_fd(), 0, 0, 0x1000) }
        .expect_err("zero length")
        .to_string();
    assert!(zero.contains("zero length"), "{zero}");
    assert_eq!(ctx.registered_bytes(), 0, "nothing counted");
}
