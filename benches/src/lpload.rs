//! `damselfly-lpload`: sends an InfluxDB line-protocol file over HTTP as fast as the server acknowledges it, with a
//! fixed number of requests in flight, and reports values/s and request latency. The same client, file and
//! concurrency go to any server that takes line protocol (Damselfly's `/api/v2/write`, VictoriaMetrics'
//! `/api/v2/write` or `/write`), so the two are measured alike (benches/lp-vs-vm.sh).
//!
//! The file is read once and cut into bodies of `--lines-per-request` whole lines before the clock starts; each
//! worker then POSTs the next body, waits for the answer and takes the next. `204`/`200` counts as acknowledged; a
//! `503` or `429` is retried after its `Retry-After` (counted); any other status stops the run with the server's
//! message. Values per line are counted from the file (fields of the first line), so values/s is exact for files
//! whose lines all have the same fields, like TSBS's.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "damselfly-lpload",
    about = "POST a line-protocol file to a server, measure values/s"
)]
struct Cli {
    /// The line-protocol file.
    #[arg(long)]
    file: std::path::PathBuf,
    /// Full write URL, e.g. `http://127.0.0.1:8086/api/v2/write?org=o&bucket=b&precision=ns`.
    #[arg(long)]
    url: String,
    /// Lines per request.
    #[arg(long, default_value_t = 5000)]
    lines_per_request: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// A name for the JSON summary.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("damselfly-lpload: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("damselfly-lpload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Cuts the file into bodies of `lines` whole lines each.
fn bodies(data: &bytes::Bytes, lines: usize) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut count = 0;
    for (i, b) in data.iter().enumerate() {
        if *b == b'\n' {
            count += 1;
            if count == lines {
                out.push(data.slice(start..=i));
                start = i + 1;
                count = 0;
            }
        }
    }
    if start < data.len() {
        out.push(data.slice(start..));
    }
    out
}

async fn run(cli: Cli) -> Result<(), String> {
    let data = bytes::Bytes::from(
        std::fs::read(&cli.file).map_err(|e| format!("{}: {e}", cli.file.display()))?,
    );
    let lines = data.iter().filter(|b| **b == b'\n').count();
    let first = data
        .split(|b| *b == b'\n')
        .next()
        .ok_or("the file is empty")?;
    // Fields of the first line: the text between the first two unescaped spaces, split at commas.
    let text = String::from_utf8_lossy(first);
    let fields_part = text
        .split(' ')
        .nth(1)
        .ok_or("the first line has no fields")?;
    let values_per_line = fields_part.split(',').count();
    let bodies = Arc::new(bodies(&data, cli.lines_per_request.max(1)));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cli.concurrency)
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..cli.concurrency.max(1) {
        let (client, bodies, next, retries, url) = (
            client.clone(),
            bodies.clone(),
            next.clone(),
            retries.clone(),
            cli.url.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies =
                hdrhistogram::Histogram::<u64>::new(3).map_err(|e| format!("histogram: {e}"))?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                loop {
                    let sent = Instant::now();
                    let response = client
                        .post(&url)
                        .header("Content-Type", "text/plain; charset=utf-8")
                        .body(body.clone())
                        .send()
                        .await
                        .map_err(|e| format!("request {i}: {e}"))?;
                    let status = response.status().as_u16();
                    if status == 503 || status == 429 {
                        let after = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(1);
                        retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs(after)).await;
                        continue;
                    }
                    let text = response
                        .bytes()
                        .await
                        .map_err(|e| format!("request {i}: reading the answer: {e}"))?;
                    if status != 204 && status != 200 {
                        return Err(format!(
                            "request {i}: HTTP {status}: {}",
                            String::from_utf8_lossy(&text[..text.len().min(500)])
                        ));
                    }
                    latencies
                        .record(sent.elapsed().as_micros() as u64)
                        .map_err(|e| format!("histogram: {e}"))?;
                    break;
                }
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut latencies =
        hdrhistogram::Histogram::<u64>::new(3).map_err(|e| format!("histogram: {e}"))?;
    for w in workers {
        let h = w.await.map_err(|e| format!("worker: {e}"))??;
        latencies.add(h).map_err(|e| format!("histogram: {e}"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let values = lines * values_per_line;
    let summary = serde_json::json!({
        "label": cli.label,
        "lines": lines,
        "values": values,
        "requests": bodies.len(),
        "lines_per_request": cli.lines_per_request,
        "concurrency": cli.concurrency,
        "seconds": elapsed,
        "lines_per_sec": lines as f64 / elapsed,
        "values_per_sec": values as f64 / elapsed,
        "latency_ms": {
            "p50": latencies.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": latencies.value_at_quantile(0.99) as f64 / 1000.0,
            "max": latencies.max() as f64 / 1000.0,
        },
        "retries": retries.load(Ordering::Relaxed),
    });
    println!("{summary}");
    eprintln!(
        "{}: {lines} lines ({values} values) in {elapsed:.2} s = {:.0} values/s; p50 {:.1} ms, p99 {:.1} ms; {} retries",
        cli.label,
        values as f64 / elapsed,
        latencies.value_at_quantile(0.5) as f64 / 1000.0,
        latencies.value_at_quantile(0.99) as f64 / 1000.0,
        retries.load(Ordering::Relaxed)
    );
    Ok(())
}
