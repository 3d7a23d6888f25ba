//! Helpers shared by the in-process job tests.
#![allow(dead_code)]

use std::collections::HashMap;

use bps_runtime::config::Lookup;
use bps_runtime::{Bps, Config};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn cfg(pairs: &[(&str, String)]) -> Config {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.clone()))
        .collect();
    let c = Config::from_lookup(&Lookup::map(&m)).unwrap();
    c
}

/// Run `f` on `workers` worker threads and `servers` server threads of one job.
pub fn job<F>(workers: u32, servers: u32, extra: &[(&str, &str)], f: F)
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
            (
                "BPS_EMBED_SCHEDULER",
                if rank == Some(0) { "1" } else { "0" }.to_string(),
            ),
        ];
        if let Some(r) = rank {
            let l: u32 = extra
                .iter()
                .find(|(k, _)| *k == "BYTEPS_LOCAL_SIZE")
                .map_or(1, |(_, v)| v.parse().unwrap());
            v.push(("BPS_RANK", r.to_string()));
            v.push(("BPS_NUM_WORKER", workers.to_string()));
            v.push(("BYTEPS_LOCAL_RANK", (r % l).to_string()));
        }
        v.push(("BPS_NUM_WORKER", workers.to_string()));
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
