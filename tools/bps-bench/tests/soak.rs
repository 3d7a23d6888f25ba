//! `bps-bench soak` through `bps-launch`: short randomized runs, every result checked; the
//! workers must agree on the seed and the number of steps, and report no wrong result.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
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

/// What one worker said at the end: "soak: rank R: S steps, C results checked (...), W wrong,
/// T s, seed X; ...".
#[derive(Debug)]
struct Summary {
    rank: u32,
    steps: u64,
    results: u64,
    wrong: u64,
    seed: u64,
}

fn summaries(stdout: &str) -> Vec<Summary> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("soak: rank ")? + "soak: rank ".len()..];
            let num_before = |s: &str, key: &str| -> Option<u64> {
                let head = &s[..s.find(key)?];
                head.rsplit(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            let seed_at = rest.find("seed ")? + "seed ".len();
            Some(Summary {
                rank: rest[..rest.find(':')?].parse().ok()?,
                steps: num_before(rest, " steps")?,
                results: num_before(rest, " results checked")?,
                wrong: num_before(rest, " wrong")?,
                seed: rest[seed_at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()?,
            })
        })
        .collect()
}

/// Run a soak of `secs` seconds under bps-launch; returns stdout after asserting success.
fn soak(workers: u32, servers: u32, transport: &str, extra: &[&str], secs: u32) -> String {
    let mut child = Command::new(launcher())
        .args(["--workers", &workers.to_string()])
        .args(["--servers", &servers.to_string()])
        .args(["--transport", transport, "--timeout", "20s", "--"])
        .arg(bench())
        .args(["soak", "--duration", &format!("{secs}s"), "--report", "1"])
        .args(["--max-bytes", "1M", "--partition-bytes", "64K"])
        .args(extra)
        .env("BYTEPS_SERVER_ENGINE_THREAD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes while waiting, so a chatty run cannot stall on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        so.read_to_string(&mut s).unwrap();
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        se.read_to_string(&mut s).unwrap();
        s
    });
    let limit = Duration::from_secs(secs as u64 + 90);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "soak did not end within {limit:?} (a hang)\nstdout:\n{}\nstderr:\n{}",
                out_t.join().unwrap(),
                err_t.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    assert!(
        status.success(),
        "soak failed: {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(!stderr.contains("WRONG"), "{stderr}");
    stdout
}

/// Every worker printed its summary; they agree; steps > 0, results > steps, 0 wrong.
fn assert_agreed(stdout: &str, workers: u32) -> Vec<Summary> {
    let s = summaries(stdout);
    assert_eq!(
        s.len(),
        workers as usize,
        "one summary per worker in:\n{stdout}"
    );
    let mut ranks: Vec<u32> = s.iter().map(|x| x.rank).collect();
    ranks.sort();
    assert_eq!(ranks, (0..workers).collect::<Vec<_>>(), "{stdout}");
    for x in &s {
        assert!(x.steps > 0, "no step done: {x:?}\n{stdout}");
        // every step checks at least one tensor and the stop vote
        assert!(x.results >= 2 * x.steps, "{x:?}");
        assert_eq!(x.wrong, 0, "{x:?}\n{stdout}");
        assert_eq!(
            (x.steps, x.results, x.seed),
            (s[0].steps, s[0].results, s[0].seed),
            "{stdout}"
        );
    }
    s
}

#[test]
fn soak_two_workers_one_server_over_tcp() {
    let out = soak(2, 1, "tcp", &["--seed", "424242"], 3);
    let s = assert_agreed(&out, 2);
    assert_eq!(s[0].seed, 424242);
    assert!(out.contains("soak: seed 424242;"), "{out}");
    // rank 0's progress lines (--report 1), one per second at most
    let progress: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.starts_with("[worker 0] soak: ") && l.contains(" s: ") && l.contains(" steps, ")
        })
        .collect();
    assert!(!progress.is_empty() && progress.len() <= 4, "{out}");
}

#[test]
fn soak_colocated_draws_and_shares_a_seed() {
    // No --seed: rank 0 draws one and broadcasts it; every worker must report it.
    let out = soak(
        3,
        0,
        "auto",
        &["--tensors", "8", "--submit", "by-priority"],
        3,
    );
    let s = assert_agreed(&out, 3);
    assert!(out.contains(&format!("soak: seed {};", s[0].seed)), "{out}");
}

/// Tensors submitted in an order other than their priorities' (the default, as a backward pass
/// hands over gradients: the layers nearest the input, with the highest priority, come last),
/// 8 in flight, small partitions so that one tensor can fill a worker's credit. Before credit
/// came back when a push had left, this deadlocked: a worker's credit was held until the sum
/// came back, and when two workers' send queues picked different tensors first (one had only
/// the earlier, low-priority tensor when it sent, the other had both), each one's credit was
/// held by chunks waiting for the other's pushes (docs/failure.md). It showed in release builds,
/// where the submissions come close enough together.
#[test]
fn soak_submitting_out_of_priority_order() {
    let out = soak(3, 1, "auto", &["--tensors", "8", "--submit", "random"], 4);
    assert_agreed(&out, 3);
    assert!(out.contains("submitted in random order"), "{out}");
}

#[test]
fn soak_rejects_a_bad_duration() {
    let out = Command::new(bench())
        .args(["soak", "--duration", "forever"])
        .env("DMLC_ROLE", "worker")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--duration \"forever\""));
}
