//! Machine topology: the GPUs (through NVML), the NVLinks between them, the NICs and the NUMA
//! nodes, and from that where the stage threads and pinned buffers of a GPU belong.
//!
//! [`Topology::detect`] never panics and never blocks for long: NVML is asked from a helper
//! thread that is given [`DetectOptions::nvml_timeout`] (a driver without persistence mode can
//! take seconds to initialise); whatever cannot be read becomes a note or a reason in words
//! ([`Topology::no_gpus`], [`Topology::notes`]).
//!
//! Sources:
//! - GPUs: NVML (feature `cuda`; `libnvidia-ml.so.1` is loaded at run time). GPU indices here are
//!   **NVML indices** (PCI bus order, not affected by `CUDA_VISIBLE_DEVICES`); map a CUDA ordinal
//!   through its PCI bus id with [`Topology::gpu_by_pci`].
//! - NUMA nodes and their CPUs: hwloc (feature `hwloc`), else `/sys/devices/system/node`.
//! - NICs: RDMA devices from `/sys/class/infiniband/*/device`, network interfaces from
//!   `/sys/class/net/*/device` (virtual interfaces, which have no device, are left out).
//!
//! Placement: a stage thread of GPU `g` pins itself with
//! `pin_current_thread(&topo.nearest_cpus(g))`; pinned host buffers it allocates and touches
//! first then come from that NUMA node (first-touch).

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bps_transport::rdma::gpudirect::{kernel_dmabuf_support, GpuDirectInputs};

/// The largest CPU number accepted in CPU lists and affinity masks (exclusive).
pub const MAX_CPUS: usize = 1 << 16;

/// NVML's `NVML_NVLINK_MAX_LINKS`: link numbers asked per GPU.
#[cfg(feature = "cuda")]
const MAX_NVLINKS: u32 = 18;

/// How [`Topology::detect_with`] looks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectOptions {
    /// Where sysfs is mounted (`/sys`; tests point it at a fixture tree).
    pub sysfs: PathBuf,
    /// The NVML library to load; `None`: `libnvidia-ml.so.1` from the library path.
    pub nvml_lib: Option<OsString>,
    /// Whether to ask NVML at all (only in builds with feature `cuda`).
    pub nvml: bool,
    /// How long NVML may take before the GPUs are given up on.
    pub nvml_timeout: Duration,
    /// Whether to ask hwloc for the NUMA nodes (only in builds with feature `hwloc`; it reads the
    /// real machine, so it is off when `sysfs` is a fixture).
    pub hwloc: bool,
}

impl Default for DetectOptions {
    fn default() -> Self {
        DetectOptions {
            sysfs: PathBuf::from("/sys"),
            nvml_lib: None,
            nvml: true,
            nvml_timeout: Duration::from_secs(10),
            hwloc: true,
        }
    }
}

/// What was found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// The GPUs, in NVML index order.
    pub gpus: Vec<Gpu>,
    /// Where the GPUs came from, e.g. `NVML (driver 580.65.06, CUDA 13.0)`.
    pub gpu_source: String,
    /// Why [`Topology::gpus`] is empty, e.g. `no NVIDIA driver (libnvidia-ml.so.1 not found)`.
    pub no_gpus: Option<String>,
    /// RDMA devices first, then network interfaces not belonging to one.
    pub nics: Vec<Nic>,
    /// The NUMA nodes (at least one).
    pub numa_nodes: Vec<NumaNode>,
    /// Where the NUMA nodes came from: `hwloc` or `sysfs`.
    pub cpu_source: String,
    /// The CPUs online.
    pub online_cpus: Vec<usize>,
    /// Things that could not be read (detection went on without them).
    pub notes: Vec<String>,
}

/// One GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gpu {
    /// NVML index.
    pub index: u32,
    /// Marketing name.
    pub name: String,
    /// PCI bus id as sysfs writes it (`0000:1b:00.0`); empty when unknown.
    pub pci_bus_id: String,
    /// The NUMA node nearest (from sysfs, else NVML, else the node holding
    /// [`Gpu::cpu_affinity`]).
    pub numa_node: Option<usize>,
    /// The CPUs nearest, as NVML reports them (empty when unknown).
    pub cpu_affinity: Vec<usize>,
    /// Active NVLinks that end in something that is not one of [`Topology::gpus`]: an NVSwitch.
    pub nvswitch_links: u32,
    /// One entry per other GPU.
    pub peers: Vec<GpuPeer>,
    /// The PCI path from the root complex down to the GPU (`pci0000:00`, `0000:00:01.0`, …),
    /// from sysfs; empty when unknown.
    pub pci_path: Vec<String>,
}

/// How a GPU reaches another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuPeer {
    /// The other GPU's NVML index.
    pub gpu: u32,
    /// Active NVLinks going straight to it.
    pub nvlinks: u32,
    /// Whether peer-to-peer over NVLink works (NVML P2P status, NVLink capability).
    pub p2p_nvlink: P2p,
    /// Whether peer reads work at all (NVML P2P status, read capability).
    pub p2p_read: P2p,
    /// The closest common PCIe ancestor, when NVML says.
    pub pcie: Option<PcieLevel>,
}

/// An NVML peer-to-peer status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum P2p {
    /// Works.
    Ok,
    /// The chipset does not support it.
    ChipsetNotSupported,
    /// The GPU does not support it.
    GpuNotSupported,
    /// The PCIe topology does not support it.
    TopologyNotSupported,
    /// Disabled by a driver registry key.
    DisabledByRegkey,
    /// Not supported.
    NotSupported,
    /// NVML could not tell.
    Unknown,
}

impl P2p {
    /// The short code `nvidia-smi topo -p2p` uses.
    pub fn code(self) -> &'static str {
        match self {
            P2p::Ok => "OK",
            P2p::ChipsetNotSupported => "CNS",
            P2p::GpuNotSupported => "GNS",
            P2p::TopologyNotSupported => "TNS",
            P2p::DisabledByRegkey => "DR",
            P2p::NotSupported => "NS",
            P2p::Unknown => "U",
        }
    }
}

/// The closest common PCIe ancestor of two devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcieLevel {
    /// On one board (multi-GPU card).
    Internal,
    /// Through at most one PCIe switch.
    Single,
    /// Through several PCIe switches, no host bridge.
    Multiple,
    /// Through a host bridge.
    HostBridge,
    /// Through the interconnect between host bridges of one NUMA node.
    Node,
    /// Through the interconnect between NUMA nodes.
    System,
}

impl PcieLevel {
    /// The code `nvidia-smi topo -m` uses.
    pub fn code(self) -> &'static str {
        match self {
            PcieLevel::Internal => "INT",
            PcieLevel::Single => "PIX",
            PcieLevel::Multiple => "PXB",
            PcieLevel::HostBridge => "PHB",
            PcieLevel::Node => "NODE",
            PcieLevel::System => "SYS",
        }
    }
}

/// The kind of a [`Nic`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicKind {
    /// An RDMA device (`/sys/class/infiniband`).
    Rdma,
    /// A network interface (`/sys/class/net`).
    Net,
}

/// A network device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// RDMA device or network interface.
    pub kind: NicKind,
    /// `mlx5_0`, `eth0`.
    pub name: String,
    /// The PCI function it sits on (`0000:17:00.0`).
    pub pci_addr: Option<String>,
    /// Its NUMA node (from sysfs, else the node holding [`Nic::local_cpus`]).
    pub numa_node: Option<usize>,
    /// The CPUs nearest (`local_cpulist`).
    pub local_cpus: Vec<usize>,
    /// For an RDMA device: its network interfaces.
    pub netdevs: Vec<String>,
    /// The PCI path from the root complex down to it.
    pub pci_path: Vec<String>,
}

/// A NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    /// Its number.
    pub id: usize,
    /// Its CPUs.
    pub cpus: Vec<usize>,
    /// Its memory, when known.
    pub memory_bytes: Option<u64>,
}

impl Topology {
    /// Looks at this machine (see the module documentation). Never panics.
    pub fn detect() -> Topology {
        Topology::detect_with(&DetectOptions::default())
    }

    /// Looks as `opts` says. Never panics.
    pub fn detect_with(opts: &DetectOptions) -> Topology {
        let mut t = Topology::default();
        t.read_cpus(opts);
        t.nics = scan_nics(&opts.sysfs, &mut t.notes);
        t.read_gpus(opts);
        t.infer_numa();
        t
    }

    /// Gives GPUs and NICs whose NUMA node is unknown (`numa_node` of -1, common in virtual
    /// machines) the node holding their nearest CPUs, as `nvidia-smi topo -m` does.
    fn infer_numa(&mut self) {
        for i in 0..self.gpus.len() {
            if self.gpus[i].numa_node.is_none() {
                self.gpus[i].numa_node = self.numa_of_cpus(&self.gpus[i].cpu_affinity);
            }
        }
        for i in 0..self.nics.len() {
            if self.nics[i].numa_node.is_none() {
                self.nics[i].numa_node = self.numa_of_cpus(&self.nics[i].local_cpus);
            }
        }
    }

    /// The NUMA node sharing the most of `cpus`; `None` for no CPUs, no overlap or a tie.
    pub fn numa_of_cpus(&self, cpus: &[usize]) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None; // (overlap, node)
        let mut tie = false;
        for n in &self.numa_nodes {
            let overlap = cpus.iter().filter(|c| n.cpus.contains(c)).count();
            if overlap == 0 {
                continue;
            }
            match best {
                Some((b, _)) if overlap < b => {}
                Some((b, _)) if overlap == b => tie = true,
                _ => {
                    best = Some((overlap, n.id));
                    tie = false;
                }
            }
        }
        if tie {
            None
        } else {
            best.map(|(_, id)| id)
        }
    }

    fn read_cpus(&mut self, opts: &DetectOptions) {
        #[cfg(feature = "hwloc")]
        if opts.hwloc {
            match std::panic::catch_unwind(hwloc_numa) {
                Ok(Ok((nodes, online))) if !nodes.is_empty() => {
                    self.numa_nodes = nodes;
                    self.online_cpus = online;
                    self.cpu_source = "hwloc".into();
                    // hwloc has no per-node memory here when the kernel hides it; sysfs may.
                    if let Ok((sys_nodes, _, _)) = sysfs_numa(&opts.sysfs) {
                        for n in &mut self.numa_nodes {
                            if n.memory_bytes.is_none() {
                                n.memory_bytes = sys_nodes
                                    .iter()
                                    .find(|s| s.id == n.id)
                                    .and_then(|s| s.memory_bytes);
                            }
                        }
                    }
                    return;
                }
                Ok(Ok(_)) => self
                    .notes
                    .push("hwloc found no NUMA node; using sysfs".into()),
                Ok(Err(e)) => self.notes.push(format!("{e}; using sysfs")),
                Err(_) => self
                    .notes
                    .push("hwloc panicked while reading the topology; using sysfs".into()),
            }
        }
        #[cfg(not(feature = "hwloc"))]
        let _ = opts.hwloc;
        self.cpu_source = "sysfs".into();
        match sysfs_numa(&opts.sysfs) {
            Ok((nodes, online, notes)) => {
                self.numa_nodes = nodes;
                self.online_cpus = online;
                self.notes.extend(notes);
            }
            Err(e) => {
                self.notes.push(e);
                let n = std::thread::available_parallelism().map_or(1, |n| n.get());
                self.online_cpus = (0..n).collect();
                self.numa_nodes = vec![NumaNode {
                    id: 0,
                    cpus: self.online_cpus.clone(),
                    memory_bytes: None,
                }];
            }
        }
    }

    fn read_gpus(&mut self, opts: &DetectOptions) {
        #[cfg(feature = "cuda")]
        if opts.nvml {
            let ncpus = self.online_cpus.last().map_or(1, |c| c + 1);
            match nvml::probe_bounded(opts, ncpus) {
                Ok(r) => {
                    self.gpus = r.gpus;
                    self.gpu_source = r.source;
                    self.notes.extend(r.notes);
                    if self.gpus.is_empty() {
                        self.no_gpus = Some("NVML lists GPUs, but none could be read".into());
                    }
                }
                Err(why) => self.no_gpus = Some(why),
            }
            return;
        }
        #[cfg(feature = "cuda")]
        {
            self.no_gpus = Some("not probed (NVML turned off in the detection options)".into());
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = opts;
            self.no_gpus = Some("this build has no CUDA support (feature `cuda`)".into());
        }
    }

    /// The GPU with NVML index `index`.
    pub fn gpu(&self, index: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// The GPU on PCI bus id `bus_id` (any spelling: `00000000:1B:00.0`, `0000:1b:00.0`), e.g.
    /// the one a CUDA ordinal names (`cuDeviceGetPCIBusId`).
    pub fn gpu_by_pci(&self, bus_id: &str) -> Option<&Gpu> {
        let want = normalize_bus_id(bus_id);
        self.gpus.iter().find(|g| g.pci_bus_id == want)
    }

    /// The NUMA node `id`.
    pub fn numa_node(&self, id: usize) -> Option<&NumaNode> {
        self.numa_nodes.iter().find(|n| n.id == id)
    }

    /// The CPUs a stage thread of GPU `gpu` (NVML index) should run on: the GPU's NVML CPU
    /// affinity, else the CPUs of its NUMA node, else every online CPU.
    pub fn nearest_cpus(&self, gpu: u32) -> Vec<usize> {
        self.nearest_cpus_why(gpu).0
    }

    /// [`Topology::nearest_cpus`] and where the answer came from: `nvml affinity`,
    /// `numa node N` or `all online cpus`.
    pub fn nearest_cpus_why(&self, gpu: u32) -> (Vec<usize>, String) {
        if let Some(g) = self.gpu(gpu) {
            if !g.cpu_affinity.is_empty() {
                return (g.cpu_affinity.clone(), "nvml affinity".into());
            }
            if let Some(n) = g.numa_node.and_then(|n| self.numa_node(n)) {
                if !n.cpus.is_empty() {
                    return (n.cpus.clone(), format!("numa node {}", n.id));
                }
            }
        }
        (self.online_cpus.clone(), "all online cpus".into())
    }

    /// The NIC nearest GPU `gpu` (NVML index): RDMA devices before network interfaces, then the
    /// longest shared PCI path (same switch before same root complex), then the same NUMA node.
    /// `None` when there is no NIC or no such GPU.
    pub fn nearest_nic(&self, gpu: u32) -> Option<&Nic> {
        let g = self.gpu(gpu)?;
        self.nics.iter().max_by_key(|n| {
            (
                n.kind == NicKind::Rdma,
                common_pci_depth(&g.pci_path, &n.pci_path),
                g.numa_node.is_some() && g.numa_node == n.numa_node,
                std::cmp::Reverse(n.name.clone()),
            )
        })
    }

    /// How GPU `gpu` reaches NIC `nic` over PCIe, as `nvidia-smi topo -m` says it.
    pub fn gpu_nic_level(&self, gpu: &Gpu, nic: &Nic) -> PcieLevel {
        pci_level(&gpu.pci_path, gpu.numa_node, &nic.pci_path, nic.numa_node)
    }

    /// The GPUs GPU `gpu` shares active NVLinks with, and how many: links going straight to a
    /// GPU, or, through an NVSwitch where P2P over NVLink works, the fewer of the two GPUs'
    /// switch links.
    pub fn nvlink_peers(&self, gpu: u32) -> Vec<(u32, u32)> {
        let Some(g) = self.gpu(gpu) else {
            return Vec::new();
        };
        g.peers
            .iter()
            .filter_map(|p| {
                let n = self.nvlinks_between(g, p);
                (n > 0).then_some((p.gpu, n))
            })
            .collect()
    }

    fn nvlinks_between(&self, g: &Gpu, p: &GpuPeer) -> u32 {
        if p.nvlinks > 0 {
            return p.nvlinks;
        }
        let other = self.gpu(p.gpu).map_or(0, |o| o.nvswitch_links);
        if p.p2p_nvlink == P2p::Ok && g.nvswitch_links > 0 && other > 0 {
            g.nvswitch_links.min(other)
        } else {
            0
        }
    }

    /// The text `bps-bench info` prints (also the [`Display`](fmt::Display) form).
    pub fn render(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.gpus.is_empty() {
            writeln!(
                f,
                "gpus: none ({})",
                self.no_gpus.as_deref().unwrap_or("none found")
            )?;
        } else {
            writeln!(f, "gpus: {} through {}", self.gpus.len(), self.gpu_source)?;
            for g in &self.gpus {
                let (cpus, why) = self.nearest_cpus_why(g.index);
                write!(
                    f,
                    "  GPU{} {}  pci {}  numa {}  cpus {} ({})",
                    g.index,
                    g.name,
                    or_dash(&g.pci_bus_id),
                    opt(g.numa_node),
                    format_cpulist(&cpus),
                    why
                )?;
                let links = self.nvlink_peers(g.index);
                if !links.is_empty() {
                    let l: Vec<String> = links.iter().map(|(p, n)| format!("GPU{p}x{n}")).collect();
                    write!(f, "  nvlink {}", l.join(" "))?;
                }
                if let Some(n) = self.nearest_nic(g.index) {
                    write!(f, "  nic {} ({})", n.name, self.gpu_nic_level(g, n).code())?;
                }
                writeln!(f)?;
            }
            if self.gpus.len() > 1 {
                writeln!(
                    f,
                    "  links (NV# = active NVLinks, direct or through NVSwitch; else the PCIe path: \
                     PIX one switch, PXB several, PHB host bridge, NODE same NUMA node, SYS across)"
                )?;
                self.matrix(f, |g, p| {
                    let n = self.nvlinks_between(g, p);
                    if n > 0 {
                        format!("NV{n}")
                    } else {
                        p.pcie.map_or("?", PcieLevel::code).to_string()
                    }
                })?;
                writeln!(
                    f,
                    "  p2p read (OK; CNS/GNS/TNS chipset/GPU/topology not supported, DR disabled \
                     by regkey, NS not supported, U unknown)"
                )?;
                self.matrix(f, |_, p| p.p2p_read.code().to_string())?;
            }
        }
        writeln!(
            f,
            "numa: {} node{} ({}), cpus online {}",
            self.numa_nodes.len(),
            if self.numa_nodes.len() == 1 { "" } else { "s" },
            self.cpu_source,
            format_cpulist(&self.online_cpus)
        )?;
        for n in &self.numa_nodes {
            write!(
                f,
                "  node{}: cpus {} ({})",
                n.id,
                format_cpulist(&n.cpus),
                n.cpus.len()
            )?;
            if let Some(m) = n.memory_bytes {
                write!(f, ", {:.1} GiB", m as f64 / (1u64 << 30) as f64)?;
            }
            writeln!(f)?;
        }
        if self.nics.is_empty() {
            writeln!(f, "nics: none with a device (only virtual interfaces)")?;
        } else {
            writeln!(f, "nics:")?;
        }
        for n in &self.nics {
            let kind = match n.kind {
                NicKind::Rdma if n.netdevs.is_empty() => "rdma".to_string(),
                NicKind::Rdma => format!("rdma, {}", n.netdevs.join(" ")),
                NicKind::Net => "net".to_string(),
            };
            writeln!(
                f,
                "  {} ({})  pci {}  numa {}  cpus {}",
                n.name,
                kind,
                n.pci_addr.as_deref().unwrap_or("-"),
                opt(n.numa_node),
                if n.local_cpus.is_empty() {
                    "-".to_string()
                } else {
                    format_cpulist(&n.local_cpus)
                }
            )?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

impl Topology {
    fn matrix(
        &self,
        f: &mut fmt::Formatter<'_>,
        cell: impl Fn(&Gpu, &GpuPeer) -> String,
    ) -> fmt::Result {
        write!(f, "    {:<6}", "")?;
        for g in &self.gpus {
            write!(f, "{:<6}", format!("GPU{}", g.index))?;
        }
        writeln!(f)?;
        for g in &self.gpus {
            write!(f, "    {:<6}", format!("GPU{}", g.index))?;
            for o in &self.gpus {
                let c = if o.index == g.index {
                    "X".to_string()
                } else {
                    g.peers
                        .iter()
                        .find(|p| p.gpu == o.index)
                        .map_or_else(|| "?".to_string(), |p| cell(g, p))
                };
                write!(f, "{c:<6}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn opt(v: Option<usize>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

// --- CPU lists and pinning -----------------------------------------------------------------------

/// Parses a kernel CPU list (`0-3,8-11`, `5`, empty) into sorted, distinct CPU numbers.
///
/// # Errors
/// A part that is not a number or a `LOW-HIGH` range, a range running backwards, or a CPU number
/// of [`MAX_CPUS`] or more; the message quotes the list.
pub fn parse_cpulist(list: &str) -> Result<Vec<usize>, String> {
    let list = list.trim();
    let mut out = Vec::new();
    if list.is_empty() {
        return Ok(out);
    }
    for part in list.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let num = |s: &str| -> Result<usize, String> {
            let n: usize = s.trim().parse().map_err(|_| {
                format!("cpu list {list:?}: {part:?} is not a CPU number or LOW-HIGH range")
            })?;
            if n >= MAX_CPUS {
                return Err(format!(
                    "cpu list {list:?}: CPU {n} is beyond the {MAX_CPUS} supported"
                ));
            }
            Ok(n)
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if hi < lo {
            return Err(format!("cpu list {list:?}: range {part:?} runs backwards"));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Writes CPU numbers as a kernel CPU list (`0-3,8-11`); `-` for none.
pub fn format_cpulist(cpus: &[usize]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return "-".into();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The CPUs set in an affinity bit mask of words (bit `c % W` of word `c / W`, `W` the word's
/// width in bits: 64 for `u64`, that of `c_ulong` for NVML and `cpu_set_t`).
pub fn mask_to_cpus<W: Copy + Into<u64>>(words: &[W]) -> Vec<usize> {
    let width = std::mem::size_of::<W>() * 8;
    let mut out = Vec::new();
    for (w, &bits) in words.iter().enumerate() {
        let bits: u64 = bits.into();
        for b in 0..width.min(64) {
            if bits & (1u64 << b) != 0 {
                out.push(w * width + b);
            }
        }
    }
    out
}

/// Pins the calling thread to `cpus` (`sched_setaffinity`). The kernel keeps only those the
/// thread may use (its cpuset); at least one must remain.
///
/// # Errors
/// No CPU given, a CPU number of [`MAX_CPUS`] or more, or the kernel refusing (e.g. none of
/// `cpus` online or allowed), with the list in the message.
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    let Some(&max) = cpus.iter().max() else {
        return Err("pin_current_thread: no CPU given".into());
    };
    if max >= MAX_CPUS {
        return Err(format!(
            "pin_current_thread: CPU {max} is beyond the {MAX_CPUS} supported"
        ));
    }
    let words = (max / 64 + 1).max(std::mem::size_of::<libc::cpu_set_t>() / 8);
    let mut mask = vec![0u64; words];
    for &c in cpus {
        mask[c / 64] |= 1u64 << (c % 64);
    }
    // SAFETY: `mask` is an initialised buffer of `words * 8` bytes, as passed; pid 0 names the
    // calling thread; the kernel only reads the mask. `cpu_set_t` is a plain array of 64-bit
    // words, so the cast pointer is suitably aligned.
    let rc =
        unsafe { libc::sched_setaffinity(0, words * 8, mask.as_ptr().cast::<libc::cpu_set_t>()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "pin_current_thread: sched_setaffinity to CPUs {}: {}",
            format_cpulist(cpus),
            std::io::Error::last_os_error()
        ))
    }
}

/// The CPUs the calling thread may run on (`sched_getaffinity`).
///
/// # Errors
/// The kernel refusing, with its message.
pub fn current_thread_cpus() -> Result<Vec<usize>, String> {
    let mut mask = vec![0u64; MAX_CPUS / 64];
    // SAFETY: `mask` is a writable buffer of `MAX_CPUS / 8` bytes, as passed; pid 0 names the
    // calling thread; the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::sched_getaffinity(
            0,
            mask.len() * 8,
            mask.as_mut_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if rc == 0 {
        Ok(mask_to_cpus(&mask))
    } else {
        Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ))
    }
}

// --- GPUDirect inputs ----------------------------------------------------------------------------

/// The environment variable that turns GPUDirect RDMA off (`0`).
pub const GPUDIRECT_ENV: &str = "BPS_GPUDIRECT";

/// Reads a `BPS_GPUDIRECT` value: `Ok(None)` when GPUDirect is allowed (unset, empty, `1`,
/// `true`, `on`, `yes`), `Ok(Some("BPS_GPUDIRECT=0"))` when it is turned off (`0`, `false`,
/// `off`, `no`).
///
/// # Errors
/// Any other value, named in the message.
pub fn parse_gpudirect_setting(value: Option<&str>) -> Result<Option<String>, String> {
    let Some(raw) = value else {
        return Ok(None);
    };
    match raw.trim().to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "on" | "yes" => Ok(None),
        "0" | "false" | "off" | "no" => Ok(Some(format!("{GPUDIRECT_ENV}={}", raw.trim()))),
        _ => Err(format!(
            "{GPUDIRECT_ENV}={raw:?}: expected 0 or 1 (also false/true, off/on, no/yes)"
        )),
    }
}

/// Whether device memory of CUDA device `cuda_ordinal` can be exported as a dma-buf (the device
/// attribute `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`).
///
/// # Errors
/// Why not: no CUDA support in this build, no driver, or the device saying no.
pub fn dmabuf_export_support(cuda_ordinal: i32) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        crate::gpu::dmabuf::dmabuf_supported(cuda_ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cuda_ordinal;
        Err("this build has no CUDA support (feature `cuda`)".into())
    }
}

/// Every input of [`select_route`](bps_transport::rdma::gpudirect::select_route) for GPU buffers
/// of CUDA device `cuda_ordinal`, probed on this machine: `BPS_GPUDIRECT`, dma-buf export of
/// device memory, and the kernel's dma-buf memory registration (a NIC that still refuses is
/// caught at the first registration by
/// [`Registrar`](bps_transport::rdma::gpudirect::Registrar)).
///
/// # Errors
/// A `BPS_GPUDIRECT` value that is not a boolean.
pub fn gpudirect_inputs(cuda_ordinal: i32) -> Result<GpuDirectInputs, String> {
    let setting = std::env::var(GPUDIRECT_ENV).ok();
    let disabled_by = parse_gpudirect_setting(setting.as_deref())?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("kernel release unknown (/proc/sys/kernel/osrelease: {e})"));
    Ok(GpuDirectInputs {
        disabled_by,
        dmabuf_export: dmabuf_export_support(cuda_ordinal),
        verbs_dmabuf: release.and_then(|r| kernel_dmabuf_support(&r)),
    })
}

// --- sysfs ---------------------------------------------------------------------------------------

/// Normalises a PCI bus id to the sysfs spelling: `00000000:1B:00.0` → `0000:1b:00.0`.
pub fn normalize_bus_id(bus_id: &str) -> String {
    let s = bus_id.trim().to_ascii_lowercase();
    match s.split_once(':') {
        Some((dom, rest)) if rest.contains(':') => match u32::from_str_radix(dom, 16) {
            Ok(d) => format!("{d:04x}:{rest}"),
            Err(_) => s,
        },
        // No domain: domain 0.
        Some(_) => format!("0000:{s}"),
        None => s,
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `name` is a PCI function address (`0000:17:00.0`).
fn is_bdf(name: &str) -> bool {
    let mut it = name.split(':');
    let (Some(dom), Some(bus), Some(devfn), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return false;
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        return false;
    };
    dom.len() >= 4
        && dom.bytes().all(|b| b.is_ascii_hexdigit())
        && is_hex(bus, 2)
        && is_hex(dev, 2)
        && func.len() == 1
        && func.bytes().all(|b| (b'0'..=b'7').contains(&b))
}

/// Whether `name` is a PCI root complex directory (`pci0000:00`).
fn is_pci_root(name: &str) -> bool {
    name.strip_prefix("pci")
        .and_then(|r| r.split_once(':'))
        .is_some_and(|(d, b)| {
            d.len() >= 4 && d.bytes().all(|c| c.is_ascii_hexdigit()) && is_hex(b, 2)
        })
}

/// The PCI function directory a sysfs device path sits on (the path itself or its nearest
/// ancestor named like `0000:17:00.0`), resolved.
fn pci_dir_of(dev: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(dev).ok()?;
    real.ancestors()
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_bdf))
        .map(Path::to_path_buf)
}

/// The PCI path of a resolved PCI function directory: the root complex and every function
/// from it down.
fn pci_path_of(dir: &Path) -> Vec<String> {
    dir.components()
        .filter_map(|c| c.as_os_str().to_str())
        .filter(|n| is_pci_root(n) || is_bdf(n))
        .map(str::to_string)
        .collect()
}

fn common_pci_depth(a: &[String], b: &[String]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The PCIe level between two devices from their PCI paths (as `nvidia-smi topo -m` names it).
fn pci_level(
    a: &[String],
    a_numa: Option<usize>,
    b: &[String],
    b_numa: Option<usize>,
) -> PcieLevel {
    let common = common_pci_depth(a, b);
    if common == 0 {
        if a_numa.is_some() && a_numa == b_numa {
            PcieLevel::Node
        } else {
            PcieLevel::System
        }
    } else if common == 1 {
        PcieLevel::HostBridge
    } else if a.len().max(b.len()) - common <= 2 {
        PcieLevel::Single
    } else {
        PcieLevel::Multiple
    }
}

/// A sysfs `numa_node` file: `-1` and absence are `None`.
fn read_numa_file(path: &Path, notes: &mut Vec<String>) -> Option<usize> {
    let s = std::fs::read_to_string(path).ok()?;
    match s.trim().parse::<i64>() {
        Ok(n) if n >= 0 => usize::try_from(n).ok(),
        Ok(_) => None,
        Err(_) => {
            notes.push(format!(
                "{}: {:?} is not a NUMA node number",
                path.display(),
                s.trim()
            ));
            None
        }
    }
}

/// A sysfs CPU list file; absence is empty.
fn read_cpulist_file(path: &Path, notes: &mut Vec<String>) -> Vec<usize> {
    match std::fs::read_to_string(path) {
        Ok(s) => parse_cpulist(&s).unwrap_or_else(|e| {
            notes.push(format!("{}: {e}", path.display()));
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// What sysfs says about a PCI function: NUMA node, local CPUs, PCI path.
fn pci_locality(dir: &Path, notes: &mut Vec<String>) -> (Option<usize>, Vec<usize>, Vec<String>) {
    (
        read_numa_file(&dir.join("numa_node"), notes),
        read_cpulist_file(&dir.join("local_cpulist"), notes),
        pci_path_of(dir),
    )
}

fn sorted_entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The RDMA devices and physical network interfaces under `sys`.
fn scan_nics(sys: &Path, notes: &mut Vec<String>) -> Vec<Nic> {
    let mut nics = Vec::new();
    let mut covered = Vec::new();
    for (name, path) in sorted_entries(&sys.join("class/infiniband")) {
        let dev = path.join("device");
        let pci = pci_dir_of(&dev);
        let (numa_node, local_cpus, pci_path) = match &pci {
            Some(d) => pci_locality(d, notes),
            None => (None, Vec::new(), Vec::new()),
        };
        let netdevs: Vec<String> = sorted_entries(&dev.join("net"))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        if let Some(d) = &pci {
            covered.push(d.clone());
        }
        nics.push(Nic {
            kind: NicKind::Rdma,
            name,
            pci_addr: pci.as_deref().and_then(file_name),
            numa_node,
            local_cpus,
            netdevs,
            pci_path,
        });
    }
    for (name, path) in sorted_entries(&sys.join("class/net")) {
        let dev = path.join("device");
        if !dev.exists() {
            continue; // virtual: lo, bridges, veth, ifb
        }
        let pci = pci_dir_of(&dev);
        if pci.as_ref().is_some_and(|d| covered.contains(d)) {
            continue; // shown with its RDMA device
        }
        let (numa_node, local_cpus, pci_path) = match &pci {
            Some(d) => pci_locality(d, notes),
            None => (None, Vec::new(), Vec::new()),
        };
        nics.push(Nic {
            kind: NicKind::Net,
            name,
            pci_addr: pci.as_deref().and_then(file_name),
            numa_node,
            local_cpus,
            netdevs: Vec::new(),
            pci_path,
        });
    }
    nics
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name()?.to_str().map(str::to_string)
}

/// NUMA nodes, the online CPUs, and notes about what could not be read.
type SysfsCpus = (Vec<NumaNode>, Vec<usize>, Vec<String>);

/// NUMA nodes, online CPUs and notes from `sys/devices/system`.
fn sysfs_numa(sys: &Path) -> Result<SysfsCpus, String> {
    let mut notes = Vec::new();
    let online_file = sys.join("devices/system/cpu/online");
    let mut online = match std::fs::read_to_string(&online_file) {
        Ok(s) => parse_cpulist(&s).map_err(|e| format!("{}: {e}", online_file.display()))?,
        Err(_) => Vec::new(),
    };
    let mut nodes = Vec::new();
    for (name, path) in sorted_entries(&sys.join("devices/system/node")) {
        let Some(id) = name
            .strip_prefix("node")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let cpus = read_cpulist_file(&path.join("cpulist"), &mut notes);
        let memory_bytes = std::fs::read_to_string(path.join("meminfo"))
            .ok()
            .and_then(|m| node_mem_total(&m));
        nodes.push(NumaNode {
            id,
            cpus,
            memory_bytes,
        });
    }
    nodes.sort_by_key(|n| n.id);
    if online.is_empty() {
        online = nodes.iter().flat_map(|n| n.cpus.iter().copied()).collect();
        online.sort_unstable();
        online.dedup();
    }
    if online.is_empty() {
        return Err(format!(
            "no CPU list in {} or {}",
            online_file.display(),
            sys.join("devices/system/node").display()
        ));
    }
    if nodes.is_empty() {
        notes.push(format!(
            "no NUMA nodes in {}: one node with every CPU assumed",
            sys.join("devices/system/node").display()
        ));
        nodes.push(NumaNode {
            id: 0,
            cpus: online.clone(),
            memory_bytes: None,
        });
    }
    Ok((nodes, online, notes))
}

/// `MemTotal` of a node's `meminfo` (`Node 0 MemTotal:  24684092 kB`), in bytes.
fn node_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.contains("MemTotal:"))?;
    let kb: u64 = line
        .split(':')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

// --- hwloc ---------------------------------------------------------------------------------------

#[cfg(feature = "hwloc")]
fn hwloc_numa() -> Result<(Vec<NumaNode>, Vec<usize>), String> {
    use hwlocality::object::types::ObjectType;

    let topo = hwlocality::Topology::new().map_err(|e| format!("hwloc: {e}"))?;
    let set_to_vec = |s: &hwlocality::cpu::cpuset::CpuSet| -> Vec<usize> {
        if s.last_set().is_none() {
            return Vec::new(); // empty or infinite: nothing usable
        }
        s.iter_set()
            .map(usize::from)
            .filter(|&c| c < MAX_CPUS)
            .collect()
    };
    let mut nodes = Vec::new();
    for obj in topo.objects_with_type(ObjectType::NUMANode) {
        let Some(id) = obj.os_index() else {
            continue;
        };
        let cpus = obj.cpuset().map(|s| set_to_vec(&s)).unwrap_or_default();
        let mem = obj.total_memory();
        nodes.push(NumaNode {
            id,
            cpus,
            memory_bytes: (mem > 0).then_some(mem),
        });
    }
    nodes.sort_by_key(|n| n.id);
    let online = set_to_vec(&topo.cpuset());
    Ok((nodes, online))
}

// --- NVML ----------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
mod nvml {
    use std::ffi::OsStr;
    use std::path::Path;
    use std::sync::mpsc;

    use nvml_wrapper::enum_wrappers::device::{P2pCapabilitiesIndex, P2pStatus, TopologyLevel};
    use nvml_wrapper::error::NvmlError;
    use nvml_wrapper::Nvml;

    use super::{
        mask_to_cpus, normalize_bus_id, pci_dir_of, pci_locality, DetectOptions, Gpu, GpuPeer, P2p,
        PcieLevel, MAX_NVLINKS,
    };

    pub(super) struct Report {
        pub(super) source: String,
        pub(super) gpus: Vec<Gpu>,
        pub(super) notes: Vec<String>,
    }

    /// [`probe`] on a helper thread, given `opts.nvml_timeout`.
    pub(super) fn probe_bounded(opts: &DetectOptions, ncpus: usize) -> Result<Report, String> {
        let (tx, rx) = mpsc::channel();
        let lib = opts.nvml_lib.clone();
        let sys = opts.sysfs.clone();
        let spawned = std::thread::Builder::new()
            .name("bps-topo-nvml".into())
            .spawn(move || {
                let _ = tx.send(probe(lib.as_deref(), &sys, ncpus));
            });
        if let Err(e) = spawned {
            return Err(format!("cannot start a thread to ask NVML: {e}"));
        }
        match rx.recv_timeout(opts.nvml_timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "NVML did not answer within {:?} (a driver without persistence mode initialises \
                 slowly: `nvidia-smi -pm 1`)",
                opts.nvml_timeout
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("NVML probe failed (its thread panicked)".into())
            }
        }
    }

    /// Why NVML could not be initialised, in words.
    pub(super) fn init_error(e: &NvmlError, lib: &str) -> String {
        match e {
            NvmlError::LibloadingError(le) => {
                let msg = le.to_string();
                if msg.contains("No such file") || msg.contains("cannot open shared object") {
                    format!("no NVIDIA driver ({lib} not found)")
                } else {
                    format!("cannot load {lib}: {msg}")
                }
            }
            NvmlError::FailedToLoadSymbol(s) => {
                format!("{lib} is not a usable NVML (missing {s}); driver too old?")
            }
            NvmlError::DriverNotLoaded => format!(
                "NVIDIA driver not loaded ({lib} is there, but the kernel module is not running)"
            ),
            NvmlError::NoPermission => {
                "no permission to talk to the NVIDIA driver (NVML: no permission)".into()
            }
            other => format!("NVML initialisation failed: {other}"),
        }
    }

    fn p2p(s: Result<P2pStatus, NvmlError>) -> P2p {
        match s {
            Ok(P2pStatus::Ok) => P2p::Ok,
            Ok(P2pStatus::ChipsetNotSupported) => P2p::ChipsetNotSupported,
            Ok(P2pStatus::GpuNotSupported) => P2p::GpuNotSupported,
            Ok(P2pStatus::IohTopologyNotSupported) => P2p::TopologyNotSupported,
            Ok(P2pStatus::DisabledByRegkey) => P2p::DisabledByRegkey,
            Ok(P2pStatus::NotSupported) => P2p::NotSupported,
            Ok(P2pStatus::Unknown) | Err(_) => P2p::Unknown,
        }
    }

    fn level(l: TopologyLevel) -> PcieLevel {
        match l {
            TopologyLevel::Internal => PcieLevel::Internal,
            TopologyLevel::Single => PcieLevel::Single,
            TopologyLevel::Multiple => PcieLevel::Multiple,
            TopologyLevel::HostBridge => PcieLevel::HostBridge,
            TopologyLevel::Node => PcieLevel::Node,
            TopologyLevel::System => PcieLevel::System,
        }
    }

    /// Asks NVML (at `lib`, else `libnvidia-ml.so.1`) for the GPUs.
    pub(super) fn probe(lib: Option<&OsStr>, sys: &Path, ncpus: usize) -> Result<Report, String> {
        let lib_name = lib.map_or_else(
            || "libnvidia-ml.so.1".to_string(),
            |l| l.to_string_lossy().into_owned(),
        );
        let nvml = match lib {
            Some(p) => Nvml::builder().lib_path(p).init(),
            None => Nvml::init(),
        }
        .map_err(|e| init_error(&e, &lib_name))?;
        let driver = nvml
            .sys_driver_version()
            .unwrap_or_else(|_| "unknown".into());
        let source = match nvml.sys_cuda_driver_version() {
            Ok(v) => format!(
                "NVML (driver {driver}, CUDA {}.{})",
                v / 1000,
                v % 1000 / 10
            ),
            Err(_) => format!("NVML (driver {driver})"),
        };
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count the GPUs: {e}"))?;
        if count == 0 {
            return Err(format!("the NVIDIA driver {driver} reports no GPU"));
        }
        let mut notes = Vec::new();
        let mut gpus = Vec::new();
        // Per GPU read: the remote PCI bus id of each active NVLink (None: not readable).
        let mut remotes: Vec<Vec<Option<String>>> = Vec::new();
        let words = ncpus.div_ceil(64).max(1);
        for i in 0..count {
            let dev = match nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    notes.push(format!("GPU{i}: not readable through NVML: {e}"));
                    continue;
                }
            };
            let name = dev.name().unwrap_or_else(|e| {
                notes.push(format!("GPU{i}: name: {e}"));
                "unknown".into()
            });
            let pci_bus_id = match dev.pci_info() {
                Ok(p) => normalize_bus_id(&p.bus_id),
                Err(e) => {
                    notes.push(format!("GPU{i}: PCI info: {e}"));
                    String::new()
                }
            };
            let (sys_numa, _, pci_path) = if pci_bus_id.is_empty() {
                (None, Vec::new(), Vec::new())
            } else {
                match pci_dir_of(&sys.join("bus/pci/devices").join(&pci_bus_id)) {
                    Some(d) => pci_locality(&d, &mut notes),
                    None => (None, Vec::new(), Vec::new()),
                }
            };
            // sysfs first: NVML's NUMA id is that of the GPU's own memory on platforms where GPU
            // memory is a NUMA node (and unsupported elsewhere).
            let numa_node = sys_numa.or_else(|| {
                dev.numa_node_id()
                    .ok()
                    .and_then(|n| usize::try_from(n).ok())
            });
            let cpu_affinity = match dev.cpu_affinity(words) {
                Ok(m) => mask_to_cpus(&m),
                Err(e) => {
                    notes.push(format!("GPU{i}: CPU affinity: {e}"));
                    Vec::new()
                }
            };
            let mut links = Vec::new();
            for l in 0..MAX_NVLINKS {
                let link = dev.link_wrapper_for(l);
                match link.is_active() {
                    Ok(true) => links.push(
                        link.remote_pci_info()
                            .ok()
                            .map(|p| normalize_bus_id(&p.bus_id)),
                    ),
                    Ok(false) => {}
                    // No NVLink on this GPU, or past its last link.
                    Err(NvmlError::NotSupported | NvmlError::InvalidArg) => break,
                    Err(e) => {
                        notes.push(format!("GPU{i}: NVLink {l}: {e}"));
                    }
                }
            }
            remotes.push(links);
            gpus.push(Gpu {
                index: i,
                name,
                pci_bus_id,
                numa_node,
                cpu_affinity,
                nvswitch_links: 0,
                peers: Vec::new(),
                pci_path,
            });
        }
        let bus_ids: Vec<String> = gpus.iter().map(|g| g.pci_bus_id.clone()).collect();
        for (a, links) in remotes.iter().enumerate() {
            let to_gpu = |id: &Option<String>| {
                id.as_ref()
                    .and_then(|id| bus_ids.iter().position(|b| !b.is_empty() && b == id))
            };
            gpus[a].nvswitch_links =
                u32::try_from(links.iter().filter(|id| to_gpu(id).is_none()).count())
                    .unwrap_or(u32::MAX);
            let Ok(dev_a) = nvml.device_by_index(gpus[a].index) else {
                continue;
            };
            let mut peers = Vec::new();
            for (b, gb) in gpus.iter().enumerate() {
                if a == b {
                    continue;
                }
                let Ok(dev_b) = nvml.device_by_index(gb.index) else {
                    continue;
                };
                let nvlinks = links.iter().filter(|id| to_gpu(id) == Some(b)).count();
                let p2p_nvlink = p2p(dev_a.p2p_status(&dev_b, P2pCapabilitiesIndex::NvLink));
                let p2p_read = p2p(dev_a.p2p_status(&dev_b, P2pCapabilitiesIndex::Read));
                let pcie = dev_a.topology_common_ancestor(dev_b).ok().map(level);
                peers.push(GpuPeer {
                    gpu: gb.index,
                    nvlinks: u32::try_from(nvlinks).unwrap_or(u32::MAX),
                    p2p_nvlink,
                    p2p_read,
                    pcie,
                });
            }
            gpus[a].peers = peers;
        }
        Ok(Report {
            source,
            gpus,
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "bps-topo-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn write(&self, rel: &str, contents: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, contents).unwrap();
        }
        fn mkdir(&self, rel: &str) {
            std::fs::create_dir_all(self.0.join(rel)).unwrap();
        }
        /// A symlink at `rel` pointing at `target` (relative to the root).
        fn link(&self, rel: &str, target: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(self.0.join(target), p).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const GPU_DIR: &str = "devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0";
    const NIC0_DIR: &str = "devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0";
    const NIC1_DIR: &str = "devices/pci0000:80/0000:80:01.0/0000:81:00.0";
    const ETH_DIR: &str = "devices/pci0000:00/0000:00:03.0";

    /// Two NUMA nodes; a GPU and mlx5_0 under one PCIe switch on node 0, mlx5_1 on node 1, a
    /// virtio eth0 without NUMA information, and lo.
    fn fixture() -> TempDir {
        let t = TempDir::new("sysfs");
        t.write("devices/system/cpu/online", "0-15\n");
        t.write("devices/system/node/node0/cpulist", "0-3,8-11\n");
        t.write(
            "devices/system/node/node0/meminfo",
            "Node 0 MemTotal:       1048576 kB\nNode 0 MemFree:  12 kB\n",
        );
        t.write("devices/system/node/node1/cpulist", "4-7,12-15\n");
        t.write("devices/system/node/possible", "0-1\n");
        t.write(&format!("{GPU_DIR}/numa_node"), "0\n");
        t.write(&format!("{GPU_DIR}/local_cpulist"), "0-3,8-11\n");
        t.link("bus/pci/devices/0000:03:00.0", GPU_DIR);
        t.write(&format!("{NIC0_DIR}/numa_node"), "0\n");
        t.write(&format!("{NIC0_DIR}/local_cpulist"), "0-3,8-11\n");
        t.mkdir(&format!("{NIC0_DIR}/net/ib0"));
        t.link("class/infiniband/mlx5_0/device", NIC0_DIR);
        t.link("class/net/ib0/device", NIC0_DIR);
        t.write(&format!("{NIC1_DIR}/numa_node"), "1\n");
        t.write(&format!("{NIC1_DIR}/local_cpulist"), "4-7,12-15\n");
        t.link("class/infiniband/mlx5_1/device", NIC1_DIR);
        t.mkdir(&format!("{ETH_DIR}/virtio2/net/eth0"));
        t.link("class/net/eth0/device", &format!("{ETH_DIR}/virtio2"));
        t.mkdir("class/net/lo");
        t
    }

    fn opts(root: &Path) -> DetectOptions {
        DetectOptions {
            sysfs: root.to_path_buf(),
            nvml: false,
            hwloc: false,
            ..DetectOptions::default()
        }
    }

    fn gpu(index: u32, numa: Option<usize>, affinity: &[usize]) -> Gpu {
        Gpu {
            index,
            name: format!("Fake GPU {index}"),
            numa_node: numa,
            cpu_affinity: affinity.to_vec(),
            ..Gpu::default()
        }
    }

    #[test]
    fn cpulists_parse() {
        assert_eq!(
            parse_cpulist("0-3,8-11").unwrap(),
            [0, 1, 2, 3, 8, 9, 10, 11]
        );
        assert_eq!(parse_cpulist("5\n").unwrap(), [5]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpulist(" \n").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpulist("8-9,0,1-2,2").unwrap(), [0, 1, 2, 8, 9]);
        assert_eq!(parse_cpulist("0 - 1, 3").unwrap(), [0, 1, 3]);
        for bad in ["a", "0-", "-3", "3-1", "0,,1", "1-2-3", "99999999"] {
            let e = parse_cpulist(bad).unwrap_err();
            assert!(
                e.contains("cpu list") && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
        assert!(parse_cpulist("3-1").unwrap_err().contains("backwards"));
        assert!(parse_cpulist("0-70000").unwrap_err().contains("beyond"));
    }

    #[test]
    fn cpulists_format() {
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 9, 10, 11]), "0-3,8-11");
        assert_eq!(format_cpulist(&[5]), "5");
        assert_eq!(format_cpulist(&[]), "-");
        assert_eq!(format_cpulist(&[3, 1, 2, 7, 7]), "1-3,7");
        for l in ["0-3,8-11", "0,2,4", "0-63,128-191"] {
            assert_eq!(format_cpulist(&parse_cpulist(l).unwrap()), l);
        }
    }

    #[test]
    fn affinity_masks() {
        assert_eq!(mask_to_cpus(&[0b1011u64]), [0, 1, 3]);
        assert_eq!(mask_to_cpus(&[0, 1u64 << 63, 1]), [127, 128]);
        assert_eq!(mask_to_cpus::<u64>(&[]), Vec::<usize>::new());
        assert_eq!(mask_to_cpus(&[0u32, 1 << 31, 1]), [63, 64]);
    }

    #[test]
    fn bus_ids_normalise() {
        assert_eq!(normalize_bus_id("00000000:1B:00.0"), "0000:1b:00.0");
        assert_eq!(normalize_bus_id("0000:1b:00.0"), "0000:1b:00.0");
        assert_eq!(normalize_bus_id("00010000:C1:00.0"), "10000:c1:00.0");
        assert_eq!(normalize_bus_id("1b:00.0"), "0000:1b:00.0");
        assert!(is_bdf("0000:1b:00.0") && is_bdf("10000:c1:00.7"));
        for no in ["0000:1b:00", "virtio2", "pci0000:00", "0000:1b:00.8", "net"] {
            assert!(!is_bdf(no), "{no}");
        }
        assert!(is_pci_root("pci0000:00") && !is_pci_root("pci"));
    }

    #[test]
    fn sysfs_fixture_is_read() {
        let t = fixture();
        let topo = Topology::detect_with(&opts(&t.0));
        assert_eq!(topo.cpu_source, "sysfs");
        assert_eq!(topo.online_cpus, (0..16).collect::<Vec<_>>());
        assert_eq!(topo.numa_nodes.len(), 2);
        assert_eq!(topo.numa_nodes[0].cpus, [0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(topo.numa_nodes[0].memory_bytes, Some(1 << 30));
        assert_eq!(topo.numa_nodes[1].cpus, [4, 5, 6, 7, 12, 13, 14, 15]);
        assert_eq!(topo.numa_nodes[1].memory_bytes, None);

        let names: Vec<&str> = topo.nics.iter().map(|n| n.name.as_str()).collect();
        // ib0 is shown with mlx5_0; lo is virtual.
        assert_eq!(names, ["mlx5_0", "mlx5_1", "eth0"], "{topo:#?}");
        let m0 = &topo.nics[0];
        assert_eq!(m0.kind, NicKind::Rdma);
        assert_eq!(m0.pci_addr.as_deref(), Some("0000:04:00.0"));
        assert_eq!(m0.numa_node, Some(0));
        assert_eq!(m0.local_cpus, [0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(m0.netdevs, ["ib0"]);
        assert_eq!(
            m0.pci_path,
            [
                "pci0000:00",
                "0000:00:01.0",
                "0000:01:00.0",
                "0000:02:01.0",
                "0000:04:00.0"
            ]
        );
        assert_eq!(topo.nics[1].numa_node, Some(1));
        let eth = &topo.nics[2];
        assert_eq!(eth.kind, NicKind::Net);
        // The virtio device is not a PCI function: its parent is.
        assert_eq!(eth.pci_addr.as_deref(), Some("0000:00:03.0"));
        assert_eq!(eth.numa_node, None);
        assert!(topo.notes.is_empty(), "{:?}", topo.notes);
        assert!(topo.no_gpus.is_some());
    }

    #[test]
    fn sysfs_without_numa_nodes_assumes_one() {
        let t = TempDir::new("flat");
        t.write("devices/system/cpu/online", "0-3");
        let topo = Topology::detect_with(&opts(&t.0));
        assert_eq!(topo.numa_nodes.len(), 1);
        assert_eq!(topo.numa_nodes[0].cpus, [0, 1, 2, 3]);
        assert!(
            topo.notes.iter().any(|n| n.contains("one node")),
            "{:?}",
            topo.notes
        );
        assert!(topo.nics.is_empty());
    }

    #[test]
    fn bad_sysfs_files_become_notes_not_panics() {
        let t = TempDir::new("bad");
        t.write("devices/system/cpu/online", "0-3");
        t.write("devices/system/node/node0/cpulist", "zero-three");
        t.write("devices/pci0000:00/0000:00:02.0/numa_node", "banana");
        t.link("class/net/eth0/device", "devices/pci0000:00/0000:00:02.0");
        let topo = Topology::detect_with(&opts(&t.0));
        assert!(
            topo.notes
                .iter()
                .any(|n| n.contains("cpulist") && n.contains("zero-three")),
            "{:?}",
            topo.notes
        );
        assert!(
            topo.notes
                .iter()
                .any(|n| n.contains("numa_node") && n.contains("banana")),
            "{:?}",
            topo.notes
        );
        // A broken online list is an error naming the file; detection still answers.
        let t2 = TempDir::new("bad-online");
        t2.write("devices/system/cpu/online", "0-x");
        let topo = Topology::detect_with(&opts(&t2.0));
        assert!(
            topo.notes.iter().any(|n| n.contains("cpu/online")),
            "{:?}",
            topo.notes
        );
        assert!(!topo.online_cpus.is_empty() && topo.numa_nodes.len() == 1);
    }

    #[test]
    fn nearest_cpus_falls_back_in_order() {
        let t = fixture();
        let mut topo = Topology::detect_with(&opts(&t.0));
        topo.gpus = vec![
            gpu(0, Some(1), &[2, 3]), // NVML affinity wins over the node
            gpu(1, Some(1), &[]),     // node 1
            gpu(2, Some(7), &[]),     // unknown node: everything
            gpu(3, None, &[]),        // no node: everything
        ];
        assert_eq!(topo.nearest_cpus(0), [2, 3]);
        assert_eq!(topo.nearest_cpus_why(0).1, "nvml affinity");
        assert_eq!(topo.nearest_cpus(1), [4, 5, 6, 7, 12, 13, 14, 15]);
        assert_eq!(topo.nearest_cpus_why(1).1, "numa node 1");
        let all: Vec<usize> = (0..16).collect();
        assert_eq!(topo.nearest_cpus(2), all);
        assert_eq!(topo.nearest_cpus(3), all);
        assert_eq!(topo.nearest_cpus_why(3).1, "all online cpus");
        assert_eq!(topo.nearest_cpus(99), all, "a GPU that does not exist");
    }

    #[test]
    fn numa_node_is_inferred_from_cpus() {
        let t = fixture();
        let mut topo = Topology::detect_with(&opts(&t.0));
        assert_eq!(topo.numa_of_cpus(&[0, 1]), Some(0));
        assert_eq!(topo.numa_of_cpus(&[4, 12, 0]), Some(1));
        assert_eq!(topo.numa_of_cpus(&[0, 4]), None, "a tie");
        assert_eq!(topo.numa_of_cpus(&[]), None);
        assert_eq!(topo.numa_of_cpus(&[99]), None);
        topo.gpus = vec![gpu(0, None, &[5, 6]), gpu(1, Some(0), &[5, 6])];
        topo.nics[2].local_cpus = vec![8, 9];
        topo.infer_numa();
        assert_eq!(topo.gpus[0].numa_node, Some(1));
        assert_eq!(topo.gpus[1].numa_node, Some(0), "a known node is kept");
        assert_eq!(topo.nics[2].numa_node, Some(0));
    }

    #[test]
    fn nearest_nic_prefers_rdma_then_pci_then_numa() {
        let t = fixture();
        let mut topo = Topology::detect_with(&opts(&t.0));
        let mut g0 = gpu(0, Some(0), &[]);
        g0.pci_bus_id = "0000:03:00.0".into();
        g0.pci_path = pci_path_of(&std::fs::canonicalize(t.0.join(GPU_DIR)).unwrap());
        let g1 = gpu(1, Some(1), &[]); // no PCI path: NUMA decides
        topo.gpus = vec![g0, g1];
        let n0 = topo.nearest_nic(0).unwrap();
        assert_eq!(n0.name, "mlx5_0");
        assert_eq!(topo.gpu_nic_level(&topo.gpus[0], n0), PcieLevel::Single);
        let n1 = topo.nearest_nic(1).unwrap();
        assert_eq!(n1.name, "mlx5_1");
        assert_eq!(topo.gpu_nic_level(&topo.gpus[1], n1), PcieLevel::Node);
        assert!(topo.nearest_nic(5).is_none());
        // Without RDMA devices the network interface is taken.
        topo.nics.retain(|n| n.kind == NicKind::Net);
        assert_eq!(topo.nearest_nic(0).unwrap().name, "eth0");
        assert_eq!(
            topo.gpu_nic_level(&topo.gpus[0], topo.nearest_nic(0).unwrap()),
            PcieLevel::HostBridge
        );
        topo.nics.clear();
        assert!(topo.nearest_nic(0).is_none());
    }

    #[test]
    fn pci_levels() {
        let p = |s: &str| s.split('/').map(str::to_string).collect::<Vec<_>>();
        let gpu = p("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0");
        let same_switch = p("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0");
        let deeper =
            p("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:02.0/0000:05:00.0/0000:06:00.0/0000:07:00.0");
        let host_bridge = p("pci0000:00/0000:00:03.0");
        let other_root = p("pci0000:80/0000:80:01.0");
        assert_eq!(
            pci_level(&gpu, Some(0), &same_switch, Some(0)),
            PcieLevel::Single
        );
        assert_eq!(
            pci_level(&gpu, Some(0), &deeper, Some(0)),
            PcieLevel::Multiple
        );
        assert_eq!(
            pci_level(&gpu, Some(0), &host_bridge, None),
            PcieLevel::HostBridge
        );
        assert_eq!(
            pci_level(&gpu, Some(0), &other_root, Some(0)),
            PcieLevel::Node
        );
        assert_eq!(
            pci_level(&gpu, Some(0), &other_root, Some(1)),
            PcieLevel::System
        );
        assert_eq!(pci_level(&[], None, &[], None), PcieLevel::System);
    }

    fn peer(gpu: u32, nvlinks: u32, p2p_nvlink: P2p) -> GpuPeer {
        GpuPeer {
            gpu,
            nvlinks,
            p2p_nvlink,
            p2p_read: P2p::Ok,
            pcie: Some(PcieLevel::System),
        }
    }

    #[test]
    fn nvlink_peers_direct_and_through_a_switch() {
        let mut topo = Topology::default();
        let mut a = gpu(0, Some(0), &[]);
        let mut b = gpu(1, Some(0), &[]);
        let mut c = gpu(2, Some(0), &[]);
        // 0-1 direct (4 links); 0-2 and 1-2 through NVSwitch (c has 18 switch links, a 6).
        a.nvswitch_links = 6;
        c.nvswitch_links = 18;
        a.peers = vec![peer(1, 4, P2p::Ok), peer(2, 0, P2p::Ok)];
        b.peers = vec![peer(0, 4, P2p::Ok), peer(2, 0, P2p::NotSupported)];
        c.peers = vec![peer(0, 0, P2p::Ok), peer(1, 0, P2p::NotSupported)];
        topo.gpus = vec![a, b, c];
        assert_eq!(topo.nvlink_peers(0), [(1, 4), (2, 6)]);
        assert_eq!(topo.nvlink_peers(1), [(0, 4)], "b has no switch links");
        assert_eq!(topo.nvlink_peers(2), [(0, 6)]);
        assert!(topo.nvlink_peers(9).is_empty());
        let text = topo.render();
        assert!(text.contains("gpus: 3 through"), "{text}");
        assert!(text.contains("GPU0  X     NV4   NV6"), "{text}");
        assert!(text.contains("GPU1  NV4   X     SYS"), "{text}");
        assert!(text.contains("nvlink GPU1x4 GPU2x6"), "{text}");
    }

    #[test]
    fn render_without_gpus_says_why() {
        let t = fixture();
        let mut topo = Topology::detect_with(&opts(&t.0));
        topo.no_gpus = Some("no NVIDIA driver (libnvidia-ml.so.1 not found)".into());
        let text = topo.render();
        assert!(
            text.starts_with("gpus: none (no NVIDIA driver (libnvidia-ml.so.1 not found))\n"),
            "{text}"
        );
        assert!(
            text.contains("numa: 2 nodes (sysfs), cpus online 0-15"),
            "{text}"
        );
        assert!(text.contains("node0: cpus 0-3,8-11 (8), 1.0 GiB"), "{text}");
        assert!(
            text.contains("mlx5_0 (rdma, ib0)  pci 0000:04:00.0  numa 0  cpus 0-3,8-11"),
            "{text}"
        );
        assert!(
            text.contains("eth0 (net)  pci 0000:00:03.0  numa -  cpus -"),
            "{text}"
        );
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn absent_nvml_is_a_reason_not_a_panic() {
        let t = fixture();
        let o = DetectOptions {
            nvml: true,
            nvml_lib: Some("libnvidia-ml-absent-for-a-test.so.1".into()),
            ..opts(&t.0)
        };
        let topo = Topology::detect_with(&o);
        assert!(topo.gpus.is_empty());
        assert_eq!(
            topo.no_gpus.as_deref(),
            Some("no NVIDIA driver (libnvidia-ml-absent-for-a-test.so.1 not found)")
        );
        assert!(topo.render().starts_with("gpus: none (no NVIDIA driver"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_the_build_says_so() {
        let topo = Topology::detect();
        assert!(topo.no_gpus.unwrap().contains("feature `cuda`"));
    }

    #[test]
    fn detect_on_this_machine_does_not_panic() {
        let topo = Topology::detect();
        assert!(!topo.numa_nodes.is_empty());
        assert!(!topo.online_cpus.is_empty());
        assert!(topo.gpus.is_empty() == topo.no_gpus.is_some(), "{topo:#?}");
        let text = topo.render();
        assert!(text.starts_with("gpus: "), "{text}");
        for g in &topo.gpus {
            assert!(!topo.nearest_cpus(g.index).is_empty());
        }
    }

    #[test]
    fn pinning_checks_its_input_and_pins() {
        assert!(pin_current_thread(&[]).unwrap_err().contains("no CPU"));
        assert!(pin_current_thread(&[MAX_CPUS])
            .unwrap_err()
            .contains("beyond"));
        // On a thread of its own, so the test harness thread keeps its affinity.
        std::thread::spawn(|| {
            let allowed = current_thread_cpus().unwrap();
            assert!(!allowed.is_empty());
            let one = allowed[allowed.len() - 1];
            pin_current_thread(&[one]).unwrap();
            assert_eq!(current_thread_cpus().unwrap(), [one]);
            // A CPU that does not exist: the kernel refuses, the message names it.
            let e = pin_current_thread(&[MAX_CPUS - 1]).unwrap_err();
            assert!(e.contains(&(MAX_CPUS - 1).to_string()), "{e}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn gpudirect_setting_parses() {
        assert_eq!(parse_gpudirect_setting(None), Ok(None));
        for on in ["", "1", "true", "ON", " yes "] {
            assert_eq!(parse_gpudirect_setting(Some(on)), Ok(None), "{on:?}");
        }
        for off in ["0", "false", "Off", "no"] {
            assert_eq!(
                parse_gpudirect_setting(Some(off)),
                Ok(Some(format!("BPS_GPUDIRECT={off}"))),
                "{off:?}"
            );
        }
        let e = parse_gpudirect_setting(Some("maybe")).unwrap_err();
        assert!(e.contains("BPS_GPUDIRECT") && e.contains("maybe"), "{e}");
    }

    #[test]
    fn gpudirect_inputs_on_this_machine() {
        // Without a GPU (CI, this build machine) export is refused with a reason; never a panic.
        if let Ok(inputs) = gpudirect_inputs(0) {
            if let Err(why) = &inputs.dmabuf_export {
                assert!(!why.is_empty());
            }
        }
    }
}
