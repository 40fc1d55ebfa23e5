//! The PostgreSQL wire protocol (version 3.0), so `psql`, drivers and BI tools query the store unchanged.
//!
//! Written by hand rather than with a protocol crate: the server side needed here is small (startup with trust
//! authentication, the simple query protocol, the extended one with Parse/Bind/Describe/Execute/Sync/Close, and
//! the messages answering them) and this keeps OpenSSL and a second type system out of the build.
//!
//! Every statement runs through [`QueryEngine`] (read-only, under its timeout and memory limit). Parameters of
//! prepared statements are bound as typed values, never spliced into the SQL. A few statements clients send as
//! housekeeping (`SET`, `BEGIN`, `COMMIT`, ...) are acknowledged without effect, and the catalog queries `psql`
//! sends for `\dt` and `\d NAME` are answered from the store's tables and schemas ([`catalog`]); any other query
//! on `pg_catalog` that the engine cannot plan answers with no rows, which clients read as "nothing there".
//!
//! A malformed or oversized message is answered with an `ErrorResponse` (SQLSTATE 08P01 or 54000) and closes
//! that connection only. SSL and GSS encryption requests are declined (clients then continue in plain text);
//! cancel requests are ignored (the query timeout bounds every query).

mod catalog;
mod types;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::query::{QueryEngine, QueryError};

/// Most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 512;
/// The startup packet carries a few parameters; anything larger is not a client.
const MAX_STARTUP_BYTES: usize = 10_000;
/// The PostgreSQL version we answer as: clients adapt their catalog queries to it (`psql` 15 and later work).
const SERVER_VERSION: &str = "16.0 (Damselfly)";
/// How long a new connection has to complete its startup.
const STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Protocol 3.0.
const PROTOCOL_3: i32 = 196_608;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// Serves the PostgreSQL protocol on `listener` until `shutdown` completes; open connections are then closed.
/// `max_message_bytes` bounds one protocol message (a query's text and its parameters).
pub async fn serve(
    listener: TcpListener,
    engine: QueryEngine,
    max_message_bytes: usize,
    tokens: Option<crate::auth::Tokens>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, peer)) => {
                let engine = engine.clone();
                let tokens = tokens.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let _permit = permit;
                    // Small messages (ReadyForQuery, one-row answers) should not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let stream: Box<dyn Io> = match tls {
                        None => Box::new(stream),
                        Some(acceptor) => match secure(stream, &acceptor).await {
                            Ok(session) => session,
                            Err(e) => {
                                tracing::info!(%peer, error = %e, "pg connection refused");
                                return;
                            }
                        },
                    };
                    let mut connection = Connection::new(stream, engine, max_message_bytes);
                    connection.tokens = tokens;
                    match connection.run().await {
                        Ok(()) => tracing::debug!(%peer, "pg connection closed"),
                        Err(e) => tracing::info!(%peer, error = %e, "pg connection ended"),
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "pg accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// A connection's byte stream: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// On a port that requires TLS: answers the client's SSLRequest with `S` and runs the handshake (declining a
/// GSSENCRequest first, as libpq may send one). A client that starts in plaintext is told SSL is required
/// (SQLSTATE 28000) and the connection ends.
async fn secure(
    mut stream: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> Result<Box<dyn Io>, ConnError> {
    let negotiate = async {
        loop {
            let mut head = [0u8; 8];
            stream.read_exact(&mut head).await?;
            let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let code = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            match (len, code) {
                (8, SSL_REQUEST) => {
                    stream.write_all(b"S").await?;
                    let session = acceptor.accept(stream).await?;
                    return Ok::<Box<dyn Io>, ConnError>(Box::new(session));
                }
                (8, GSSENC_REQUEST) => stream.write_all(b"N").await?,
                _ => {
                    let mut out = Vec::new();
                    let refusal = PgError::new(
                        "28000",
                        "this server requires SSL: connect with sslmode=require (or verify-full with the CA)",
                    );
                    error_response(&mut out, "FATAL", &refusal);
                    stream.write_all(&out).await?;
                    return Err(ConnError::Protocol(
                        "a plaintext client on a TLS port".into(),
                    ));
                }
            }
        }
    };
    tokio::time::timeout(STARTUP_TIMEOUT, negotiate)
        .await
        .map_err(|_| ConnError::Protocol("no TLS handshake within the startup timeout".into()))?
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; it has been told why.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// An error to send as `ErrorResponse`.
#[derive(Debug, Clone)]
struct PgError {
    sqlstate: &'static str,
    message: String,
}

impl PgError {
    fn new(sqlstate: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            sqlstate,
            message: message.into(),
        }
    }

    fn protocol(message: impl Into<String>) -> PgError {
        PgError::new("08P01", message)
    }
}

impl From<QueryError> for PgError {
    fn from(e: QueryError) -> PgError {
        let sqlstate = match &e {
            QueryError::Invalid(m) => classify_invalid(m),
            QueryError::ResourcesExhausted(_) => "53200",
            QueryError::Timeout(_) => "57014",
            QueryError::TooManyRows(_) => "54000",
            QueryError::Internal(_) => "XX000",
        };
        PgError::new(sqlstate, e.to_string())
    }
}

/// SQLSTATE of a planning error, from DataFusion's message (it has no codes of its own).
fn classify_invalid(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("sql error") || m.contains("parsererror") || m.contains("syntax") {
        "42601"
    } else if m.contains("table") && m.contains("not found") {
        "42P01"
    } else if m.contains("no field named") || m.contains("column") && m.contains("not found") {
        "42703"
    } else if m.contains("not supported") || m.contains("not implemented") {
        "0A000"
    } else if m.contains("divide by zero") || m.contains("division by zero") {
        "22012"
    } else {
        "42000"
    }
}

/// What a statement produced.
#[derive(Debug, Clone)]
enum Answer {
    Rows {
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// A statement without rows, acknowledged with this command tag.
    Command(&'static str),
    /// An empty query string.
    Empty,
}

/// A parsed (prepared) statement.
#[derive(Debug)]
struct Statement {
    sql: String,
    /// Parameter types as the client declared them (0: unspecified).
    declared: Vec<i32>,
    /// The engine's view, filled on first Describe or Bind: parameter types and the result schema.
    described: Option<Described>,
}

#[derive(Debug, Clone)]
struct Described {
    params: Vec<Option<DataType>>,
    /// `None`: the statement returns no rows.
    schema: Option<SchemaRef>,
}

/// A bound statement, run on first Describe or Execute.
#[derive(Debug)]
struct Portal {
    sql: String,
    params: Vec<ScalarValue>,
    result_formats: Vec<i16>,
    answer: Option<Answer>,
    /// Rows already sent by Executes with a row limit.
    sent: usize,
}

struct Connection {
    reader: BufReader<ReadHalf<Box<dyn Io>>>,
    writer: WriteHalf<Box<dyn Io>>,
    out: Vec<u8>,
    engine: QueryEngine,
    max_message_bytes: usize,
    statements: HashMap<String, Statement>,
    portals: HashMap<String, Portal>,
    /// When set, the client must give a token as its password (see [`crate::auth`]).
    tokens: Option<crate::auth::Tokens>,
    /// The namespaces the client's token is limited to (`None`: all).
    namespaces: Option<std::collections::BTreeSet<String>>,
}

impl Connection {
    fn new(stream: Box<dyn Io>, engine: QueryEngine, max_message_bytes: usize) -> Connection {
        let (r, w) = tokio::io::split(stream);
        Connection {
            reader: BufReader::new(r),
            writer: w,
            out: Vec::with_capacity(8192),
            engine,
            max_message_bytes,
            statements: HashMap::new(),
            portals: HashMap::new(),
            tokens: None,
            namespaces: None,
        }
    }

    async fn run(mut self) -> Result<(), ConnError> {
        // A client that connects and never finishes the startup must not hold a connection slot forever.
        match tokio::time::timeout(STARTUP_TIMEOUT, self.startup()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ConnError::Protocol("no startup message within 30 s".into())),
        }
        // After an error in the extended protocol, messages up to the next Sync are skipped.
        let mut skipping = false;
        loop {
            let Some((tag, body)) = self.read_message().await? else {
                return Ok(());
            };
            if skipping && tag != b'S' {
                continue;
            }
            let result = match tag {
                b'Q' => {
                    self.simple_query(&body).await?;
                    continue;
                }
                b'P' => self.parse(&body).await,
                b'B' => self.bind(&body).await,
                b'D' => self.describe(&body).await,
                b'E' => self.execute(&body).await,
                b'C' => self.close(&body),
                b'S' => {
                    skipping = false;
                    self.ready();
                    self.flush().await?;
                    continue;
                }
                b'H' => {
                    self.flush().await?;
                    continue;
                }
                b'X' => return Ok(()),
                other => {
                    let message = format!("unsupported message type {:?}", char::from(other));
                    self.error(&PgError::protocol(&message));
                    self.flush().await?;
                    return Err(ConnError::Protocol(message));
                }
            };
            if let Err(e) = result {
                self.error(&e);
                skipping = true;
                // A malformed message means the stream can no longer be trusted.
                if e.sqlstate == "08P01" {
                    self.flush().await?;
                    return Err(ConnError::Protocol(e.message));
                }
            }
        }
    }

    /// Reads the startup packet (declining SSL), accepts any user (trust) and sends the session parameters.
    /// False when the client only sent a cancel request.
    async fn startup(&mut self) -> Result<bool, ConnError> {
        loop {
            let len = self.reader.read_i32().await?;
            let Some(len) = usize::try_from(len)
                .ok()
                .filter(|l| (8..=MAX_STARTUP_BYTES).contains(l))
            else {
                return self.fatal(format!("bad startup packet length {len}")).await;
            };
            let mut body = vec![0; len - 4];
            self.reader.read_exact(&mut body).await?;
            let mut r = Reader::new(&body);
            let code = r.i32().map_err(|e| ConnError::Protocol(e.message))?;
            match code {
                SSL_REQUEST | GSSENC_REQUEST => {
                    self.writer.write_all(b"N").await?;
                }
                CANCEL_REQUEST => return Ok(false),
                // Any 3.x: newer minor versions only add optional features, and we answer as 3.0.
                v if v >> 16 == 3 => {
                    let mut params = HashMap::new();
                    while let Ok(key) = r.cstr() {
                        if key.is_empty() {
                            break;
                        }
                        let value = r.cstr().unwrap_or_default();
                        params.insert(key, value);
                    }
                    if v != PROTOCOL_3 {
                        // NegotiateProtocolVersion: we speak 3.0 and know no `_pq_.` options.
                        message(&mut self.out, b'v', |b| {
                            b.extend(PROTOCOL_3.to_be_bytes());
                            b.extend(0i32.to_be_bytes());
                        });
                    }
                    tracing::debug!(user = ?params.get("user"), database = ?params.get("database"), "pg startup");
                    if self.tokens.is_some() && !self.password().await? {
                        return Ok(false);
                    }
                    message(&mut self.out, b'R', |b| b.extend(0i32.to_be_bytes()));
                    let application = params.get("application_name").cloned().unwrap_or_default();
                    for (k, v) in [
                        ("server_version", SERVER_VERSION),
                        ("server_encoding", "UTF8"),
                        ("client_encoding", "UTF8"),
                        ("DateStyle", "ISO, MDY"),
                        ("TimeZone", "UTC"),
                        ("integer_datetimes", "on"),
                        ("standard_conforming_strings", "on"),
                        ("IntervalStyle", "postgres"),
                        ("is_superuser", "off"),
                        ("application_name", application.as_str()),
                    ] {
                        message(&mut self.out, b'S', |b| {
                            cstr(b, k);
                            cstr(b, v);
                        });
                    }
                    message(&mut self.out, b'K', |b| {
                        b.extend(std::process::id().to_be_bytes());
                        b.extend(rand_key().to_be_bytes());
                    });
                    self.ready();
                    self.flush().await?;
                    return Ok(true);
                }
                other => {
                    return self
                        .fatal(format!("unsupported frontend protocol {other:#x}"))
                        .await;
                }
            }
        }
    }

    /// Asks for the password (AuthenticationCleartextPassword; the token is the password) and checks it: a reader
    /// may connect, with its namespaces applied to every query. False (after a FATAL 28P01) when refused.
    async fn password(&mut self) -> Result<bool, ConnError> {
        message(&mut self.out, b'R', |b| b.extend(3i32.to_be_bytes()));
        self.flush().await?;
        let Some((tag, body)) = self.read_message().await? else {
            return Ok(false);
        };
        if tag != b'p' {
            return self
                .fatal(format!(
                    "expected a password message, got {:?}",
                    char::from(tag)
                ))
                .await;
        }
        let password = Reader::new(&body).cstr().unwrap_or_default();
        let checked = self
            .tokens
            .as_ref()
            .ok_or(crate::auth::AuthError::Missing)
            .and_then(|t| t.authenticate(&password))
            .and_then(|p| p.allows(crate::auth::Need::Read).map(|()| p));
        match checked {
            Ok(principal) => {
                self.namespaces = principal.namespaces;
                Ok(true)
            }
            Err(e) => {
                let message = match e {
                    crate::auth::AuthError::Forbidden(m) => m,
                    expired @ crate::auth::AuthError::Expired { .. } => {
                        format!("password authentication failed: {expired}")
                    }
                    _ => {
                        "password authentication failed: the password must be a valid token".into()
                    }
                };
                self.error(&PgError::new("28P01", message));
                self.flush().await?;
                Ok(false)
            }
        }
    }

    /// Sends a protocol error and ends the connection.
    async fn fatal<T>(&mut self, message: String) -> Result<T, ConnError> {
        self.error(&PgError::protocol(&message));
        self.flush().await?;
        Err(ConnError::Protocol(message))
    }

    /// One message: `None` at a clean end of stream.
    async fn read_message(&mut self) -> Result<Option<(u8, Vec<u8>)>, ConnError> {
        let tag = match self.reader.read_u8().await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = self.reader.read_i32().await?;
        let body_len = usize::try_from(len).ok().and_then(|l| l.checked_sub(4));
        let Some(body_len) = body_len else {
            return self.fatal(format!("bad message length {len}")).await;
        };
        if body_len > self.max_message_bytes {
            let message = format!(
                "message of {body_len} bytes is larger than the limit of {} bytes (max_sql_bytes)",
                self.max_message_bytes
            );
            self.error(&PgError::new("54000", &message));
            self.flush().await?;
            return Err(ConnError::Protocol(message));
        }
        // Grows as bytes arrive: a client announcing a large message and sending nothing holds no memory.
        let mut body = Vec::with_capacity(body_len.min(64 * 1024));
        (&mut self.reader)
            .take(body_len as u64)
            .read_to_end(&mut body)
            .await?;
        if body.len() < body_len {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        Ok(Some((tag, body)))
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    fn ready(&mut self) {
        message(&mut self.out, b'Z', |b| b.push(b'I'));
    }

    fn error(&mut self, e: &PgError) {
        tracing::debug!(sqlstate = e.sqlstate, message = %e.message, "pg error");
        error_response(&mut self.out, "ERROR", e);
    }

    async fn simple_query(&mut self, body: &[u8]) -> Result<(), ConnError> {
        let sql = match Reader::new(body).cstr() {
            Ok(s) => s,
            Err(e) => return self.fatal(e.message).await,
        };
        // Several statements run in order; the first error ends the query string, as in PostgreSQL.
        for statement in split_statements(&sql) {
            let sent = match self.answer(&statement, Vec::new()).await {
                Ok(answer) => self.send_answer(&answer, &[], true),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                self.error(&e);
                break;
            }
        }
        self.ready();
        self.flush().await
    }

    /// Runs one statement: housekeeping, a known catalog query, or SQL for the engine.
    async fn answer(&self, sql: &str, params: Vec<ScalarValue>) -> Result<Answer, PgError> {
        let trimmed = sql.trim().trim_end_matches(';').trim();
        if trimmed.is_empty() {
            return Ok(Answer::Empty);
        }
        if let Some(tag) = housekeeping(trimmed) {
            return Ok(Answer::Command(tag));
        }
        if let Some(answer) = show(trimmed) {
            return answer;
        }
        if let Some(answer) = catalog::answer(&self.engine, trimmed).await {
            return answer;
        }
        match self
            .engine
            .sql_scoped(trimmed, params, self.namespaces.as_ref())
            .await
        {
            Ok(result) => Ok(Answer::Rows {
                schema: result.schema,
                batches: result.batches,
            }),
            Err(QueryError::Invalid(m)) if catalog::mentions_catalog(trimmed) => {
                tracing::debug!(sql = trimmed, error = %m, "unsupported catalog query answered with no rows");
                Ok(catalog::empty())
            }
            Err(e) => {
                self.engine.count_error(&e);
                Err(e.into())
            }
        }
    }

    /// RowDescription (when `describe`), the rows, and CommandComplete.
    fn send_answer(
        &mut self,
        answer: &Answer,
        formats: &[i16],
        describe: bool,
    ) -> Result<(), PgError> {
        match answer {
            Answer::Empty => message(&mut self.out, b'I', |_| {}),
            Answer::Command(tag) => message(&mut self.out, b'C', |b| cstr(b, tag)),
            Answer::Rows { schema, batches } => {
                let formats = result_formats(formats, schema.fields().len())?;
                if describe {
                    types::row_description(&mut self.out, schema, &formats);
                }
                let mut rows = 0usize;
                for batch in batches {
                    types::data_rows(&mut self.out, batch, &formats)?;
                    rows += batch.num_rows();
                }
                message(&mut self.out, b'C', |b| cstr(b, &format!("SELECT {rows}")));
            }
        }
        Ok(())
    }

    async fn parse(&mut self, body: &[u8]) -> Result<(), PgError> {
        let mut r = Reader::new(body);
        let name = r.cstr()?;
        let sql = r.cstr()?;
        let count = r.count()?;
        let declared = (0..count).map(|_| r.i32()).collect::<Result<Vec<_>, _>>()?;
        self.statements.insert(
            name,
            Statement {
                sql,
                declared,
                described: None,
            },
        );
        message(&mut self.out, b'1', |_| {});
        Ok(())
    }

    /// The engine's parameter types and result schema of a statement (cached).
    async fn described(&mut self, name: &str) -> Result<Described, PgError> {
        let statement = self.statements.get(name).ok_or_else(|| {
            PgError::new(
                "26000",
                format!("prepared statement {name:?} does not exist"),
            )
        })?;
        if let Some(d) = &statement.described {
            return Ok(d.clone());
        }
        let sql = statement.sql.clone();
        let trimmed = sql.trim().trim_end_matches(';').trim();
        let described = if let Some(Ok(Answer::Rows { schema, .. })) = show(trimmed) {
            Described {
                params: Vec::new(),
                schema: Some(schema),
            }
        } else if trimmed.is_empty() || housekeeping(trimmed).is_some() {
            Described {
                params: Vec::new(),
                schema: None,
            }
        } else if let Some(answer) = catalog::answer(&self.engine, trimmed).await {
            Described {
                params: Vec::new(),
                schema: match answer? {
                    Answer::Rows { schema, .. } => Some(schema),
                    _ => None,
                },
            }
        } else {
            match self.engine.describe(trimmed).await {
                Ok((params, schema)) => Described {
                    params,
                    schema: Some(schema),
                },
                Err(QueryError::Invalid(_)) if catalog::mentions_catalog(trimmed) => Described {
                    params: Vec::new(),
                    schema: match catalog::empty() {
                        Answer::Rows { schema, .. } => Some(schema),
                        _ => None,
                    },
                },
                Err(e) => {
                    self.engine.count_error(&e);
                    return Err(e.into());
                }
            }
        };
        if let Some(s) = self.statements.get_mut(name) {
            s.described = Some(described.clone());
        }
        Ok(described)
    }

    /// Parameter type OIDs of a statement: the client's where given, else the engine's, else text.
    fn param_oids(statement: &Statement, described: &Described) -> Vec<i32> {
        let n = statement.declared.len().max(described.params.len());
        (0..n)
            .map(|i| match statement.declared.get(i) {
                Some(&oid) if oid != 0 => oid,
                _ => described
                    .params
                    .get(i)
                    .and_then(Option::as_ref)
                    .map_or(types::TEXT, types::oid),
            })
            .collect()
    }

    async fn bind(&mut self, body: &[u8]) -> Result<(), PgError> {
        let mut r = Reader::new(body);
        let portal = r.cstr()?;
        let name = r.cstr()?;
        let format_count = r.count()?;
        let formats = (0..format_count)
            .map(|_| r.i16())
            .collect::<Result<Vec<_>, _>>()?;
        let value_count = r.count()?;
        let mut values = Vec::with_capacity(value_count);
        for _ in 0..value_count {
            let len = r.i32()?;
            values.push(if len < 0 {
                None
            } else {
                Some(r.bytes(usize::try_from(len).unwrap_or(0))?.to_vec())
            });
        }
        let result_count = r.count()?;
        let wanted_formats = (0..result_count)
            .map(|_| r.i16())
            .collect::<Result<Vec<_>, _>>()?;

        let described = self.described(&name).await?;
        let statement = self.statements.get(&name).ok_or_else(|| {
            PgError::new(
                "26000",
                format!("prepared statement {name:?} does not exist"),
            )
        })?;
        let oids = Self::param_oids(statement, &described);
        if values.len() != oids.len() {
            return Err(PgError::protocol(format!(
                "bind message supplies {} parameters, but prepared statement {name:?} requires {}",
                values.len(),
                oids.len()
            )));
        }
        let param_formats = result_formats(&formats, values.len())?;
        let mut params = Vec::with_capacity(values.len());
        for (i, value) in values.iter().enumerate() {
            let target = described.params.get(i).and_then(Option::as_ref);
            params.push(types::decode_param(
                value.as_deref(),
                oids[i],
                param_formats[i] == 1,
                target,
            )?);
        }
        let sql = statement.sql.clone();
        self.portals.insert(
            portal,
            Portal {
                sql,
                params,
                result_formats: wanted_formats,
                answer: None,
                sent: 0,
            },
        );
        message(&mut self.out, b'2', |_| {});
        Ok(())
    }

    async fn describe(&mut self, body: &[u8]) -> Result<(), PgError> {
        let mut r = Reader::new(body);
        let kind = r.u8()?;
        let name = r.cstr()?;
        match kind {
            b'S' => {
                let described = self.described(&name).await?;
                let oids = match self.statements.get(&name) {
                    Some(s) => Self::param_oids(s, &described),
                    None => Vec::new(),
                };
                message(&mut self.out, b't', |b| {
                    b.extend(i16::try_from(oids.len()).unwrap_or(i16::MAX).to_be_bytes());
                    for oid in &oids {
                        b.extend(oid.to_be_bytes());
                    }
                });
                match &described.schema {
                    Some(schema) => {
                        // Formats are not known before Bind: describe as text.
                        let formats = vec![0; schema.fields().len()];
                        types::row_description(&mut self.out, schema, &formats);
                    }
                    None => message(&mut self.out, b'n', |_| {}),
                }
            }
            b'P' => {
                let answer = self.portal_answer(&name).await?;
                match &answer {
                    Answer::Rows { schema, .. } => {
                        let formats = self
                            .portals
                            .get(&name)
                            .map(|p| p.result_formats.clone())
                            .unwrap_or_default();
                        let formats = result_formats(&formats, schema.fields().len())?;
                        types::row_description(&mut self.out, schema, &formats);
                    }
                    _ => message(&mut self.out, b'n', |_| {}),
                }
            }
            other => {
                return Err(PgError::protocol(format!(
                    "invalid describe target {:?}",
                    char::from(other)
                )));
            }
        }
        Ok(())
    }

    /// Runs a portal's statement once; Describe and Execute share the result.
    async fn portal_answer(&mut self, name: &str) -> Result<Answer, PgError> {
        let portal = self
            .portals
            .get_mut(name)
            .ok_or_else(|| PgError::new("34000", format!("portal {name:?} does not exist")))?;
        if let Some(answer) = &portal.answer {
            return Ok(answer.clone());
        }
        let sql = portal.sql.clone();
        let params = std::mem::take(&mut portal.params);
        let answer = self.answer(&sql, params).await?;
        if let Some(portal) = self.portals.get_mut(name) {
            portal.answer = Some(answer.clone());
        }
        Ok(answer)
    }

    async fn execute(&mut self, body: &[u8]) -> Result<(), PgError> {
        let mut r = Reader::new(body);
        let name = r.cstr()?;
        // 0 (or negative): all rows; else at most this many, then PortalSuspended until the next Execute.
        let max_rows = r.i32()?;
        let answer = self.portal_answer(&name).await?;
        let (formats, sent) = self
            .portals
            .get(&name)
            .map(|p| (p.result_formats.clone(), p.sent))
            .unwrap_or_default();
        let Answer::Rows { schema, batches } = &answer else {
            return self.send_answer(&answer, &formats, false);
        };
        let formats = result_formats(&formats, schema.fields().len())?;
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let limit = usize::try_from(max_rows)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(usize::MAX);
        let end = sent.saturating_add(limit).min(total);
        // Send rows [sent, end): the overlapping part of each batch.
        let mut start = 0;
        for batch in batches {
            let rows = batch.num_rows();
            let from = sent.max(start);
            let to = end.min(start + rows);
            if from < to {
                types::data_rows(
                    &mut self.out,
                    &batch.slice(from - start, to - from),
                    &formats,
                )?;
            }
            start += rows;
        }
        if let Some(p) = self.portals.get_mut(&name) {
            p.sent = end;
        }
        if end < total {
            message(&mut self.out, b's', |_| {});
        } else {
            let count = end.saturating_sub(sent);
            message(&mut self.out, b'C', |b| cstr(b, &format!("SELECT {count}")));
        }
        Ok(())
    }

    fn close(&mut self, body: &[u8]) -> Result<(), PgError> {
        let mut r = Reader::new(body);
        let kind = r.u8()?;
        let name = r.cstr()?;
        match kind {
            b'S' => {
                self.statements.remove(&name);
            }
            b'P' => {
                self.portals.remove(&name);
            }
            other => {
                return Err(PgError::protocol(format!(
                    "invalid close target {:?}",
                    char::from(other)
                )));
            }
        }
        message(&mut self.out, b'3', |_| {});
        Ok(())
    }
}

/// Statements clients send to set up a session or a transaction: acknowledged, without effect (queries are
/// read-only and every session runs in UTC).
fn housekeeping(sql: &str) -> Option<&'static str> {
    let first = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    Some(match first.as_str() {
        "set" => "SET",
        "reset" => "RESET",
        "begin" | "start" => "BEGIN",
        "commit" | "end" => "COMMIT",
        "rollback" | "abort" => "ROLLBACK",
        "discard" => "DISCARD ALL",
        "deallocate" => "DEALLOCATE",
        "unlisten" => "UNLISTEN",
        _ => return None,
    })
}

/// The statements of a simple query string. Only a string with more than one statement is split (by DataFusion's
/// parser, each re-rendered as SQL); any other, including one the parser cannot read, runs as sent, so catalog
/// queries keep their exact text and errors come from the engine.
fn split_statements(sql: &str) -> Vec<String> {
    let trimmed = sql.trim().trim_end_matches(';').trim();
    if trimmed.is_empty() {
        return vec![String::new()];
    }
    if trimmed.contains(';')
        && let Ok(statements) = datafusion::sql::parser::DFParser::parse_sql(trimmed)
        && statements.len() > 1
    {
        return statements.iter().map(ToString::to_string).collect();
    }
    vec![trimmed.to_owned()]
}

/// `SHOW name` for the session parameters clients ask about (the values of the startup's ParameterStatus), and
/// the session functions client libraries call on connect (`SELECT pg_catalog.version()`, `current_schema()`, ...:
/// SQLAlchemy reads the server version from the first).
fn show(sql: &str) -> Option<Result<Answer, PgError>> {
    let normalized = sql
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let function = normalized
        .strip_prefix("select ")
        .map(|f| f.strip_prefix("pg_catalog.").unwrap_or(f));
    let (name, value) = match function {
        Some("version()") => (
            "version",
            format!("PostgreSQL {SERVER_VERSION}, compatible; Damselfly on DataFusion"),
        ),
        Some("current_schema()" | "current_schema") => ("current_schema", "public".to_owned()),
        Some("current_database()") => ("current_database", "damselfly".to_owned()),
        Some("current_user" | "session_user" | "user") => ("current_user", "damselfly".to_owned()),
        _ => return show_parameter(sql),
    };
    Some(one_text_value(name.to_owned(), &value))
}

fn show_parameter(sql: &str) -> Option<Result<Answer, PgError>> {
    let mut words = sql.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("show") {
        return None;
    }
    let name = words.next()?.to_ascii_lowercase();
    if words.next().is_some() {
        return None;
    }
    let value = match name.as_str() {
        "server_version" => SERVER_VERSION,
        "server_encoding" | "client_encoding" => "UTF8",
        "datestyle" => "ISO, MDY",
        "timezone" => "UTC",
        "integer_datetimes" | "standard_conforming_strings" => "on",
        "transaction_isolation" | "default_transaction_isolation" => "read committed",
        "transaction_read_only" | "default_transaction_read_only" => "on",
        "search_path" => "public",
        "max_identifier_length" => "63",
        _ => return None,
    };
    Some(one_text_value(name, value))
}

/// A one-row, one-column text answer.
fn one_text_value(name: String, value: &str) -> Result<Answer, PgError> {
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new(name, DataType::Utf8, false),
    ]));
    let column = Arc::new(arrow::array::StringArray::from(vec![value])) as arrow::array::ArrayRef;
    RecordBatch::try_new(schema.clone(), vec![column])
        .map(|batch| Answer::Rows {
            schema,
            batches: vec![batch],
        })
        .map_err(|e| PgError::new("XX000", e.to_string()))
}

/// Expands the format codes of a Bind (none: all text; one: all alike; else one per column).
fn result_formats(formats: &[i16], columns: usize) -> Result<Vec<i16>, PgError> {
    let expanded = match formats.len() {
        0 => vec![0; columns],
        1 => vec![formats[0]; columns],
        n if n == columns => formats.to_vec(),
        n => {
            return Err(PgError::protocol(format!(
                "{n} format codes given for {columns} columns"
            )));
        }
    };
    if expanded.iter().any(|f| *f != 0 && *f != 1) {
        return Err(PgError::protocol(
            "format codes must be 0 (text) or 1 (binary)",
        ));
    }
    Ok(expanded)
}

/// Appends one backend message: tag, length, body.
/// An ErrorResponse of `severity` (ERROR, or FATAL when the connection ends).
fn error_response(out: &mut Vec<u8>, severity: &str, e: &PgError) {
    message(out, b'E', |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', e.sqlstate),
            (b'M', e.message.as_str()),
        ] {
            b.push(field);
            cstr(b, value);
        }
        b.push(0);
    });
}

fn message(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    let start = out.len();
    out.extend([0; 4]);
    body(out);
    let len = i32::try_from(out.len() - start).unwrap_or(i32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    // A NUL inside would end the string early on the client: drop it.
    out.extend(s.bytes().filter(|b| *b != 0));
    out.push(0);
}

/// The secret of BackendKeyData; unused since cancel requests are ignored, but clients expect one.
fn rand_key() -> i32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    i32::from_ne_bytes(nanos.to_ne_bytes())
}

/// Reads the fields of one frontend message; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], PgError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| PgError::protocol("message ends early"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PgError> {
        Ok(self.bytes(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, PgError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, PgError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count (of parameters, formats): never negative.
    fn count(&mut self) -> Result<usize, PgError> {
        usize::try_from(self.i16()?).map_err(|_| PgError::protocol("negative count"))
    }

    fn cstr(&mut self) -> Result<String, PgError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| PgError::protocol("string without terminator"))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| PgError::protocol("string is not UTF-8"))?
            .to_owned();
        self.pos += end + 1;
        Ok(s)
    }
}
