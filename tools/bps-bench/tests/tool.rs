//! The tool around the sweep: `--compare`, `--plot`, `raw` (tcp, shm, ping-pong, `--check`),
//! `info` and the JSON record. Every child is bounded: killed after 60 s, which fails the test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bps-bench"))
}

/// A fresh directory of this test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bps-bench-tool-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Wait for a child at most `limit`; kill it and fail the test if it takes longer. Output is
/// read by threads so a chatty child cannot fill a pipe and stall.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {limit:?} (a hang)\nstderr:\n{}",
                String::from_utf8_lossy(&t_err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Run bps-bench in `dir` (no job variables: a plain user's command line).
fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Output, String, String) {
    let mut cmd = Command::new(bench());
    cmd.current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in [
        "DMLC_ROLE",
        "RANK",
        "DMLC_WORKER_ID",
        "BPS_RANK",
        "BPS_BENCH_PROGRESS",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = wait_bounded(cmd.spawn().unwrap(), LIMIT, &format!("bps-bench {args:?}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stdout, stderr)
}

fn run_ok(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let (out, stdout, stderr) = run_in(dir, args, env);
    assert!(
        out.status.success(),
        "bps-bench {args:?} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// Data rows of a table: lines that are not comments, not headers.
fn data_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| l.split_once("] ").map_or(l, |(_, rest)| rest))
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| !l.contains("size") && !l.contains("(B)") && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn assert_svg(path: &Path) -> String {
    let svg = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no SVG at {}: {e}", path.display()));
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.trim_end().ends_with("</svg>"), "SVG not closed");
    svg
}

// ------------------------------------------------------------------------------ compare

fn result_json(rows: &[(&str, u64, f64)]) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|(d, b, bw)| {
            format!(r#"{{"bytes": {b}, "dtype": "{d}", "busbw_gbs": {bw}, "algbw_gbs": {bw}}}"#)
        })
        .collect();
    format!(
        r#"{{"version": "0.1.0", "commit": "c0ffee", "date": "2026-11-27T00:00:00Z", "op": "PushPull",
            "workers": 2, "servers": 1, "rows": [{}]}}"#,
        rows.join(", ")
    )
}

#[test]
fn compare_prints_ratios_and_plots_both_runs() {
    let d = scratch("compare");
    std::fs::write(
        d.join("a.json"),
        result_json(&[("f32", 4096, 1.0), ("f32", 8192, 2.0), ("f32", 65536, 4.0)]),
    )
    .unwrap();
    std::fs::write(
        d.join("b.json"),
        result_json(&[
            ("f32", 4096, 1.5),
            ("f32", 8192, 1.0),
            ("f32", 1 << 20, 9.0),
        ]),
    )
    .unwrap();
    let out = run_ok(
        &d,
        &["--compare", "a.json", "b.json", "--plot", "cmp.svg"],
        &[],
    );
    let rows = data_rows(&out);
    let row = |size: &str| {
        rows.iter()
            .find(|r| r[0] == size)
            .unwrap_or_else(|| panic!("no row {size} in:\n{out}"))
            .clone()
    };
    assert_eq!(row("4K"), ["4K", "f32", "1.000", "1.500", "1.500"], "{out}");
    assert_eq!(row("8K"), ["8K", "f32", "2.000", "1.000", "0.500"], "{out}");
    // A size only one run has: shown, no ratio.
    assert_eq!(row("64K"), ["64K", "f32", "4.000", "-", "-"], "{out}");
    assert_eq!(row("1M"), ["1M", "f32", "-", "9.000", "-"], "{out}");
    let svg = assert_svg(&d.join("cmp.svg"));
    // The legend names the files.
    assert!(svg.contains("a.json") && svg.contains("b.json"), "{svg}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn compare_of_a_file_that_is_not_a_result_is_a_clear_error() {
    let d = scratch("compare-bad");
    std::fs::write(d.join("a.json"), result_json(&[("f32", 4096, 1.0)])).unwrap();
    std::fs::write(d.join("b.json"), "{\"hello\": 1}").unwrap();
    let (out, _, stderr) = run_in(&d, &["--compare", "a.json", "b.json"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr.contains("b.json") && stderr.contains("rows"),
        "{stderr}"
    );
    let (out, _, stderr) = run_in(&d, &["--compare", "a.json", "missing.json"], &[]);
    assert!(!out.status.success());
    assert!(stderr.contains("missing.json"), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
}

// ------------------------------------------------------------------- sweep: --plot, JSON

#[test]
fn plot_and_json_of_a_tiny_real_run() {
    let launcher = bench().with_file_name("bps-launch");
    if !launcher.exists() {
        eprintln!(
            "SKIPPED plot_and_json_of_a_tiny_real_run: {} is missing (build it: cargo build -p bps-launch)",
            launcher.display()
        );
        return;
    }
    let d = scratch("plot");
    let out = run_ok(
        &d,
        &[
            "--workers",
            "2",
            "--servers",
            "1",
            "--sizes",
            "4K,8K",
            "--dtype",
            "f32,i32",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--check",
            "--plot",
            "X.svg",
            "--json",
            "r.json",
        ],
        &[("BPS_GIT_COMMIT", "feedbeef1234"), ("BPS_TIMEOUT", "30s")],
    );
    // Piped output: no progress bar, no terminal control in it.
    assert!(!out.contains('\x1b') && !out.contains('\r'), "{out:?}");
    let rows: Vec<_> = data_rows(&out)
        .into_iter()
        .filter(|r| r.len() == 8)
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    assert!(rows.iter().all(|r| r.last().unwrap() == "0"), "{out}");
    let svg = assert_svg(&d.join("X.svg"));
    assert!(svg.contains("f32") && svg.contains("i32"), "legend: {svg}");

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("r.json")).unwrap()).unwrap();
    assert_eq!(
        doc["commit"], "feedbeef1234",
        "BPS_GIT_COMMIT read at run time"
    );
    let date = doc["date"].as_str().unwrap();
    assert!(
        date.len() == 20 && date.ends_with('Z') && date.as_bytes()[10] == b'T',
        "{date}"
    );
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!doc["machine"]["cpu_model"].as_str().unwrap().is_empty());
    assert_eq!(doc["rows"].as_array().unwrap().len(), 4);
    let _ = std::fs::remove_dir_all(&d);
}

// --------------------------------------------------------------------------------- raw

/// `raw` throughput rows: (size, GB/s, Gbit/s, check).
fn raw_rows(out: &str) -> Vec<(String, f64, f64, String)> {
    data_rows(out)
        .into_iter()
        .map(|r| {
            assert_eq!(r.len(), 7, "row {r:?} in:\n{out}");
            (
                r[0].clone(),
                r[3].parse().unwrap(),
                r[4].parse().unwrap(),
                r[6].clone(),
            )
        })
        .collect()
}

fn raw_throughput(transport: &str) {
    let d = scratch(&format!("raw-{transport}"));
    let out = run_ok(
        &d,
        &[
            "raw",
            "--transport",
            transport,
            "--sizes",
            "4K,1M",
            "--iters",
            "3",
            "--check",
            "--json",
            "raw.json",
        ],
        &[],
    );
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains(&format!("raw: {transport}")),
        "the link used is named: {out}"
    );
    let rows = raw_rows(&out);
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["4K", "1M"],
        "{out}"
    );
    for (size, gbs, gbits, check) in &rows {
        assert!(*gbs > 0.0 && gbs.is_finite(), "{size}: {out}");
        // Both printed with 3 decimals.
        assert!((gbits - gbs * 8.0).abs() <= 0.0045, "{size}: {out}");
        // Loopback between two processes: far below 1 TB/s, or the timing is broken.
        assert!(*gbs < 1000.0, "{size}: {out}");
        assert_eq!(check, "ok", "{out}");
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("raw.json")).unwrap()).unwrap();
    assert_eq!(doc["transport"], transport);
    assert_eq!(doc["rows"].as_array().unwrap().len(), 2);
    assert!(doc["rows"][1]["busbw_gbs"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn raw_tcp_throughput() {
    raw_throughput("tcp");
}

#[test]
fn raw_shm_throughput() {
    raw_throughput("shm");
}

#[test]
fn raw_pingpong_round_trips() {
    let d = scratch("pingpong");
    for transport in ["tcp", "shm"] {
        let out = run_ok(
            &d,
            &[
                "raw",
                "--pingpong",
                "--transport",
                transport,
                "--iters",
                "300",
                "--warmup",
                "30",
                "--check",
            ],
            &[],
        );
        let rows = data_rows(&out);
        assert_eq!(rows.len(), 1, "{out}");
        let r = &rows[0];
        assert_eq!(r[0], "4", "4-byte messages by default: {out}");
        let v: Vec<f64> = r[1..5].iter().map(|x| x.parse().unwrap()).collect();
        let (median, p99, min) = (v[0], v[1], v[2]);
        assert!(min > 0.0 && min <= median && median <= p99, "{out}");
        assert!(median < 1e6, "a round trip under a second: {out}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn raw_check_catches_data_that_did_not_land_as_sent() {
    let d = scratch("raw-wrong");
    let (out, stdout, stderr) = run_in(
        &d,
        &[
            "raw",
            "--sizes",
            "4K",
            "--iters",
            "3",
            "--check",
            "--test-wrong-hash",
        ],
        &[],
    );
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("WRONG") && stderr.contains("WRONG"),
        "{stdout}\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn raw_rejects_bad_arguments() {
    let d = scratch("raw-args");
    let (out, _, stderr) = run_in(&d, &["raw", "--pingpong", "--sizes", "4M"], &[]);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("largest message"), "{stderr}");
    let (out, _, stderr) = run_in(&d, &["raw", "--sizes", "0,4K"], &[]);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
}

// -------------------------------------------------------------------------------- info

#[test]
fn info_lists_the_machine_and_every_tunable() {
    let d = scratch("info");
    let out = run_ok(&d, &["info"], &[]);
    for want in [
        "BPS_TIMEOUT",
        "BPS_TCP_LANES",
        "cpu:",
        "cores:",
        "memory:",
        "/dev/shm:",
    ] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
