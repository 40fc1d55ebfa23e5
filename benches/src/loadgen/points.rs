//! Synthetic agent data: what one simulated VM would report, shaped like the real agent's probes (same
//! measurements, tag keys, field names and field types), so the collector sees realistic schemas and cardinality.
//!
//! A batch is a function of `(agent, seq, time)` only: the driver can drop a batch after sending it and rebuild it
//! byte for byte when it has to be resent (RETRY, broken stream). Values come from a small hash, not from an RNG
//! with state; counters grow monotonically with `seq`.

use damselfly_proto::columnar::{chunk_rows, column_len, points_to_chunks};
use damselfly_proto::v1::{Field, Point, TableChunk, Tag, WriteBatch, field::Value};

/// Cloud providers and two regions each; an agent's index picks one.
const CLOUDS: [(&str, [&str; 2]); 6] = [
    ("aws", ["ap-northeast-2", "us-east-1"]),
    ("gcp", ["asia-northeast3", "us-central1"]),
    ("azure", ["koreacentral", "eastus"]),
    ("alibaba", ["ap-southeast-1", "cn-hangzhou"]),
    ("tencent", ["ap-seoul", "na-ashburn"]),
    ("ncp", ["kr", "jp"]),
];

/// Mounted file systems of a simulated VM: path, device, fstype, size in GiB.
const DISKS: [(&str, &str, &str, u64); 3] = [
    ("/", "nvme0n1p1", "ext4", 30),
    ("/var", "nvme1n1", "xfs", 100),
    ("/data", "nvme2n1", "xfs", 500),
];

/// Network interfaces, in the order the agent reports them (sorted by name).
const INTERFACES: [&str; 2] = ["eth0", "lo"];

/// Spacing of successive collection rounds inside one batch, nanoseconds. Rounds in a batch are the agent's
/// "catch-up" case (several rounds queued up); keeping them 1 µs apart keeps every series' timestamps strictly
/// increasing without drifting away from the wall clock.
pub const ROUND_SPACING_NS: i64 = 1_000;

const CPU_FIELDS: [&str; 11] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
    "usage_percent",
];

const GIB: u64 = 1 << 30;

/// Points in one collection round of a VM with `n_cpus` CPUs.
const fn round_len(n_cpus: usize) -> usize {
    n_cpus + 1 + 1 + DISKS.len() + INTERFACES.len() + 1
}

/// Generates the batches of one simulated agent.
#[derive(Debug, Clone)]
pub struct PointGen {
    agent_id: String,
    common_tags: Vec<Tag>,
    n_cpus: usize,
    mem_total: u64,
    /// Average CPU load of this VM, 0..1.
    load: f64,
    seed: u64,
    points_per_batch: usize,
    /// Send rows as columnar chunks (`WriteBatch.chunks`) instead of points.
    columnar: bool,
    /// Columnar mode: the chunks of batch 1 at time 0, built once; later batches copy it and vary the values, so
    /// that generating load costs a few nanoseconds per value and the collector, not the generator, is measured.
    template: std::sync::OnceLock<Vec<TableChunk>>,
}

impl PointGen {
    /// Agent number `index` of run `run`; `points_per_batch` 0 means one collection round per batch (what a real
    /// agent sends every interval: 10-24 points, depending on the VM's CPUs).
    pub fn new(run: &str, index: usize, points_per_batch: usize) -> Self {
        let agent_id = format!("loadgen-{run}-{index}");
        let (csp, regions) = CLOUDS[index % CLOUDS.len()];
        let region = regions[(index / CLOUDS.len()) % regions.len()];
        let zone = format!("{region}-{}", ['a', 'b', 'c'][index % 3]);
        let n_cpus = [2usize, 4, 8, 16][index % 4];
        let seed = mix(fnv1a(agent_id.as_bytes()));
        let common = [
            ("ns_id", "ns-loadgen".to_owned()),
            ("mcis_id", format!("mcis-{run}-{:03}", index / 10)),
            ("vm_id", format!("vm-{run}-{index:05}")),
            ("csp", csp.to_owned()),
            ("region", region.to_owned()),
            ("zone", zone),
            ("hostname", format!("lg-{run}-{index:05}")),
            ("os_type", "linux".to_owned()),
            ("agent_id", agent_id.clone()),
        ];
        Self {
            common_tags: common.into_iter().map(|(k, v)| tag(k, &v)).collect(),
            agent_id,
            n_cpus,
            mem_total: n_cpus as u64 * 4 * GIB,
            load: 0.05 + 0.8 * unit(seed, 1),
            seed,
            points_per_batch: match points_per_batch {
                0 => round_len(n_cpus),
                n => n,
            },
            columnar: false,
            template: std::sync::OnceLock::new(),
        }
    }

    /// Builds columnar batches (`WriteBatch.chunks`, the native fast encoding) instead of points.
    pub fn columnar(mut self, columnar: bool) -> Self {
        self.columnar = columnar;
        self
    }

    /// The agent id every batch carries (`loadgen-<run>-<index>`).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Points in one collection round: cpu-total and one per CPU, mem, one per disk and interface, system.
    pub fn round_len(&self) -> usize {
        round_len(self.n_cpus)
    }

    /// Rounds a batch spans (the last one may be partial).
    pub fn rounds_per_batch(&self) -> usize {
        self.points_per_batch.div_ceil(self.round_len())
    }

    /// From the first to past the last timestamp of a batch, nanoseconds: the next batch must start at least this
    /// much later for timestamps to keep increasing.
    pub fn batch_time_span_ns(&self) -> i64 {
        self.rounds_per_batch() as i64 * ROUND_SPACING_NS
    }

    /// The batch with sequence number `seq` whose first round was collected at `time_unix_nano`. Deterministic.
    pub fn batch(&self, seq: u64, time_unix_nano: i64) -> WriteBatch {
        if self.columnar {
            return self.columnar_batch(seq, time_unix_nano);
        }
        self.point_batch(seq, time_unix_nano)
    }

    /// Columnar: batch 1's chunks with times shifted and values varied by `seq` (floats scaled by a hash in
    /// [0.9, 1.1), integers grown by `seq`: counters keep growing). Deterministic, like the point form.
    fn columnar_batch(&self, seq: u64, time_unix_nano: i64) -> WriteBatch {
        let template = self.template.get_or_init(|| {
            let points = self.point_batch(1, 0).points;
            points_to_chunks(&points).unwrap_or_default()
        });
        let mut chunks = template.clone();
        let salt = mix(self.seed ^ seq);
        for (c, chunk) in chunks.iter_mut().enumerate() {
            for t in &mut chunk.time_unix_nano {
                *t = t.saturating_add(time_unix_nano);
            }
            for (f, column) in chunk.fields.iter_mut().enumerate() {
                let column_salt = salt ^ ((c as u64) << 48 | (f as u64) << 32);
                for (i, v) in column.f64.iter_mut().enumerate() {
                    *v *= 0.9 + 0.2 * unit(column_salt, i as u64);
                }
                for v in &mut column.u64 {
                    *v = v.saturating_add(seq);
                }
                for v in &mut column.i64 {
                    *v = v.saturating_add(seq as i64);
                }
            }
        }
        WriteBatch {
            agent_id: self.agent_id.clone(),
            seq,
            common_tags: self.common_tags.clone(),
            points: Vec::new(),
            chunks,
        }
    }

    fn point_batch(&self, seq: u64, time_unix_nano: i64) -> WriteBatch {
        let round_len = self.round_len();
        let rounds = self.rounds_per_batch() as u64;
        let points = (0..self.points_per_batch)
            .map(|j| {
                let round = (j / round_len) as u64;
                // A virtual collection tick, monotonic across batches: drives counters and noise.
                let tick = seq
                    .saturating_sub(1)
                    .saturating_mul(rounds)
                    .saturating_add(round);
                let time = time_unix_nano.saturating_add(round as i64 * ROUND_SPACING_NS);
                self.point(j % round_len, tick, time)
            })
            .collect();
        WriteBatch {
            chunks: Vec::new(),
            agent_id: self.agent_id.clone(),
            seq,
            common_tags: self.common_tags.clone(),
            points,
        }
    }

    /// Point `slot` of a round.
    fn point(&self, slot: usize, tick: u64, time: i64) -> Point {
        let n = self.n_cpus;
        if slot <= n {
            let name = if slot == 0 {
                "cpu-total".to_owned()
            } else {
                format!("cpu{}", slot - 1)
            };
            return self.cpu(slot as u64, &name, tick, time);
        }
        let slot = slot - n - 1;
        if slot == 0 {
            return self.mem(tick, time);
        }
        let slot = slot - 1;
        if let Some(disk) = DISKS.get(slot) {
            return self.disk(slot as u64, *disk, tick, time);
        }
        let slot = slot - DISKS.len();
        if let Some(iface) = INTERFACES.get(slot) {
            return self.net(slot as u64, iface, tick, time);
        }
        self.system(tick, time)
    }

    fn noise(&self, series: u64, tick: u64, field: u64) -> f64 {
        unit(
            self.seed ^ series.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tick.rotate_left(17),
            field,
        )
    }

    fn cpu(&self, series: u64, name: &str, tick: u64, time: i64) -> Point {
        let busy = (self.load * 100.0 * (0.6 + 0.8 * self.noise(series, tick, 0))).min(99.0);
        let iowait = 2.0 * self.noise(series, tick, 1);
        let steal = 0.5 * self.noise(series, tick, 2);
        let irq = 0.2 * self.noise(series, tick, 3);
        let softirq = 0.8 * self.noise(series, tick, 4);
        let nice = 0.3 * self.noise(series, tick, 5);
        let system = busy * 0.25;
        let user = (busy - system - irq - softirq - nice - steal).max(0.0);
        let idle = (100.0 - busy - iowait).max(0.0);
        let values = [
            user,
            system,
            idle,
            nice,
            iowait,
            irq,
            softirq,
            steal,
            0.0,
            0.0,
            100.0 - idle - iowait,
        ];
        let fields = CPU_FIELDS
            .iter()
            .zip(values)
            .map(|(k, v)| f64_field(k, v))
            .collect();
        point("cpu", vec![tag("cpu", name)], fields, time)
    }

    fn mem(&self, tick: u64, time: i64) -> Point {
        let total = self.mem_total;
        let used_frac = (0.2 + 0.6 * self.load + 0.05 * self.noise(100, tick, 0)).min(0.95);
        let used = (total as f64 * used_frac) as u64;
        let cached = (total - used) / 2;
        let buffered = total / 64;
        let free = total - used - cached - buffered.min(total - used - cached);
        let fields = vec![
            u64_field("total", total),
            u64_field("used", used),
            u64_field("free", free),
            u64_field("available", total - used),
            f64_field("used_percent", used_frac * 100.0),
            u64_field("buffered", buffered),
            u64_field("cached", cached),
        ];
        point("mem", Vec::new(), fields, time)
    }

    fn disk(
        &self,
        series: u64,
        (path, device, fstype, gib): (&str, &str, &str, u64),
        tick: u64,
        time: i64,
    ) -> Point {
        let total = gib * GIB;
        // Fill grows by a few KiB per tick from a per-disk start, capped below full.
        let start = (total as f64 * (0.1 + 0.5 * unit(self.seed, 200 + series))) as u64;
        let used = start
            .saturating_add(tick.saturating_mul(4096))
            .min(total / 100 * 98);
        let free = total - used;
        let fields = vec![
            u64_field("total", total),
            u64_field("used", used),
            u64_field("free", free),
            f64_field("used_percent", used as f64 * 100.0 / total as f64),
        ];
        point(
            "disk",
            vec![
                tag("path", path),
                tag("device", device),
                tag("fstype", fstype),
            ],
            fields,
            time,
        )
    }

    fn net(&self, series: u64, iface: &str, tick: u64, time: i64) -> Point {
        // Counters: base + per-tick rate + jitter below the rate, so they never go backwards.
        let rate = if iface == "lo" {
            20_000
        } else {
            400_000 + (self.seed % 200_000)
        };
        let counter = |field: u64, per_tick: u64| {
            let per_tick = per_tick.max(1);
            let base = (unit(self.seed, 300 + series * 16 + field) * 1e9) as u64;
            let jitter = (self.noise(series + 300, tick, field) * per_tick as f64) as u64;
            base.saturating_add(tick.saturating_mul(per_tick))
                .saturating_add(jitter.min(per_tick - 1))
        };
        let fields = vec![
            u64_field("bytes_sent", counter(0, rate)),
            u64_field("bytes_recv", counter(1, rate * 3)),
            u64_field("packets_sent", counter(2, rate / 900)),
            u64_field("packets_recv", counter(3, rate * 3 / 900)),
            u64_field("err_in", tick / 10_000),
            u64_field("err_out", 0),
            u64_field("drop_in", tick / 1_000),
            u64_field("drop_out", 0),
        ];
        point("net", vec![tag("interface", iface)], fields, time)
    }

    fn system(&self, tick: u64, time: i64) -> Point {
        let cpus = self.n_cpus as f64;
        let load1 = cpus * self.load * (0.7 + 0.6 * self.noise(400, tick, 0));
        let fields = vec![
            f64_field("load1", load1),
            f64_field(
                "load5",
                cpus * self.load * (0.9 + 0.2 * self.noise(400, tick, 1)),
            ),
            f64_field("load15", cpus * self.load),
            u64_field(
                "uptime",
                86_400 + (self.seed % 1_000_000) + tick.saturating_mul(10),
            ),
            u64_field("n_cpus", self.n_cpus as u64),
        ];
        point("system", Vec::new(), fields, time)
    }
}

/// Number of points (rows) of `measurement` in `batch`, points and chunks alike.
pub fn count_measurement(batch: &WriteBatch, measurement: &str) -> usize {
    batch
        .points
        .iter()
        .filter(|p| p.measurement == measurement)
        .count()
        + batch
            .chunks
            .iter()
            .filter(|c| c.measurement == measurement)
            .map(chunk_rows)
            .sum::<usize>()
}

/// Field values in a batch.
pub fn batch_values(batch: &WriteBatch) -> usize {
    batch.points.iter().map(|p| p.fields.len()).sum::<usize>()
        + batch
            .chunks
            .iter()
            .flat_map(|c| &c.fields)
            .map(column_len)
            .sum::<usize>()
}

fn point(measurement: &str, tags: Vec<Tag>, fields: Vec<Field>, time_unix_nano: i64) -> Point {
    Point {
        measurement: measurement.to_owned(),
        tags,
        fields,
        time_unix_nano,
    }
}

fn tag(key: &str, value: &str) -> Tag {
    Tag {
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

fn f64_field(key: &str, v: f64) -> Field {
    Field {
        key: key.to_owned(),
        value: Some(Value::F64(v)),
    }
}

fn u64_field(key: &str, v: u64) -> Field {
    Field {
        key: key.to_owned(),
        value: Some(Value::U64(v)),
    }
}

/// SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic number in [0, 1) from a seed and a salt.
fn unit(seed: u64, salt: u64) -> f64 {
    (mix(seed ^ mix(salt)) >> 11) as f64 / (1u64 << 53) as f64
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn field<'a>(p: &'a Point, key: &str) -> &'a Value {
        p.fields
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.value.as_ref())
            .expect("field present")
    }

    fn tag_of<'a>(p: &'a Point, key: &str) -> Option<&'a str> {
        p.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }

    #[test]
    fn batches_are_valid_and_realistic() {
        for index in 0..8 {
            let g = PointGen::new("t1", index, 200);
            let b = g.batch(1, 1_700_000_000_000_000_000);
            assert_eq!(b.agent_id, format!("loadgen-t1-{index}"));
            assert_eq!(b.seq, 1);
            assert_eq!(b.points.len(), 200);
            let keys: Vec<&str> = b.common_tags.iter().map(|t| t.key.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "ns_id", "mcis_id", "vm_id", "csp", "region", "zone", "hostname", "os_type",
                    "agent_id"
                ]
            );
            assert!(b.common_tags.iter().all(|t| !t.value.is_empty()));
            let measurements: BTreeSet<&str> =
                b.points.iter().map(|p| p.measurement.as_str()).collect();
            assert_eq!(
                measurements,
                BTreeSet::from(["cpu", "disk", "mem", "net", "system"])
            );
            for p in &b.points {
                assert!(!p.fields.is_empty(), "{p:?}");
                assert!(
                    p.fields
                        .iter()
                        .all(|f| !f.key.is_empty() && f.value.is_some()),
                    "{p:?}"
                );
                let mut names: Vec<&str> = p
                    .tags
                    .iter()
                    .map(|t| t.key.as_str())
                    .chain(p.fields.iter().map(|f| f.key.as_str()))
                    .collect();
                let n = names.len();
                names.sort_unstable();
                names.dedup();
                assert_eq!(names.len(), n, "a name repeats in {p:?}");
                assert!(p.time_unix_nano >= 1_700_000_000_000_000_000);
                assert!(
                    p.fields
                        .iter()
                        .all(|f| !b.common_tags.iter().any(|t| t.key == f.key))
                );
            }
            // Every round has cpu-total and one point per CPU.
            let cpus: BTreeSet<&str> = b.points.iter().filter_map(|p| tag_of(p, "cpu")).collect();
            assert!(cpus.contains("cpu-total") && cpus.contains("cpu0"));
            assert_eq!(cpus.len(), g.n_cpus + 1);
            let cpu = b
                .points
                .iter()
                .find(|p| p.measurement == "cpu")
                .expect("cpu point");
            let Value::F64(pct) = field(cpu, "usage_percent") else {
                panic!("usage_percent is not f64")
            };
            assert!((0.0..=100.0).contains(pct), "{pct}");
            let net = b
                .points
                .iter()
                .find(|p| p.measurement == "net")
                .expect("net point");
            assert!(matches!(field(net, "bytes_sent"), Value::U64(_)));
            assert_eq!(
                count_measurement(&b, "cpu"),
                b.points
                    .iter()
                    .filter(|p| tag_of(p, "cpu").is_some())
                    .count()
            );
        }
    }

    #[test]
    fn deterministic_and_monotonic_across_seqs() {
        let g = PointGen::new("t2", 3, 50);
        let t0 = 1_700_000_000_000_000_000;
        assert_eq!(
            g.batch(7, t0),
            g.batch(7, t0),
            "a resend must rebuild the same batch"
        );
        let span = g.batch_time_span_ns();
        let batches: Vec<WriteBatch> = (1..=20).map(|s| g.batch(s, t0 + s as i64 * span)).collect();
        assert!(batches.windows(2).all(|w| w[0].seq < w[1].seq));
        // Per series, time and counters strictly increase from batch to batch.
        let series = |p: &Point| format!("{}{:?}", p.measurement, p.tags);
        let mut last: std::collections::HashMap<String, (i64, u64)> = Default::default();
        for p in batches
            .iter()
            .flat_map(|b| &b.points)
            .filter(|p| p.measurement == "net")
        {
            let Value::U64(bytes) = *field(p, "bytes_sent") else {
                panic!("bytes_sent is not u64")
            };
            if let Some((t, v)) = last.insert(series(p), (p.time_unix_nano, bytes)) {
                assert!(
                    p.time_unix_nano > t && bytes > v,
                    "{t} {v} -> {} {bytes}",
                    p.time_unix_nano
                );
            }
        }
        assert_eq!(last.len(), INTERFACES.len());
        // 0 points per batch = one collection round (agent 0 has 2 CPUs: 10 points); tiny batches still carry a
        // point; other agents get other ids and identities.
        assert_eq!(PointGen::new("t2", 0, 0).batch(1, t0).points.len(), 10);
        assert_eq!(PointGen::new("t2", 0, 1).batch(1, t0).points.len(), 1);
        assert_ne!(
            PointGen::new("t2", 1, 10).batch(1, t0).common_tags,
            g.batch(1, t0).common_tags
        );
    }
}
