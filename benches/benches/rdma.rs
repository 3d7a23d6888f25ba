//! RDMA transport benches: the post/poll rate of small writes, the registration cache (hit and
//! miss), and WRITE_WITH_IMM throughput by size, each both on raw queue pairs (the verbs alone)
//! and through `Net` (the engine: destination table, batched posts, selective signaling, the
//! completion poller thread).
//!
//! Needs bps-transport's feature `rdma` and an RDMA device:
//!
//! ```text
//! cargo bench -p bps-benches --features bps-transport/rdma --bench rdma
//! ```
//!
//! The device comes from the environment, so the same command runs on an InfiniBand or RoCE
//! host and in `ci/softroce`'s Soft-RoCE guest: `BPS_RDMA_DEVICE`, `BPS_RDMA_PORT` and
//! `BPS_RDMA_GID_INDEX` as for the runtime, else `RXE_DEV` / `RXE_GID_INDEX` (what the guest
//! exports), else the first device with an active port. Without the feature or a device it
//! prints why and measures nothing. `BPS_BENCH_RDMA_SIZES` (e.g. `4K,64K,1M`, the default;
//! add `8M` on a real NIC) sets the throughput sizes.
//!
//! Everything runs in this one process: two queue pairs (or two `Net`s) connected to each
//! other through the device, so a figure includes both ends' work on the same CPUs.

use std::time::{Duration, Instant};

use bps_transport::rdma::{self, Context, MemoryRegion, QueuePair, RdmaConfig, WorkRequest};
use bps_transport::{Event, LinkKind, Net, NetConfig, PeerId, RemoteSlice, Transport};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};

/// Small writes per batch (one post; the last is signaled).
const BATCH: usize = 16;
/// Bytes of a small write.
const SMALL: usize = 64;
/// Writes per iteration of the throughput benches.
const STREAM: usize = 16;
/// No completion for this long means the device is stuck.
const STUCK: Duration = Duration::from_secs(30);

fn env(names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| {
        std::env::var(n)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (n.to_string(), v))
    })
}

fn parse_env<T: std::str::FromStr>(names: &[&str], what: &str) -> Result<Option<T>, String> {
    match env(names) {
        None => Ok(None),
        Some((n, v)) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{n}={v:?} is not {what}")),
    }
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (n, m) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1usize << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    n.parse::<usize>().ok()?.checked_mul(m)
}

/// The configuration the environment asks for, or why it is unusable.
fn config() -> Result<(RdmaConfig, Vec<usize>), String> {
    let cfg = RdmaConfig {
        device: env(&["BPS_RDMA_DEVICE", "RXE_DEV"]).map(|(_, v)| v),
        port: parse_env(&["BPS_RDMA_PORT"], "a port number (1, 2, ...)")?,
        gid_index: parse_env(&["BPS_RDMA_GID_INDEX", "RXE_GID_INDEX"], "a GID index")?,
        ..RdmaConfig::default()
    };
    let sizes = match env(&["BPS_BENCH_RDMA_SIZES"]) {
        None => vec![4 << 10, 64 << 10, 1 << 20],
        Some((n, v)) => v
            .split(',')
            .map(|s| parse_size(s).filter(|x| (1..=1 << 30).contains(x)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("{n}={v:?}: expected sizes like 4K,64K,1M (1 B to 1 GiB)"))?,
    };
    Ok((cfg, sizes))
}

// ------------------------------------------------------------------------------------ verbs

/// Two connected RC queue pairs of one context with a source and a destination region.
struct Verbs {
    // Field order is drop order: queue pairs and regions before the memory they use.
    a: QueuePair,
    b: QueuePair,
    ms: MemoryRegion,
    md: MemoryRegion,
    _ctx: Context,
    _src: Box<[u8]>,
    _dst: Box<[u8]>,
}

impl Verbs {
    fn new(cfg: &RdmaConfig, bytes: usize) -> Result<Verbs, String> {
        let ctx = Context::open(cfg).map_err(|e| e.to_string())?;
        let qp = || ctx.create_qp(64, 64).map_err(|e| e.to_string());
        let (mut a, mut b) = (qp()?, qp()?);
        let (ea, eb) = (a.endpoint(), b.endpoint());
        a.connect(&eb).map_err(|e| e.to_string())?;
        b.connect(&ea).map_err(|e| e.to_string())?;
        let mut src: Box<[u8]> = (0..bytes).map(|i| i as u8).collect();
        let mut dst = vec![0u8; bytes].into_boxed_slice();
        // SAFETY: both buffers live in the returned struct and are dropped after the regions
        // and queue pairs (field order); only the NIC writes `dst` meanwhile.
        let (ms, md) = unsafe {
            (
                ctx.register(src.as_mut_ptr(), bytes)
                    .map_err(|e| e.to_string())?,
                ctx.register(dst.as_mut_ptr(), bytes)
                    .map_err(|e| e.to_string())?,
            )
        };
        Ok(Verbs {
            a,
            b,
            ms,
            md,
            _ctx: ctx,
            _src: src,
            _dst: dst,
        })
    }

    /// Posts `n` zero-length receives on `b` (a WRITE_WITH_IMM consumes one).
    fn receives(&mut self, n: usize) {
        let bufs: Vec<(u64, u32, u64, u32)> = (0..n as u64)
            .map(|i| (i, self.md.lkey(), self.md.addr(), 0))
            .collect();
        // SAFETY: zero-length receives reference no memory.
        unsafe { self.b.post_recv(&bufs) }.expect("post receives");
    }

    /// `n` WRITE_WITH_IMMs of `len` bytes at consecutive offsets.
    fn writes(&self, n: usize, len: usize) -> Vec<WorkRequest> {
        (0..n)
            .map(|i| {
                let off = (i * len) as u64;
                WorkRequest::WriteImm {
                    wr_id: i as u64,
                    lkey: self.ms.lkey(),
                    addr: self.ms.addr() + off,
                    len: len as u32,
                    rkey: self.md.rkey(),
                    remote_addr: self.md.addr() + off,
                    imm: i as u32,
                }
            })
            .collect()
    }

    /// Waits for `na` completions on `a` and `nb` on `b`.
    fn wait(&self, na: usize, nb: usize) {
        let mut out = Vec::new();
        let (mut ga, mut gb) = (0, 0);
        let end = Instant::now() + STUCK;
        while ga < na || gb < nb {
            out.clear();
            if ga < na {
                ga += self.a.poll(&mut out, na - ga).expect("poll a");
            }
            if gb < nb {
                gb += self.b.poll(&mut out, nb - gb).expect("poll b");
            }
            if let Some(c) = out.iter().find(|c| !c.is_ok()) {
                panic!("rdma bench: a request failed: {}", c.status_str());
            }
            assert!(
                Instant::now() < end,
                "rdma bench: no completion for {STUCK:?} ({ga}/{na} sent, {gb}/{nb} received)"
            );
        }
    }
}

fn post_poll_verbs(c: &mut Criterion, cfg: &RdmaConfig) {
    let mut v = match Verbs::new(cfg, BATCH * SMALL) {
        Ok(v) => v,
        Err(e) => return eprintln!("rdma bench: verbs pair: {e}"),
    };
    let wrs = v.writes(BATCH, SMALL);
    let mut g = c.benchmark_group("rdma/post_poll_64B");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("verbs/batch16_last_signaled", |b| {
        b.iter(|| {
            v.receives(BATCH);
            // SAFETY: ranges inside the registered regions, which outlive the requests.
            unsafe { v.a.post_send_with(&wrs, |i| i + 1 == BATCH) }.expect("post");
            v.wait(1, BATCH);
        })
    });
    g.bench_function("verbs/one_post_each_all_signaled", |b| {
        b.iter(|| {
            v.receives(BATCH);
            for wr in &wrs {
                // SAFETY: as above.
                unsafe { v.a.post_send(std::slice::from_ref(wr)) }.expect("post");
            }
            v.wait(BATCH, BATCH);
        })
    });
    g.finish();
}

fn throughput_verbs(c: &mut Criterion, cfg: &RdmaConfig, sizes: &[usize]) {
    let max = sizes.iter().copied().max().unwrap_or(1);
    let mut v = match Verbs::new(cfg, STREAM * max) {
        Ok(v) => v,
        Err(e) => return eprintln!("rdma bench: verbs pair: {e}"),
    };
    let mut g = c.benchmark_group("rdma/write_imm_throughput");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for &size in sizes {
        let wrs = v.writes(STREAM, size);
        g.throughput(Throughput::Bytes((STREAM * size) as u64));
        g.bench_with_input(BenchmarkId::new("verbs", size), &size, |b, _| {
            b.iter(|| {
                v.receives(STREAM);
                // SAFETY: ranges inside the registered regions, which outlive the requests.
                unsafe { v.a.post_send_with(&wrs, |i| i + 1 == STREAM) }.expect("post");
                v.wait(1, STREAM);
            })
        });
    }
    g.finish();
}

// -------------------------------------------------------------------------------------- Net

fn net(cfg: &RdmaConfig, me: u32) -> Result<Net, String> {
    let mut c = NetConfig::new(PeerId(me), "127.0.0.1:0".parse().expect("literal"));
    c.force = Some(LinkKind::Rdma);
    c.unix_dir = None;
    c.rdma = cfg.clone();
    Net::bind(c).map_err(|e| e.to_string())
}

/// Two `Net`s of this process on one RDMA link, with a source region on `a` and a destination
/// region on `b`.
struct Nets {
    a: Net,
    b: Net,
    ea: Vec<Event>,
    eb: Vec<Event>,
    src: u64,
    dst: u64,
    // Dropped after the Nets (field order).
    _mem: (Box<[u8]>, Box<[u8]>),
}

impl Nets {
    fn new(cfg: &RdmaConfig, bytes: usize) -> Result<Nets, String> {
        let (mut a, mut b) = (net(cfg, 0)?, net(cfg, 1)?);
        a.add_peer(PeerId(1), b.local_addr())
            .map_err(|e| e.to_string())?;
        b.add_peer(PeerId(0), a.local_addr())
            .map_err(|e| e.to_string())?;
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        let end = Instant::now() + Duration::from_secs(20);
        let up = |ev: &Vec<Event>| ev.iter().any(|e| matches!(e, Event::Connected { .. }));
        while !(up(&ea) && up(&eb)) {
            if Instant::now() > end {
                return Err("the two Nets did not connect within 20 s".into());
            }
            a.poll(&mut ea, Some(Duration::from_millis(1)))
                .map_err(|e| e.to_string())?;
            b.poll(&mut eb, Some(Duration::from_millis(1)))
                .map_err(|e| e.to_string())?;
        }
        if a.link_kind(PeerId(1)) != Some(LinkKind::Rdma) {
            return Err(format!(
                "the link is {:?}, not rdma (see the log)",
                a.link_kind(PeerId(1))
            ));
        }
        let mut src: Box<[u8]> = (0..bytes).map(|i| i as u8).collect();
        let mut dst = vec![0u8; bytes].into_boxed_slice();
        // SAFETY: the buffers are kept in the returned struct and dropped after both Nets.
        let (s, d) = unsafe {
            (
                a.register(src.as_mut_ptr(), bytes)
                    .map_err(|e| e.to_string())?,
                b.register(dst.as_mut_ptr(), bytes)
                    .map_err(|e| e.to_string())?,
            )
        };
        let mut n = Nets {
            a,
            b,
            ea: Vec::new(),
            eb: Vec::new(),
            src: s.token,
            dst: d.token,
            _mem: (src, dst),
        };
        // Resolve the destination token once (a round trip), outside the measurements.
        n.stream(1, bytes.min(SMALL), 0);
        Ok(n)
    }

    /// `count` writes of `len` bytes (at consecutive offsets when `stride` is `len`, all to
    /// offset 0 when it is 0), waiting until every one was received and completed.
    fn stream(&mut self, count: usize, len: usize, stride: usize) {
        let (mut posted, mut done, mut got) = (0, 0, 0);
        let end = Instant::now() + STUCK;
        while done < count || got < count {
            while posted < count {
                let off = (posted * stride) as u64;
                match self.a.try_write_imm(
                    PeerId(1),
                    0,
                    self.src,
                    off,
                    len as u64,
                    RemoteSlice {
                        token: self.dst,
                        offset: off,
                    },
                    posted as u32,
                    posted as u64,
                ) {
                    Ok(()) => posted += 1,
                    Err(e) if e.is_busy() => break,
                    Err(e) => panic!("rdma bench: write: {e}"),
                }
            }
            self.a
                .poll(&mut self.ea, Some(Duration::ZERO))
                .expect("poll a");
            self.b
                .poll(&mut self.eb, Some(Duration::from_millis(1)))
                .expect("poll b");
            done += self
                .ea
                .drain(..)
                .filter(|e| matches!(e, Event::WriteDone { .. }))
                .count();
            got += self
                .eb
                .drain(..)
                .filter(|e| matches!(e, Event::WriteReceived { .. }))
                .count();
            assert!(
                Instant::now() < end,
                "rdma bench: {got}/{count} writes received, {done} done after {STUCK:?}"
            );
        }
    }
}

fn post_poll_net(c: &mut Criterion, cfg: &RdmaConfig) {
    let mut n = match Nets::new(cfg, BATCH * SMALL) {
        Ok(n) => n,
        Err(e) => return eprintln!("rdma bench: Net pair: {e}"),
    };
    let mut g = c.benchmark_group("rdma/post_poll_64B");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("net/16_try_write_imm", |b| {
        b.iter(|| n.stream(BATCH, SMALL, SMALL))
    });
    g.finish();
    let s = n.a.rdma_stats();
    println!(
        "rdma bench: Net sender so far: {} writes in {} work requests, {} posts, {} signaled; \
         {} destination definitions",
        s.writes_posted, s.send_requests, s.post_calls, s.signaled_requests, s.dest_defines
    );
}

fn throughput_net(c: &mut Criterion, cfg: &RdmaConfig, sizes: &[usize]) {
    let max = sizes.iter().copied().max().unwrap_or(1);
    let mut n = match Nets::new(cfg, STREAM * max) {
        Ok(n) => n,
        Err(e) => return eprintln!("rdma bench: Net pair: {e}"),
    };
    let mut g = c.benchmark_group("rdma/write_imm_throughput");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for &size in sizes {
        g.throughput(Throughput::Bytes((STREAM * size) as u64));
        g.bench_with_input(BenchmarkId::new("net", size), &size, |b, &size| {
            b.iter(|| n.stream(STREAM, size, size))
        });
    }
    g.finish();
}

fn registration(c: &mut Criterion, cfg: &RdmaConfig) {
    let mut net = match net(cfg, 0) {
        Ok(n) => n,
        Err(e) => return eprintln!("rdma bench: Net: {e}"),
    };
    let mut g = c.benchmark_group("rdma/registration");
    for size in [64usize << 10, 4 << 20] {
        let mut buf: Box<[u8]> = vec![1u8; size].into_boxed_slice();
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        let before = net.rdma_stats().mr_registrations;
        // Miss: nothing else holds the range, so each register is an ibv_reg_mr and each
        // deregister an ibv_dereg_mr.
        g.bench_with_input(BenchmarkId::new("miss", size), &size, |b, _| {
            b.iter(|| {
                // SAFETY: `buf` outlives the registration (deregistered at once).
                let r = unsafe { net.register(ptr, len) }.expect("register");
                net.deregister(r.token).expect("deregister");
            })
        });
        let misses = net.rdma_stats().mr_registrations - before;
        // Hit: a first registration of the range stays, so the others share its region.
        // SAFETY: as above; deregistered below, before `buf` is dropped.
        let keep = unsafe { net.register(ptr, len) }.expect("register");
        let before = net.rdma_stats().mr_registrations;
        g.bench_with_input(BenchmarkId::new("hit", size), &size, |b, _| {
            b.iter(|| {
                // SAFETY: as above.
                let r = unsafe { net.register(ptr, len) }.expect("register");
                net.deregister(r.token).expect("deregister");
            })
        });
        let hits = net.rdma_stats().mr_registrations - before;
        net.deregister(keep.token).expect("deregister");
        println!(
            "rdma bench: registration of {size} B: {misses} ibv_reg_mr during the miss run, \
             {hits} during the hit run"
        );
        drop(buf);
    }
    g.finish();
}

fn main() {
    let (cfg, sizes) = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rdma bench: {e}");
            std::process::exit(2);
        }
    };
    match rdma::probe(&cfg) {
        Ok(s) => println!("rdma bench: device {s}"),
        Err(e) => {
            println!("rdma bench: skipped, no usable RDMA device: {e}");
            return;
        }
    }
    bps_benches::note_smoke_test();
    let sizes = if bps_benches::full_run() {
        sizes
    } else {
        vec![4 << 10]
    };
    let mut c = Criterion::default().configure_from_args();
    post_poll_verbs(&mut c, &cfg);
    post_poll_net(&mut c, &cfg);
    registration(&mut c, &cfg);
    throughput_verbs(&mut c, &cfg, &sizes);
    throughput_net(&mut c, &cfg, &sizes);
    c.final_summary();
}
