//! The agent's credentials on its gRPC calls: its token (`authorization: Bearer <token>` metadata, for collectors
//! with `auth` on) and its TLS settings (the collector's CA, and a client certificate for mutual TLS).

use tonic::metadata::{Ascii, MetadataValue};

/// The metadata value for `token`; `None` if it cannot be one (not printable ASCII, or a space inside).
pub fn bearer(token: &str) -> Option<MetadataValue<Ascii>> {
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    format!("Bearer {token}").parse().ok()
}

/// `message` as a request that carries `token` (when there is one).
pub fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    authorize(&mut request, token);
    request
}

/// Adds `token` to a request (when there is one; a token that cannot be metadata was refused by the config).
pub fn authorize<T>(request: &mut tonic::Request<T>, token: Option<&str>) {
    if let Some(value) = token.and_then(bearer) {
        request.metadata_mut().insert("authorization", value);
    }
}

/// The TLS settings for an `https://` collector from the config's files: `None` without `tls_ca_file`. The error
/// names the file that cannot be read.
pub fn client_tls(
    config: &crate::config::AgentConfig,
) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    let Some(ca) = &config.tls_ca_file else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let ca_pem = read(ca)?;
    if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} is not a PEM certificate", ca.display()));
    }
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(Some(tls))
}
