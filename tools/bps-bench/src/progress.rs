//! The sweep's progress bar: one tick per size × dtype, drawn on stderr by rank 0, and only
//! when stderr is a terminal (nothing is ever written into piped output).
//!
//! Under a launcher that pipes the workers' output (bps-launch prefixes every line), rank 0's
//! stderr is not the terminal. When bps-bench starts its own local cluster, the process the
//! user started is attached to the terminal: it listens on a Unix socket, passes its path in
//! `BPS_BENCH_PROGRESS`, and draws the bar itself from what rank 0 reports there. Before rank 0
//! prints its table it waits (briefly) until the bar was cleared, so the two never interleave.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where rank 0 reports progress to the process that draws the bar.
pub const ENV: &str = "BPS_BENCH_PROGRESS";

fn new_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("bps-bench [{bar:32}] {pos}/{len} {msg} ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Progress of rank 0's sweep.
pub enum Progress {
    Off,
    Bar(ProgressBar),
    Remote(UnixStream),
}

impl Progress {
    /// For this rank: a bar on our own stderr if it is a terminal, else a report to the
    /// process named by [`ENV`], else nothing.
    pub fn start(rank: u32, total: u64) -> Progress {
        if rank != 0 {
            return Progress::Off;
        }
        if let Some(path) = std::env::var_os(ENV) {
            if let Ok(mut s) = UnixStream::connect(&path) {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                if writeln!(s, "total {total}").is_ok() {
                    return Progress::Remote(s);
                }
            }
        }
        if std::io::stderr().is_terminal() {
            return Progress::Bar(new_bar(total));
        }
        Progress::Off
    }

    /// A step begins (its label shows beside the bar).
    pub fn begin(&mut self, label: &str) {
        match self {
            Progress::Off => {}
            Progress::Bar(b) => b.set_message(label.to_string()),
            Progress::Remote(s) => {
                if writeln!(s, "begin {label}").is_err() {
                    *self = Progress::Off;
                }
            }
        }
    }

    /// A step ended.
    pub fn tick(&mut self) {
        match self {
            Progress::Off => {}
            Progress::Bar(b) => b.inc(1),
            Progress::Remote(s) => {
                if writeln!(s, "tick").is_err() {
                    *self = Progress::Off;
                }
            }
        }
    }

    /// Remove the bar; returns once it is gone from the terminal (or after a second).
    pub fn finish(self) {
        match self {
            Progress::Off => {}
            Progress::Bar(b) => b.finish_and_clear(),
            Progress::Remote(mut s) => {
                if writeln!(s, "done").is_ok() {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut line = String::new();
                    let _ = BufReader::new(&s).read_line(&mut line);
                }
            }
        }
    }
}

/// The drawing side, in the process the user started.
pub struct Host {
    path: PathBuf,
    _thread: JoinHandle<()>,
}

impl Host {
    /// Listen for rank 0's reports, when our stderr is a terminal (else there is no bar).
    pub fn start() -> Option<Host> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let path =
            std::env::temp_dir().join(format!("bps-bench-progress-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).ok()?;
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || serve(listener))
            .ok()?;
        Some(Host {
            path,
            _thread: thread,
        })
    }

    /// The value of [`ENV`] for the workers.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The thread may still wait in accept(): it ends with the process.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Draw what one rank 0 reports; clear the bar and answer on `done` (or on EOF).
fn serve(listener: UnixListener) {
    let Ok((stream, _)) = listener.accept() else {
        return;
    };
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut bar: Option<ProgressBar> = None;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match cmd {
            "total" => bar = arg.trim().parse().ok().map(new_bar),
            "begin" => {
                if let Some(b) = &bar {
                    b.set_message(arg.to_string());
                }
            }
            "tick" => {
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
            "done" => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let _ = writeln!(out, "ok");
                return;
            }
            _ => {}
        }
    }
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
}
