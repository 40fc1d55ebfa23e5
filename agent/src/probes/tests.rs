//! Live tests: real rounds on this machine.

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

fn u64_of(p: &Point, key: &str) -> u64 {
    match fields(p).get(key) {
        Some(field::Value::U64(v)) => *v,
        other => panic!("{}.{key}: {other:?}", p.measurement),
    }
}

fn of<'a>(points: &'a [Point], m: &str) -> Vec<&'a Point> {
    points.iter().filter(|p| p.measurement == m).collect()
}

#[test]
fn options_and_validation() {
    assert_eq!(
        ProbeOptions::default().measurements.len(),
        ALL_MEASUREMENTS.len()
    );
    assert_eq!(ProbeOptions::default().top_n, 5);
    assert!(validate_measurements(ALL_MEASUREMENTS).is_ok());
    assert!(validate_measurements(Vec::<String>::new()).is_ok());
    let e = validate_measurements(["cpu", "dsik"]).expect_err("unknown");
    assert!(e.contains("\"dsik\"") && e.contains("diskio"), "{e}");
    let bad = ProbeOptions {
        measurements: ["cpu".to_owned(), "gpu".to_owned()].into(),
        top_n: 5,
    };
    let e = Probes::with_options(bad).expect_err("unknown measurement");
    assert!(matches!(e, ProbeError::UnknownMeasurement(_)));
    assert!(e.to_string().contains("\"gpu\""), "{e}");
    for m in MEASUREMENTS {
        assert!(ALL_MEASUREMENTS.contains(&m));
    }
}

#[test]
fn only_enabled_measurements_are_collected() {
    let options = ProbeOptions {
        measurements: ["mem".to_owned(), "diskio".to_owned()].into(),
        top_n: 5,
    };
    let mut probes = Probes::with_options(options).expect("probes");
    assert_eq!(probes.measurements(), ["mem", "diskio"]);
    let got: BTreeSet<String> = probes
        .collect()
        .into_iter()
        .map(|p| p.measurement)
        .collect();
    assert!(got.contains("mem"), "{got:?}");
    assert!(got.iter().all(|m| m == "mem" || m == "diskio"), "{got:?}");

    let mut none = Probes::with_options(ProbeOptions {
        measurements: BTreeSet::new(),
        top_n: 5,
    })
    .expect("probes");
    assert!(none.collect().is_empty());

    // top_n = 0 turns procstat_top off.
    let mut zero = Probes::with_options(ProbeOptions {
        measurements: ["procstat_top".to_owned(), "processes".to_owned()].into(),
        top_n: 0,
    })
    .expect("probes");
    assert_eq!(zero.measurements(), ["processes"]);
    let points = zero.collect();
    assert!(points.iter().all(|p| p.measurement == "processes"));
}

#[test]
fn one_round_has_every_measurement_with_right_shapes() {
    let mut probes = Probes::new().expect("probes");
    assert_eq!(probes.measurements(), ALL_MEASUREMENTS);
    let points = probes.collect();
    let measurements: BTreeSet<&str> = points.iter().map(|p| p.measurement.as_str()).collect();
    for m in ALL_MEASUREMENTS {
        // cpufreq needs a frequency source (often absent in VMs); diskio needs a block device with I/O, and a
        // container may have none.
        if m == "cpufreq" || m == "diskio" {
            continue;
        }
        assert!(measurements.contains(m), "missing {m}: {measurements:?}");
    }
    let t = points[0].time_unix_nano;
    assert!(t > 1_600_000_000_000_000_000);
    assert!(
        points.iter().all(|p| p.time_unix_nano == t),
        "one timestamp per round"
    );
    assert!(points.iter().all(|p| !p.fields.is_empty()));

    let cpu = of(&points, "cpu");
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

    for p in of(&points, "cpufreq") {
        assert!(tag(p, "cpu").is_some_and(|c| c.starts_with("cpu")), "{p:?}");
        assert!(u64_of(p, "cur_freq_mhz") > 0);
    }

    let mem = of(&points, "mem");
    assert_eq!(mem.len(), 1);
    assert_u64(
        mem[0],
        &[
            "total",
            "used",
            "free",
            "available",
            "swap_total",
            "swap_free",
        ],
    );
    assert_f64(mem[0], &["used_percent", "available_percent"]);
    #[cfg(target_os = "linux")]
    assert_u64(
        mem[0],
        &["buffered", "cached", "shared", "slab", "swap_cached"],
    );
    assert!(u64_of(mem[0], "used") <= u64_of(mem[0], "total"));

    let swap = of(&points, "swap");
    assert_eq!(swap.len(), 1);
    assert_u64(swap[0], &["total", "used", "free"]);
    assert_f64(swap[0], &["used_percent"]);
    #[cfg(target_os = "linux")]
    assert_u64(swap[0], &["in", "out"]);

    let disks = of(&points, "disk");
    assert!(!disks.is_empty());
    for d in &disks {
        for k in ["path", "device", "fstype"] {
            assert!(tag(d, k).is_some(), "disk without {k}: {d:?}");
        }
        assert!(!tag(d, "device").unwrap_or("").starts_with("/dev/"));
        assert!(
            !disk::IGNORED_FS.contains(&tag(d, "fstype").unwrap_or("")),
            "{d:?}"
        );
        assert_u64(d, &["total", "used", "free"]);
        assert_f64(d, &["used_percent"]);
        let f = fields(d);
        if f.contains_key("inodes_total") {
            assert_u64(d, &["inodes_total", "inodes_used", "inodes_free"]);
        }
    }
    let paths: Vec<&str> = disks.iter().filter_map(|d| tag(d, "path")).collect();
    let unique: BTreeSet<&str> = paths.iter().copied().collect();
    assert_eq!(paths.len(), unique.len(), "one point per mount point");
    #[cfg(target_os = "linux")]
    {
        // `/` is reported when it is a real file system (not an overlay, as in containers).
        let root_fs = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.split_whitespace();
                (p.nth(1) == Some("/")).then(|| p.next().unwrap_or("").to_owned())
            })
            .next_back();
        if let Some(fs) = root_fs
            && ["ext4", "xfs", "btrfs", "ext3", "ext2"].contains(&fs.as_str())
        {
            assert!(paths.contains(&"/"), "no / disk ({fs}): {paths:?}");
            let root = disks
                .iter()
                .find(|d| tag(d, "path") == Some("/"))
                .expect("root");
            if fs != "btrfs" {
                assert_u64(root, &["inodes_total", "inodes_used", "inodes_free"]);
            }
        }
    }

    for d in of(&points, "diskio") {
        let name = tag(d, "name").expect("diskio name");
        assert!(
            !name.starts_with("loop") && !name.starts_with("ram"),
            "{name}"
        );
        assert_u64(d, &["read_bytes", "write_bytes"]);
        #[cfg(target_os = "linux")]
        assert_u64(
            d,
            &[
                "reads",
                "writes",
                "read_time",
                "write_time",
                "io_time",
                "weighted_io_time",
                "iops_in_progress",
                "merged_reads",
                "merged_writes",
            ],
        );
    }
    #[cfg(target_os = "linux")]
    if std::fs::read_to_string("/proc/diskstats")
        .is_ok_and(|t| diskio::parse_diskstats(&t).next().is_some())
    {
        assert!(measurements.contains("diskio"));
    }

    let nets = of(&points, "net");
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

    let sys = of(&points, "system");
    assert_eq!(sys.len(), 1);
    assert_f64(sys[0], &["load1", "load5", "load15"]);
    assert_u64(sys[0], &["uptime", "n_cpus"]);
    let n = u64_of(sys[0], "n_cpus");
    // cpu-total plus one point per CPU.
    assert_eq!(cpu.len() as u64, n + 1);

    let procs = of(&points, "processes");
    assert_eq!(procs.len(), 1);
    let keys = [
        "running", "sleeping", "blocked", "zombies", "stopped", "idle", "dead", "paging", "total",
    ];
    assert_u64(procs[0], &keys);
    #[cfg(target_os = "linux")]
    {
        assert_u64(procs[0], &["total_threads"]);
        assert!(u64_of(procs[0], "total_threads") >= u64_of(procs[0], "total"));
    }
    let total = u64_of(procs[0], "total");
    assert!(total >= 1);
    let sum: u64 = [
        "running", "sleeping", "blocked", "zombies", "stopped", "idle", "dead", "paging", "parked",
        "unknown",
    ]
    .iter()
    .map(|k| u64_of(procs[0], k))
    .sum();
    assert_eq!(sum, total);

    let top = of(&points, "procstat_top");
    assert!(!top.is_empty() && top.len() <= 10, "{}", top.len());
    let mut pids = BTreeSet::new();
    for p in &top {
        let pid = tag(p, "pid").expect("pid");
        assert!(pid.parse::<u32>().is_ok(), "{pid}");
        assert!(pids.insert(pid), "pid {pid} twice");
        assert!(tag(p, "process_name").is_some_and(|n| !n.is_empty()));
        assert!(matches!(tag(p, "rank_by"), Some("cpu" | "mem" | "cpu,mem")));
        assert_f64(p, &["cpu_usage", "memory_percent"]);
        assert_u64(p, &["rss"]);
    }
    assert!(
        top.iter()
            .filter(|p| tag(p, "rank_by") != Some("cpu"))
            .count()
            == 5,
        "5 by memory"
    );

    // The second round works from the stored state too.
    let again = probes.collect();
    assert!(again.iter().any(|p| p.measurement == "cpu"));
    assert!(again.iter().any(|p| p.measurement == "procstat_top"));
    assert!(again[0].time_unix_nano >= t);
}

#[cfg(target_os = "linux")]
#[test]
fn procstat_top_sees_a_busy_process() {
    // Enough rows for every process that used CPU, so busy neighbours (parallel builds) cannot push this one out.
    let mut probes = Probes::with_options(ProbeOptions {
        measurements: ["procstat_top".to_owned()].into(),
        top_n: 10_000,
    })
    .expect("probes");
    // Burn 150 ms of CPU in this thread (however long that takes on a loaded machine), then collect.
    let started = std::time::Instant::now();
    let burn_from = thread_cpu();
    let mut x = 0u64;
    while thread_cpu().saturating_sub(burn_from) < std::time::Duration::from_millis(150) {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }
    let window = started.elapsed().as_secs_f64();
    let points = probes.collect();
    let me = std::process::id().to_string();
    let row = points
        .iter()
        .find(|p| tag(p, "pid") == Some(me.as_str()))
        .unwrap_or_else(|| panic!("this process not ranked: {points:?}"));
    assert!(
        tag(row, "rank_by").is_some_and(|r| r.contains("cpu")),
        "{row:?}"
    );
    // At least 150 ms of CPU over the window (plus the collect), with tick granularity to spare.
    let expected = 100.0 * 0.15 / (window + 0.5);
    match fields(row).get("cpu_usage") {
        Some(field::Value::F64(v)) => {
            assert!(*v > expected * 0.5, "cpu_usage {v}, window {window} s")
        }
        other => panic!("{other:?}"),
    }
}

/// Rough cost of a round, not asserted: `cargo test -p damselfly-agent round_cost -- --nocapture` (build with
/// `--release` for numbers that mean something). Rounds are spaced like real ones would be, so the CPU probe never
/// waits for its minimum window; the CPU time is this thread's, which is the one collecting.
#[test]
fn round_cost() {
    let mut probes = Probes::new().expect("probes");
    probes.collect(); // the first round waits for the CPU window
    let rounds = 10u32;
    let mut wall = std::time::Duration::ZERO;
    #[cfg(target_os = "linux")]
    let mut cpu = std::time::Duration::ZERO;
    let mut n = 0;
    for _ in 0..rounds {
        std::thread::sleep(std::time::Duration::from_millis(210));
        #[cfg(target_os = "linux")]
        let cpu_before = thread_cpu();
        let started = std::time::Instant::now();
        n += probes.collect().len();
        wall += started.elapsed();
        #[cfg(target_os = "linux")]
        {
            cpu += thread_cpu().saturating_sub(cpu_before);
        }
    }
    println!(
        "collect(): {:?} wall per round, {} points per round",
        wall / rounds,
        n / rounds as usize
    );
    #[cfg(target_os = "linux")]
    println!("collect(): {:?} CPU per round", cpu / rounds);
}

#[cfg(target_os = "linux")]
fn thread_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}
