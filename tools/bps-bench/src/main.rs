//! `bps-bench`: push_pull and broadcast sweeps in the style of nccl-tests, with every result
//! checked on request.
//!
//! Under `bps-launch`, or with BytePS / torchrun variables set, it joins that job. Without
//! them it starts a local cluster by itself (through `bps-launch`, found next to this binary).
//!
//! Also: `--plot FILE.svg` (busbw against size), `--compare A.json B.json` (two `--json`
//! results side by side, no cluster), `raw` (the transport alone between two processes:
//! throughput and ping-pong) and `info` (version, machine, transports, tunables).
//!
//! `unsafe` is denied everywhere but in `regmem`, which owns the memory `raw` registers with the
//! transport (`Transport::register` is an `unsafe fn`; see that module).
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod gpu;
mod plot;
mod progress;
mod raw;
#[allow(unsafe_code)]
mod regmem;
mod soak;
mod sysinfo;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bps_runtime::config::{Config, Lookup};
use bps_runtime::sum::{reference_sum, scale_div};
use bps_runtime::{Bps, DType, PushPullOpts};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "bps-bench", version, about = "bps push_pull / broadcast benchmark", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// bps version, the machine, transports, tunables with their values and sources.
    Info,
    /// The transport alone between two processes of this machine (no scheduler, servers or
    /// runtime): write throughput per size, or message round trips with --pingpong.
    Raw(raw::RawArgs),
    /// Randomized push_pull for a while (sizes, dtypes, priorities, tensors in flight drawn
    /// from a seed), every result checked.
    Soak(soak::SoakArgs),
    /// push_pull of GPU tensors, one worker per GPU (under bps-launch --local-size N).
    Gpu(gpu::GpuArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Op {
    PushPull,
    Broadcast,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Operation to measure.
    #[arg(long, value_enum, default_value = "push-pull")]
    op: Op,
    /// Sizes in bytes: `4K:256M` (doubling) or a list `0,1,4K,1M`.
    #[arg(long, default_value = "4K:64M")]
    sizes: String,
    /// Element type: f32, f16, bf16, f64, i32, i64, u8, or `all`.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// Untimed iterations per size.
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Tensors in flight at once (mixed priorities).
    #[arg(long, default_value_t = 1)]
    tensors: u32,
    /// Divide sums by the number of workers.
    #[arg(long)]
    average: bool,
    /// Root rank of broadcasts (default: the last worker, a non-zero root when size > 1).
    #[arg(long)]
    root: Option<u32>,
    /// Verify every result against the expected sum; a mismatch fails the run.
    #[arg(long)]
    check: bool,
    /// Write the rows and the configuration as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Draw busbw (GB/s) against size, one line per dtype, into an SVG file (with --compare:
    /// both runs).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
    /// Compare two --json results (size, A busbw, B busbw, B/A); needs no cluster.
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"])]
    compare: Option<Vec<std::path::PathBuf>>,
    /// BYTEPS_PARTITION_BYTES for this run.
    #[arg(long)]
    partition_bytes: Option<String>,
    /// BPS_CREDIT_BYTES for this run.
    #[arg(long)]
    credit: Option<String>,
    /// Transport: auto, tcp, shm, rdma.
    #[arg(long)]
    transport: Option<String>,
    /// Print, per rank, the link kind (shm, tcp, loopback) to every peer it used.
    #[arg(long)]
    show_links: bool,
    /// Local cluster: workers (when not joining a job).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Local cluster: servers (when not joining a job).
    #[arg(long, default_value_t = 1)]
    servers: u32,
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (n, m) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1usize << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<usize>().ok()?.checked_mul(m)
}

/// `A:B` doubling, or a comma list.
fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    let bad =
        || format!("--sizes {s:?}: expected A:B (e.g. 4K:256M, doubling) or a list (0,1,4K,1M)");
    if let Some((a, b)) = s.split_once(':') {
        let (a, b) = (
            parse_size(a).ok_or_else(bad)?,
            parse_size(b).ok_or_else(bad)?,
        );
        if a == 0 || a > b {
            return Err(bad());
        }
        let mut v = Vec::new();
        let mut x = a;
        while x <= b {
            v.push(x);
            x *= 2;
        }
        Ok(v)
    } else {
        s.split(',')
            .map(|x| parse_size(x).ok_or_else(bad))
            .collect()
    }
}

fn parse_dtypes(s: &str) -> Result<Vec<DType>, String> {
    if s == "all" {
        return Ok(DType::ALL.to_vec());
    }
    s.split(',')
        .map(|x| x.parse::<DType>().map_err(|e| format!("--dtype: {e}")))
        .collect()
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic input of `rank` for (tensor, iteration): every worker can recompute every
/// other worker's input and so the exact expected result.
fn gen(dtype: DType, bytes: usize, rank: u32, tensor: u32, iter: u32) -> Vec<u8> {
    let n = bytes / dtype.size();
    let seed = splitmix(((rank as u64) << 40) ^ ((tensor as u64) << 20) ^ iter as u64);
    let mut out = Vec::with_capacity(bytes);
    for i in 0..n {
        let r = splitmix(seed ^ i as u64);
        // floats in [-1, 1) with a fractional part, so rounding is exercised
        let f = ((r >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0;
        match dtype {
            DType::F32 => out.extend_from_slice(&(f as f32).to_ne_bytes()),
            DType::F64 => out.extend_from_slice(&f.to_ne_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f64(f).to_ne_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(f).to_ne_bytes()),
            DType::I32 => out.extend_from_slice(&(r as i32).to_ne_bytes()),
            DType::I64 => out.extend_from_slice(&(r as i64).to_ne_bytes()),
            DType::U8 => out.push(r as u8),
        }
    }
    out
}

/// What every worker must hold after the operation, bit for bit: the servers add in rank
/// order, and with local reduction group by group (each group in rank order).
#[allow(clippy::too_many_arguments)]
fn expected(
    args: &RunArgs,
    dtype: DType,
    bytes: usize,
    size: u32,
    tensor: u32,
    iter: u32,
    root: u32,
    group: u32,
) -> Vec<u8> {
    match args.op {
        Op::Broadcast => gen(dtype, bytes, root, tensor, iter),
        Op::PushPull => {
            let inputs: Vec<Vec<u8>> = (0..size)
                .map(|r| gen(dtype, bytes, r, tensor, iter))
                .collect();
            let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
            let mut s = if group > 1 {
                let sums: Vec<Vec<u8>> = refs
                    .chunks(group as usize)
                    .map(|g| reference_sum(dtype, g))
                    .collect();
                let sums: Vec<&[u8]> = sums.iter().map(|v| v.as_slice()).collect();
                reference_sum(dtype, &sums)
            } else {
                reference_sum(dtype, &refs)
            };
            if args.average {
                scale_div(dtype, &mut s, size).expect("size > 0");
            }
            s
        }
    }
}

/// One size's inputs and expected result, computed once: the input of (tensor, iteration) is
/// the rank's base pattern rotated by [`Pattern::shift`] elements, so its exact sum is the base
/// sum rotated by the same amount (every operation is element-wise). Checking an iteration is
/// then a rotated compare instead of regenerating every worker's input and summing them again:
/// the check no longer competes for the CPU with the transfers it measures.
struct Pattern {
    elem: usize,
    count: usize,
    mine: Vec<u8>,
    want: Vec<u8>,
}

impl Pattern {
    fn new(
        args: &RunArgs,
        dtype: DType,
        bytes: usize,
        size: u32,
        rank: u32,
        root: u32,
        group: u32,
    ) -> Self {
        let mine = gen(dtype, bytes, rank, 0, 0);
        let want = if args.check {
            expected(args, dtype, bytes, size, 0, 0, root, group)
        } else {
            Vec::new()
        };
        Pattern {
            elem: dtype.size(),
            count: bytes / dtype.size(),
            mine,
            want,
        }
    }

    /// Rotation (in elements) of tensor `t`'s input at iteration `it`: differs from one
    /// iteration and tensor to the next (a stale or swapped result does not match).
    fn shift(&self, t: u32, it: u32, k: u32) -> usize {
        if self.count == 0 {
            return 0;
        }
        let step = (it as u64) * (k as u64) + t as u64;
        (step.wrapping_mul(7919).wrapping_add(step) % self.count as u64) as usize
    }

    /// `base` rotated left by `shift` elements.
    fn rotated(&self, base: &[u8], shift: usize) -> Vec<u8> {
        let cut = shift * self.elem;
        let mut out = Vec::with_capacity(base.len());
        out.extend_from_slice(&base[cut..]);
        out.extend_from_slice(&base[..cut]);
        out
    }

    fn input(&self, shift: usize) -> Vec<u8> {
        self.rotated(&self.mine, shift)
    }

    /// First byte where `got` differs from the expected result at this rotation, if any.
    fn mismatch(&self, got: &[u8], shift: usize) -> Option<usize> {
        if got.len() != self.want.len() {
            return Some(got.len().min(self.want.len()));
        }
        let cut = shift * self.elem;
        let head = self.want.len() - cut;
        let diff = |a: &[u8], b: &[u8], at: usize| {
            (a != b).then(|| at + a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0))
        };
        diff(&got[..head], &self.want[cut..], 0)
            .or_else(|| diff(&got[head..], &self.want[..cut], head))
    }
}

struct Row {
    bytes: usize,
    dtype: DType,
    median_us: f64,
    p99_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: u64,
}

fn human(b: usize) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}G", b >> 30)
    } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}K", b >> 10)
    } else {
        format!("{b}")
    }
}

fn run(bps: &Bps, args: &RunArgs, progress: &mut progress::Progress) -> Result<Vec<Row>, String> {
    let sizes = parse_sizes(&args.sizes)?;
    let dtypes = parse_dtypes(&args.dtype)?;
    let n = bps.size();
    let rank = bps.rank();
    let root = args.root.unwrap_or(n - 1);
    if root >= n {
        return Err(format!("--root {root}: must be below the {n} workers"));
    }
    let k = args.tensors.max(1);
    let mut rows = Vec::new();
    for &dtype in &dtypes {
        for &size in &sizes {
            let bytes = size / dtype.size() * dtype.size();
            progress.begin(&format!("{} {}", dtype.name(), human(bytes)));
            let mut times = Vec::new();
            let mut wrong = 0u64;
            let group = if bps.local_reduce() {
                bps.local_size()
            } else {
                1
            };
            let pattern = Pattern::new(args, dtype, bytes, n, rank, root, group);
            for it in 0..args.warmup + args.iters {
                let shifts: Vec<usize> = (0..k).map(|t| pattern.shift(t, it, k)).collect();
                let bufs: Vec<Vec<u8>> = shifts.iter().map(|&s| pattern.input(s)).collect();
                // Every worker starts the timed part together (as the Gloo script does): with
                // --check, a worker still checking the previous iteration is not timed as
                // network time. Without it, only before the first (a barrier per iteration lets
                // the event loops fall asleep, which small-message round trips would time).
                if args.check || it == 0 {
                    bps.barrier().map_err(|e| e.to_string())?;
                }
                let t0 = Instant::now();
                let mut pending = Vec::new();
                for (t, b) in bufs.into_iter().enumerate() {
                    let name = format!("bench.{}.{}.{t}", dtype.name(), bytes);
                    let prio = (k - t as u32) as i32;
                    let p = match args.op {
                        Op::PushPull => bps.push_pull_bytes(
                            &name,
                            dtype,
                            b,
                            PushPullOpts {
                                average: args.average,
                                priority: prio,
                            },
                        ),
                        Op::Broadcast => bps.broadcast_bytes(&name, dtype, b, root, prio),
                    };
                    pending.push(p.map_err(|e| e.to_string())?);
                }
                let mut results = Vec::with_capacity(pending.len());
                let mut err = None;
                for p in pending {
                    match p.wait() {
                        Ok(b) => results.push(b),
                        Err(e) => {
                            err.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                if let Some(e) = err {
                    return Err(e);
                }
                let dt = t0.elapsed();
                if it >= args.warmup {
                    times.push(dt);
                }
                if args.check {
                    for (t, b) in results.iter().enumerate() {
                        if let Some(first) = pattern.mismatch(b, shifts[t]) {
                            wrong += 1;
                            if wrong <= 3 {
                                eprintln!(
                                    "bps-bench: rank {rank}: WRONG result for {} {} bytes tensor {t} iteration {it} (first difference at byte {first})",
                                    dtype, bytes
                                );
                            }
                        }
                    }
                }
            }
            times.sort();
            let med = times.get(times.len() / 2).copied().unwrap_or_default();
            let p99 = times
                .get(((times.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default();
            let total = bytes as f64 * k as f64;
            let secs = med.as_secs_f64().max(1e-9);
            let algbw = total / secs / 1e9;
            let factor = match args.op {
                Op::PushPull if n > 1 => 2.0 * (n as f64 - 1.0) / n as f64,
                Op::PushPull => 1.0,
                Op::Broadcast => 1.0,
            };
            rows.push(Row {
                bytes,
                dtype,
                median_us: med.as_secs_f64() * 1e6,
                p99_us: p99.as_secs_f64() * 1e6,
                algbw,
                busbw: algbw * factor,
                wrong,
            });
            progress.tick();
        }
    }
    Ok(rows)
}

fn print_table(rows: &[Row], args: &RunArgs, n: u32) {
    println!(
        "# bps-bench {}: op {:?}, {} workers, {} tensor(s) in flight, {} timed iterations",
        env!("CARGO_PKG_VERSION"),
        args.op,
        n,
        args.tensors,
        args.iters
    );
    println!(
        "{:>10} {:>12} {:>6} {:>12} {:>12} {:>10} {:>10} {:>7}",
        "size", "count", "type", "time(us)", "p99(us)", "algbw", "busbw", "wrong"
    );
    println!(
        "{:>10} {:>12} {:>6} {:>12} {:>12} {:>10} {:>10} {:>7}",
        "(B)", "(elements)", "", "median", "", "(GB/s)", "(GB/s)", ""
    );
    for r in rows {
        println!(
            "{:>10} {:>12} {:>6} {:>12.1} {:>12.1} {:>10.3} {:>10.3} {:>7}",
            human(r.bytes),
            r.bytes / r.dtype.size(),
            r.dtype.name(),
            r.median_us,
            r.p99_us,
            r.algbw,
            r.busbw,
            if args.check {
                r.wrong.to_string()
            } else {
                "n/a".into()
            }
        );
    }
}

fn write_json(
    path: &std::path::Path,
    rows: &[Row],
    args: &RunArgs,
    bps: &Bps,
) -> std::io::Result<()> {
    use serde_json::json;
    let cfg = bps.config();
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({"bytes": r.bytes, "count": r.bytes / r.dtype.size(), "dtype": r.dtype.name(),
                   "time_us_median": r.median_us, "time_us_p99": r.p99_us,
                   "algbw_gbs": r.algbw, "busbw_gbs": r.busbw, "wrong": r.wrong,
                   "partition_bytes": cfg.tensor_partition_bytes(r.bytes)})
        })
        .collect();
    let doc = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": sysinfo::commit(),
        "date": sysinfo::now_rfc3339(),
        "host": sysinfo::hostname(),
        "machine": sysinfo::machine_json(),
        "op": format!("{:?}", args.op),
        "workers": bps.size(),
        "servers": bps.num_servers(),
        "tensors": args.tensors,
        "iters": args.iters,
        "warmup": args.warmup,
        "check": args.check,
        "partition_bytes": cfg.partition_bytes,
        "min_chunks_per_server": cfg.min_chunks_per_server,
        "credit_bytes": cfg.credit_bytes,
        "transport": format!("{:?}", cfg.transport),
        "rows": rows,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
}

/// `--plot` of a run: one line per dtype.
fn plot_rows(path: &std::path::Path, rows: &[Row], args: &RunArgs, n: u32) -> Result<(), String> {
    let mut series: Vec<plot::Series> = Vec::new();
    for r in rows {
        let name = r.dtype.name().to_string();
        let point = (r.bytes as f64, r.busbw);
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(point),
            None => series.push(plot::Series {
                name,
                points: vec![point],
            }),
        }
    }
    let title = format!(
        "bps-bench {:?}: {n} workers, {} tensor(s) in flight",
        args.op, args.tensors
    );
    plot::draw(path, &title, &series)
}

fn in_job() -> bool {
    ["DMLC_ROLE", "RANK", "DMLC_WORKER_ID", "BPS_RANK"]
        .iter()
        .any(|k| std::env::var_os(k).is_some())
}

/// Start a local cluster through bps-launch with this same command line.
fn local_cluster(args: &RunArgs) -> ExitCode {
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bps-bench: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    let launcher = me.with_file_name("bps-launch");
    if !launcher.exists() {
        eprintln!(
            "bps-bench: {} not found; build it (cargo build --release -p bps-launch) or run under a launcher",
            launcher.display()
        );
        return ExitCode::from(1);
    }
    let mut cmd = std::process::Command::new(launcher);
    // Rank 0's stderr will be a pipe of bps-launch: this process draws its progress bar.
    let bar = progress::Host::start();
    if let Some(h) = &bar {
        cmd.env(progress::ENV, h.path());
    }
    cmd.arg("--workers")
        .arg(args.workers.to_string())
        .arg("--servers")
        .arg(args.servers.to_string())
        .arg("--")
        .arg(&me)
        .args(std::env::args_os().skip(1));
    match cmd.status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("bps-bench: cannot start bps-launch: {e}");
            ExitCode::from(1)
        }
    }
}

fn info() -> ExitCode {
    println!("bps {} (bps-bench)", env!("CARGO_PKG_VERSION"));
    println!("commit: {}", sysinfo::commit());
    println!("machine:");
    println!("  cpu: {}", sysinfo::cpu_model());
    let (usable, online) = sysinfo::cores();
    println!("  cores: {usable} usable by this process, {online} online");
    match sysinfo::memory() {
        Some((total, avail)) => println!(
            "  memory: {:.1} GiB total, {:.1} GiB available",
            total as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        ),
        None => println!("  memory: unknown (no /proc/meminfo)"),
    }
    let shm_ok = sysinfo::shm_writable();
    match &shm_ok {
        Ok(()) => println!("  /dev/shm: writable"),
        Err(e) => println!("  /dev/shm: NOT writable ({e})"),
    }
    println!("transports:");
    println!("  tcp: available");
    match &shm_ok {
        Ok(()) => {
            println!("  shm: available (segments in /dev/shm; used between processes of one host)")
        }
        Err(e) => println!("  shm: unavailable (/dev/shm: {e})"),
    }
    println!("  loopback: available (a process talking to itself)");
    let rdma_cfg = Config::from_env().map(|c| c.rdma).unwrap_or_default();
    match bps_transport::rdma::probe(&rdma_cfg) {
        Ok(d) => println!(
            "  rdma: available: device {} port {} ({}), GID[{}] {}, LID {}, active MTU {}, max message {} bytes; queues send {} recv {}, inline {} B, registration limit {}",
            d.device,
            d.port,
            d.link_layer,
            d.gid_index,
            d.gid,
            d.lid,
            d.active_mtu,
            d.max_msg_bytes,
            rdma_cfg.send_depth,
            rdma_cfg.recv_depth,
            rdma_cfg.inline_bytes,
            if rdma_cfg.max_registered_bytes == 0 {
                "ulimit -l".to_string()
            } else {
                format!("{} bytes", rdma_cfg.max_registered_bytes)
            }
        ),
        Err(e) => println!("  rdma: unavailable ({e})"),
    }
    sysinfo::print_topology(&rdma_cfg);
    println!("tunables:");
    let l = Lookup::env();
    for (t, v, src) in Config::describe(&l) {
        println!(
            "  {:<28} = {:<14} [{}]  {}",
            t.names.join("|"),
            if v.is_empty() {
                "(unset)".to_string()
            } else {
                v
            },
            src,
            t.doc
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BPS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Info) => return info(),
        Some(Cmd::Raw(a)) => return raw::main(a),
        Some(Cmd::Soak(a)) => return soak::main(a),
        Some(Cmd::Gpu(a)) => return gpu::main(a),
        None => {}
    }
    let args = cli.run;
    if let Some(files) = &args.compare {
        return match plot::compare(&files[0], &files[1], args.plot.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bps-bench: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Err(e) = parse_sizes(&args.sizes).and(parse_dtypes(&args.dtype)) {
        eprintln!("bps-bench: {e}");
        return ExitCode::from(2);
    }
    if !in_job() {
        return local_cluster(&args);
    }
    let mut vars: Vec<(&str, String)> = Vec::new();
    if let Some(p) = &args.partition_bytes {
        vars.push((
            "BYTEPS_PARTITION_BYTES",
            parse_size(p).map_or(p.clone(), |v| v.to_string()),
        ));
    }
    if let Some(c) = &args.credit {
        vars.push((
            "BPS_CREDIT_BYTES",
            parse_size(c).map_or(c.clone(), |v| v.to_string()),
        ));
    }
    if let Some(t) = &args.transport {
        vars.push(("BPS_TRANSPORT", t.clone()));
    }
    let env: std::collections::HashMap<String, String> = std::env::vars()
        .chain(vars.into_iter().map(|(k, v)| (k.to_string(), v)))
        .collect();
    let cfg = match Config::from_lookup(&Lookup::map(&env)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bps-bench: {e}");
            return ExitCode::from(2);
        }
    };
    // BytePS-style jobs start the same command in every role.
    match cfg.role {
        bps_runtime::Role::Server => {
            return match bps_runtime::run_server(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bps-bench: server: {e}");
                    ExitCode::from(1)
                }
            }
        }
        bps_runtime::Role::Scheduler => {
            return match bps_runtime::run_scheduler(&cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bps-bench: scheduler: {e}");
                    ExitCode::from(1)
                }
            }
        }
        bps_runtime::Role::Worker => {}
    }
    let bps = match Bps::init_with(cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bps-bench: init failed: {e}");
            return ExitCode::from(1);
        }
    };
    let steps = (parse_sizes(&args.sizes).map_or(0, |v| v.len())
        * parse_dtypes(&args.dtype).map_or(0, |v| v.len())) as u64;
    let mut bar = progress::Progress::start(bps.rank(), steps);
    let res = run(&bps, &args, &mut bar);
    // Gone from the terminal before anything is printed.
    bar.finish();
    if args.show_links {
        let links: Vec<String> = bps
            .links()
            .into_iter()
            .filter_map(|(who, k)| k.map(|k| format!("{who}={k}")))
            .collect();
        println!("# rank {} links: {}", bps.rank(), links.join(", "));
    }
    let code = match &res {
        Ok(rows) => {
            let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
            if bps.rank() == 0 {
                print_table(rows, &args, bps.size());
                if let Some(p) = &args.json {
                    if let Err(e) = write_json(p, rows, &args, &bps) {
                        eprintln!("bps-bench: cannot write {}: {e}", p.display());
                    }
                }
                if let Some(p) = &args.plot {
                    if let Err(e) = plot_rows(p, rows, &args, bps.size()) {
                        eprintln!("bps-bench: {e}");
                    }
                }
            }
            if wrong > 0 {
                eprintln!("bps-bench: rank {}: {wrong} wrong results", bps.rank());
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("bps-bench: rank {}: {e}", bps.rank());
            ExitCode::from(1)
        }
    };
    let _ = bps.shutdown();
    std::thread::sleep(Duration::from_millis(0));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_sizes("4K:16K").unwrap(), vec![4096, 8192, 16384]);
        assert_eq!(parse_sizes("0,1,4K").unwrap(), vec![0, 1, 4096]);
        assert!(parse_sizes("x").is_err());
        assert!(parse_sizes("8K:4K").is_err());
    }

    #[test]
    fn generated_inputs_are_deterministic_and_differ_by_rank() {
        assert_eq!(gen(DType::F32, 64, 1, 0, 0), gen(DType::F32, 64, 1, 0, 0));
        assert_ne!(gen(DType::F32, 64, 1, 0, 0), gen(DType::F32, 64, 2, 0, 0));
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: RunArgs,
        }
        let mut argv = vec!["t", "--check"];
        argv.extend_from_slice(extra);
        T::parse_from(argv).a
    }

    /// The rotated expected result is exactly the sum of the rotated inputs, for every dtype,
    /// with and without averaging and local groups: the cheap check is the full check.
    #[test]
    fn rotated_pattern_equals_the_sum_of_rotated_inputs() {
        for average in [false, true] {
            let args = if average {
                run_args(&["--average"])
            } else {
                run_args(&[])
            };
            for dtype in DType::ALL {
                let bytes = 37 * dtype.size();
                let n = 4;
                for group in [1, 2] {
                    let p = Pattern::new(&args, dtype, bytes, n, 0, 0, group);
                    for (t, it) in [(0, 0), (0, 1), (2, 5), (1, 9)] {
                        let s = p.shift(t, it, 3);
                        let inputs: Vec<Vec<u8>> = (0..n)
                            .map(|r| Pattern::new(&args, dtype, bytes, n, r, 0, group).input(s))
                            .collect();
                        let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
                        let mut sum = if group > 1 {
                            let g: Vec<Vec<u8>> =
                                refs.chunks(2).map(|c| reference_sum(dtype, c)).collect();
                            let g: Vec<&[u8]> = g.iter().map(|v| v.as_slice()).collect();
                            reference_sum(dtype, &g)
                        } else {
                            reference_sum(dtype, &refs)
                        };
                        if average {
                            scale_div(dtype, &mut sum, n).unwrap();
                        }
                        assert_eq!(p.mismatch(&sum, s), None, "{dtype} t{t} it{it} g{group}");
                    }
                }
            }
        }
    }

    /// A wrong, stale or swapped result is caught, at the right byte.
    #[test]
    fn the_check_catches_wrong_stale_and_swapped_results() {
        let args = run_args(&[]);
        let p = Pattern::new(&args, DType::F32, 4096, 2, 0, 0, 1);
        let s1 = p.shift(0, 1, 2);
        let good = p.rotated(&p.want, s1);
        assert_eq!(p.mismatch(&good, s1), None);
        let mut bad = good.clone();
        bad[1000] ^= 1;
        assert_eq!(p.mismatch(&bad, s1), Some(1000));
        // the previous iteration's result, or the other tensor's, is not this one
        assert_ne!(p.shift(0, 0, 2), s1);
        assert_ne!(p.shift(1, 1, 2), s1);
        assert!(p
            .mismatch(&p.rotated(&p.want, p.shift(0, 0, 2)), s1)
            .is_some());
        assert!(p
            .mismatch(&p.rotated(&p.want, p.shift(1, 1, 2)), s1)
            .is_some());
        assert!(p.mismatch(&good[..4092], s1).is_some());
    }
}
