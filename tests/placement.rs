//! Placement, black-box: `damselfly place` (Damselfly requests and Tumblebug bodies, table and JSON, embedded or
//! given catalogs) and the collector's `POST /api/v1/placement` and `POST /tumblebug/mcisRecommendVm`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{CollectorProc, damselfly_bin, http_post};
use serde_json::Value;

/// The repository's copy of Tumblebug's files.
fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("control/data")
        .join(file)
}

/// Runs `damselfly place ARGS`: (exit code, stdout, stderr).
fn place(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(damselfly_bin())
        .arg("place")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const SEOUL_REQUEST: &str = r#"{
  "groups": [
    {"name": "web", "count": 3, "clouds": ["aws", "gcp", "azure"], "max_price_per_hour": 0.2},
    {"name": "db", "regions": ["aws/ap-northeast-2", "gcp/asia-northeast3", "azure/koreacentral"]}
  ],
  "policy": {
    "weights": {"cost": 1, "location": 2, "spread": 1},
    "locations": [{"lat": 37.5665, "lon": 126.978}]
  },
  "limit": 5
}"#;

#[test]
fn cli_places_a_request_as_table_and_json() {
    let dir = tempfile::TempDir::new().unwrap();
    let req = write(dir.path(), "req.json", SEOUL_REQUEST);
    let (code, out, err) = place(&["--request", &req, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["weights"]["location"], 0.5);
    let web = &v["groups"][0];
    assert_eq!(web["catalog_specs"], 1313);
    assert_eq!(web["filters"][0]["filter"], "clouds");
    assert_eq!(web["ranking"].as_array().unwrap().len(), 5);
    assert_eq!(web["ranking"][0]["spec"], "t3a.nano");
    assert_eq!(web["ranking"][0]["region"], "ap-northeast-2");
    // The db group: AWS already holds web's 3 VMs, so spread favours Azure's Korea Central.
    let db = &v["groups"][1];
    assert_eq!(db["ranking"][0]["csp"], "azure");
    assert_eq!(db["ranking"][0]["scores"]["spread"], 1.0);
    let aws = db["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["csp"] == "aws");
    if let Some(aws) = aws {
        assert_eq!(aws["scores"]["spread"], 0.25);
    }
    // Each total is Σ weight × score / Σ weight.
    for c in web["ranking"].as_array().unwrap() {
        let s = &c["scores"];
        let total = (s["cost"].as_f64().unwrap()
            + 2.0 * s["location"].as_f64().unwrap()
            + s["spread"].as_f64().unwrap())
            / 4.0;
        assert!((c["total"].as_f64().unwrap() - total).abs() < 1e-9, "{c}");
    }

    let (code, out, err) = place(&["--request", &req]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("group web (count 3): 414 of 1313 specs pass the filters"),
        "{out}"
    );
    assert!(out.contains("filter clouds: removed"), "{out}");
    assert!(out.contains("s_location"), "{out}");
    let first_row = out.lines().nth(5).unwrap();
    assert!(
        first_row.contains("t3a.nano") && first_row.contains("ap-northeast-2"),
        "{out}"
    );
}

#[test]
fn cli_reads_catalog_files_by_header_and_the_damselfly_format() {
    let dir = tempfile::TempDir::new().unwrap();
    // A Damselfly catalog with vCPUs and memory, under a misleading name.
    let mine = write(
        dir.path(),
        "latency.csv",
        "csp,region,spec,vcpus,memory_gib,price_per_hour,os\n\
         aws,ap-northeast-2,m5.large,2,8,0.118,ubuntu\n\
         aws,ap-northeast-2,m5.xlarge,4,16,0.236,ubuntu\n\
         gcp,asia-northeast3,e2-standard-4,4,16,0.172,\n\
         gcp,us-east1,e2-standard-4,4,16,0.150,windows\n",
    );
    let coords = data("derived_region_coords_HEAD.csv");
    let latency = data("tumblebug_HEAD_cloudlatencymap.csv");
    let req = write(
        dir.path(),
        "req.json",
        r#"{"groups":[{"name":"app","vcpus":{"min":4},"memory_gib":{"min":16},"os":"ubuntu"}],
            "policy":{"weights":{"cost":1,"latency":1},"latency_from":["aws-ap-northeast-2"]}}"#,
    );
    let (code, out, err) = place(&[
        "--request",
        &req,
        "--catalog",
        &mine,
        "--catalog",
        coords.to_str().unwrap(),
        "--catalog",
        latency.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let g = &v["groups"][0];
    assert_eq!(g["catalog_specs"], 4);
    // m5.large out by vcpus, the Windows-only spec out by os; GCP Seoul's OS list is unknown: kept.
    let removed: Vec<(String, u64)> = g["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["filter"].as_str().unwrap().to_string(),
                f["removed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        removed,
        [
            ("os".to_string(), 1),
            ("vcpus".to_string(), 1),
            ("memory_gib".to_string(), 0)
        ]
    );
    let ranking = g["ranking"].as_array().unwrap();
    assert_eq!(ranking.len(), 2);
    assert_eq!(ranking[0]["spec"], "e2-standard-4");
    assert_eq!(ranking[0]["vcpus"], 4.0);
    assert!(ranking[0]["latency_ms"].as_f64().unwrap() > 0.0);

    // A file no loader recognises.
    let bad = write(dir.path(), "spec.csv", "name,cores\nx,2\n");
    let (code, _, err) = place(&["--request", &req, "--catalog", &bad]);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognised header (name,cores"), "{err}");
}

#[test]
fn cli_bad_requests_get_precise_messages() {
    let dir = tempfile::TempDir::new().unwrap();
    let cases = [
        (
            r#"{"groups":[{"name":"a","vcpu":{"min":2}}]}"#,
            "invalid request: unknown field `vcpu`, expected one of",
        ),
        (
            r#"{"groups":[{"name":"a","memory_gib":{"min":64,"max":8}}]}"#,
            "groups[0].memory_gib: min 64 is greater than max 8",
        ),
        (
            r#"{"groups":[{"name":"a","regions":["aws/atlantis-1"]}]}"#,
            "groups[0].regions: unknown region \"aws/atlantis-1\" (not in the catalog)",
        ),
        (
            r#"{"groups":[{"name":"a"}],"policy":{"weights":{"cost":0,"location":0}}}"#,
            "policy.weights: all weights are zero",
        ),
    ];
    for (i, (body, message)) in cases.iter().enumerate() {
        let req = write(dir.path(), &format!("bad{i}.json"), body);
        let (code, out, err) = place(&["--request", &req]);
        assert_eq!(code, 2, "{body}: {out}");
        assert!(err.contains(message), "{body}: {err}");
    }
}

#[test]
fn cli_tumblebug_mode_location_at_seoul() {
    let dir = tempfile::TempDir::new().unwrap();
    let body = write(
        dir.path(),
        "tb.json",
        r#"{"filter":{"policy":[{"metric":"provider","condition":[{"operand":"aws"}]}]},
            "priority":{"policy":[{"metric":"location","weight":"0.3","parameter":[{"key":"coordinateClose","val":["37.5665/126.9780"]}]}]},
            "limit":"3"}"#,
    );
    let (code, out, err) = place(&["--tumblebug", &body, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v
        .iter()
        .map(|s| s["cspSpecName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["t3a.nano", "t3.nano", "t2.nano"]);
    assert!(v.iter().all(|s| s["regionName"] == "ap-northeast-2"
        && s["orderInFilteredResult"] == 1
        && s["providerName"] == "aws"));
    let (code, out, _) = place(&["--tumblebug", &body]);
    assert_eq!(code, 0);
    assert!(
        out.lines().nth(2).unwrap().contains("aws-ap-northeast-2"),
        "{out}"
    );
}

#[test]
fn http_placement_and_tumblebug_endpoints() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = CollectorProc::start(&dir.path().join("store"), &[]);
    let url = format!("{}/api/v1/placement", collector.http);

    let (code, body) = http_post(&url, SEOUL_REQUEST.as_bytes()).unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["groups"][0]["ranking"][0]["spec"], "t3a.nano");
    assert_eq!(v["groups"][1]["ranking"][0]["csp"], "azure");

    // Changing the weights changes the winner: location alone at Frankfurt.
    let frankfurt = r#"{"groups":[{"name":"web","clouds":["aws"]}],
        "policy":{"weights":{"location":1},"locations":[{"lat":50.1109,"lon":8.6821}]},"limit":1}"#;
    let (code, body) = http_post(&url, frankfurt.as_bytes()).unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["groups"][0]["ranking"][0]["region"], "eu-central-1");

    for (body, message) in [
        (
            r#"{"groups":[{"name":"a"}],"weights":{}}"#,
            "unknown field `weights`",
        ),
        (
            r#"{"groups":[{"name":"a","vcpus":{"min":16,"max":4}}]}"#,
            "groups[0].vcpus: min 16 is greater than max 4",
        ),
        (
            r#"{"groups":[{"name":"a"}],"policy":{"weights":{"latency":1},"latency_from":["aws/nowhere-9"]}}"#,
            "policy.latency_from: unknown region \"aws/nowhere-9\"",
        ),
        ("not json", "invalid request: expected ident"),
    ] {
        let (code, text) = http_post(&url, body.as_bytes()).unwrap();
        assert_eq!(code, 400, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains(message),
            "{body}: {text}"
        );
    }
    let big = vec![b' '; 2 << 20];
    let (code, text) = http_post(&url, &big).unwrap();
    assert_eq!(code, 413, "{text}");
    assert!(text.contains("\"error\""), "{text}");

    // Tumblebug's body unchanged, numeric weight and limit.
    let tb = format!("{}/tumblebug/mcisRecommendVm", collector.http);
    let body = r#"{"filter":{"policy":[]},"priority":{"policy":[{"metric":"location","weight":1,
        "parameter":[{"key":"coordinateClose","val":["37.5665/126.9780"]}]}]},"limit":2}"#;
    let (code, text) = http_post(&tb, body.as_bytes()).unwrap();
    assert_eq!(code, 200, "{text}");
    let v: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["connectionName"], "azure-koreacentral");
    assert_eq!(v[0]["cspSpecName"], "Standard_B1s");
    assert_eq!(v[0]["evaluationScore10"], 0.0);
    let (code, text) = http_post(
        &tb,
        br#"{"priority":{"policy":[{"metric":"latency","parameter":[{"key":"latencyMinimal","val":["aws-moon-1"]}]}]}}"#,
    )
    .unwrap();
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("unknown region \\\"aws-moon-1\\\""), "{text}");
}
