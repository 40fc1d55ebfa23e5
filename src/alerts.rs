//! `damselfly alerts`: the active alerts of a collector (`GET /api/v1/alerts`), as a table or JSON.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// The collector's HTTP API.
    #[arg(
        long,
        value_name = "URL",
        env = "DAMSELFLY_URL",
        default_value = "http://127.0.0.1:8086"
    )]
    url: String,
    /// Output format: an aligned table, or the API's JSON array (every field).
    #[arg(long, value_enum, default_value_t = AlertsFormat::Table)]
    format: AlertsFormat,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AlertsFormat {
    Table,
    Json,
}

pub async fn main(args: AlertsArgs) -> ExitCode {
    match run(&args).await {
        Ok(text) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("damselfly alerts: cannot write to stdout: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(message) => {
            eprintln!("damselfly alerts: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &AlertsArgs) -> Result<String, String> {
    let base = args.url.trim_end_matches('/');
    let client = crate::api_client(Duration::from_secs(args.timeout))?;
    let response = client
        .get(format!("{base}/api/v1/alerts"))
        .send()
        .await
        .map_err(|e| {
            format!(
                "cannot reach the collector at {base}: {} (is it running?)",
                damselfly_collector::error::error_chain(&e)
            )
        })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("cannot read the response from {base}: {e}"))?;
    let parsed = serde_json::from_slice::<serde_json::Value>(&body);
    if !status.is_success() {
        let message = parsed
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(format!("{status}: {message}"));
    }
    let Ok(serde_json::Value::Array(alerts)) = parsed else {
        return Err(format!(
            "the collector at {base} did not answer with a JSON array of alerts"
        ));
    };
    Ok(match args.format {
        AlertsFormat::Json => {
            let mut text = serde_json::to_string_pretty(&alerts)
                .map_err(|e| format!("cannot format the alerts: {e}"))?;
            text.push('\n');
            text
        }
        AlertsFormat::Table => render(&alerts),
    })
}

/// The alerts as an aligned table, with the count under it.
fn render(alerts: &[serde_json::Value]) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut rows: Vec<Vec<String>> = vec![
        [
            "rule",
            "group",
            "state",
            "severity",
            "value",
            "threshold",
            "since",
            "silenced",
        ]
        .iter()
        .map(|h| (*h).to_owned())
        .collect(),
    ];
    for a in alerts {
        let group = text(&a["group_key"]);
        rows.push(vec![
            text(&a["rule"]),
            if group.is_empty() { "-".into() } else { group },
            text(&a["state"]),
            text(&a["severity"]),
            text(&a["value"]),
            text(&a["threshold"]),
            text(&a["since"]),
            text(&a["silenced"]),
        ]);
    }
    let mut out = crate::aligned(&rows);
    let n = alerts.len();
    out.push_str(&format!(
        "({n} active {})\n",
        if n == 1 { "alert" } else { "alerts" }
    ));
    out
}
