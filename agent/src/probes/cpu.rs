//! `cpu`: per-CPU and total utilisation in percent over the last interval, Telegraf's field names.
//!
//! On Linux the percentages come from deltas of the jiffy counters in `/proc/stat`, computed like Telegraf's cpu
//! input (guest time is part of user time in the kernel's counters, so it is subtracted from `usage_user` and
//! reported on its own). Elsewhere sysinfo's per-CPU usage gives `usage_percent` and `usage_idle` only.

use std::time::{Duration, Instant};

use damselfly_proto::v1::Point;

use super::{f64_field, point};

/// Shortest window a CPU percentage is computed over: the first round after start-up waits until this much time has
/// passed since [`CpuProbe::prime`], so `--once` reports real numbers rather than skipping cpu.
const MIN_SAMPLE: Duration = Duration::from_millis(200);

/// Keeps the previous sample between rounds.
#[derive(Debug, Default)]
pub(super) struct CpuProbe {
    #[cfg(target_os = "linux")]
    prev: Option<(Instant, Vec<linux::CpuTimes>)>,
    #[cfg(not(target_os = "linux"))]
    primed_at: Option<Instant>,
}

/// Sleeps until `MIN_SAMPLE` has passed since `since`.
#[cfg(target_os = "linux")]
fn wait_min_sample(since: Instant) {
    let elapsed = since.elapsed();
    if elapsed < MIN_SAMPLE {
        std::thread::sleep(MIN_SAMPLE - elapsed);
    }
}

#[cfg(target_os = "linux")]
impl CpuProbe {
    /// Takes the baseline sample.
    pub(super) fn prime(&mut self, _sys: &mut sysinfo::System) {
        self.prev = linux::read_proc_stat().map(|s| (Instant::now(), s));
    }

    /// Percentages since the previous call (or since [`Self::prime`]).
    pub(super) fn collect(&mut self, sys: &mut sysinfo::System, now: i64) -> Vec<Point> {
        if self.prev.is_none() {
            self.prime(sys);
        }
        let Some((at, prev)) = self.prev.take() else {
            return Vec::new();
        };
        wait_min_sample(at);
        let Some(cur) = linux::read_proc_stat() else {
            // Keep the old baseline: the next round gets a longer, still valid window.
            self.prev = Some((at, prev));
            return Vec::new();
        };
        let points = cur
            .iter()
            .filter_map(|c| {
                let p = prev.iter().find(|p| p.name == c.name)?;
                let fields = linux::usage_fields(p, c)?;
                Some(point("cpu", &[("cpu", c.tag())], fields, now))
            })
            .collect();
        self.prev = Some((Instant::now(), cur));
        points
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use damselfly_proto::v1::Field;

    use super::f64_field;

    /// One line of `/proc/stat`: `cpu` or `cpuN` followed by jiffy counters.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) struct CpuTimes {
        /// `cpu` for the total, `cpuN` for one CPU.
        pub(super) name: String,
        /// user nice system idle iowait irq softirq steal guest guest_nice (missing columns on old kernels are 0).
        pub(super) t: [u64; 10],
    }

    impl CpuTimes {
        /// The `cpu` tag value: Telegraf calls the total `cpu-total`.
        pub(super) fn tag(&self) -> &str {
            if self.name == "cpu" {
                "cpu-total"
            } else {
                &self.name
            }
        }
    }

    pub(super) fn read_proc_stat() -> Option<Vec<CpuTimes>> {
        match std::fs::read_to_string("/proc/stat") {
            Ok(text) => Some(parse_proc_stat(&text)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read /proc/stat");
                None
            }
        }
    }

    pub(super) fn parse_proc_stat(text: &str) -> Vec<CpuTimes> {
        text.lines()
            .filter(|l| l.starts_with("cpu"))
            .filter_map(|line| {
                let mut parts = line.split_ascii_whitespace();
                let name = parts.next()?.to_owned();
                let mut t = [0u64; 10];
                for (slot, v) in t.iter_mut().zip(parts) {
                    *slot = v.parse().ok()?;
                }
                Some(CpuTimes { name, t })
            })
            .collect()
    }

    /// Telegraf's cpu fields from two samples; `None` when no time passed (nothing to divide by).
    pub(super) fn usage_fields(prev: &CpuTimes, cur: &CpuTimes) -> Option<Vec<Field>> {
        // Counters can step back (CPU hot-unplug, virtualisation quirks): clamp deltas at 0.
        let d: Vec<u64> = cur
            .t
            .iter()
            .zip(prev.t.iter())
            .map(|(c, p)| c.saturating_sub(*p))
            .collect();
        let [
            user,
            nice,
            system,
            idle,
            iowait,
            irq,
            softirq,
            steal,
            guest,
            guest_nice,
        ] = d[..]
        else {
            return None;
        };
        // Guest time is already inside user and nice, so it is not added again.
        let total = user + nice + system + idle + iowait + irq + softirq + steal;
        if total == 0 {
            return None;
        }
        let pct = |v: u64| (100.0 * v as f64 / total as f64).clamp(0.0, 100.0);
        Some(vec![
            f64_field("usage_user", pct(user.saturating_sub(guest))),
            f64_field("usage_system", pct(system)),
            f64_field("usage_idle", pct(idle)),
            f64_field("usage_nice", pct(nice.saturating_sub(guest_nice))),
            f64_field("usage_iowait", pct(iowait)),
            f64_field("usage_irq", pct(irq)),
            f64_field("usage_softirq", pct(softirq)),
            f64_field("usage_steal", pct(steal)),
            f64_field("usage_guest", pct(guest)),
            f64_field("usage_guest_nice", pct(guest_nice)),
            // Busy = neither idle nor waiting for I/O.
            f64_field("usage_percent", pct(total - idle - iowait)),
        ])
    }
}

#[cfg(not(target_os = "linux"))]
impl CpuProbe {
    /// Takes the baseline sample.
    pub(super) fn prime(&mut self, sys: &mut sysinfo::System) {
        sys.refresh_cpu_usage();
        self.primed_at = Some(Instant::now());
    }

    /// sysinfo's usage since the previous refresh.
    pub(super) fn collect(&mut self, sys: &mut sysinfo::System, now: i64) -> Vec<Point> {
        if self.primed_at.is_none() {
            self.prime(sys);
        }
        if let Some(at) = self.primed_at {
            // sysinfo needs its own minimum between two refreshes for a meaningful delta.
            let window = MIN_SAMPLE.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
            let elapsed = at.elapsed();
            if elapsed < window {
                std::thread::sleep(window - elapsed);
            }
        }
        self.primed_at = Some(Instant::now());
        sys.refresh_cpu_usage();
        let fields = |usage: f32| {
            let busy = f64::from(usage).clamp(0.0, 100.0);
            vec![
                f64_field("usage_percent", busy),
                f64_field("usage_idle", 100.0 - busy),
            ]
        };
        let mut points = vec![point(
            "cpu",
            &[("cpu", "cpu-total")],
            fields(sys.global_cpu_usage()),
            now,
        )];
        for (i, cpu) in sys.cpus().iter().enumerate() {
            let name = format!("cpu{i}");
            points.push(point("cpu", &[("cpu", &name)], fields(cpu.usage()), now));
        }
        points
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::*;
    use damselfly_proto::v1::field::Value;

    fn get(fields: &[damselfly_proto::v1::Field], key: &str) -> f64 {
        match fields
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.value.clone())
        {
            Some(Value::F64(v)) => v,
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn telegraf_formulas() {
        let a = parse_proc_stat(
            "cpu  100 10 50 800 20 5 5 10 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2\n",
        );
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].tag(), "cpu-total");
        assert_eq!(a[1].tag(), "cpu0");
        // Deltas: user 60 (of which guest 20), nice 0, system 20, idle 100, iowait 10, irq 5, softirq 5, steal 0.
        let b = parse_proc_stat("cpu  160 10 70 900 30 10 10 10 20 0\n");
        let f = usage_fields(&a[0], &b[0]).expect("fields");
        // total = 60 + 0 + 20 + 100 + 10 + 5 + 5 + 0 = 200
        assert_eq!(get(&f, "usage_user"), 20.0);
        assert_eq!(get(&f, "usage_guest"), 10.0);
        assert_eq!(get(&f, "usage_system"), 10.0);
        assert_eq!(get(&f, "usage_idle"), 50.0);
        assert_eq!(get(&f, "usage_iowait"), 5.0);
        assert_eq!(get(&f, "usage_percent"), 45.0);
        assert!(usage_fields(&a[0], &a[0]).is_none(), "no time passed");
    }

    #[test]
    fn short_lines_from_old_kernels_parse() {
        let a = parse_proc_stat("cpu 1 2 3 4\n");
        assert_eq!(a[0].t, [1, 2, 3, 4, 0, 0, 0, 0, 0, 0]);
    }
}
