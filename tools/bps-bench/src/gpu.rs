//! `bps-bench gpu`: push_pull of GPU tensors, one worker per GPU (run it under
//! `bps-launch --workers N --local-size N`, or torchrun-style variables), in the nccl-tests
//! style: every size is run `--iters` times back to back (as `all_reduce` loops are timed),
//! then checked once against the exact sum when `--check` is given. `--staging` also measures
//! the staging copies against plain pinned copies on this worker's GPU.

use std::process::ExitCode;
use std::time::Instant;

use bps_runtime::gpu::{self, DeviceMem};
use bps_runtime::{Bps, DType, PushPullOpts};

/// Arguments of `bps-bench gpu`.
#[derive(clap::Args, Debug)]
pub struct GpuArgs {
    /// Sizes in bytes: `A:B` doubling or a list.
    #[arg(long, default_value = "1M:1G")]
    sizes: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed operations per size (issued back to back, then waited for).
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// Untimed operations per size.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Check one result per size against the exact sum.
    #[arg(long)]
    check: bool,
    /// Divide by the number of workers.
    #[arg(long)]
    average: bool,
    /// Also measure the staging copies (chunked, on the engine's streams) against plain
    /// pinned copies of the same bytes.
    #[arg(long)]
    staging: bool,
    /// GPU to use (default: the local rank).
    #[arg(long)]
    device: Option<i32>,
    /// Write the rows as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Row {
    bytes: usize,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: usize,
}

/// Small integers: exact in every float type whatever the order of the sum.
fn value(i: usize, rank: u32) -> f32 {
    ((i % 13) as u32 + rank) as f32
}

fn fill(dtype: DType, n: usize, rank: u32, scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size());
    for i in 0..n {
        let v = value(i, rank) * scale;
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_ne_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_ne_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_ne_bytes()),
            _ => unreachable!("checked in main"),
        }
    }
    out
}

fn read(dtype: DType, b: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes")),
        DType::F16 => {
            half::f16::from_ne_bytes(b[i * 2..i * 2 + 2].try_into().expect("2 bytes")).to_f32()
        }
        DType::BF16 => {
            half::bf16::from_ne_bytes(b[i * 2..i * 2 + 2].try_into().expect("2 bytes")).to_f32()
        }
        _ => unreachable!("checked in main"),
    }
}

fn submit(
    bps: &Bps,
    mem: &DeviceMem,
    dtype: DType,
    opts: PushPullOpts,
) -> Result<bps_runtime::Handle, String> {
    // SAFETY: `mem` outlives every operation on it (the caller waits for all handles before
    // dropping it) and nothing else uses it meanwhile.
    unsafe { bps.push_pull_device(&format!("gpu-{}", mem.len()), mem.buf(dtype), opts) }
        .map_err(|e| e.to_string())
}

fn run(bps: &Bps, a: &GpuArgs, dtype: DType, sizes: &[usize]) -> Result<Vec<Row>, String> {
    let dev = a.device.unwrap_or(bps.local_rank() as i32);
    let (rank, n) = (bps.rank(), bps.size());
    let opts = PushPullOpts {
        average: a.average,
        priority: 0,
    };
    let mut rows = Vec::new();
    for &size in sizes {
        let elems = size / dtype.size();
        let bytes = elems * dtype.size();
        if bytes == 0 {
            continue;
        }
        let mem = DeviceMem::alloc(dev, bytes)?;
        let scale = if a.average { n as f32 } else { 1.0 };
        let input = fill(dtype, elems, rank, scale);
        mem.upload(&input)?;
        for _ in 0..a.warmup {
            let h = submit(bps, &mem, dtype, opts)?;
            bps.wait(&h).map_err(|e| e.to_string())?;
        }
        bps.barrier().map_err(|e| e.to_string())?;
        let t = Instant::now();
        let hs: Vec<_> = (0..a.iters.max(1))
            .map(|_| submit(bps, &mem, dtype, opts))
            .collect::<Result<_, _>>()?;
        for h in &hs {
            bps.wait(h).map_err(|e| e.to_string())?;
        }
        let secs = t.elapsed().as_secs_f64() / a.iters.max(1) as f64;
        bps.barrier().map_err(|e| e.to_string())?;
        let mut wrong = 0;
        if a.check {
            mem.upload(&input)?;
            let h = submit(bps, &mem, dtype, opts)?;
            bps.wait(&h).map_err(|e| e.to_string())?;
            let mut out = vec![0u8; bytes];
            mem.download(&mut out)?;
            for i in 0..elems {
                let s: f32 = (0..n).map(|q| value(i, q) * scale).sum();
                let e = if a.average { s / n as f32 } else { s };
                if read(dtype, &out, i) != e {
                    wrong += 1;
                }
            }
        }
        let algbw = bytes as f64 / secs / 1e9;
        let factor = 2.0 * (n as f64 - 1.0) / n as f64;
        rows.push(Row {
            bytes,
            time_us: secs * 1e6,
            algbw,
            busbw: algbw * factor,
            wrong,
        });
        if rank == 0 {
            let r = rows.last().expect("pushed");
            println!(
                "{:>12} {:>12} {:>6} {:>12.1} {:>9.2} {:>9.2} {:>7}",
                r.bytes, elems, dtype, r.time_us, r.algbw, r.busbw, r.wrong
            );
        }
    }
    Ok(rows)
}

/// Run `bps-bench gpu`.
pub fn main(a: GpuArgs) -> ExitCode {
    let dtype = match a.dtype.parse::<DType>() {
        Ok(d @ (DType::F32 | DType::F16 | DType::BF16)) => d,
        Ok(d) => {
            eprintln!("bps-bench gpu: --dtype {d}: expected f32, f16 or bf16");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("bps-bench gpu: --dtype: {e}");
            return ExitCode::from(2);
        }
    };
    let sizes = match crate::parse_sizes(&a.sizes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bps-bench gpu: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(why) = gpu::probe() {
        eprintln!("bps-bench gpu: no usable GPU: {why}");
        return ExitCode::from(1);
    }
    if !crate::in_job() {
        eprintln!("bps-bench gpu: run one worker per GPU under a launcher, e.g. bps-launch --workers 4 --local-size 4 -- bps-bench gpu");
        return ExitCode::from(2);
    }
    let bps = match bps_runtime::init() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bps-bench gpu: {e}");
            return ExitCode::from(1);
        }
    };
    if bps.rank() == 0 {
        println!(
            "# bps-bench gpu: {} workers ({} per host), {} servers, partition {} B, NCCL {}",
            bps.size(),
            bps.local_size(),
            bps.num_servers(),
            bps.config().partition_bytes,
            gpu::nccl_version().map_or_else(|e| format!("unavailable ({e})"), |v| v.to_string())
        );
        println!(
            "{:>12} {:>12} {:>6} {:>12} {:>9} {:>9} {:>7}",
            "size(B)", "count", "type", "time(us)", "algbw", "busbw", "wrong"
        );
    }
    let rows = run(&bps, &a, dtype, &sizes);
    let mut code = ExitCode::SUCCESS;
    match &rows {
        Ok(rows) => {
            if rows.iter().any(|r| r.wrong > 0) {
                eprintln!("bps-bench gpu: rank {}: WRONG RESULTS", bps.rank());
                code = ExitCode::from(1);
            }
            if bps.rank() == 0 {
                if let Some(p) = &a.json {
                    let v: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|r| {
                            serde_json::json!({"bytes": r.bytes, "dtype": dtype.to_string(),
                            "time_us": r.time_us, "algbw_gbs": r.algbw, "busbw_gbs": r.busbw,
                            "wrong": r.wrong, "workers": bps.size(), "local_size": bps.local_size(),
                            "servers": bps.num_servers()})
                        })
                        .collect();
                    if let Err(e) =
                        std::fs::write(p, serde_json::to_string_pretty(&v).unwrap_or_default())
                    {
                        eprintln!("bps-bench gpu: {}: {e}", p.display());
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("bps-bench gpu: rank {}: {e}", bps.rank());
            code = ExitCode::from(1);
        }
    }
    if a.staging && bps.local_rank() == 0 {
        let dev = a.device.unwrap_or(0);
        let bytes = 256 << 20;
        match gpu::staging_bandwidth(dev, bytes, bps.config().partition_bytes, 5) {
            Ok(f) => println!(
                "# staging on GPU {dev}, 256 MiB in {} B chunks (GB/s): plain D2H {:.1}, staged D2H {:.1} ({:.2}x); plain H2D {:.1}, staged H2D {:.1} ({:.2}x); both directions at once {:.1} each",
                bps.config().partition_bytes,
                f.plain_d2h,
                f.staged_d2h,
                f.staged_d2h / f.plain_d2h,
                f.plain_h2d,
                f.staged_h2d,
                f.staged_h2d / f.plain_h2d,
                f.staged_both
            ),
            Err(e) => {
                eprintln!("bps-bench gpu: staging: {e}");
                code = ExitCode::from(1);
            }
        }
    }
    let _ = bps.shutdown();
    code
}
