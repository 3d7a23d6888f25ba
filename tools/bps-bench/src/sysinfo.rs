//! What a result needs to be compared later: the machine (CPU model, cores, memory), the
//! commit, the date; and for `info`, the GPU topology and the GPUDirect decision.

use std::time::{SystemTime, UNIX_EPOCH};

use bps_transport::rdma::gpudirect::{select_route, GpuDirectInputs};
use bps_transport::LinkKind;

/// The CPU model as the kernel names it, or "unknown".
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // x86: "model name"; arm64: "Model" (board) or nothing but "CPU part"; others: "cpu".
    for key in ["model name", "Model", "Processor", "cpu model", "cpu"] {
        for line in info.lines() {
            if let Some((k, v)) = line.split_once(':') {
                if k.trim() == key && !v.trim().is_empty() {
                    return v.trim().to_string();
                }
            }
        }
    }
    "unknown".into()
}

/// Logical CPUs this process may run on, and those the machine has online.
pub fn cores() -> (usize, usize) {
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    let online = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
                .count()
        })
        .unwrap_or(0)
        .max(usable);
    (usable, online)
}

/// Total and available memory in bytes (from /proc/meminfo).
pub fn memory() -> Option<(u64, u64)> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:").unwrap_or(0)))
}

/// Whether a file can be created in /dev/shm (where the shm transport puts its segments).
pub fn shm_writable() -> Result<(), String> {
    let dir = std::path::Path::new("/dev/shm");
    if !dir.is_dir() {
        return Err("no /dev/shm".into());
    }
    let probe = dir.join(format!("bps-bench-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The commit: `BPS_GIT_COMMIT` when this runs, else the one set when this was built, else
/// "unknown".
pub fn commit() -> String {
    std::env::var("BPS_GIT_COMMIT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| option_env!("BPS_GIT_COMMIT").map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Now in UTC, RFC 3339 with seconds: `2026-11-27T10:04:05Z`.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Seconds since the Unix epoch as an RFC 3339 UTC date.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The machine as recorded in JSON results.
pub fn machine_json() -> serde_json::Value {
    let (usable, online) = cores();
    let mem = memory();
    serde_json::json!({
        "cpu_model": cpu_model(),
        "cores": usable,
        "cores_online": online,
        "memory_bytes": mem.map(|m| m.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    })
}

/// The host name (for JSON results).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Prints what `bps-bench info` says about GPUs: the GPUs (or why there are none), their NVLink
/// matrix, the NUMA nodes and CPUs nearest each GPU and NIC, and how GPU buffers would travel
/// between hosts (GPUDirect RDMA or staged).
pub fn print_topology(rdma_cfg: &bps_transport::rdma::RdmaConfig) {
    let topo = bps_runtime::topo::Topology::detect();
    print!("{topo}");
    let rdma = bps_transport::rdma::probe(rdma_cfg).map_err(|e| e.to_string());
    // The CUDA ordinal whose memory is asked about: 0, the device a process sees first.
    let inputs = bps_runtime::topo::gpudirect_inputs(0);
    for line in gpudirect_lines(&rdma, &inputs) {
        println!("{line}");
    }
}

/// The `gpudirect:` section: the decision for links to servers, then each input.
fn gpudirect_lines(
    rdma: &Result<bps_transport::rdma::DeviceSummary, String>,
    inputs: &Result<GpuDirectInputs, String>,
) -> Vec<String> {
    let yes_no = |r: &Result<(), String>| match r {
        Ok(()) => "yes".to_string(),
        Err(e) => format!("no ({e})"),
    };
    let mut out = vec!["gpudirect:".to_string()];
    let inputs = match inputs {
        Ok(i) => i,
        Err(e) => {
            out.push(format!("  route: unknown: {e}"));
            return out;
        }
    };
    let link = if rdma.is_ok() {
        LinkKind::Rdma
    } else {
        LinkKind::Tcp
    };
    out.push(format!(
        "  route to servers: {}",
        select_route("servers", link, inputs)
    ));
    out.push(format!(
        "  rdma link: {}",
        match rdma {
            Ok(d) => format!("yes ({d})"),
            Err(e) => format!("no ({e})"),
        }
    ));
    out.push(format!(
        "  dma-buf export of device memory (CUDA device 0): {}",
        yes_no(&inputs.dmabuf_export)
    ));
    out.push(format!(
        "  dma-buf registration with the NIC (kernel): {}",
        yes_no(&inputs.verbs_dmabuf)
    ));
    out.push(format!(
        "  {}: {}",
        bps_runtime::topo::GPUDIRECT_ENV,
        match &inputs.disabled_by {
            Some(s) => format!("off ({s})"),
            None => "on".to_string(),
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> bps_transport::rdma::DeviceSummary {
        bps_transport::rdma::DeviceSummary {
            device: "mlx5_0".into(),
            port: 1,
            gid_index: 3,
            gid: std::net::Ipv6Addr::LOCALHOST,
            link_layer: "Ethernet",
            lid: 0,
            active_mtu: 4096,
            max_msg_bytes: 1 << 30,
        }
    }

    #[test]
    fn gpudirect_section() {
        let ok = GpuDirectInputs {
            disabled_by: None,
            dmabuf_export: Ok(()),
            verbs_dmabuf: Ok(()),
        };
        let l = gpudirect_lines(&Ok(summary()), &Ok(ok.clone()));
        assert_eq!(l[0], "gpudirect:");
        assert!(l[1].contains("GPUDirect RDMA"), "{l:?}");
        assert!(l[2].starts_with("  rdma link: yes (mlx5_0"), "{l:?}");
        assert_eq!(l[5], "  BPS_GPUDIRECT: on");

        let l = gpudirect_lines(&Err("no RDMA device".into()), &Ok(ok.clone()));
        assert_eq!(
            l[1],
            "  route to servers: staged through pinned host memory (link to servers is tcp)"
        );
        assert_eq!(l[2], "  rdma link: no (no RDMA device)");

        let no_driver = GpuDirectInputs {
            dmabuf_export: Err("no CUDA driver (libcuda.so.1 not found)".into()),
            ..ok
        };
        let l = gpudirect_lines(&Ok(summary()), &Ok(no_driver));
        assert!(l[1].contains("no CUDA driver"), "{l:?}");
        assert!(
            l[3].ends_with("no (no CUDA driver (libcuda.so.1 not found))"),
            "{l:?}"
        );

        let l = gpudirect_lines(
            &Ok(summary()),
            &Err("BPS_GPUDIRECT=\"2\": expected 0 or 1".into()),
        );
        assert_eq!(l.len(), 2);
        assert!(l[1].contains("BPS_GPUDIRECT"), "{l:?}");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(1_798_761_600), "2027-01-01T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}
