//! Runs one collector: the store, its flusher, the gRPC ingest server and the HTTP API, with an orderly shutdown.
//!
//! [`Collector::bind`] opens the store (replaying the WAL) and binds both listeners, so the caller learns the real
//! addresses (port 0 picks a free one) before anything is served; [`Collector::run`] serves until the shutdown
//! future completes, then stops accepting, gives open requests [`SHUTDOWN_GRACE`] to finish, and flushes the
//! buffer to Parquet.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::agents::{AgentRegistry, AgentsService};
use crate::cluster::{Cluster, ShardEndpoint, ShardsService};
use crate::compaction::{FailAction, Failpoint};
use crate::config::CollectorConfig;
use crate::error::{CollectorError, Result};
use crate::grpc::IngestService;
use crate::http::{ApiState, router};
use crate::maintenance::Maintenance;
use crate::pull::{PullScheduler, PullTarget};
use crate::query::QueryEngine;
use crate::store::Store;

/// How long open streams and requests may run on after shutdown starts. Agents' push streams never end on their
/// own, so they are cut after this; their unacknowledged batches are re-sent to the next collector.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A collector whose store is open and whose sockets are bound.
#[derive(Debug)]
pub struct Collector {
    cluster: Cluster,
    store: Store,
    engine: QueryEngine,
    registry: AgentRegistry,
    grpc: TcpListener,
    http: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    /// The PostgreSQL protocol listener, when `pg_addr` is set.
    pg: Option<(TcpListener, SocketAddr)>,
    alerts: crate::alerts::AlertManager,
    /// The certificates, when every port speaks TLS.
    tls: Option<crate::tls::TlsFiles>,
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| CollectorError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| CollectorError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    Ok((listener, local))
}

impl Collector {
    /// Opens the store under `config.data_dir` and binds the gRPC and HTTP addresses.
    pub async fn bind(config: CollectorConfig) -> Result<Collector> {
        config.validate()?;
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::TlsConfig::load)
            .transpose()
            .map_err(CollectorError::Config)?;
        let (grpc, grpc_addr) = bind(config.grpc_addr).await?;
        let (http, http_addr) = bind(config.http_addr).await?;
        let pg = match config.pg_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let cluster = Cluster::new(
            &config,
            ShardEndpoint {
                id: config.shard_id.clone(),
                grpc_url: format!("{scheme}://{grpc_addr}"),
                http_url: format!("{scheme}://{http_addr}"),
            },
        )?;
        if cluster.is_sharded() {
            // Know who answers before asking them about this shard's WAL.
            cluster.probe().await;
        }
        let open_config = config.clone();
        let reconcile = cluster.clone();
        let runtime = tokio::runtime::Handle::current();
        let store = tokio::task::spawn_blocking(move || {
            Store::open_reconciled(&open_config, |batches| {
                if reconcile.is_sharded() {
                    runtime.block_on(reconcile.stored_elsewhere(batches))
                } else {
                    Default::default()
                }
            })
        })
        .await
        .map_err(|e| CollectorError::Server(format!("opening the store failed: {e}")))??;
        let engine = QueryEngine::new(store.clone(), config.query_limits())
            .map_err(|e| CollectorError::Server(format!("cannot set up the query engine: {e}")))?
            .with_cluster(cluster.clone());
        // Rows in files from before this start: read in the background, the cache is used once they are in.
        let warming = engine.clone();
        tokio::spawn(async move { warming.warm_last_values().await });
        let registry_config = config.clone();
        let registry = tokio::task::spawn_blocking(move || AgentRegistry::open(&registry_config))
            .await
            .map_err(|e| {
                CollectorError::Server(format!("loading the agent registry failed: {e}"))
            })??;
        // A bad rules file stops the start, like any other configuration error.
        let alerts = crate::alerts::AlertManager::open(
            &config,
            store.clone(),
            engine.clone(),
            registry.clone(),
        )?;
        Ok(Collector {
            alerts,
            cluster,
            store,
            engine,
            registry,
            grpc,
            http,
            grpc_addr,
            http_addr,
            pg,
            tls,
        })
    }

    /// `https` when every port speaks TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The PostgreSQL protocol address, when enabled.
    pub fn pg_addr(&self) -> Option<SocketAddr> {
        self.pg.as_ref().map(|(_, addr)| *addr)
    }

    /// The shard map and the peers.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn engine(&self) -> &QueryEngine {
        &self.engine
    }

    /// The agent registry (registrations, heartbeats, pull targets).
    pub fn registry(&self) -> &AgentRegistry {
        &self.registry
    }

    /// Serves until `shutdown` completes, then stops and flushes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let config = self.store.config().clone();
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            // An error means the sender is gone, which also means stop.
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let ingest = IngestService::new(self.store.clone())
            .with_registry(self.registry.clone())
            .with_cluster(self.cluster.clone())
            .into_server(config.max_grpc_message_bytes);
        let bench = crate::bench::BenchRuns::default();
        let agents = AgentsService::new(self.registry.clone())
            .with_bench(bench.clone())
            .into_server();
        let shards = ShardsService::new(self.cluster.clone()).into_server();
        let metrics = crate::subscribe::MetricsService::new(self.store.clone()).into_server();
        // Each service checks tokens its own way (see crate::auth): writes for ingest and the agents' calls, a
        // reader of every namespace for subscriptions, any valid token for the shard map.
        let tokens = config
            .auth
            .then(|| crate::auth::Tokens::new(config.tokens_path()));
        let protected = config.auth && config.tls.is_some();
        if !protected && !config.exposed_addrs().is_empty() {
            tracing::warn!(
                addrs = ?config.exposed_addrs(),
                auth = config.auth,
                tls = config.tls.is_some(),
                "insecure: listening beyond loopback without both auth and TLS"
            );
        }
        let guarded =
            |need, unlimited| crate::auth::grpc_interceptor(tokens.clone(), need, unlimited);
        use crate::auth::Need;
        use tonic::service::interceptor::InterceptedService;
        let mut grpc = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            grpc = grpc
                .tls_config(tls.grpc())
                .map_err(|e| CollectorError::Config(format!("tls: {e}")))?;
        }
        let grpc = grpc
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(InterceptedService::new(
                ingest,
                guarded(Some(Need::Write), false),
            ))
            .add_service(InterceptedService::new(
                agents,
                guarded(Some(Need::Write), false),
            ))
            .add_service(InterceptedService::new(shards, guarded(None, false)))
            .add_service(InterceptedService::new(
                metrics,
                guarded(Some(Need::Read), true),
            ))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.grpc),
                stopped(stop_rx.clone()),
            );
        let mut grpc = tokio::spawn(async move { grpc.await.map_err(|e| e.to_string()) });

        // Pull mode: the configured targets and the registered pull-mode agents; pulled batches count as hearing
        // from their agent, as pushed ones do.
        let targets_registry = self.registry.clone();
        let touch_registry = self.registry.clone();
        let puller = PullScheduler::new(
            self.store.clone(),
            &config.pull_targets,
            std::sync::Arc::new(move || {
                targets_registry
                    .pull_targets()
                    .into_iter()
                    .map(|(agent_id, addr)| PullTarget::registered(agent_id, &addr))
                    .collect()
            }),
        )
        .on_batch(std::sync::Arc::new(move |agent_id: &str| {
            touch_registry.touch(agent_id)
        }));
        let pull_handle = puller.handle();
        let puller = tokio::spawn({
            let rx = stop_rx.clone();
            async move { puller.run(stopped(rx)).await }
        });

        // Compaction, rollups and retention; `DAMSELFLY_FAILPOINT` lets the black-box tests kill a compaction.
        let maintenance = Maintenance::new(self.store.clone())
            .with_failpoint(Failpoint::from_env(), FailAction::Abort);
        let maintainer = tokio::spawn({
            let rx = stop_rx.clone();
            let maintenance = maintenance.clone();
            async move { maintenance.run(stopped(rx)).await }
        });

        // Copies of stored points to InfluxDB v2 endpoints; scrapes of Prometheus exporters.
        let forwarders = crate::forward::Forwarders::new(&config.forward, &self.store);
        let forward_handle = forwarders.handle();
        let forwarder = tokio::spawn({
            let rx = stop_rx.clone();
            async move { forwarders.run(stopped(rx)).await }
        });
        let scraper = crate::ingest::scrape::Scraper::new(self.store.clone(), &config);
        let scrape_handle = scraper.handle();
        let scraper = tokio::spawn({
            let rx = stop_rx.clone();
            async move { scraper.run(stopped(rx)).await }
        });

        let api = router(
            ApiState {
                store: self.store.clone(),
                engine: self.engine.clone(),
                registry: self.registry.clone(),
                pull: pull_handle,
                maintenance: maintenance.clone(),
                forward: forward_handle,
                scrape: scrape_handle,
                cluster: self.cluster.clone(),
                bench,
                alerts: self.alerts.clone(),
                tokens: tokens.clone(),
            },
            config.max_sql_bytes,
        );
        let mut http = match &self.tls {
            Some(tls) => {
                let listener = damselfly_proto::tls::TlsListener::new(self.http, tls.acceptor())
                    .map_err(|e| CollectorError::Server(format!("https listener: {e}")))?;
                let http =
                    axum::serve(listener, api).with_graceful_shutdown(stopped(stop_rx.clone()));
                tokio::spawn(async move { http.await.map_err(|e| e.to_string()) })
            }
            None => {
                let http =
                    axum::serve(self.http, api).with_graceful_shutdown(stopped(stop_rx.clone()));
                tokio::spawn(async move { http.await.map_err(|e| e.to_string()) })
            }
        };

        // The PostgreSQL protocol: its connections end when the stop signal comes.
        let pg = self.pg.map(|(listener, addr)| {
            tracing::info!(pg = %addr, "PostgreSQL protocol serving");
            let engine = self.engine.clone();
            let rx = stop_rx.clone();
            let max = config.max_sql_bytes;
            let tokens = tokens.clone();
            let tls = self.tls.as_ref().map(crate::tls::TlsFiles::acceptor);
            tokio::spawn(async move {
                crate::pgwire::serve(listener, engine, max, tokens, tls, stopped(rx)).await
            })
        });

        // Peers' liveness and the shards_file.
        let prober = tokio::spawn({
            let rx = stop_rx.clone();
            let cluster = self.cluster.clone();
            async move { cluster.run(stopped(rx)).await }
        });

        // The mirror of this shard's files in the shared bucket.
        let mirror = self.cluster.shared_store().cloned().map(|shared| {
            let rx = stop_rx.clone();
            tokio::spawn(async move { shared.run(stopped(rx)).await })
        });

        // Alert rules, evaluated on a schedule; their history rows go through the store like any batch.
        let alerter = tokio::spawn({
            let rx = stop_rx.clone();
            let alerts = self.alerts.clone();
            async move { alerts.run(stopped(rx)).await }
        });

        let flush_store = self.store.clone();
        let flusher = tokio::spawn({
            let rx = stop_rx.clone();
            async move { flush_store.run_flusher(stopped(rx)).await }
        });
        let persister = tokio::spawn({
            let rx = stop_rx.clone();
            let registry = self.registry.clone();
            async move { registry.run_persister(stopped(rx)).await }
        });

        tracing::info!(grpc = %self.grpc_addr, http = %self.http_addr, data_dir = %config.data_dir.display(), "collector serving");
        let failure = tokio::select! {
            () = shutdown => None,
            r = &mut grpc => Some(format!("gRPC server stopped: {}", outcome(r))),
            r = &mut http => Some(format!("HTTP server stopped: {}", outcome(r))),
        };
        tracing::info!("collector shutting down");
        let _ = stop_tx.send(true);
        for (name, task) in [("gRPC", grpc), ("HTTP", http)] {
            if task.is_finished() {
                continue;
            }
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                tracing::info!(
                    "{name} connections still open after {SHUTDOWN_GRACE:?}; closing them"
                );
                abort.abort();
            }
        }
        if let Some(pg) = pg
            && let Err(e) = pg.await
        {
            tracing::error!(error = %e, "the PostgreSQL protocol server failed");
        }
        // The pull scheduler abandons its pulls at once (unacknowledged batches stay at the agents).
        if let Err(e) = puller.await {
            tracing::error!(error = %e, "the pull scheduler failed");
        }
        if let Err(e) = prober.await {
            tracing::error!(error = %e, "the shard prober failed");
        }
        if let Err(e) = scraper.await {
            tracing::error!(error = %e, "the scraper failed");
        }
        // Before the last flush, so the history rows of its last round are in it.
        if let Err(e) = alerter.await {
            tracing::error!(error = %e, "the alert evaluator failed");
        }
        // The flusher sees the stop signal and runs a last flush.
        if let Err(e) = flusher.await {
            tracing::error!(error = %e, "the flusher task failed; the WAL keeps the rows for the next start");
        }
        if let Err(e) = maintainer.await {
            tracing::error!(error = %e, "the maintenance task failed");
        }
        // The final flush's files reach the bucket too.
        if let Some(mirror) = mirror
            && let Err(e) = mirror.await
        {
            tracing::error!(error = %e, "the shared store mirror failed");
        }
        if let Some(shared) = self.cluster.shared_store()
            && let Err(e) = shared.sync(false).await
        {
            tracing::error!(error = %e, "last upload to the shared store failed; it resumes at the next start");
        }
        // Forwarders get their last chance to send what they hold after the final flush.
        if let Err(e) = forwarder.await {
            tracing::error!(error = %e, "the forwarder failed");
        }
        // No query runs any more: files replaced or expired by maintenance can go now.
        maintenance.purge_all();
        if let Err(e) = persister.await {
            tracing::error!(error = %e, "the agent registry persister failed");
        }
        // Heartbeats answered during the grace period.
        self.registry.persist().await;
        tracing::info!("collector stopped");
        match failure {
            Some(message) => Err(CollectorError::Server(message)),
            None => Ok(()),
        }
    }
}

fn outcome(
    r: std::result::Result<std::result::Result<(), String>, tokio::task::JoinError>,
) -> String {
    match r {
        Ok(Ok(())) => "ended".to_owned(),
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    }
}
