//! Scraping Prometheus exporters: the collector fetches every `scrape_targets` URL (e.g. node_exporter's
//! `http://host:9100/metrics`) every `pull_interval_secs` and stores the samples as remote write would
//! ([`super::prometheus`]: table = metric name, tags = labels, field `value`).
//!
//! As Prometheus does: every sample gets the labels `job` (= [`SCRAPE_JOB`]) and `instance` (the target's
//! `host:port`); a scraped label of either name is kept as `exported_job` / `exported_instance` (Prometheus'
//! `honor_labels: false`). A sample without a timestamp gets the time the scrape started. Each scrape also stores
//! `up` (1 when the page was fetched and parsed, else 0), `scrape_duration_seconds` and `scrape_samples_scraped`
//! for the target.
//!
//! Scheduling follows the pull scheduler ([`crate::pull`]): each target's first scrape is delayed by a random
//! fraction of the interval (a thousand targets do not fire at once) and keeps that phase; at most
//! [`ScrapeSettings::max_concurrent`] scrapes run at a time; one scrape (connecting, the whole body) is bounded by
//! `pull_timeout_secs`, its body by `max_write_bytes` (as sent and after gzip). Lines the parser refuses
//! ([`super::prom_text`]) are counted, not fatal. [`ScrapeHandle::targets`] reports each target's health
//! (`GET /api/v1/scrape/targets`).

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::prom_text::{self, describe};
use super::prometheus::{
    MappedSeries, RowsBuilder, SchemaGuard, WriteFailure, map_series, time_ns, write_batches,
};
use crate::config::CollectorConfig;
use crate::store::Store;

/// The `job` label of scraped samples.
pub const SCRAPE_JOB: &str = "scrape";
/// What we ask exporters for: the text format (OpenMetrics is not parsed).
pub const ACCEPT: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";
/// Parse errors kept per target (of its last scrape).
const MAX_REPORTED_ERRORS: usize = 5;
/// Pages larger than this are parsed on the blocking pool.
const PARSE_INLINE_BYTES: usize = 256 << 10;
/// A target failing this many times in a row is logged again (the first failure always is).
const LOG_EVERY_FAILURES: u64 = 60;

/// Checks a scrape target URL: `http[s]://host[:port][/path][?query]`. Returns why it is not one.
pub fn validate_scrape_url(url: &str) -> Result<(), String> {
    parse_target_url(url).map(|_| ())
}

/// The URL and its `instance` (`host:port`, the scheme's default port when none is given).
fn parse_target_url(url: &str) -> Result<(reqwest::Url, String), String> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("{url:?} is not a URL ({e}); expected http://host:port/metrics"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?} does not start with http:// or https://"));
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Err(format!("{url:?} has no host"));
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "{url:?} has user credentials, which are not supported"
        ));
    }
    if parsed.fragment().is_some() {
        return Err(format!("{url:?} has a #fragment"));
    }
    let port = parsed
        .port_or_known_default()
        .unwrap_or(if parsed.scheme() == "https" { 443 } else { 80 });
    let instance = format!("{host}:{port}");
    Ok((parsed, instance))
}

/// The health of one target, as `GET /api/v1/scrape/targets` shows it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScrapeTargetHealth {
    pub url: String,
    /// The `job` and `instance` labels its samples get.
    pub job: String,
    pub instance: String,
    /// `unknown` (not scraped yet), `up` (the last scrape fetched and stored the page) or `down`.
    pub status: &'static str,
    pub last_attempt_unix_ms: Option<u64>,
    pub last_success_unix_ms: Option<u64>,
    /// The last failure's message (kept after a later success; `status` says whether it still applies).
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<u64>,
    pub consecutive_failures: u64,
    /// Scrapes that stored their page.
    pub scrapes: u64,
    pub failures: u64,
    /// Samples stored, over all scrapes, and by the last successful one.
    pub samples_scraped: u64,
    pub last_samples: u64,
    /// Lines refused by the parser (or mapping), over all scrapes, and the last scrape's first few reasons.
    pub parse_errors: u64,
    pub last_parse_errors: Vec<String>,
    pub last_duration_ms: Option<u64>,
    /// Size of the last page fetched (decompressed).
    pub last_body_bytes: Option<u64>,
}

impl ScrapeTargetHealth {
    fn new(url: &str, job: &str, instance: &str) -> ScrapeTargetHealth {
        ScrapeTargetHealth {
            url: url.to_owned(),
            job: job.to_owned(),
            instance: instance.to_owned(),
            status: "unknown",
            last_attempt_unix_ms: None,
            last_success_unix_ms: None,
            last_error: None,
            last_error_unix_ms: None,
            consecutive_failures: 0,
            scrapes: 0,
            failures: 0,
            samples_scraped: 0,
            last_samples: 0,
            parse_errors: 0,
            last_parse_errors: Vec::new(),
            last_duration_ms: None,
            last_body_bytes: None,
        }
    }
}

/// What the API shows of scraping (targets and their health). Cheap to clone; an unused handle lists nothing.
#[derive(Debug, Clone, Default)]
pub struct ScrapeHandle {
    health: Arc<Mutex<BTreeMap<String, ScrapeTargetHealth>>>,
}

impl ScrapeHandle {
    /// Every target, sorted by URL.
    pub fn targets(&self) -> Vec<ScrapeTargetHealth> {
        self.lock().values().cloned().collect()
    }

    /// One target by URL.
    pub fn target(&self, url: &str) -> Option<ScrapeTargetHealth> {
        self.lock().get(url).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ScrapeTargetHealth>> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update<R>(&self, url: &str, f: impl FnOnce(&mut ScrapeTargetHealth) -> R) -> Option<R> {
        self.lock().get_mut(url).map(f)
    }
}

/// Timing and bounds of scraping.
#[derive(Debug, Clone)]
pub struct ScrapeSettings {
    /// Between two scrapes of one target.
    pub interval: Duration,
    /// Bound of one scrape: connecting and reading the whole page.
    pub timeout: Duration,
    /// Scrapes running at once, over all targets.
    pub max_concurrent: usize,
    /// Largest page accepted, as sent and decompressed.
    pub max_body_bytes: usize,
    /// Most rows per stored batch.
    pub max_batch_points: usize,
    /// PEM CA certificate(s) trusted for `https` targets besides the system's roots (`scrape_ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl ScrapeSettings {
    /// `pull_interval_secs`, `pull_timeout_secs`, `max_write_bytes`, `max_batch_points`; 64 scrapes at once.
    pub fn from_config(config: &CollectorConfig) -> ScrapeSettings {
        ScrapeSettings {
            interval: Duration::from_secs(config.pull_interval_secs.max(1)),
            timeout: Duration::from_secs(config.pull_timeout_secs.max(1)),
            max_concurrent: 64,
            max_body_bytes: config.max_write_bytes,
            max_batch_points: config.max_batch_points,
            ca_file: config.scrape_ca_file.clone(),
        }
    }
}

/// One target.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    instance: String,
}

/// Scrapes every target on schedule. See the module docs.
#[derive(Debug)]
pub struct Scraper {
    store: Store,
    settings: ScrapeSettings,
    targets: Vec<Target>,
    handle: ScrapeHandle,
}

impl Scraper {
    /// A scraper of `config.scrape_targets` (invalid URLs, which config validation refuses, are logged and
    /// skipped; duplicates are scraped once), writing to `store`.
    pub fn new(store: Store, config: &CollectorConfig) -> Scraper {
        let handle = ScrapeHandle::default();
        let mut targets: Vec<Target> = Vec::new();
        {
            let mut health = handle.lock();
            for url in &config.scrape_targets {
                match parse_target_url(url) {
                    Err(reason) => tracing::error!(%reason, "scrape target skipped"),
                    Ok(_) if health.contains_key(url) => {}
                    Ok((_, instance)) => {
                        health.insert(
                            url.clone(),
                            ScrapeTargetHealth::new(url, SCRAPE_JOB, &instance),
                        );
                        targets.push(Target {
                            url: url.clone(),
                            instance,
                        });
                    }
                }
            }
        }
        Scraper {
            store,
            settings: ScrapeSettings::from_config(config),
            targets,
            handle,
        }
    }

    /// Replaces the settings.
    pub fn with_settings(mut self, settings: ScrapeSettings) -> Scraper {
        self.settings = settings;
        self
    }

    /// The health view; keep it before [`Scraper::run`] consumes the scraper.
    pub fn handle(&self) -> ScrapeHandle {
        self.handle.clone()
    }

    /// Scrapes until `shutdown` completes; scrapes in progress are then abandoned (what they stored is durable).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        if self.targets.is_empty() {
            shutdown.await;
            return;
        }
        let builder = reqwest::Client::builder()
            // Exporters are reached directly: a proxy from the environment is not for them.
            .no_proxy()
            .connect_timeout(self.settings.timeout)
            .timeout(self.settings.timeout)
            .user_agent(concat!("damselfly-collector/", env!("CARGO_PKG_VERSION")));
        let builder = match &self.settings.ca_file {
            Some(ca) => crate::tls::trust_ca_file(builder, ca),
            None => Ok(builder),
        };
        let client = match builder.and_then(|b| b.build().map_err(|e| e.to_string())) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the HTTP client: nothing is scraped");
                shutdown.await;
                return;
            }
        };
        let job = Arc::new(Job {
            store: self.store,
            settings: self.settings,
            handle: self.handle,
            client,
            permits: Semaphore::new(0),
        });
        job.permits.add_permits(job.settings.max_concurrent.max(1));
        let jitter = std::collections::hash_map::RandomState::new();
        let interval_ms = u64::try_from(job.settings.interval.as_millis()).unwrap_or(u64::MAX);
        let mut tasks = JoinSet::new();
        for target in self.targets {
            let delay = Duration::from_millis(jitter.hash_one(&target.url) % interval_ms.max(1));
            tracing::info!(url = %target.url, first_scrape_in = ?delay, "scrape target");
            tasks.spawn(Arc::clone(&job).target_loop(target, delay));
        }
        shutdown.await;
        tasks.shutdown().await;
        tracing::info!("scraper stopped");
    }
}

/// What every target's loop shares.
struct Job {
    store: Store,
    settings: ScrapeSettings,
    handle: ScrapeHandle,
    client: reqwest::Client,
    permits: Semaphore,
}

/// How one scrape went, for the health view.
struct ScrapeReport {
    samples: u64,
    parse_errors: u64,
    first_errors: Vec<String>,
    body_bytes: Option<u64>,
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Job {
    /// Scrapes `target` every interval, keeping the phase of its first scrape.
    async fn target_loop(self: Arc<Job>, target: Target, first_delay: Duration) {
        let mut ticks =
            tokio::time::interval_at(Instant::now() + first_delay, self.settings.interval);
        // A scrape longer than the interval skips the missed slots rather than firing them back to back.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            ticks.tick().await;
            let Ok(_permit) = self.permits.acquire().await else {
                return;
            };
            if AssertUnwindSafe(self.scrape(&target))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(url = %target.url, "scrape panicked (a bug)");
                self.handle.update(&target.url, |h| {
                    h.status = "down";
                    h.last_error = Some("internal error (a bug): the scrape panicked".into());
                    h.consecutive_failures += 1;
                    h.failures += 1;
                });
            }
        }
    }

    /// One scrape: fetch, parse, store (with `up` and the scrape's own series), record health.
    async fn scrape(&self, target: &Target) {
        let started = Instant::now();
        let scrape_ms = unix_ms_now();
        self.handle.update(&target.url, |h| {
            h.last_attempt_unix_ms = Some(scrape_ms);
        });
        let outcome = self.scrape_and_store(target, scrape_ms, started).await;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let now_ms = unix_ms_now();
        let log = self.handle.update(&target.url, |h| {
            h.last_duration_ms = Some(elapsed_ms);
            match &outcome {
                Ok(report) => {
                    let recovered = h.consecutive_failures > 0;
                    let new_errors = report.parse_errors > 0 && h.last_parse_errors.is_empty();
                    h.status = "up";
                    h.last_success_unix_ms = Some(now_ms);
                    h.consecutive_failures = 0;
                    h.scrapes += 1;
                    h.samples_scraped += report.samples;
                    h.last_samples = report.samples;
                    h.parse_errors += report.parse_errors;
                    h.last_parse_errors.clone_from(&report.first_errors);
                    h.last_body_bytes = report.body_bytes;
                    (recovered, new_errors, 0)
                }
                Err((e, report)) => {
                    h.status = "down";
                    h.last_error = Some(e.clone());
                    h.last_error_unix_ms = Some(now_ms);
                    h.consecutive_failures += 1;
                    h.failures += 1;
                    if let Some(report) = report {
                        h.last_body_bytes = report.body_bytes;
                        h.parse_errors += report.parse_errors;
                        h.last_parse_errors.clone_from(&report.first_errors);
                    }
                    (false, false, h.consecutive_failures)
                }
            }
        });
        // Log transitions, not every scrape: at one scrape a second a dead target would flood the log.
        let url = &target.url;
        match (&outcome, log) {
            (Ok(report), Some((recovered, new_errors, _))) => {
                if recovered {
                    tracing::info!(%url, samples = report.samples, "scrape target is up again");
                }
                if new_errors {
                    tracing::warn!(%url, refused = report.parse_errors, first = ?report.first_errors.first(), "scraped page has lines that were refused");
                }
            }
            (Err((e, _)), Some((_, _, failures)))
                if failures == 1 || failures % LOG_EVERY_FAILURES == 0 =>
            {
                tracing::warn!(%url, error = %e, consecutive_failures = failures, "scrape failed");
            }
            _ => {}
        }
    }

    async fn scrape_and_store(
        &self,
        target: &Target,
        scrape_ms: u64,
        started: Instant,
    ) -> Result<ScrapeReport, (String, Option<ScrapeReport>)> {
        let default_ms = i64::try_from(scrape_ms).unwrap_or(i64::MAX);
        let fetched = self.fetch(&target.url).await;
        let (mut builder, mut report, failure) = match fetched {
            Ok(body) => {
                let body_bytes = body.len() as u64;
                let store = self.store.clone();
                let max_rows = self.settings.max_batch_points;
                let instance = target.instance.clone();
                let map = move || map_page(&body, &instance, default_ms, &store, max_rows);
                let mapped = if body_bytes as usize <= PARSE_INLINE_BYTES {
                    Ok(map())
                } else {
                    tokio::task::spawn_blocking(map).await
                };
                match mapped {
                    Ok((builder, mut report)) => {
                        report.body_bytes = Some(body_bytes);
                        (builder, report, None)
                    }
                    Err(e) => {
                        return Err((format!("internal error (a bug): parsing failed: {e}"), None));
                    }
                }
            }
            Err(e) => (
                RowsBuilder::new(self.settings.max_batch_points),
                ScrapeReport {
                    samples: 0,
                    parse_errors: 0,
                    first_errors: Vec::new(),
                    body_bytes: None,
                },
                Some(e),
            ),
        };
        // Prometheus' own series for the scrape, stamped like the samples.
        let scraped = report.samples;
        let up = if failure.is_none() { 1.0 } else { 0.0 };
        let synthetic = [
            ("up", up),
            ("scrape_duration_seconds", started.elapsed().as_secs_f64()),
            ("scrape_samples_scraped", scraped as f64),
        ];
        let time = time_ns(default_ms).unwrap_or(0);
        for (name, value) in synthetic {
            if let Some(series) = target_series(name, &[], &target.instance) {
                builder.push_series(series, &[(time, value)]);
            }
        }
        let stored = write_batches(&self.store, builder.finish()).await;
        if let Some(e) = failure {
            return Err((e, None));
        }
        match stored {
            Ok(_) => Ok(report),
            Err(WriteFailure::Retry { message, .. }) => Err((
                format!("the page was fetched but not stored (the store is busy): {message}"),
                Some(report),
            )),
            Err(WriteFailure::Rejected { message, stored }) => {
                report.samples = report.samples.min(stored as u64);
                Err((
                    format!("the store refused samples of the page: {message}"),
                    Some(report),
                ))
            }
        }
    }

    /// GET the page: status 200, at most `max_body_bytes` as sent and after gzip, within the client's timeout.
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let limit = self.settings.max_body_bytes;
        let timeout_secs = format!("{}", self.settings.timeout.as_secs_f64());
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, ACCEPT)
            .header(reqwest::header::ACCEPT_ENCODING, "gzip")
            .header("X-Prometheus-Scrape-Timeout-Seconds", timeout_secs)
            .send()
            .await
            .map_err(|e| self.request_error(&e))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(format!("the target answered HTTP {status}"));
        }
        if let Some(len) = response.content_length()
            && len > limit as u64
        {
            return Err(format!(
                "the page is {len} bytes, more than max_write_bytes ({limit} bytes)"
            ));
        }
        let gzip = response
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.request_error(&e))? {
            if body.len() + chunk.len() > limit {
                return Err(format!(
                    "the page is larger than max_write_bytes ({limit} bytes)"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        if !gzip {
            return Ok(body);
        }
        let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
        flate2::read::MultiGzDecoder::new(body.as_slice())
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("the page is not valid gzip: {e}"))?;
        if out.len() > limit {
            return Err(format!(
                "the page decompresses to more than max_write_bytes ({limit} bytes)"
            ));
        }
        Ok(out)
    }

    fn request_error(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            format!(
                "no complete answer within {:?} (pull_timeout_secs)",
                self.settings.timeout
            )
        } else {
            crate::error::error_chain(e)
        }
    }
}

/// A scraped series with the target's `job` and `instance` (the scraped ones kept as `exported_*`).
fn target_series(name: &str, labels: &[(String, String)], instance: &str) -> Option<MappedSeries> {
    map_series(
        name,
        target_labels(labels, instance)
            .iter()
            .map(|(k, v)| (k.as_ref(), *v)),
        None,
    )
    .ok()
}

/// The labels of a scraped sample as Prometheus (`honor_labels: false`) stores them.
fn target_labels<'a>(
    labels: &'a [(String, String)],
    instance: &'a str,
) -> Vec<(std::borrow::Cow<'a, str>, &'a str)> {
    let mut out: Vec<(std::borrow::Cow<'a, str>, &'a str)> = Vec::with_capacity(labels.len() + 2);
    for (k, v) in labels {
        if k == "job" || k == "instance" {
            let mut renamed = format!("exported_{k}");
            while labels.iter().any(|(other, _)| *other == renamed) {
                renamed.insert_str(0, "exported_");
            }
            out.push((renamed.into(), v.as_str()));
        } else {
            out.push((k.as_str().into(), v.as_str()));
        }
    }
    out.push(("job".into(), SCRAPE_JOB));
    out.push(("instance".into(), instance));
    out
}

/// Parses a page and maps its samples (the time of samples without one: `default_ms`).
fn map_page(
    body: &[u8],
    instance: &str,
    default_ms: i64,
    store: &Store,
    max_rows: usize,
) -> (RowsBuilder, ScrapeReport) {
    let parsed = prom_text::parse(body);
    let mut builder = RowsBuilder::new(max_rows);
    let mut guard = SchemaGuard::new(store);
    let mut refused = parsed.error_count as u64;
    let mut first_errors: Vec<String> = parsed
        .errors
        .iter()
        .take(MAX_REPORTED_ERRORS)
        .map(ToString::to_string)
        .collect();
    let mut note = |message: String| {
        refused += 1;
        if first_errors.len() < MAX_REPORTED_ERRORS {
            first_errors.push(message);
        }
    };
    for sample in &parsed.samples {
        let labels = target_labels(&sample.labels, instance);
        let mapped = map_series(
            &sample.name,
            labels.iter().map(|(k, v)| (k.as_ref(), *v)),
            None,
        )
        .and_then(|series| guard.check(&series).map(|()| series))
        .and_then(|series| {
            let t = time_ns(sample.timestamp_ms.unwrap_or(default_ms))?;
            Ok((series, t))
        });
        match mapped {
            Ok((series, t)) => builder.push_series(series, &[(t, sample.value)]),
            Err(message) => note(format!(
                "sample {}: {message}",
                describe(&sample.name, &sample.labels)
            )),
        }
    }
    let samples = builder.rows() as u64;
    (
        builder,
        ScrapeReport {
            samples,
            parse_errors: refused,
            first_errors,
            body_bytes: None,
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn target_urls() {
        assert!(validate_scrape_url("http://127.0.0.1:9100/metrics").is_ok());
        assert!(validate_scrape_url("http://exporter/metrics?format=text").is_ok());
        let (_, instance) = parse_target_url("https://exporter/metrics").unwrap();
        assert_eq!(instance, "exporter:443");
        let (_, instance) = parse_target_url("http://127.0.0.1:9100/metrics").unwrap();
        assert_eq!(instance, "127.0.0.1:9100");
        let (_, instance) = parse_target_url("http://exporter/metrics").unwrap();
        assert_eq!(instance, "exporter:80");
        let (_, instance) = parse_target_url("http://[::1]:9100/metrics").unwrap();
        assert_eq!(instance, "[::1]:9100");
        for (bad, why) in [
            ("ftp://h:1/metrics", "https://"),
            ("127.0.0.1:9100/metrics", "http://"),
            ("http://u:p@h:1/metrics", "credentials"),
            ("http://h:1/metrics#x", "fragment"),
            ("not a url", "not a URL"),
            ("http://:1/", "not a URL"),
        ] {
            let e = validate_scrape_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// A fake exporter: `/ok` (gzip, with a timestamp, a `job` label and a bad line), `/404`, `/big` (over the
    /// size limit), `/bomb` (gzip, over the limit once decompressed), `/slow` (never answers).
    async fn fake_exporter() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let (status, gzip, body): (&str, bool, Vec<u8>) = match path.as_str() {
                        "/ok" => {
                            assert!(
                                head.to_lowercase().contains("accept-encoding: gzip"),
                                "{head}"
                            );
                            let page = "# TYPE temp gauge\ntemp{room=\"a\",job=\"theirs\"} 21.5\n\
                                        old{x=\"1\"} 7 1700000000000\nbroken{ 1\n";
                            let mut enc = flate2::write::GzEncoder::new(
                                Vec::new(),
                                flate2::Compression::fast(),
                            );
                            std::io::Write::write_all(&mut enc, page.as_bytes()).unwrap();
                            ("200 OK", true, enc.finish().unwrap())
                        }
                        "/big" => ("200 OK", false, vec![b'#'; 10_000]),
                        "/bomb" => {
                            let mut enc = flate2::write::GzEncoder::new(
                                Vec::new(),
                                flate2::Compression::best(),
                            );
                            std::io::Write::write_all(&mut enc, &vec![b'#'; 1 << 20]).unwrap();
                            ("200 OK", true, enc.finish().unwrap())
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        _ => ("404 Not Found", false, b"no".to_vec()),
                    };
                    let mut response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    if gzip {
                        response.push_str("Content-Encoding: gzip\r\n");
                    }
                    response.push_str("\r\n");
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn sql(engine: &crate::query::QueryEngine, sql: &str) -> Vec<serde_json::Value> {
        let result = engine.sql(sql).await.unwrap();
        let json = crate::http::encode(&result, crate::http::Format::Json).unwrap();
        serde_json::from_slice(&json).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_store_samples_and_record_failures() {
        let base = fake_exporter().await;
        let dir = tempfile::tempdir().unwrap();
        let config = CollectorConfig {
            data_dir: dir.path().to_path_buf(),
            wal_sync: crate::config::WalSync::None,
            scrape_targets: ["/ok", "/404", "/big", "/bomb", "/slow", "/ok"]
                .iter()
                .map(|p| format!("{base}{p}"))
                .collect(),
            ..CollectorConfig::default()
        };
        let store = Store::open(&config).unwrap();
        let engine = crate::query::QueryEngine::new(store.clone(), config.query_limits()).unwrap();
        let scraper = Scraper::new(store.clone(), &config).with_settings(ScrapeSettings {
            interval: Duration::from_millis(300),
            timeout: Duration::from_millis(500),
            max_concurrent: 2,
            max_body_bytes: 4096,
            max_batch_points: 100,
            ca_file: None,
        });
        let handle = scraper.handle();
        // Listed once each, shown before the first scrape.
        assert_eq!(handle.targets().len(), 5);
        assert!(handle.targets().iter().all(|t| t.status == "unknown"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(scraper.run(async move {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = handle.targets();
            if t.iter().all(|t| t.scrapes + t.failures >= 2) {
                break;
            }
            assert!(Instant::now() < deadline, "{t:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send(()).unwrap();
        run.await.unwrap();

        let ok = handle.target(&format!("{base}/ok")).unwrap();
        assert_eq!(ok.status, "up", "{ok:?}");
        assert_eq!(ok.last_samples, 2);
        assert_eq!(ok.last_parse_errors.len(), 1, "{ok:?}");
        assert!(ok.last_parse_errors[0].starts_with("line 4: "), "{ok:?}");
        assert!(ok.parse_errors >= 2);
        assert!(ok.last_body_bytes.unwrap() > 50);
        let status = |path: &str| {
            let h = handle.target(&format!("{base}{path}")).unwrap();
            assert_eq!(h.status, "down", "{h:?}");
            assert!(h.consecutive_failures >= 2, "{h:?}");
            h.last_error.unwrap()
        };
        assert!(status("/404").contains("HTTP 404"));
        assert!(status("/big").contains("max_write_bytes (4096 bytes)"));
        assert!(status("/bomb").contains("decompresses to more than max_write_bytes"));
        assert!(status("/slow").contains("pull_timeout_secs"));

        let instance = base.trim_start_matches("http://");
        let temp = sql(
            &engine,
            "SELECT room, job, exported_job, instance, value FROM temp LIMIT 1",
        )
        .await;
        assert_eq!(
            temp,
            [
                serde_json::json!({"room": "a", "job": "scrape", "exported_job": "theirs", "instance": instance, "value": 21.5})
            ]
        );
        // The page's own timestamp is kept.
        let old = sql(&engine, "SELECT DISTINCT time, value FROM old").await;
        assert_eq!(
            old,
            [serde_json::json!({"time": "2023-11-14T22:13:20Z", "value": 7.0})]
        );
        let up = sql(
            &engine,
            "SELECT DISTINCT value FROM up WHERE instance IS NOT NULL ORDER BY value",
        )
        .await;
        assert_eq!(
            up,
            [
                serde_json::json!({"value": 0.0}),
                serde_json::json!({"value": 1.0})
            ]
        );
        let scraped = sql(
            &engine,
            "SELECT max(value) AS n FROM scrape_samples_scraped",
        )
        .await;
        assert_eq!(scraped[0]["n"], 2.0);
    }

    #[test]
    fn job_and_instance_are_added_and_scraped_ones_exported() {
        let labels = vec![
            ("job".to_owned(), "theirs".to_owned()),
            ("exported_job".to_owned(), "older".to_owned()),
            ("cpu".to_owned(), "0".to_owned()),
        ];
        let series = target_series("node_cpu_seconds_total", &labels, "h:9100").unwrap();
        let tags: Vec<(&str, &str)> = series
            .tags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            tags,
            [
                ("cpu", "0"),
                ("exported_exported_job", "theirs"),
                ("exported_job", "older"),
                ("instance", "h:9100"),
                ("job", SCRAPE_JOB)
            ]
        );
    }
}
