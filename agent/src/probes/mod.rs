//! Probes: one file per measurement, each turning the host's current state into [`Point`]s.
//!
//! [`Probes`] keeps what must survive between rounds (the previous CPU and per-process samples, the cpufreq file
//! list, sysinfo handles where sysinfo is the source); [`Probes::collect`] stamps every point of one round with the
//! same collection time. Probes never fail a round: a source that cannot be read is skipped with a debug log, so one
//! broken file does not cost all metrics.
//!
//! Measurements and their sources (field names follow Telegraf's inputs where Telegraf has them; counters stay
//! cumulative u64 counters, gauges are f64 or u64):
//!
//! | measurement    | tags                             | Linux source                                           | elsewhere           |
//! |----------------|----------------------------------|--------------------------------------------------------|---------------------|
//! | `cpu`          | `cpu` (`cpu0`.., `cpu-total`)    | `/proc/stat` deltas                                    | sysinfo             |
//! | `cpufreq`      | `cpu`                            | `/sys/.../cpufreq/scaling_cur_freq` or `/proc/cpuinfo` | sysinfo             |
//! | `mem`          |                                  | `/proc/meminfo`                                        | sysinfo             |
//! | `swap`         |                                  | `/proc/meminfo`, `/proc/vmstat`                        | sysinfo             |
//! | `disk`         | `path`, `device`, `fstype`       | `/proc/self/mounts` + statvfs                          | sysinfo (+ statvfs) |
//! | `diskio`       | `name`                           | `/proc/diskstats`                                      | sysinfo, bytes only |
//! | `net`          | `interface`                      | `/proc/net/dev`                                        | sysinfo             |
//! | `system`       |                                  | `/proc/loadavg`, `/proc/uptime`, utmp                  | sysinfo             |
//! | `processes`    |                                  | `/proc/[pid]/stat`                                     | sysinfo             |
//! | `procstat_top` | `pid`, `process_name`, `rank_by` | `/proc/[pid]/stat` (the `processes` scan)              | sysinfo             |
//!
//! A measurement that is not enabled in [`ProbeOptions`] costs nothing: its files are not read and its sysinfo
//! handles are not refreshed (or not even created).

mod cpu;
mod cpufreq;
mod disk;
mod diskio;
mod facts;
mod mem;
mod net;
mod processes;
#[cfg(target_os = "linux")]
mod procfs;
mod system;

use std::collections::BTreeSet;

use damselfly_proto::v1::{Field, Point, Tag, field};

pub use facts::{HostFacts, host_facts};

/// The measurements every round of the default options produces on every OS (cpu may be absent on a round with no
/// CPU time elapsed). [`ALL_MEASUREMENTS`] lists every measurement the agent knows.
pub const MEASUREMENTS: [&str; 5] = ["cpu", "mem", "disk", "net", "system"];

/// Every measurement the probes can produce, in collection order.
pub const ALL_MEASUREMENTS: [&str; 10] = [
    "cpu",
    "cpufreq",
    "mem",
    "swap",
    "disk",
    "diskio",
    "net",
    "system",
    "processes",
    "procstat_top",
];

/// How many processes `procstat_top` reports per ranking by default.
pub const DEFAULT_TOP_N: usize = 5;

/// Which measurements to collect and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOptions {
    /// The measurements to collect, names from [`ALL_MEASUREMENTS`].
    pub measurements: BTreeSet<String>,
    /// `procstat_top`: how many processes to report by CPU and how many by memory (a process in both lists is one
    /// row). 0 reports none.
    pub top_n: usize,
}

impl Default for ProbeOptions {
    /// Every measurement, top 5.
    fn default() -> Self {
        Self {
            measurements: ALL_MEASUREMENTS.iter().map(|m| (*m).to_owned()).collect(),
            top_n: DEFAULT_TOP_N,
        }
    }
}

/// Checks that every name is one of [`ALL_MEASUREMENTS`]; the error names the first unknown one and lists the
/// known ones.
pub fn validate_measurements<I, S>(names: I) -> Result<(), String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    for name in names {
        let name = name.as_ref();
        if !ALL_MEASUREMENTS.contains(&name) {
            return Err(format!(
                "unknown measurement {name:?} (known: {})",
                ALL_MEASUREMENTS.join(", ")
            ));
        }
    }
    Ok(())
}

/// Why the probes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A sysinfo handle could not be created.
    #[error("cannot initialise {what}: {source}")]
    Init {
        /// Which handle.
        what: &'static str,
        /// sysinfo's error.
        source: sysinfo::Error,
    },
    /// [`ProbeOptions::measurements`] names a measurement the agent does not know.
    #[error("{0}")]
    UnknownMeasurement(String),
}

/// Which probes run.
#[derive(Debug, Clone, Copy, Default)]
struct Enabled {
    cpu: bool,
    cpufreq: bool,
    mem: bool,
    swap: bool,
    disk: bool,
    diskio: bool,
    net: bool,
    system: bool,
    processes: bool,
    procstat_top: bool,
}

impl Enabled {
    fn from_names(names: &BTreeSet<String>, top_n: usize) -> Self {
        let on = |m: &str| names.contains(m);
        Self {
            cpu: on("cpu"),
            cpufreq: on("cpufreq"),
            mem: on("mem"),
            swap: on("swap"),
            disk: on("disk"),
            diskio: on("diskio"),
            net: on("net"),
            system: on("system"),
            processes: on("processes"),
            procstat_top: on("procstat_top") && top_n > 0,
        }
    }
}

/// The probes' state between rounds.
pub struct Probes {
    on: Enabled,
    top_n: usize,
    sys: sysinfo::System,
    cpu: cpu::CpuProbe,
    cpufreq: cpufreq::CpuFreqProbe,
    disk: disk::DiskProbe,
    diskio: diskio::DiskIoProbe,
    net: net::NetProbe,
    procs: processes::ProcessProbe,
    /// sysinfo's disk list, shared by `disk` and `diskio` (only where sysinfo is their source, only if enabled).
    #[cfg(not(target_os = "linux"))]
    disks: Option<sysinfo::Disks>,
    /// Scratch buffer for reading /proc files, reused across reads and rounds.
    #[cfg(target_os = "linux")]
    buf: String,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("enabled", &self.on)
            .field("top_n", &self.top_n)
            .finish_non_exhaustive()
    }
}

impl Probes {
    /// Every measurement with the default options (see [`ProbeOptions::default`]).
    pub fn new() -> Result<Self, ProbeError> {
        Self::with_options(ProbeOptions::default())
    }

    /// Sets up the enabled probes and takes the baseline samples of the delta-based ones (cpu, procstat_top), so
    /// the first round already reports real percentages.
    pub fn with_options(options: ProbeOptions) -> Result<Self, ProbeError> {
        validate_measurements(&options.measurements).map_err(ProbeError::UnknownMeasurement)?;
        let on = Enabled::from_names(&options.measurements, options.top_n);
        let init = |what| move |source| ProbeError::Init { what, source };
        let sys = sysinfo::System::new().map_err(init("system"))?;
        #[cfg(not(target_os = "linux"))]
        let disks = if on.disk || on.diskio {
            Some(sysinfo::Disks::new().map_err(init("disks"))?)
        } else {
            None
        };
        let net = if on.net {
            net::NetProbe::new().map_err(init("networks"))?
        } else {
            net::NetProbe::default()
        };
        let mut probes = Self {
            on,
            top_n: options.top_n,
            sys,
            cpu: cpu::CpuProbe::default(),
            cpufreq: cpufreq::CpuFreqProbe::default(),
            disk: disk::DiskProbe::default(),
            diskio: diskio::DiskIoProbe::default(),
            net,
            procs: processes::ProcessProbe::default(),
            #[cfg(not(target_os = "linux"))]
            disks,
            #[cfg(target_os = "linux")]
            buf: String::with_capacity(16 * 1024),
        };
        if on.cpu {
            probes.cpu.prime(&mut probes.sys);
        }
        if on.cpufreq {
            probes.cpufreq.init(&mut probes.sys);
        }
        if on.disk {
            probes.disk.init();
        }
        if on.procstat_top {
            probes.prime_processes();
        }
        Ok(probes)
    }

    /// The enabled measurements, in collection order.
    pub fn measurements(&self) -> Vec<&'static str> {
        let on = self.on;
        let flags = [
            on.cpu,
            on.cpufreq,
            on.mem,
            on.swap,
            on.disk,
            on.diskio,
            on.net,
            on.system,
            on.processes,
            on.procstat_top,
        ];
        ALL_MEASUREMENTS
            .iter()
            .zip(flags)
            .filter_map(|(m, f)| f.then_some(*m))
            .collect()
    }

    /// One round: every enabled measurement, stamped with the time the round started. Blocking (reads /proc and
    /// /sys and, on the very first round, may wait up to 200 ms for a CPU delta): call it from a blocking thread.
    pub fn collect(&mut self) -> Vec<Point> {
        let now = now_unix_nano();
        let on = self.on;
        let mut points = Vec::with_capacity(64);
        if on.cpu {
            points.extend(self.cpu.collect(&mut self.sys, now));
        }
        if on.cpufreq {
            self.cpufreq.collect(&mut self.sys, now, &mut points);
        }
        self.collect_platform(now, &mut points);
        points
    }

    #[cfg(target_os = "linux")]
    fn prime_processes(&mut self) {
        self.procs.scan(true);
    }

    #[cfg(target_os = "linux")]
    fn collect_platform(&mut self, now: i64, points: &mut Vec<Point>) {
        let on = self.on;
        let mut mem_total = 0;
        if (on.mem || on.swap || on.procstat_top)
            && procfs::read_into("/proc/meminfo", &mut self.buf)
        {
            let info = mem::Meminfo::parse(&self.buf);
            mem_total = info.total;
            if on.mem {
                points.extend(mem::mem_point(&info, now));
            }
            if on.swap {
                let vmstat = if procfs::read_into("/proc/vmstat", &mut self.buf) {
                    mem::parse_vmstat_swap(&self.buf)
                } else {
                    mem::SwapPages::default()
                };
                points.push(mem::swap_point(&info, vmstat, now));
            }
        }
        if on.disk {
            self.disk.collect(&mut self.buf, now, points);
        }
        if on.diskio {
            self.diskio.collect(&mut self.buf, now, points);
        }
        if on.net {
            self.net.collect(&mut self.buf, now, points);
        }
        if on.system {
            points.extend(system::collect(&mut self.sys, now));
        }
        if on.processes || on.procstat_top {
            self.procs.scan(on.procstat_top);
            if on.processes {
                points.extend(self.procs.counts_point(now));
            }
            if on.procstat_top {
                self.procs
                    .top(&mut self.buf, self.top_n, mem_total, now, points);
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn prime_processes(&mut self) {
        self.procs.refresh(&mut self.sys, true);
    }

    #[cfg(not(target_os = "linux"))]
    fn collect_platform(&mut self, now: i64, points: &mut Vec<Point>) {
        let on = self.on;
        if on.mem || on.swap || on.procstat_top {
            let kind = sysinfo::MemoryRefreshKind::nothing();
            let kind = if on.mem || on.procstat_top {
                kind.with_ram()
            } else {
                kind
            };
            // `mem` carries swap_total and swap_free too, like Telegraf's.
            let kind = if on.mem || on.swap {
                kind.with_swap()
            } else {
                kind
            };
            self.sys.refresh_memory_specifics(kind);
            if on.mem {
                points.extend(mem::mem_point(&self.sys, now));
            }
            if on.swap {
                points.push(mem::swap_point(&self.sys, now));
            }
        }
        if let Some(disks) = self.disks.as_mut() {
            let kind = sysinfo::DiskRefreshKind::nothing();
            let kind = if on.disk { kind.with_storage() } else { kind };
            let kind = if on.diskio {
                kind.with_io_usage()
            } else {
                kind
            };
            // `true` follows mounts that come and go.
            disks.refresh_specifics(true, kind);
            if on.disk {
                self.disk.collect(disks, now, points);
            }
            if on.diskio {
                self.diskio.collect(disks, now, points);
            }
        }
        if on.net {
            self.net.collect(now, points);
        }
        if on.system {
            points.extend(system::collect(&mut self.sys, now));
        }
        if on.processes || on.procstat_top {
            self.procs.refresh(&mut self.sys, on.procstat_top);
            if on.processes {
                points.extend(self.procs.counts(&self.sys, now));
            }
            if on.procstat_top {
                self.procs.top(&self.sys, self.top_n, now, points);
            }
        }
    }
}

/// Nanoseconds since the Unix epoch (0 if the clock is before 1970, saturating in 2262).
pub fn now_unix_nano() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Builds a point; `tags` and `fields` keep their order.
fn point(
    measurement: &str,
    tags: &[(&str, &str)],
    fields: Vec<Field>,
    time_unix_nano: i64,
) -> Point {
    Point {
        measurement: measurement.to_owned(),
        tags: tags
            .iter()
            .map(|(k, v)| Tag {
                key: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        fields,
        time_unix_nano,
    }
}

fn f64_field(key: &str, v: f64) -> Field {
    Field {
        key: key.to_owned(),
        value: Some(field::Value::F64(v)),
    }
}

fn u64_field(key: &str, v: u64) -> Field {
    Field {
        key: key.to_owned(),
        value: Some(field::Value::U64(v)),
    }
}

/// `part / whole` in percent, 0 when `whole` is 0 (an empty disk is not NaN% full).
fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests;
