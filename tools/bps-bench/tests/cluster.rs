//! Multi-process jobs on loopback through `bps-launch`: the worker × server matrix, sizes from
//! 0 B to 256 MiB, every dtype, many tensors in flight, broadcast from a non-zero root, the shm
//! path, and the failure cases (dead peer, bad environment). Every result is checked by
//! `bps-bench --check` against the exact expected sum.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bps-bench"))
}

fn launcher() -> PathBuf {
    let p = bench().with_file_name("bps-launch");
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// Wait for a child at most `limit`; kill it and fail the test if it takes longer.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            if let Some(mut o) = child.stdout.take() {
                o.read_to_end(&mut stdout).unwrap();
            }
            if let Some(mut e) = child.stderr.take() {
                e.read_to_end(&mut stderr).unwrap();
            }
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish within {limit:?} (a hang)\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run bps-bench under bps-launch; returns stdout. Fails the test on a non-zero exit.
fn launch(workers: u32, servers: u32, extra_launch: &[&str], bench_args: &[&str]) -> String {
    let mut cmd = Command::new(launcher());
    cmd.args([
        "--workers",
        &workers.to_string(),
        "--servers",
        &servers.to_string(),
    ])
    .args(["--timeout", "30s"])
    .args(extra_launch)
    .arg("--")
    .arg(bench())
    .args(bench_args)
    .env("BYTEPS_SERVER_ENGINE_THREAD", "2")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // Output is collected by a thread so a chatty job cannot fill the pipe and stall.
    let child = cmd.spawn().unwrap();
    let out = wait_bounded(
        child,
        Duration::from_secs(240),
        &format!("{workers} workers x {servers} servers {bench_args:?}"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{workers} workers x {servers} servers {bench_args:?} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// The nccl-tests table must report zero wrong results on every row.
fn assert_all_right(out: &str, rows: usize) {
    let data: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.contains("[worker 0]") && !l.contains('#') && l.split_whitespace().count() >= 9
        })
        .filter(|l| !l.contains("size") && !l.contains("(B)"))
        .collect();
    assert_eq!(data.len(), rows, "expected {rows} result rows in:\n{out}");
    for l in data {
        let wrong = l.split_whitespace().last().unwrap();
        assert_eq!(wrong, "0", "wrong results in row: {l}");
    }
}

const SIZES: &str = "0,4,6,4100,65536,1M";

fn matrix(workers: u32, servers: u32, transport: &str) {
    // 64 KiB partitions: 65536 is exactly one chunk, 1M is 16 chunks, 4100 an odd sub-chunk.
    let out = launch(
        workers,
        servers,
        &["--transport", transport],
        &[
            "--sizes",
            SIZES,
            "--dtype",
            "f32,i32",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--tensors",
            "3",
            "--check",
            "--partition-bytes",
            "65536",
        ],
    );
    assert_all_right(&out, 12);
}

/// The whole matrix once per backend this machine runs (auto picks shm on one host).
macro_rules! matrix_tests {
    ($($name:ident: $w:expr, $s:expr;)*) => {
        mod auto {
            $(
                #[test]
                fn $name() {
                    super::matrix($w, $s, "auto");
                }
            )*
        }
        mod tcp {
            $(
                #[test]
                fn $name() {
                    super::matrix($w, $s, "tcp");
                }
            )*
        }
    };
}

matrix_tests! {
    w1_s0: 1, 0;
    w1_s1: 1, 1;
    w1_s2: 1, 2;
    w1_s4: 1, 4;
    w2_s0: 2, 0;
    w2_s1: 2, 1;
    w2_s2: 2, 2;
    w2_s4: 2, 4;
    w4_s0: 4, 0;
    w4_s1: 4, 1;
    w4_s2: 4, 2;
    w4_s4: 4, 4;
    w8_s0: 8, 0;
    w8_s1: 8, 1;
    w8_s2: 8, 2;
    w8_s4: 8, 4;
}

#[test]
fn every_dtype_with_average() {
    let out = launch(
        3,
        2,
        &[],
        &[
            "--sizes",
            "2,4100,300000",
            "--dtype",
            "all",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--check",
            "--average",
            "--partition-bytes",
            "65536",
        ],
    );
    assert_all_right(&out, 21);
}

#[test]
fn many_tensors_in_flight_with_mixed_priorities() {
    let out = launch(
        4,
        2,
        &[],
        &[
            "--sizes",
            "4100,200000",
            "--dtype",
            "f32",
            "--iters",
            "3",
            "--warmup",
            "0",
            "--tensors",
            "16",
            "--check",
            "--partition-bytes",
            "16384",
            "--credit",
            "65536",
        ],
    );
    assert_all_right(&out, 2);
}

#[test]
fn broadcast_from_a_non_zero_root() {
    let out = launch(
        4,
        1,
        &[],
        &[
            "--op",
            "broadcast",
            "--root",
            "2",
            "--sizes",
            "0,1,4100,1M",
            "--dtype",
            "f32,bf16",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--tensors",
            "2",
            "--check",
            "--partition-bytes",
            "65536",
        ],
    );
    assert_all_right(&out, 8);
}

#[test]
fn one_tensor_of_256_mib() {
    let out = launch(
        2,
        1,
        &[],
        &[
            "--sizes", "256M", "--dtype", "f32", "--iters", "1", "--warmup", "0", "--check",
        ],
    );
    assert_all_right(&out, 1);
}

#[test]
fn shm_is_used_between_processes_of_one_host() {
    let out = launch(
        2,
        1,
        &[],
        &[
            "--sizes",
            "4K",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--check",
            "--show-links",
        ],
    );
    assert_all_right(&out, 1);
    for r in 0..2 {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("# rank {r} links:")))
            .unwrap_or_else(|| panic!("no link report of rank {r} in:\n{out}"));
        assert!(line.contains("server 0=shm"), "{line}");
    }
    // Forcing TCP really changes the path.
    let out = launch(
        2,
        1,
        &["--transport", "tcp"],
        &[
            "--sizes",
            "4K",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--check",
            "--show-links",
        ],
    );
    assert!(out.contains("server 0=tcp"), "{out}");
}

#[test]
fn local_reduction_groups_through_the_launcher() {
    let out = launch(
        4,
        1,
        &["--local-size", "2"],
        &[
            "--sizes",
            "4,4100,1M",
            "--dtype",
            "f32,bf16,i64",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--tensors",
            "2",
            "--check",
            "--partition-bytes",
            "65536",
            "--show-links",
        ],
    );
    assert_all_right(&out, 9);
    assert!(out.contains("worker 1=shm"), "{out}");
}

// ---------------------------------------------------------------------------- failures

fn job_env(cmd: &mut Command, role: &str, workers: u32, servers: u32, port: u16, id: Option<u32>) {
    cmd.env("DMLC_ROLE", role)
        .env("DMLC_NUM_WORKER", workers.to_string())
        .env("DMLC_NUM_SERVER", servers.to_string())
        .env("DMLC_PS_ROOT_URI", "127.0.0.1")
        .env("DMLC_PS_ROOT_PORT", port.to_string())
        .env("BPS_TIMEOUT", "5s")
        .env("BYTEPS_SERVER_ENGINE_THREAD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(i) = id {
        cmd.env("DMLC_WORKER_ID", i.to_string());
        // No scheduler process in this test: worker 0 hosts it.
        cmd.env("BPS_EMBED_SCHEDULER", if i == 0 { "1" } else { "0" });
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kill -9 one process of a running job: every survivor fails with an error naming the dead
/// peer, within the timeout — no hang, no wrong result.
fn kill_one(victim_is_server: bool) {
    let port = free_port();
    let long = [
        "--sizes", "1M", "--iters", "100000", "--warmup", "0", "--check",
    ];
    let mut server = Command::new(bench());
    job_env(&mut server, "server", 2, 1, port, None);
    let server = server.args(long).spawn().unwrap();
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut w = Command::new(bench());
        job_env(&mut w, "worker", 2, 1, port, Some(i));
        workers.push(w.args(long).spawn().unwrap());
    }
    std::thread::sleep(Duration::from_millis(1500));
    let start = Instant::now();
    let (mut victim, survivors, name): (Child, Vec<(Child, &str)>, &str) = if victim_is_server {
        let mut it = workers.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        (server, vec![(a, "worker 0"), (b, "worker 1")], "server 0")
    } else {
        let mut it = workers.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        (b, vec![(a, "worker 0"), (server, "server 0")], "worker 1")
    };
    victim.kill().unwrap(); // SIGKILL
    let _ = victim.wait();
    for (child, who) in survivors {
        let out = wait_bounded(child, Duration::from_secs(20), who);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if who.starts_with("worker") {
            assert!(!out.status.success(), "{who} should fail after {name} died");
            assert!(
                stderr.contains(name),
                "{who} error does not name {name}:\n{stderr}"
            );
            assert!(!stderr.contains("WRONG"), "{stderr}");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_killed_server_fails_every_worker_with_its_name() {
    kill_one(true);
}

#[test]
fn a_killed_worker_fails_the_others_with_its_name() {
    kill_one(false);
}

#[test]
fn bad_environment_is_a_clear_error() {
    for (k, v) in [
        ("DMLC_NUM_WORKER", "abc"),
        ("BPS_TIMEOUT", "forever"),
        ("BYTEPS_PARTITION_BYTES", "7"),
        ("BPS_TRANSPORT", "pigeon"),
    ] {
        let child = Command::new(bench())
            .env("DMLC_ROLE", "worker")
            .env(k, v)
            .args(["--sizes", "4K"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_bounded(child, Duration::from_secs(20), k);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{k}={v}: {stderr}");
        assert!(
            stderr.contains(k) && stderr.contains(v),
            "{k}={v}: {stderr}"
        );
    }
}
