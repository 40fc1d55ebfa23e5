//! Placement speed (issue 7): time `damselfly_control::place` over (1) the full shared catalog — every Tumblebug
//! spec file, both coordinate files and the latency map — with all five criteria and the latency filter, plus a
//! Tumblebug-compatible location request; (2) a synthetic catalog of 100,000 specs spread over the real regions.
//! Targets: under 10 ms per request on (1), under 200 ms on (2). Run in release:
//!
//! ```sh
//! cargo run --release -p damselfly-benches --bin damselfly-placement-bench [-- --data control/data --runs 200]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use damselfly_control::catalog::{Catalog, Spec};
use damselfly_control::{DynamicScores, parse_request, place, tumblebug};

const FILES: &[&str] = &[
    "tumblebug_v0.8.0_cloudspec.csv",
    "tumblebug_v0.11.0_cloudspec.csv",
    "tumblebug_HEAD_cloudspec.csv",
    "derived_v0.8.0_spec_with_coords.csv",
    "tumblebug_v0.8.0_cloudlocation.csv",
    "derived_region_coords_HEAD.csv",
    "tumblebug_HEAD_cloudlatencymap.csv",
];

const REQUEST: &str = r#"{
  "groups": [
    {"name": "web", "count": 3, "vcpus": {"min": 2, "max": 16}, "max_price_per_hour": 1.0},
    {"name": "db", "count": 2, "memory_gib": {"min": 16}},
    {"name": "cache", "count": 1, "clouds": ["aws", "gcp", "azure", "alibaba"], "max_price_per_hour": 0.5}
  ],
  "policy": {
    "weights": {"cost": 1, "performance": 1, "location": 1, "latency": 1, "spread": 1},
    "locations": [{"lat": 37.5665, "lon": 126.978}, {"lat": 35.6762, "lon": 139.6503}],
    "latency_from": ["aws-ap-northeast-2", "gcp-asia-northeast1"],
    "filters": {"max_latency_ms": 250}
  },
  "limit": 10
}"#;

const TUMBLEBUG: &str = r#"{"filter":{"policy":[{"metric":"cost","condition":[{"operator":"<=","operand":"2"}]}]},
  "priority":{"policy":[{"metric":"location","weight":"1","parameter":[{"key":"coordinateClose","val":["37.5665/126.9780"]}]}]},
  "limit":"10"}"#;

fn stats(name: &str, mut times: Vec<Duration>, target_ms: f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / times.len() as f64;
    let p50 = ms(times[times.len() / 2]);
    let p99 = ms(times[(times.len() * 99 / 100).min(times.len() - 1)]);
    let max = ms(times[times.len() - 1]);
    let verdict = if p99 < target_ms { "OK" } else { "OVER" };
    println!(
        "{name}: runs {} mean {mean:.3} ms p50 {p50:.3} ms p99 {p99:.3} ms max {max:.3} ms (target < {target_ms} ms: {verdict})",
        times.len()
    );
}

/// A deterministic pseudo-random sequence (xorshift), so runs compare.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

fn main() -> std::process::ExitCode {
    let mut data = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../control/data"));
    let mut runs = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--data", Some(v)) => data = PathBuf::from(v),
            ("--runs", Some(v)) => runs = v.parse().unwrap_or(runs),
            _ => {
                eprintln!("usage: damselfly-placement-bench [--data DIR] [--runs N]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let mut catalog = Catalog::new();
    let t = Instant::now();
    for f in FILES {
        if let Err(e) = catalog.load_path(&data.join(f)) {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    println!(
        "full shared catalog: {} specs, {} regions, latency map {}x{}, loaded in {:.1} ms",
        catalog.specs.len(),
        catalog.regions.len(),
        catalog.latency.len(),
        catalog.latency.len(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    let req = match parse_request(REQUEST.as_bytes()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let none = DynamicScores::new();
    let mut times = Vec::with_capacity(runs);
    let mut sink = 0usize;
    for _ in 0..runs {
        let t = Instant::now();
        match place(&catalog, &req, &none) {
            Ok(a) => sink += a.groups.iter().map(|g| g.candidates).sum::<usize>(),
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::FAILURE;
            }
        }
        times.push(t.elapsed());
    }
    stats(
        "place, full catalog, 3 groups, 5 criteria + latency filter",
        times,
        10.0,
    );
    let plan = match tumblebug::parse(TUMBLEBUG.as_bytes()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        sink += tumblebug::recommend(&catalog, &plan).map_or(0, |r| r.len());
        times.push(t.elapsed());
    }
    stats("tumblebug mcisRecommendVm, location at Seoul", times, 10.0);

    // Synthetic: 100,000 specs over the real regions that have coordinates.
    let regions: Vec<(String, String, f64, f64)> = catalog
        .regions
        .iter()
        .filter_map(|r| Some((r.csp.clone(), r.region.clone(), r.latitude?, r.longitude?)))
        .collect();
    let mut synthetic = Catalog::new();
    // The same latency map.
    for f in ["tumblebug_HEAD_cloudlatencymap.csv"] {
        if let Err(e) = synthetic.load_path(&data.join(f)) {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t = Instant::now();
    let families = ["std", "cpu", "mem", "gpu", "arm"];
    for i in 0..100_000 {
        let (csp, region, lat, lon) = rng.pick(&regions).clone();
        let vcpus = *rng.pick(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        let mem = vcpus * *rng.pick(&[1.0, 2.0, 4.0, 8.0]);
        let price = vcpus * 0.02 * (0.5 + (rng.next() % 1000) as f64 / 1000.0);
        let score = (rng.next() % 1000) as f64 / 10.0;
        synthetic.push_spec(
            Spec {
                csp,
                region,
                spec: format!("{}.{}x{}-{i}", rng.pick(&families), vcpus, mem),
                vcpus: Some(vcpus),
                memory_gib: Some(mem),
                price_per_hour: Some(price),
                currency: None,
                os: Vec::new(),
                score: Some(score),
                loc: 0,
            },
            Some(lat),
            Some(lon),
        );
    }
    println!(
        "synthetic catalog: {} specs over {} regions, built in {:.1} ms",
        synthetic.specs.len(),
        synthetic.regions.len(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    let synthetic_runs = (runs / 10).max(10);
    let mut times = Vec::with_capacity(synthetic_runs);
    for _ in 0..synthetic_runs {
        let t = Instant::now();
        match place(&synthetic, &req, &none) {
            Ok(a) => sink += a.groups.iter().map(|g| g.candidates).sum::<usize>(),
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::FAILURE;
            }
        }
        times.push(t.elapsed());
    }
    stats("place, 100,000 synthetic specs, same request", times, 200.0);
    // Dynamic scores for every spec: the collector's case.
    let mut dynamic = DynamicScores::new();
    for s in &synthetic.specs {
        dynamic.insert(&s.csp, &s.region, &s.spec, s.score.unwrap_or(0.0) * 1.1);
    }
    let mut dyn_req = req.clone();
    dyn_req.policy.performance = damselfly_control::placement::PerformanceSource::Dynamic;
    let mut times = Vec::with_capacity(synthetic_runs);
    for _ in 0..synthetic_runs {
        let t = Instant::now();
        sink += place(&synthetic, &dyn_req, &dynamic).map_or(0, |a| a.groups.len());
        times.push(t.elapsed());
    }
    stats(
        "place, 100,000 synthetic specs, dynamic performance scores",
        times,
        200.0,
    );
    println!("(checksum {sink})");
    std::process::ExitCode::SUCCESS
}
