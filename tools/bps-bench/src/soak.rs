//! `bps-bench soak`: a long randomized push_pull run with every result checked.
//!
//! A seeded generator draws a pool of tensors, as a model has: sizes from one element up to
//! `--max-bytes` (log-uniform, so most are odd sizes, with the smallest and the largest always
//! in), dtypes from `--dtype`. Every tensor is first used once on its own (placement and key
//! set-up), then each step draws 1..=`--tensors` distinct tensors of the pool, a priority each
//! and whether the sum is averaged, submits them all (in the drawn order, or with
//! `--submit by-priority` highest priority first), waits for them and compares every result
//! bit for bit with the expected sum (the sweep's `--check`: every worker recomputes every other
//! worker's input). Rank 0 picks the seed (from `--seed`, else the clock), prints it and
//! broadcasts it, so every worker draws the same sequence and calls push_pull on the same
//! tensors in the same order.
//!
//! The run ends together: after each step every worker adds 1 to a one-element stop tensor
//! once its own `--duration` is over, and all stop when the sum is not zero. A mismatch does not
//! stop the run; it is counted, the first ones are described on stderr, and the exit status is
//! then 1. An error of the runtime (a dead peer, a timeout) ends the run with status 1.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bps_runtime::config::{parse_duration, Config, Lookup};
use bps_runtime::{Bps, DType, PushPullOpts};
use clap::Parser;

/// Options of `bps-bench soak`.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long to run: 500ms, 60s, 15m, 1h or plain seconds.
    #[arg(long, default_value = "60s")]
    duration: String,
    /// Seed of the workload (default: rank 0 draws one from the clock); always printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Tensors in the pool (sizes and dtypes drawn once, fixed for the run).
    #[arg(long, default_value_t = 24)]
    pool: u32,
    /// Largest tensor (bytes, K/M/G suffixes); sizes are drawn from one element up to this.
    #[arg(long, default_value = "6M")]
    max_bytes: String,
    /// Most tensors in flight in one step (each step draws 1..=N of them).
    #[arg(long, default_value_t = 6)]
    tensors: u32,
    /// Order in which a step submits its tensors: `random` (independent of the priorities, as
    /// a backward pass hands gradients over) or `by-priority` (highest first, as the sweep).
    #[arg(long, value_enum, default_value = "random")]
    submit: Submit,
    /// Element types to draw from (comma list, or `all`).
    #[arg(long, default_value = "f32,f16,bf16,f64,i32")]
    dtype: String,
    /// Seconds between progress lines of rank 0 (0: none).
    #[arg(long, default_value_t = 10)]
    report: u64,
    /// BYTEPS_PARTITION_BYTES for this run.
    #[arg(long)]
    partition_bytes: Option<String>,
    /// BPS_CREDIT_BYTES for this run.
    #[arg(long)]
    credit: Option<String>,
    /// Transport: auto, tcp, shm, rdma.
    #[arg(long)]
    transport: Option<String>,
    /// Local cluster: workers (when not joining a job).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Local cluster: servers (when not joining a job).
    #[arg(long, default_value_t = 1)]
    servers: u32,
}

/// Order of submission within a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Submit {
    /// The drawn order, whatever the priorities.
    Random,
    /// Highest priority first (ties in the drawn order).
    ByPriority,
}

/// The workload's generator: splitmix64, the same on every worker for one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        // crate::splitmix adds the increment once more before mixing: still a bijection of
        // the counter, so the stream is splitmix64's with a shifted start.
        crate::splitmix(self.0)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One tensor of the pool.
#[derive(Debug, Clone)]
struct Tensor {
    name: String,
    dtype: DType,
    bytes: usize,
}

/// The pool: tensor 0 has one element, tensor 1 `max_bytes`, the others log-uniform between;
/// the first tensors take the dtypes in turn (each dtype is in the pool), the rest draw one.
fn draw_pool(rng: &mut Rng, n: u32, max_bytes: usize, dtypes: &[DType]) -> Vec<Tensor> {
    (0..n as usize)
        .map(|i| {
            let dtype = if i < dtypes.len() {
                dtypes[i]
            } else {
                dtypes[rng.below(dtypes.len() as u64) as usize]
            };
            let max_el = (max_bytes / dtype.size()).max(1);
            let count = match i {
                0 => 1,
                1 => max_el,
                _ => ((max_el as f64).powf(rng.unit()) as usize).clamp(1, max_el),
            };
            let bytes = count * dtype.size();
            Tensor {
                name: format!("soak.{i}.{}.{bytes}", dtype.name()),
                dtype,
                bytes,
            }
        })
        .collect()
}

/// One operation of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Op {
    tensor: usize,
    priority: i32,
    average: bool,
}

/// The operations of one step: 1..=most distinct tensors in a random order (or, with
/// `Submit::ByPriority`, sorted by priority, highest first), each with a priority in -8..=8
/// and, one time in four, averaged.
fn draw_step(rng: &mut Rng, pool: usize, most: u32, submit: Submit) -> Vec<Op> {
    let k = 1 + rng.below(most.clamp(1, pool as u32) as u64) as usize;
    let mut idx: Vec<usize> = (0..pool).collect();
    // the first k of a Fisher-Yates shuffle
    for i in 0..k {
        let j = i + rng.below((pool - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut ops: Vec<Op> = idx[..k]
        .iter()
        .map(|&tensor| Op {
            tensor,
            priority: rng.below(17) as i32 - 8,
            average: rng.below(4) == 0,
        })
        .collect();
    if submit == Submit::ByPriority {
        ops.sort_by_key(|o| std::cmp::Reverse(o.priority));
    }
    ops
}

#[derive(Default)]
struct Totals {
    steps: u64,
    results: u64,
    bytes: u64,
    wrong: u64,
    by_dtype: HashMap<&'static str, u64>,
}

fn human(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// The sweep's options with `--average` on or off: what `crate::expected` reads.
fn sweep_args(average: bool) -> crate::RunArgs {
    let mut a = crate::Cli::parse_from(["bps-bench"]).run;
    a.op = crate::Op::PushPull;
    a.average = average;
    a
}

/// Submits a step's operations, waits for them and checks every result.
struct Checker<'a> {
    bps: &'a Bps,
    pool: &'a [Tensor],
    plain: crate::RunArgs,
    averaged: crate::RunArgs,
    rank: u32,
    n: u32,
    group: u32,
    seed: u64,
}

impl Checker<'_> {
    /// `iter` selects the inputs (with the tensor's index), as the sweep's iteration does.
    fn ops(&self, ops: &[Op], iter: u32, tot: &mut Totals) -> Result<(), String> {
        let rank = self.rank;
        // Each input is made just before its submission: the tensors come one after another,
        // as a backward pass hands over gradients, not all at once.
        let mut pending = Vec::with_capacity(ops.len());
        for op in ops {
            let t = &self.pool[op.tensor];
            let input = crate::gen(t.dtype, t.bytes, rank, op.tensor as u32, iter);
            let opts = PushPullOpts {
                average: op.average,
                priority: op.priority,
            };
            let p = self.bps.push_pull_bytes(&t.name, t.dtype, input, opts);
            pending.push(p.map_err(|e| e.to_string())?);
        }
        let mut results = Vec::with_capacity(pending.len());
        for p in pending {
            results.push(p.wait().map_err(|e| e.to_string())?);
        }
        for (op, got) in ops.iter().zip(&results) {
            let t = &self.pool[op.tensor];
            let a = if op.average {
                &self.averaged
            } else {
                &self.plain
            };
            let want = crate::expected(
                a,
                t.dtype,
                t.bytes,
                self.n,
                op.tensor as u32,
                iter,
                0,
                self.group,
            );
            tot.results += 1;
            tot.bytes += t.bytes as u64;
            *tot.by_dtype.entry(t.dtype.name()).or_default() += 1;
            if *got != want {
                tot.wrong += 1;
                if tot.wrong <= 3 {
                    let first = got.iter().zip(&want).position(|(a, b)| a != b);
                    eprintln!(
                        "bps-bench: rank {rank}: WRONG result of {} ({} bytes{}), iteration {iter} (first difference at byte {}, seed {})",
                        t.name,
                        t.bytes,
                        if op.average { ", averaged" } else { "" },
                        first.map_or_else(
                            || format!("{} (length)", got.len().min(want.len())),
                            |f| f.to_string()
                        ),
                        self.seed
                    );
                }
            }
        }
        Ok(())
    }
}

fn run(bps: &Bps, args: &SoakArgs, duration: Duration, max_bytes: usize) -> Result<Totals, String> {
    let dtypes = crate::parse_dtypes(&args.dtype)?;
    let rank = bps.rank();
    let n = bps.size();
    let group = if bps.local_reduce() {
        bps.local_size()
    } else {
        1
    };
    let e = |e: bps_runtime::Error| e.to_string();

    // Rank 0's seed, sent to everyone.
    let mine = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        crate::splitmix(t.as_nanos() as u64 ^ std::process::id() as u64)
    });
    let got = bps
        .broadcast_bytes("soak.seed", DType::U8, mine.to_le_bytes().to_vec(), 0, 0)
        .map_err(e)?
        .wait()
        .map_err(e)?;
    let seed = u64::from_le_bytes(
        got.as_slice()
            .try_into()
            .map_err(|_| format!("seed broadcast returned {} bytes, not 8", got.len()))?,
    );
    let mut rng = Rng(seed);
    let pool = draw_pool(&mut rng, args.pool.max(1), max_bytes, &dtypes);
    if rank == 0 {
        let total: usize = pool.iter().map(|t| t.bytes).sum();
        let smallest = pool.iter().map(|t| t.bytes).min().unwrap_or(0);
        let largest = pool.iter().map(|t| t.bytes).max().unwrap_or(0);
        println!(
            "soak: seed {seed}; {n} workers, {} servers; pool of {} tensors, {} .. {} ({} in all), dtypes {}; up to {} in flight, submitted {}; every result checked; duration {duration:?}",
            bps.num_servers(),
            pool.len(),
            human(smallest as f64),
            human(largest as f64),
            human(total as f64),
            args.dtype,
            args.tensors.max(1),
            match args.submit {
                Submit::Random => "in random order",
                Submit::ByPriority => "by priority",
            }
        );
        let _ = std::io::stdout().flush();
    }
    let ck = Checker {
        bps,
        pool: &pool,
        plain: sweep_args(false),
        averaged: sweep_args(true),
        rank,
        n,
        group,
        seed,
    };
    let mut tot = Totals::default();
    bps.barrier().map_err(e)?;
    let first_use = Instant::now();
    // First use of every tensor, one at a time: placement and key set-up happen here, before
    // the steps put several tensors in flight (iteration 0 of the inputs).
    for (tensor, t) in pool.iter().enumerate() {
        let op = Op {
            tensor,
            priority: 0,
            average: false,
        };
        ck.ops(&[op], 0, &mut tot)
            .map_err(|err| format!("first use of {}: {err}", t.name))?;
    }
    if rank == 0 {
        println!(
            "soak: first use of the {} tensors, one at a time: {:.1} s",
            pool.len(),
            first_use.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
    }
    let start = Instant::now();
    let mut next_report = Duration::from_secs(args.report);
    loop {
        let step = tot.steps as u32;
        let ops = draw_step(&mut rng, pool.len(), args.tensors, args.submit);
        ck.ops(&ops, step.wrapping_add(1), &mut tot)
            .map_err(|err| format!("step {step}: {err}"))?;
        tot.steps += 1;
        // Stop together: the sum counts the workers whose time is over.
        let over = i32::from(start.elapsed() >= duration);
        let stop = bps
            .push_pull_bytes(
                "soak.stop",
                DType::I32,
                over.to_ne_bytes().to_vec(),
                PushPullOpts::default(),
            )
            .map_err(e)?
            .wait()
            .map_err(|err| format!("step {step} (stop vote): {err}"))?;
        let votes = i32::from_ne_bytes(
            stop.as_slice()
                .try_into()
                .map_err(|_| format!("stop vote returned {} bytes, not 4", stop.len()))?,
        );
        tot.results += 1;
        tot.bytes += 4;
        if !(over..=n as i32).contains(&votes) {
            tot.wrong += 1;
            eprintln!(
                "bps-bench: rank {rank}: WRONG stop vote in step {step}: {votes}, expected {over}..={n}"
            );
        }
        if rank == 0 && args.report > 0 && start.elapsed() >= next_report {
            while next_report <= start.elapsed() {
                next_report += Duration::from_secs(args.report);
            }
            println!(
                "soak: {:.0} s: {} steps, {} results, {}, {} wrong",
                start.elapsed().as_secs_f64(),
                tot.steps,
                tot.results,
                human(tot.bytes as f64),
                tot.wrong
            );
            let _ = std::io::stdout().flush();
        }
        if votes > 0 {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut by: Vec<_> = tot.by_dtype.iter().collect();
    by.sort();
    println!(
        "soak: rank {rank}: {} steps, {} results checked ({}), {} wrong, {secs:.1} s, seed {seed}; results by dtype: {}",
        tot.steps,
        tot.results,
        human(tot.bytes as f64),
        tot.wrong,
        by.iter()
            .map(|(d, c)| format!("{d} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(tot)
}

/// Start a local cluster through bps-launch, running this same `soak` command line.
fn local_cluster(args: &SoakArgs) -> ExitCode {
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(err) => {
            eprintln!("bps-bench: cannot find my own executable: {err}");
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
    let status = std::process::Command::new(launcher)
        .arg("--workers")
        .arg(args.workers.to_string())
        .arg("--servers")
        .arg(args.servers.to_string())
        .arg("--")
        .arg(&me)
        .args(std::env::args_os().skip(1))
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(err) => {
            eprintln!("bps-bench: cannot start bps-launch: {err}");
            ExitCode::from(1)
        }
    }
}

/// `bps-bench soak`.
pub fn main(args: SoakArgs) -> ExitCode {
    let Some(duration) = parse_duration(&args.duration) else {
        eprintln!(
            "bps-bench: --duration {:?}: expected e.g. 500ms, 60s, 15m, 1h or plain seconds",
            args.duration
        );
        return ExitCode::from(2);
    };
    let max_bytes = match crate::parse_size(&args.max_bytes) {
        Some(b) if b >= 1 => b,
        _ => {
            eprintln!(
                "bps-bench: --max-bytes {:?}: expected a size of at least 1 byte (e.g. 6M)",
                args.max_bytes
            );
            return ExitCode::from(2);
        }
    };
    if let Err(err) = crate::parse_dtypes(&args.dtype) {
        eprintln!("bps-bench: {err}");
        return ExitCode::from(2);
    }
    if !crate::in_job() {
        return local_cluster(&args);
    }
    let mut vars: Vec<(&str, String)> = Vec::new();
    for (var, v) in [
        ("BYTEPS_PARTITION_BYTES", &args.partition_bytes),
        ("BPS_CREDIT_BYTES", &args.credit),
    ] {
        if let Some(v) = v {
            vars.push((
                var,
                crate::parse_size(v).map_or(v.clone(), |b| b.to_string()),
            ));
        }
    }
    if let Some(t) = &args.transport {
        vars.push(("BPS_TRANSPORT", t.clone()));
    }
    let env: HashMap<String, String> = std::env::vars()
        .chain(vars.into_iter().map(|(k, v)| (k.to_string(), v)))
        .collect();
    let cfg = match Config::from_lookup(&Lookup::map(&env)) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("bps-bench: {err}");
            return ExitCode::from(2);
        }
    };
    // BytePS-style jobs start the same command in every role.
    let served = match cfg.role {
        bps_runtime::Role::Server => bps_runtime::run_server(cfg).map_err(|e| ("server", e)),
        bps_runtime::Role::Scheduler => {
            bps_runtime::run_scheduler(&cfg).map_err(|e| ("scheduler", e))
        }
        bps_runtime::Role::Worker => return worker(cfg, &args, duration, max_bytes),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err((role, err)) => {
            eprintln!("bps-bench: {role}: {err}");
            ExitCode::from(1)
        }
    }
}

fn worker(cfg: Config, args: &SoakArgs, duration: Duration, max_bytes: usize) -> ExitCode {
    let bps = match Bps::init_with(cfg) {
        Ok(b) => b,
        Err(err) => {
            eprintln!("bps-bench: init failed: {err}");
            return ExitCode::from(1);
        }
    };
    let code = match run(&bps, args, duration, max_bytes) {
        Ok(t) if t.wrong == 0 => ExitCode::SUCCESS,
        Ok(t) => {
            eprintln!("bps-bench: rank {}: {} wrong results", bps.rank(), t.wrong);
            ExitCode::from(1)
        }
        Err(err) => {
            eprintln!("bps-bench: rank {}: soak: {err}", bps.rank());
            ExitCode::from(1)
        }
    };
    let _ = bps.shutdown();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_draws_one_workload() {
        let dt = [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32];
        let (mut a, mut b) = (Rng(7), Rng(7));
        let (pa, pb) = (
            draw_pool(&mut a, 24, 6 << 20, &dt),
            draw_pool(&mut b, 24, 6 << 20, &dt),
        );
        assert_eq!(
            pa.iter().map(|t| (&t.name, t.bytes)).collect::<Vec<_>>(),
            pb.iter().map(|t| (&t.name, t.bytes)).collect::<Vec<_>>()
        );
        for _ in 0..100 {
            assert_eq!(
                draw_step(&mut a, 24, 6, Submit::Random),
                draw_step(&mut b, 24, 6, Submit::Random)
            );
        }
        let mut c = Rng(8);
        let pc = draw_pool(&mut c, 24, 6 << 20, &dt);
        assert_ne!(
            pa.iter().map(|t| t.bytes).collect::<Vec<_>>(),
            pc.iter().map(|t| t.bytes).collect::<Vec<_>>()
        );
    }

    #[test]
    fn pool_spans_one_element_to_max_with_every_dtype() {
        let dt = [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32];
        let pool = draw_pool(&mut Rng(1), 24, 6 << 20, &dt);
        assert_eq!(pool[0].bytes, pool[0].dtype.size());
        assert_eq!(pool[1].bytes, 6 << 20);
        for d in dt {
            assert!(pool.iter().any(|t| t.dtype == d), "{d:?} missing");
        }
        for t in &pool {
            assert!(t.bytes >= t.dtype.size() && t.bytes <= 6 << 20, "{t:?}");
            assert_eq!(t.bytes % t.dtype.size(), 0, "{t:?}");
        }
        // log-uniform sizes: odd element counts are common
        assert!(pool
            .iter()
            .any(|t| (t.bytes / t.dtype.size()) % 2 == 1 && t.bytes > 4));
    }

    #[test]
    fn steps_pick_distinct_tensors_within_bounds() {
        let mut r = Rng(3);
        let mut sizes = std::collections::HashSet::new();
        for _ in 0..1000 {
            let s = draw_step(&mut r, 10, 4, Submit::Random);
            assert!((1..=4).contains(&s.len()));
            let mut t: Vec<_> = s.iter().map(|o| o.tensor).collect();
            t.sort();
            t.dedup();
            assert_eq!(t.len(), s.len(), "{s:?}");
            assert!(s
                .iter()
                .all(|o| o.tensor < 10 && (-8..=8).contains(&o.priority)));
            sizes.insert(s.len());
        }
        assert_eq!(sizes.len(), 4);
        // more in flight than the pool holds: capped at the pool
        assert!(draw_step(&mut r, 2, 6, Submit::Random).len() <= 2);
    }

    #[test]
    fn by_priority_draws_the_same_step_sorted() {
        let (mut a, mut b) = (Rng(11), Rng(11));
        let mut unsorted = 0;
        for _ in 0..200 {
            let mut r = draw_step(&mut a, 12, 6, Submit::Random);
            let p = draw_step(&mut b, 12, 6, Submit::ByPriority);
            assert!(
                p.windows(2).all(|w| w[0].priority >= w[1].priority),
                "{p:?}"
            );
            if r.windows(2).any(|w| w[0].priority < w[1].priority) {
                unsorted += 1;
            }
            r.sort_by_key(|o| std::cmp::Reverse(o.priority));
            assert_eq!(r, p);
        }
        // random order really submits a lower priority before a higher one
        assert!(unsorted > 50, "{unsorted}");
    }
}
