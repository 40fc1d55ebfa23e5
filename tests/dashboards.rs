//! The Grafana dashboards in `dashboards/`: generated from `dashboards/generate.py` and up to date with it, valid
//! JSON whose data source is the `datasource` variable, a description on every panel, and every query of every
//! panel and variable answered by a live `damselfly up --pg` through a real PostgreSQL driver (the extended query
//! protocol, as Grafana's data source uses), after expanding Grafana's macros the way its PostgreSQL data source
//! does.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{CollectorProc, now_nanos, pg_connect, rfc3339, wait_until};
use serde_json::Value;
use tokio_postgres::types::Type;

const DASHBOARDS: [&str; 3] = [
    "host-overview.json",
    "mcis-overview.json",
    "collector-health.json",
];

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn load(name: &str) -> Value {
    let path = dashboards_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not valid JSON: {e}"))
}

#[test]
fn the_committed_json_is_what_the_generator_writes() {
    let python = std::env::var("DAMSELFLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(dashboards_dir().join("generate.py"))
        .arg("--check")
        .output()
        .expect("run python3 dashboards/generate.py --check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_panel_has_a_description_and_the_datasource_variable() {
    for name in DASHBOARDS {
        let d = load(name);
        assert!(
            d["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{name}: uid"
        );
        let variables = d["templating"]["list"].as_array().unwrap();
        let ds: Vec<&Value> = variables
            .iter()
            .filter(|v| v["type"] == "datasource")
            .collect();
        assert_eq!(ds.len(), 1, "{name}: one data source variable");
        assert_eq!(ds[0]["name"], "datasource", "{name}");
        assert_eq!(ds[0]["query"], "grafana-postgresql-datasource", "{name}");
        let uses_variable = |v: &Value| v["uid"] == "${datasource}";
        for v in variables.iter().filter(|v| v["type"] == "query") {
            assert!(
                uses_variable(&v["datasource"]),
                "{name}: variable {}",
                v["name"]
            );
        }
        let panels = d["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{name} has no panel");
        for p in panels {
            let title = p["title"].as_str().unwrap();
            assert!(
                p["description"].as_str().is_some_and(|s| s.len() > 10),
                "{name}: panel {title:?} has no description"
            );
            assert!(uses_variable(&p["datasource"]), "{name}: panel {title:?}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{name}: panel {title:?} has no query");
            for t in targets {
                assert!(uses_variable(&t["datasource"]), "{name}: {title:?}");
                assert!(t["rawSql"].as_str().is_some_and(|s| !s.is_empty()));
                assert!(matches!(
                    t["format"].as_str(),
                    Some("time_series" | "table")
                ));
            }
        }
    }
}

/// Grafana's PostgreSQL data source's expansion of the macros the dashboards use, over `[from, to]`, then the
/// dashboard variables' values.
fn expand(
    sql: &str,
    from: &str,
    to: &str,
    interval_ms: u64,
    vars: &BTreeMap<String, String>,
) -> String {
    let mut out = sql.to_string();
    // `$__timeFilter(expr)` → `expr BETWEEN 'from' AND 'to'` (RFC 3339, UTC, whole seconds).
    while let Some(start) = out.find("$__timeFilter(") {
        let open = start + "$__timeFilter(".len();
        let close = open + out[open..].find(')').unwrap();
        let column = out[open..close].trim().to_string();
        out.replace_range(
            start..=close,
            &format!("{column} BETWEEN '{from}' AND '{to}'"),
        );
    }
    out = out
        .replace("$__timeFrom()", &format!("'{from}'"))
        .replace("$__timeTo()", &format!("'{to}'"))
        .replace("$__interval_ms", &interval_ms.to_string());
    for (name, value) in vars {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !out.contains('$'),
        "a macro or variable left unexpanded: {out}"
    );
    out
}

#[test]
fn every_query_runs_against_a_live_collector() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = CollectorProc::start_up(
        &dir.path().join("data"),
        &["--pg", "127.0.0.1:0", "--interval", "1"],
    );
    // Two rounds of every measurement the dashboards read.
    wait_until(Duration::from_secs(30), "two rounds of agent rows", || {
        ["cpu", "mem", "disk", "net", "system"].iter().all(|t| {
            collector.count(t) > 0
                && collector.sql(&format!("SELECT count(DISTINCT time) AS n FROM {t}"))[0]["n"]
                    .as_u64()
                    >= Some(2)
        })
    });
    let port: u16 = collector
        .pg
        .as_deref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let from = rfc3339(now_nanos() - 3600 * 1_000_000_000);
    // Grafana's `to` is the moment of the query; a minute ahead keeps the newest rows in whatever the clocks do.
    let to = rfc3339(now_nanos() + 60 * 1_000_000_000);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = pg_connect(port).await;
        let mut ran = 0;
        for name in DASHBOARDS {
            let d = load(name);
            // Variables in order (a later one may use an earlier one), each set to the first value it offers.
            let mut vars = BTreeMap::new();
            for v in d["templating"]["list"].as_array().unwrap() {
                if v["type"] != "query" {
                    continue;
                }
                let var = v["name"].as_str().unwrap().to_string();
                let sql = expand(v["query"].as_str().unwrap(), &from, &to, 1000, &vars);
                let rows = client
                    .query(&sql, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{name}: variable {var}: {sql}: {e}"));
                let first: String = rows
                    .first()
                    .unwrap_or_else(|| panic!("{name}: variable {var} offers no value: {sql}"))
                    .get(0);
                vars.insert(var, first);
                ran += 1;
            }
            for p in d["panels"].as_array().unwrap() {
                let title = p["title"].as_str().unwrap();
                for t in p["targets"].as_array().unwrap() {
                    let sql = expand(t["rawSql"].as_str().unwrap(), &from, &to, 1000, &vars);
                    let statement = client
                        .prepare(&sql)
                        .await
                        .unwrap_or_else(|e| panic!("{name}: {title:?}: {sql}: {e}"));
                    let rows = client
                        .query(&statement, &[])
                        .await
                        .unwrap_or_else(|e| panic!("{name}: {title:?}: {sql}: {e}"));
                    assert!(!rows.is_empty(), "{name}: {title:?} answered no row: {sql}");
                    let columns = statement.columns();
                    if t["format"] == "time_series" {
                        // Grafana wants a `time` column and numeric values (a `metric` column names the series).
                        let time = columns.iter().find(|c| c.name() == "time");
                        assert!(
                            time.is_some_and(|c| matches!(
                                *c.type_(),
                                Type::TIMESTAMPTZ | Type::TIMESTAMP
                            )),
                            "{name}: {title:?}: no timestamp column `time`: {columns:?}"
                        );
                        let numeric = columns.iter().filter(|c| {
                            matches!(
                                *c.type_(),
                                Type::FLOAT8
                                    | Type::FLOAT4
                                    | Type::INT8
                                    | Type::INT4
                                    | Type::NUMERIC
                            )
                        });
                        assert!(
                            numeric.count() >= 1,
                            "{name}: {title:?}: no value column: {columns:?}"
                        );
                    }
                    ran += 1;
                }
            }
        }
        assert!(ran >= 20, "only {ran} queries ran");
    });
}
