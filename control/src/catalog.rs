//! The catalog: VM specs, region coordinates and the inter-region latency map.
//!
//! Files are recognised by their header row, never by their name:
//!
//! | Kind | Header (columns matched by name, any order) |
//! |---|---|
//! | Tumblebug spec (v0.8.0, v0.11.0, HEAD) | `providerName`, `regionName`, `cspSpecName`, `costPerHour` or `CostPerHour`, `evaluationScore01`, ... |
//! | spec joined with coordinates | `provider`, `region`, `cspSpecName`, `costPerHourUSD`, `latitude`, `longitude`, ... |
//! | Damselfly catalog | `csp`, `region`, `spec`, optional `vcpus`, `memory_gib`, `price_per_hour`, `currency`, `os`, `score`, `latitude`, `longitude` |
//! | Tumblebug location (v0.8.0) | `CloudType`, `ID`, `DisplayName`, `Latitude`, `Longitude` |
//! | region coordinates (from cloudinfo.yaml) | `provider`, `region`, `display`, `latitude`, `longitude` |
//! | latency map | an empty first cell, then `csp-region` names; one row per region, RTT in ms |
//!
//! Missing values are unknown (`None`), never zero: Tumblebug's spec files have no vCPU or memory columns, and its
//! `evaluationScore01` of `-1` (or empty) means "not evaluated".

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::error::CatalogError;

/// One VM spec in one region of one cloud.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spec {
    /// Cloud, lowercase (`aws`, `gcp`, `ncp`, ...).
    pub csp: String,
    /// Region as the file spells it (a `csp-` prefix, as in Tumblebug v0.8.0, removed).
    pub region: String,
    /// The cloud's name for the spec (`t3.large`).
    pub spec: String,
    pub vcpus: Option<f64>,
    pub memory_gib: Option<f64>,
    pub price_per_hour: Option<f64>,
    pub currency: Option<String>,
    /// Operating systems the spec is offered with (empty: unknown, any).
    pub os: Vec<String>,
    /// Static performance score (Tumblebug's `evaluationScore01`; higher is better).
    pub score: Option<f64>,
    /// Index into [`Catalog::regions`].
    #[serde(skip)]
    pub loc: u32,
}

/// A region of a cloud, with coordinates when a file gave them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Region {
    pub csp: String,
    pub region: String,
    pub display: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

impl Region {
    /// The key of the region in the latency map: `csp-region`, lowercase.
    pub fn latency_key(&self) -> String {
        format!("{}-{}", self.csp, self.region.to_lowercase())
    }
}

/// Round-trip times between regions in milliseconds (Tumblebug's `cloudlatencymap.csv`).
#[derive(Debug, Clone, Default)]
pub struct LatencyMap {
    index: HashMap<String, usize>,
    n: usize,
    rtt: Vec<Option<f64>>,
}

impl LatencyMap {
    /// The RTT in ms between two regions given as `csp-region` (case-insensitive); `None` when either is not in the
    /// map or the cell is empty.
    pub fn get(&self, from: &str, to: &str) -> Option<f64> {
        let i = *self.index.get(&from.to_lowercase())?;
        let j = *self.index.get(&to.to_lowercase())?;
        self.rtt[i * self.n + j]
    }

    /// Whether the map names this region (`csp-region`).
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(&key.to_lowercase())
    }

    /// Number of regions in the map.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// What a file held, as recognised from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    TumblebugSpec,
    SpecWithCoords,
    DamselflySpec,
    TumblebugLocation,
    RegionCoords,
    LatencyMap,
}

/// Specs, regions and latencies, loaded from any number of files.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub specs: Vec<Spec>,
    pub regions: Vec<Region>,
    region_index: HashMap<(String, String), u32>,
    /// (csp, region, spec name) → index in `specs`: a later file's row replaces an earlier one.
    spec_index: HashMap<(u32, String), usize>,
    pub latency: LatencyMap,
}

/// The files embedded in the binary, in load order: Tumblebug's v0.8.0, v0.11.0 and HEAD specs (v0.8.0 names a
/// region for every spec; v0.11.0 and HEAD add clouds and replace v0.8.0's rows for the same cloud, region and spec),
/// v0.8.0's locations, then HEAD's region coordinates (replacing v0.8.0's where both have a region), and the
/// latency map.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "tumblebug_v0.8.0_cloudspec.csv",
        include_str!("../data/tumblebug_v0.8.0_cloudspec.csv"),
    ),
    (
        "tumblebug_v0.11.0_cloudspec.csv",
        include_str!("../data/tumblebug_v0.11.0_cloudspec.csv"),
    ),
    (
        "tumblebug_HEAD_cloudspec.csv",
        include_str!("../data/tumblebug_HEAD_cloudspec.csv"),
    ),
    (
        "tumblebug_v0.8.0_cloudlocation.csv",
        include_str!("../data/tumblebug_v0.8.0_cloudlocation.csv"),
    ),
    (
        "derived_region_coords_HEAD.csv",
        include_str!("../data/derived_region_coords_HEAD.csv"),
    ),
    (
        "tumblebug_HEAD_cloudlatencymap.csv",
        include_str!("../data/tumblebug_HEAD_cloudlatencymap.csv"),
    ),
];

/// Lowercase key of a region; a `csp-` prefix (Tumblebug v0.8.0's `aws-ap-northeast-2`) is removed.
fn region_key(csp: &str, region: &str) -> (String, String) {
    let csp = csp.trim().to_lowercase();
    let region = region.trim().to_lowercase();
    let region = match region.strip_prefix(&format!("{csp}-")) {
        Some(rest) if !rest.is_empty() => rest.to_string(),
        _ => region,
    };
    (csp, region)
}

fn strip_csp_prefix(csp: &str, region: &str) -> String {
    let region = region.trim();
    let prefix = format!("{}-", csp.to_lowercase());
    if region.len() > prefix.len() && region.to_lowercase().starts_with(&prefix) {
        region[prefix.len()..].to_string()
    } else {
        region.to_string()
    }
}

/// A number cell: empty, `-1` for scores, or text that is not a number are unknown.
fn num(cell: Option<&str>) -> Option<f64> {
    let s = cell?.trim();
    if s.is_empty() {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn text(cell: Option<&str>) -> Option<String> {
    cell.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Column positions by name.
struct Columns(HashMap<String, usize>);

impl Columns {
    fn new(header: &csv::StringRecord) -> Columns {
        Columns(
            header
                .iter()
                .enumerate()
                .map(|(i, h)| (h.trim().trim_start_matches('\u{feff}').to_string(), i))
                .collect(),
        )
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    /// The first of `names` present.
    fn find(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|n| self.0.get(*n).copied())
    }
}

fn get(rec: &csv::StringRecord, c: Option<usize>) -> Option<&str> {
    c.and_then(|c| rec.get(c))
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Catalog {
        Catalog::default()
    }

    /// The catalog built into the binary (see `control/data/README.md`).
    pub fn embedded() -> Catalog {
        let mut catalog = Catalog::new();
        for (name, text) in EMBEDDED {
            // The embedded files are tested (`embedded_catalog_loads`); a failure here is a build defect.
            if let Err(e) = catalog.load_str(name, text) {
                panic!("embedded catalog file {name}: {e}");
            }
        }
        catalog
    }

    /// Loads a file, recognising its kind by its header.
    pub fn load_path(&mut self, path: &Path) -> Result<FileKind, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError::Io {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        self.load_str(&path.display().to_string(), &text)
    }

    /// Loads file contents; `name` is only for messages.
    pub fn load_str(&mut self, name: &str, text: &str) -> Result<FileKind, CatalogError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(text.as_bytes());
        let header = reader
            .headers()
            .map_err(|e| CatalogError::Csv {
                file: name.to_string(),
                message: e.to_string(),
            })?
            .clone();
        let cols = Columns::new(&header);
        let kind = if header.get(0).is_some_and(|h| h.trim().is_empty())
            && header.len() > 1
            && header
                .iter()
                .skip(1)
                .all(|h| h.is_empty() || h.contains('-'))
        {
            FileKind::LatencyMap
        } else if cols.has("providerName") && cols.has("regionName") && cols.has("cspSpecName") {
            FileKind::TumblebugSpec
        } else if cols.has("provider") && cols.has("region") && cols.has("cspSpecName") {
            FileKind::SpecWithCoords
        } else if cols.has("csp") && cols.has("region") && cols.has("spec") {
            FileKind::DamselflySpec
        } else if cols.has("CloudType") && cols.has("ID") && cols.has("Latitude") {
            FileKind::TumblebugLocation
        } else if cols.has("provider") && cols.has("region") && cols.has("latitude") {
            FileKind::RegionCoords
        } else {
            let shown: Vec<&str> = header.iter().take(6).collect();
            return Err(CatalogError::UnknownHeader {
                file: name.to_string(),
                header: shown.join(","),
            });
        };
        let mut records = Vec::new();
        for (i, rec) in reader.records().enumerate() {
            let rec = rec.map_err(|e| CatalogError::Csv {
                file: name.to_string(),
                message: format!("row {}: {e}", i + 2),
            })?;
            records.push(rec);
        }
        match kind {
            FileKind::LatencyMap => self.load_latency(&header, &records),
            FileKind::TumblebugLocation => self.load_coords(
                &cols,
                &records,
                ["CloudType", "ID", "DisplayName", "Latitude", "Longitude"],
            ),
            FileKind::RegionCoords => self.load_coords(
                &cols,
                &records,
                ["provider", "region", "display", "latitude", "longitude"],
            ),
            _ => self.load_specs(name, &cols, &records)?,
        }
        Ok(kind)
    }

    /// The index of a region, created if new.
    fn intern(&mut self, csp: &str, region: &str) -> u32 {
        let key = region_key(csp, region);
        if let Some(&i) = self.region_index.get(&key) {
            return i;
        }
        let i = self.regions.len() as u32;
        self.regions.push(Region {
            csp: key.0.clone(),
            region: strip_csp_prefix(csp, region),
            display: None,
            latitude: None,
            longitude: None,
        });
        self.region_index.insert(key, i);
        i
    }

    /// The region named `csp` / `region` (case-insensitive; a `csp-` prefix accepted).
    pub fn region(&self, csp: &str, region: &str) -> Option<&Region> {
        let i = *self.region_index.get(&region_key(csp, region))?;
        self.regions.get(i as usize)
    }

    /// The region of a spec.
    pub fn region_of(&self, spec: &Spec) -> &Region {
        &self.regions[spec.loc as usize]
    }

    fn set_coords(
        &mut self,
        loc: u32,
        display: Option<String>,
        lat: Option<f64>,
        lon: Option<f64>,
    ) {
        let r = &mut self.regions[loc as usize];
        if display.is_some() {
            r.display = display;
        }
        if let (Some(lat), Some(lon)) = (lat, lon) {
            r.latitude = Some(lat);
            r.longitude = Some(lon);
        }
    }

    fn load_coords(&mut self, cols: &Columns, records: &[csv::StringRecord], names: [&str; 5]) {
        let [c_csp, c_region, c_display, c_lat, c_lon] = names.map(|n| cols.find(&[n]));
        for rec in records {
            let (Some(csp), Some(region)) = (
                text(c_csp.and_then(|c| rec.get(c))),
                text(c_region.and_then(|c| rec.get(c))),
            ) else {
                continue;
            };
            let loc = self.intern(&csp, &region);
            let lat = num(c_lat.and_then(|c| rec.get(c)));
            let lon = num(c_lon.and_then(|c| rec.get(c)));
            self.set_coords(loc, text(c_display.and_then(|c| rec.get(c))), lat, lon);
        }
    }

    fn load_latency(&mut self, header: &csv::StringRecord, records: &[csv::StringRecord]) {
        let names: Vec<String> = header
            .iter()
            .skip(1)
            .map(|h| h.trim().to_lowercase())
            .collect();
        let n = names.len();
        let mut index = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            if !name.is_empty() {
                index.insert(name.clone(), i);
            }
        }
        let mut rtt = vec![None; n * n];
        for rec in records {
            let Some(row_name) = text(rec.get(0)) else {
                continue;
            };
            let Some(&i) = index.get(&row_name.to_lowercase()) else {
                continue;
            };
            for j in 0..n {
                rtt[i * n + j] = num(rec.get(j + 1));
            }
        }
        self.latency = LatencyMap { index, n, rtt };
    }

    fn load_specs(
        &mut self,
        name: &str,
        cols: &Columns,
        records: &[csv::StringRecord],
    ) -> Result<(), CatalogError> {
        let c_csp = cols.find(&["providerName", "provider", "csp"]);
        let c_region = cols.find(&["regionName", "region"]);
        let c_spec = cols.find(&["cspSpecName", "spec"]);
        let c_price = cols.find(&[
            "price_per_hour",
            "costPerHour",
            "CostPerHour",
            "costPerHourUSD",
        ]);
        let c_currency = cols.find(&["currency"]);
        let c_vcpus = cols.find(&["vcpus", "numvCPU"]);
        let c_mem = cols.find(&["memory_gib", "memGiB"]);
        let c_score = cols.find(&["score", "evaluationScore01"]);
        let c_os = cols.find(&["os"]);
        let c_lat = cols.find(&["latitude"]);
        let c_lon = cols.find(&["longitude"]);
        let c_display = cols.find(&["regionDisplay"]);
        for (i, rec) in records.iter().enumerate() {
            let (Some(csp), Some(region), Some(spec)) = (
                text(get(rec, c_csp)),
                text(get(rec, c_region)),
                text(get(rec, c_spec)),
            ) else {
                if rec.iter().all(|c| c.trim().is_empty()) {
                    continue;
                }
                return Err(CatalogError::Csv {
                    file: name.to_string(),
                    message: format!("row {}: cloud, region and spec name are required", i + 2),
                });
            };
            let loc = self.intern(&csp, &region);
            let lat = num(get(rec, c_lat));
            let lon = num(get(rec, c_lon));
            if lat.is_some() || c_display.is_some() {
                self.set_coords(loc, text(get(rec, c_display)), lat, lon);
            }
            let positive = |v: Option<f64>| v.filter(|v| *v >= 0.0);
            self.insert_spec(Spec {
                csp: csp.to_lowercase(),
                region: strip_csp_prefix(&csp, &region),
                spec,
                vcpus: positive(num(get(rec, c_vcpus))).filter(|v| *v > 0.0),
                memory_gib: positive(num(get(rec, c_mem))).filter(|v| *v > 0.0),
                price_per_hour: positive(num(get(rec, c_price))),
                currency: text(get(rec, c_currency)),
                os: get(rec, c_os)
                    .map(|s| {
                        s.split([';', '|'])
                            .map(|o| o.trim().to_lowercase())
                            .filter(|o| !o.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
                score: positive(num(get(rec, c_score))),
                loc,
            });
        }
        Ok(())
    }

    /// Adds a spec, or replaces the one with the same cloud, region and name.
    fn insert_spec(&mut self, spec: Spec) {
        let key = (spec.loc, spec.spec.clone());
        match self.spec_index.get(&key) {
            Some(&i) => self.specs[i] = spec,
            None => {
                self.spec_index.insert(key, self.specs.len());
                self.specs.push(spec);
            }
        }
    }

    /// Appends a spec (for generated catalogs and tests).
    pub fn push_spec(&mut self, mut spec: Spec, latitude: Option<f64>, longitude: Option<f64>) {
        spec.loc = self.intern(&spec.csp.clone(), &spec.region.clone());
        spec.csp = spec.csp.to_lowercase();
        self.set_coords(spec.loc, None, latitude, longitude);
        self.insert_spec(spec);
    }

    /// Whether any spec or region belongs to this cloud.
    pub fn has_cloud(&self, csp: &str) -> bool {
        let csp = csp.to_lowercase();
        self.regions.iter().any(|r| r.csp == csp)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn embedded_catalog_loads() {
        let c = Catalog::embedded();
        // 896 + 640 + 173 rows, 1313 distinct (cloud, region, spec).
        assert_eq!(c.specs.len(), 1313);
        assert_eq!(c.latency.len(), 299);
        let seoul = c.region("aws", "ap-northeast-2").unwrap();
        assert_eq!(seoul.latitude, Some(37.36));
        // v0.8.0's `aws-ap-northeast-2` names the same region.
        assert_eq!(c.region("aws", "aws-ap-northeast-2"), Some(seoul));
        assert!(
            c.latency
                .get("aws-ap-northeast-2", "aws-ap-northeast-1")
                .unwrap()
                > 10.0
        );
        // No vCPU or memory in Tumblebug's files: unknown, not zero.
        assert!(
            c.specs
                .iter()
                .all(|s| s.vcpus.is_none() && s.memory_gib.is_none())
        );
        // HEAD's NCP specs have score -1: unknown.
        let ncp = c.specs.iter().find(|s| s.csp == "ncp").unwrap();
        assert_eq!(ncp.score, None);
        assert!(ncp.price_per_hour.unwrap() > 0.0);
    }

    #[test]
    fn kinds_by_header_not_name() {
        let files = [
            ("tumblebug_v0.8.0_cloudspec.csv", FileKind::TumblebugSpec),
            ("tumblebug_v0.11.0_cloudspec.csv", FileKind::TumblebugSpec),
            ("tumblebug_HEAD_cloudspec.csv", FileKind::TumblebugSpec),
            (
                "derived_v0.8.0_spec_with_coords.csv",
                FileKind::SpecWithCoords,
            ),
            (
                "tumblebug_v0.8.0_cloudlocation.csv",
                FileKind::TumblebugLocation,
            ),
            ("derived_region_coords_HEAD.csv", FileKind::RegionCoords),
            ("tumblebug_HEAD_cloudlatencymap.csv", FileKind::LatencyMap),
        ];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
        for (file, kind) in files {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let mut c = Catalog::new();
            assert_eq!(c.load_str("renamed.csv", &text).unwrap(), kind, "{file}");
        }
        let mut c = Catalog::new();
        let v08 = std::fs::read_to_string(dir.join("tumblebug_v0.8.0_cloudspec.csv")).unwrap();
        c.load_str("x", &v08).unwrap();
        assert_eq!(c.specs.len(), 896);
        assert_eq!(c.specs[0].region, "ap-northeast-2");
        assert_eq!(c.specs[0].csp, "alibaba");
        let err = c.load_str("bad.csv", "a,b,c\n1,2,3\n").unwrap_err();
        assert!(err.to_string().contains("bad.csv"), "{err}");
    }

    #[test]
    fn damselfly_catalog_format() {
        let mut c = Catalog::new();
        let kind = c
            .load_str(
                "mine.csv",
                "csp,region,spec,vcpus,memory_gib,price_per_hour,os,score,latitude,longitude\n\
                 aws,ap-northeast-2,t3.large,2,8,0.104,ubuntu;windows,,37.36,126.78\n\
                 gcp,asia-northeast3,e2-standard-2,,,0.08,,55,,\n",
            )
            .unwrap();
        assert_eq!(kind, FileKind::DamselflySpec);
        assert_eq!(c.specs[0].vcpus, Some(2.0));
        assert_eq!(c.specs[0].os, vec!["ubuntu", "windows"]);
        assert_eq!(c.specs[1].vcpus, None);
        assert_eq!(c.specs[1].memory_gib, None);
        assert_eq!(c.specs[1].score, Some(55.0));
        assert_eq!(
            c.region("aws", "ap-northeast-2").unwrap().latitude,
            Some(37.36)
        );
        let err = c
            .load_str("m.csv", "csp,region,spec\naws,,x\n")
            .unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
    }
}
