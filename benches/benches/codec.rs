//! Wire-codec benches: a frame header's encode and decode, and the encode and decode of two
//! control messages, `Msg::InitKey` (sent once per key) and `Msg::Welcome` with a 64-entry
//! address book (the largest message of the rendezvous).

use std::hint::black_box;

use bps_runtime::proto::{BookEntry, Msg, SCOPE_GLOBAL};
use bps_runtime::Role;
use bps_transport::codec::{FrameHeader, FrameKind, DEFAULT_MAX_MESSAGE, HEADER_LEN};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench_header(c: &mut Criterion) {
    let h = FrameHeader {
        kind: FrameKind::Write,
        imm: 0x0102_0304,
        len: 4 << 20,
        token: 0xdead_beef_0000_0001,
        offset: 12 << 20,
        lane: 3,
    };
    let bytes = h.encode();
    assert_eq!(FrameHeader::decode(&bytes, DEFAULT_MAX_MESSAGE), Ok(h));
    let mut group = c.benchmark_group("codec/frame_header");
    group.throughput(Throughput::Bytes(HEADER_LEN as u64));
    group.bench_function("encode", |b| b.iter(|| black_box(&h).encode()));
    group.bench_function("decode", |b| {
        b.iter(|| FrameHeader::decode(black_box(&bytes), DEFAULT_MAX_MESSAGE))
    });
    group.bench_function("round_trip", |b| {
        b.iter(|| FrameHeader::decode(&black_box(&h).encode(), DEFAULT_MAX_MESSAGE))
    });
    group.finish();
}

fn welcome(entries: u32) -> Msg {
    let book = (0..entries)
        .map(|i| BookEntry {
            peer: i,
            role: if i % 2 == 0 {
                Role::Worker
            } else {
                Role::Server
            },
            rank: i / 2,
            tcp: format!("10.0.{}.{}:9{:03}", i / 8, i % 8 + 10, i),
            unix: if i % 2 == 0 {
                format!("/tmp/bps-{}-{i}.sock", 4242 + i)
            } else {
                String::new()
            },
            host: format!("{:016x}", 0x5eed_0000_u64 + u64::from(i / 8)),
            hostname: format!("node-{:02}.cluster.local", i / 8),
        })
        .collect();
    Msg::Welcome {
        rank: 3,
        peer: 7,
        num_workers: entries / 2,
        num_servers: entries / 2,
        local_size: 4,
        partition_bytes: 4 << 20,
        min_chunks: 64,
        book,
    }
}

fn bench_msgs(c: &mut Criterion) {
    let init_key = Msg::InitKey {
        key: (17 << 32) | 3,
        bytes: 4 << 20,
        dtype: 0,
        reply_slot: 42,
        name: "encoder.layer.17.intermediate.dense.weight".into(),
        scope: SCOPE_GLOBAL,
        upstream: 0,
    };
    for (name, msg) in [("init_key", init_key), ("welcome_64", welcome(64))] {
        let bytes = msg.encode();
        assert_eq!(Msg::decode(&bytes).as_ref(), Ok(&msg));
        let mut group = c.benchmark_group(format!("codec/{name}"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function("encode", |b| b.iter(|| black_box(&msg).encode()));
        group.bench_function("decode", |b| b.iter(|| Msg::decode(black_box(&bytes))));
        group.bench_function("round_trip", |b| {
            b.iter(|| Msg::decode(&black_box(&msg).encode()))
        });
        group.finish();
    }
}

criterion_group!(benches, bench_header, bench_msgs);
criterion_main!(benches);
