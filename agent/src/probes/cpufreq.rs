//! `cpufreq`: the current clock of each CPU, tag `cpu` (`cpu0`, `cpu1`, ...), field `cur_freq_mhz` (u64).
//!
//! Linux: `/sys/devices/system/cpu/cpuN/cpufreq/scaling_cur_freq` (kHz), listed once at start-up; without cpufreq
//! in sysfs (most VMs) the `cpu MHz` lines of `/proc/cpuinfo`, as sysinfo does. Elsewhere sysinfo's
//! `Cpu::frequency`. A CPU reporting 0 is skipped, so a host without any frequency source has no `cpufreq` points.

use damselfly_proto::v1::Point;

use super::{point, u64_field};

fn freq_point(cpu: &str, mhz: u64, now: i64) -> Point {
    point(
        "cpufreq",
        &[("cpu", cpu)],
        vec![u64_field("cur_freq_mhz", mhz)],
        now,
    )
}

#[cfg(target_os = "linux")]
pub(super) use linux::CpuFreqProbe;
#[cfg(not(target_os = "linux"))]
pub(super) use other::CpuFreqProbe;

#[cfg(target_os = "linux")]
mod linux {
    use std::path::PathBuf;

    use damselfly_proto::v1::Point;

    use super::super::procfs;
    use super::freq_point;

    /// Where the frequencies come from, decided once by [`CpuFreqProbe::init`].
    #[derive(Debug, Default)]
    pub(in super::super) struct CpuFreqProbe {
        /// `(cpu tag, scaling_cur_freq path)` per CPU, in CPU order.
        sysfs: Vec<(String, PathBuf)>,
        /// No cpufreq in sysfs: read `/proc/cpuinfo`.
        cpuinfo: bool,
        buf: String,
    }

    impl CpuFreqProbe {
        /// Lists the CPUs that have a cpufreq driver.
        pub(in super::super) fn init(&mut self, _sys: &mut sysinfo::System) {
            let mut found: Vec<(u32, String, PathBuf)> = Vec::new();
            if let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu") {
                for entry in dir.flatten() {
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    let Some(index) = cpu_index(name) else {
                        continue;
                    };
                    let path = entry.path().join("cpufreq/scaling_cur_freq");
                    if path.exists() {
                        found.push((index, name.to_owned(), path));
                    }
                }
            }
            found.sort_by_key(|(i, _, _)| *i);
            self.sysfs = found.into_iter().map(|(_, n, p)| (n, p)).collect();
            self.cpuinfo = self.sysfs.is_empty();
        }

        pub(in super::super) fn collect(
            &mut self,
            _sys: &mut sysinfo::System,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            if self.cpuinfo {
                if procfs::read_into("/proc/cpuinfo", &mut self.buf) {
                    for (cpu, mhz) in parse_cpuinfo_mhz(&self.buf) {
                        if mhz > 0 {
                            points.push(freq_point(&format!("cpu{cpu}"), mhz, now));
                        }
                    }
                }
                return;
            }
            for (cpu, path) in &self.sysfs {
                match procfs::read_u64(path) {
                    Some(khz) if khz >= 500 => {
                        points.push(freq_point(cpu, (khz + 500) / 1000, now));
                    }
                    _ => {}
                }
            }
        }
    }

    /// `N` of a `cpuN` directory name.
    pub(super) fn cpu_index(name: &str) -> Option<u32> {
        let digits = name.strip_prefix("cpu")?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    /// `(processor, MHz rounded)` pairs from `/proc/cpuinfo`: each `cpu MHz` line belongs to the `processor` line
    /// before it. Malformed lines and a `cpu MHz` without a processor are skipped.
    pub(super) fn parse_cpuinfo_mhz(text: &str) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        let mut processor: Option<u32> = None;
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim() {
                "processor" => processor = value.trim().parse().ok(),
                "cpu MHz" => {
                    let mhz = value.trim().parse::<f64>().ok().filter(|v| v.is_finite());
                    if let (Some(p), Some(mhz)) = (processor.take(), mhz)
                        && (0.5..1.0e7).contains(&mhz)
                    {
                        out.push((p, mhz.round() as u64));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use damselfly_proto::v1::Point;
    use sysinfo::{CpuRefreshKind, System};

    use super::freq_point;

    #[derive(Debug, Default)]
    pub(in super::super) struct CpuFreqProbe {}

    impl CpuFreqProbe {
        pub(in super::super) fn init(&mut self, sys: &mut System) {
            if sys.cpus().is_empty() {
                sys.refresh_cpu_list(CpuRefreshKind::nothing());
            }
        }

        pub(in super::super) fn collect(
            &mut self,
            sys: &mut System,
            now: i64,
            points: &mut Vec<Point>,
        ) {
            sys.refresh_cpu_frequency();
            for (i, cpu) in sys.cpus().iter().enumerate() {
                let mhz = cpu.frequency();
                if mhz > 0 {
                    points.push(freq_point(&format!("cpu{i}"), mhz, now));
                }
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::*;

    #[test]
    fn cpu_dirs() {
        assert_eq!(cpu_index("cpu0"), Some(0));
        assert_eq!(cpu_index("cpu17"), Some(17));
        for bad in [
            "cpu",
            "cpufreq",
            "cpuidle",
            "cpu1a",
            "cpu-1",
            "cpu99999999999",
            "node0",
        ] {
            assert_eq!(cpu_index(bad), None, "{bad}");
        }
    }

    #[test]
    fn cpuinfo_mhz_pairs() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: 2596.142\n\n\
                    processor\t: 1\ncpu MHz\t\t: 800.5\n\n\
                    processor\t: 2\ncpu MHz\t\t: garbage\n\n\
                    cpu MHz\t\t: 1234\n\
                    processor\t: x\ncpu MHz\t\t: 1000\n\
                    processor\t: 4\ncpu MHz\t\t: NaN\n\
                    processor\t: 5\ncpu MHz\t\t: -3\n\
                    processor : 6\n";
        assert_eq!(parse_cpuinfo_mhz(text), vec![(0, 2596), (1, 801)]);
        assert!(parse_cpuinfo_mhz("").is_empty());
        // arm64 has no MHz lines at all.
        assert!(parse_cpuinfo_mhz("processor\t: 0\nBogoMIPS\t: 50.00\n").is_empty());
    }
}
