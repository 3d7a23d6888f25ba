//! `bps-launch`: start a whole bps job on this host with one command, or run one BytePS-style
//! role per machine.
//!
//! Local mode (`--workers N`): the launcher hosts the scheduler itself, starts `S` server
//! processes (its own executable in a hidden server mode) and `N` copies of the command, with
//! every BytePS and torchrun variable the runtime reads set per process. Every child's output is
//! prefixed with its role and rank; the first process to fail stops the job, and the launcher
//! exits with its code.
//!
//! Role mode (`DMLC_ROLE` set, no `--workers`): as BytePS's `bpslaunch` does, run the scheduler
//! or a server in the foreground, or `BYTEPS_LOCAL_SIZE` local copies of the command.
#![forbid(unsafe_code)]

mod jobenv;
mod supervise;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use bps_runtime::config::{parse_duration, Lookup};
use bps_runtime::{Config, Error, Role};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

use crate::jobenv::{JobEnv, MANAGED};
use crate::supervise::{Kind, Label, Spec, Supervisor};

/// Exit code for bad usage (as clap uses).
const USAGE: u8 = 2;

const AFTER_HELP: &str = "\
LOCAL MODE (--workers N)
  The launcher runs the scheduler itself on 127.0.0.1 (a free port, or --port), starts S
  server processes and N copies of COMMAND. Workers form nodes of --local-size L (default 1:
  each worker is its own node; L > 1 turns on local reduction inside each node); worker i gets
    DMLC_ROLE=worker  DMLC_WORKER_ID=i/L  BYTEPS_LOCAL_RANK=i%L  BYTEPS_LOCAL_SIZE=L
    DMLC_NUM_WORKER=N/L (nodes)  DMLC_NUM_SERVER=S  DMLC_PS_ROOT_URI  DMLC_PS_ROOT_PORT
    BPS_EMBED_SCHEDULER=0  BPS_TIMEOUT  BPS_TRANSPORT (with --transport)
    RANK=i  WORLD_SIZE=N  LOCAL_RANK=i%L  LOCAL_WORLD_SIZE=L   (torchrun's names)
  plus every --env K=V; the rest of the launcher's environment is inherited. MASTER_PORT is not
  set (bps would derive its scheduler port from it).

  Every line a child prints is prefixed with its role and rank: `[worker 2] ...`,
  `[server 0] ...` (stdout to stdout, stderr to stderr). When a process fails, the others are
  stopped (SIGTERM to its process group, SIGKILL 2 s later), the launcher says which one failed
  and how, and exits with its exit code (1 if it was killed by a signal). When every worker
  exited 0, the servers end by themselves once the workers shut bps down; a server still up
  BPS_TIMEOUT later is killed and reported. If the workers never shut bps down (the command
  does not use bps), the servers were not needed: they are stopped after 3 s and the launcher
  exits 0. Ctrl-C or SIGTERM stops every process and exits 130.

ROLE MODE (DMLC_ROLE set in the environment, no --workers), as BytePS's bpslaunch
  DMLC_ROLE=scheduler  run the scheduler in the foreground (COMMAND, if any, is ignored)
  DMLC_ROLE=server     run a server in the foreground (COMMAND, if any, is ignored)
  DMLC_ROLE=worker     start BYTEPS_LOCAL_SIZE (default 1; or --local-size) copies of COMMAND,
                       each with BYTEPS_LOCAL_RANK set, with the same output prefixes and
                       failure handling; BPS_EMBED_SCHEDULER defaults to 0 (a BytePS job has
                       its DMLC_ROLE=scheduler process; set it to 1 to host the scheduler in
                       worker 0 instead)
  The job is described by the BytePS variables (DMLC_NUM_WORKER, DMLC_NUM_SERVER,
  DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_WORKER_ID, ...); see `bps-bench info`.

EXAMPLES
  # 4 workers and 2 servers on this host
  bps-launch --workers 4 --servers 2 -- python train.py --epochs 3

  # 2 nodes of 2 workers emulated on one host, over TCP, with a shorter timeout
  bps-launch -n 4 --local-size 2 -s 2 --transport tcp --timeout 30s -e BPS_LOG=info -- ./train

  # BytePS style, one role per machine
  DMLC_ROLE=scheduler DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9000 \\
    DMLC_NUM_WORKER=2 DMLC_NUM_SERVER=2 bps-launch
  DMLC_ROLE=worker DMLC_WORKER_ID=0 BYTEPS_LOCAL_SIZE=8 ... bps-launch python train.py";

/// Start a bps job: scheduler, servers and workers on this host, or one BytePS role.
#[derive(Parser, Debug)]
#[command(name = "bps-launch", version, about, after_long_help = AFTER_HELP)]
struct Cli {
    /// Worker processes to start on this host (N >= 1): local mode.
    #[arg(short = 'n', long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    workers: Option<u32>,

    /// Server processes to start (S >= 0; 0 = the workers serve the keys themselves).
    #[arg(short = 's', long, value_name = "S")]
    servers: Option<u32>,

    /// Workers per node (L >= 1, dividing N; default N: one node). In role mode: overrides
    /// BYTEPS_LOCAL_SIZE.
    #[arg(short = 'l', long, value_name = "L",
          value_parser = clap::value_parser!(u32).range(1..))]
    local_size: Option<u32>,

    /// Scheduler port on 127.0.0.1 (default: any free port).
    #[arg(short = 'p', long, value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,

    /// Failure timeout of every process, e.g. 500ms, 30s, 2m or plain seconds (BPS_TIMEOUT;
    /// default: $BPS_TIMEOUT, else 60s). Also bounds how long servers may take to end.
    #[arg(short = 't', long, value_name = "DURATION", value_parser = parse_timeout)]
    timeout: Option<String>,

    /// Force the transport of every process (BPS_TRANSPORT).
    #[arg(long, value_name = "KIND", value_parser = ["auto", "tcp", "shm"])]
    transport: Option<String>,

    /// Extra environment for every process (repeatable), e.g. -e BPS_LOG=info.
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_kv)]
    env: Vec<(String, String)>,

    /// Internal: run one server from the environment (what local mode starts).
    #[arg(long, hide = true)]
    internal_server: bool,

    /// The worker command and its arguments (after `--`, or from the first word that is not
    /// an option of bps-launch).
    #[arg(value_name = "COMMAND", trailing_var_arg = true)]
    command: Vec<OsString>,
}

fn parse_timeout(s: &str) -> Result<String, String> {
    match parse_duration(s) {
        Some(_) => Ok(s.trim().to_string()),
        None => Err("expected a duration > 0: 500ms, 30s, 2m or plain seconds".into()),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err("expected NAME=VALUE, e.g. BPS_LOG=info".into()),
    }
}

/// Print a usage error in clap's format and exit 2.
fn usage_error(kind: ErrorKind, msg: impl std::fmt::Display) -> ! {
    Cli::command().error(kind, msg).exit()
}

/// Writes each log record to stderr in one piece, after a prefix.
struct LogWriter(&'static str);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = Vec::with_capacity(self.0.len() + buf.len());
        line.extend_from_slice(self.0.as_bytes());
        line.extend_from_slice(buf);
        std::io::stderr().lock().write_all(&line)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Logs to stderr, each line after `prefix`, filtered by `filter`, else BPS_LOG, else
/// RUST_LOG, else warn. Once the launcher stops the job, the runtime's own complaints about the processes it
/// kills are muted: the launcher already said why.
fn init_tracing(prefix: &'static str, filter: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = filter
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_from_env("BPS_LOG").ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    let quiet = tracing_subscriber::filter::filter_fn(|meta| {
        !(supervise::stopping() && meta.target().starts_with("bps_runtime"))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(move || LogWriter(prefix))
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter)
        .with_filter(quiet);
    let _ = tracing_subscriber::registry().with(fmt).try_init();
}

/// Report a runtime error; configuration errors are usage errors (2), the rest 1.
fn runtime_error(what: &str, e: &Error) -> ExitCode {
    eprintln!("bps-launch: {what}: {e}");
    match e {
        Error::Config { .. } => ExitCode::from(USAGE),
        _ => ExitCode::FAILURE,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.internal_server {
        init_tracing("", None);
        return match Config::from_env().and_then(bps_runtime::run_server) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => runtime_error("server", &e),
        };
    }
    if cli.workers.is_some() {
        return local_mode(cli);
    }
    match std::env::var("DMLC_ROLE") {
        Ok(role) if !role.trim().is_empty() => role_mode(cli, role.trim()),
        _ => usage_error(
            ErrorKind::MissingRequiredArgument,
            "--workers N is required (or set DMLC_ROLE=scheduler|server|worker for BytePS-style \
             one-role-per-machine use); see --help",
        ),
    }
}

/// The launcher's timeout: --timeout, else $BPS_TIMEOUT, else 60s (text and value).
fn resolve_timeout(cli: &Cli) -> (String, Duration) {
    if let Some(t) = &cli.timeout {
        let d = parse_duration(t).expect("checked by the parser");
        return (t.clone(), d);
    }
    match std::env::var("BPS_TIMEOUT") {
        Ok(t) if !t.trim().is_empty() => match parse_duration(&t) {
            Some(d) => (t.trim().to_string(), d),
            None => usage_error(
                ErrorKind::ValueValidation,
                format!(
                    "BPS_TIMEOUT={t:?} in the environment is not allowed: expected a duration \
                     > 0: 500ms, 30s, 2m or plain seconds (or pass --timeout)"
                ),
            ),
        },
        _ => ("60s".into(), Duration::from_secs(60)),
    }
}

fn install_signal_handler() -> crossbeam_channel::Receiver<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.send(());
    }) {
        eprintln!("bps-launch: warning: cannot handle Ctrl-C/SIGTERM: {e}");
    }
    rx
}

/// `--workers N`: scheduler in this process, servers and workers as children.
fn local_mode(cli: Cli) -> ExitCode {
    let n = cli.workers.expect("local mode");
    let s = cli.servers.unwrap_or(0);
    let l = cli.local_size.unwrap_or(1);
    if !n.is_multiple_of(l) {
        usage_error(
            ErrorKind::ValueValidation,
            format!(
                "--workers {n} is not a multiple of --local-size {l}: workers are grouped in \
                 nodes of --local-size, so --local-size must divide --workers (e.g. --workers \
                 {} --local-size {l})",
                (n / l + 1) * l
            ),
        );
    }
    if cli.command.is_empty() {
        usage_error(
            ErrorKind::MissingRequiredArgument,
            "no COMMAND to run: give the worker command after `--`, e.g. \
             bps-launch --workers 2 -- python train.py",
        );
    }
    for (k, _) in &cli.env {
        if let Some(hint) = MANAGED.iter().find(|(m, _)| m == k).map(|(_, h)| h) {
            usage_error(
                ErrorKind::ValueValidation,
                format!("--env {k}=...: {k} is set by bps-launch per process; {hint}"),
            );
        }
    }
    // The scheduler logs like the processes: `--env BPS_LOG=...` applies to it too.
    let log = ["BPS_LOG", "RUST_LOG"]
        .iter()
        .find_map(|n| cli.env.iter().rev().find(|(k, _)| k == n))
        .map(|(_, v)| v.as_str());
    init_tracing("[scheduler] ", log);
    let (timeout_text, timeout) = resolve_timeout(&cli);
    let mut job = JobEnv {
        workers: n,
        local_size: l,
        servers: s,
        root_port: cli.port.unwrap_or(0),
        timeout: timeout_text,
        transport: cli.transport.clone(),
        extra: cli.env.clone(),
        secret: match std::env::var("BPS_JOB_SECRET") {
            Ok(s) if !s.is_empty() => s,
            _ => match bps_runtime::Secret::generate_hex() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bps-launch: cannot generate a job secret: {e}");
                    return ExitCode::from(1);
                }
            },
        },
    };

    // The scheduler, configured from what the processes will see.
    let mut view: HashMap<String, String> = std::env::vars().collect();
    for k in jobenv::server_removes() {
        view.remove(*k);
    }
    for (k, v) in job.server_env() {
        view.insert(k, v);
    }
    view.insert("DMLC_ROLE".into(), "scheduler".into());
    // Any valid port for the lookup; the listening address is set below.
    view.insert(
        "DMLC_PS_ROOT_PORT".into(),
        cli.port.unwrap_or(9000).to_string(),
    );
    let mut cfg = match Config::from_lookup(&Lookup::map(&view)) {
        Ok(c) => c,
        Err(e) => return runtime_error("job configuration", &e),
    };
    cfg.scheduler = SocketAddr::from((Ipv4Addr::LOCALHOST, cli.port.unwrap_or(0)));
    let scheduler = match bps_runtime::Scheduler::start(&cfg) {
        Ok(s) => s,
        Err(e) => return runtime_error("cannot start the scheduler", &e),
    };
    job.root_port = scheduler.addr().port();
    tracing::info!(
        "launcher: scheduler on {}; {n} worker(s) in {} node(s) of {l}, {s} server(s)",
        scheduler.addr(),
        n / l
    );

    let signals = install_signal_handler();
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bps-launch: cannot find my own executable to start the servers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut specs = Vec::new();
    for j in 0..s {
        specs.push(Spec {
            label: Label::new(Kind::Server, j.to_string()),
            program: exe.clone().into_os_string(),
            args: vec!["--internal-server".into()],
            set: job.server_env(),
            remove: jobenv::server_removes().to_vec(),
        });
    }
    for i in 0..n {
        specs.push(Spec {
            label: Label::new(Kind::Worker, i.to_string()),
            program: cli.command[0].clone(),
            args: cli.command[1..].to_vec(),
            set: job.worker_env(i),
            remove: jobenv::worker_removes().to_vec(),
        });
    }
    let code = Supervisor::new(signals).run(specs, Some(&scheduler), timeout);
    // Leave without dropping the scheduler: its threads end with the process.
    std::process::exit(code)
}

/// `DMLC_ROLE` set and no `--workers`: one BytePS role in this process (or its local workers).
fn role_mode(cli: Cli, role: &str) -> ExitCode {
    if let Some(flag) = [cli.servers.map(|_| "--servers"), cli.port.map(|_| "--port")]
        .into_iter()
        .flatten()
        .next()
    {
        usage_error(
            ErrorKind::ArgumentConflict,
            format!(
                "{flag} is for local mode (--workers N); with DMLC_ROLE={role} set the job with \
                 DMLC_NUM_SERVER, DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT"
            ),
        );
    }
    // What the role sees: the environment with the flags applied.
    let mut over: Vec<(String, String)> = Vec::new();
    if let Some(t) = &cli.timeout {
        over.push(("BPS_TIMEOUT".into(), t.clone()));
    }
    if let Some(t) = &cli.transport {
        over.push(("BPS_TRANSPORT".into(), t.clone()));
    }
    over.extend(cli.env.iter().cloned());
    let mut view: HashMap<String, String> = std::env::vars().collect();
    view.extend(over.iter().cloned());
    match role.to_ascii_lowercase().as_str() {
        "scheduler" | "server" => {
            init_tracing("", None);
            let cfg = match Config::from_lookup(&Lookup::map(&view)) {
                Ok(c) => c,
                Err(e) => return runtime_error("configuration", &e),
            };
            let r = if cfg.role == Role::Scheduler {
                bps_runtime::run_scheduler(&cfg)
            } else {
                bps_runtime::run_server(cfg)
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => runtime_error(role, &e),
            }
        }
        "worker" => role_workers(cli, view, over),
        _ => usage_error(
            ErrorKind::InvalidValue,
            format!("DMLC_ROLE={role:?} is not allowed: expected worker | server | scheduler"),
        ),
    }
}

/// `DMLC_ROLE=worker`: `BYTEPS_LOCAL_SIZE` local copies of the command.
fn role_workers(
    cli: Cli,
    mut view: HashMap<String, String>,
    mut over: Vec<(String, String)>,
) -> ExitCode {
    if cli.command.is_empty() {
        usage_error(
            ErrorKind::MissingRequiredArgument,
            "no COMMAND to run: with DMLC_ROLE=worker give the worker command, e.g. \
             bps-launch -- python train.py",
        );
    }
    let local_size = match cli.local_size {
        Some(l) => l,
        None => match view.get("BYTEPS_LOCAL_SIZE").map(|v| v.trim()) {
            None | Some("") => 1,
            Some(v) => match v.parse::<u32>() {
                Ok(l) if l >= 1 => l,
                _ => usage_error(
                    ErrorKind::ValueValidation,
                    format!("BYTEPS_LOCAL_SIZE={v:?} is not allowed: expected an integer >= 1"),
                ),
            },
        },
    };
    over.push(("BYTEPS_LOCAL_SIZE".into(), local_size.to_string()));
    // BytePS jobs run a scheduler of their own (DMLC_ROLE=scheduler): worker 0 must not
    // host another unless asked to.
    if view
        .get("BPS_EMBED_SCHEDULER")
        .is_none_or(|v| v.trim().is_empty())
    {
        over.push(("BPS_EMBED_SCHEDULER".into(), "0".into()));
    }
    view.extend(over.iter().cloned());
    // Check the job's variables once per local rank before starting anything.
    let mut specs = Vec::new();
    for i in 0..local_size {
        view.insert("BYTEPS_LOCAL_RANK".into(), i.to_string());
        let cfg = match Config::from_lookup(&Lookup::map(&view)) {
            Ok(c) => c,
            Err(e) => return runtime_error("configuration", &e),
        };
        let rank = match cfg.rank {
            Some(r) => r.to_string(),
            None => format!("local {i}"),
        };
        let mut set = over.clone();
        set.push(("BYTEPS_LOCAL_RANK".into(), i.to_string()));
        specs.push(Spec {
            label: Label::new(Kind::Worker, rank),
            program: cli.command[0].clone(),
            args: cli.command[1..].to_vec(),
            set,
            remove: Vec::new(),
        });
    }
    let (_, timeout) = resolve_timeout(&cli);
    let signals = install_signal_handler();
    let code = Supervisor::new(signals).run(specs, None, timeout);
    std::process::exit(code)
}
