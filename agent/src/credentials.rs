//! The agent's token on its gRPC calls: `authorization: Bearer <token>` metadata, for collectors with `auth` on.

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
