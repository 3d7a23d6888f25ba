//! Compiles `tests/c/push_pull.c` with the system C compiler against `include/bps.h` and the
//! built `libbps.so`, and runs two copies of it as a 2-worker job (no servers; worker 0 hosts
//! the scheduler).
//!
//! The shared library is looked up next to this test's executable: `cargo test -p bps-capi`
//! builds the library target with all its crate types, so `libbps.so` sits in
//! `target/<profile>/deps/` beside the test binary (and in `target/<profile>/` after
//! `cargo build -p bps-capi`). If it is missing there, the test fails and says to run
//! `cargo build -p bps-capi` first, which a CI job should do before `cargo test`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the two workers may take in all before they are killed.
const LIMIT: Duration = Duration::from_secs(60);

/// The directory holding `libbps.so`: the test executable's own directory
/// (`target/<profile>/deps`), else its parent (`target/<profile>`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its executable");
    let deps = exe.parent().expect("the test executable is in a directory");
    let candidates = [deps, deps.parent().unwrap_or(deps)];
    for d in candidates {
        if d.join("libbps.so").is_file() {
            return d.to_path_buf();
        }
    }
    panic!(
        "libbps.so is in neither {} nor {}: run `cargo build -p bps-capi` (same profile and \
         CARGO_TARGET_DIR) before this test",
        candidates[0].display(),
        candidates[1].display()
    );
}

fn compile(lib: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bps_c_push_pull");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let o = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(manifest.join("include"))
        .arg(manifest.join("tests/c/push_pull.c"))
        .arg("-L")
        .arg(lib)
        .arg("-lbps")
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
    assert!(
        o.status.success(),
        "{cc} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// Read a child's pipe to the end on a thread, so a chatty child never blocks on a full pipe.
fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        s.push_str(&String::from_utf8_lossy(&buf));
        s
    })
}

struct Worker {
    id: u32,
    child: Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

#[test]
fn c_program_two_workers() {
    let lib = lib_dir();
    let exe = compile(&lib);
    let port = free_port().to_string();
    let mut workers: Vec<Worker> = (0..2u32)
        .map(|id| {
            let mut child = Command::new(&exe)
                .env("DMLC_ROLE", "worker")
                .env("DMLC_NUM_WORKER", "2")
                .env("DMLC_NUM_SERVER", "0")
                .env("DMLC_PS_ROOT_URI", "127.0.0.1")
                .env("DMLC_PS_ROOT_PORT", &port)
                .env("DMLC_WORKER_ID", id.to_string())
                // no scheduler process here: worker 0 hosts it
                .env("BPS_EMBED_SCHEDULER", if id == 0 { "1" } else { "0" })
                .env("BPS_TIMEOUT", "30s")
                .env("LD_LIBRARY_PATH", &lib)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
            let stdout = drain(child.stdout.take().expect("piped"));
            let stderr = drain(child.stderr.take().expect("piped"));
            Worker {
                id,
                child,
                stdout,
                stderr,
            }
        })
        .collect();

    let deadline = Instant::now() + LIMIT;
    let mut status = vec![None; workers.len()];
    while status.iter().any(Option::is_none) && Instant::now() < deadline {
        for (w, s) in workers.iter_mut().zip(status.iter_mut()) {
            if s.is_none() {
                *s = w.child.try_wait().expect("try_wait on a child");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let timed_out = status.iter().any(Option::is_none);
    for w in &mut workers {
        // Kill what is still running (an error only means it already exited).
        let _ = w.child.kill();
        let _ = w.child.wait();
    }

    let mut report = String::new();
    let mut ok = !timed_out;
    for (w, s) in workers.into_iter().zip(status) {
        let out = w.stdout.join().unwrap_or_default();
        let err = w.stderr.join().unwrap_or_default();
        let good = s.is_some_and(|s| s.success()) && out.contains("c-abi ok");
        ok &= good;
        report.push_str(&format!(
            "--- worker {}: {}\nstdout:\n{out}\nstderr:\n{err}\n",
            w.id,
            match s {
                Some(s) => s.to_string(),
                None => format!("still running after {LIMIT:?}, killed"),
            }
        ));
    }
    assert!(ok, "the C workers failed:\n{report}");
}
