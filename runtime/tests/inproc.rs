//! Several workers (and servers) as threads of one test process: fast end-to-end checks of the
//! protocol. The multi-process tests through bps-launch are in tools/bps-launch/tests.

use std::time::Duration;

use bps_runtime::{Bps, PushPullOpts};

mod common;
use common::{cfg, free_port, job};

#[test]
fn sum_two_workers_colocated() {
    job(2, 0, &[], |b| {
        let r = b.rank() as f32;
        let v: Vec<f32> = (0..1000).map(|i| i as f32 + r).collect();
        let out = b
            .push_pull("w", v, PushPullOpts::default())
            .unwrap()
            .wait()
            .unwrap();
        for (i, x) in out.iter().enumerate() {
            assert_eq!(*x, 2.0 * i as f32 + 1.0);
        }
    });
}

#[test]
fn sum_and_broadcast_with_servers_many_chunks() {
    job(3, 2, &[("BYTEPS_PARTITION_BYTES", "4096")], |b| {
        let n = 10_000usize;
        let r = b.rank() as i32;
        for step in 0..3 {
            let v: Vec<i32> = (0..n as i32).map(|i| i * (r + 1) + step).collect();
            let out = b
                .push_pull(
                    "g",
                    v,
                    PushPullOpts {
                        average: false,
                        priority: 1,
                    },
                )
                .unwrap()
                .wait()
                .unwrap();
            for (i, x) in out.iter().enumerate() {
                assert_eq!(*x, i as i32 * 6 + 3 * step, "step {step} i {i}");
            }
        }
        let v: Vec<f64> = vec![b.rank() as f64 + 10.0; 3000];
        let out = b.broadcast("p", v, 2).unwrap().wait().unwrap();
        assert!(out.iter().all(|x| *x == 12.0));
    });
}

#[test]
fn average_and_timeouts_do_not_hang() {
    job(2, 1, &[], |b| {
        let v = vec![b.rank() as f32 * 2.0; 7];
        let out = b
            .push_pull(
                "a",
                v,
                PushPullOpts {
                    average: true,
                    priority: 0,
                },
            )
            .unwrap()
            .wait()
            .unwrap();
        assert!(out.iter().all(|x| *x == 1.0), "{out:?}");
        let h = b
            .push_pull("a", vec![1.0f32; 7], PushPullOpts::default())
            .unwrap();
        assert!(h.handle().wait_timeout(Duration::from_secs(20)).is_some());
    });
}

#[test]
fn mismatched_declarations_fail_on_every_worker() {
    job(2, 1, &[("BPS_TIMEOUT", "10s")], |b| {
        let n = if b.rank() == 0 { 100 } else { 200 };
        let r = b
            .push_pull("x", vec![1.0f32; n], PushPullOpts::default())
            .unwrap()
            .wait();
        let e = r.unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
        assert!(e.contains("400 bytes") && e.contains("800 bytes"), "{e}");
        // dtype differs too
        let r = if b.rank() == 0 {
            b.push_pull("y", vec![1.0f32; 4], PushPullOpts::default())
                .unwrap()
                .wait()
                .map(|_| ())
        } else {
            b.push_pull("y", vec![1i32; 4], PushPullOpts::default())
                .unwrap()
                .wait()
                .map(|_| ())
        };
        let e = r.unwrap_err().to_string();
        assert!(e.contains("f32") && e.contains("i32"), "{e}");
    });
}

#[test]
fn a_mismatch_reaches_every_worker_even_those_that_place_later() {
    job(4, 1, &[("BPS_TIMEOUT", "20s")], |b| {
        // worker 1 disagrees; workers 2 and 3 agree with worker 0 but come later
        if b.rank() >= 2 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let n = if b.rank() == 1 { 10 } else { 20 };
        let t = std::time::Instant::now();
        let e = b
            .push_pull("mm", vec![1.0f32; n], PushPullOpts::default())
            .unwrap()
            .wait()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("40 bytes") && e.contains("80 bytes"),
            "rank {}: {e}",
            b.rank()
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
    });
}

#[test]
fn same_name_with_another_size_on_one_worker_is_an_error() {
    job(1, 0, &[], |b| {
        b.push_pull("z", vec![1.0f32; 8], PushPullOpts::default())
            .unwrap()
            .wait()
            .unwrap();
        let e = b
            .push_pull("z", vec![1.0f32; 9], PushPullOpts::default())
            .unwrap()
            .wait()
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 bytes") && e.contains("36 bytes"), "{e}");
    });
}

#[test]
fn scheduler_port_in_use_is_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let c = cfg(&[
        ("DMLC_PS_ROOT_PORT", port),
        ("BPS_TIMEOUT", "2s".into()),
        ("BPS_EMBED_SCHEDULER", "1".into()),
    ]);
    let e = Bps::init_with(c).unwrap_err().to_string();
    assert!(e.contains("already in use"), "{e}");
}

#[test]
fn missing_worker_fails_rendezvous_within_timeout() {
    let port = free_port().to_string();
    let c = cfg(&[
        ("DMLC_NUM_WORKER", "2".into()),
        ("DMLC_WORKER_ID", "0".into()),
        ("DMLC_PS_ROOT_PORT", port),
        ("BPS_TIMEOUT", "1s".into()),
        ("BPS_EMBED_SCHEDULER", "1".into()),
    ]);
    let t = std::time::Instant::now();
    let e = Bps::init_with(c).unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(e.contains("1 of 2 workers"), "{e}");
}

#[test]
fn zero_length_one_element_and_odd_sizes() {
    job(2, 1, &[("BYTEPS_PARTITION_BYTES", "4096")], |b| {
        for n in [0usize, 1, 3, 1023, 1024, 1025, 4097] {
            let v = vec![b.rank() as i64 + 1; n];
            let out = b
                .push_pull(&format!("t{n}"), v, PushPullOpts::default())
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(out.len(), n);
            assert!(out.iter().all(|x| *x == 3), "n={n}");
        }
    });
}

#[test]
fn calls_after_shutdown_fail_cleanly() {
    job(1, 0, &[], |b| {
        let b2 = b.clone();
        b2.shutdown().unwrap();
        let e = b
            .push_pull("late", vec![1u8; 4], PushPullOpts::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("shut down"), "{e}");
    });
}

#[test]
fn local_reduction_in_host_groups() {
    for servers in [0u32, 1, 2] {
        job(
            4,
            servers,
            &[
                ("BYTEPS_LOCAL_SIZE", "2"),
                ("BYTEPS_PARTITION_BYTES", "4096"),
            ],
            |b| {
                let n = 5000usize;
                let r = b.rank() as i32;
                for step in 0..2 {
                    let v: Vec<i32> = (0..n as i32).map(|i| i + r * 1000 + step).collect();
                    let out = b
                        .push_pull("lr", v, PushPullOpts::default())
                        .unwrap()
                        .wait()
                        .unwrap();
                    for (i, x) in out.iter().enumerate() {
                        assert_eq!(*x, 4 * i as i32 + 6000 + 4 * step, "i {i}");
                    }
                }
                let out = b
                    .broadcast("lrb", vec![b.rank() as f32; 3000], 1)
                    .unwrap()
                    .wait()
                    .unwrap();
                assert!(out.iter().all(|x| *x == 1.0));
                let out = b
                    .broadcast("lrb2", vec![b.rank() as f32; 10], 2)
                    .unwrap()
                    .wait()
                    .unwrap();
                assert!(out.iter().all(|x| *x == 2.0));
                // the host group really uses shared memory between its workers
                let links = b.links();
                let partner = b.rank() ^ 1;
                let kind = links
                    .iter()
                    .find(|(n, _)| *n == format!("worker {partner}"))
                    .and_then(|(_, k)| *k);
                assert_eq!(kind, Some(bps_transport::LinkKind::Shm), "{links:?}");
            },
        );
    }
}

#[test]
fn push_pull_into_a_separate_output_leaves_the_input_alone() {
    job(2, 1, &[("BYTEPS_PARTITION_BYTES", "4096")], |b| {
        let input: Vec<f64> = (0..3000)
            .map(|i| i as f64 * (b.rank() + 1) as f64)
            .collect();
        let (inp, out) = b
            .push_pull_into(
                "into",
                input.clone(),
                vec![0.0; 3000],
                PushPullOpts::default(),
            )
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(inp, input);
        for (i, x) in out.iter().enumerate() {
            assert_eq!(*x, 3.0 * i as f64);
        }
        let e = b
            .push_pull_into(
                "bad",
                vec![1.0f32; 3],
                vec![0.0; 4],
                PushPullOpts::default(),
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("3 elements") && e.contains("4"), "{e}");
    });
}

#[test]
fn the_scheduler_refuses_processes_without_the_job_secret() {
    let port = free_port().to_string();
    let sched_cfg = cfg(&[
        ("DMLC_ROLE", "scheduler".into()),
        ("DMLC_NUM_WORKER", "1".into()),
        ("DMLC_PS_ROOT_PORT", port.clone()),
        ("BPS_JOB_SECRET", "the-right-one".into()),
        ("BPS_TIMEOUT", "5s".into()),
    ]);
    let sched = bps_runtime::Scheduler::start(&sched_cfg).unwrap();
    for secret in [None, Some("another-job")] {
        let mut v = vec![
            ("DMLC_NUM_WORKER", "1".to_string()),
            ("DMLC_PS_ROOT_PORT", port.clone()),
            ("BPS_EMBED_SCHEDULER", "0".into()),
            ("BPS_TIMEOUT", "5s".into()),
        ];
        if let Some(s) = secret {
            v.push(("BPS_JOB_SECRET", s.into()));
        }
        let e = Bps::init_with(cfg(&v)).unwrap_err().to_string();
        assert!(e.contains("secret") || e.contains("BPS_JOB_SECRET"), "{e}");
        assert!(!e.contains("the-right-one"), "the secret leaked: {e}");
    }
    // The scheduler counts a refusal when it sees the failed handshake end (its own thread).
    let t = std::time::Instant::now();
    while sched.refused_connections() < 2 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(sched.refused_connections(), 2);
    // The right secret gets in and works.
    let b = Bps::init_with(cfg(&[
        ("DMLC_NUM_WORKER", "1".into()),
        ("DMLC_PS_ROOT_PORT", port.clone()),
        ("BPS_EMBED_SCHEDULER", "0".into()),
        ("BPS_TIMEOUT", "5s".into()),
        ("BPS_JOB_SECRET", "the-right-one".into()),
    ]))
    .unwrap();
    let out = b
        .push_pull("s", vec![2i32; 5], PushPullOpts::default())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(out, vec![2; 5]);
    b.shutdown().unwrap();
}

#[test]
fn server_memory_is_bounded() {
    job(
        1,
        1,
        &[
            ("BPS_SERVER_MAX_BYTES", "1048576"),
            ("BYTEPS_PARTITION_BYTES", "262144"),
        ],
        |b| {
            // 2 buffers (receive + sum) of 256 KiB per key: 2 keys fit in 1 MiB, a third does not.
            let ok = b
                .push_pull("m1", vec![1u8; 512 << 10], PushPullOpts::default())
                .unwrap()
                .wait();
            assert!(ok.is_ok());
            let e = b
                .push_pull("m2", vec![1u8; 256 << 10], PushPullOpts::default())
                .unwrap()
                .wait()
                .unwrap_err()
                .to_string();
            assert!(e.contains("BPS_SERVER_MAX_BYTES"), "{e}");
        },
    );
}

/// Adaptive partitioning: every process learns the job's rule from the scheduler, tensors of
/// every size (one chunk, a few, many per server) sum exactly under it, and with the rule off
/// the configured partition is used as is.
#[test]
fn adaptive_partitions_are_the_jobs_and_sum_exactly() {
    for (setting, want_1m) in [
        (None, 128 << 10),
        (Some("0"), 4 << 20),
        (Some("2"), 256 << 10),
    ] {
        let extra: Vec<(&str, &str)> = setting
            .map(|s| vec![("BPS_MIN_CHUNKS_PER_SERVER", s)])
            .unwrap_or_default();
        job(2, 2, &extra, move |b| {
            assert_eq!(
                b.config().tensor_partition_bytes(1 << 20),
                want_1m,
                "{setting:?}"
            );
            assert_eq!(b.config().num_servers, 2);
            let r = b.rank() as f32;
            for n in [1usize, 1000, 1 << 18, (3 << 18) + 7] {
                let v: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 + r).collect();
                let out = b
                    .push_pull(&format!("a{n}"), v, PushPullOpts::default())
                    .unwrap()
                    .wait()
                    .unwrap();
                for (i, x) in out.iter().enumerate() {
                    assert_eq!(*x, 2.0 * (i % 1000) as f32 + 1.0, "{setting:?} n {n} i {i}");
                }
            }
        });
    }
}

/// Workers that disagree on BPS_MIN_CHUNKS_PER_SERVER would cut tensors differently: the
/// scheduler refuses the second one, naming the variable and both values.
#[test]
fn workers_disagreeing_on_min_chunks_are_refused() {
    let port = free_port().to_string();
    let worker = |rank: u32, k: &str| {
        cfg(&[
            ("DMLC_ROLE", "worker".into()),
            ("DMLC_NUM_WORKER", "2".into()),
            ("DMLC_NUM_SERVER", "0".into()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".into()),
            ("DMLC_PS_ROOT_PORT", port.clone()),
            ("BPS_TIMEOUT", "3s".into()),
            ("BPS_RANK", rank.to_string()),
            (
                "BPS_EMBED_SCHEDULER",
                if rank == 0 { "1" } else { "0" }.into(),
            ),
            ("BPS_MIN_CHUNKS_PER_SERVER", k.into()),
        ])
    };
    let (a, b) = (worker(0, "64"), worker(1, "8"));
    let t0 = std::thread::spawn(move || Bps::init_with(a).map(|b| b.shutdown()));
    std::thread::sleep(Duration::from_millis(300));
    let t1 = std::thread::spawn(move || Bps::init_with(b).map(|b| b.shutdown()));
    let errs: Vec<String> = [t0, t1]
        .into_iter()
        .filter_map(|t| t.join().unwrap().err().map(|e| e.to_string()))
        .collect();
    assert!(
        errs.iter().any(|e| e.contains("BPS_MIN_CHUNKS_PER_SERVER")
            && e.contains('8')
            && e.contains("64")),
        "{errs:?}"
    );
}

/// The sum of two workers' inputs `(i % m) * (rank + 1) + step`: `(i % m) * 3 + 2 * step`.
fn check_pattern_sum(out: &[i32], m: i32, step: i32, what: &str) {
    for (i, x) in out.iter().enumerate() {
        assert_eq!(
            *x,
            (i as i32 % m) * 3 + 2 * step,
            "{what} step {step} i {i}"
        );
    }
}

/// BPS_SERVER_CREDIT: over a network link a worker holds at most a window of chunks at one
/// server without their sums back (here max(2 × 128 KiB, 512 KiB) = 512 KiB), parks the rest, and
/// every result is still exact; with 0 nothing is parked.
#[test]
fn server_window_bounds_unanswered_bytes_and_sums_exactly() {
    for credit in ["2", "0"] {
        let extra = [
            ("BPS_TRANSPORT", "tcp"),
            ("BYTEPS_PARTITION_BYTES", "131072"),
            ("BPS_MIN_CHUNKS_PER_SERVER", "0"),
            ("BPS_SERVER_CREDIT", credit),
        ];
        job(2, 1, &extra, move |b| {
            let r = b.rank() as i32;
            let n: i32 = 4 << 20; // 16 MiB of i32: 128 chunks at the one server
            for step in 0..3 {
                let v: Vec<i32> = (0..n).map(|i| (i % 977) * (r + 1) + step).collect();
                let out = b
                    .push_pull(
                        "win",
                        v,
                        PushPullOpts {
                            average: false,
                            priority: 0,
                        },
                    )
                    .unwrap()
                    .wait()
                    .unwrap();
                check_pattern_sum(&out, 977, step, &format!("credit {credit}"));
            }
            let s = b.stats();
            let max = s.max_at_server.load(std::sync::atomic::Ordering::Relaxed);
            let parked = s.parked_chunks.load(std::sync::atomic::Ordering::Relaxed);
            if credit == "2" {
                assert!(max > 0 && max <= 512 << 10, "window 512 KiB, held {max}");
                assert!(parked > 0, "a 16 MiB tensor never filled a 512 KiB window");
            } else {
                assert_eq!((max, parked), (0, 0), "window off");
            }
        });
    }
}

/// Workers that submit tensors in different orders fill their windows at the server with
/// different chunks, whose rounds each wait for the other worker's parked ones: the server
/// stops answering, the stall rule lets the parked chunks go, and every operation completes
/// with the exact sum (without it: no answer until BPS_TIMEOUT, a failure).
#[test]
fn opposite_submission_orders_do_not_deadlock_the_server_window() {
    let extra = [
        ("BPS_TRANSPORT", "tcp"),
        ("BYTEPS_PARTITION_BYTES", "131072"),
        ("BPS_MIN_CHUNKS_PER_SERVER", "0"),
        ("BPS_SERVER_CREDIT", "1"),
        ("BPS_TIMEOUT", "8s"),
    ];
    job(2, 1, &extra, |b| {
        let r = b.rank() as i32;
        let n = 1 << 20; // 4 MiB of i32 each: 32 chunks, windows of 512 KiB
                         // Declared in one order (as every job must), submitted in opposite ones.
        b.declare("x").unwrap();
        b.declare("y").unwrap();
        let names = if r == 0 { ["x", "y"] } else { ["y", "x"] };
        for step in 0..3 {
            let hs: Vec<_> = names
                .iter()
                .map(|name| {
                    let v: Vec<i32> = (0..n).map(|i| (i % 1000) * (r + 1) + step).collect();
                    let opts = PushPullOpts {
                        average: false,
                        priority: 0,
                    };
                    (name, b.push_pull(name, v, opts).unwrap())
                })
                .collect();
            for (name, h) in hs {
                let out = h
                    .wait()
                    .unwrap_or_else(|e| panic!("{name} step {step}: {e}"));
                check_pattern_sum(&out, 1000, step, name);
            }
        }
        let s = b.stats();
        let parked = s.parked_chunks.load(std::sync::atomic::Ordering::Relaxed);
        let stalls = s.window_stalls.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("rank {r}: parked {parked}, stalls {stalls}");
    });
}
