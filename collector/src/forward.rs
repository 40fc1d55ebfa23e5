//! Forwarding: a copy of every stored point goes to InfluxDB v2 API endpoints (`[[forward]]` in the config).

use serde::{Deserialize, Serialize};

/// One forwarding destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Base URL of the InfluxDB v2 API, e.g. `http://127.0.0.1:8086`.
    pub url: String,
}

impl ForwardConfig {
    /// Says what is wrong with this destination, if anything.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What the API shows of forwarding (`GET /api/v1/forward`). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ForwardHandle {}

/// The forwarding tasks, one per destination.
#[derive(Debug)]
pub struct Forwarders {}

impl Forwarders {
    /// Sets up one forwarder per destination, each fed by a [`crate::store::Store::tap`].
    pub fn new(_destinations: &[ForwardConfig], _store: &crate::store::Store) -> Forwarders {
        Forwarders {}
    }

    pub fn handle(&self) -> ForwardHandle {
        ForwardHandle {}
    }

    /// Forwards until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
    }
}
