//! CB-Tumblebug's `mcisRecommendVm`: its request body unchanged, its answer shape (a list of spec objects) and,
//! with one priority, its ranking rules (cb-tumblebug `src/core/mcis/recommendation.go`, `RecommendVm`):
//!
//! - filters: `cpu`, `memory`, `cost` with `<=`, `>=`, `==`; `region`, `provider`, `specname` match as a
//!   case-insensitive substring (Tumblebug's SQL `LIKE %x%`); other metrics are ignored, as Tumblebug does;
//! - `cost`: cheapest first; `performance`: `evaluationScore01` highest first;
//! - `location` (`coordinateClose`: one `"lat/lon"`; `coordinateFair`: the centroid of several): haversine distance
//!   to the region; equal distances share a rank and the cheaper spec goes first;
//! - `latency` (`latencyMinimal`: regions as `csp-region`): sum of RTTs from them, equal sums broken by cost;
//! - no priority: cost; several priorities: Tumblebug keeps only the last one, Damselfly combines them with their
//!   weights (the weighted placement of [`crate::placement`]);
//! - `limit`: a string or a number; not an integer means no limit (Tumblebug's `strconv.Atoi` failing).
//!
//! `evaluationScore09` is the normalized score (1 best), `evaluationScore10` the raw distance (km) or latency (ms),
//! `orderInFilteredResult` the rank (shared by ties in location/latency), as in Tumblebug.

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Spec};
use crate::error::RequestError;
use crate::placement::{
    self, Bounds, DynamicScores, GroupRequest, PlacementRequest, Point, Policy, Weights,
    haversine_km,
};

/// A string or a number (Tumblebug's `weight`, `limit` and `operand` are strings; clients send numbers too).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StrOrNum {
    Str(String),
    Num(f64),
}

impl StrOrNum {
    fn text(&self) -> String {
        match self {
            StrOrNum::Str(s) => s.trim().to_string(),
            StrOrNum::Num(n) => n.to_string(),
        }
    }
    fn number(&self) -> Option<f64> {
        match self {
            StrOrNum::Str(s) => s.replace(' ', "").parse().ok(),
            StrOrNum::Num(n) => Some(*n),
        }
    }
}

/// Tumblebug's `DeploymentPlan`. Unknown fields are ignored, as Go's `encoding/json` does.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct DeploymentPlan {
    #[serde(default)]
    pub filter: FilterInfo,
    #[serde(default)]
    pub priority: PriorityInfo,
    #[serde(default)]
    pub limit: Option<StrOrNum>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct FilterInfo {
    #[serde(default)]
    pub policy: Option<Vec<FilterCondition>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FilterCondition {
    pub metric: String,
    #[serde(default)]
    pub condition: Option<Vec<Operation>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Operation {
    #[serde(default)]
    pub operator: String,
    pub operand: StrOrNum,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PriorityInfo {
    #[serde(default)]
    pub policy: Option<Vec<PriorityCondition>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PriorityCondition {
    pub metric: String,
    #[serde(default)]
    pub weight: Option<StrOrNum>,
    #[serde(default)]
    pub parameter: Option<Vec<ParameterKeyVal>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ParameterKeyVal {
    pub key: String,
    #[serde(default)]
    pub val: Vec<String>,
}

/// One recommended spec, with Tumblebug's `TbSpecInfo` field names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TbSpec {
    pub id: String,
    pub connection_name: String,
    pub provider_name: String,
    pub region_name: String,
    pub csp_spec_name: String,
    #[serde(rename = "numvCPU")]
    pub num_vcpu: Option<f64>,
    #[serde(rename = "memGiB")]
    pub mem_gib: Option<f64>,
    pub cost_per_hour: Option<f64>,
    pub evaluation_score01: Option<f64>,
    pub evaluation_score09: f64,
    pub evaluation_score10: Option<f64>,
    pub order_in_filtered_result: usize,
}

/// Parses the body (Tumblebug's JSON, unchanged).
pub fn parse(json: &[u8]) -> Result<DeploymentPlan, RequestError> {
    serde_json::from_slice(json).map_err(|e| RequestError::Parse(e.to_string()))
}

fn parse_point(field: &str, s: &str) -> Result<Point, RequestError> {
    let bad = || RequestError::Invalid {
        field: field.to_string(),
        message: format!("{s:?} is not \"latitude/longitude\""),
    };
    let (lat, lon) = s.split_once('/').ok_or_else(bad)?;
    let lat: f64 = lat.replace(' ', "").parse().map_err(|_| bad())?;
    let lon: f64 = lon.replace(' ', "").parse().map_err(|_| bad())?;
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(bad());
    }
    Ok(Point { lat, lon })
}

/// The filters, as a predicate over specs.
struct TbFilter {
    cpu: Bounds,
    memory: Bounds,
    cost: Bounds,
    region: Option<String>,
    provider: Option<String>,
    specname: Option<String>,
}

fn set(b: &mut Bounds, op: &str, v: f64, field: &str) -> Result<(), RequestError> {
    match op.trim() {
        "<=" => b.max = Some(v),
        ">=" => b.min = Some(v),
        "==" => {
            b.min = Some(v);
            b.max = Some(v);
        }
        other => {
            return Err(RequestError::Invalid {
                field: field.to_string(),
                message: format!("operator {other:?}: expected <=, >= or =="),
            });
        }
    }
    Ok(())
}

fn filters(plan: &DeploymentPlan) -> Result<TbFilter, RequestError> {
    let mut f = TbFilter {
        cpu: Bounds::default(),
        memory: Bounds::default(),
        cost: Bounds::default(),
        region: None,
        provider: None,
        specname: None,
    };
    for (i, p) in plan.filter.policy.iter().flatten().enumerate() {
        let metric = p.metric.trim().to_lowercase();
        for (j, c) in p.condition.iter().flatten().enumerate() {
            let field = format!("filter.policy[{i}].condition[{j}]");
            let number = || {
                c.operand.number().ok_or_else(|| RequestError::Invalid {
                    field: format!("{field}.operand"),
                    message: format!("{:?} is not a number", c.operand.text()),
                })
            };
            match metric.as_str() {
                "cpu" => set(&mut f.cpu, &c.operator, number()?, &field)?,
                "memory" => set(&mut f.memory, &c.operator, number()?, &field)?,
                "cost" => set(&mut f.cost, &c.operator, number()?, &field)?,
                "region" => f.region = Some(c.operand.text().to_lowercase()),
                "provider" => f.provider = Some(c.operand.text().to_lowercase()),
                "specname" => f.specname = Some(c.operand.text().to_lowercase()),
                _ => {}
            }
        }
    }
    for (name, b) in [("cpu", f.cpu), ("memory", f.memory), ("cost", f.cost)] {
        if let (Some(min), Some(max)) = (b.min, b.max)
            && min > max
        {
            return Err(RequestError::ImpossibleBounds {
                field: format!("filter.policy[{name}]"),
                min,
                max,
            });
        }
    }
    Ok(f)
}

impl TbFilter {
    fn keep(&self, s: &Spec) -> bool {
        let within = |b: &Bounds, v: Option<f64>| {
            if b.min.is_none() && b.max.is_none() {
                return true;
            }
            v.is_some_and(|v| b.min.is_none_or(|m| v >= m) && b.max.is_none_or(|m| v <= m))
        };
        let like = |pat: &Option<String>, v: &str| {
            pat.as_ref()
                .is_none_or(|p| v.to_lowercase().contains(p.as_str()))
        };
        within(&self.cpu, s.vcpus)
            && within(&self.memory, s.memory_gib)
            && within(&self.cost, s.price_per_hour)
            && like(&self.region, &format!("{}-{}", s.csp, s.region))
            && like(&self.provider, &s.csp)
            && like(&self.specname, &s.spec)
    }
}

fn tb_spec(
    catalog: &Catalog,
    s: &Spec,
    score09: f64,
    score10: Option<f64>,
    order: usize,
) -> TbSpec {
    let region = catalog.region_of(s);
    let connection = format!("{}-{}", s.csp, region.region.to_lowercase());
    TbSpec {
        id: format!("{connection}-{}", s.spec),
        connection_name: connection,
        provider_name: s.csp.clone(),
        region_name: s.region.clone(),
        csp_spec_name: s.spec.clone(),
        num_vcpu: s.vcpus,
        mem_gib: s.memory_gib,
        cost_per_hour: s.price_per_hour,
        evaluation_score01: s.score,
        evaluation_score09: score09,
        evaluation_score10: score10,
        order_in_filtered_result: order,
    }
}

/// Tumblebug's "distance" for a value that cannot be computed (its `getDistance` and `GetLatency` error value).
const UNKNOWN_DISTANCE: f64 = 999_999.0;

/// Answers a Tumblebug `mcisRecommendVm` request over the catalog.
pub fn recommend(catalog: &Catalog, plan: &DeploymentPlan) -> Result<Vec<TbSpec>, RequestError> {
    let filter = filters(plan)?;
    let limit = plan
        .limit
        .as_ref()
        .and_then(|l| match l {
            StrOrNum::Str(s) => s.trim().parse::<i64>().ok(),
            StrOrNum::Num(n) if n.fract() == 0.0 => Some(*n as i64),
            StrOrNum::Num(_) => None,
        })
        .filter(|n| *n > 0)
        .map_or(usize::MAX, |n| n as usize);
    let policies = plan.priority.policy.clone().unwrap_or_default();
    for (i, p) in policies.iter().enumerate() {
        if let Some(w) = &p.weight {
            match w.number() {
                Some(v) if v.is_finite() && v >= 0.0 => {}
                _ => {
                    return Err(RequestError::Weights(format!(
                        "priority.policy[{i}].weight {:?} is not a non-negative number",
                        w.text()
                    )));
                }
            }
        }
    }
    if policies.len() > 1 {
        return weighted(catalog, plan, &policies, limit);
    }
    let specs: Vec<&Spec> = catalog.specs.iter().filter(|s| filter.keep(s)).collect();
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let metric = policies.first().map(|p| p.metric.trim().to_lowercase());
    let mut out = match metric.as_deref() {
        Some("location") => {
            let points = location_points(&policies[0])?;
            let centroid = centroid(&points);
            by_distance(catalog, &specs, |s| {
                let r = catalog.region_of(s);
                match (r.latitude, r.longitude, centroid) {
                    (Some(lat), Some(lon), Some(c)) => haversine_km(lat, lon, c.lat, c.lon),
                    _ => UNKNOWN_DISTANCE,
                }
            })
        }
        Some("latency") => {
            let from = latency_regions(catalog, &policies[0])?;
            by_distance(catalog, &specs, |s| {
                let to = catalog.region_of(s).latency_key();
                from.iter()
                    .map(|f| catalog.latency.get(f, &to).unwrap_or(UNKNOWN_DISTANCE))
                    .sum()
            })
        }
        Some("performance") => {
            let mut sorted = specs.clone();
            // Unknown scores (`-1` in Tumblebug's files) last.
            let score = |s: &Spec| s.score.unwrap_or(-1.0);
            sorted.sort_by(|a, b| score(b).total_cmp(&score(a)));
            let max = sorted.first().map_or(0.0, |s| score(s));
            let min = sorted.last().map_or(0.0, |s| score(s));
            sorted
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    tb_spec(
                        catalog,
                        s,
                        (score(s) - min) / (max - min + 1e-7),
                        None,
                        i + 1,
                    )
                })
                .collect()
        }
        // `cost`, `random` (a shuffle would not be reproducible: cost order) and anything else: cost, as Tumblebug's
        // default branch.
        _ => {
            let mut sorted = specs.clone();
            let cost = |s: &Spec| s.price_per_hour.unwrap_or(f64::INFINITY);
            sorted.sort_by(|a, b| cost(a).total_cmp(&cost(b)));
            let known: Vec<f64> = sorted.iter().filter_map(|s| s.price_per_hour).collect();
            let min = known.first().copied().unwrap_or(0.0);
            let max = known.last().copied().unwrap_or(0.0);
            sorted
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let score = s
                        .price_per_hour
                        .map_or(0.0, |c| (max - c) / (max - min + 1e-7));
                    tb_spec(catalog, s, score, None, i + 1)
                })
                .collect::<Vec<_>>()
        }
    };
    out.truncate(limit);
    Ok(out)
}

/// Tumblebug's location/latency ranking: sort by distance; equal distances share a rank (`orderInFilteredResult`)
/// and the cheaper spec goes first.
fn by_distance(catalog: &Catalog, specs: &[&Spec], distance: impl Fn(&Spec) -> f64) -> Vec<TbSpec> {
    let mut d: Vec<(f64, &Spec)> = specs.iter().map(|s| (distance(s), *s)).collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    let min = d.first().map_or(0.0, |x| x.0);
    let max = d.last().map_or(0.0, |x| x.0);
    let mut ranked: Vec<(usize, f64, &Spec)> = Vec::with_capacity(d.len());
    let mut rank = 1;
    for (i, (dist, s)) in d.iter().enumerate() {
        if i > 0 && *dist > d[i - 1].0 {
            rank += 1;
        }
        ranked.push((rank, *dist, s));
    }
    let cost = |s: &Spec| s.price_per_hour.unwrap_or(f64::INFINITY);
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| cost(a.2).total_cmp(&cost(b.2))));
    ranked
        .into_iter()
        .map(|(rank, dist, s)| {
            tb_spec(
                catalog,
                s,
                (max - dist) / (max - min + 1e-7),
                Some(dist),
                rank,
            )
        })
        .collect()
}

fn location_points(p: &PriorityCondition) -> Result<Vec<Point>, RequestError> {
    let mut points = Vec::new();
    for (i, kv) in p.parameter.iter().flatten().enumerate() {
        match kv.key.as_str() {
            "coordinateClose" => {
                if let Some(v) = kv.val.first() {
                    points.push(parse_point(&format!("priority.parameter[{i}].val[0]"), v)?);
                }
            }
            "coordinateFair" | "coordinateWithin" => {
                for (j, v) in kv.val.iter().enumerate() {
                    points.push(parse_point(
                        &format!("priority.parameter[{i}].val[{j}]"),
                        v,
                    )?);
                }
            }
            _ => {}
        }
    }
    if points.is_empty() {
        return Err(RequestError::Invalid {
            field: "priority.policy[0].parameter".into(),
            message: "location needs coordinateClose or coordinateFair with \"lat/lon\" values"
                .into(),
        });
    }
    Ok(points)
}

fn centroid(points: &[Point]) -> Option<Point> {
    if points.is_empty() {
        return None;
    }
    let n = points.len() as f64;
    Some(Point {
        lat: points.iter().map(|p| p.lat).sum::<f64>() / n,
        lon: points.iter().map(|p| p.lon).sum::<f64>() / n,
    })
}

fn latency_regions(catalog: &Catalog, p: &PriorityCondition) -> Result<Vec<String>, RequestError> {
    let mut from = Vec::new();
    for (i, kv) in p.parameter.iter().flatten().enumerate() {
        if kv.key == "latencyMinimal" {
            for v in &kv.val {
                let key = v.trim().to_lowercase().replacen('/', "-", 1);
                if !catalog.latency.contains(&key) {
                    return Err(RequestError::UnknownRegion {
                        field: format!("priority.policy[0].parameter[{i}].val"),
                        name: v.clone(),
                    });
                }
                from.push(key);
            }
        }
    }
    if from.is_empty() {
        return Err(RequestError::Invalid {
            field: "priority.policy[0].parameter".into(),
            message: "latency needs latencyMinimal with regions such as \"aws-ap-northeast-2\""
                .into(),
        });
    }
    Ok(from)
}

/// Several priorities: Damselfly's weighted placement, answered in Tumblebug's shape (`evaluationScore09` = the
/// weighted total).
fn weighted(
    catalog: &Catalog,
    plan: &DeploymentPlan,
    policies: &[PriorityCondition],
    limit: usize,
) -> Result<Vec<TbSpec>, RequestError> {
    let f = filters(plan)?;
    let mut policy = Policy {
        weights: Weights::default(),
        ..Policy::default()
    };
    for p in policies {
        let w = p.weight.as_ref().and_then(StrOrNum::number).unwrap_or(1.0);
        match p.metric.trim().to_lowercase().as_str() {
            "location" => {
                policy.weights.location += w;
                policy.locations = location_points(p)?;
                if let Some(c) = centroid(&policy.locations)
                    && p.parameter
                        .iter()
                        .flatten()
                        .any(|kv| kv.key == "coordinateFair")
                {
                    policy.locations = vec![c];
                }
            }
            "latency" => {
                policy.weights.latency += w;
                policy.latency_from = latency_regions(catalog, p)?;
            }
            "performance" => policy.weights.performance += w,
            _ => policy.weights.cost += w,
        }
    }
    // Tumblebug's filters first, on a copy of the catalog: the normalization then sees only the candidates.
    let mut sub = catalog.clone();
    sub.specs.retain(|s| f.keep(s));
    let req = PlacementRequest {
        groups: vec![GroupRequest {
            name: "vm".into(),
            count: 1,
            vcpus: None,
            memory_gib: None,
            max_price_per_hour: None,
            min_price_per_hour: None,
            os: None,
            clouds: Vec::new(),
            regions: Vec::new(),
            specs: Vec::new(),
        }],
        policy,
        limit: Some(limit),
    };
    let answer = placement::place(&sub, &req, &DynamicScores::new())?;
    let mut out = Vec::new();
    for c in answer.groups.into_iter().flat_map(|g| g.ranking) {
        let Some(spec) = sub.specs.get(c.index) else {
            continue;
        };
        out.push(tb_spec(
            &sub,
            spec,
            c.total,
            c.distance_km.or(c.latency_ms),
            c.rank,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(c: &Catalog, json: &str) -> Vec<TbSpec> {
        recommend(c, &parse(json.as_bytes()).unwrap()).unwrap()
    }

    const SEOUL: &str = "37.5665/126.9780";

    /// Nearest distance (km) from a point to any region holding a spec that passes `keep`.
    fn nearest(c: &Catalog, lat: f64, lon: f64, keep: impl Fn(&Spec) -> bool) -> f64 {
        c.specs
            .iter()
            .filter(|s| keep(s))
            .filter_map(|s| {
                let r = c.region_of(s);
                Some(haversine_km(lat, lon, r.latitude?, r.longitude?))
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Tumblebug's order for location and latency: rank by distance, cost within a rank.
    fn assert_distance_order(r: &[TbSpec]) {
        for w in r.windows(2) {
            assert!(w[0].evaluation_score10 <= w[1].evaluation_score10, "{w:?}");
            if w[0].order_in_filtered_result == w[1].order_in_filtered_result {
                assert_eq!(w[0].evaluation_score10, w[1].evaluation_score10);
                assert!(w[0].cost_per_hour <= w[1].cost_per_hour, "{w:?}");
            } else {
                assert_eq!(
                    w[0].order_in_filtered_result + 1,
                    w[1].order_in_filtered_result
                );
            }
        }
    }

    #[test]
    fn case1_location_at_seoul_puts_the_seoul_region_first_cost_breaking_ties() {
        let c = Catalog::embedded();
        let r = run(
            &c,
            &format!(
                r#"{{"filter":{{"policy":[]}},"priority":{{"policy":[{{"metric":"location","weight":"0.3",
                "parameter":[{{"key":"coordinateClose","val":["{SEOUL}"]}}]}}]}},"limit":"10"}}"#
            ),
        );
        assert_eq!(r.len(), 10);
        assert_distance_order(&r);
        // Azure's Korea Central sits on the point (HEAD's cloudinfo coordinates): rank 1, cheapest first.
        assert_eq!(r[0].connection_name, "azure-koreacentral");
        assert_eq!(r[0].csp_spec_name, "Standard_B1s");
        assert_eq!(
            r[0].evaluation_score10,
            Some(nearest(&c, 37.5665, 126.978, |_| true))
        );
        let seoul_specs = c
            .specs
            .iter()
            .filter(|s| s.csp == "azure" && s.region == "koreacentral")
            .count();
        assert!(
            r.iter()
                .take(seoul_specs)
                .all(|s| s.order_in_filtered_result == 1)
        );
        // Then Tencent's ap-seoul, 5 m away.
        assert_eq!(r[seoul_specs].connection_name, "tencent-ap-seoul");
    }

    #[test]
    fn case2_location_at_seoul_among_aws_picks_ap_northeast_2_cheapest_first() {
        let c = Catalog::embedded();
        let r = run(
            &c,
            &format!(
                r#"{{"filter":{{"policy":[{{"metric":"provider","condition":[{{"operand":"aws"}}]}}]}},
                "priority":{{"policy":[{{"metric":"location","weight":1,"parameter":[{{"key":"coordinateClose","val":["{SEOUL}"]}}]}}]}},
                "limit":5}}"#
            ),
        );
        assert_distance_order(&r);
        let names: Vec<&str> = r.iter().map(|s| s.csp_spec_name.as_str()).collect();
        assert_eq!(
            names,
            ["t3a.nano", "t3.nano", "t2.nano", "t3a.micro", "t3.micro"]
        );
        assert!(r.iter().all(|s| s.connection_name == "aws-ap-northeast-2"));
        let d = nearest(&c, 37.5665, 126.978, |s| s.csp == "aws");
        assert_eq!(r[0].evaluation_score10, Some(d));
    }

    #[test]
    fn case3_cost_and_default_rank_cheapest_first() {
        let c = Catalog::embedded();
        for body in [r#"{"priority":{"policy":[{"metric":"cost"}]}}"#, r#"{}"#] {
            let r = run(&c, body);
            assert_eq!(r.len(), c.specs.len());
            let min = c
                .specs
                .iter()
                .filter_map(|s| s.price_per_hour)
                .fold(f64::INFINITY, f64::min);
            assert_eq!(r[0].cost_per_hour, Some(min));
            assert!(r.windows(2).all(|w| w[0].cost_per_hour.unwrap_or(f64::MAX)
                <= w[1].cost_per_hour.unwrap_or(f64::MAX)));
            assert!((r[0].evaluation_score09 - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn case4_performance_ranks_evaluation_score01_highest_first() {
        let c = Catalog::embedded();
        let r = run(
            &c,
            r#"{"filter":{"policy":[{"metric":"cost","condition":[{"operator":"<=","operand":"1"}]}]},"priority":{"policy":[{"metric":"performance"}]}}"#,
        );
        assert!(r.iter().all(|s| s.cost_per_hour.unwrap() <= 1.0));
        let max = c
            .specs
            .iter()
            .filter(|s| s.price_per_hour.is_some_and(|p| p <= 1.0))
            .filter_map(|s| s.score)
            .fold(0.0, f64::max);
        assert_eq!(r[0].evaluation_score01, Some(max));
        assert!(
            r.windows(2).all(|w| w[0].evaluation_score01.unwrap_or(-1.0)
                >= w[1].evaluation_score01.unwrap_or(-1.0))
        );
    }

    #[test]
    fn case5_latency_from_seoul_puts_ap_northeast_2_first() {
        let c = Catalog::embedded();
        let r = run(
            &c,
            r#"{"priority":{"policy":[{"metric":"latency","weight":"1.0","parameter":[{"key":"latencyMinimal","val":["aws-ap-northeast-2"]}]}]},"limit":"20"}"#,
        );
        assert_distance_order(&r);
        assert_eq!(r[0].connection_name, "aws-ap-northeast-2");
        assert_eq!(r[0].csp_spec_name, "t3a.nano");
        assert_eq!(
            r[0].evaluation_score10,
            c.latency.get("aws-ap-northeast-2", "aws-ap-northeast-2")
        );
    }

    #[test]
    fn case6_coordinate_fair_uses_the_centroid() {
        let c = Catalog::embedded();
        // Seoul and Tokyo: the centroid is in the sea between them.
        let r = run(
            &c,
            r#"{"priority":{"policy":[{"metric":"location","parameter":[{"key":"coordinateFair","val":["37.5665/126.9780","35.6762/139.6503"]}]}]},"limit":"3"}"#,
        );
        assert_distance_order(&r);
        let (lat, lon) = ((37.5665 + 35.6762) / 2.0, (126.978 + 139.6503) / 2.0);
        assert_eq!(
            r[0].evaluation_score10,
            Some(nearest(&c, lat, lon, |_| true))
        );
    }

    #[test]
    fn case7_limit_and_weight_as_string_or_number() {
        let c = Catalog::embedded();
        let body = |limit: &str| {
            format!(
                r#"{{"priority":{{"policy":[{{"metric":"cost","weight":0.5}}]}},"limit":{limit}}}"#
            )
        };
        assert_eq!(run(&c, &body("3")).len(), 3);
        assert_eq!(run(&c, &body("\"3\"")).len(), 3);
        // Not an integer: no limit, as Tumblebug's strconv.Atoi failing.
        assert_eq!(run(&c, &body("\"all\"")).len(), c.specs.len());
        // Unknown fields are ignored, as Go's encoding/json does.
        assert_eq!(run(&c, r#"{"limit":"2","extra":{"x":1}}"#).len(), 2);
    }

    #[test]
    fn case8_several_priorities_combine_with_their_weights() {
        let c = Catalog::embedded();
        let body = |w_cost: &str, w_loc: &str| {
            format!(
                r#"{{"priority":{{"policy":[{{"metric":"cost","weight":"{w_cost}"}},
                {{"metric":"location","weight":"{w_loc}","parameter":[{{"key":"coordinateClose","val":["50.1109/8.6821"]}}]}}]}},"limit":"1"}}"#
            )
        };
        // Cost alone: the cheapest spec (in Seoul); location dominant: a Frankfurt-area region.
        let cheap = run(&c, &body("1", "0"));
        assert_eq!(cheap[0].csp_spec_name, "t3a.nano");
        let near = run(&c, &body("0.01", "1"));
        assert!(near[0].evaluation_score10.unwrap() < 50.0, "{near:?}");
        assert_ne!(cheap[0].connection_name, near[0].connection_name);
    }

    #[test]
    fn bad_tumblebug_requests() {
        let c = Catalog::embedded();
        let err = |json: &str| {
            recommend(&c, &parse(json.as_bytes()).unwrap())
                .unwrap_err()
                .to_string()
        };
        let e = err(
            r#"{"priority":{"policy":[{"metric":"location","parameter":[{"key":"coordinateClose","val":["37.5,126.9"]}]}]}}"#,
        );
        assert!(e.contains("is not \"latitude/longitude\""), "{e}");
        let e = err(
            r#"{"priority":{"policy":[{"metric":"latency","parameter":[{"key":"latencyMinimal","val":["aws-mars-1"]}]}]}}"#,
        );
        assert!(e.contains("unknown region \"aws-mars-1\""), "{e}");
        let e = err(
            r#"{"filter":{"policy":[{"metric":"cost","condition":[{"operator":">=","operand":"2"},{"operator":"<=","operand":"1"}]}]}}"#,
        );
        assert_eq!(e, "filter.policy[cost]: min 2 is greater than max 1");
        let e = err(r#"{"priority":{"policy":[{"metric":"cost","weight":"heavy"}]}}"#);
        assert!(e.contains("weight \"heavy\""), "{e}");
    }
}
