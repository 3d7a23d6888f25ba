//! The environment of each process of a local job.

/// Variables bps-launch sets itself in local mode, with what to use instead of `--env`.
pub const MANAGED: &[(&str, &str)] = &[
    ("DMLC_ROLE", "each process gets its role"),
    ("DMLC_NUM_WORKER", "use --workers and --local-size"),
    ("WORLD_SIZE", "use --workers"),
    ("BPS_NUM_WORKER", "use --workers"),
    ("DMLC_WORKER_ID", "it is worker i / --local-size"),
    ("RANK", "it is the worker's index"),
    ("BPS_RANK", "it is the worker's index"),
    ("BYTEPS_LOCAL_RANK", "it is worker i % --local-size"),
    ("LOCAL_RANK", "it is worker i % --local-size"),
    ("BYTEPS_LOCAL_SIZE", "use --local-size"),
    ("LOCAL_WORLD_SIZE", "use --local-size"),
    ("DMLC_NUM_SERVER", "use --servers"),
    (
        "DMLC_PS_ROOT_URI",
        "the launcher's scheduler listens on 127.0.0.1",
    ),
    ("DMLC_PS_ROOT_PORT", "use --port"),
    ("BPS_SCHEDULER_PORT", "use --port"),
    ("BPS_EMBED_SCHEDULER", "the launcher hosts the scheduler"),
    ("BPS_TIMEOUT", "use --timeout"),
    ("BPS_TRANSPORT", "use --transport"),
];

/// Inherited variables removed from every worker: they would override what the launcher sets
/// (bps reads them before the BytePS and torchrun names).
pub fn worker_removes() -> &'static [&'static str] {
    &["BPS_RANK", "BPS_NUM_WORKER"]
}

/// Inherited variables removed from every server (and from the scheduler's view): a worker's
/// identity left in the launcher's environment must not reach them.
pub fn server_removes() -> &'static [&'static str] {
    &[
        "BPS_RANK",
        "BPS_NUM_WORKER",
        "RANK",
        "LOCAL_RANK",
        "DMLC_WORKER_ID",
        "BYTEPS_LOCAL_RANK",
    ]
}

/// A local job: N workers in nodes of L, S servers, one scheduler on 127.0.0.1.
#[derive(Clone, Debug)]
pub struct JobEnv {
    /// Worker processes (N).
    pub workers: u32,
    /// Workers per node (L, divides N).
    pub local_size: u32,
    /// Server processes (S).
    pub servers: u32,
    /// The scheduler's port.
    pub root_port: u16,
    /// BPS_TIMEOUT as given.
    pub timeout: String,
    /// BPS_TRANSPORT, when forced.
    pub transport: Option<String>,
    /// `--env` pairs, applied last.
    pub extra: Vec<(String, String)>,
    /// The job secret every process proves it holds (BPS_JOB_SECRET).
    pub secret: String,
}

impl JobEnv {
    /// What every process of the job shares.
    fn common(&self, role: &str) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = [
            ("DMLC_ROLE", role.to_string()),
            (
                "DMLC_NUM_WORKER",
                (self.workers / self.local_size).to_string(),
            ),
            ("BYTEPS_LOCAL_SIZE", self.local_size.to_string()),
            ("DMLC_NUM_SERVER", self.servers.to_string()),
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            ("DMLC_PS_ROOT_PORT", self.root_port.to_string()),
            ("BPS_EMBED_SCHEDULER", "0".to_string()),
            ("BPS_TIMEOUT", self.timeout.clone()),
            ("BPS_JOB_SECRET", self.secret.clone()),
            ("WORLD_SIZE", self.workers.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_size.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(t) = &self.transport {
            v.push(("BPS_TRANSPORT".into(), t.clone()));
        }
        v
    }

    /// The variables set for worker `i` (0-based global rank).
    pub fn worker_env(&self, i: u32) -> Vec<(String, String)> {
        let l = self.local_size;
        let mut v = self.common("worker");
        v.extend(
            [
                ("DMLC_WORKER_ID", i / l),
                ("BYTEPS_LOCAL_RANK", i % l),
                ("RANK", i),
                ("LOCAL_RANK", i % l),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        v.extend(self.extra.iter().cloned());
        v
    }

    /// The variables set for every server.
    pub fn server_env(&self) -> Vec<(String, String)> {
        let mut v = self.common("server");
        v.extend(self.extra.iter().cloned());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use bps_runtime::config::Lookup;
    use bps_runtime::{Config, Role};

    fn job() -> JobEnv {
        JobEnv {
            workers: 4,
            local_size: 2,
            servers: 2,
            root_port: 4321,
            timeout: "30s".into(),
            transport: Some("tcp".into()),
            extra: vec![("BPS_LOG".into(), "info".into())],
            secret: "test-secret".into(),
        }
    }

    fn config(vars: Vec<(String, String)>) -> Config {
        let m: HashMap<String, String> = vars.into_iter().collect();
        let c = Config::from_lookup(&Lookup::map(&m)).expect("valid");
        c
    }

    #[test]
    fn workers_resolve_to_their_rank() {
        let j = job();
        for i in 0..4 {
            let c = config(j.worker_env(i));
            assert_eq!(c.role, Role::Worker);
            assert_eq!(c.rank, Some(i));
            assert_eq!((c.num_workers, c.num_servers), (4, 2));
            assert_eq!((c.local_rank, c.local_size), (i % 2, 2));
            assert_eq!(c.scheduler.port(), 4321);
            assert!(!c.embed_scheduler);
            assert_eq!(c.timeout, std::time::Duration::from_secs(30));
        }
    }

    #[test]
    fn servers_agree_on_the_job() {
        let c = config(job().server_env());
        assert_eq!(c.role, Role::Server);
        assert_eq!((c.num_workers, c.num_servers), (4, 2));
        assert!(!c.embed_scheduler);
    }

    #[test]
    fn managed_names_are_bps_tunables() {
        let m = HashMap::new();
        let names: Vec<&str> = Config::describe(&Lookup::map(&m))
            .iter()
            .flat_map(|(t, _, _)| t.names.iter().copied())
            .collect();
        for (k, _) in MANAGED {
            assert!(names.contains(k), "{k} is not a bps variable");
        }
    }
}
