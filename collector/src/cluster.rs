//! Shards: the shard map, which peers answer, which shard owns an agent, and what a query needs from the others.
//!
//! * **Map.** Every shard is configured with its own id and the list of all shards (`shards` in the config, or a
//!   `shards_file` that is re-read when it changes). Any shard serves the map: gRPC `Shards.GetShardMap` and
//!   `GET /api/v1/shards`.
//! * **Liveness.** Each shard asks every peer for its table list (`GET /api/v1/cluster/tables`) every
//!   `shard_probe_interval_ms`; a peer that answers is live. The answer also tells queries which tables exist on
//!   the peer (DataFusion lists tables synchronously, so it cannot ask then).
//! * **Ownership.** An agent belongs to the live shard with the highest rendezvous score
//!   ([`damselfly_proto::shards`]), leaving out the shards the agent says it cannot reach (gRPC metadata
//!   [`UNREACHABLE_METADATA`]). A shard that is not the owner answers REDIRECT naming the owner.
//! * **Shared store.** Shards write their Parquet files under `<shared_dir>/shard=<id>/` ([`shard_root`]); a query
//!   on any shard reads the others' files there. For a live peer it asks `GET /api/v1/cluster/snapshot`, which
//!   returns in one consistent step the peer's file list and its buffered (acknowledged, not yet flushed) rows; for a
//!   peer that does not answer it lists the peer's directory and marks the result partial, naming the shard. With
//!   `[shared_store]` the store is a bucket instead: each shard mirrors its files there and peers read them as
//!   `s3://` objects ([`crate::shared_store`]).
//! * **Dedup across shards.** A shard that restarts asks the live peers which of the batches in its WAL they
//!   stored meanwhile (`POST /api/v1/cluster/seen`) and does not replay those ([`Cluster::stored_elsewhere`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arrow::record_batch::RecordBatch;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use damselfly_proto::v1::shards_server::{Shards, ShardsServer};
use damselfly_proto::v1::{ShardInfo, ShardMap, ShardMapRequest};
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, TableSchema};
use crate::error::error_chain;
use crate::http::{ApiError, ApiState};
use crate::persist::ParquetFile;
use crate::rollup::Resolution;
use crate::store::{Store, TableSnapshot};

/// gRPC request metadata in which an agent lists the shard ids it could not reach (comma-separated).
pub const UNREACHABLE_METADATA: &str = "damselfly-unreachable-shards";

/// Largest peer answer read (a snapshot carries the peer's buffered rows of one table).
const MAX_PEER_RESPONSE_BYTES: usize = 1 << 30;

/// One shard of the deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEndpoint {
    /// Shard id: 1-64 characters of `[A-Za-z0-9_-]`.
    pub id: String,
    /// Where agents push, `http://host:port`.
    pub grpc_url: String,
    /// The shard's HTTP API, `http://host:port`.
    pub http_url: String,
}

/// The `shards_file` format: `[[shards]]` entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardsFile {
    shards: Vec<ShardEndpoint>,
}

/// The directory of one shard in the shared store.
pub fn shard_root(shared_dir: &Path, shard_id: &str) -> PathBuf {
    shared_dir.join(format!("shard={shard_id}"))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The scheme shard URLs use: `https` when the shards run with `[tls]` (all of a deployment's shards do or none).
fn shard_scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

fn valid_url(url: &str, tls: bool) -> bool {
    url.strip_prefix(shard_scheme(tls))
        .and_then(|rest| rest.strip_prefix("://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
}

/// Checks a shard list: valid, distinct ids and URLs (`https://` ones with `tls`, `http://` ones without), and
/// `self_id` among them (unless the list is empty).
pub fn validate_shards(self_id: &str, shards: &[ShardEndpoint], tls: bool) -> Result<(), String> {
    let mut ids = HashSet::new();
    for s in shards {
        if !valid_id(&s.id) {
            return Err(format!(
                "shard id {:?} must be 1-64 characters of [A-Za-z0-9_-]",
                s.id
            ));
        }
        if !ids.insert(s.id.as_str()) {
            return Err(format!("shard id {:?} is listed twice", s.id));
        }
        for (key, url) in [("grpc_url", &s.grpc_url), ("http_url", &s.http_url)] {
            if !valid_url(url, tls) {
                let why = if tls {
                    " (this shard runs with [tls], so its peers are reached over HTTPS)"
                } else {
                    " (this shard runs without [tls])"
                };
                return Err(format!(
                    "shard {:?}: {key} {url:?} must be a URL like {}://10.0.0.5:4317{why}",
                    s.id,
                    shard_scheme(tls)
                ));
            }
        }
    }
    if !shards.is_empty() && !ids.contains(self_id) {
        return Err(format!(
            "this shard's id {self_id:?} is not in the list ({})",
            shards
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// Reads and checks a `shards_file`.
pub fn load_shards_file(
    path: &Path,
    self_id: &str,
    tls: bool,
) -> Result<Vec<ShardEndpoint>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read shards_file {}: {e}", path.display()))?;
    let file: ShardsFile = toml::from_str(&text)
        .map_err(|e| format!("shards_file {} is not valid: {e}", path.display()))?;
    validate_shards(self_id, &file.shards, tls)
        .map_err(|e| format!("shards_file {}: {e}", path.display()))?;
    Ok(file.shards)
}

/// What this shard knows about a peer.
#[derive(Debug, Clone, Default)]
struct PeerHealth {
    live: bool,
    /// Set once the peer has been probed; before that it counts as live (so a starting cluster does not move
    /// every agent around).
    probed: bool,
    last_error: Option<String>,
    last_ok: Option<Instant>,
    /// The peer's tables by schema (`public`, `rollup_1m`, `rollup_1h`), from its last answer.
    tables: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default)]
struct ClusterState {
    shards: Vec<ShardEndpoint>,
    version: u64,
    health: HashMap<String, PeerHealth>,
    file_mtime: Option<SystemTime>,
}

/// The shard map and the peers' liveness. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

#[derive(Debug)]
struct ClusterInner {
    self_id: String,
    /// This shard's own endpoint, as configured or as bound (for the map of a single collector).
    self_endpoint: ShardEndpoint,
    /// The shards run with `[tls]`: their URLs are `https://`.
    tls: bool,
    shards_file: Option<PathBuf>,
    shared_dir: Option<PathBuf>,
    /// The shared store in a bucket (`[shared_store]`), instead of `shared_dir`.
    shared_store: Option<crate::shared_store::SharedStore>,
    probe_interval: Duration,
    client: reqwest::Client,
    state: RwLock<ClusterState>,
}

/// A peer that a query could not fully read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingShard {
    pub shard: String,
    pub reason: String,
}

/// One table as a peer holds it.
#[derive(Debug)]
pub struct PeerTable {
    pub schema: TableSchema,
    pub files: Vec<Arc<ParquetFile>>,
    pub batches: Vec<RecordBatch>,
}

impl PeerTable {
    /// A table of files only (a shard that does not answer), its schema merged over the files' schemas; `None`
    /// without files.
    pub fn from_files(
        table: &str,
        files: Vec<(ParquetFile, TableSchema)>,
    ) -> Result<Option<PeerTable>, String> {
        let mut catalog = Catalog::default();
        let mut out = Vec::with_capacity(files.len());
        for (file, schema) in files {
            catalog
                .merge_table(table, &schema)
                .map_err(|e| e.to_string())?;
            out.push(Arc::new(file));
        }
        Ok(catalog.table(table).cloned().map(|schema| PeerTable {
            schema,
            files: out,
            batches: Vec::new(),
        }))
    }
}

/// How a file is described to other shards: its path relative to the shard root, and what pruning needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireFile {
    path: String,
    hour: i64,
    wal_seq: u64,
    rows: u64,
    min_time: i64,
    max_time: i64,
    bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotHeader {
    shard: String,
    files: Vec<WireFile>,
}

impl Cluster {
    /// The cluster of `config`, with `self_endpoint` describing this shard when the map does not (single
    /// collector). Reads `shards_file` if set.
    pub fn new(
        config: &crate::CollectorConfig,
        self_endpoint: ShardEndpoint,
    ) -> crate::Result<Cluster> {
        let mut state = ClusterState {
            shards: config.shards.clone(),
            version: 1,
            ..ClusterState::default()
        };
        if let Some(path) = &config.shards_file {
            state.shards = load_shards_file(path, &config.shard_id, config.tls.is_some())
                .map_err(crate::CollectorError::Config)?;
            state.file_mtime = mtime(path);
        }
        // With auth, peers' cluster endpoints want an admin token: every request carries the peer token.
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(path) = &config.peer_token_file {
            let token =
                std::fs::read_to_string(path).map_err(|e| crate::CollectorError::io(path, e))?;
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| {
                        crate::CollectorError::Config(format!(
                            "peer_token_file {}: not a token",
                            path.display()
                        ))
                    })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .default_headers(headers);
        if let Some(ca) = config.tls.as_ref().and_then(|t| t.peer_ca_file.as_deref()) {
            client =
                crate::tls::trust_ca_file(client, ca).map_err(crate::CollectorError::Config)?;
        }
        let client = client.build().map_err(|e| {
            crate::CollectorError::Server(format!("cannot build an HTTP client: {e}"))
        })?;
        let self_endpoint = state
            .shards
            .iter()
            .find(|s| s.id == config.shard_id)
            .cloned()
            .unwrap_or(self_endpoint);
        let shared_store = config
            .shared_store
            .as_ref()
            .map(|s| {
                crate::shared_store::SharedStore::new(s, &config.shard_id, &config.shard_root())
            })
            .transpose()?;
        Ok(Cluster {
            inner: Arc::new(ClusterInner {
                self_id: config.shard_id.clone(),
                self_endpoint,
                tls: config.tls.is_some(),
                shards_file: config.shards_file.clone(),
                shared_dir: config.shared_dir.clone(),
                shared_store,
                probe_interval: Duration::from_millis(config.shard_probe_interval_ms),
                client,
                state: RwLock::new(state),
            }),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ClusterState> {
        self.inner.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ClusterState> {
        self.inner.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn self_id(&self) -> &str {
        &self.inner.self_id
    }

    /// The bucket this shard mirrors its files to, if configured.
    pub fn shared_store(&self) -> Option<&crate::shared_store::SharedStore> {
        self.inner.shared_store.as_ref()
    }

    /// Whether there are other shards.
    pub fn is_sharded(&self) -> bool {
        self.read()
            .shards
            .iter()
            .any(|s| s.id != self.inner.self_id)
    }

    /// The other shards, with whether they answer.
    pub fn peers(&self) -> Vec<(ShardEndpoint, bool)> {
        let state = self.read();
        state
            .shards
            .iter()
            .filter(|s| s.id != self.inner.self_id)
            .map(|s| (s.clone(), state.health.get(&s.id).is_none_or(|h| h.live)))
            .collect()
    }

    /// The shard that owns `agent_id` when it cannot reach `unreachable`; `None` when this shard does (or there
    /// are no other shards).
    pub fn owner_of(&self, agent_id: &str, unreachable: &[&str]) -> Option<ShardEndpoint> {
        let state = self.read();
        if !state.shards.iter().any(|s| s.id != self.inner.self_id) {
            return None;
        }
        let candidates = state.shards.iter().filter(|s| {
            s.id == self.inner.self_id
                || (state.health.get(&s.id).is_none_or(|h| h.live)
                    && !unreachable.contains(&s.id.as_str()))
        });
        let owner = damselfly_proto::shards::owner(agent_id, candidates.map(|s| s.id.as_str()))?;
        if owner == self.inner.self_id {
            return None;
        }
        state.shards.iter().find(|s| s.id == owner).cloned()
    }

    /// The owner of each agent id over every shard of the map (live or not), for `POST /api/v1/shards/assign`.
    pub fn assign<'a>(&self, agent_ids: &'a [String]) -> BTreeMap<&'a str, String> {
        let state = self.read();
        let ids: Vec<&str> = if state.shards.is_empty() {
            vec![self.inner.self_id.as_str()]
        } else {
            state.shards.iter().map(|s| s.id.as_str()).collect()
        };
        agent_ids
            .iter()
            .map(|a| {
                let owner = damselfly_proto::shards::owner(a, ids.iter().copied()).unwrap_or("");
                (a.as_str(), owner.to_string())
            })
            .collect()
    }

    fn info(&self, s: &ShardEndpoint, state: &ClusterState) -> ShardInfo {
        ShardInfo {
            id: s.id.clone(),
            grpc_url: s.grpc_url.clone(),
            http_url: s.http_url.clone(),
            live: s.id == self.inner.self_id || state.health.get(&s.id).is_none_or(|h| h.live),
        }
    }

    /// The shard map as the protocol carries it.
    pub fn map(&self) -> ShardMap {
        let state = self.read();
        let shards = if state.shards.is_empty() {
            vec![self.info(&self.inner.self_endpoint, &state)]
        } else {
            state.shards.iter().map(|s| self.info(s, &state)).collect()
        };
        ShardMap {
            self_id: self.inner.self_id.clone(),
            shards,
            version: state.version,
        }
    }

    /// The redirect target of an ack.
    pub fn shard_info(&self, endpoint: &ShardEndpoint) -> ShardInfo {
        self.info(endpoint, &self.read())
    }

    /// Re-reads `shards_file`; `Ok(true)` when the list changed. Without a file there is nothing to reload.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.inner.shards_file else {
            return Err(
                "this shard has no shards_file to reload (its shards are in its config)".into(),
            );
        };
        let shards = load_shards_file(path, &self.inner.self_id, self.inner.tls)?;
        let mut state = self.write();
        state.file_mtime = mtime(path);
        if shards == state.shards {
            return Ok(false);
        }
        tracing::info!(
            from = ?state.shards.iter().map(|s| &s.id).collect::<Vec<_>>(),
            to = ?shards.iter().map(|s| &s.id).collect::<Vec<_>>(),
            "shard map changed"
        );
        state.shards = shards;
        state.version += 1;
        Ok(true)
    }

    /// Probes the peers and watches `shards_file` until `stop` completes.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(self.inner.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            if let Some(path) = &self.inner.shards_file
                && mtime(path) != self.read().file_mtime
                && let Err(e) = self.reload()
            {
                // Keep the last good map: a half-written file must not empty the cluster.
                tracing::warn!(error = %e, "shards_file changed but cannot be used; keeping the previous map");
                self.write().file_mtime = mtime(path);
            }
            self.probe().await;
        }
    }

    /// Asks every peer for its tables once.
    pub async fn probe(&self) {
        let peers = self.peers();
        let answers = futures::future::join_all(peers.iter().map(|(peer, _)| async move {
            let url = format!("{}/api/v1/cluster/tables", peer.http_url);
            let answer = async {
                let response = self
                    .inner
                    .client
                    .get(&url)
                    .timeout(self.inner.probe_interval.max(Duration::from_millis(500)))
                    .send()
                    .await
                    .map_err(|e| error_chain(&e))?;
                if !response.status().is_success() {
                    return Err(format!("{url} answered {}", response.status()));
                }
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
                serde_json::from_slice::<BTreeMap<String, Vec<String>>>(&body)
                    .map_err(|e| format!("{url}: {e}"))
            }
            .await;
            (peer.id.clone(), answer)
        }))
        .await;
        let mut state = self.write();
        for (id, answer) in answers {
            let health = state.health.entry(id.clone()).or_default();
            let was_live = health.live || !health.probed;
            health.probed = true;
            match answer {
                Ok(tables) => {
                    if !health.live {
                        tracing::info!(shard = %id, "shard answers");
                    }
                    health.live = true;
                    health.last_ok = Some(Instant::now());
                    health.last_error = None;
                    health.tables = tables;
                }
                Err(e) => {
                    if was_live {
                        tracing::warn!(shard = %id, error = %e, "shard does not answer");
                    }
                    health.live = false;
                    health.last_error = Some(e);
                }
            }
        }
    }

    /// Tables of `schema` on the peers, from their last answers.
    pub fn peer_table_names(&self, schema: &str) -> BTreeSet<String> {
        let state = self.read();
        let mut names = BTreeSet::new();
        for s in &state.shards {
            if let Some(h) = state.health.get(&s.id) {
                names.extend(h.tables.get(schema).into_iter().flatten().cloned());
            }
        }
        names
    }

    /// The given table of every peer: live peers answer with files and buffered rows; for the others, their files
    /// in the shared store are read and they are named in the returned list of missing shards.
    pub async fn peer_tables(
        &self,
        schema: &str,
        table: &str,
    ) -> (Vec<PeerTable>, Vec<MissingShard>) {
        let peers = self.peers();
        let answers = futures::future::join_all(peers.into_iter().map(|(peer, live)| async move {
            if live {
                match self.fetch_snapshot(&peer, schema, table).await {
                    Ok(t) => return (peer, Ok(t)),
                    Err(e) => return (peer, Err(e)),
                }
            }
            (peer, Err("does not answer".to_string()))
        }))
        .await;
        let mut tables = Vec::new();
        let mut missing = Vec::new();
        for (peer, answer) in answers {
            match answer {
                Ok(Some(t)) => tables.push(t),
                Ok(None) => {}
                Err(reason) => {
                    let files = self.list_dead_shard(&peer.id, schema, table).await;
                    let reason = match &files {
                        Ok(Some(t)) => {
                            let n = t.files.len();
                            format!(
                                "{reason}; its {n} file(s) in the shared store are included, its rows not yet flushed are not"
                            )
                        }
                        Ok(None) => {
                            format!("{reason}; it has no files of this table in the shared store")
                        }
                        Err(e) => format!("{reason}; its files cannot be read either: {e}"),
                    };
                    if let Ok(Some(t)) = files {
                        tables.push(t);
                    }
                    missing.push(MissingShard {
                        shard: peer.id.clone(),
                        reason,
                    });
                }
            }
        }
        (tables, missing)
    }

    async fn fetch_snapshot(
        &self,
        peer: &ShardEndpoint,
        schema: &str,
        table: &str,
    ) -> Result<Option<PeerTable>, String> {
        // Schema and table names are of [A-Za-z0-9_.-] (the data model's alphabet): nothing to escape.
        let url = format!(
            "{}/api/v1/cluster/snapshot?schema={schema}&table={table}",
            peer.http_url
        );
        let response = self
            .inner
            .client
            .get(&url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(format!("snapshot answered {status}: {text}"));
        }
        let body = response.bytes().await.map_err(|e| error_chain(&e))?;
        if body.len() > MAX_PEER_RESPONSE_BYTES {
            return Err(format!("snapshot of {} bytes is too large", body.len()));
        }
        let root = self.peer_root(&peer.id)?;
        decode_snapshot(&body, &root, table).map(Some)
    }

    fn peer_root(&self, shard: &str) -> Result<PathBuf, String> {
        if let Some(store) = &self.inner.shared_store {
            return Ok(store.peer_root(shard));
        }
        self.inner
            .shared_dir
            .as_deref()
            .map(|d| shard_root(d, shard))
            .ok_or_else(|| {
                "this shard has no shared_dir, so it cannot read other shards' files".to_string()
            })
    }

    /// The files of a shard that does not answer, read from its directory in the shared store (raw tables only:
    /// its rollups are left out). Read-only: nothing of the other shard is changed.
    async fn list_dead_shard(
        &self,
        shard: &str,
        schema: &str,
        table: &str,
    ) -> Result<Option<PeerTable>, String> {
        if schema != "public" {
            return Ok(None);
        }
        if let Some(store) = &self.inner.shared_store {
            return store.list_shard_table(shard, table).await;
        }
        let dir = self.peer_root(shard)?.join("data").join(table);
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut paths = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for entry in entries {
                let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "parquet") {
                    paths.push(path);
                }
            }
        }
        // A compaction's inputs stay for a grace period beside its output (the shard died before deleting them, or
        // the grace period had not passed): count their rows once, from the output.
        let mut replaced = HashSet::new();
        for path in &paths {
            let names = crate::compaction::replaced_files(path).map_err(|e| e.to_string())?;
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            replaced.extend(names.into_iter().map(|name| dir.join(name)));
        }
        let files = paths
            .iter()
            .filter(|p| !replaced.contains(*p))
            .map(|path| crate::persist::read_file_meta(path, table).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, String>>()?;
        PeerTable::from_files(table, files)
    }

    /// `GET <peer http_url><path>` on every live peer at once: the bodies of those that answered 200, and the
    /// others as missing shards.
    pub async fn get_from_peers(&self, path: &str) -> (Vec<(String, Bytes)>, Vec<MissingShard>) {
        self.ask_peers(reqwest::Method::GET, path, None).await
    }

    /// `POST <peer http_url><path>` with a JSON `body` on every live peer at once, as [`Cluster::get_from_peers`].
    pub async fn post_to_peers(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> (Vec<(String, Bytes)>, Vec<MissingShard>) {
        self.ask_peers(reqwest::Method::POST, path, Some(body))
            .await
    }

    async fn ask_peers(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (Vec<(String, Bytes)>, Vec<MissingShard>) {
        let answers = futures::future::join_all(self.peers().into_iter().map(|(peer, live)| {
            let (method, body) = (method.clone(), body.clone());
            async move {
                if !live {
                    return (peer.id, Err("does not answer".to_string()));
                }
                let url = format!("{}{path}", peer.http_url);
                let answer = async {
                    let mut request = self
                        .inner
                        .client
                        .request(method, &url)
                        .timeout(Duration::from_secs(10));
                    if let Some(body) = body {
                        request = request
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(body);
                    }
                    let response = request.send().await.map_err(|e| error_chain(&e))?;
                    if !response.status().is_success() {
                        return Err(format!("answered {}", response.status()));
                    }
                    response.bytes().await.map_err(|e| error_chain(&e))
                }
                .await;
                (peer.id, answer)
            }
        }))
        .await;
        let mut ok = Vec::new();
        let mut missing = Vec::new();
        for (shard, answer) in answers {
            match answer {
                Ok(body) => ok.push((shard, body)),
                Err(reason) => missing.push(MissingShard { shard, reason }),
            }
        }
        (ok, missing)
    }

    /// Which of `batches` ((agent id, seq) pairs, e.g. the ones in this shard's WAL at start-up) the live peers
    /// have stored. Peers that do not answer are skipped (a warning says that a duplicate is then possible).
    pub async fn stored_elsewhere(&self, batches: &[(String, u64)]) -> HashSet<(String, u64)> {
        let mut found = HashSet::new();
        if batches.is_empty() {
            return found;
        }
        let mut by_agent: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (agent, seq) in batches {
            by_agent.entry(agent).or_default().push(*seq);
        }
        for (peer, _) in self.peers() {
            let url = format!("{}/api/v1/cluster/seen", peer.http_url);
            let answer = async {
                let response = self
                    .inner
                    .client
                    .post(&url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(serde_json::to_vec(&by_agent).unwrap_or_default())
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map_err(|e| error_chain(&e))?;
                if !response.status().is_success() {
                    return Err(format!("answered {}", response.status()));
                }
                let body = response.bytes().await.map_err(|e| error_chain(&e))?;
                serde_json::from_slice::<BTreeMap<String, Vec<u64>>>(&body)
                    .map_err(|e| e.to_string())
            }
            .await;
            match answer {
                Ok(seen) => {
                    for (agent, seqs) in seen {
                        for seq in seqs {
                            found.insert((agent.clone(), seq));
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    shard = %peer.id,
                    error = %e,
                    "cannot ask this shard which of the replayed batches it stored; a batch re-sent to it while \
                     this shard was down may be stored twice"
                ),
            }
        }
        found
    }

    /// `GET /api/v1/shards` body.
    fn shards_json(&self) -> serde_json::Value {
        let state = self.read();
        let list: Vec<&ShardEndpoint> = if state.shards.is_empty() {
            vec![&self.inner.self_endpoint]
        } else {
            state.shards.iter().collect()
        };
        let shards: Vec<serde_json::Value> = list
            .into_iter()
            .map(|s| {
                let health = state.health.get(&s.id);
                let me = s.id == self.inner.self_id;
                serde_json::json!({
                    "id": s.id,
                    "grpc_url": s.grpc_url,
                    "http_url": s.http_url,
                    "self": me,
                    "live": me || health.is_none_or(|h| h.live),
                    "probed": me || health.is_some_and(|h| h.probed),
                    "last_ok_ms_ago": health.and_then(|h| h.last_ok).map(|t| t.elapsed().as_millis() as u64),
                    "last_error": health.and_then(|h| h.last_error.clone()),
                })
            })
            .collect();
        serde_json::json!({
            "self_id": self.inner.self_id,
            "version": state.version,
            "shared_dir": self.inner.shared_dir,
            "shared_store": self.inner.shared_store.as_ref().map(|s| s.url()),
            "shards": shards,
        })
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The shard ids an agent says it cannot reach, from its request metadata.
pub fn unreachable_from(metadata: &tonic::metadata::MetadataMap) -> Vec<String> {
    metadata
        .get(UNREACHABLE_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .take(1024)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `Shards.GetShardMap`.
#[derive(Debug, Clone)]
pub struct ShardsService {
    cluster: Cluster,
}

impl ShardsService {
    pub fn new(cluster: Cluster) -> ShardsService {
        ShardsService { cluster }
    }

    pub fn into_server(self) -> ShardsServer<ShardsService> {
        ShardsServer::new(self)
    }
}

#[tonic::async_trait]
impl Shards for ShardsService {
    async fn get_shard_map(
        &self,
        _request: tonic::Request<ShardMapRequest>,
    ) -> Result<tonic::Response<ShardMap>, tonic::Status> {
        Ok(tonic::Response::new(self.cluster.map()))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The snapshot wire format: a little-endian u32 with the length of a JSON header (shard id, files with paths
// relative to the shard root), the header, then an Arrow IPC stream of the buffered rows (its schema is the table's).

fn relative_to(path: &Path, root: &Path) -> Result<String, String> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| format!("{} is not under {}", path.display(), root.display()))?;
    rel.to_str()
        .map(|s| s.replace('\\', "/"))
        .ok_or_else(|| format!("{} is not valid UTF-8", path.display()))
}

fn encode_snapshot(shard: &str, root: &Path, snapshot: &TableSnapshot) -> Result<Vec<u8>, String> {
    let files = snapshot
        .files
        .iter()
        .map(|f| {
            Ok(WireFile {
                path: relative_to(&f.path, root)?,
                hour: f.hour,
                wal_seq: f.wal_seq,
                rows: f.rows,
                min_time: f.min_time,
                max_time: f.max_time,
                bytes: f.bytes,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let header = serde_json::to_vec(&SnapshotHeader {
        shard: shard.to_string(),
        files,
    })
    .map_err(|e| e.to_string())?;
    let len = u32::try_from(header.len()).map_err(|_| "snapshot header too large".to_string())?;
    let mut out = Vec::with_capacity(4 + header.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&header);
    let schema = snapshot.schema.arrow_schema();
    let mut writer =
        arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema).map_err(|e| e.to_string())?;
    for batch in &snapshot.batches {
        let batch = crate::persist::conform(batch, &schema).map_err(|e| e.to_string())?;
        writer.write(&batch).map_err(|e| e.to_string())?;
    }
    writer.finish().map_err(|e| e.to_string())?;
    drop(writer);
    Ok(out)
}

fn decode_snapshot(body: &[u8], root: &Path, table: &str) -> Result<PeerTable, String> {
    let bad = |m: &str| format!("malformed snapshot: {m}");
    let len_bytes: [u8; 4] = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("shorter than 4 bytes"))?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let header_bytes = body
        .get(4..4 + len)
        .ok_or_else(|| bad("header length beyond the body"))?;
    let header: SnapshotHeader =
        serde_json::from_slice(header_bytes).map_err(|e| bad(&e.to_string()))?;
    let reader = arrow::ipc::reader::StreamReader::try_new(&body[4 + len..], None)
        .map_err(|e| bad(&e.to_string()))?;
    let schema = TableSchema::from_arrow(&reader.schema()).map_err(|e| bad(&e))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e.to_string()))?;
    let files = header
        .files
        .into_iter()
        .map(|f| {
            // Paths come from another process: keep them inside the shard's directory.
            if f.path.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(bad(&format!(
                    "file path {:?} leaves the shard root",
                    f.path
                )));
            }
            Ok(Arc::new(ParquetFile {
                path: root.join(&f.path),
                table: table.to_string(),
                hour: f.hour,
                wal_seq: f.wal_seq,
                rows: f.rows,
                min_time: f.min_time,
                max_time: f.max_time,
                bytes: f.bytes,
            }))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(PeerTable {
        schema,
        files,
        batches,
    })
}

/// This shard's snapshot of one table of `schema` (`public`, `rollup_1m`, `rollup_1h`).
pub fn local_snapshot(store: &Store, schema: &str, table: &str) -> Option<TableSnapshot> {
    match schema {
        "public" => store.snapshot(table),
        other => Resolution::ALL
            .into_iter()
            .find(|r| r.schema_name() == other)
            .and_then(|r| crate::rollup::snapshot(store, r, table)),
    }
}

fn local_tables(store: &Store) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    out.insert("public".to_string(), store.table_names());
    for r in Resolution::ALL {
        out.insert(
            r.schema_name().to_string(),
            crate::rollup::table_names(store, r),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP

/// `GET /api/v1/shards`, `POST /api/v1/shards/assign`, `POST /api/v1/shards/reload`, and the shard-to-shard
/// endpoints under `/api/v1/cluster/`.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/shards", get(get_shards))
        .route("/api/v1/shards/assign", post(assign))
        .route("/api/v1/shards/reload", post(reload))
        .route("/api/v1/cluster/tables", get(tables))
        .route("/api/v1/cluster/snapshot", get(snapshot))
        .route("/api/v1/cluster/seen", post(seen))
}

async fn get_shards(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.cluster.shards_json()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignRequest {
    agent_ids: Vec<String>,
}

/// Most agent ids in one assign request.
const MAX_ASSIGN_IDS: usize = 100_000;

async fn assign(
    State(api): State<Arc<ApiState>>,
    body: Result<axum::Json<AssignRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(request) = body.map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "the body must be {{\"agent_ids\": [\"...\", ...]}}: {}",
            e.body_text()
        ),
    })?;
    if request.agent_ids.len() > MAX_ASSIGN_IDS {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("at most {MAX_ASSIGN_IDS} agent ids per request"),
        });
    }
    let owners = api.cluster.assign(&request.agent_ids);
    Ok(axum::Json(serde_json::json!({ "owners": owners })).into_response())
}

async fn reload(State(api): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let changed = api.cluster.reload().map_err(|message| ApiError {
        status: StatusCode::BAD_REQUEST,
        message,
    })?;
    let mut body = api.cluster.shards_json();
    body["changed"] = changed.into();
    Ok(axum::Json(body).into_response())
}

async fn tables(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(local_tables(&api.store)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotParams {
    schema: String,
    table: String,
}

async fn snapshot(
    State(api): State<Arc<ApiState>>,
    params: Result<Query<SnapshotParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("bad query string: {}", e.body_text()),
    })?;
    let Some(snapshot) = local_snapshot(&api.store, &params.schema, &params.table) else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "no table {:?} in schema {:?} on this shard",
                params.table, params.schema
            ),
        });
    };
    // A peer reads these files from the bucket: they must be there before it plans the read.
    if let Some(store) = api.cluster.shared_store() {
        let paths: Vec<PathBuf> = snapshot.files.iter().map(|f| f.path.clone()).collect();
        store.ensure_uploaded(&paths).await.map_err(|e| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: e.to_string(),
        })?;
    }
    let root = api.store.config().shard_root();
    let shard = api.store.config().shard_id.clone();
    let bytes = tokio::task::spawn_blocking(move || encode_snapshot(&shard, &root, &snapshot))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|message| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        })?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from(bytes),
    )
        .into_response())
}

async fn seen(State(api): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let asked: BTreeMap<String, Vec<u64>> =
        serde_json::from_slice(&body).map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("the body must be {{\"agent id\": [seq, ...]}}: {e}"),
        })?;
    let seen: BTreeMap<String, Vec<u64>> = api.store.with_state(|s| {
        asked
            .into_iter()
            .map(|(agent, seqs)| {
                let hits: Vec<u64> = seqs
                    .into_iter()
                    .filter(|seq| s.dedup.contains(&agent, *seq))
                    .collect();
                (agent, hits)
            })
            .filter(|(_, hits)| !hits.is_empty())
            .collect()
    });
    Ok(axum::Json(seen).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, port: u16) -> ShardEndpoint {
        ShardEndpoint {
            id: id.into(),
            grpc_url: format!("http://127.0.0.1:{port}"),
            http_url: format!("http://127.0.0.1:{}", port + 1),
        }
    }

    #[test]
    fn shard_lists_are_checked() {
        let ok = vec![shard("s0", 1000), shard("s1", 2000)];
        assert!(validate_shards("s0", &ok, false).is_ok());
        assert!(validate_shards("s0", &[], false).is_ok());
        let err = validate_shards("s9", &ok, false).expect_err("self missing");
        assert!(err.contains("\"s9\" is not in the list (s0, s1)"), "{err}");
        let twice = vec![shard("s0", 1000), shard("s0", 2000)];
        assert!(
            validate_shards("s0", &twice, false)
                .expect_err("dup")
                .contains("listed twice")
        );
        let mut bad = shard("s0", 1000);
        bad.grpc_url = "10.0.0.1:4317".into();
        assert!(
            validate_shards("s0", &[bad], false)
                .expect_err("url")
                .contains("grpc_url")
        );
        assert!(validate_shards("s/0", &[shard("s/0", 1)], false).is_err());
    }

    #[test]
    fn shard_urls_follow_tls() {
        let plain = vec![shard("s0", 1000), shard("s1", 2000)];
        let err = validate_shards("s0", &plain, true).expect_err("http with tls");
        assert!(
            err.contains("must be a URL like https://") && err.contains("[tls]"),
            "{err}"
        );
        let secure: Vec<ShardEndpoint> = plain
            .iter()
            .map(|s| ShardEndpoint {
                id: s.id.clone(),
                grpc_url: s.grpc_url.replace("http://", "https://"),
                http_url: s.http_url.replace("http://", "https://"),
            })
            .collect();
        assert!(validate_shards("s0", &secure, true).is_ok());
        let err = validate_shards("s0", &secure, false).expect_err("https without tls");
        assert!(err.contains("without [tls]"), "{err}");
        let mut half = secure[1].clone();
        half.http_url = "https://".into();
        assert!(validate_shards("s1", &[half], true).is_err());
    }

    #[test]
    fn snapshots_round_trip_and_paths_stay_inside() {
        let root = Path::new("/shared/shard=s1");
        let header = SnapshotHeader {
            shard: "s1".into(),
            files: vec![WireFile {
                path: "data/cpu/date=2026-01-01/hour=00/s1-1.parquet".into(),
                hour: 1,
                wal_seq: 1,
                rows: 1,
                min_time: 0,
                max_time: 1,
                bytes: 10,
            }],
        };
        let encode = |h: &SnapshotHeader| {
            let json = serde_json::to_vec(h).expect("json");
            let mut out = (json.len() as u32).to_le_bytes().to_vec();
            out.extend_from_slice(&json);
            let schema = TableSchema::default().arrow_schema();
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema).expect("ipc");
            w.finish().expect("finish");
            drop(w);
            out
        };
        let t = decode_snapshot(&encode(&header), root, "cpu").expect("decode");
        assert_eq!(
            t.files[0].path,
            root.join("data/cpu/date=2026-01-01/hour=00/s1-1.parquet")
        );
        let mut evil = header;
        evil.files[0].path = "data/../../etc/passwd".into();
        let err = decode_snapshot(&encode(&evil), root, "cpu").expect_err("escape");
        assert!(err.contains("leaves the shard root"), "{err}");
        assert!(decode_snapshot(&[1, 0], root, "cpu").is_err());
        assert!(decode_snapshot(&[255, 255, 255, 255, 1], root, "cpu").is_err());
    }

    #[test]
    fn unreachable_metadata_is_parsed() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert!(unreachable_from(&m).is_empty());
        m.insert(UNREACHABLE_METADATA, "s1, s2,,".parse().expect("ascii"));
        assert_eq!(unreachable_from(&m), vec!["s1", "s2"]);
    }
}
