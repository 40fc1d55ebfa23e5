//! TLS on the collector's three ports, with rustls (ring): gRPC (tonic), the HTTP API and the PostgreSQL port.
//!
//! `[tls]` in the config names PEM files: `cert_file` (the server's certificate chain), `key_file` (its private
//! key) and, optionally, `client_ca_file`: then gRPC clients (agents) must present a certificate signed by that CA
//! (mutual TLS), on top of their token. With `[tls]`, every port speaks only TLS: a plaintext gRPC or HTTP
//! connection fails its handshake, and a PostgreSQL client that does not ask for SSL is refused (SQLSTATE 28000).
//! `damselfly certs init` makes a small CA and the certificates for a deployment. The listener itself is
//! [`damselfly_proto::tls::TlsListener`], which the agent's pull port uses too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

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
        if let (Some(pem), Some(path)) = (&client_ca_pem, &self.client_ca_file) {
            ca_certificates(pem, path)?;
        }
        if let Some(path) = &self.peer_ca_file {
            ca_certificates(&read(path, "peer CA (peer_ca_file)")?, path)?;
        }
        let server = damselfly_proto::tls::server_config(
            &cert_pem,
            &key_pem,
            &self.cert_file.display().to_string(),
            &self.key_file.display().to_string(),
        )?;
        Ok(TlsFiles {
            cert_pem,
            key_pem,
            client_ca_pem,
            server,
        })
    }
}

/// The certificates of a PEM CA file; an error naming the file when it holds none or is not PEM.
pub(crate) fn ca_certificates(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
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
