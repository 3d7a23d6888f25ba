//! `bps-bench raw --transport rdma` where it cannot run: a build without the `rdma` backend, or
//! no usable device. It must exit non-zero with one line saying why, before starting the
//! receiving process, never panic and never fall back to tcp. (Where it can run, `ci/softroce`
//! runs it on Soft-RoCE.) Every child is killed after 60 s, which fails the test.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// Run `bps-bench raw --transport rdma ...` with extra variables, bounded in time.
fn raw_rdma(env: &[(&str, &str)]) -> (Output, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bps-bench"));
    cmd.args([
        "raw",
        "--transport",
        "rdma",
        "--sizes",
        "1M",
        "--iters",
        "2",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("BPS_RDMA_") || k == "DMLC_RDMA_DEVICE" || k.ends_with("GID_INDEX") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bps-bench raw --transport rdma did not finish within {LIMIT:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[test]
fn raw_rdma_without_a_device_fails_with_one_clear_line() {
    // A device name no machine has: the same outcome with and without RDMA hardware.
    let (out, stderr) = raw_rdma(&[("BPS_RDMA_DEVICE", "bps-no-such-device")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
    assert!(
        stderr.starts_with("bps-bench: raw --transport rdma: "),
        "names the command:\n{stderr}"
    );
    // Why: the build has no backend, or (with it) the device does not exist / no RDMA at all.
    assert!(
        stderr.contains("no RDMA backend")
            || stderr.contains("bps-no-such-device")
            || stderr.contains("no RDMA device"),
        "says why:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing was measured (in particular not over a tcp fallback).
    assert!(stdout.is_empty(), "no table:\n{stdout}");
}

#[test]
fn raw_rdma_reads_the_rdma_variables_like_the_runtime() {
    // The runtime's own check and message for the variable (and its aliases).
    let (out, stderr) = raw_rdma(&[("BPS_RDMA_PORT", "0")]);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.contains("BPS_RDMA_PORT"), "{stderr}");
    let (out, stderr) = raw_rdma(&[("BYTEPS_RDMA_SEND_DEPTH", "0")]);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("BYTEPS_RDMA_SEND_DEPTH"), "{stderr}");
    // Variables of a job that raw does not use cannot fail it (here: a bad role); the run then
    // fails for the device, as above.
    let (out, stderr) = raw_rdma(&[
        ("DMLC_ROLE", "nonsense"),
        ("BPS_RDMA_DEVICE", "bps-no-such-device"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("DMLC_ROLE"), "{stderr}");
}
