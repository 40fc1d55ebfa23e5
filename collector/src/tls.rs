//! TLS on the collector's three ports, with rustls (ring): gRPC (tonic), the HTTP API and the PostgreSQL port.
//!
//! `[tls]` in the config names PEM files: `cert_file` (the server's certificate chain), `key_file` (its private
//! key) and, optionally, `client_ca_file`: then gRPC clients (agents) must present a certificate signed by that CA
//! (mutual TLS), on top of their token. With `[tls]`, every port speaks only TLS: a plaintext gRPC or HTTP
//! connection fails its handshake, and a PostgreSQL client that does not ask for SSL is refused (SQLSTATE 28000).
//! `damselfly certs init` makes a small CA and the certificates for a deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tls]`: the server's certificate and key, and optionally the CA of the agents' client certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this collector (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificate(s): gRPC clients must present a certificate it signed (mutual TLS). Default: none.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// PEM CA certificate(s) this collector trusts, besides the system's roots, when it calls the other shards
    /// over HTTPS: usually the deployment's `ca.pem`. Default: the system's roots only.
    #[serde(default)]
    pub peer_ca_file: Option<PathBuf>,
}

/// The files of a [`TlsConfig`], read and checked.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    /// The same, for rustls (HTTP, PostgreSQL).
    server: Arc<rustls::ServerConfig>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls: cannot read the {what} {}: {e}", path.display()))
}

impl TlsConfig {
    /// Reads the files and checks that they make a usable server configuration.
    pub fn load(&self) -> Result<TlsFiles, String> {
        let cert_pem = read(&self.cert_file, "certificate (cert_file)")?;
        let key_pem = read(&self.key_file, "private key (key_file)")?;
        let client_ca_pem = self
            .client_ca_file
            .as_deref()
            .map(|p| read(p, "client CA (client_ca_file)"))
            .transpose()?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!(
                    "tls: {}: not a PEM certificate: {e}",
                    self.cert_file.display()
                )
            })?;
        if certs.is_empty() {
            return Err(format!(
                "tls: {} holds no certificate",
                self.cert_file.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!(
                "tls: {}: not a PEM private key: {e}",
                self.key_file.display()
            )
        })?;
        if let (Some(pem), Some(path)) = (&client_ca_pem, &self.client_ca_file) {
            ca_certificates(pem, path)?;
        }
        if let Some(path) = &self.peer_ca_file {
            ca_certificates(&read(path, "peer CA (peer_ca_file)")?, path)?;
        }
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "tls: the certificate {} and key {} do not make a server identity: {e}",
                self.cert_file.display(),
                self.key_file.display()
            )
        })?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsFiles {
            cert_pem,
            key_pem,
            client_ca_pem,
            server: Arc::new(server),
        })
    }
}

/// The certificates of a PEM CA file; an error naming the file when it holds none or is not PEM.
fn ca_certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let cas = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls: {}: not a PEM certificate: {e}", path.display()))?;
    if cas.is_empty() {
        return Err(format!("tls: {} holds no certificate", path.display()));
    }
    Ok(cas)
}

/// `builder`, trusting the CA certificate(s) in the PEM file `ca_file` besides the system's roots: how the CLI
/// (`DAMSELFLY_CA_FILE`) and shards (`peer_ca_file`) reach collectors whose certificates a private CA signed.
pub fn trust_ca_file(
    mut builder: reqwest::ClientBuilder,
    ca_file: &Path,
) -> Result<reqwest::ClientBuilder, String> {
    let pem = read(ca_file, "CA certificate")?;
    for der in ca_certificates(&pem, ca_file)? {
        let cert = reqwest::Certificate::from_der(der.as_ref())
            .map_err(|e| format!("tls: {}: {e}", ca_file.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    Ok(builder)
}

impl TlsFiles {
    /// tonic's server TLS: the identity, and the client CA when agents must present certificates.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        config
    }

    /// The acceptor for the HTTP API and the PostgreSQL port.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }
}

/// A TCP listener whose connections come out as finished TLS sessions: handshakes run in their own tasks (with a
/// timeout), so a slow or hostile client never holds up the others; failed ones are logged and dropped.
#[derive(Debug)]
pub struct TlsListener {
    local: SocketAddr,
    sessions: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, sessions) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "https accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let session_tx = tx.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(session)) => {
                            let _ = session_tx.send((session, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    break;
                }
            }
        });
        Ok(TlsListener { local, sessions })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.sessions.recv().await {
            Some(session) => session,
            // The accept task only ends when this listener is gone; wait for the server's shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
