//! Summation benches: `sum_into` of W = 2 and 4 inputs of 32 MiB for f32, f64, f16, bf16,
//! i32 and u8, against two memory-bandwidth baselines on the same buffers: a plain
//! `copy_from_slice` (memcpy) and a STREAM-like triad `a[i] = b[i] + s * c[i]` (f64).
//!
//! Bytes are counted as the data the kernel must move: (W inputs + 1 output) × len for a sum,
//! 2 × len for memcpy (read + write) and 3 × len for the triad, so throughputs compare
//! directly. (Write-allocate traffic is not counted for any of them.)
//!
//! Before criterion measures each sum, the bench prints its ratio to memcpy from 31 runs of
//! each, alternating (the median of the pair ratios), which the load of a shared machine
//! disturbs far less than two criterion figures taken a minute apart.
//!
//! `BPS_BENCH_SUM_MIB` sets the buffer size (default 32 MiB).

use std::hint::black_box;
use std::time::Instant;

use bps_benches::{full_run, gib_per_s, note_smoke_test, paired, summaries_wanted, Side};
use bps_runtime::sum::sum_into;
use bps_runtime::DType;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use half::{bf16, f16};

/// Fills `buf` with ordinary, finite values of `dtype` (no NaN, no subnormal) that depend on
/// `seed`, writing every page so that no page fault lands in the timed part.
fn fill(dtype: DType, buf: &mut [u8], seed: usize) {
    let v = |i: usize| 1.0 + ((i * 7 + seed * 13) % 1000) as f32 / 1024.0;
    macro_rules! each {
        ($n:expr, |$i:ident| $bytes:expr) => {
            for ($i, c) in buf.chunks_exact_mut($n).enumerate() {
                c.copy_from_slice(&$bytes);
            }
        };
    }
    match dtype {
        DType::F32 => each!(4, |i| v(i).to_ne_bytes()),
        DType::F64 => each!(8, |i| f64::from(v(i)).to_ne_bytes()),
        DType::F16 => each!(2, |i| f16::from_f32(v(i)).to_bits().to_ne_bytes()),
        DType::BF16 => each!(2, |i| bf16::from_f32(v(i)).to_bits().to_ne_bytes()),
        DType::I32 => each!(4, |i| ((i * 7 + seed) as i32).to_ne_bytes()),
        DType::I64 => each!(8, |i| ((i * 7 + seed) as i64).to_ne_bytes()),
        DType::U8 => each!(1, |i| [(i * 7 + seed) as u8]),
    }
}

/// MiB per buffer: `BPS_BENCH_SUM_MIB`, default 32 (5 buffers of it for W = 4, plus 3 for
/// the triad). Larger sizes show whether the last-level cache flatters the figures.
fn buffer_mib() -> usize {
    match std::env::var("BPS_BENCH_SUM_MIB") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&m| (1..=4096).contains(&m))
            .unwrap_or_else(|| panic!("BPS_BENCH_SUM_MIB={v:?}: expected 1..=4096")),
        Err(_) => 32,
    }
}

fn bench_sum(c: &mut Criterion) {
    note_smoke_test();
    let len: usize = if full_run() {
        buffer_mib() << 20
    } else {
        64 << 10
    };
    println!("sum: {} KiB per buffer", len >> 10);
    let mut inputs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; len]).collect();
    let mut out = vec![0u8; len];
    out.fill(1); // touch every page
    for buf in inputs.iter().chain([&out]) {
        // sum_into takes its aligned path (no bounce through stack scratch) only then.
        assert_eq!(
            buf.as_ptr().align_offset(8),
            0,
            "buffers are 8-byte aligned"
        );
    }

    let pairs = if full_run() { 31 } else { 3 };
    let mut group = c.benchmark_group("sum");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);

    fill(DType::F32, &mut inputs[0], 0);
    group.throughput(Throughput::Bytes(2 * len as u64));
    group.bench_function("memcpy", |b| {
        b.iter(|| out.copy_from_slice(black_box(&inputs[0])))
    });

    {
        let n = len / 8;
        let src_b: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let src_c: Vec<f64> = (0..n).map(|i| (n - i) as f64).collect();
        let mut a = vec![0.0f64; n];
        group.throughput(Throughput::Bytes(3 * len as u64));
        group.bench_function("triad_f64", |bench| {
            bench.iter(|| {
                let s = black_box(3.0f64);
                for ((a, b), c) in a.iter_mut().zip(&src_b).zip(&src_c) {
                    *a = b + s * c;
                }
                black_box(&mut a);
            })
        });
    }

    for dtype in [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U8,
    ] {
        for (k, buf) in inputs.iter_mut().enumerate() {
            fill(dtype, buf, k);
        }
        for w in [2, 4] {
            let ins: Vec<&[u8]> = inputs[..w].iter().map(Vec::as_slice).collect();
            let sum_bytes = (w as u64 + 1) * len as u64;
            if summaries_wanted() {
                let p = paired(pairs, |side| {
                    let t = Instant::now();
                    match side {
                        Side::Base => out.copy_from_slice(black_box(ins[0])),
                        Side::Subject => sum_into(dtype, black_box(&mut out), black_box(&ins))
                            .expect("inputs and output have the same length"),
                    }
                    t.elapsed()
                });
                println!(
                    "paired {dtype} w{w}: {:.1} GiB/s, memcpy {:.1} GiB/s, ratio {:.2} \
                     (median of {pairs} alternating pairs; target >= 0.9)",
                    gib_per_s(sum_bytes, p.subject),
                    gib_per_s(2 * len as u64, p.base),
                    p.speed_ratio * sum_bytes as f64 / (2 * len) as f64,
                );
            }
            group.throughput(Throughput::Bytes((w as u64 + 1) * len as u64));
            group.bench_function(BenchmarkId::new(dtype.to_string(), format!("w{w}")), |b| {
                b.iter(|| {
                    sum_into(dtype, black_box(&mut out), black_box(&ins))
                        .expect("inputs and output have the same length")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_sum);
criterion_main!(benches);
