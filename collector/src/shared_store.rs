//! The shared store in an S3-compatible bucket: every shard mirrors its Parquet files to one bucket, so the
//! other shards (and other engines) can read them.
//!
//! * **Working copy.** A shard keeps writing, compacting and expiring its files locally under `data_dir`
//!   (`data/` and `rollups/`); the bucket holds a mirror of them under
//!   `<prefix>/shard=<shard_id>/<path relative to data_dir>`, e.g.
//!   `metrics/shard=s1/data/cpu/date=2026-01-01/hour=00/s1-00000000000000000042.parquet`. Only this shard writes
//!   below its `shard=<id>/`, so shards never collide.
//! * **Mirror.** [`SharedStore::run`] uploads every new local file every `mirror_interval_ms`. A shard that
//!   answers a peer's snapshot first uploads the files it lists ([`SharedStore::ensure_uploaded`]), so a peer
//!   never plans a read of an object that is not there yet.
//! * **Deletion grace.** An object whose local file is gone (replaced by compaction, expired by retention) is
//!   deleted only `delete_grace_secs` after the mirror first saw it gone: a query planned before (on any shard)
//!   may still read it. A shard whose local store is empty at start while the bucket holds its files never
//!   deletes those (the local disk may have been lost; the bucket is then the only copy).
//! * **Reading.** Queries read peers' objects through DataFusion's object-store registry
//!   ([`SharedStore::register_with`]): a peer's files are named `s3://<bucket>/<prefix>/shard=<id>/...`. For a
//!   shard that does not answer, [`SharedStore::list_shard_table`] lists its objects and reads their footers.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::object_store::aws::AmazonS3Builder;
use datafusion::object_store::buffered::BufWriter;
use datafusion::object_store::path::Path as ObjectPath;
use datafusion::object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use futures::{StreamExt, TryStreamExt};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaDataReader;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::cluster::PeerTable;
use crate::compaction::META_COMPACTED_FROM;
use crate::error::{CollectorError, Result, error_chain};

/// Uploads (and footer reads) running at once.
const CONCURRENCY: usize = 4;
/// Bytes read from a file's end at first to find its footer (ours are a few KiB; a larger one takes a second read).
const FOOTER_GUESS: u64 = 64 << 10;
/// The local directories mirrored, relative to the shard root.
const MIRRORED_DIRS: [&str; 2] = ["data", "rollups"];

/// `[shared_store]`: the S3-compatible bucket the shards mirror their Parquet files to.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedStoreConfig {
    /// `s3://<bucket>` or `s3://<bucket>/<prefix>`. Required.
    pub url: String,
    /// The S3 endpoint, e.g. `http://127.0.0.1:9000` for MinIO or another S3-compatible server. Default: AWS
    /// (`https://s3.<region>.amazonaws.com`).
    pub endpoint: Option<String>,
    /// Default `us-east-1`.
    pub region: String,
    /// Default: env `AWS_ACCESS_KEY_ID` (with `AWS_SECRET_ACCESS_KEY` and, if set, `AWS_SESSION_TOKEN`); without
    /// either, the usual AWS chain (web identity, instance metadata).
    pub access_key_id: Option<String>,
    /// Set together with `access_key_id`. Never printed or serialized.
    #[serde(skip_serializing)]
    pub secret_access_key: Option<String>,
    /// Allow a plain `http://` endpoint. Default false.
    pub allow_http: bool,
    /// An object whose local file is gone is deleted this many seconds later (queries planned before still read
    /// it). Default 600; at least `query_timeout_secs`, at most 604,800.
    pub delete_grace_secs: u64,
    /// How often new local files are uploaded and gone ones checked (milliseconds). Default 1000, 100 to
    /// 600,000.
    pub mirror_interval_ms: u64,
}

impl Default for SharedStoreConfig {
    fn default() -> Self {
        SharedStoreConfig {
            url: String::new(),
            endpoint: None,
            region: "us-east-1".to_string(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            delete_grace_secs: 600,
            mirror_interval_ms: 1_000,
        }
    }
}

impl std::fmt::Debug for SharedStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStoreConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .field("delete_grace_secs", &self.delete_grace_secs)
            .field("mirror_interval_ms", &self.mirror_interval_ms)
            .finish()
    }
}

impl SharedStoreConfig {
    /// Checks every key; messages name the key (the caller prefixes `shared_store:`).
    pub fn validate(&self, query_timeout_secs: u64) -> std::result::Result<(), String> {
        self.bucket_and_prefix()?;
        if let Some(endpoint) = &self.endpoint {
            let rest = endpoint
                .strip_prefix("https://")
                .or_else(|| endpoint.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                return Err(format!(
                    "endpoint {endpoint:?} must be a URL like https://s3.example.com or http://127.0.0.1:9000"
                ));
            }
            if endpoint.starts_with("http://") && !self.allow_http {
                return Err(format!(
                    "endpoint {endpoint:?} is plain http: set allow_http = true to use it"
                ));
            }
        }
        if self.region.trim().is_empty() {
            return Err("region must not be empty (default us-east-1)".into());
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err("set access_key_id and secret_access_key together (or neither, to use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)".into());
        }
        if self.delete_grace_secs < query_timeout_secs || self.delete_grace_secs > 604_800 {
            return Err(format!(
                "delete_grace_secs ({}) must be between query_timeout_secs ({query_timeout_secs}) and 604800: a \
                 query planned before an object is deleted may read it until it times out",
                self.delete_grace_secs
            ));
        }
        if !(100..=600_000).contains(&self.mirror_interval_ms) {
            return Err(format!(
                "mirror_interval_ms ({}) must be between 100 and 600000",
                self.mirror_interval_ms
            ));
        }
        Ok(())
    }

    /// The bucket and the key prefix (no slashes at either end; empty when there is none) of `url`.
    pub fn bucket_and_prefix(&self) -> std::result::Result<(String, String), String> {
        let bad = |why: &str| {
            format!(
                "url {:?} {why}; expected s3://<bucket> or s3://<bucket>/<prefix>",
                self.url
            )
        };
        let rest = self
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket naming rules (the strict, DNS-compatible ones).
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !bucket_ok {
            return Err(bad(
                "has an invalid bucket name (3-63 characters of [a-z0-9.-], starting and ending with a letter or digit)",
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            for segment in prefix.split('/') {
                let ok = !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '+')
                    });
                if !ok {
                    return Err(bad(&format!(
                        "has an invalid prefix segment {segment:?} (use [A-Za-z0-9._=+-], no empty, . or .. segments)"
                    )));
                }
            }
        }
        Ok((bucket.to_string(), prefix.to_string()))
    }
}

/// The mirror of this shard's files in the bucket, and the reader of other shards' objects. Cheap to clone.
#[derive(Clone)]
pub struct SharedStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    /// `s3://<bucket>`, as DataFusion's registry knows the store.
    store_url: ObjectStoreUrl,
    bucket: String,
    prefix: String,
    shard_id: String,
    /// This shard's local root (`data_dir`): `data/` and `rollups/` below it are mirrored.
    local_root: PathBuf,
    grace: Duration,
    interval: Duration,
    state: Mutex<MirrorState>,
    /// Held while the bucket is listed, so concurrent first calls list it once.
    listing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct MirrorState {
    /// Whether `remote` holds the bucket's listing of this shard (else every file is uploaded once more).
    listed: bool,
    /// This shard's objects, by path relative to the shard root, with their sizes.
    remote: HashMap<String, u64>,
    /// Objects whose local file was found gone, and when.
    gone_since: HashMap<String, Instant>,
    /// Objects found at start while the local store was empty: never deleted by the mirror.
    protected: HashSet<String>,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("bucket", &self.inner.bucket)
            .field("prefix", &self.inner.prefix)
            .field("shard_id", &self.inner.shard_id)
            .finish()
    }
}

fn store_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> CollectorError {
    CollectorError::Server(format!("shared store: {what}: {e}"))
}

impl SharedStore {
    /// The store of `config` (validated) for shard `shard_id`, whose local files live under `local_root`. Makes no
    /// request yet.
    pub fn new(
        config: &SharedStoreConfig,
        shard_id: &str,
        local_root: &Path,
    ) -> Result<SharedStore> {
        let (bucket, prefix) = config.bucket_and_prefix().map_err(CollectorError::Config)?;
        // Client options first: they replace the whole set, `allow_http` included.
        let mut builder = AmazonS3Builder::new()
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60)),
            )
            .with_bucket_name(&bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http)
            // A bucket that does not answer must not hold a query for minutes.
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
            });
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
            }
            _ => {
                if let (Some(id), Some(secret)) =
                    (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
                {
                    builder = builder
                        .with_access_key_id(id)
                        .with_secret_access_key(secret);
                    if let Some(token) = env("AWS_SESSION_TOKEN") {
                        builder = builder.with_token(token);
                    }
                }
            }
        }
        let store = builder
            .build()
            .map_err(|e| CollectorError::Config(format!("shared_store: {e}")))?;
        let store_url = ObjectStoreUrl::parse(format!("s3://{bucket}"))
            .map_err(|e| CollectorError::Config(format!("shared_store: url: {e}")))?;
        Ok(SharedStore {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                store_url,
                bucket,
                prefix,
                shard_id: shard_id.to_string(),
                local_root: local_root.to_path_buf(),
                grace: Duration::from_secs(config.delete_grace_secs),
                interval: Duration::from_millis(config.mirror_interval_ms),
                state: Mutex::new(MirrorState::default()),
                listing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MirrorState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `s3://<bucket>/<prefix>` (for the shard list and the logs).
    pub fn url(&self) -> String {
        match self.inner.prefix.as_str() {
            "" => format!("s3://{}", self.inner.bucket),
            prefix => format!("s3://{}/{prefix}", self.inner.bucket),
        }
    }

    /// The key prefix of a shard, ending in `shard=<id>` (no slash).
    fn shard_key(&self, shard: &str) -> String {
        match self.inner.prefix.as_str() {
            "" => format!("shard={shard}"),
            prefix => format!("{prefix}/shard={shard}"),
        }
    }

    /// Where a peer's files are, as the query engine reads them: `s3://<bucket>/<prefix>/shard=<id>`. A file
    /// path relative to the peer's root is joined to it.
    pub fn peer_root(&self, shard: &str) -> PathBuf {
        PathBuf::from(format!(
            "s3://{}/{}",
            self.inner.bucket,
            self.shard_key(shard)
        ))
    }

    /// Lets DataFusion read `s3://<bucket>/...` paths through this store.
    pub fn register_with(&self, runtime: &RuntimeEnv) {
        runtime.register_object_store(self.inner.store_url.as_ref(), self.inner.store.clone());
    }

    /// The object key of a local file of this shard.
    fn key_of(&self, relative: &str) -> std::result::Result<ObjectPath, CollectorError> {
        let key = format!("{}/{relative}", self.shard_key(&self.inner.shard_id));
        ObjectPath::parse(&key).map_err(|e| store_error(format!("key {key}"), e))
    }

    /// `path` relative to this shard's root, with `/` separators.
    fn relative(&self, path: &Path) -> Result<String> {
        let rel = path.strip_prefix(&self.inner.local_root).map_err(|_| {
            store_error(
                path.display(),
                format!("not under {}", self.inner.local_root.display()),
            )
        })?;
        let parts = rel
            .components()
            .map(|c| match c {
                std::path::Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| store_error(path.display(), "not a plain UTF-8 relative path"))?;
        Ok(parts.join("/"))
    }

    /// Lists this shard's objects once (the first time anything needs to know what the bucket holds).
    async fn ensure_listed(&self) -> Result<()> {
        if self.state().listed {
            return Ok(());
        }
        let _listing = self.inner.listing.lock().await;
        if self.state().listed {
            return Ok(());
        }
        let base = self.shard_key(&self.inner.shard_id);
        let prefix = ObjectPath::from(base.as_str());
        let objects: Vec<ObjectMeta> = self
            .inner
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| store_error(format!("listing {}", self.url()), error_chain(&e)))?;
        let local_root = self.inner.local_root.clone();
        let local_empty = tokio::task::spawn_blocking(move || local_files(&local_root))
            .await
            .map_err(|e| store_error("walking the local store", e))??
            .is_empty();
        let mut state = self.state();
        for object in objects {
            let key = object.location.as_ref();
            if let Some(rel) = key.strip_prefix(&base).and_then(|r| r.strip_prefix('/')) {
                state.remote.insert(rel.to_string(), object.size);
            }
        }
        if local_empty && !state.remote.is_empty() {
            tracing::warn!(
                objects = state.remote.len(),
                bucket = %self.url(),
                "the local store is empty but the bucket holds this shard's files: the mirror will not delete them \
                 (restore them into data_dir, or delete them by hand)"
            );
            state.protected = state.remote.keys().cloned().collect();
        }
        state.listed = true;
        Ok(())
    }

    /// Uploads those of `paths` (files under this shard's root) that are not in the bucket yet.
    pub async fn ensure_uploaded(&self, paths: &[PathBuf]) -> Result<()> {
        self.ensure_listed().await?;
        let named = paths
            .iter()
            .map(|p| Ok((self.relative(p)?, p.clone())))
            .collect::<Result<Vec<_>>>()?;
        // An object of another size under the same name is stale (a shard restarted on an empty data directory
        // names its files anew): upload over it.
        let sized = tokio::task::spawn_blocking(move || {
            named
                .into_iter()
                .map(|(rel, path)| {
                    let size = std::fs::metadata(&path).map(|m| m.len()).ok();
                    (rel, path, size)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| store_error("reading file sizes", e))?;
        let wanted: Vec<(String, PathBuf)> = {
            let state = self.state();
            sized
                .into_iter()
                .filter(|(rel, _, size)| match size {
                    // Gone locally: fine if uploaded before (a query may still read it); else the upload says why.
                    None => !state.remote.contains_key(rel),
                    Some(size) => state.remote.get(rel) != Some(size),
                })
                .map(|(rel, path, _)| (rel, path))
                .collect()
        };
        futures::stream::iter(wanted)
            .map(|(rel, path)| async move { self.upload(&rel, &path).await })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn upload(&self, relative: &str, path: &Path) -> Result<()> {
        let key = self.key_of(relative)?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| CollectorError::io(path, e))?;
        // Streams the file: one PUT when small, a multipart upload when large.
        let mut writer = BufWriter::new(self.inner.store.clone(), key.clone());
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        let size = match copied {
            Ok(size) => size,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(store_error(
                    format!("uploading {} to {key}", path.display()),
                    e,
                ));
            }
        };
        writer.shutdown().await.map_err(|e| {
            store_error(
                format!("uploading {} to {key}", path.display()),
                error_chain(&e),
            )
        })?;
        tracing::debug!(file = %path.display(), key = %key, bytes = size, "uploaded to the shared store");
        let mut state = self.state();
        state.remote.insert(relative.to_string(), size);
        state.gone_since.remove(relative);
        // Now this incarnation's file: mirrored (and deleted) like any other.
        state.protected.remove(relative);
        Ok(())
    }

    /// One mirror pass: uploads new local files; deletes objects whose local file has been gone for the grace
    /// period (when `delete` is set).
    pub async fn sync(&self, delete: bool) -> Result<()> {
        self.ensure_listed().await?;
        let local_root = self.inner.local_root.clone();
        let local = tokio::task::spawn_blocking(move || local_files(&local_root))
            .await
            .map_err(|e| store_error("walking the local store", e))??;
        let paths: Vec<PathBuf> = local
            .iter()
            .map(|rel| self.inner.local_root.join(rel))
            .collect();
        // A file removed between the walk and its upload (compaction, retention) is not an error.
        let uploads = self.ensure_uploaded_existing(&paths).await;
        if !delete {
            return uploads;
        }
        let local: HashSet<String> = local.into_iter().collect();
        let now = Instant::now();
        let due: Vec<String> = {
            let mut state = self.state();
            let MirrorState {
                remote,
                gone_since,
                protected,
                ..
            } = &mut *state;
            gone_since.retain(|rel, _| remote.contains_key(rel) && !local.contains(rel));
            for rel in remote.keys() {
                if !local.contains(rel) && !protected.contains(rel) {
                    gone_since.entry(rel.clone()).or_insert(now);
                }
            }
            gone_since
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= self.inner.grace)
                .map(|(rel, _)| rel.clone())
                .collect()
        };
        for rel in due {
            let key = self.key_of(&rel)?;
            match self.inner.store.delete(&key).await {
                Ok(()) | Err(datafusion::object_store::Error::NotFound { .. }) => {
                    tracing::debug!(key = %key, "deleted from the shared store (local file gone)");
                    let mut state = self.state();
                    state.remote.remove(&rel);
                    state.gone_since.remove(&rel);
                }
                Err(e) => return Err(store_error(format!("deleting {key}"), error_chain(&e))),
            }
        }
        uploads
    }

    async fn ensure_uploaded_existing(&self, paths: &[PathBuf]) -> Result<()> {
        match self.ensure_uploaded(paths).await {
            Err(CollectorError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                // Retried on the next pass with a fresh walk.
                Ok(())
            }
            other => other,
        }
    }

    /// Mirrors until `stop` completes (see the module doc). The caller runs [`SharedStore::sync`] once more after
    /// the final flush.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(self.inner.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.sync(true).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(bucket = %self.url(), "shared store mirror works again");
                }
                Ok(()) => {}
                Err(e) => {
                    // Once per outage: the mirror retries every interval.
                    if !failing {
                        tracing::warn!(error = %e, "shared store mirror failed; retrying");
                    }
                    failing = true;
                }
            }
        }
    }

    /// The raw table `table` of another shard, from its objects in the bucket (for a shard that does not
    /// answer): files with their footers read, minus inputs of a compaction whose output is there too.
    pub async fn list_shard_table(
        &self,
        shard: &str,
        table: &str,
    ) -> std::result::Result<Option<PeerTable>, String> {
        let prefix = ObjectPath::from(format!("{}/data/{table}", self.shard_key(shard)).as_str());
        let objects: Vec<ObjectMeta> = self
            .inner
            .store
            .list(Some(&prefix))
            .try_filter(|o| futures::future::ready(o.location.as_ref().ends_with(".parquet")))
            .try_collect()
            .await
            .map_err(|e| format!("listing {}/{prefix}: {}", self.url(), error_chain(&e)))?;
        if objects.is_empty() {
            return Ok(None);
        }
        let footers = futures::stream::iter(objects)
            .map(|object| async move { self.read_footer(object, table).await })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        // A compaction's inputs stay in the bucket for the grace period beside its output: count them once.
        let replaced: HashSet<String> = footers
            .iter()
            .flat_map(|(file, _, from)| {
                let dir = file
                    .path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                from.iter()
                    .map(move |name| dir.join(name).to_string_lossy().into_owned())
            })
            .collect();
        let files = footers
            .into_iter()
            .filter(|(file, _, _)| !replaced.contains(file.path.to_string_lossy().as_ref()))
            .map(|(file, schema, _)| (file, schema))
            .collect();
        PeerTable::from_files(table, files)
    }

    async fn read_footer(
        &self,
        object: ObjectMeta,
        table: &str,
    ) -> std::result::Result<
        (
            crate::persist::ParquetFile,
            crate::catalog::TableSchema,
            Vec<String>,
        ),
        String,
    > {
        let url = format!("s3://{}/{}", self.inner.bucket, object.location);
        let size = object.size;
        let fetch = |len: u64| {
            let location = object.location.clone();
            let url = &url;
            async move {
                self.inner
                    .store
                    .get_range(&location, size - len.min(size)..size)
                    .await
                    .map_err(|e| format!("{url}: {}", error_chain(&e)))
            }
        };
        // The footer from the file's tail: one ranged GET, a second when the footer is larger than the guess.
        let mut reader = ParquetMetaDataReader::new();
        let tail = fetch(FOOTER_GUESS).await?;
        match reader.try_parse_sized(&tail, size) {
            Ok(()) => {}
            Err(ParquetError::NeedMoreData(needed)) => {
                let tail = fetch(needed as u64).await?;
                reader
                    .try_parse_sized(&tail, size)
                    .map_err(|e| format!("{url}: {e}"))?;
            }
            Err(e) => return Err(format!("{url}: {e}")),
        }
        let metadata = reader.finish().map_err(|e| format!("{url}: {e}"))?;
        let arrow = ArrowReaderMetadata::try_new(Arc::new(metadata), ArrowReaderOptions::new())
            .map_err(|e| format!("{url}: {e}"))?;
        let (file, schema) = crate::persist::file_meta_from_footer(
            Path::new(&url),
            table,
            size,
            arrow.metadata(),
            arrow.schema(),
        )
        .map_err(|e| e.to_string())?;
        let replaces = arrow
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|kv| kv.key == META_COMPACTED_FROM))
            .and_then(|kv| kv.value.as_deref())
            .map(serde_json::from_str::<Vec<String>>)
            .transpose()
            .map_err(|e| format!("{url}: bad {META_COMPACTED_FROM} metadata: {e}"))?
            .unwrap_or_default();
        Ok((file, schema, replaces))
    }
}

/// The Parquet files under `root`'s mirrored directories, relative to `root` with `/` separators (temporary
/// files of writes in progress are left out).
fn local_files(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for dir in MIRRORED_DIRS {
        let mut stack = vec![(root.join(dir), dir.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CollectorError::io(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| CollectorError::io(&dir, e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let kind = entry.file_type().map_err(|e| CollectorError::io(&dir, e))?;
                if kind.is_dir() {
                    stack.push((entry.path(), format!("{rel}/{name}")));
                } else if name.ends_with(".parquet") {
                    out.push(format!("{rel}/{name}"));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> SharedStoreConfig {
        SharedStoreConfig {
            url: url.into(),
            ..SharedStoreConfig::default()
        }
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            config("s3://bucket").bucket_and_prefix(),
            Ok(("bucket".into(), String::new()))
        );
        assert_eq!(
            config("s3://my.bucket-1/a/b/").bucket_and_prefix(),
            Ok(("my.bucket-1".into(), "a/b".into()))
        );
        for (url, why) in [
            ("http://bucket", "must start with s3://"),
            ("s3://", "invalid bucket name"),
            ("s3://Bucket", "invalid bucket name"),
            ("s3://bucket/a//b", "invalid prefix segment \"\""),
            ("s3://bucket/../b", "invalid prefix segment \"..\""),
            ("s3://bucket/a b", "invalid prefix segment"),
        ] {
            let err = config(url).bucket_and_prefix().expect_err(url);
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn keys_are_checked() {
        let ok = config("s3://bucket/p");
        assert!(ok.validate(60).is_ok());
        let plain = SharedStoreConfig {
            endpoint: Some("http://127.0.0.1:9000".into()),
            ..ok.clone()
        };
        let err = plain.validate(60).expect_err("http");
        assert!(err.contains("allow_http"), "{err}");
        let half = SharedStoreConfig {
            access_key_id: Some("id".into()),
            ..ok.clone()
        };
        assert!(half.validate(60).expect_err("half").contains("together"));
        let short = SharedStoreConfig {
            delete_grace_secs: 5,
            ..ok.clone()
        };
        let err = short.validate(60).expect_err("grace");
        assert!(err.contains("delete_grace_secs (5)"), "{err}");
        let unknown = toml::from_str::<SharedStoreConfig>("url = \"s3://b1\"\nbukcet = 1");
        assert!(unknown.expect_err("typo").to_string().contains("bukcet"));
    }

    #[test]
    fn the_collector_config_takes_one_shared_store() {
        let base: crate::CollectorConfig = toml::from_str(
            "[shared_store]\nurl = \"s3://bucket/p\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n",
        )
        .expect("toml");
        assert!(base.validate().is_ok());
        let store = base.shared_store.as_ref().expect("section");
        assert_eq!(store.region, "us-east-1");
        assert_eq!(store.delete_grace_secs, 600);
        let both = crate::CollectorConfig {
            shared_dir: Some(PathBuf::from("/shared")),
            ..base.clone()
        };
        let err = both.validate().expect_err("both").to_string();
        assert!(err.contains("either shared_dir or shared_store"), "{err}");
        let bad = crate::CollectorConfig {
            shared_store: Some(config("s3://x")),
            ..base
        };
        let err = bad.validate().expect_err("bucket").to_string();
        assert!(err.contains("shared_store: url \"s3://x\""), "{err}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = SharedStoreConfig {
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("wJalrXUtnFEMI".into()),
            ..config("s3://bucket")
        };
        let debug = format!("{c:?}");
        assert!(!debug.contains("wJalrXUtnFEMI"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let json = serde_json::to_string(&c).expect("json");
        assert!(!json.contains("wJalrXUtnFEMI"), "{json}");
    }

    #[test]
    fn keys_and_roots_carry_the_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            SharedStore::new(&config("s3://bucket/metrics"), "s1", dir.path()).expect("store");
        assert_eq!(
            store.peer_root("s2"),
            PathBuf::from("s3://bucket/metrics/shard=s2")
        );
        let rel = store
            .relative(
                &dir.path()
                    .join("data/cpu/date=2026-01-01/hour=00/s1-1.parquet"),
            )
            .expect("relative");
        assert_eq!(rel, "data/cpu/date=2026-01-01/hour=00/s1-1.parquet");
        assert_eq!(
            store.key_of(&rel).expect("key").as_ref(),
            "metrics/shard=s1/data/cpu/date=2026-01-01/hour=00/s1-1.parquet"
        );
        assert!(store.relative(Path::new("/elsewhere/x.parquet")).is_err());
        let bare = SharedStore::new(&config("s3://bucket"), "s1", dir.path()).expect("store");
        assert_eq!(bare.peer_root("s2"), PathBuf::from("s3://bucket/shard=s2"));
        std::fs::create_dir_all(dir.path().join("data/cpu/date=2026-01-01/hour=00"))
            .expect("mkdir");
        std::fs::write(
            dir.path()
                .join("data/cpu/date=2026-01-01/hour=00/a.parquet"),
            b"x",
        )
        .expect("w");
        std::fs::write(
            dir.path()
                .join("data/cpu/date=2026-01-01/hour=00/b.parquet.tmp"),
            b"x",
        )
        .expect("w");
        assert_eq!(
            local_files(dir.path()).expect("walk"),
            vec!["data/cpu/date=2026-01-01/hour=00/a.parquet"]
        );
    }
}
