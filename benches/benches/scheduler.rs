//! Scheduler benches: planning a model (partition every tensor into 4 MiB chunks and give each
//! chunk a server out of 8) for ResNet-50 and BERT-large, and a [`CreditQueue`] moving 10k
//! items of mixed priorities and sizes through a 16 MiB credit.

use std::collections::VecDeque;
use std::hint::black_box;

use bps_benches::{bert_large, full_run, resnet50, total_elems, Tensor};
use bps_scheduler::{
    partition, ChunkIndex, CreditQueue, Key, Priority, ServerAssigner, TensorId,
    DEFAULT_PARTITION_BYTES,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SERVERS: u32 = 8;
const F32: usize = 4;
const CREDIT: u64 = 16 << 20;

/// Partitions every tensor of `model` (f32) and assigns each chunk a server.
fn plan(model: &[Tensor]) -> ServerAssigner {
    let mut servers = ServerAssigner::new(SERVERS).expect("SERVERS is not 0");
    for (i, t) in model.iter().enumerate() {
        let chunks = partition(t.elems * F32, F32, DEFAULT_PARTITION_BYTES)
            .expect("an f32 tensor of whole elements partitions");
        black_box(servers.assign_tensor(TensorId(i as u32), &chunks));
    }
    servers
}

fn bench_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler/plan");
    for (name, model) in [("resnet50", resnet50()), ("bert_large", bert_large())] {
        let servers = plan(&model);
        let loads = servers.loads();
        println!(
            "{name}: {} tensors, {:.1} M parameters, {} keys of <= 4 MiB on {SERVERS} servers, \
             load per server {:.1}..{:.1} MiB",
            model.len(),
            total_elems(&model) as f64 / 1e6,
            servers.num_keys(),
            *loads.iter().min().unwrap_or(&0) as f64 / (1 << 20) as f64,
            *loads.iter().max().unwrap_or(&0) as f64 / (1 << 20) as f64,
        );
        group.throughput(Throughput::Elements(model.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &model, |b, m| {
            b.iter(|| plan(black_box(m)))
        });
    }
    group.finish();
}

/// `n` items with priorities 0..8 and sizes from 4 KiB to 4 MiB (several sizes, skewed to
/// small ones as in a real model), from a fixed-seed generator.
fn items(n: usize) -> Vec<(Key, Priority, u64)> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..n)
        .map(|i| {
            let r = next();
            let bytes =
                [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20][(r % 6) as usize];
            let key = Key::new(TensorId((i / 4) as u32), ChunkIndex((i % 4) as u32));
            (key, Priority(((r >> 8) % 8) as i32), bytes)
        })
        .collect()
}

/// Pushes every item, then pops what the credit allows, releasing the oldest in-flight item
/// whenever nothing more fits (as completions would). Returns the items that left.
fn credit_burst(items: &[(Key, Priority, u64)]) -> usize {
    let mut q = CreditQueue::new(CREDIT);
    for &(k, p, b) in items {
        q.push(k, p, b);
    }
    let mut in_flight = VecDeque::new();
    let mut left = 0;
    loop {
        while let Some((k, bytes)) = q.pop() {
            black_box(k);
            in_flight.push_back(bytes);
            left += 1;
        }
        match in_flight.pop_front() {
            Some(bytes) => q.release(bytes),
            None => return left,
        }
    }
}

/// Interleaved: after each push, pops what fits; when the credit is full, releases the
/// oldest in-flight item. Keeps the queue short, as in a steady pipeline.
fn credit_steady(items: &[(Key, Priority, u64)]) -> usize {
    let mut q = CreditQueue::new(CREDIT);
    let mut in_flight = VecDeque::new();
    let mut left = 0;
    for &(k, p, b) in items {
        q.push(k, p, b);
        while let Some((k, bytes)) = q.pop() {
            black_box(k);
            in_flight.push_back(bytes);
            left += 1;
        }
        if !q.is_empty() {
            if let Some(bytes) = in_flight.pop_front() {
                q.release(bytes);
            }
        }
    }
    loop {
        while let Some((k, bytes)) = q.pop() {
            black_box(k);
            in_flight.push_back(bytes);
            left += 1;
        }
        match in_flight.pop_front() {
            Some(bytes) => q.release(bytes),
            None => return left,
        }
    }
}

fn bench_credit_queue(c: &mut Criterion) {
    let n = if full_run() { 10_000 } else { 100 };
    let items = items(n);
    assert_eq!(credit_burst(&items), n);
    assert_eq!(credit_steady(&items), n);
    let mut group = c.benchmark_group("scheduler/credit_queue");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::new("burst", n), &items, |b, it| {
        b.iter(|| credit_burst(black_box(it)))
    });
    group.bench_with_input(BenchmarkId::new("steady", n), &items, |b, it| {
        b.iter(|| credit_steady(black_box(it)))
    });
    group.finish();
}

criterion_group!(benches, bench_plan, bench_credit_queue);
criterion_main!(benches);
