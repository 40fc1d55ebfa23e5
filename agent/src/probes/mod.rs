//! Probes: one file per measurement, each turning the host's current state into [`Point`]s.
//!
//! [`Probes`] keeps the sysinfo handles and the previous CPU sample between rounds (CPU percentages are deltas);
//! [`Probes::collect`] stamps every point of one round with the same collection time. Probes never fail a round:
//! a source that cannot be read is skipped with a debug log, so one broken file does not cost all metrics.

mod cpu;
mod disk;
mod mem;
mod net;
mod system;

use damselfly_proto::v1::{Field, Point, Tag, field};

/// The measurements every round produces (cpu may be absent on a round with no CPU time elapsed).
pub const MEASUREMENTS: [&str; 5] = ["cpu", "mem", "disk", "net", "system"];

/// Why the probes could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot initialise {what}: {source}")]
pub struct ProbeError {
    what: &'static str,
    source: sysinfo::Error,
}

/// The probes' state between rounds.
pub struct Probes {
    sys: sysinfo::System,
    disks: sysinfo::Disks,
    networks: sysinfo::Networks,
    cpu: cpu::CpuProbe,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes").finish_non_exhaustive()
    }
}

impl Probes {
    /// Opens the sysinfo handles and takes the first CPU sample (so the first round already has a delta).
    pub fn new() -> Result<Self, ProbeError> {
        let sys = sysinfo::System::new().map_err(|source| ProbeError {
            what: "system",
            source,
        })?;
        let disks = sysinfo::Disks::new().map_err(|source| ProbeError {
            what: "disks",
            source,
        })?;
        let networks = sysinfo::Networks::new().map_err(|source| ProbeError {
            what: "networks",
            source,
        })?;
        let mut probes = Self {
            sys,
            disks,
            networks,
            cpu: cpu::CpuProbe::default(),
        };
        probes.cpu.prime(&mut probes.sys);
        Ok(probes)
    }

    /// One round: every measurement, stamped with the time the round started. Blocking (reads /proc and /sys and,
    /// on the very first round, may wait up to 200 ms for a CPU delta): call it from a blocking thread.
    pub fn collect(&mut self) -> Vec<Point> {
        let now = now_unix_nano();
        let mut points = Vec::with_capacity(64);
        points.extend(self.cpu.collect(&mut self.sys, now));
        points.extend(mem::collect(&mut self.sys, now));
        points.extend(disk::collect(&mut self.disks, now));
        points.extend(net::collect(&mut self.networks, now));
        points.extend(system::collect(&mut self.sys, now));
        points
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
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn tag<'a>(p: &'a Point, key: &str) -> Option<&'a str> {
        p.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }

    fn fields(p: &Point) -> BTreeMap<&str, &field::Value> {
        p.fields
            .iter()
            .filter_map(|f| f.value.as_ref().map(|v| (f.key.as_str(), v)))
            .collect()
    }

    fn assert_f64(p: &Point, keys: &[&str]) {
        let f = fields(p);
        for k in keys {
            match f.get(k) {
                Some(field::Value::F64(v)) => assert!(v.is_finite(), "{}.{k} = {v}", p.measurement),
                other => panic!("{}.{k}: expected f64, got {other:?}", p.measurement),
            }
        }
    }

    fn assert_u64(p: &Point, keys: &[&str]) {
        let f = fields(p);
        for k in keys {
            assert!(
                matches!(f.get(k), Some(field::Value::U64(_))),
                "{}.{k}: expected u64, got {:?}",
                p.measurement,
                f.get(k)
            );
        }
    }

    #[test]
    fn one_round_has_every_measurement_with_right_shapes() {
        let mut probes = Probes::new().expect("probes");
        let points = probes.collect();
        let measurements: BTreeSet<&str> = points.iter().map(|p| p.measurement.as_str()).collect();
        for m in MEASUREMENTS {
            assert!(measurements.contains(m), "missing {m}: {measurements:?}");
        }
        let t = points[0].time_unix_nano;
        assert!(t > 1_600_000_000_000_000_000);
        assert!(
            points.iter().all(|p| p.time_unix_nano == t),
            "one timestamp per round"
        );
        assert!(points.iter().all(|p| !p.fields.is_empty()));

        let cpu: Vec<&Point> = points.iter().filter(|p| p.measurement == "cpu").collect();
        let cpu_tags: BTreeSet<&str> = cpu.iter().filter_map(|p| tag(p, "cpu")).collect();
        assert!(
            cpu_tags.contains("cpu-total") && cpu_tags.contains("cpu0"),
            "{cpu_tags:?}"
        );
        for p in &cpu {
            assert_f64(p, &["usage_percent", "usage_idle"]);
            #[cfg(target_os = "linux")]
            assert_f64(
                p,
                &[
                    "usage_user",
                    "usage_system",
                    "usage_nice",
                    "usage_iowait",
                    "usage_irq",
                    "usage_softirq",
                    "usage_steal",
                    "usage_guest",
                    "usage_guest_nice",
                ],
            );
            for f in &p.fields {
                if let Some(field::Value::F64(v)) = f.value {
                    assert!((0.0..=100.0).contains(&v), "{} = {v}", f.key);
                }
            }
        }

        let mem: Vec<&Point> = points.iter().filter(|p| p.measurement == "mem").collect();
        assert_eq!(mem.len(), 1);
        assert_u64(mem[0], &["total", "used", "free", "available"]);
        assert_f64(mem[0], &["used_percent"]);
        #[cfg(target_os = "linux")]
        assert_u64(mem[0], &["buffered", "cached"]);

        let disks: Vec<&Point> = points.iter().filter(|p| p.measurement == "disk").collect();
        assert!(!disks.is_empty());
        for d in &disks {
            for k in ["path", "device", "fstype"] {
                assert!(tag(d, k).is_some(), "disk without {k}: {d:?}");
            }
            assert_u64(d, &["total", "used", "free"]);
            assert_f64(d, &["used_percent"]);
        }
        assert!(
            disks.iter().any(|d| tag(d, "path") == Some("/")),
            "no / disk"
        );

        let nets: Vec<&Point> = points.iter().filter(|p| p.measurement == "net").collect();
        let lo = nets
            .iter()
            .find(|p| tag(p, "interface") == Some("lo"))
            .expect("net has lo");
        assert_u64(
            lo,
            &[
                "bytes_sent",
                "bytes_recv",
                "packets_sent",
                "packets_recv",
                "err_in",
                "err_out",
            ],
        );
        #[cfg(target_os = "linux")]
        assert_u64(lo, &["drop_in", "drop_out"]);

        let sys: Vec<&Point> = points
            .iter()
            .filter(|p| p.measurement == "system")
            .collect();
        assert_eq!(sys.len(), 1);
        assert_f64(sys[0], &["load1", "load5", "load15"]);
        assert_u64(sys[0], &["uptime", "n_cpus"]);
        let f = fields(sys[0]);
        let Some(field::Value::U64(n)) = f.get("n_cpus") else {
            panic!("n_cpus")
        };
        // cpu-total plus one point per CPU.
        assert_eq!(cpu.len() as u64, n + 1);

        // The second round works from the stored state too.
        let again = probes.collect();
        assert!(again.iter().any(|p| p.measurement == "cpu"));
        assert!(again[0].time_unix_nano >= t);
    }
}
