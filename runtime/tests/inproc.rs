//! Several workers (and servers) as threads of one test process: fast end-to-end checks of the
//! protocol. The multi-process tests through bps-launch are in tools/bps-launch/tests.

use std::collections::HashMap;
use std::time::Duration;

use bps_runtime::config::Lookup;
use bps_runtime::{Bps, Config, PushPullOpts};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cfg(pairs: &[(&str, String)]) -> Config {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.clone()))
        .collect();
    let c = Config::from_lookup(&Lookup::map(&m)).unwrap();
    c
}

/// Run `f` on `workers` worker threads and `servers` server threads of one job.
fn job<F>(workers: u32, servers: u32, extra: &[(&str, &str)], f: F)
where
    F: Fn(Bps) + Send + Sync + Clone + 'static,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("BPS_LOG"))
        .with_test_writer()
        .try_init();
    let port = free_port().to_string();
    let base = move |role: &str, rank: Option<u32>| {
        let mut v = vec![
            ("DMLC_ROLE", role.to_string()),
            ("DMLC_NUM_WORKER", workers.to_string()),
            ("DMLC_NUM_SERVER", servers.to_string()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            ("DMLC_PS_ROOT_PORT", port.clone()),
            ("BPS_TIMEOUT", "20s".to_string()),
            ("BYTEPS_SERVER_ENGINE_THREAD", "2".to_string()),
        ];
        if let Some(r) = rank {
            v.push(("DMLC_WORKER_ID", r.to_string()));
        }
        for (k, x) in extra {
            v.push((k, x.to_string()));
        }
        cfg(&v)
    };
    let mut hs = Vec::new();
    for s in 0..servers {
        let c = base("server", None);
        let _ = s;
        hs.push(std::thread::spawn(move || {
            bps_runtime::run_server(c).unwrap();
        }));
    }
    for r in 0..workers {
        let c = base("worker", Some(r));
        let f = f.clone();
        hs.push(std::thread::spawn(move || {
            let b = Bps::init_with(c).unwrap();
            f(b.clone());
            b.shutdown().unwrap();
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
}

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
                .push_pull("g", v, PushPullOpts { average: false, priority: 1 })
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
            .push_pull("a", v, PushPullOpts { average: true, priority: 0 })
            .unwrap()
            .wait()
            .unwrap();
        assert!(out.iter().all(|x| *x == 1.0), "{out:?}");
        let h = b.push_pull("a", vec![1.0f32; 7], PushPullOpts::default()).unwrap();
        assert!(h.handle().wait_timeout(Duration::from_secs(20)).is_some());
    });
}
