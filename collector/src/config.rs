//! Typed collector configuration with documented defaults and validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{CollectorError, Result};

/// When the WAL is made durable before a batch is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WalSync {
    /// fsync after every group commit, before any acknowledgement (the default; survives power loss).
    #[default]
    Fsync,
    /// Write to the OS only: survives a process crash, not a power loss. For benchmarks and throw-away setups.
    None,
}

/// Configuration of one collector (one shard).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// Root of the local store: `wal/`, `data/` (Parquet) and `state/` live below it. Default `./damselfly-data`.
    pub data_dir: PathBuf,
    /// gRPC ingest address. Default `127.0.0.1:4317`; port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// HTTP API address. Default `127.0.0.1:8086`; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// PostgreSQL wire protocol address (see [`crate::pgwire`]): `psql`, drivers and BI tools run SQL there.
    /// Default: none (off); port 0 picks a free port.
    pub pg_addr: Option<SocketAddr>,
    /// Require a token on every request (see [`crate::auth`] and SECURITY.md): HTTP `Authorization: Bearer`,
    /// gRPC `authorization` metadata, the PostgreSQL password. Default false (a collector on loopback).
    pub auth: bool,
    /// The token file `damselfly tokens` edits. Default `<data_dir>/tokens.json`.
    pub tokens_file: Option<PathBuf>,
    /// Allow listening on a non-loopback address without both `auth` and `[tls]` (refused otherwise; a warning
    /// is logged). Default false.
    pub insecure: bool,
    /// TLS on every port (see [`crate::tls`]). Default: none (plaintext, for loopback).
    pub tls: Option<crate::tls::TlsConfig>,
    /// This shard's id; it prefixes every file the shard writes and names its directory in the shared store.
    /// Default `s0`.
    pub shard_id: String,
    /// Every shard of the deployment, this one included (`[[shards]]` with `id`, `grpc_url`, `http_url`). Empty
    /// (the default) or one entry: a single collector. See [`crate::cluster`].
    pub shards: Vec<crate::cluster::ShardEndpoint>,
    /// A TOML file with the `[[shards]]` list instead, re-read whenever it changes (checked every
    /// `shard_probe_interval_ms`) and on `POST /api/v1/shards/reload`. Default: none.
    pub shards_file: Option<PathBuf>,
    /// A file holding the token shards send each other (their `/api/v1/cluster/*` calls need an admin token when
    /// `auth` is on): create one admin token and give every shard the same tokens file (`tokens_file`, or a copy
    /// of it). Required with `auth` and shards. Default: none.
    pub peer_token_file: Option<PathBuf>,
    /// How often each shard checks that the others answer (milliseconds). Default 1000, 100 to 60,000.
    pub shard_probe_interval_ms: u64,
    /// The shared store: the directory every shard writes its Parquet files to, each under `shard=<shard_id>/`
    /// (`data/` for tables, `rollups/` for rollups), and reads the others' from. Default: none (files stay in
    /// `<data_dir>/data` and `<data_dir>/rollups`, which is right for a single collector).
    pub shared_dir: Option<PathBuf>,
    /// The shared store in an S3-compatible bucket instead (`[shared_store]`, see [`crate::shared_store`]): each
    /// shard keeps its files in `data_dir` and mirrors them to `<url>/shard=<shard_id>/`. Default: none.
    pub shared_store: Option<crate::shared_store::SharedStoreConfig>,
    /// Durability policy of the WAL. Default `fsync`.
    pub wal_sync: WalSync,
    /// Flush the buffer to Parquet at least this often (seconds). Default 60.
    pub flush_interval_secs: u64,
    /// Flush early once the buffer holds this many bytes (estimated). Default 64 MiB.
    pub flush_buffer_bytes: usize,
    /// Hard limit of the write buffer (bytes of Arrow data, including rows frozen for a flush that is still being
    /// written). At this level a write waits up to `backpressure_wait_ms` for a flush to free space, then is
    /// answered "retry later" (push: ack RETRY with `retry_after_ms`; unary `Write`: gRPC `UNAVAILABLE`). Writes
    /// in progress (received, not yet in the buffer) are held to a quarter of this; beyond that they are answered
    /// "retry later" at once. Default 512 MiB.
    pub max_buffer_bytes: usize,
    /// How long a write may wait for buffer space at the hard limit before it is answered "retry later"
    /// (milliseconds; 0 answers at once). Keep it well below the clients' ack timeout (the agent's is 30 s).
    /// Default 2000, at most 60,000.
    pub backpressure_wait_ms: u64,
    /// Largest gRPC message accepted (bytes, after decompression). Default 16 MiB.
    pub max_grpc_message_bytes: usize,
    /// Points per second one agent may send (a token bucket holding 10 s of it, per agent id; see
    /// [`crate::ratelimit`]); over it, batches are answered "retry later" with the wait. 0 = no limit (default).
    pub max_agent_points_per_sec: u64,
    /// Series per table that the last-value cache keeps (the newest row of each, in memory; see docs/SQL.md,
    /// "Latest value per series"). A table with more is not cached: its latest-value queries scan files. 0 turns
    /// the cache off. Default 100,000.
    pub last_value_cache_max_series: usize,
    /// Series (a table plus its tag set) one namespace may have; a batch that would add more is refused with a
    /// message naming the namespace and the limit (see [`crate::cardinality`]). 0 = no limit. Default 1,000,000.
    pub max_series_per_namespace: usize,
    /// Most points in one batch. Default 100,000.
    pub max_batch_points: usize,
    /// Rows stamped more than this many seconds after the collector's clock are refused (the whole batch, with a
    /// message naming the row's time and the bound): a sender whose clock runs years ahead would otherwise fill
    /// partitions that retention never reaches. Default 604,800 (7 days); 0 turns the bound off.
    pub max_time_skew_secs: u64,
    /// Rows stamped more than this many seconds before the collector's clock are refused likewise (an agent whose
    /// clock was reset to 1970). Default 0: off, so backfills of old data work; set it to at most the retention
    /// to refuse rows that retention would drop at once.
    pub max_time_age_secs: u64,
    /// Largest SQL request body (bytes). Default 1 MiB.
    pub max_sql_bytes: usize,
    /// Largest body of an HTTP write (InfluxDB line protocol, Prometheus remote write), in bytes, both as sent and
    /// after decompression; a larger one is answered `413`. Default 32 MiB.
    pub max_write_bytes: usize,
    /// Longest line of line protocol (bytes); a longer line is rejected with its line number. Default 64 KiB.
    pub max_line_bytes: usize,
    /// Queries are cancelled after this many seconds. Default 60.
    pub query_timeout_secs: u64,
    /// Memory for the operators of all queries running at once (one pool, bytes); a query that needs more than
    /// is left fails with a 503 naming this key. Default 1 GiB.
    pub query_memory_bytes: usize,
    /// Most rows one SQL response may carry. Default 1,000,000.
    pub max_result_rows: usize,
    /// Maximum rows per Parquet row group. Default 131,072.
    pub parquet_row_group_rows: usize,
    /// Agents to pull from (pull mode): gRPC URLs of their `MetricsSource`, `http://host:port`, e.g.
    /// `"http://10.0.0.5:9464"`. Agents that register in pull mode are pulled as well. Default: none.
    pub pull_targets: Vec<String>,
    /// A file holding the token agents in pull mode ask for (their `pull_token`), sent as `authorization: Bearer`
    /// on every Pull. Default: none.
    pub pull_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the pull ports of `https://` targets must have certificates of. Default: none (then
    /// only `http://` targets).
    pub pull_ca_file: Option<PathBuf>,
    /// Prometheus exporters to scrape (text exposition format), e.g. `"http://127.0.0.1:9100/metrics"`. Scraped
    /// every `pull_interval_secs`, bounded by `pull_timeout_secs`. Default: none.
    pub scrape_targets: Vec<String>,
    /// PEM CA certificate(s) trusted, besides the system's roots, for `https://` scrape targets (e.g. exporters
    /// with certificates of `damselfly certs init`). Default: the system's roots only.
    pub scrape_ca_file: Option<PathBuf>,
    /// Seconds between two pulls of one target. Default 10, 1 to 86,400.
    pub pull_interval_secs: u64,
    /// A pull call (connect included) that takes longer than this many seconds fails. Default 5, 1 to 3,600.
    pub pull_timeout_secs: u64,
    /// How often agents are asked to send heartbeats (seconds). An agent is `healthy` while heard from within 3
    /// intervals, `stale` within 10, `down` after that. Default 10, 1 to 86,400.
    pub heartbeat_interval_secs: u64,

    // Maintenance: compaction, rollups, retention (docs/STORAGE.md, "Maintenance").
    /// Seconds between two maintenance passes (compaction, then rollups, then retention). Default 300, 1 to
    /// 86,400. `POST /api/v1/admin/maintenance` runs a pass at once.
    pub maintenance_interval_secs: u64,
    /// Compact an hour partition once it holds this many files, even while its hour is still open. Default 16,
    /// 2 to 10,000.
    pub compaction_min_files: usize,
    /// An hour counts as closed this many seconds after it ends; a closed hour with two or more files is
    /// compacted. Default 600, at most 604,800.
    pub compaction_closed_after_secs: u64,
    /// Most files merged by one compaction (its fan-in, which bounds its memory); a partition with more takes
    /// several rounds. Default 32, 2 to 1,000.
    pub compaction_max_files: usize,
    /// Build the 1-minute and 1-hour rollup tables (`rollup_1m.<table>`, `rollup_1h.<table>`). Default true.
    pub rollups: bool,
    /// How long raw measurements are kept: `"<n>s|m|h|d|w"` (at least 1h) or `"forever"`. Whole hour
    /// partitions older than this are dropped. Default `"30d"`.
    pub retention_default: crate::retention::RetentionPeriod,
    /// Same for the 1-minute rollup tables. Default `"90d"`.
    pub retention_rollup_1m_default: crate::retention::RetentionPeriod,
    /// Same for the 1-hour rollup tables. Default `"730d"`.
    pub retention_rollup_1h_default: crate::retention::RetentionPeriod,
    /// Per-table retention, overriding the defaults: `[retention]` with `cpu = "7d"`, `"rollup_1h.cpu" =
    /// "forever"`. Default: none.
    pub retention: std::collections::BTreeMap<String, crate::retention::RetentionPeriod>,

    /// Destinations that receive a copy of every stored point over the InfluxDB v2 write API (`[[forward]]`).
    /// Default: none.
    pub forward: Vec<crate::forward::ForwardConfig>,

    /// Alerting (`[alerts]`: the rules file, the evaluation interval, notification retries); see
    /// [`crate::alerts::AlertsConfig`] and docs/ALERTING.md.
    pub alerts: crate::alerts::AlertsConfig,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            data_dir: PathBuf::from("./damselfly-data"),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 4317)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8086)),
            pg_addr: None,
            auth: false,
            tokens_file: None,
            insecure: false,
            tls: None,
            shard_id: "s0".to_string(),
            shards: Vec::new(),
            shards_file: None,
            peer_token_file: None,
            shard_probe_interval_ms: 1_000,
            shared_dir: None,
            shared_store: None,
            wal_sync: WalSync::Fsync,
            flush_interval_secs: 60,
            flush_buffer_bytes: 64 << 20,
            max_buffer_bytes: 512 << 20,
            backpressure_wait_ms: 2_000,
            max_grpc_message_bytes: 16 << 20,
            last_value_cache_max_series: 100_000,
            max_agent_points_per_sec: 0,
            max_series_per_namespace: 1_000_000,
            max_batch_points: 100_000,
            max_time_skew_secs: 7 * 86_400,
            max_time_age_secs: 0,
            max_sql_bytes: 1 << 20,
            max_write_bytes: 32 << 20,
            max_line_bytes: 64 << 10,
            query_timeout_secs: 60,
            query_memory_bytes: 1 << 30,
            max_result_rows: 1_000_000,
            parquet_row_group_rows: 128 * 1024,
            pull_targets: Vec::new(),
            pull_token_file: None,
            pull_ca_file: None,
            scrape_targets: Vec::new(),
            scrape_ca_file: None,
            pull_interval_secs: 10,
            pull_timeout_secs: 5,
            heartbeat_interval_secs: 10,
            maintenance_interval_secs: 300,
            compaction_min_files: 16,
            compaction_closed_after_secs: 600,
            compaction_max_files: 32,
            rollups: true,
            retention_default: crate::retention::RetentionPeriod::days(30),
            retention_rollup_1m_default: crate::retention::RetentionPeriod::days(90),
            retention_rollup_1h_default: crate::retention::RetentionPeriod::days(730),
            retention: std::collections::BTreeMap::new(),
            forward: Vec::new(),
            alerts: crate::alerts::AlertsConfig::default(),
        }
    }
}

impl CollectorConfig {
    /// Checks every value and says which one is wrong and why.
    /// Addresses this collector listens on that other hosts can reach.
    pub fn exposed_addrs(&self) -> Vec<SocketAddr> {
        [Some(self.grpc_addr), Some(self.http_addr), self.pg_addr]
            .into_iter()
            .flatten()
            .filter(|a| !a.ip().is_loopback())
            .collect()
    }

    /// The TLS settings of `https://` pull targets: their certificates must be of `pull_ca_file`'s CA. `None`
    /// without the file.
    pub fn pull_tls(
        &self,
    ) -> std::result::Result<Option<tonic::transport::ClientTlsConfig>, String> {
        let Some(path) = &self.pull_ca_file else {
            return Ok(None);
        };
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        crate::tls::ca_certificates(&pem, path)?;
        Ok(Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        ))
    }

    /// The token of `pull_token_file` as the `authorization` value of a Pull: `None` without the file; an error
    /// naming the file when it cannot be read or holds no token.
    pub fn pull_token(
        &self,
    ) -> std::result::Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, String>
    {
        let Some(path) = &self.pull_token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("pull_token_file {}: {e}", path.display()))?;
        let token = token.trim();
        let mut value = (!token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| format!("Bearer {token}").parse().ok())
            .flatten()
            .ok_or_else(|| {
                format!(
                    "pull_token_file {}: holds no token (printable ASCII, no spaces)",
                    path.display()
                )
            })?;
        tonic::metadata::MetadataValue::set_sensitive(&mut value, true);
        Ok(Some(value))
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CollectorError::Config(m));
        let sharded = !self.shards.is_empty() || self.shards_file.is_some();
        if self.auth && sharded && self.peer_token_file.is_none() {
            return bad(
                "auth with shards needs peer_token_file: a file holding an admin token that every shard accepts \
                 (create it with `damselfly tokens create --role admin`, and give every shard the same tokens \
                 file), which shards send each other"
                    .into(),
            );
        }
        let exposed = self.exposed_addrs();
        let protected = self.auth && self.tls.is_some();
        if !exposed.is_empty() && !protected && !self.insecure {
            let list: Vec<String> = exposed.iter().map(ToString::to_string).collect();
            let missing = match (self.auth, self.tls.is_some()) {
                (false, false) => {
                    "with auth and TLS off: anyone who reaches it could write and read every \
                                   namespace, in the clear"
                }
                (false, true) => {
                    "with auth off: anyone who reaches it could write and read every namespace"
                }
                _ => "without TLS: tokens and data would cross the network in the clear",
            };
            return bad(format!(
                "refusing to listen on {} {missing}. Turn on auth (`auth = true` or --auth, tokens from \
                 `damselfly tokens create`) and TLS (`[tls]`, certificates from `damselfly certs init`), listen on \
                 127.0.0.1, or accept the risk with `insecure = true` / --insecure",
                list.join(", ")
            ));
        }
        if self.shard_id.is_empty()
            || self.shard_id.len() > 64
            || !self
                .shard_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad(format!(
                "shard_id {:?} must be 1-64 characters of [A-Za-z0-9_-]",
                self.shard_id
            ));
        }
        if self.flush_interval_secs == 0 {
            return bad("flush_interval_secs must be at least 1".into());
        }
        if self.flush_buffer_bytes == 0 || self.flush_buffer_bytes > self.max_buffer_bytes {
            return bad(format!(
                "flush_buffer_bytes ({}) must be between 1 and max_buffer_bytes ({})",
                self.flush_buffer_bytes, self.max_buffer_bytes
            ));
        }
        if self.backpressure_wait_ms > 60_000 {
            return bad(format!(
                "backpressure_wait_ms ({}) must be at most 60000",
                self.backpressure_wait_ms
            ));
        }
        if self.max_grpc_message_bytes < 1024 {
            return bad("max_grpc_message_bytes must be at least 1024".into());
        }
        if self.max_batch_points == 0 {
            return bad("max_batch_points must be at least 1".into());
        }
        // Under an hour the bound would refuse honest senders whose clocks drift by minutes.
        for (name, secs) in [
            ("max_time_skew_secs", self.max_time_skew_secs),
            ("max_time_age_secs", self.max_time_age_secs),
        ] {
            if secs != 0 && secs < 3_600 {
                return bad(format!(
                    "{name} ({secs}) must be 0 (off) or at least 3600: clocks drift by minutes"
                ));
            }
        }
        if let Some(pg) = self.pg_addr
            && pg.port() != 0
            && (pg == self.http_addr || pg == self.grpc_addr)
        {
            return bad(format!(
                "pg_addr ({pg}) must differ from http_addr and grpc_addr"
            ));
        }
        if self.query_timeout_secs == 0 {
            return bad("query_timeout_secs must be at least 1".into());
        }
        if self.max_sql_bytes == 0
            || self.max_result_rows == 0
            || self.query_memory_bytes < (1 << 20)
        {
            return bad("max_sql_bytes and max_result_rows must be at least 1, query_memory_bytes at least 1 MiB".into());
        }
        if self.max_write_bytes < 1024 || self.max_line_bytes < 256 {
            return bad(format!(
                "max_write_bytes ({}) must be at least 1024 and max_line_bytes ({}) at least 256",
                self.max_write_bytes, self.max_line_bytes
            ));
        }
        if self.parquet_row_group_rows < 1024 {
            return bad("parquet_row_group_rows must be at least 1024".into());
        }
        for url in &self.pull_targets {
            if let Err(reason) = crate::pull::validate_target_url(url) {
                return bad(format!("pull_targets: {reason}"));
            }
        }
        if !(1..=86_400).contains(&self.pull_interval_secs) {
            return bad(format!(
                "pull_interval_secs ({}) must be between 1 and 86400",
                self.pull_interval_secs
            ));
        }
        if !(1..=3_600).contains(&self.pull_timeout_secs) {
            return bad(format!(
                "pull_timeout_secs ({}) must be between 1 and 3600",
                self.pull_timeout_secs
            ));
        }
        if !(1..=86_400).contains(&self.heartbeat_interval_secs) {
            return bad(format!(
                "heartbeat_interval_secs ({}) must be between 1 and 86400",
                self.heartbeat_interval_secs
            ));
        }
        if !(1..=86_400).contains(&self.maintenance_interval_secs) {
            return bad(format!(
                "maintenance_interval_secs ({}) must be between 1 and 86400",
                self.maintenance_interval_secs
            ));
        }
        if !(2..=10_000).contains(&self.compaction_min_files)
            || !(2..=1_000).contains(&self.compaction_max_files)
        {
            return bad(format!(
                "compaction_min_files ({}) must be between 2 and 10000 and compaction_max_files ({}) between 2 and 1000",
                self.compaction_min_files, self.compaction_max_files
            ));
        }
        if self.compaction_closed_after_secs > 604_800 {
            return bad(format!(
                "compaction_closed_after_secs ({}) must be at most 604800 (a week)",
                self.compaction_closed_after_secs
            ));
        }
        if let Err(reason) = self.pull_token() {
            return bad(reason);
        }
        if let Err(reason) = self.pull_tls() {
            return bad(format!("pull_ca_file: {reason}"));
        }
        if self.pull_ca_file.is_none()
            && let Some(url) = self.pull_targets.iter().find(|u| u.starts_with("https://"))
        {
            return bad(format!(
                "pull_targets: {url:?} is https://, which needs pull_ca_file (the CA of the agents' pull certificates)"
            ));
        }
        for url in &self.scrape_targets {
            if let Err(reason) = crate::ingest::scrape::validate_scrape_url(url) {
                return bad(format!("scrape_targets: {reason}"));
            }
        }
        if let Some(ca) = &self.scrape_ca_file
            && let Err(reason) = crate::tls::trust_ca_file(reqwest::Client::builder(), ca)
        {
            return bad(format!("scrape_ca_file: {reason}"));
        }
        for (i, destination) in self.forward.iter().enumerate() {
            if let Err(reason) = destination.validate() {
                return bad(format!("forward[{i}]: {reason}"));
            }
        }
        if !(100..=60_000).contains(&self.shard_probe_interval_ms) {
            return bad(format!(
                "shard_probe_interval_ms ({}) must be between 100 and 60000",
                self.shard_probe_interval_ms
            ));
        }
        if !self.shards.is_empty() && self.shards_file.is_some() {
            return bad("set either shards or shards_file, not both".into());
        }
        if let Err(reason) =
            crate::cluster::validate_shards(&self.shard_id, &self.shards, self.tls.is_some())
        {
            return bad(format!("shards: {reason}"));
        }
        if let Some(store) = &self.shared_store {
            if self.shared_dir.is_some() {
                return bad("set either shared_dir or shared_store, not both".into());
            }
            if let Err(reason) = store.validate(self.query_timeout_secs) {
                return bad(format!("shared_store: {reason}"));
            }
        }
        crate::retention::validate_keys(self)?;
        self.alerts.validate().map_err(CollectorError::Config)?;
        Ok(())
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_secs(self.flush_interval_secs)
    }

    pub fn backpressure_wait(&self) -> Duration {
        Duration::from_millis(self.backpressure_wait_ms)
    }

    pub fn query_limits(&self) -> crate::query::QueryLimits {
        crate::query::QueryLimits {
            timeout: Duration::from_secs(self.query_timeout_secs),
            memory_bytes: self.query_memory_bytes,
            max_result_rows: self.max_result_rows,
        }
    }

    /// Where the tokens are kept.
    pub fn tokens_path(&self) -> PathBuf {
        self.tokens_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tokens.json"))
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join("wal")
    }

    /// Where this shard's Parquet files live: `<shared_dir>/shard=<shard_id>` with a shared store, else
    /// `data_dir`. Tables are in `data/` below it, rollups in `rollups/`.
    pub fn shard_root(&self) -> PathBuf {
        match &self.shared_dir {
            Some(shared) => crate::cluster::shard_root(shared, &self.shard_id),
            None => self.data_dir.clone(),
        }
    }

    pub fn tables_dir(&self) -> PathBuf {
        self.shard_root().join("data")
    }

    pub fn rollups_dir(&self) -> PathBuf {
        self.shard_root().join("rollups")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join("state")
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(CollectorConfig::default().validate().is_ok());
    }

    #[test]
    fn bad_values_are_named() {
        let config = CollectorConfig {
            shard_id: "a/b".into(),
            ..CollectorConfig::default()
        };
        let err = config.validate().expect_err("slash in shard id");
        assert!(err.to_string().contains("shard_id"), "{err}");
        let config = CollectorConfig {
            pull_targets: vec!["https://10.0.0.7:9100".into()],
            ..CollectorConfig::default()
        };
        let err = config.validate().expect_err("https without a CA");
        assert!(err.to_string().contains("needs pull_ca_file"), "{err}");
        let config = CollectorConfig {
            pull_ca_file: Some("/nonexistent/ca.pem".into()),
            ..CollectorConfig::default()
        };
        let err = config.validate().expect_err("unreadable CA");
        assert!(
            err.to_string().contains("pull_ca_file")
                && err.to_string().contains("/nonexistent/ca.pem"),
            "{err}"
        );
        let config = CollectorConfig {
            pull_token_file: Some("/nonexistent/pull.token".into()),
            ..CollectorConfig::default()
        };
        let err = config.validate().expect_err("unreadable token");
        assert!(err.to_string().contains("pull_token_file"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<CollectorConfig>("data_dri = \"x\"").expect_err("typo");
        assert!(err.to_string().contains("data_dri"), "{err}");
    }
}
