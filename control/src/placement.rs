//! Explained MCIS placement: filters, then a weighted sum of normalized criteria (see `docs/PLACEMENT.md`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Spec};
use crate::error::RequestError;

/// Candidates listed per group when the request gives no `limit`.
pub const DEFAULT_LIMIT: usize = 10;

/// A placement request: the MCIS's sub-groups and one policy for all of them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementRequest {
    pub groups: Vec<GroupRequest>,
    #[serde(default)]
    pub policy: Policy,
    /// Candidates listed per group (default 10).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One sub-group: `count` VMs of one spec in one region.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    pub name: String,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub vcpus: Option<Bounds>,
    #[serde(default)]
    pub memory_gib: Option<Bounds>,
    #[serde(default)]
    pub max_price_per_hour: Option<f64>,
    #[serde(default)]
    pub min_price_per_hour: Option<f64>,
    /// An OS the spec must be offered with; specs whose OS list is unknown are kept.
    #[serde(default)]
    pub os: Option<String>,
    /// Allowed clouds (empty: all).
    #[serde(default)]
    pub clouds: Vec<String>,
    /// Allowed regions, `csp/region` or a bare region name matching any cloud (empty: all).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Allowed spec names (case-insensitive; empty: all).
    #[serde(default)]
    pub specs: Vec<String>,
}

fn one() -> u32 {
    1
}

/// An inclusive range; either end may be absent.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl Bounds {
    fn contains(&self, v: f64) -> bool {
        self.min.is_none_or(|m| v >= m) && self.max.is_none_or(|m| v <= m)
    }
}

/// Filters and weighted priorities.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub filters: Filters,
    #[serde(default = "Weights::cost_only")]
    pub weights: Weights,
    /// Where the performance criterion comes from.
    #[serde(default)]
    pub performance: PerformanceSource,
    /// User locations for the location criterion (mean great-circle distance to them).
    #[serde(default)]
    pub locations: Vec<Point>,
    /// Regions (`csp/region` or `csp-region`) the latency criterion measures from (mean RTT from them).
    #[serde(default)]
    pub latency_from: Vec<String>,
    /// What the spread criterion counts: VMs of earlier groups in the same cloud, or in the same region.
    #[serde(default)]
    pub spread: SpreadBy,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            filters: Filters::default(),
            weights: Weights::cost_only(),
            performance: PerformanceSource::default(),
            locations: Vec::new(),
            latency_from: Vec::new(),
            spread: SpreadBy::default(),
        }
    }
}

/// Policy-wide filters (the groups' bounds are filters too).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Drop regions farther than this from the nearest user location (km).
    #[serde(default)]
    pub max_distance_km: Option<f64>,
    /// Drop regions whose worst RTT from `latency_from` is above this (ms).
    #[serde(default)]
    pub max_latency_ms: Option<f64>,
    /// Drop specs whose performance score is below this (unknown scores are dropped too).
    #[serde(default)]
    pub min_performance: Option<f64>,
}

/// Weights of the criteria: non-negative, not all zero; only their ratios matter.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    #[serde(default)]
    pub cost: f64,
    #[serde(default)]
    pub performance: f64,
    #[serde(default)]
    pub location: f64,
    #[serde(default)]
    pub latency: f64,
    #[serde(default)]
    pub spread: f64,
}

impl Weights {
    /// The default policy: cheapest first.
    pub fn cost_only() -> Weights {
        Weights {
            cost: 1.0,
            ..Weights::default()
        }
    }
    fn sum(&self) -> f64 {
        self.cost + self.performance + self.location + self.latency + self.spread
    }
    fn all(&self) -> [(&'static str, f64); 5] {
        [
            ("cost", self.cost),
            ("performance", self.performance),
            ("location", self.location),
            ("latency", self.latency),
            ("spread", self.spread),
        ]
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PerformanceSource {
    /// The catalog's score (Tumblebug's `evaluationScore01`).
    #[default]
    Static,
    /// Scores supplied by the caller ([`DynamicScores`]), e.g. from live benchmarks weighted by load.
    Dynamic,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SpreadBy {
    #[default]
    Cloud,
    Region,
}

/// A point on Earth in degrees.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub lat: f64,
    pub lon: f64,
}

/// Performance scores per (csp, region, spec), supplied by the caller (higher is better). Names are matched
/// case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct DynamicScores {
    by_cloud: HashMap<String, HashMap<String, HashMap<String, f64>>>,
    len: usize,
}

fn lower(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

impl DynamicScores {
    pub fn new() -> DynamicScores {
        DynamicScores::default()
    }
    pub fn insert(&mut self, csp: &str, region: &str, spec: &str, score: f64) {
        let old = self
            .by_cloud
            .entry(csp.to_lowercase())
            .or_default()
            .entry(region.to_lowercase())
            .or_default()
            .insert(spec.to_lowercase(), score);
        if old.is_none() {
            self.len += 1;
        }
    }
    pub fn get(&self, spec: &Spec) -> Option<f64> {
        self.by_cloud
            .get(lower(&spec.csp).as_ref())?
            .get(lower(&spec.region).as_ref())?
            .get(lower(&spec.spec).as_ref())
            .copied()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The answer: per group, what each filter removed and the ranked candidates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlacementAnswer {
    /// The weights as used: divided by their sum.
    pub weights: Weights,
    pub groups: Vec<GroupAnswer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupAnswer {
    pub name: String,
    pub count: u32,
    /// Specs in the catalog.
    pub catalog_specs: usize,
    /// Specs left after the filters.
    pub candidates: usize,
    pub filters: Vec<FilterReport>,
    pub ranking: Vec<Candidate>,
}

/// How many specs one filter removed (filters apply in the listed order; each counts what it removed from what the
/// previous ones left). `unknown` of them were removed because the value is unknown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FilterReport {
    pub filter: String,
    pub removed: usize,
    pub unknown: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    pub rank: usize,
    /// Index of the spec in [`Catalog::specs`].
    #[serde(skip)]
    pub index: usize,
    pub csp: String,
    pub region: String,
    pub spec: String,
    pub vcpus: Option<f64>,
    pub memory_gib: Option<f64>,
    pub price_per_hour: Option<f64>,
    /// Raw performance score (static or dynamic, as the policy says).
    pub performance: Option<f64>,
    /// Mean distance to the user locations (km).
    pub distance_km: Option<f64>,
    /// Mean RTT from `latency_from` (ms).
    pub latency_ms: Option<f64>,
    /// Normalized score (0..1) of each criterion with a non-zero weight.
    pub scores: Scores,
    /// Σ weight × score / Σ weight.
    pub total: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub performance: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<f64>,
}

/// Parses a JSON request, with serde's precise message (unknown field, wrong type, line and column).
pub fn parse_request(json: &[u8]) -> Result<PlacementRequest, RequestError> {
    serde_json::from_slice(json).map_err(|e| RequestError::Parse(e.to_string()))
}

/// Great-circle distance in km (haversine, Earth radius 6371 km: the formula Tumblebug uses).
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let to_rad = std::f64::consts::PI / 180.0;
    let d_lat = (lat2 - lat1) * to_rad;
    let d_lon = (lon2 - lon1) * to_rad;
    let a = (d_lat / 2.0).sin().powi(2)
        + (lat1 * to_rad).cos() * (lat2 * to_rad).cos() * (d_lon / 2.0).sin().powi(2);
    6371.0 * 2.0 * a.sqrt().atan2((1.0 - a).sqrt())
}

/// `csp/region`, `csp-region` (latency map style) or a bare region: the latency-map key.
fn latency_key(catalog: &Catalog, name: &str) -> Option<String> {
    let name = name.trim().to_lowercase();
    if let Some((csp, region)) = name.split_once('/') {
        let key = format!("{csp}-{region}");
        return catalog.latency.contains(&key).then_some(key);
    }
    catalog.latency.contains(&name).then_some(name)
}

/// A resolved region filter: a cloud and region, or a bare region of any cloud.
enum RegionRule {
    Exact(String, String),
    Any(String),
}

fn finite(field: &str, v: Option<f64>) -> Result<(), RequestError> {
    match v {
        Some(x) if !x.is_finite() || x < 0.0 => Err(RequestError::Invalid {
            field: field.to_string(),
            message: format!("{x} must be a non-negative number"),
        }),
        _ => Ok(()),
    }
}

fn check_bounds(field: &str, b: &Option<Bounds>) -> Result<(), RequestError> {
    if let Some(b) = b {
        finite(&format!("{field}.min"), b.min)?;
        finite(&format!("{field}.max"), b.max)?;
        if let (Some(min), Some(max)) = (b.min, b.max)
            && min > max
        {
            return Err(RequestError::ImpossibleBounds {
                field: field.to_string(),
                min,
                max,
            });
        }
    }
    Ok(())
}

/// Checks a request against the catalog; every error names the field.
pub fn validate(
    catalog: &Catalog,
    req: &PlacementRequest,
    dynamic: &DynamicScores,
) -> Result<(), RequestError> {
    if req.groups.is_empty() {
        return Err(RequestError::Invalid {
            field: "groups".into(),
            message: "at least one group is required".into(),
        });
    }
    let mut names = std::collections::HashSet::new();
    for (i, g) in req.groups.iter().enumerate() {
        let f = |name: &str| format!("groups[{i}].{name}");
        if g.name.trim().is_empty() || !names.insert(g.name.as_str()) {
            return Err(RequestError::Invalid {
                field: f("name"),
                message: format!("{:?}: group names must be non-empty and unique", g.name),
            });
        }
        if g.count == 0 {
            return Err(RequestError::Invalid {
                field: f("count"),
                message: "must be at least 1".into(),
            });
        }
        check_bounds(&f("vcpus"), &g.vcpus)?;
        check_bounds(&f("memory_gib"), &g.memory_gib)?;
        finite(&f("max_price_per_hour"), g.max_price_per_hour)?;
        finite(&f("min_price_per_hour"), g.min_price_per_hour)?;
        if let (Some(min), Some(max)) = (g.min_price_per_hour, g.max_price_per_hour)
            && min > max
        {
            return Err(RequestError::ImpossibleBounds {
                field: f("price_per_hour"),
                min,
                max,
            });
        }
        for c in &g.clouds {
            if !catalog.has_cloud(c) {
                return Err(RequestError::UnknownCloud {
                    field: f("clouds"),
                    name: c.clone(),
                });
            }
        }
        for r in &g.regions {
            region_rule(catalog, r).ok_or_else(|| RequestError::UnknownRegion {
                field: f("regions"),
                name: r.clone(),
            })?;
        }
    }
    let p = &req.policy;
    for (name, w) in p.weights.all() {
        if !w.is_finite() || w < 0.0 {
            return Err(RequestError::Weights(format!(
                "{name} is {w}: weights must be non-negative numbers"
            )));
        }
    }
    if p.weights.sum() <= 0.0 {
        return Err(RequestError::Weights(
            "all weights are zero: give at least one criterion a positive weight".into(),
        ));
    }
    for (i, pt) in p.locations.iter().enumerate() {
        if !(-90.0..=90.0).contains(&pt.lat) || !(-180.0..=180.0).contains(&pt.lon) {
            return Err(RequestError::Invalid {
                field: format!("policy.locations[{i}]"),
                message: format!("{}/{} is not a latitude/longitude", pt.lat, pt.lon),
            });
        }
    }
    if (p.weights.location > 0.0 || p.filters.max_distance_km.is_some()) && p.locations.is_empty() {
        return Err(RequestError::Invalid {
            field: "policy.locations".into(),
            message: "the location criterion or max_distance_km needs at least one location".into(),
        });
    }
    if (p.weights.latency > 0.0 || p.filters.max_latency_ms.is_some()) && p.latency_from.is_empty()
    {
        return Err(RequestError::Invalid {
            field: "policy.latency_from".into(),
            message: "the latency criterion or max_latency_ms needs at least one region".into(),
        });
    }
    for r in &p.latency_from {
        if latency_key(catalog, r).is_none() {
            return Err(RequestError::UnknownRegion {
                field: "policy.latency_from".into(),
                name: r.clone(),
            });
        }
    }
    finite("policy.filters.max_distance_km", p.filters.max_distance_km)?;
    finite("policy.filters.max_latency_ms", p.filters.max_latency_ms)?;
    if p.performance == PerformanceSource::Dynamic
        && (p.weights.performance > 0.0 || p.filters.min_performance.is_some())
        && dynamic.is_empty()
    {
        return Err(RequestError::Invalid {
            field: "policy.performance".into(),
            message: "dynamic performance scores were asked for but none are available".into(),
        });
    }
    Ok(())
}

fn region_rule(catalog: &Catalog, r: &str) -> Option<RegionRule> {
    let r = r.trim();
    if let Some((csp, region)) = r.split_once('/') {
        let reg = catalog.region(csp, region)?;
        return Some(RegionRule::Exact(
            reg.csp.clone(),
            reg.region.to_lowercase(),
        ));
    }
    let lower = r.to_lowercase();
    catalog
        .regions
        .iter()
        .any(|reg| reg.region.to_lowercase() == lower)
        .then_some(RegionRule::Any(lower))
}

/// Per-region values computed once per request.
struct RegionFacts {
    distance_km: Vec<Option<f64>>,
    nearest_km: Vec<Option<f64>>,
    latency_ms: Vec<Option<f64>>,
    worst_latency_ms: Vec<Option<f64>>,
}

fn region_facts(catalog: &Catalog, policy: &Policy) -> RegionFacts {
    let n = catalog.regions.len();
    let mut facts = RegionFacts {
        distance_km: vec![None; n],
        nearest_km: vec![None; n],
        latency_ms: vec![None; n],
        worst_latency_ms: vec![None; n],
    };
    let from: Vec<String> = policy
        .latency_from
        .iter()
        .filter_map(|r| latency_key(catalog, r))
        .collect();
    for (i, r) in catalog.regions.iter().enumerate() {
        if let (Some(lat), Some(lon), false) =
            (r.latitude, r.longitude, policy.locations.is_empty())
        {
            let d: Vec<f64> = policy
                .locations
                .iter()
                .map(|p| haversine_km(p.lat, p.lon, lat, lon))
                .collect();
            facts.distance_km[i] = Some(d.iter().sum::<f64>() / d.len() as f64);
            facts.nearest_km[i] = d.iter().copied().reduce(f64::min);
        }
        if !from.is_empty() {
            let key = r.latency_key();
            let l: Option<Vec<f64>> = from.iter().map(|f| catalog.latency.get(f, &key)).collect();
            if let Some(l) = l {
                facts.latency_ms[i] = Some(l.iter().sum::<f64>() / l.len() as f64);
                facts.worst_latency_ms[i] = l.iter().copied().reduce(f64::max);
            }
        }
    }
    facts
}

/// Min-max normalization; `higher_is_better` picks the direction; all equal → 1; unknown → 0.
fn normalize(values: &[Option<f64>], higher_is_better: bool) -> Vec<f64> {
    let known = values.iter().flatten();
    let min = known.clone().copied().fold(f64::INFINITY, f64::min);
    let max = known.copied().fold(f64::NEG_INFINITY, f64::max);
    values
        .iter()
        .map(|v| match v {
            None => 0.0,
            Some(_) if max <= min => 1.0,
            Some(v) if higher_is_better => (v - min) / (max - min),
            Some(v) => (max - v) / (max - min),
        })
        .collect()
}

/// Ranks the catalog's specs for every group of the request. `dynamic` holds the caller's performance scores (used
/// when the policy says `"performance": "dynamic"`).
pub fn place(
    catalog: &Catalog,
    req: &PlacementRequest,
    dynamic: &DynamicScores,
) -> Result<PlacementAnswer, RequestError> {
    validate(catalog, req, dynamic)?;
    let policy = &req.policy;
    let facts = region_facts(catalog, policy);
    let sum = policy.weights.sum();
    let w = Weights {
        cost: policy.weights.cost / sum,
        performance: policy.weights.performance / sum,
        location: policy.weights.location / sum,
        latency: policy.weights.latency / sum,
        spread: policy.weights.spread / sum,
    };
    let limit = req.limit.unwrap_or(DEFAULT_LIMIT);
    // Each spec's raw performance score, looked up once for all groups.
    let perf: Vec<Option<f64>> = match policy.performance {
        PerformanceSource::Static => catalog.specs.iter().map(|s| s.score).collect(),
        PerformanceSource::Dynamic => catalog.specs.iter().map(|s| dynamic.get(s)).collect(),
    };
    // VMs placed by the earlier groups' winners, per cloud (or cloud/region): the spread criterion's input.
    let mut placed: HashMap<String, u32> = HashMap::new();
    let mut groups = Vec::with_capacity(req.groups.len());
    for group in &req.groups {
        let answer = place_group(catalog, group, policy, &w, &facts, &perf, &placed, limit);
        if let Some(best) = answer.ranking.first() {
            let key = match policy.spread {
                SpreadBy::Cloud => best.csp.clone(),
                SpreadBy::Region => format!("{}/{}", best.csp, best.region.to_lowercase()),
            };
            *placed.entry(key).or_default() += group.count;
        }
        groups.push(answer);
    }
    Ok(PlacementAnswer { weights: w, groups })
}

#[allow(clippy::too_many_arguments)]
fn place_group(
    catalog: &Catalog,
    g: &GroupRequest,
    policy: &Policy,
    w: &Weights,
    facts: &RegionFacts,
    perf: &[Option<f64>],
    placed: &HashMap<String, u32>,
    limit: usize,
) -> GroupAnswer {
    let clouds: Vec<String> = g.clouds.iter().map(|c| c.to_lowercase()).collect();
    let regions: Vec<RegionRule> = g
        .regions
        .iter()
        .filter_map(|r| region_rule(catalog, r))
        .collect();
    let spec_names: Vec<String> = g.specs.iter().map(|s| s.to_lowercase()).collect();
    let os = g.os.as_ref().map(|o| o.trim().to_lowercase());
    let price = Bounds {
        min: g.min_price_per_hour,
        max: g.max_price_per_hour,
    };

    // (name, active, keep: Some(true/false) or None for unknown-and-removed)
    type Test<'a> = Box<dyn Fn(usize, &Spec) -> Option<bool> + 'a>;
    let mut tests: Vec<(&str, Test)> = Vec::new();
    if !clouds.is_empty() {
        tests.push((
            "clouds",
            Box::new(|_: usize, s: &Spec| Some(clouds.contains(&s.csp))),
        ));
    }
    if !regions.is_empty() {
        tests.push((
            "regions",
            Box::new(|_: usize, s: &Spec| {
                let r = s.region.to_lowercase();
                Some(regions.iter().any(|rule| match rule {
                    RegionRule::Exact(c, reg) => *c == s.csp && *reg == r,
                    RegionRule::Any(reg) => *reg == r,
                }))
            }),
        ));
    }
    if !spec_names.is_empty() {
        tests.push((
            "specs",
            Box::new(|_: usize, s: &Spec| Some(spec_names.contains(&s.spec.to_lowercase()))),
        ));
    }
    if let Some(os) = &os {
        tests.push((
            "os",
            Box::new(move |_: usize, s: &Spec| Some(s.os.is_empty() || s.os.contains(os))),
        ));
    }
    if let Some(b) = g.vcpus {
        tests.push((
            "vcpus",
            Box::new(move |_: usize, s: &Spec| s.vcpus.map(|v| b.contains(v))),
        ));
    }
    if let Some(b) = g.memory_gib {
        tests.push((
            "memory_gib",
            Box::new(move |_: usize, s: &Spec| s.memory_gib.map(|v| b.contains(v))),
        ));
    }
    if price.min.is_some() || price.max.is_some() {
        tests.push((
            "price_per_hour",
            Box::new(move |_: usize, s: &Spec| s.price_per_hour.map(|v| price.contains(v))),
        ));
    }
    if let Some(max) = policy.filters.max_distance_km {
        tests.push((
            "max_distance_km",
            Box::new(move |_: usize, s: &Spec| facts.nearest_km[s.loc as usize].map(|d| d <= max)),
        ));
    }
    if let Some(max) = policy.filters.max_latency_ms {
        tests.push((
            "max_latency_ms",
            Box::new(move |_: usize, s: &Spec| {
                facts.worst_latency_ms[s.loc as usize].map(|l| l <= max)
            }),
        ));
    }
    if let Some(min) = policy.filters.min_performance {
        tests.push((
            "min_performance",
            Box::new(move |i: usize, _: &Spec| perf[i].map(|p| p >= min)),
        ));
    }

    let mut reports: Vec<FilterReport> = tests
        .iter()
        .map(|(name, _)| FilterReport {
            filter: name.to_string(),
            removed: 0,
            unknown: 0,
        })
        .collect();
    let mut kept: Vec<&Spec> = Vec::new();
    let mut kept_index: Vec<usize> = Vec::new();
    'specs: for (index, s) in catalog.specs.iter().enumerate() {
        for (i, (_, test)) in tests.iter().enumerate() {
            match test(index, s) {
                Some(true) => {}
                Some(false) => {
                    reports[i].removed += 1;
                    continue 'specs;
                }
                None => {
                    reports[i].removed += 1;
                    reports[i].unknown += 1;
                    continue 'specs;
                }
            }
        }
        kept.push(s);
        kept_index.push(index);
    }

    let raw_price: Vec<Option<f64>> = kept.iter().map(|s| s.price_per_hour).collect();
    let raw_perf: Vec<Option<f64>> = kept_index.iter().map(|&i| perf[i]).collect();
    let raw_dist: Vec<Option<f64>> = kept
        .iter()
        .map(|s| facts.distance_km[s.loc as usize])
        .collect();
    let raw_lat: Vec<Option<f64>> = kept
        .iter()
        .map(|s| facts.latency_ms[s.loc as usize])
        .collect();
    let on = |x: f64| x > 0.0;
    let n_cost = if on(w.cost) {
        normalize(&raw_price, false)
    } else {
        Vec::new()
    };
    let n_perf = if on(w.performance) {
        normalize(&raw_perf, true)
    } else {
        Vec::new()
    };
    let n_dist = if on(w.location) {
        normalize(&raw_dist, false)
    } else {
        Vec::new()
    };
    let n_lat = if on(w.latency) {
        normalize(&raw_lat, false)
    } else {
        Vec::new()
    };

    let spread_score = |s: &Spec| {
        let key = match policy.spread {
            SpreadBy::Cloud => s.csp.clone(),
            SpreadBy::Region => format!("{}/{}", s.csp, s.region.to_lowercase()),
        };
        1.0 / (1.0 + f64::from(placed.get(&key).copied().unwrap_or(0)))
    };
    let mut totals: Vec<(usize, f64)> = (0..kept.len())
        .map(|i| {
            let mut t = 0.0;
            if on(w.cost) {
                t += w.cost * n_cost[i];
            }
            if on(w.performance) {
                t += w.performance * n_perf[i];
            }
            if on(w.location) {
                t += w.location * n_dist[i];
            }
            if on(w.latency) {
                t += w.latency * n_lat[i];
            }
            if on(w.spread) {
                t += w.spread * spread_score(kept[i]);
            }
            (i, t)
        })
        .collect();
    // Higher total first; ties: cheaper (unknown price last), then names.
    let order = |a: &(usize, f64), b: &(usize, f64)| {
        let (sa, sb) = (kept[a.0], kept[b.0]);
        b.1.total_cmp(&a.1)
            .then_with(|| {
                let pa = sa.price_per_hour.unwrap_or(f64::INFINITY);
                let pb = sb.price_per_hour.unwrap_or(f64::INFINITY);
                pa.total_cmp(&pb)
            })
            .then_with(|| sa.csp.cmp(&sb.csp))
            .then_with(|| sa.region.cmp(&sb.region))
            .then_with(|| sa.spec.cmp(&sb.spec))
    };
    if limit < totals.len() && limit > 0 {
        totals.select_nth_unstable_by(limit - 1, order);
        totals.truncate(limit);
    }
    totals.truncate(limit);
    totals.sort_by(order);

    let ranking = totals
        .iter()
        .enumerate()
        .map(|(rank, &(i, total))| {
            let s = kept[i];
            let pick = |on: bool, v: &[f64]| on.then(|| v[i]);
            Candidate {
                rank: rank + 1,
                index: kept_index[i],
                csp: s.csp.clone(),
                region: s.region.clone(),
                spec: s.spec.clone(),
                vcpus: s.vcpus,
                memory_gib: s.memory_gib,
                price_per_hour: s.price_per_hour,
                performance: raw_perf[i],
                distance_km: raw_dist[i],
                latency_ms: raw_lat[i],
                scores: Scores {
                    cost: pick(on(w.cost), &n_cost),
                    performance: pick(on(w.performance), &n_perf),
                    location: pick(on(w.location), &n_dist),
                    latency: pick(on(w.latency), &n_lat),
                    spread: on(w.spread).then(|| spread_score(s)),
                },
                total,
            }
        })
        .collect();
    GroupAnswer {
        name: g.name.clone(),
        count: g.count,
        catalog_specs: catalog.specs.len(),
        candidates: kept.len(),
        filters: reports,
        ranking,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A small catalog in Damselfly's format: two clouds, three regions.
    pub(crate) fn small() -> Catalog {
        let mut c = Catalog::new();
        c.load_str(
            "small.csv",
            "csp,region,spec,vcpus,memory_gib,price_per_hour,score,latitude,longitude\n\
             aws,ap-northeast-2,m5.large,2,8,0.118,60,37.36,126.78\n\
             aws,ap-northeast-2,m5.xlarge,4,16,0.236,80,37.36,126.78\n\
             aws,us-east-1,m5.large,2,8,0.096,60,38.13,-78.45\n\
             gcp,asia-northeast3,e2-standard-2,2,8,0.086,50,37.2,127.0\n\
             gcp,asia-northeast3,e2-standard-4,4,16,0.172,70,37.2,127.0\n\
             gcp,us-east1,e2-standard-2,2,,0.067,,33.19,-80.01\n",
        )
        .unwrap();
        c
    }

    fn req(json: &str) -> PlacementRequest {
        parse_request(json.as_bytes()).unwrap()
    }

    fn winner(a: &PlacementAnswer, g: usize) -> String {
        let c = &a.groups[g].ranking[0];
        format!("{}/{}/{}", c.csp, c.region, c.spec)
    }

    #[test]
    fn default_policy_is_cheapest_first_and_filters_count() {
        let c = small();
        let a = place(
            &c,
            &req(r#"{"groups":[{"name":"web","count":2,"vcpus":{"min":2,"max":2},"memory_gib":{"min":8}}]}"#),
            &DynamicScores::new(),
        )
        .unwrap();
        let g = &a.groups[0];
        assert_eq!(g.catalog_specs, 6);
        // Two 4-vCPU specs out by vcpus; gcp/us-east1 has unknown memory: out, counted as unknown.
        assert_eq!(
            g.filters,
            vec![
                FilterReport {
                    filter: "vcpus".into(),
                    removed: 2,
                    unknown: 0
                },
                FilterReport {
                    filter: "memory_gib".into(),
                    removed: 1,
                    unknown: 1
                },
            ]
        );
        assert_eq!(g.candidates, 3);
        assert_eq!(winner(&a, 0), "gcp/asia-northeast3/e2-standard-2");
        // Cost scores: (max - price) / (max - min) over 0.086..0.118.
        let scores: Vec<f64> = g.ranking.iter().map(|c| c.scores.cost.unwrap()).collect();
        assert!((scores[0] - 1.0).abs() < 1e-9);
        assert!((scores[1] - (0.118 - 0.096) / (0.118 - 0.086)).abs() < 1e-9);
        assert!((scores[2] - 0.0).abs() < 1e-9);
        assert_eq!(g.ranking[0].total, scores[0]);
    }

    #[test]
    fn changing_weights_changes_the_winner() {
        let c = small();
        let body = |wc: f64, wl: f64| {
            format!(
                r#"{{"groups":[{{"name":"db","vcpus":{{"min":2,"max":2}}}}],
                   "policy":{{"weights":{{"cost":{wc},"location":{wl}}},"locations":[{{"lat":37.5665,"lon":126.978}}]}}}}"#
            )
        };
        // Cost alone: the cheapest, in the US.
        let a = place(&c, &req(&body(1.0, 0.0)), &DynamicScores::new()).unwrap();
        assert_eq!(winner(&a, 0), "gcp/us-east1/e2-standard-2");
        // Location dominant: Seoul; the cheaper of the two Seoul-area specs at equal weight.
        let a = place(&c, &req(&body(1.0, 3.0)), &DynamicScores::new()).unwrap();
        assert_eq!(winner(&a, 0), "gcp/asia-northeast3/e2-standard-2");
        let top = &a.groups[0].ranking[0];
        let expect = (1.0 * top.scores.cost.unwrap() + 3.0 * top.scores.location.unwrap()) / 4.0;
        assert!((top.total - expect).abs() < 1e-12);
        assert_eq!(a.weights.location, 0.75);
    }

    #[test]
    fn worked_example() {
        // docs/PLACEMENT.md, "Worked example".
        let c = small();
        let r = |w: &str| {
            req(&format!(
                r#"{{"groups":[{{"name":"g","vcpus":{{"min":2,"max":2}}}}],
                   "policy":{{"weights":{w},"locations":[{{"lat":37.5665,"lon":126.978}}]}}}}"#
            ))
        };
        let a = place(&c, &r(r#"{"cost":1,"location":1}"#), &DynamicScores::new()).unwrap();
        let got: Vec<(String, f64, f64, f64, f64)> = a.groups[0]
            .ranking
            .iter()
            .map(|c| {
                (
                    format!("{}/{}", c.csp, c.region),
                    (c.distance_km.unwrap() * 10.0).round() / 10.0,
                    (c.scores.cost.unwrap() * 1e4).round() / 1e4,
                    (c.scores.location.unwrap() * 1e4).round() / 1e4,
                    (c.total * 1e4).round() / 1e4,
                )
            })
            .collect();
        let want = [
            ("gcp/asia-northeast3", 40.8, 0.6275, 0.999, 0.8132),
            // A tie at 0.5: the cheaper spec first.
            ("gcp/us-east1", 11665.8, 1.0, 0.0, 0.5),
            ("aws/ap-northeast-2", 28.9, 0.0, 1.0, 0.5),
            ("aws/us-east-1", 11203.7, 0.4314, 0.0397, 0.2355),
        ];
        let want: Vec<(String, f64, f64, f64, f64)> = want
            .iter()
            .map(|w| (w.0.to_string(), w.1, w.2, w.3, w.4))
            .collect();
        assert_eq!(got, want);
        let a = place(&c, &r(r#"{"cost":1,"location":3}"#), &DynamicScores::new()).unwrap();
        assert!((a.groups[0].ranking[0].total - 0.9061).abs() < 1e-4);
    }

    #[test]
    fn dynamic_scores_change_the_ranking() {
        let c = small();
        let r = req(
            r#"{"groups":[{"name":"app","vcpus":{"min":4}}],"policy":{"weights":{"performance":1},"performance":"dynamic"}}"#,
        );
        let mut dynamic = DynamicScores::new();
        dynamic.insert("aws", "ap-northeast-2", "m5.xlarge", 900.0);
        dynamic.insert("gcp", "asia-northeast3", "e2-standard-4", 700.0);
        let a = place(&c, &r, &dynamic).unwrap();
        assert_eq!(winner(&a, 0), "aws/ap-northeast-2/m5.xlarge");
        // The AWS VMs get busy: their live score drops, the winner changes.
        dynamic.insert("aws", "ap-northeast-2", "m5.xlarge", 300.0);
        let a = place(&c, &r, &dynamic).unwrap();
        assert_eq!(winner(&a, 0), "gcp/asia-northeast3/e2-standard-4");
        // Static scores would pick the AWS spec (80 > 70).
        let r = req(
            r#"{"groups":[{"name":"app","vcpus":{"min":4}}],"policy":{"weights":{"performance":1}}}"#,
        );
        assert_eq!(
            winner(&place(&c, &r, &dynamic).unwrap(), 0),
            "aws/ap-northeast-2/m5.xlarge"
        );
    }

    #[test]
    fn spread_moves_the_second_group_to_another_cloud() {
        let c = small();
        let r = req(
            r#"{"groups":[{"name":"a","vcpus":{"min":2,"max":2}},{"name":"b","vcpus":{"min":2,"max":2}}],
                "policy":{"weights":{"cost":1,"spread":2}}}"#,
        );
        let a = place(&c, &r, &DynamicScores::new()).unwrap();
        assert_eq!(winner(&a, 0), "gcp/us-east1/e2-standard-2");
        assert_eq!(a.groups[1].ranking[0].csp, "aws");
        assert_eq!(a.groups[1].ranking[0].scores.spread, Some(1.0));
    }

    #[test]
    fn latency_filter_and_criterion() {
        let c = Catalog::embedded();
        let r = req(r#"{"groups":[{"name":"g","clouds":["gcp"]}],
                "policy":{"weights":{"latency":1},"latency_from":["aws/ap-northeast-2"],"filters":{"max_latency_ms":60}},"limit":3}"#);
        let a = place(&c, &r, &DynamicScores::new()).unwrap();
        let g = &a.groups[0];
        assert!(
            g.filters
                .iter()
                .any(|f| f.filter == "max_latency_ms" && f.removed > 0)
        );
        assert!(g.ranking.iter().all(|c| c.latency_ms.unwrap() <= 60.0));
        assert!(g.ranking[0].latency_ms <= g.ranking[1].latency_ms);
    }

    #[test]
    fn bad_requests_get_precise_errors() {
        let c = small();
        let err = |json: &str| match parse_request(json.as_bytes()) {
            Err(e) => e.to_string(),
            Ok(r) => place(&c, &r, &DynamicScores::new())
                .unwrap_err()
                .to_string(),
        };
        let e = err(r#"{"groups":[{"name":"a","cpus":2}]}"#);
        assert!(e.contains("unknown field `cpus`"), "{e}");
        let e = err(r#"{"groups":[{"name":"a","vcpus":{"min":8,"max":2}}]}"#);
        assert_eq!(e, "groups[0].vcpus: min 8 is greater than max 2");
        let e = err(r#"{"groups":[{"name":"a","regions":["aws/mars-1"]}]}"#);
        assert_eq!(
            e,
            "groups[0].regions: unknown region \"aws/mars-1\" (not in the catalog)"
        );
        let e = err(r#"{"groups":[{"name":"a","clouds":["oracle"]}]}"#);
        assert_eq!(
            e,
            "groups[0].clouds: unknown cloud \"oracle\" (not in the catalog)"
        );
        let e = err(r#"{"groups":[{"name":"a"}],"policy":{"weights":{"cost":0}}}"#);
        assert!(e.contains("all weights are zero"), "{e}");
        let e = err(r#"{"groups":[{"name":"a"}],"policy":{"weights":{"cost":-1}}}"#);
        assert_eq!(
            e,
            "policy.weights: cost is -1: weights must be non-negative numbers"
        );
        let e = err(r#"{"groups":[{"name":"a"}],"policy":{"weights":{"location":1}}}"#);
        assert!(e.starts_with("policy.locations:"), "{e}");
        let e = err(r#"{"groups":[{"name":"a","min_price_per_hour":1,"max_price_per_hour":0.5}]}"#);
        assert_eq!(e, "groups[0].price_per_hour: min 1 is greater than max 0.5");
    }

    #[test]
    fn normalization_edges() {
        assert_eq!(
            normalize(&[Some(1.0), None, Some(3.0)], true),
            vec![0.0, 0.0, 1.0]
        );
        assert_eq!(normalize(&[Some(2.0), Some(2.0)], false), vec![1.0, 1.0]);
        let d = haversine_km(37.5665, 126.978, 35.6762, 139.6503);
        assert!((d - 1152.0).abs() < 10.0, "{d}");
    }
}
