//! `damselfly-agent`: the agent as a service. Flags (or their `DAMSELFLY_*` environment variables) override the
//! config file, which overrides the defaults.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration.
//!
//! `damselfly-agent bench` runs the benchmarks of [`damselfly_agent::bench`] on this machine and prints one line per
//! result (JSON lines with `--json`); no collector, no config file. Its exit codes: 0 every benchmark succeeded,
//! 1 some failed (their lines say why), 2 invalid request, 3 refused because the machine is busy (`--force` runs
//! anyway).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use damselfly_agent::AgentConfig;
use damselfly_agent::bench::{self, BenchError, BenchKind, BenchRequest};

#[derive(Debug, Parser)]
#[command(
    name = "damselfly-agent",
    version,
    about = "Collects host metrics and delivers them to a Damselfly collector (push, or pull with --listen)",
    // `damselfly-agent bench ...` takes none of the service's flags.
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (see agent.example.toml).
    #[arg(long, short = 'c', value_name = "FILE", env = "DAMSELFLY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Push mode: the collector's gRPC URL, e.g. http://10.0.0.5:4317.
    #[arg(long, value_name = "URL", env = "DAMSELFLY_COLLECTOR")]
    collector: Option<String>,
    /// Pull mode: serve batches (and /metrics) on this address, e.g. 0.0.0.0:9100. Without --collector the agent
    /// runs in pull mode alone.
    #[arg(long, value_name = "ADDR", env = "DAMSELFLY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Pull mode: the token collectors must send to pull or read /metrics (`pull_token`). Prefer the config file
    /// or the variable: a flag shows in the process list.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "DAMSELFLY_PULL_TOKEN",
        hide_env_values = true
    )]
    pull_token: Option<String>,
    /// Allow --listen on an address other hosts can reach without a pull token (a warning at start).
    #[arg(long)]
    insecure: bool,
    /// Pull mode: the host:port collectors should pull from (default: --listen).
    #[arg(long, value_name = "HOST:PORT", env = "DAMSELFLY_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Seconds between collection rounds (at least 1).
    #[arg(long, value_name = "SECS", env = "DAMSELFLY_INTERVAL")]
    interval: Option<u64>,
    /// Namespace id tag.
    #[arg(long, value_name = "ID", env = "DAMSELFLY_NS_ID")]
    ns: Option<String>,
    /// MCIS id tag.
    #[arg(long, value_name = "ID", env = "DAMSELFLY_MCIS_ID")]
    mcis: Option<String>,
    /// VM id tag (default: the host name).
    #[arg(long, value_name = "ID", env = "DAMSELFLY_VM_ID")]
    vm: Option<String>,
    /// Cloud provider tag, e.g. aws.
    #[arg(long, value_name = "NAME", env = "DAMSELFLY_CSP")]
    csp: Option<String>,
    /// Region tag.
    #[arg(long, value_name = "NAME", env = "DAMSELFLY_REGION")]
    region: Option<String>,
    /// Zone tag.
    #[arg(long, value_name = "NAME", env = "DAMSELFLY_ZONE")]
    zone: Option<String>,
    /// Host name tag (default: the OS host name).
    #[arg(long, value_name = "NAME", env = "DAMSELFLY_HOSTNAME")]
    hostname: Option<String>,
    /// Agent id (default: derived from host name, ns, mcis and vm).
    #[arg(long, value_name = "ID", env = "DAMSELFLY_AGENT_ID")]
    agent_id: Option<String>,
    /// Directory for durable agent state (the batch sequence number; the spool by default).
    #[arg(long, value_name = "DIR", env = "DAMSELFLY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Disk spool directory for undelivered batches (default: STATE_DIR/spool; none: in memory).
    #[arg(long, value_name = "DIR", env = "DAMSELFLY_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Most bytes the disk spool may take (at least 1048576); when full the oldest batches are dropped.
    #[arg(long, value_name = "BYTES", env = "DAMSELFLY_SPOOL_MAX_BYTES")]
    spool_max_bytes: Option<u64>,
    /// Measurements to collect, comma-separated (default: all).
    #[arg(
        long,
        value_name = "A,B,C",
        env = "DAMSELFLY_MEASUREMENTS",
        value_delimiter = ','
    )]
    measurements: Option<Vec<String>>,
    /// procstat_top: how many processes to report by CPU and by memory.
    #[arg(long, value_name = "N", env = "DAMSELFLY_TOP_N")]
    top_n: Option<usize>,
    /// Seconds between heartbeats to the collector.
    #[arg(long, value_name = "SECS", env = "DAMSELFLY_HEARTBEAT_SECS")]
    heartbeat_secs: Option<u64>,
    /// Validate the configuration, print the effective configuration as TOML and exit (2 if invalid).
    #[arg(long)]
    check_config: bool,
    /// Collect one round, print the points as JSON lines on stdout and exit; no network.
    #[arg(long, conflicts_with = "check_config")]
    once: bool,
}

/// Commands besides running as a service.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run benchmarks on this machine and print one line per result (JSON lines with --json).
    Bench(BenchArgs),
}

/// `damselfly-agent bench`.
#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Benchmarks to run, comma-separated: cpus, cpum, memR, memW, fioR, fioW, dbR, dbW, rtt, mrtt (default: all
    /// but rtt and mrtt, which run when --rtt / --mrtt give targets).
    #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
    only: Option<Vec<BenchKind>>,
    /// Time limit of each benchmark in seconds (at most 300).
    #[arg(long, value_name = "SECS", default_value_t = bench::DEFAULT_TIME_LIMIT.as_secs_f64())]
    time_limit: f64,
    /// Size of the fioR / fioW temporary file in bytes.
    #[arg(long, value_name = "N", default_value_t = bench::DEFAULT_FIO_FILE_BYTES)]
    fio_bytes: u64,
    /// Directory for the temporary files of fio* and db* (default: the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// rtt target (repeatable).
    #[arg(long = "rtt", value_name = "HOST:PORT")]
    rtt: Vec<String>,
    /// mrtt peer: another VM of the MCIS (repeatable).
    #[arg(long = "mrtt", value_name = "HOST:PORT")]
    mrtt: Vec<String>,
    /// Refuse when the 1-minute load average per core is above this.
    #[arg(long, value_name = "LOAD", default_value_t = bench::DEFAULT_MAX_LOAD)]
    max_load: f64,
    /// Run even when the machine is above --max-load.
    #[arg(long)]
    force: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

impl Cli {
    /// Defaults, then the file, then flags.
    fn config(&self) -> Result<AgentConfig, damselfly_agent::ConfigError> {
        let mut c = match &self.config {
            Some(path) => AgentConfig::load(path)?,
            None => AgentConfig::default(),
        };
        let set = |slot: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                slot.clone_from(v);
            }
        };
        set(&mut c.ns_id, &self.ns);
        set(&mut c.mcis_id, &self.mcis);
        set(&mut c.vm_id, &self.vm);
        set(&mut c.csp, &self.csp);
        set(&mut c.region, &self.region);
        set(&mut c.zone, &self.zone);
        set(&mut c.hostname, &self.hostname);
        if let Some(v) = self.interval {
            c.interval = v;
        }
        set_opt(&mut c.agent_id, &self.agent_id);
        set_opt(&mut c.collector, &self.collector);
        set_opt(&mut c.advertise_addr, &self.advertise_addr);
        set_opt(&mut c.state_dir, &self.state_dir);
        set_opt(&mut c.spool_dir, &self.spool_dir);
        if self.listen.is_some() {
            c.listen = self.listen;
        }
        set_opt(&mut c.pull_token, &self.pull_token);
        if self.insecure {
            c.insecure = true;
        }
        if let Some(v) = self.spool_max_bytes {
            c.spool_max_bytes = v;
        }
        if let Some(v) = &self.measurements {
            c.measurements = v.iter().map(|m| m.trim().to_owned()).collect();
        }
        if let Some(v) = self.top_n {
            c.top_n = v;
        }
        if let Some(v) = self.heartbeat_secs {
            c.heartbeat_secs = v;
        }
        if self.once {
            // One round on stdout needs no collector and no server.
            c.validate_settings()?;
        } else {
            c.validate()?;
        }
        Ok(c)
    }
}

/// `slot = v` when the flag is given.
fn set_opt<T: Clone>(slot: &mut Option<T>, v: &Option<T>) {
    if v.is_some() {
        slot.clone_from(v);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    if let Some(Command::Bench(args)) = &cli.command {
        return run_bench(args);
    }

    let config = match cli.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("damselfly-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if cli.once {
        return once(&config);
    }

    // One thread is plenty for one stream and a timer; probes run on the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("damselfly-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(damselfly_agent::run(config, shutdown_signal())) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            eprintln!("damselfly-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--once`: one round as JSON lines.
fn once(config: &AgentConfig) -> ExitCode {
    let round = match damselfly_agent::collect_once(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("damselfly-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    for line in round.json_lines() {
        if let Err(e) = writeln!(out, "{line}") {
            // `damselfly-agent --once | head` closing the pipe is not a failure.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("damselfly-agent: cannot write to stdout: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `damselfly-agent bench`: runs the benchmarks and prints their results.
fn run_bench(args: &BenchArgs) -> ExitCode {
    let time_limit = match Duration::try_from_secs_f64(args.time_limit) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("damselfly-agent: --time-limit {}: {e}", args.time_limit);
            return ExitCode::from(2);
        }
    };
    let kinds = match &args.only {
        Some(kinds) => kinds.clone(),
        None => BenchKind::ALL
            .into_iter()
            .filter(|k| match k {
                BenchKind::Rtt => !args.rtt.is_empty(),
                BenchKind::Mrtt => !args.mrtt.is_empty(),
                _ => true,
            })
            .collect(),
    };
    let request = BenchRequest {
        kinds,
        time_limit,
        fio_file_bytes: args.fio_bytes,
        work_dir: args.work_dir.clone().unwrap_or_else(std::env::temp_dir),
        rtt_targets: args.rtt.clone(),
        mrtt_peers: args.mrtt.clone(),
        force: args.force,
        max_load: args.max_load,
    };
    // The benchmarks run on the blocking pool; one runtime thread drives them and the network ones.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("damselfly-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let results = match runtime.block_on(bench::run(&request)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("damselfly-agent: {e}");
            return match e {
                BenchError::InvalidRequest(_) => ExitCode::from(2),
                BenchError::Overloaded { .. } => ExitCode::from(3),
            };
        }
    };
    let mut out = std::io::stdout().lock();
    for r in &results {
        let line = if args.json {
            serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        } else {
            let detail: Vec<String> = r
                .detail
                .iter()
                .map(|(k, v)| format!("{k}={}", short(*v)))
                .collect();
            match &r.error {
                Some(e) => format!(
                    "{:<5} failed after {:.2} s: {e}",
                    r.kind,
                    r.elapsed.as_secs_f64()
                ),
                None => format!(
                    "{:<5} {:>12.3} {:<6} in {:.2} s  {}",
                    r.kind,
                    r.value,
                    r.unit,
                    r.elapsed.as_secs_f64(),
                    detail.join(" ")
                ),
            }
        };
        if let Err(e) = writeln!(out, "{line}") {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
            eprintln!("damselfly-agent: cannot write to stdout: {e}");
            return ExitCode::FAILURE;
        }
    }
    if results.iter().any(|r| r.error.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A detail figure for a text line: whole numbers without decimals, others with three.
fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Logs go to stderr (stdout is for `--once` and `--check-config`); `RUST_LOG` filters, default `info`.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Completes on Ctrl-C, or on SIGTERM on Unix (what systemd and `kill` send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = ctrl_c() => {}
                    _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the agent")
            }
        }
    }
    ctrl_c().await;
}

/// Completes on Ctrl-C; never, if Ctrl-C cannot be watched (a service must not stop because of that).
async fn ctrl_c() {
    match tokio::signal::ctrl_c().await {
        Ok(()) => tracing::info!("Ctrl-C received; shutting down"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}
