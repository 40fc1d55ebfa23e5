//! `damselfly place`: rank where to place each group of an MCIS (library: `damselfly-control`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use damselfly_control::placement::{Candidate, PlacementAnswer};
use damselfly_control::tumblebug::{self, TbSpec};
use damselfly_control::{Catalog, DynamicScores, parse_request, place};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["request", "tumblebug"])))]
pub struct PlaceArgs {
    /// A Damselfly placement request (JSON; see docs/PLACEMENT.md); `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    request: Option<PathBuf>,
    /// A CB-Tumblebug `mcisRecommendVm` request body (JSON, unchanged); `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    tumblebug: Option<PathBuf>,
    /// Catalog files (Tumblebug spec, location, region-coordinate or latency CSVs, or Damselfly's catalog CSV;
    /// recognised by their header). Repeatable. Without it, the catalog built into the binary.
    #[arg(long, value_name = "FILE")]
    catalog: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = PlaceFormat::Table)]
    format: PlaceFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlaceFormat {
    Table,
    Json,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| format!("stdin: {e}"))?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs the command: 0 on success, 2 for a bad request or catalog, 1 otherwise.
pub fn main(args: PlaceArgs) -> ExitCode {
    match run(&args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("damselfly place: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &PlaceArgs) -> Result<String, String> {
    let catalog = if args.catalog.is_empty() {
        Catalog::embedded()
    } else {
        let mut c = Catalog::new();
        for path in &args.catalog {
            c.load_path(path).map_err(|e| e.to_string())?;
        }
        c
    };
    if let Some(path) = &args.tumblebug {
        let plan = tumblebug::parse(&read(path)?).map_err(|e| e.to_string())?;
        let specs = tumblebug::recommend(&catalog, &plan).map_err(|e| e.to_string())?;
        return Ok(match args.format {
            PlaceFormat::Json => json(serde_json::to_string_pretty(&specs))?,
            PlaceFormat::Table => tumblebug_table(&specs),
        });
    }
    let Some(path) = &args.request else {
        return Err("--request or --tumblebug is required".into());
    };
    let req = parse_request(&read(path)?).map_err(|e| e.to_string())?;
    let answer = place(&catalog, &req, &DynamicScores::new()).map_err(|e| e.to_string())?;
    Ok(match args.format {
        PlaceFormat::Json => json(serde_json::to_string_pretty(&answer))?,
        PlaceFormat::Table => table(&answer),
    })
}

fn json(text: Result<String, serde_json::Error>) -> Result<String, String> {
    text.map(|s| s + "\n").map_err(|e| e.to_string())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// Left-aligned text columns, right-aligned numbers.
fn render(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let numeric = cell.parse::<f64>().is_ok() || cell == "-";
            if numeric {
                s += &format!("{cell:>w$}  ", w = widths[i]);
            } else {
                s += &format!("{cell:<w$}  ", w = widths[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    out += &line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for row in rows {
        out += &line(row);
    }
    out
}

fn table(answer: &PlacementAnswer) -> String {
    let w = &answer.weights;
    let criteria: Vec<(&str, f64)> = [
        ("cost", w.cost),
        ("performance", w.performance),
        ("location", w.location),
        ("latency", w.latency),
        ("spread", w.spread),
    ]
    .into_iter()
    .filter(|(_, w)| *w > 0.0)
    .collect();
    let mut out = String::new();
    for g in &answer.groups {
        let weights: Vec<String> = criteria
            .iter()
            .map(|(n, w)| format!("{n} {w:.2}"))
            .collect();
        out += &format!(
            "group {} (count {}): {} of {} specs pass the filters; weights: {}\n",
            g.name,
            g.count,
            g.candidates,
            g.catalog_specs,
            weights.join(", ")
        );
        for f in &g.filters {
            out += &format!(
                "  filter {}: removed {} ({} with the value unknown)\n",
                f.filter, f.removed, f.unknown
            );
        }
        let mut header: Vec<String> = [
            "rank", "csp", "region", "spec", "vcpus", "mem_gib", "price_h",
        ]
        .map(String::from)
        .to_vec();
        header.extend(criteria.iter().map(|(n, _)| format!("s_{n}")));
        header.push("total".into());
        let rows: Vec<Vec<String>> = g
            .ranking
            .iter()
            .map(|c: &Candidate| {
                let mut row = vec![
                    c.rank.to_string(),
                    c.csp.clone(),
                    c.region.clone(),
                    c.spec.clone(),
                    opt(c.vcpus, 0),
                    opt(c.memory_gib, 1),
                    opt(c.price_per_hour, 4),
                ];
                for (n, _) in &criteria {
                    let s = match *n {
                        "cost" => c.scores.cost,
                        "performance" => c.scores.performance,
                        "location" => c.scores.location,
                        "latency" => c.scores.latency,
                        _ => c.scores.spread,
                    };
                    row.push(opt(s, 3));
                }
                row.push(format!("{:.3}", c.total));
                row
            })
            .collect();
        out += &render(&header, &rows);
        out += "\n";
    }
    out
}

fn tumblebug_table(specs: &[TbSpec]) -> String {
    let header = [
        "order",
        "connection",
        "spec",
        "cost_h",
        "score01",
        "score09",
        "score10",
    ]
    .map(String::from);
    let rows: Vec<Vec<String>> = specs
        .iter()
        .map(|s| {
            vec![
                s.order_in_filtered_result.to_string(),
                s.connection_name.clone(),
                s.csp_spec_name.clone(),
                opt(s.cost_per_hour, 4),
                opt(s.evaluation_score01, 2),
                format!("{:.4}", s.evaluation_score09),
                opt(s.evaluation_score10, 3),
            ]
        })
        .collect();
    render(&header, &rows)
}
