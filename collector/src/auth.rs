//! Tokens: who may write and read what.
//!
//! A token is `dfy_<id>_<secret>`: `id` (12 hex digits) names it in listings and revocations, `secret` (64 hex
//! digits, 256 random bits) proves it. The collector keeps only the SHA-256 of the secret, in a JSON file
//! (`tokens_file`, by default `<data_dir>/tokens.json`, written atomically, readable by its owner only), which
//! `damselfly tokens create|list|revoke` edit and the collector re-reads when it changes.
//!
//! Roles, from least to most:
//!
//! - `agent`: writes (gRPC push and the write APIs) into exactly one namespace. The collector sets `ns_id` on every
//!   row it sends and refuses rows that claim another (see [`Principal::check_write`]).
//! - `read`: SQL (HTTP and the PostgreSQL port, where the password is the token) and the read-only API, limited
//!   to its namespaces if it has any: every table a query reads is filtered on `ns_id` inside the query plan, so
//!   rows of other namespaces (and rows with no namespace) never reach it.
//! - `write`: `read` plus writes, into its namespaces if it has any.
//! - `admin`: everything, including flushes, maintenance, benchmarks, shard maps and token-free endpoints'
//!   siblings.
//!
//! With `auth = false` (the default, for a collector on loopback) nobody is asked for a token.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Read,
    Write,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Result<Role, AuthError> {
        match text {
            "agent" => Ok(Role::Agent),
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            other => Err(AuthError::Invalid(format!(
                "unknown role {other:?}: one of agent, read, write, admin"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Write,
    Admin,
}

/// Why a token was refused, or a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token where one is needed.
    #[error(
        "this collector requires a token: send `Authorization: Bearer <token>` (gRPC: `authorization` metadata; PostgreSQL: the token as password)"
    )]
    Missing,
    /// Not a token this collector knows (malformed, unknown, revoked or wrong).
    #[error("invalid or revoked token")]
    Unknown,
    /// A genuine token past its expiry (said only to whoever holds the secret).
    #[error(
        "token {id} expired at {at}: create a new one (damselfly tokens create --expires-in ...)"
    )]
    Expired { id: String, at: String },
    /// A valid token without the right.
    #[error("{0}")]
    Forbidden(String),
    /// Bad arguments or a bad token file.
    #[error("{0}")]
    Invalid(String),
    #[error("token file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub fn unix_text(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || format!("{secs} s after 1970"),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

/// One stored token (the secret's hash, never the secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Namespaces the token is limited to; empty = all (not allowed for `agent`, which has exactly one).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// When the token stops working (seconds since the Unix epoch); `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub role: Role,
    /// Namespaces it is limited to; `None` = all.
    pub namespaces: Option<BTreeSet<String>>,
}

impl Principal {
    /// The principal of a collector without auth: may do everything.
    pub fn anyone() -> Principal {
        Principal {
            token_id: String::new(),
            role: Role::Admin,
            namespaces: None,
        }
    }

    /// Whether the role allows `need`.
    pub fn allows(&self, need: Need) -> Result<(), AuthError> {
        let ok = match need {
            Need::Read => matches!(self.role, Role::Read | Role::Write | Role::Admin),
            Need::Write => matches!(self.role, Role::Agent | Role::Write | Role::Admin),
            Need::Admin => self.role == Role::Admin,
        };
        if ok {
            Ok(())
        } else {
            let what = match need {
                Need::Read => "read",
                Need::Write => "write",
                Need::Admin => "use admin endpoints",
            };
            Err(AuthError::Forbidden(format!(
                "token {} has role {}, which may not {what}",
                self.token_id,
                self.role.name()
            )))
        }
    }

    /// For a write: may rows of namespace `ns` (`None`: the row has no `ns_id`) be stored? Returns the namespace
    /// to set on rows that have none (an `agent` token's own).
    pub fn check_write(&self, ns: Option<&str>) -> Result<Option<&str>, AuthError> {
        let Some(allowed) = &self.namespaces else {
            return Ok(None);
        };
        match ns {
            Some(ns) if allowed.contains(ns) => Ok(None),
            Some(ns) => Err(AuthError::Forbidden(format!(
                "token {} may not write namespace {ns:?} (it may write {})",
                self.token_id,
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            ))),
            // Rows without a namespace take the token's when it has exactly one.
            None if allowed.len() == 1 => Ok(allowed.iter().next().map(String::as_str)),
            None => Err(AuthError::Forbidden(format!(
                "token {} is limited to namespaces {}: each row must carry an ns_id tag",
                self.token_id,
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// The tokens, re-read from their file when it changes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tokens {
    path: PathBuf,
    cache: Arc<Mutex<Cached>>,
}

#[derive(Debug, Default)]
struct Cached {
    modified: Option<SystemTime>,
    len: u64,
    tokens: Vec<TokenRecord>,
}

impl Tokens {
    pub fn new(path: PathBuf) -> Tokens {
        Tokens {
            path,
            cache: Arc::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The principal a presented token stands for.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let (id, secret) = split_token(token).ok_or(AuthError::Unknown)?;
        let hash = sha256_hex(secret);
        let records = self.records()?;
        let record = records
            .iter()
            .find(|r| r.id == id && !r.revoked)
            .ok_or(AuthError::Unknown)?;
        if !damselfly_proto::auth::constant_time_eq(
            record.secret_sha256.as_bytes(),
            hash.as_bytes(),
        ) {
            return Err(AuthError::Unknown);
        }
        if let Some(expires) = record.expires_unix
            && crate::model::unix_ms_now() / 1000 >= expires
        {
            return Err(AuthError::Expired {
                id: record.id.clone(),
                at: unix_text(expires),
            });
        }
        Ok(Principal {
            token_id: record.id.clone(),
            role: record.role,
            namespaces: (!record.namespaces.is_empty())
                .then(|| record.namespaces.iter().cloned().collect()),
        })
    }

    /// The stored tokens, re-read if the file changed (a missing file: none).
    pub fn records(&self) -> Result<Vec<TokenRecord>, AuthError> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.file_error(e.to_string())),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (modified, len) = meta
            .as_ref()
            .map_or((None, 0), |m| (m.modified().ok(), m.len()));
        if cache.modified != modified || cache.len != len || (meta.is_some() && modified.is_none())
        {
            cache.tokens = match meta {
                None => Vec::new(),
                Some(_) => self.read_file()?.tokens,
            };
            cache.modified = modified;
            cache.len = len;
        }
        Ok(cache.tokens.clone())
    }

    fn read_file(&self) -> Result<TokenFile, AuthError> {
        let text =
            std::fs::read_to_string(&self.path).map_err(|e| self.file_error(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| self.file_error(e.to_string()))
    }

    fn file_error(&self, message: String) -> AuthError {
        AuthError::File {
            path: self.path.clone(),
            message,
        }
    }

    /// Creates a token; returns its record and the token itself (shown once: only its hash is kept).
    /// Creates a token (expiring at `expires_unix`, seconds since the epoch, if given) and returns it with its
    /// record; only the record is kept.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        namespaces: Vec<String>,
        expires_unix: Option<u64>,
    ) -> Result<(TokenRecord, String), AuthError> {
        if role == Role::Agent && namespaces.len() != 1 {
            return Err(AuthError::Invalid(
                "an agent token is bound to exactly one namespace: give --ns once".into(),
            ));
        }
        for ns in &namespaces {
            crate::model::check_tag("ns_id", ns).map_err(AuthError::Invalid)?;
            if ns.is_empty() {
                return Err(AuthError::Invalid("a namespace cannot be empty".into()));
            }
        }
        let mut file = self.load_for_edit()?;
        let mut rng = rand::rng();
        let id = loop {
            let mut bytes = [0u8; 6];
            rng.fill_bytes(&mut bytes);
            let id = hex(&bytes);
            if !file.tokens.iter().any(|t| t.id == id) {
                break id;
            }
        };
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let secret = hex(&secret);
        let record = TokenRecord {
            id: id.clone(),
            name: name.to_string(),
            role,
            namespaces,
            secret_sha256: sha256_hex(&secret),
            created_unix: crate::model::unix_ms_now() / 1000,
            expires_unix,
            revoked: false,
        };
        file.tokens.push(record.clone());
        self.save(&file)?;
        Ok((record, format!("dfy_{id}_{secret}")))
    }

    /// Revokes a token by id; false if there is no such (unrevoked) token.
    pub fn revoke(&self, id: &str) -> Result<bool, AuthError> {
        let mut file = self.load_for_edit()?;
        let Some(record) = file.tokens.iter_mut().find(|t| t.id == id && !t.revoked) else {
            return Ok(false);
        };
        record.revoked = true;
        self.save(&file)?;
        Ok(true)
    }

    fn load_for_edit(&self) -> Result<TokenFile, AuthError> {
        if self.path.exists() {
            self.read_file()
        } else {
            Ok(TokenFile::default())
        }
    }

    fn save(&self, file: &TokenFile) -> Result<(), AuthError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.file_error(e.to_string()))?;
        }
        let text = serde_json::to_vec_pretty(file).map_err(|e| self.file_error(e.to_string()))?;
        crate::fsutil::write_atomically(&self.path, &text)
            .map_err(|e| self.file_error(e.to_string()))?;
        restrict_permissions(&self.path).map_err(|e| self.file_error(e.to_string()))?;
        Ok(())
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// `dfy_<id>_<secret>` → (id, secret).
fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.trim().strip_prefix("dfy_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex_of = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_of(id, 12) && hex_of(secret, 64)).then_some((id, secret))
}

fn sha256_hex(text: &str) -> String {
    hex(Sha256::digest(text.as_bytes()).as_slice())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What an HTTP request needs: `None` for the open endpoints (`/health`, the web UI's static pages, which ask the
/// API with the user's token).
pub fn need_for(method: &str, path: &str) -> Option<Need> {
    let read_only = method == "GET" || method == "HEAD";
    if path == "/health"
        || (read_only && (path == "/" || path == "/ui" || path.starts_with("/ui/")))
    {
        return None;
    }
    if ["/api/v2/write", "/write", "/api/v1/write"].contains(&path) {
        return Some(Need::Write);
    }
    let admin = path.starts_with("/api/v1/admin/")
        || path.starts_with("/api/v1/cluster/")
        || (!read_only
            && (path.starts_with("/api/v1/shards")
                || path.starts_with("/api/v1/bench")
                || path.starts_with("/api/v1/scores")
                || path.starts_with("/api/v1/alerts")));
    Some(if admin { Need::Admin } else { Need::Read })
}

/// Endpoints a token limited to namespaces may use: SQL (filtered inside the query), the writes (checked row by
/// row), and those that show no tenant's data. The others (fleet lists, benchmark results, alerts, the
/// collector's own metrics) span namespaces and need an unlimited token.
pub fn open_to_limited(path: &str) -> bool {
    matches!(
        path,
        "/api/v1/sql"
            | "/api/v2/write"
            | "/write"
            | "/api/v1/write"
            | "/api/v1/placement"
            | "/api/v1/regions"
    ) || path.starts_with("/tumblebug/")
}

/// Applies `principal`'s namespaces to a batch before it is stored: refuses rows of a namespace it may not write
/// (rows with their own `ns_id` tag, or the batch's common one), and gives rows without one the token's namespace.
pub fn scope_batch(
    principal: &Principal,
    batch: &mut damselfly_proto::v1::WriteBatch,
) -> Result<(), AuthError> {
    use damselfly_proto::v1::Tag;
    if principal.namespaces.is_none() {
        return Ok(());
    }
    let common = batch
        .common_tags
        .iter()
        .find(|t| t.key == NS_TAG)
        .map(|t| t.value.clone());
    let mut unlabelled = false;
    let mut check = |ns: Option<&str>| -> Result<(), AuthError> {
        match ns.or(common.as_deref()) {
            Some(ns) => principal.check_write(Some(ns)).map(|_| ()),
            None => {
                unlabelled = true;
                Ok(())
            }
        }
    };
    for point in &batch.points {
        check(
            point
                .tags
                .iter()
                .find(|t| t.key == NS_TAG)
                .map(|t| t.value.as_str()),
        )?;
    }
    for chunk in &batch.chunks {
        match chunk.tag_keys.iter().position(|k| k == NS_TAG) {
            Some(j) => {
                for series in &chunk.series {
                    check(series.tag_values.get(j).map(String::as_str))?;
                }
            }
            None => check(None)?,
        }
    }
    if unlabelled {
        let own = principal
            .check_write(None)?
            .ok_or_else(|| AuthError::Forbidden("rows without ns_id".into()))?
            .to_string();
        batch.common_tags.push(Tag {
            key: NS_TAG.into(),
            value: own,
        });
    }
    Ok(())
}

/// The tag that names a row's namespace.
pub const NS_TAG: &str = "ns_id";

/// A tonic interceptor for one gRPC service: checks the `authorization` metadata (when auth is on) and puts the
/// [`Principal`] in the request's extensions. `need` = `None`: any valid token (the shard map, which every
/// client needs first); `unlimited`: tokens limited to namespaces are refused (services that span namespaces).
pub fn grpc_interceptor(
    tokens: Option<Tokens>,
    need: Option<Need>,
    unlimited: bool,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut request: tonic::Request<()>| {
        let principal = match &tokens {
            None => Principal::anyone(),
            Some(tokens) => {
                let token = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(token_from_authorization);
                let checked = token
                    .ok_or(AuthError::Missing)
                    .and_then(|t| tokens.authenticate(&t))
                    .and_then(|p| match need {
                        Some(need) => p.allows(need).map(|()| p),
                        None => Ok(p),
                    })
                    .and_then(|p| {
                        if unlimited && p.namespaces.is_some() {
                            Err(AuthError::Forbidden(format!(
                                "token {} is limited to namespaces; this service spans every namespace",
                                p.token_id
                            )))
                        } else {
                            Ok(p)
                        }
                    });
                match checked {
                    Ok(p) => p,
                    Err(e @ (AuthError::Missing | AuthError::Unknown)) => {
                        return Err(tonic::Status::unauthenticated(e.to_string()));
                    }
                    Err(e @ AuthError::Forbidden(_)) => {
                        return Err(tonic::Status::permission_denied(e.to_string()));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot check a token");
                        return Err(tonic::Status::internal(e.to_string()));
                    }
                }
            }
        };
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The token in an `Authorization` header value: `Bearer <token>`, or HTTP Basic with the token as password (what
/// Grafana's and other tools' "basic auth" send).
pub fn token_from_authorization(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64_decode(rest.trim())?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        return Some(password.to_string());
    }
    None
}

/// Standard base64 (with or without padding); `None` if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    if bytes.len() % 4 == 1 || text.len() > 4096 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..=n]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_created_hashed_authenticated_and_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = Tokens::new(dir.path().join("tokens.json"));
        let (record, token) = tokens
            .create("web readers", Role::Read, vec!["ns1".into()], None)
            .expect("create");
        let stored = std::fs::read_to_string(tokens.path()).expect("file");
        let secret = token.rsplit('_').next().expect("secret");
        assert!(!stored.contains(secret), "the secret itself is stored");
        assert!(stored.contains(&record.secret_sha256));
        let who = tokens.authenticate(&token).expect("valid");
        assert_eq!(who.role, Role::Read);
        assert_eq!(who.namespaces, Some(["ns1".to_string()].into()));
        assert!(who.allows(Need::Read).is_ok());
        assert!(who.allows(Need::Write).is_err());

        // Wrong secret, malformed, unknown id: all the same answer.
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('0') { '1' } else { '0' });
        for bad in [wrong.as_str(), "dfy_", "Bearer x", "dfy_000000000000_00"] {
            assert!(
                matches!(tokens.authenticate(bad), Err(AuthError::Unknown)),
                "{bad}"
            );
        }
        assert!(tokens.revoke(&record.id).expect("revoke"));
        assert!(!tokens.revoke(&record.id).expect("revoke twice"));
        assert!(matches!(
            tokens.authenticate(&token),
            Err(AuthError::Unknown)
        ));
    }

    #[test]
    fn expired_tokens_are_refused_saying_when() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = Tokens::new(dir.path().join("tokens.json"));
        let now = crate::model::unix_ms_now() / 1000;
        let (_, live) = tokens
            .create("later", Role::Read, vec![], Some(now + 3600))
            .expect("create");
        assert!(tokens.authenticate(&live).is_ok());
        let (record, expired) = tokens
            .create("gone", Role::Read, vec![], Some(1_700_000_000))
            .expect("create");
        let err = tokens.authenticate(&expired).expect_err("expired");
        assert!(
            matches!(&err, AuthError::Expired { id, .. } if *id == record.id),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("expired at 2023-11-14T22:13:20Z"),
            "{err}"
        );
        // Without the secret, an expired token is just unknown.
        let wrong = format!("dfy_{}_{}", record.id, "0".repeat(64));
        assert!(matches!(
            tokens.authenticate(&wrong),
            Err(AuthError::Unknown)
        ));
    }

    #[test]
    fn agent_tokens_bind_rows_to_their_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = Tokens::new(dir.path().join("tokens.json"));
        assert!(tokens.create("a", Role::Agent, vec![], None).is_err());
        let (_, token) = tokens
            .create("a", Role::Agent, vec!["ns1".into()], None)
            .expect("create");
        let agent = tokens.authenticate(&token).expect("valid");
        assert_eq!(agent.check_write(None).expect("own ns"), Some("ns1"));
        assert_eq!(agent.check_write(Some("ns1")).expect("same ns"), None);
        let err = agent.check_write(Some("ns2")).expect_err("other ns");
        assert!(err.to_string().contains("\"ns2\""), "{err}");
        assert!(agent.allows(Need::Read).is_err());
        assert!(Principal::anyone().check_write(Some("x")).is_ok());
    }

    #[test]
    fn authorization_headers() {
        assert_eq!(
            token_from_authorization("Bearer abc").as_deref(),
            Some("abc")
        );
        // "grafana:tok" in base64.
        assert_eq!(
            token_from_authorization("Basic Z3JhZmFuYTp0b2s=").as_deref(),
            Some("tok")
        );
        assert_eq!(token_from_authorization("Basic !!!"), None);
        assert_eq!(token_from_authorization("Digest x"), None);
    }
}
