//! `damselfly bench run`: asks the agents of an MCIS, through the collector, to run benchmarks; follows their
//! progress and prints the results (rows of the `bench` table).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Run benchmarks on the agents of an MCIS and print the results.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Namespace (`ns_id`) of the VMs.
    #[arg(long, value_name = "NS")]
    ns: String,
    /// MCIS (`mcis_id`) of the VMs.
    #[arg(long, value_name = "MCIS")]
    mcis: String,
    /// One VM (`vm_id`) only.
    #[arg(long, value_name = "VM")]
    vm: Option<String>,
    /// Benchmarks (comma-separated): cpus, cpum, memR, memW, fioR, fioW, dbR, dbW, rtt, mrtt. Default: all but
    /// rtt (which needs --rtt).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Vec<String>,
    /// Time limit of each benchmark on each VM, seconds (1-300; default the agent's, 10).
    #[arg(long, value_name = "SECS")]
    time_limit: Option<u32>,
    /// Size of the fioR/fioW test file, bytes.
    #[arg(long, value_name = "BYTES")]
    fio_bytes: Option<u64>,
    /// An endpoint (host:port) for rtt; repeatable.
    #[arg(long, value_name = "HOST:PORT")]
    rtt: Vec<String>,
    /// The TCP port mrtt connects to on the other VMs [default: 22].
    #[arg(long, value_name = "PORT")]
    mrtt_port: Option<u16>,
    /// Run even on VMs above the agents' load threshold.
    #[arg(long)]
    force: bool,
    /// How long to wait for the results, seconds [default: enough for every benchmark at its limit, plus 60].
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
    /// The collector's HTTP API (any shard).
    #[arg(
        long,
        value_name = "URL",
        env = "DAMSELFLY_URL",
        default_value = "http://127.0.0.1:8086"
    )]
    url: String,
}

pub async fn main(command: BenchCommand) -> ExitCode {
    match command {
        BenchCommand::Run(args) => match run(&args).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("damselfly bench run: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A response body.
struct Body(Vec<u8>);

impl Body {
    fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.0).map_err(|e| format!("{e}: {}", self.text()))
    }

    /// The API's `{"error": ...}` message, or the body as text.
    fn text(&self) -> String {
        let v: Option<serde_json::Value> = serde_json::from_slice(&self.0).ok();
        v.and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.0).into_owned())
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<(u16, Body), String> {
    let response = request
        .send()
        .await
        .map_err(|e| damselfly_collector::error::error_chain(&e))?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    Ok((status, Body(body.to_vec())))
}

/// Runs the benchmarks; `Ok(true)` when every agent finished them.
async fn run(args: &RunArgs) -> Result<bool, String> {
    let base = args.url.trim_end_matches('/');
    let client = crate::api_client(Duration::from_secs(60))?;
    let mut request = serde_json::json!({
        "ns": args.ns,
        "mcis": args.mcis,
        "only": args.only,
        "rtt_targets": args.rtt,
        "force": args.force,
    });
    for (key, value) in [
        ("vm", args.vm.clone().map(serde_json::Value::from)),
        (
            "time_limit_secs",
            args.time_limit.map(serde_json::Value::from),
        ),
        (
            "fio_file_bytes",
            args.fio_bytes.map(serde_json::Value::from),
        ),
        ("mrtt_port", args.mrtt_port.map(serde_json::Value::from)),
    ] {
        if let Some(v) = value {
            request[key] = v;
        }
    }
    let (status, body) = send(
        client
            .post(format!("{base}/api/v1/bench/runs"))
            .header("content-type", "application/json")
            .body(request.to_string()),
    )
    .await
    .map_err(|e| format!("cannot reach the collector at {base}: {e}"))?;
    if status != 201 {
        return Err(format!("{status}: {}", body.text()));
    }
    let started = body.json()?;
    let run_id = started["run_id"].as_str().unwrap_or_default().to_string();
    let kinds = started["kinds"].as_array().map_or(0, Vec::len) as u64;
    let agents = started["agents"].as_array().cloned().unwrap_or_default();
    println!(
        "run {run_id}: {} on {} VM(s): {}",
        started["kinds"],
        agents.len(),
        agents
            .iter()
            .map(|a| a["vm_id"].as_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(missing) = started["missing_shards"]
        .as_array()
        .filter(|m| !m.is_empty())
    {
        eprintln!(
            "damselfly bench run: WARNING: shards that did not answer (their agents are not asked): {missing:?}"
        );
    }
    let limit = u64::from(args.time_limit.unwrap_or(10));
    let wait = Duration::from_secs(args.wait.unwrap_or(kinds * limit + 60));
    let deadline = Instant::now() + wait;
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let status = loop {
        let (code, body) = send(client.get(format!("{base}/api/v1/bench/runs/{run_id}"))).await?;
        if code == 200 {
            let status = body.json()?;
            for a in status["agents"].as_array().into_iter().flatten() {
                let line = format!(
                    "{} {}/{} {}",
                    a["state"].as_str().unwrap_or("?"),
                    a["done"],
                    a["total"],
                    a["message"].as_str().unwrap_or("")
                );
                let vm = a["vm_id"].as_str().unwrap_or("?").to_string();
                if shown.get(&vm) != Some(&line) {
                    println!("  {vm}: {line}");
                    shown.insert(vm, line);
                }
            }
            if status["finished"] == true {
                break status;
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the run did not finish within {wait:?} (see GET {base}/api/v1/bench/runs/{run_id})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The rows travel as ordinary batches: wait until every finished benchmark's row is queryable.
    let expected: u64 = status["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["done"].as_u64().unwrap_or(0))
        .sum();
    // `error` exists once some benchmark anywhere has failed.
    let (_, has_error) = send(
        client
            .post(format!("{base}/api/v1/sql"))
            .header("content-type", "text/plain")
            .body(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'bench' \
                 AND column_name = 'error'",
            ),
    )
    .await?;
    let error_column = if has_error.text().contains("error") {
        ", error"
    } else {
        ""
    };
    let sql = format!(
        "SELECT vm_id, kind, value, unit, elapsed_ms{error_column} FROM bench WHERE run_id = '{run_id}' \
         ORDER BY vm_id, kind"
    );
    let table = loop {
        let (code, body) = send(
            client
                .post(format!("{base}/api/v1/sql?format=arrow"))
                .header("content-type", "text/plain")
                .body(sql.clone()),
        )
        .await?;
        if code == 200 {
            let (text, rows) = crate::render_table_counted(&body.0)?;
            if rows as u64 >= expected || Instant::now() > deadline {
                break text;
            }
        } else if Instant::now() > deadline {
            return Err(format!("{code}: {}", body.text()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    print!("{}", String::from_utf8_lossy(&table));
    let all_done = status["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|a| a["state"] == "done");
    Ok(all_done)
}
