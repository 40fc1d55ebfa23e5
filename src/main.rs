//! `damselfly`: the command line. It parses flags and wires the crates together; the work is in them.
//!
//! * `damselfly up` — a collector on a local store plus an agent for this machine, in one process.
//! * `damselfly collector` — the collector alone.
//! * `damselfly sql "SELECT ..."` — runs SQL on a collector and prints the result.
//! * `damselfly agents` — lists the agents a collector knows, with their status.
//! * `damselfly alerts` — lists a collector's active alerts.
//!
//! Exit codes: 0 success, 1 runtime failure (or a query error), 2 invalid configuration or usage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod alerts;
mod bench;
mod certs;
mod install;
mod place;
mod tokens;

use clap::{Args, Parser, Subcommand, ValueEnum};
use damselfly_agent::AgentConfig;
use damselfly_collector::config::WalSync;
use damselfly_collector::{Collector, CollectorConfig};
use tokio::sync::watch;

/// jemalloc rather than the system allocator: under sustained ingest glibc's malloc kept freed memory (flushed Arrow
/// chunks, decoded batches, WAL group buffers) in its per-thread arenas, and the collector's resident size grew
/// without bound (to 18x the write-buffer limit within 40 s of `tests/durability.rs`'s flood, while the live data
/// stayed under 6x; mimalloc grew the same way). jemalloc, tuned below, returns freed pages, so the buffer limits
/// really bound the process.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "damselfly",
    version,
    about = "Damselfly: multi-cloud VM monitoring — collector, SQL and agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a collector on a local store and an agent for this machine, in one process.
    Up {
        #[command(flatten)]
        collector: CollectorArgs,
        /// Seconds between the local agent's collection rounds.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        interval: u64,
        /// Run this many collector shards in this process (ids s0, s1, ...; consecutive ports from --http and
        /// --grpc; one shared store under the data directory), to try sharding on one machine.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        shards: u16,
    },
    /// Run a collector (gRPC ingest, WAL, Parquet store, SQL over HTTP).
    Collector {
        #[command(flatten)]
        collector: CollectorArgs,
    },
    /// Run one SQL statement on a collector and print the result.
    Sql(SqlArgs),
    /// List the agents a collector knows (registered or seen from their batches), with their status.
    Agents(AgentsArgs),
    /// List the active alerts of a collector (pending and firing), with severity, value and silence.
    Alerts(alerts::AlertsArgs),
    /// Benchmarks on the agents' VMs.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Rank where to place each group of an MCIS (Damselfly request or Tumblebug's mcisRecommendVm body).
    Place(place::PlaceArgs),
    /// Certificates for TLS: `certs init` makes a deployment's CA, collector and agent certificates.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Manage the collector's API and agent tokens (when `auth` is on).
    Tokens {
        #[command(subcommand)]
        command: tokens::TokensCommand,
    },
    /// Manage agents on VMs.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Install the agent on a VM over SSH, start it, and wait for its first heartbeat.
    Install(Box<InstallArgs>),
}

#[derive(Debug, Args)]
struct InstallArgs {
    /// The VM: user@host or user@host:port.
    #[arg(long, value_name = "USER@HOST[:PORT]")]
    ssh: String,
    /// SSH private key.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Known-hosts file the VM's host key is checked against [default: ~/.ssh/known_hosts].
    #[arg(long, value_name = "FILE")]
    known_hosts: Option<PathBuf>,
    /// Accept and record the host key of a VM not yet in the known-hosts file (a changed key is still refused).
    #[arg(long)]
    trust_on_first_use: bool,
    /// Agent binary to copy [default: damselfly-agent next to this program].
    #[arg(long, value_name = "FILE")]
    agent_binary: Option<PathBuf>,
    /// Agent config file to start from (flags below override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Collector gRPC URL as the VM reaches it.
    #[arg(long, value_name = "URL")]
    collector: Option<String>,
    /// Collector HTTP API to watch for the agent's heartbeat; without it the heartbeat step is skipped.
    #[arg(long, value_name = "URL")]
    collector_http: Option<String>,
    /// Directory on the VM.
    #[arg(long, value_name = "DIR", default_value = "/opt/damselfly")]
    install_dir: String,
    /// Seconds to wait for the first heartbeat.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    wait: u64,
    /// Do not use systemd even when the VM has it (start in the background with a pid file).
    #[arg(long)]
    no_systemd: bool,
    /// Collection interval on the VM.
    #[arg(long, value_name = "SECS")]
    interval: Option<u64>,
    #[arg(long, value_name = "ID")]
    ns: Option<String>,
    #[arg(long, value_name = "ID")]
    mcis: Option<String>,
    #[arg(long, value_name = "ID")]
    vm: Option<String>,
    #[arg(long, value_name = "NAME")]
    csp: Option<String>,
    #[arg(long, value_name = "NAME")]
    region: Option<String>,
    /// Host name tag [default: the VM's own, taken from --vm or the SSH host].
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
}

#[derive(Debug, Args)]
struct CollectorArgs {
    /// TOML config file (keys as in `CollectorConfig`); flags override it.
    #[arg(long, value_name = "FILE", env = "DAMSELFLY_COLLECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the local store [default: ./damselfly-data].
    #[arg(long, value_name = "DIR", env = "DAMSELFLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP API address (SQL, health) [default: 127.0.0.1:8086]; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// gRPC ingest address [default: 127.0.0.1:4317]; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    grpc: Option<SocketAddr>,
    /// PostgreSQL wire protocol address (psql, drivers) [default: off]; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pg: Option<SocketAddr>,
    /// Seconds between flushes of the buffer to Parquet [default: 60].
    #[arg(long, value_name = "SECS")]
    flush_interval: Option<u64>,
    /// WAL durability: fsync (default) or none (survives a process crash, not a power loss).
    #[arg(long, value_name = "POLICY")]
    wal_sync: Option<WalSyncArg>,
    /// This shard's id [default: s0].
    #[arg(long, value_name = "ID")]
    shard_id: Option<String>,
    /// TOML file listing every shard (`[[shards]]` with id, grpc_url, http_url); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    shards_file: Option<PathBuf>,
    /// The shared store: the directory all shards write their Parquet files to (each under shard=<id>/).
    #[arg(long, value_name = "DIR")]
    shared_dir: Option<PathBuf>,
    /// Require a token on every request (see `damselfly tokens` and SECURITY.md).
    #[arg(long)]
    auth: bool,
    /// Allow listening on a non-loopback address without auth (a warning is logged).
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WalSyncArg {
    Fsync,
    None,
}

impl CollectorArgs {
    fn config(&self) -> Result<CollectorConfig, String> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                toml::from_str::<CollectorConfig>(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => CollectorConfig::default(),
        };
        if let Some(v) = &self.data_dir {
            c.data_dir.clone_from(v);
        }
        if let Some(v) = self.http {
            c.http_addr = v;
        }
        if let Some(v) = self.grpc {
            c.grpc_addr = v;
        }
        c.pg_addr = self.pg.or(c.pg_addr);
        if let Some(v) = self.flush_interval {
            c.flush_interval_secs = v;
        }
        if let Some(v) = &self.shard_id {
            c.shard_id.clone_from(v);
        }
        if let Some(v) = &self.shards_file {
            c.shards_file = Some(v.clone());
        }
        if let Some(v) = &self.shared_dir {
            c.shared_dir = Some(v.clone());
        }
        c.auth |= self.auth;
        c.insecure |= self.insecure;
        if let Some(v) = self.wal_sync {
            c.wal_sync = match v {
                WalSyncArg::Fsync => WalSync::Fsync,
                WalSyncArg::None => WalSync::None,
            };
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// The HTTP client the CLI's commands talk to a collector with: no proxy (collectors are reached directly), a
/// whole-request `timeout`, the token in `DAMSELFLY_TOKEN` (if set) as `Authorization: Bearer`, and for `https://`
/// collectors the system's roots plus the CA certificate(s) in `DAMSELFLY_CA_FILE` (if set; e.g. the `ca.pem` of
/// `damselfly certs init`).
pub(crate) fn api_client(timeout: Duration) -> Result<reqwest::Client, String> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::env::var("DAMSELFLY_TOKEN")
        && !token.trim().is_empty()
    {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| "DAMSELFLY_TOKEN is not a valid token".to_string())?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .default_headers(headers);
    if let Some(ca) = std::env::var_os("DAMSELFLY_CA_FILE").filter(|v| !v.is_empty()) {
        builder = damselfly_collector::tls::trust_ca_file(builder, std::path::Path::new(&ca))
            .map_err(|e| format!("DAMSELFLY_CA_FILE: {e}"))?;
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A token `up` makes for itself when it runs with auth, kept in `saved` (owner-only) and reused while the tokens
/// file still accepts it; otherwise a new one is created: the local agent's (role agent, its namespace) and, with
/// shards, the one they send each other (admin).
fn local_token(
    tokens_path: &std::path::Path,
    saved: &std::path::Path,
    name: &str,
    role: damselfly_collector::auth::Role,
    namespaces: Vec<String>,
) -> Result<String, String> {
    use damselfly_collector::auth::Tokens;
    let tokens = Tokens::new(tokens_path.to_path_buf());
    if let Ok(text) = std::fs::read_to_string(saved)
        && tokens.authenticate(text.trim()).is_ok()
    {
        return Ok(text.trim().to_string());
    }
    let (_, token) = tokens
        .create(name, role, namespaces, None)
        .map_err(|e| e.to_string())?;
    if let Some(dir) = saved.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    damselfly_collector::fsutil::write_atomically(saved, token.as_bytes())
        .map_err(|e| format!("{}: {e}", saved.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(saved, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", saved.display()))?;
    }
    Ok(token)
}

#[derive(Debug, Args)]
struct SqlArgs {
    /// The SQL statement; `-` reads it from stdin.
    #[arg(value_name = "SQL")]
    sql: String,
    /// The collector's HTTP API.
    #[arg(
        long,
        value_name = "URL",
        env = "DAMSELFLY_URL",
        default_value = "http://127.0.0.1:8086"
    )]
    url: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct AgentsArgs {
    /// The collector's HTTP API.
    #[arg(
        long,
        value_name = "URL",
        env = "DAMSELFLY_URL",
        default_value = "http://127.0.0.1:8086"
    )]
    url: String,
    /// Output format: an aligned table, or the API's JSON array (every field).
    #[arg(long, value_enum, default_value_t = AgentsFormat::Table)]
    format: AgentsFormat,
    /// Only agents with this status.
    #[arg(long, value_name = "STATUS", value_parser = ["healthy", "stale", "down", "unregistered"])]
    status: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AgentsFormat {
    /// An aligned table of the main fields.
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// An aligned table.
    Table,
    Csv,
    Json,
}

/// Freed memory goes back to the OS within about a second (jemalloc's default is 10 s), purged by a background
/// thread even while the process is idle, so the resident size follows the live data.
#[cfg(not(target_env = "msvc"))]
fn tune_allocator() {
    use tikv_jemalloc_ctl::{Access, AsName};
    for key in [&b"arenas.dirty_decay_ms\0"[..], b"arena.0.dirty_decay_ms\0"] {
        if let Err(e) = key.name().write(1000isize) {
            eprintln!("jemalloc: cannot set {}: {e}", String::from_utf8_lossy(key));
        }
    }
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("jemalloc: cannot start the background purge thread: {e}");
    }
}

/// The system allocator (MSVC builds) needs no tuning.
#[cfg(target_env = "msvc")]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_tracing();
    // Installing drives `ssh` synchronously; it needs no async runtime around it.
    if let Command::Agent {
        command: AgentCommand::Install(args),
    } = &cli.command
    {
        return agent_install(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("damselfly: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Up {
                collector,
                interval,
                shards,
            } if shards > 1 => up_sharded(&collector, interval, shards).await,
            Command::Up {
                collector,
                interval,
                ..
            } => up(&collector, interval).await,
            Command::Collector { collector } => collector_only(&collector).await,
            Command::Sql(args) => sql(args).await,
            Command::Agents(args) => agents(args).await,
            Command::Alerts(args) => alerts::main(args).await,
            Command::Bench { command } => bench::main(command).await,
            Command::Place(args) => place::main(args),
            Command::Tokens { command } => tokens::main(command),
            Command::Certs { command } => certs::main(command),
            Command::Agent { .. } => ExitCode::FAILURE,
        }
    })
}

/// Logs go to stderr; `RUST_LOG` filters, default `info`.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn start_collector(args: &CollectorArgs) -> Result<Collector, ExitCode> {
    let config = args.config().map_err(|e| {
        eprintln!("damselfly: {e}");
        ExitCode::from(2)
    })?;
    Collector::bind(config).await.map_err(|e| {
        eprintln!("damselfly: {e}");
        ExitCode::FAILURE
    })
}

/// Says where things are. The `grpc:` and `http:` lines are stable: scripts and tests read them.
fn print_endpoints(collector: &Collector, data_dir: &std::path::Path) {
    let http = collector.http_addr();
    println!("damselfly collector is up");
    let scheme = collector.scheme();
    println!("  grpc: {scheme}://{}", collector.grpc_addr());
    if let Some(pg) = collector.pg_addr() {
        println!("  pg: {pg}");
    }
    println!("  http: {scheme}://{http}");
    println!("  data: {}", data_dir.display());
    let url_flag = if http == SocketAddr::from(([127, 0, 0, 1], 8086)) {
        String::new()
    } else {
        format!(" --url http://{http}")
    };
    println!(
        "query it:  damselfly sql{url_flag} \"SELECT * FROM cpu WHERE cpu = 'cpu-total' ORDER BY time DESC LIMIT 5\""
    );
}

async fn collector_only(args: &CollectorArgs) -> ExitCode {
    let collector = match start_collector(args).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    print_endpoints(&collector, &collector.store().config().data_dir);
    finish(collector.run(shutdown_signal()).await)
}

async fn up(args: &CollectorArgs, interval: u64) -> ExitCode {
    let collector = match start_collector(args).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let data_dir = collector.store().config().data_dir.clone();
    run_with_local_agent(vec![collector], &data_dir, interval).await
}

/// Serves `collectors` (one, or the shards of `up --shards`) with an agent for this machine pushing to the first,
/// until Ctrl-C or SIGTERM. Stop order: the agent first (it delivers what it holds), then the collectors (which
/// flush).
async fn run_with_local_agent(
    collectors: Vec<Collector>,
    data_dir: &std::path::Path,
    interval: u64,
) -> ExitCode {
    let Some(first) = collectors.first() else {
        return ExitCode::FAILURE;
    };
    let mut agent_config = AgentConfig {
        collector: Some(format!("http://{}", first.grpc_addr())),
        interval,
        state_dir: Some(data_dir.join("agent")),
        ..AgentConfig::default()
    };
    let config = first.store().config();
    if config.auth {
        let saved = data_dir.join("agent").join("token");
        let agent_token = local_token(
            &config.tokens_path(),
            &saved,
            "local agent (damselfly up)",
            damselfly_collector::auth::Role::Agent,
            vec![agent_config.ns_id.clone()],
        );
        match agent_token {
            Ok(token) => agent_config.token = Some(token),
            Err(e) => {
                eprintln!("damselfly: cannot make the local agent's token: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Err(e) = agent_config.validate() {
        eprintln!("damselfly: {e}");
        return ExitCode::from(2);
    }
    print_endpoints(first, data_dir);
    if collectors.len() > 1 {
        for c in &collectors {
            println!(
                "  shard {}: grpc http://{} http http://{}",
                c.store().config().shard_id,
                c.grpc_addr(),
                c.http_addr()
            );
        }
    }
    println!("  agent: this machine, every {interval} s");

    let (stop_agent_tx, stop_agent_rx) = watch::channel(false);
    let (stop_collector_tx, stop_collector_rx) = watch::channel(false);
    let tasks: Vec<_> = collectors
        .into_iter()
        .map(|c| tokio::spawn(c.run(wait_for(stop_collector_rx.clone()))))
        .collect();
    let mut agent_task = tokio::spawn(damselfly_agent::run(agent_config, wait_for(stop_agent_rx)));
    let mut agent_failed = false;
    tokio::select! {
        () = shutdown_signal() => {}
        r = &mut agent_task => {
            agent_failed = true;
            report_agent(r);
        }
    }
    let _ = stop_agent_tx.send(true);
    if !agent_failed {
        report_agent(agent_task.await);
    }
    let _ = stop_collector_tx.send(true);
    let mut code = if agent_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    for task in tasks {
        let result = task
            .await
            .unwrap_or_else(|e| Err(damselfly_collector::CollectorError::Server(e.to_string())));
        if finish(result) != ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    code
}

/// `damselfly up --shards N`: N collector shards in this process, one shared store, and the local agent.
async fn up_sharded(args: &CollectorArgs, interval: u64, shards: u16) -> ExitCode {
    let base = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("damselfly: {e}");
            return ExitCode::from(2);
        }
    };
    let configs = match sharded_configs(&base, shards) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("damselfly: {e}");
            return ExitCode::from(2);
        }
    };
    let mut collectors = Vec::with_capacity(configs.len());
    for config in configs {
        match Collector::bind(config).await {
            Ok(c) => collectors.push(c),
            Err(e) => {
                eprintln!("damselfly: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    run_with_local_agent(collectors, &base.data_dir, interval).await
}

/// The configs of `n` shards on one machine: ids `s0..`, data directories `<data_dir>/shard-<id>`, one shared
/// store (`shared_dir`, default `<data_dir>/shared`), and ports counting up from the base addresses.
fn sharded_configs(base: &CollectorConfig, n: u16) -> Result<Vec<CollectorConfig>, String> {
    if base.grpc_addr.port() == 0 || base.http_addr.port() == 0 {
        return Err(
            "--shards needs fixed ports (not 0): shard i listens on the given port + i".into(),
        );
    }
    let data_dir = std::path::absolute(&base.data_dir)
        .map_err(|e| format!("cannot resolve {}: {e}", base.data_dir.display()))?;
    let shared = match &base.shared_dir {
        Some(d) => {
            std::path::absolute(d).map_err(|e| format!("cannot resolve {}: {e}", d.display()))?
        }
        None => data_dir.join("shared"),
    };
    let port = |addr: SocketAddr, i: u16| {
        addr.port()
            .checked_add(i)
            .map(|p| SocketAddr::new(addr.ip(), p))
            .ok_or_else(|| format!("port {} + {i} is beyond 65535", addr.port()))
    };
    let mut list = Vec::new();
    for i in 0..n {
        list.push(damselfly_collector::cluster::ShardEndpoint {
            id: format!("s{i}"),
            grpc_url: format!("http://{}", port(base.grpc_addr, i)?),
            http_url: format!("http://{}", port(base.http_addr, i)?),
        });
    }
    // With auth, the shards share one tokens file (the base's) and send each other an admin token of it.
    let tokens_file = std::path::absolute(base.tokens_path())
        .map_err(|e| format!("cannot resolve the tokens file: {e}"))?;
    let peer_token_file = match (&base.peer_token_file, base.auth) {
        (Some(file), _) => Some(file.clone()),
        (None, true) => {
            let saved = data_dir.join("peer.token");
            local_token(
                &tokens_file,
                &saved,
                "shards of damselfly up",
                damselfly_collector::auth::Role::Admin,
                Vec::new(),
            )?;
            Some(saved)
        }
        (None, false) => None,
    };
    let mut configs = Vec::new();
    for (i, shard) in (0..n).zip(&list) {
        let mut c = base.clone();
        c.tokens_file = Some(tokens_file.clone());
        c.peer_token_file.clone_from(&peer_token_file);
        c.shard_id.clone_from(&shard.id);
        c.data_dir = data_dir.join(format!("shard-{}", shard.id));
        // With a bucket (`[shared_store]`) the shards mirror their data directories there instead.
        if base.shared_store.is_none() {
            c.shared_dir = Some(shared.clone());
        }
        c.grpc_addr = port(base.grpc_addr, i)?;
        c.http_addr = port(base.http_addr, i)?;
        // One PostgreSQL port is enough: the first shard's queries span every shard.
        c.pg_addr = base.pg_addr.filter(|_| i == 0);
        c.shards = list.clone();
        c.shards_file = None;
        c.validate().map_err(|e| e.to_string())?;
        configs.push(c);
    }
    Ok(configs)
}

fn report_agent(
    r: Result<
        Result<damselfly_agent::AgentStats, damselfly_agent::AgentError>,
        tokio::task::JoinError,
    >,
) {
    match r {
        Ok(Ok(stats)) => tracing::info!(?stats, "local agent stopped"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "local agent failed");
            eprintln!("damselfly: local agent: {e}");
        }
        Err(e) => eprintln!("damselfly: local agent task: {e}"),
    }
}

fn finish(result: damselfly_collector::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("damselfly: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Completes on Ctrl-C, or on SIGTERM on Unix.
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
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops damselfly")
            }
        }
    }
    ctrl_c().await;
}

async fn ctrl_c() {
    match tokio::signal::ctrl_c().await {
        Ok(()) => tracing::info!("Ctrl-C received; shutting down"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

async fn sql(args: SqlArgs) -> ExitCode {
    match run_sql(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(SqlFailure { message, code }) => {
            eprintln!("damselfly sql: {message}");
            ExitCode::from(code)
        }
    }
}

struct SqlFailure {
    message: String,
    code: u8,
}

fn failure(code: u8) -> impl Fn(String) -> SqlFailure {
    move |message| SqlFailure { message, code }
}

async fn run_sql(args: &SqlArgs) -> Result<(), SqlFailure> {
    let text = if args.sql == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| failure(2)(format!("cannot read SQL from stdin: {e}")))?
    } else {
        args.sql.clone()
    };
    let wire = match args.format {
        OutputFormat::Table => "arrow",
        OutputFormat::Csv => "csv",
        OutputFormat::Json => "json",
    };
    let base = args.url.trim_end_matches('/');
    let url = format!("{base}/api/v1/sql?format={wire}");
    let client = api_client(Duration::from_secs(args.timeout)).map_err(failure(1))?;
    let response = client
        .post(&url)
        .header("content-type", "text/plain; charset=utf-8")
        .body(text)
        .send()
        .await
        .map_err(|e| {
            failure(1)(format!(
                "cannot reach the collector at {base}: {} (is `damselfly up` running?)",
                damselfly_collector::error::error_chain(&e)
            ))
        })?;
    let status = response.status();
    let partial = response
        .headers()
        .get("x-damselfly-partial-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .bytes()
        .await
        .map_err(|e| failure(1)(format!("cannot read the response from {base}: {e}")))?;
    if let Some(reason) = &partial {
        eprintln!("damselfly sql: WARNING: the result is partial: {reason}");
    }
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(failure(1)(format!("{status}: {message}")));
    }
    let output = match args.format {
        OutputFormat::Table => render_table(&body).map_err(failure(1))?,
        OutputFormat::Csv | OutputFormat::Json => body.to_vec(),
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(&output).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `damselfly sql ... | head` closing the pipe is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(failure(1)(format!("cannot write to stdout: {e}"))),
    }
}

/// An Arrow IPC stream as an aligned text table, with the row count under it.
fn render_table(ipc: &[u8]) -> Result<Vec<u8>, String> {
    render_table_counted(ipc).map(|(text, _)| text)
}

/// [`render_table`], and the number of rows.
fn render_table_counted(ipc: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
        .map_err(|e| format!("the collector sent an unreadable Arrow stream: {e}"))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the collector sent an unreadable Arrow stream: {e}"))?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let table = if batches.is_empty() {
        arrow::util::pretty::pretty_format_batches(&[arrow::record_batch::RecordBatch::new_empty(
            schema,
        )])
    } else {
        arrow::util::pretty::pretty_format_batches(&batches)
    }
    .map_err(|e| format!("cannot format the result: {e}"))?;
    let noun = if rows == 1 { "row" } else { "rows" };
    Ok((format!("{table}\n({rows} {noun})\n").into_bytes(), rows))
}

async fn agents(args: AgentsArgs) -> ExitCode {
    match run_agents(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(SqlFailure { message, code }) => {
            eprintln!("damselfly agents: {message}");
            ExitCode::from(code)
        }
    }
}

async fn run_agents(args: &AgentsArgs) -> Result<(), SqlFailure> {
    let base = args.url.trim_end_matches('/');
    let mut url = format!("{base}/api/v1/agents");
    if let Some(status) = &args.status {
        url.push_str("?status=");
        url.push_str(status);
    }
    let client = api_client(Duration::from_secs(args.timeout)).map_err(failure(1))?;
    let response = client.get(&url).send().await.map_err(|e| {
        failure(1)(format!(
            "cannot reach the collector at {base}: {} (is `damselfly up` running?)",
            damselfly_collector::error::error_chain(&e)
        ))
    })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| failure(1)(format!("cannot read the response from {base}: {e}")))?;
    let parsed = serde_json::from_slice::<serde_json::Value>(&body);
    if !status.is_success() {
        let message = parsed
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(failure(1)(format!("{status}: {message}")));
    }
    let agents = match parsed {
        Ok(serde_json::Value::Array(agents)) => agents,
        _ => {
            return Err(failure(1)(format!(
                "the collector at {base} did not answer with a JSON array of agents"
            )));
        }
    };
    let output = match args.format {
        AgentsFormat::Json => {
            let mut text = serde_json::to_string_pretty(&agents)
                .map_err(|e| failure(1)(format!("cannot format the agents: {e}")))?;
            text.push('\n');
            text
        }
        AgentsFormat::Table => render_agents(&agents),
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(output.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(failure(1)(format!("cannot write to stdout: {e}"))),
    }
}

/// The agents of `GET /api/v1/agents` as an aligned table (`-` for an empty value), with the count under it.
fn render_agents(agents: &[serde_json::Value]) -> String {
    const HEADER: [&str; 11] = [
        "agent_id",
        "ns_id",
        "mcis_id",
        "vm_id",
        "csp",
        "region",
        "hostname",
        "mode",
        "status",
        "last_seen",
        "version",
    ];
    let text = |v: &serde_json::Value| -> String {
        let s = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        // Keep one agent on one line whatever its tags hold.
        let s: String = s
            .chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect();
        if s.is_empty() { "-".to_owned() } else { s }
    };
    let mut rows: Vec<Vec<String>> = vec![HEADER.iter().map(|h| (*h).to_owned()).collect()];
    for a in agents {
        let tag = |k: &str| text(&a["identity"][k]);
        let last_seen = a["last_seen_secs_ago"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |secs| format!("{} ago", age(secs)));
        rows.push(vec![
            text(&a["agent_id"]),
            tag("ns_id"),
            tag("mcis_id"),
            tag("vm_id"),
            tag("csp"),
            tag("region"),
            tag("hostname"),
            text(&a["mode"]),
            text(&a["status"]),
            last_seen,
            text(&a["version"]),
        ]);
    }
    let mut out = aligned(&rows);
    let n = agents.len();
    out.push_str(&format!(
        "({n} {})\n",
        if n == 1 { "agent" } else { "agents" }
    ));
    out
}

/// Rows as left-aligned columns two spaces apart (the first row is the header), one line each.
fn aligned(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        widths.resize(widths.len().max(row.len()), 0);
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration for humans: `42s`, `3m05s`, `2h07m`, `3d04h`.
fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

fn agent_install(args: &InstallArgs) -> ExitCode {
    let mut config = match &args.config {
        Some(path) => match AgentConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("damselfly agent install: {e}");
                return ExitCode::from(2);
            }
        },
        None => AgentConfig::default(),
    };
    if args.collector.is_some() {
        config.collector.clone_from(&args.collector);
    }
    let set = |slot: &mut String, v: &Option<String>| {
        if let Some(v) = v {
            slot.clone_from(v);
        }
    };
    set(&mut config.ns_id, &args.ns);
    set(&mut config.mcis_id, &args.mcis);
    set(&mut config.vm_id, &args.vm);
    set(&mut config.csp, &args.csp);
    set(&mut config.region, &args.region);
    // This machine's host name means nothing on the VM: use the flag, else the VM id, else the SSH host.
    config.hostname = args.hostname.clone().unwrap_or_else(|| {
        if config.vm_id.is_empty() {
            args.ssh
                .rsplit('@')
                .next()
                .unwrap_or("vm")
                .trim_start_matches('[')
                .split([']', ':'])
                .next()
                .unwrap_or("vm")
                .to_owned()
        } else {
            config.vm_id.clone()
        }
    });
    if let Some(i) = args.interval {
        config.interval = i;
    }
    let agent_binary = match &args.agent_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| {
                exe.parent()
                    .map(|d| d.join(format!("damselfly-agent{}", std::env::consts::EXE_SUFFIX)))
            })
            .unwrap_or_else(|| PathBuf::from("damselfly-agent")),
    };
    let plan = install::InstallPlan {
        target: args.ssh.clone(),
        identity: args.identity.clone(),
        known_hosts: args.known_hosts.clone(),
        trust_on_first_use: args.trust_on_first_use,
        agent_binary,
        config,
        install_dir: args.install_dir.clone(),
        collector_http: args.collector_http.clone(),
        wait: Duration::from_secs(args.wait),
        no_systemd: args.no_systemd,
    };
    let mut progress = |step: &str| println!("==> {step}");
    match install::install(&plan, &mut progress) {
        Ok(report) => {
            println!(
                "installed agent {} on {} as {}",
                report.agent_id, report.host, report.service
            );
            if let Some(after) = report.heartbeat_after {
                println!("first heartbeat after {:.1} s", after.as_secs_f64());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("damselfly agent install: {e}");
            ExitCode::FAILURE
        }
    }
}
