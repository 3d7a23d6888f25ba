//! Child processes: start them with prefixed output, watch them, stop them.
//!
//! Each child leads a process group of its own, so stopping it also stops what it started
//! (a shell's children, a data loader's workers): SIGTERM to the group, SIGKILL a moment later.
//! One thread per pipe copies the child's output line by line, each line written whole under
//! the lock of the launcher's stdout or stderr, so lines of different children never mix.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bps_runtime::Scheduler;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Set once the launcher stops the job (see [`stopping`]).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether the launcher is stopping the job: what processes say from then on is fallout.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Relaxed)
}

/// How often children are polled.
const TICK: Duration = Duration::from_millis(20);
/// Between SIGTERM and SIGKILL when stopping children.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// After every worker exited 0, how long servers may wait for a job end that is not coming
/// (the workers never shut bps down) before they are stopped as unneeded.
const UNUSED_SERVER_GRACE: Duration = Duration::from_secs(3);
/// How long to wait for the last lines of output of processes that ended.
const DRAIN: Duration = Duration::from_secs(1);

/// What a child is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Runs the user's command.
    Worker,
    /// A bps server (this executable in server mode).
    Server,
}

/// How a child is named in prefixes and messages: `worker 2`, `server 0`.
#[derive(Clone, Debug)]
pub struct Label {
    kind: Kind,
    text: String,
}

impl Label {
    /// A label of `kind` with `rank` (any text: "2", "local 1").
    pub fn new(kind: Kind, rank: String) -> Label {
        let role = match kind {
            Kind::Worker => "worker",
            Kind::Server => "server",
        };
        Label {
            kind,
            text: format!("{role} {rank}"),
        }
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A process to start.
#[derive(Debug)]
pub struct Spec {
    /// Its name.
    pub label: Label,
    /// The program.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Variables to set (later ones win).
    pub set: Vec<(String, String)>,
    /// Inherited variables to remove (before `set`).
    pub remove: Vec<&'static str>,
}

struct Proc {
    label: Label,
    child: Child,
    pgid: Pid,
    status: Option<ExitStatus>,
    /// Output pipes still open (0 to 2).
    open_pipes: Arc<AtomicUsize>,
}

/// Starts, watches and stops the children of one launcher.
pub struct Supervisor {
    procs: Vec<Proc>,
    signals: Receiver<()>,
}

/// "exited with status 3", "killed by signal 9 (SIGKILL)".
pub fn describe(st: ExitStatus) -> String {
    if let Some(c) = st.code() {
        format!("exited with status {c}")
    } else if let Some(s) = st.signal() {
        let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("unknown");
        let core = if st.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        format!("killed by signal {s} ({name}){core}")
    } else {
        format!("ended with {st}")
    }
}

/// The launcher's exit code for a failed child: its own, or 1.
fn exit_code(st: ExitStatus) -> i32 {
    st.code().filter(|c| *c != 0).unwrap_or(1)
}

/// Copy `from` to the launcher's stdout or stderr, each line prefixed.
fn pump(from: impl Read, prefix: String, to_stderr: bool, open: Arc<AtomicUsize>) {
    let mut r = BufReader::with_capacity(64 << 10, from);
    let mut buf = Vec::new();
    let mut line = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {
                line.clear();
                line.extend_from_slice(prefix.as_bytes());
                line.extend_from_slice(&buf);
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                // Errors (a closed stdout) are ignored: the child's pipe is still drained.
                if to_stderr {
                    let mut e = std::io::stderr().lock();
                    let _ = e.write_all(&line);
                } else {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&line);
                    let _ = o.flush();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    open.fetch_sub(1, Ordering::AcqRel);
}

impl Supervisor {
    /// A supervisor that stops everything when `signals` delivers (Ctrl-C, SIGTERM).
    pub fn new(signals: Receiver<()>) -> Supervisor {
        Supervisor {
            procs: Vec::new(),
            signals,
        }
    }

    /// Start every spec, then watch until the job ends; returns the launcher's exit code.
    ///
    /// The job ends with the first process that fails (code of that process, or 1; the others
    /// are stopped), with an interrupt (130), or when every worker exited 0 and the servers
    /// ended: by themselves once `scheduler` saw the job end (a server still running `timeout`
    /// later is stopped and reported), or stopped as unneeded when the job never ends in
    /// the scheduler (the workers never shut bps down).
    pub fn run(
        mut self,
        specs: Vec<Spec>,
        scheduler: Option<&Scheduler>,
        timeout: Duration,
    ) -> i32 {
        for spec in specs {
            if let Err(code) = self.spawn(spec) {
                self.stop_all();
                return code;
            }
        }
        self.watch(scheduler, timeout)
    }

    fn spawn(&mut self, spec: Spec) -> Result<(), i32> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args);
        for k in &spec.remove {
            cmd.env_remove(k);
        }
        cmd.envs(spec.set.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "bps-launch: cannot start {} ({:?}): {e}",
                    spec.label, spec.program
                );
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound => 127,
                    std::io::ErrorKind::PermissionDenied => 126,
                    _ => 1,
                });
            }
        };
        let open = Arc::new(AtomicUsize::new(0));
        let prefix = format!("[{}] ", spec.label);
        let out = child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>);
        for (pipe, to_stderr) in [(out, false), (err, true)] {
            let Some(pipe) = pipe else { continue };
            open.fetch_add(1, Ordering::AcqRel);
            let (p, o) = (prefix.clone(), open.clone());
            let name = format!("out-{}", spec.label.text.replace(' ', "-"));
            if let Err(e) = std::thread::Builder::new()
                .name(name)
                .spawn(move || pump(pipe, p, to_stderr, o))
            {
                eprintln!(
                    "bps-launch: cannot start an output thread for {}: {e}",
                    spec.label
                );
                open.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let pgid = Pid::from_raw(child.id() as i32);
        self.procs.push(Proc {
            label: spec.label,
            child,
            pgid,
            status: None,
            open_pipes: open,
        });
        Ok(())
    }

    /// Collect the processes that ended; the index of the first that failed, if any.
    fn reap(&mut self) -> Option<usize> {
        let mut failed = None;
        for (i, p) in self.procs.iter_mut().enumerate() {
            if p.status.is_some() {
                continue;
            }
            let st = match p.child.try_wait() {
                Ok(Some(st)) => st,
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("bps-launch: cannot wait for {}: {e}", p.label);
                    ExitStatus::from_raw(1 << 8)
                }
            };
            p.status = Some(st);
            if !st.success() && failed.is_none() {
                failed = Some(i);
            }
        }
        failed
    }

    fn alive(&self, kind: Kind) -> usize {
        self.procs
            .iter()
            .filter(|p| p.label.kind == kind && p.status.is_none())
            .count()
    }

    fn alive_all(&self) -> usize {
        self.procs.iter().filter(|p| p.status.is_none()).count()
    }

    /// Wait for the next tick; true when an interrupt arrived.
    fn tick(&self) -> bool {
        match self.signals.recv_timeout(TICK) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(TICK);
                false
            }
        }
    }

    fn watch(&mut self, scheduler: Option<&Scheduler>, timeout: Duration) -> i32 {
        let mut workers_done: Option<Instant> = None;
        let mut job_ended: Option<Instant> = None;
        loop {
            if let Some(i) = self.reap() {
                return self.fail(i);
            }
            if self.alive(Kind::Worker) == 0 {
                let now = Instant::now();
                let done = *workers_done.get_or_insert(now);
                let servers = self.alive(Kind::Server);
                if servers == 0 {
                    self.drain(DRAIN);
                    return 0;
                }
                let ended = scheduler.is_none_or(|s| s.wait(Some(Duration::ZERO)));
                if ended {
                    let t = *job_ended.get_or_insert(now);
                    if now.duration_since(t) >= timeout {
                        for p in self.procs.iter().filter(|p| p.status.is_none()) {
                            eprintln!(
                                "bps-launch: {} still running {timeout:?} after the job ended \
                                 (BPS_TIMEOUT); killing it",
                                p.label
                            );
                        }
                        self.stop_all();
                        return 0;
                    }
                } else if now.duration_since(done) >= UNUSED_SERVER_GRACE.min(timeout) {
                    eprintln!(
                        "bps-launch: every worker exited 0 without shutting bps down; stopping \
                         the {servers} server(s), which were not needed"
                    );
                    self.stop_all();
                    return 0;
                }
            }
            if self.tick() {
                eprintln!(
                    "bps-launch: interrupted; stopping {} process(es)",
                    self.alive_all()
                );
                self.stop_all();
                return 130;
            }
        }
    }

    /// Report the failure of process `i`, stop the rest, give the exit code.
    fn fail(&mut self, i: usize) -> i32 {
        let st = self.procs[i].status.expect("reaped");
        // Its last lines (an error message, a traceback) go out before the verdict.
        let deadline = Instant::now() + DRAIN;
        while self.procs[i].open_pipes.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!("bps-launch: {} {}", self.procs[i].label, describe(st));
        let others = self.alive_all();
        if others > 0 {
            eprintln!("bps-launch: stopping the other {others} process(es)");
        }
        self.stop_all();
        exit_code(st)
    }

    /// Send `sig` to the group of every process that may still have members.
    fn signal_all(&self, sig: Signal) {
        for p in &self.procs {
            // A group whose leader was reaped and whose pipes closed is gone: leave its id be.
            if p.status.is_none() || p.open_pipes.load(Ordering::Acquire) > 0 {
                let _ = killpg(p.pgid, sig);
            }
        }
    }

    /// Stop every process (SIGTERM, SIGKILL after a grace or a second interrupt), reap them
    /// and let their output out.
    fn stop_all(&mut self) {
        STOPPING.store(true, Ordering::Relaxed);
        self.signal_all(Signal::SIGTERM);
        let deadline = Instant::now() + KILL_GRACE;
        loop {
            self.reap();
            let quiet = self
                .procs
                .iter()
                .all(|p| p.status.is_some() && p.open_pipes.load(Ordering::Acquire) == 0);
            if quiet || Instant::now() >= deadline || self.tick() {
                break;
            }
        }
        self.signal_all(Signal::SIGKILL);
        for p in self.procs.iter_mut().filter(|p| p.status.is_none()) {
            // In case it left its group.
            let _ = p.child.kill();
        }
        let deadline = Instant::now() + KILL_GRACE;
        while self.alive_all() > 0 && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(TICK);
        }
        for p in self.procs.iter().filter(|p| p.status.is_none()) {
            eprintln!(
                "bps-launch: {} (pid {}) did not end after SIGKILL",
                p.label,
                p.child.id()
            );
        }
        self.drain(DRAIN);
    }

    /// Wait (bounded) until every output pipe closed.
    fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline
            && self
                .procs
                .iter()
                .any(|p| p.open_pipes.load(Ordering::Acquire) > 0)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_well() {
        assert_eq!(
            describe(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 1);
    }

    #[test]
    fn labels() {
        assert_eq!(Label::new(Kind::Worker, "2".into()).to_string(), "worker 2");
        assert_eq!(Label::new(Kind::Server, "0".into()).to_string(), "server 0");
    }
}
