//! End-to-end tests of the `bps-launch` binary. Every launcher run is bounded: a run that
//! outlives its limit is killed and the test fails with what it printed.
//!
//! Real bps jobs use this test binary itself as the worker command: the ignored test
//! `bps_worker` below, started by the launcher with `--ignored --exact bps_worker`.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// Variables a test's own environment might carry that would change the launcher's mode.
const ROLE_VARS: &[&str] = &[
    "DMLC_ROLE",
    "DMLC_NUM_WORKER",
    "DMLC_NUM_SERVER",
    "DMLC_WORKER_ID",
    "DMLC_PS_ROOT_URI",
    "DMLC_PS_ROOT_PORT",
    "BYTEPS_LOCAL_SIZE",
    "BYTEPS_LOCAL_RANK",
    "BPS_TIMEOUT",
    "BPS_TRANSPORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

fn launcher() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bps-launch"));
    for k in ROLE_VARS {
        c.env_remove(k);
    }
    c.stdin(Stdio::null());
    c
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Out {
    fn all(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Read a pipe to its end in a thread (nothing when the pipe was taken already).
fn collect(r: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = BufReader::new(r).read_to_string(&mut s);
        }
        let _ = tx.send(s);
    });
    rx
}

/// Wait for `child` at most `limit`; kill it and fail the test past that.
fn finish(mut child: Child, limit: Duration) -> Out {
    let start = Instant::now();
    let out = collect(child.stdout.take());
    let err = collect(child.stderr.take());
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let stdout = out
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_default();
            let stderr = err
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_default();
            return Out {
                code: st.code(),
                stdout,
                stderr,
                took: start.elapsed(),
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
            let stderr = err.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
            panic!(
                "still running after {limit:?}; killed\n--- stdout\n{stdout}--- stderr\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bps-launch")
}

fn run(args: &[&str]) -> Out {
    let mut c = launcher();
    c.args(args);
    finish(spawn(c), LIMIT)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The `K=V` lines a worker printed, keyed by variable.
fn vars_of(out: &Out, worker: u32) -> std::collections::HashMap<String, String> {
    let prefix = format!("[worker {worker}] ");
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for its new parent to reap it is dead too.
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

#[test]
fn hello_from_every_worker() {
    let o = run(&[
        "--workers",
        "2",
        "--servers",
        "1",
        "--local-size",
        "1",
        "--",
        "sh",
        "-c",
        "echo hello from $DMLC_WORKER_ID",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.all());
    assert!(
        o.stdout.contains("[worker 0] hello from 0\n"),
        "{}",
        o.all()
    );
    assert!(
        o.stdout.contains("[worker 1] hello from 1\n"),
        "{}",
        o.all()
    );
    // The server was never used: stopped after a short grace, not after BPS_TIMEOUT.
    assert!(
        o.took < Duration::from_secs(20),
        "took {:?}\n{}",
        o.took,
        o.all()
    );
}

#[test]
fn default_local_size_is_one_worker_per_node() {
    let o = run(&[
        "--workers",
        "2",
        "--",
        "sh",
        "-c",
        "echo id $DMLC_WORKER_ID rank $RANK local $BYTEPS_LOCAL_RANK of $BYTEPS_LOCAL_SIZE; \
         echo oops >&2",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.all());
    assert!(
        o.stdout.contains("[worker 0] id 0 rank 0 local 0 of 1\n"),
        "{}",
        o.all()
    );
    assert!(
        o.stdout.contains("[worker 1] id 1 rank 1 local 0 of 1\n"),
        "{}",
        o.all()
    );
    assert!(o.stderr.contains("[worker 1] oops\n"), "{}", o.all());
    assert!(o.took < Duration::from_secs(10), "took {:?}", o.took);
}

#[test]
fn a_failing_worker_stops_the_job() {
    let o = run(&[
        "--workers",
        "2",
        "--local-size",
        "1",
        "--servers",
        "1",
        "--",
        "sh",
        "-c",
        "if [ $DMLC_WORKER_ID = 1 ]; then echo giving up >&2; exit 3; fi; sleep 30",
    ]);
    assert_eq!(o.code, Some(3), "{}", o.all());
    assert!(
        o.took < Duration::from_secs(15),
        "took {:?}\n{}",
        o.took,
        o.all()
    );
    assert!(
        o.stderr
            .contains("bps-launch: worker 1 exited with status 3"),
        "{}",
        o.all()
    );
    // Its last words come before the verdict.
    let said = o
        .stderr
        .find("[worker 1] giving up")
        .expect("worker output");
    let verdict = o.stderr.find("worker 1 exited").expect("verdict");
    assert!(said < verdict, "{}", o.all());
}

#[test]
fn a_worker_killed_by_a_signal_is_named() {
    let o = run(&[
        "-n",
        "2",
        "-l",
        "1",
        "--",
        "sh",
        "-c",
        "[ $RANK = 0 ] && kill -9 $$; sleep 30",
    ]);
    assert_eq!(o.code, Some(1), "{}", o.all());
    assert!(
        o.stderr
            .contains("bps-launch: worker 0 killed by signal 9 (SIGKILL)"),
        "{}",
        o.all()
    );
    assert!(o.took < Duration::from_secs(15), "took {:?}", o.took);
}

#[test]
fn a_missing_program_is_reported() {
    let o = run(&[
        "--workers",
        "1",
        "--",
        "/nonexistent/bps-launch-test-program",
    ]);
    assert_eq!(o.code, Some(127), "{}", o.all());
    assert!(o.stderr.contains("cannot start worker 0"), "{}", o.all());
}

#[test]
fn bad_usage_exits_2_naming_the_flag() {
    for (args, needle) in [
        (&["--workers", "0", "--", "true"][..], "--workers"),
        (
            &["--workers", "3", "--local-size", "2", "--", "true"][..],
            "--local-size",
        ),
        (&["--workers", "2"][..], "COMMAND"),
        (&["--workers", "2", "--servers", "1"][..], "COMMAND"),
        (
            &["--workers", "2", "--timeout", "soon", "--", "true"][..],
            "--timeout",
        ),
        (
            &["--workers", "2", "--transport", "pigeon", "--", "true"][..],
            "--transport",
        ),
        (
            &["--workers", "2", "--env", "RANK=3", "--", "true"][..],
            "RANK",
        ),
        (
            &["--workers", "2", "--env", "novalue", "--", "true"][..],
            "--env",
        ),
        (&["--", "true"][..], "--workers"),
    ] {
        let o = run(args);
        assert_eq!(o.code, Some(2), "{args:?}\n{}", o.all());
        assert!(
            o.stderr.contains(needle),
            "{args:?}: no {needle}\n{}",
            o.all()
        );
    }
}

#[test]
fn help_documents_both_modes() {
    let o = run(&["--help"]);
    assert_eq!(o.code, Some(0));
    for needle in [
        "--workers",
        "--servers",
        "--local-size",
        "--timeout",
        "--transport",
        "--env",
        "DMLC_ROLE=scheduler",
        "EXAMPLES",
    ] {
        assert!(
            o.stdout.contains(needle),
            "help lacks {needle}\n{}",
            o.stdout
        );
    }
    assert!(!o.stdout.contains("internal-server"), "{}", o.stdout);
}

#[test]
fn every_worker_gets_the_job_environment() {
    let port = free_port().to_string();
    let o = run(&[
        "--workers",
        "4",
        "--local-size",
        "2",
        "--servers",
        "2",
        "--port",
        &port,
        "--timeout",
        "20s",
        "--transport",
        "tcp",
        "--env",
        "FOO=bar baz",
        "--",
        "sh",
        "-c",
        "env | grep -E '^(DMLC|BYTEPS|BPS|RANK|WORLD|LOCAL|MASTER|FOO)' | sort",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.all());
    for i in 0..4u32 {
        let v = vars_of(&o, i);
        let want = [
            ("DMLC_ROLE", "worker".to_string()),
            ("DMLC_WORKER_ID", (i / 2).to_string()),
            ("BYTEPS_LOCAL_RANK", (i % 2).to_string()),
            ("BYTEPS_LOCAL_SIZE", "2".into()),
            ("DMLC_NUM_WORKER", "2".into()),
            ("DMLC_NUM_SERVER", "2".into()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".into()),
            ("DMLC_PS_ROOT_PORT", port.clone()),
            ("BPS_EMBED_SCHEDULER", "0".into()),
            ("BPS_TIMEOUT", "20s".into()),
            ("BPS_TRANSPORT", "tcp".into()),
            ("RANK", i.to_string()),
            ("WORLD_SIZE", "4".into()),
            ("LOCAL_RANK", (i % 2).to_string()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("FOO", "bar baz".into()),
        ];
        for (k, val) in want {
            assert_eq!(v.get(k), Some(&val), "worker {i}: {k}\n{}", o.all());
        }
        assert!(!v.contains_key("MASTER_PORT"), "worker {i}\n{}", o.all());
    }
}

#[test]
fn sigterm_stops_every_process_group() {
    let mut c = launcher();
    c.args([
        "--workers",
        "2",
        "--servers",
        "1",
        "--",
        "sh",
        "-c",
        "sleep 30 & echo pid $!; wait",
    ]);
    let mut child = spawn(c);
    let launcher_pid = child.id() as i32;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut pids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                if let Some(p) = l
                    .split_once("] pid ")
                    .and_then(|(_, p)| p.parse::<i32>().ok())
                {
                    pids.push(p);
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("workers did not start; got {pids:?}");
            }
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launcher_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the launcher");
    let o = finish(child, Duration::from_secs(20));
    assert_eq!(o.code, Some(130), "{}", o.all());
    assert!(o.stderr.contains("interrupted"), "{}", o.all());
    // The workers' own children (in the workers' process groups) are gone too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|p| gone(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &pids {
        assert!(gone(*p), "sleep {p} survived the launcher\n{}", o.all());
    }
}

#[test]
fn role_mode_worker_starts_local_copies() {
    let mut c = launcher();
    c.env("DMLC_ROLE", "worker")
        .env("DMLC_WORKER_ID", "1")
        .env("DMLC_NUM_WORKER", "2")
        .env("BYTEPS_LOCAL_SIZE", "3")
        .args([
            "--",
            "sh",
            "-c",
            "echo local $BYTEPS_LOCAL_RANK of $BYTEPS_LOCAL_SIZE role $DMLC_ROLE",
        ]);
    let o = finish(spawn(c), LIMIT);
    assert_eq!(o.code, Some(0), "{}", o.all());
    for (rank, local) in [(3, 0), (4, 1), (5, 2)] {
        let want = format!("[worker {rank}] local {local} of 3 role worker\n");
        assert!(o.stdout.contains(&want), "no {want:?}\n{}", o.all());
    }
}

#[test]
fn role_mode_rejects_bad_variables() {
    let mut c = launcher();
    c.env("DMLC_ROLE", "boss").args(["--", "true"]);
    let o = finish(spawn(c), LIMIT);
    assert_eq!(o.code, Some(2), "{}", o.all());
    assert!(o.stderr.contains("DMLC_ROLE"), "{}", o.all());

    let mut c = launcher();
    c.env("DMLC_ROLE", "worker")
        .env("BYTEPS_LOCAL_SIZE", "2")
        .env("DMLC_NUM_WORKER", "1")
        .env("DMLC_WORKER_ID", "5")
        .args(["--", "true"]);
    let o = finish(spawn(c), LIMIT);
    assert_eq!(o.code, Some(2), "{}", o.all());
    assert!(o.stderr.contains("DMLC_WORKER_ID"), "{}", o.all());
}

/// The worker command of the real jobs below: init, one push_pull checked, shutdown.
#[test]
#[ignore = "a worker process started by the launcher tests"]
fn bps_worker() {
    let bps = bps_runtime::init().expect("bps init");
    let (rank, size) = (bps.rank(), bps.size());
    let v = vec![(rank + 1) as f32; 100_000];
    let sum = bps
        .push_pull("grad", v, bps_runtime::PushPullOpts::default())
        .expect("push_pull")
        .wait()
        .expect("push_pull result");
    let want = (size * (size + 1) / 2) as f32;
    assert!(
        sum.iter().all(|x| *x == want),
        "rank {rank}: got {} want {want}",
        sum[0]
    );
    println!("rank {rank} of {size}: sum ok");
    if std::env::var_os("BPS_TEST_NO_SHUTDOWN").is_some() {
        // A worker that forgets to shut down: its connections just close.
        std::process::exit(0);
    }
    bps.shutdown().expect("shutdown");
}

fn worker_command() -> Vec<String> {
    let me = std::env::current_exe().expect("test executable");
    vec![
        me.display().to_string(),
        "--ignored".into(),
        "--exact".into(),
        "bps_worker".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ]
}

fn real_job(extra: &[&str]) {
    let mut c = launcher();
    c.args(extra)
        .args(["--timeout", "20s", "--"])
        .args(worker_command());
    let o = finish(spawn(c), LIMIT);
    assert_eq!(o.code, Some(0), "{}", o.all());
    for r in 0..2 {
        let line = o
            .stdout
            .lines()
            .find(|l| l.contains(&format!("rank {r} of 2: sum ok")));
        assert!(
            line.is_some_and(|l| l.starts_with(&format!("[worker {r}] "))),
            "{}",
            o.all()
        );
    }
    // The servers ended by themselves: nothing was stopped or killed.
    assert!(!o.stderr.contains("bps-launch:"), "{}", o.all());
    assert!(
        o.took < Duration::from_secs(30),
        "took {:?}\n{}",
        o.took,
        o.all()
    );
}

#[test]
fn real_job_with_servers_ends_cleanly() {
    real_job(&["--workers", "2", "--servers", "1"]);
}

#[test]
fn real_job_colocated_ends_cleanly() {
    real_job(&["--workers", "2", "--local-size", "1"]);
}

#[test]
fn real_job_in_role_mode() {
    let port = free_port().to_string();
    let job = |role: &str| {
        let mut c = launcher();
        c.env("DMLC_ROLE", role)
            .env("DMLC_NUM_WORKER", "1")
            .env("BYTEPS_LOCAL_SIZE", "2")
            .env("DMLC_NUM_SERVER", "1")
            .env("DMLC_PS_ROOT_URI", "127.0.0.1")
            .env("DMLC_PS_ROOT_PORT", &port)
            .env("DMLC_WORKER_ID", "0")
            .env("BPS_TIMEOUT", "20s")
            .arg("--")
            .args(worker_command());
        spawn(c)
    };
    let sched = job("scheduler");
    let server = job("server");
    let workers = job("worker");
    let w = finish(workers, LIMIT);
    let s = finish(server, Duration::from_secs(30));
    let r = finish(sched, Duration::from_secs(30));
    assert_eq!(w.code, Some(0), "workers\n{}", w.all());
    for r in 0..2 {
        let line = w
            .stdout
            .lines()
            .find(|l| l.contains(&format!("rank {r} of 2: sum ok")));
        assert!(
            line.is_some_and(|l| l.starts_with(&format!("[worker {r}] "))),
            "{}",
            w.all()
        );
    }
    assert_eq!(s.code, Some(0), "server\n{}", s.all());
    assert_eq!(r.code, Some(0), "scheduler\n{}", r.all());
}
