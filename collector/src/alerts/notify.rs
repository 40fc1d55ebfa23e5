//! Notifications: webhooks (a JSON body), Slack-compatible webhooks (`{"text": ...}`) and email over SMTP.
//!
//! Each receiver has its own bounded queue and its own task, so a slow or dead receiver delays neither ingest,
//! nor the evaluation, nor the other receivers: evaluation only `try_send`s (a full queue drops the notification
//! and counts it). The task delivers in order, retrying failures (connection errors, timeouts, `5xx`, `408`,
//! `429`, SMTP `4xx` replies) with exponential backoff (the forwarder's, [`crate::forward::backoff`]) up to
//! `max_attempts`; an answer that will never succeed (another `4xx`, SMTP `5xx`) is dropped at once. Delivery is
//! at most once across restarts: the queues are in memory.
//!
//! SMTP is spoken here over a plain TCP connection (EHLO, MAIL FROM, RCPT TO, DATA, QUIT): enough for a local
//! relay (Postfix on 127.0.0.1, a smarthost on a trusted network). STARTTLS and authentication are not
//! supported; see docs/ALERTING.md.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::rules::RuleError;

/// How a receiver is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiverKind {
    /// `POST` of the [`Notification`] as JSON.
    Webhook,
    /// `POST` of `{"text": "..."}` (Slack incoming webhooks, Mattermost, Rocket.Chat, ...).
    Slack,
    /// An email through an SMTP server.
    Email,
}

/// A receiver (`[[receivers]]` in the rules file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// The name rules route to.
    pub name: String,
    pub kind: ReceiverKind,
    /// Webhook and Slack: the URL to post to (http or https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Webhook and Slack: PEM CA certificate(s) trusted for an https `url` besides the system's roots (an
    /// internal endpoint with a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Email: the SMTP server, `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp_addr: Option<String>,
    /// Email: the sender address. Default `damselfly@localhost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Email: the recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// One attempt (connect, send, answer) may take this long (milliseconds). Default 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn check_address(addr: &str) -> bool {
    let Some((local, domain)) = addr.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && addr.len() <= 254
        && !addr
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | ','))
}

impl ReceiverConfig {
    fn invalid(&self, field: &'static str, message: impl Into<String>) -> RuleError {
        RuleError::Invalid {
            rule: format!("receiver {}", self.name),
            field,
            message: message.into(),
        }
    }

    /// Checks the fields of its kind.
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.name.is_empty()
            || self.name.len() > 128
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(self.invalid("name", "must be 1-128 characters of [A-Za-z0-9_.-]"));
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            return Err(self.invalid("timeout_ms", "must be between 100 and 120000"));
        }
        match self.kind {
            ReceiverKind::Webhook | ReceiverKind::Slack => {
                let Some(url) = &self.url else {
                    return Err(self.invalid("url", "missing: the URL to post to"));
                };
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| self.invalid("url", format!("{url:?}: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                    return Err(
                        self.invalid("url", format!("{url:?} must be an http or https URL"))
                    );
                }
                if self.smtp_addr.is_some() || !self.to.is_empty() || self.from.is_some() {
                    return Err(self.invalid(
                        "smtp_addr",
                        "smtp_addr, from and to are for email receivers",
                    ));
                }
                self.http_client().map_err(|e| self.invalid("ca_file", e))?;
            }
            ReceiverKind::Email => {
                let Some(addr) = &self.smtp_addr else {
                    return Err(self.invalid("smtp_addr", "missing: the SMTP server as host:port"));
                };
                if addr
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                {
                    return Err(self.invalid("smtp_addr", format!("{addr:?} must be host:port")));
                }
                if self.to.is_empty() {
                    return Err(self.invalid("to", "missing: at least one recipient"));
                }
                for a in self.to.iter().chain(self.from.iter()) {
                    if !check_address(a) {
                        return Err(self.invalid("to", format!("{a:?} is not an email address")));
                    }
                }
                if self.url.is_some() || self.ca_file.is_some() {
                    return Err(self.invalid(
                        "url",
                        "an email receiver takes smtp_addr, not url or ca_file",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The client a webhook or Slack receiver posts with: no proxy, the system's roots plus `ca_file`.
    fn http_client(&self) -> Result<reqwest::Client, String> {
        let builder = reqwest::Client::builder().no_proxy();
        let builder = match &self.ca_file {
            Some(ca) => crate::tls::trust_ca_file(builder, ca)?,
            None => builder,
        };
        builder
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))
    }
}

/// What a receiver is told: the body of a webhook, and what Slack texts and emails are written from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// `firing` or `resolved`.
    pub status: String,
    pub rule: String,
    /// The severity firing (or, when resolved, the last one that fired).
    pub severity: String,
    /// The severity before, when a firing alert changed severity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_severity: Option<String>,
    /// The alert's group: its tag values.
    pub group: BTreeMap<String, String>,
    pub group_key: String,
    /// The value that caused this (absent when the group has no data any more).
    pub value: Option<f64>,
    /// The threshold of `severity`.
    pub threshold: Option<f64>,
    /// The rule's expression (`silent_secs` for absence rules) and comparison, for the text.
    pub condition: String,
    pub op: String,
    pub summary: String,
    /// When the alert started firing, and when this happened (RFC 3339, UTC).
    pub starts_at: String,
    pub at: String,
    /// A reminder of a firing alert (`repeat_interval`), not a change.
    pub repeat: bool,
}

impl Notification {
    /// One line for Slack and email subjects: `[FIRING critical] cpu_high vm_id=vm1: avg(usage_user) = 95.5 (> 90)`.
    pub fn text(&self) -> String {
        let group = if self.group_key.is_empty() {
            String::new()
        } else {
            format!(" {}", self.group_key)
        };
        let value = self
            .value
            .map_or_else(|| "no data".to_owned(), |v| format!("{v}"));
        let threshold = self
            .threshold
            .map(|t| format!(" ({} {t})", self.op))
            .unwrap_or_default();
        let mut text = format!(
            "[{} {}] {}{}: {} = {}{}",
            self.status.to_uppercase(),
            self.severity,
            self.rule,
            group,
            self.condition,
            value,
            threshold
        );
        if !self.summary.is_empty() {
            text.push_str(" — ");
            text.push_str(&self.summary);
        }
        text
    }
}

/// Delivery settings shared by every receiver.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub queue_capacity: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_attempts: u32,
}

/// Counters of one receiver (`GET /api/v1/alerts/receivers`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReceiverStatus {
    pub name: String,
    pub kind: Option<ReceiverKind>,
    /// Notifications delivered.
    pub sent: u64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: u64,
    /// Notifications given up on: refused by the receiver, out of attempts, or the queue was full.
    pub dropped: u64,
    /// Waiting in the queue (including the one being delivered).
    pub queued: u64,
    pub last_error: Option<String>,
    pub last_success_unix_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    failed_attempts: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicU64,
    last: Mutex<(Option<String>, Option<u64>)>,
}

#[derive(Debug)]
struct Receiver {
    config: ReceiverConfig,
    queue: mpsc::Sender<Notification>,
    counters: Arc<Counters>,
}

/// The receivers, their queues and tasks. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    receivers: Arc<BTreeMap<String, Receiver>>,
}

/// A delivery attempt's failure: worth retrying or not.
enum Failure {
    Retry(String),
    Permanent(String),
}

impl Notifier {
    /// Starts one task per receiver; they stop when `stop` turns true (dropping what is queued).
    pub fn start(
        configs: &[ReceiverConfig],
        delivery: Delivery,
        stop: watch::Receiver<bool>,
    ) -> Notifier {
        let mut receivers = BTreeMap::new();
        for config in configs {
            let (tx, rx) = mpsc::channel(delivery.queue_capacity.max(1));
            let counters = Arc::new(Counters::default());
            tokio::spawn(run_receiver(
                config.clone(),
                config.http_client(),
                delivery,
                rx,
                counters.clone(),
                stop.clone(),
            ));
            receivers.insert(
                config.name.clone(),
                Receiver {
                    config: config.clone(),
                    queue: tx,
                    counters,
                },
            );
        }
        Notifier {
            receivers: Arc::new(receivers),
        }
    }

    /// The configured receiver names.
    pub fn names(&self) -> std::collections::HashSet<String> {
        self.receivers.keys().cloned().collect()
    }

    /// Queues `notification` for `receiver` without waiting; a full queue drops it (counted).
    pub fn send(&self, receiver: &str, notification: Notification) {
        let Some(r) = self.receivers.get(receiver) else {
            return;
        };
        r.counters.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r.queue.try_send(notification) {
            r.counters.queued.fetch_sub(1, Ordering::Relaxed);
            r.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(receiver, "alert notification dropped: {e}");
        }
    }

    /// Every receiver's counters, by name.
    pub fn status(&self) -> Vec<ReceiverStatus> {
        self.receivers
            .values()
            .map(|r| {
                let c = &r.counters;
                let last = c.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
                ReceiverStatus {
                    name: r.config.name.clone(),
                    kind: Some(r.config.kind),
                    sent: c.sent.load(Ordering::Relaxed),
                    failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
                    dropped: c.dropped.load(Ordering::Relaxed),
                    queued: c.queued.load(Ordering::Relaxed),
                    last_error: last.0,
                    last_success_unix_ms: last.1,
                }
            })
            .collect()
    }
}

async fn run_receiver(
    config: ReceiverConfig,
    client: Result<reqwest::Client, String>,
    delivery: Delivery,
    mut queue: mpsc::Receiver<Notification>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let notification = tokio::select! {
            n = queue.recv() => match n { Some(n) => n, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let timeout = Duration::from_millis(config.timeout_ms);
            let result = match tokio::time::timeout(
                timeout,
                deliver(&config, client.as_ref(), &notification),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(Failure::Retry(format!("no answer within {timeout:?}"))),
            };
            let set_last = |error: Option<String>, success: Option<u64>| {
                let mut last = counters.last.lock().unwrap_or_else(|p| p.into_inner());
                if error.is_some() {
                    last.0 = error;
                }
                if success.is_some() {
                    last.1 = success;
                }
            };
            match result {
                Ok(()) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    set_last(None, Some(crate::model::unix_ms_now()));
                    break;
                }
                Err(Failure::Permanent(message)) => {
                    counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(receiver = %config.name, "alert notification refused, dropped: {message}");
                    set_last(Some(message), None);
                    break;
                }
                Err(Failure::Retry(message)) => {
                    counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    set_last(Some(message.clone()), None);
                    if attempt >= delivery.max_attempts {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(receiver = %config.name, attempts = attempt,
                            "alert notification dropped after its last attempt: {message}");
                        break;
                    }
                    let delay = crate::forward::backoff(
                        u64::from(attempt),
                        delivery.retry_initial,
                        delivery.retry_max,
                    );
                    tracing::info!(receiver = %config.name, attempt, ?delay,
                        "alert notification failed, retrying: {message}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
        counters.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn deliver(
    config: &ReceiverConfig,
    client: Result<&reqwest::Client, &String>,
    notification: &Notification,
) -> Result<(), Failure> {
    match config.kind {
        ReceiverKind::Webhook | ReceiverKind::Slack => {
            let client = client.map_err(|e| Failure::Permanent(e.clone()))?;
            let url = config.url.as_deref().unwrap_or_default();
            let body = if config.kind == ReceiverKind::Webhook {
                serde_json::to_vec(notification)
            } else {
                serde_json::to_vec(&serde_json::json!({ "text": notification.text() }))
            }
            .map_err(|e| Failure::Permanent(e.to_string()))?;
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| Failure::Retry(crate::error::error_chain(&e)))?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
                Err(Failure::Retry(format!("{url} answered {status}")))
            } else {
                Err(Failure::Permanent(format!("{url} answered {status}")))
            }
        }
        ReceiverKind::Email => send_mail(config, notification).await,
    }
}

/// Reads one SMTP reply (all its `code-` continuation lines) and returns its code and last line.
async fn reply(reader: &mut BufReader<TcpStream>) -> Result<(u16, String), Failure> {
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|e| Failure::Retry(format!("SMTP read: {e}")))?;
        if n == 0 {
            return Err(Failure::Retry(
                "the SMTP server closed the connection".into(),
            ));
        }
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| Failure::Retry(format!("not an SMTP reply: {:?}", line.trim_end())))?;
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, line.trim_end().to_owned()));
        }
    }
}

async fn command(reader: &mut BufReader<TcpStream>, text: &str, want: u16) -> Result<(), Failure> {
    reader
        .get_mut()
        .write_all(text.as_bytes())
        .await
        .map_err(|e| Failure::Retry(format!("SMTP write: {e}")))?;
    expect(reader, want, text.trim_end()).await
}

async fn expect(reader: &mut BufReader<TcpStream>, want: u16, what: &str) -> Result<(), Failure> {
    let (code, line) = reply(reader).await?;
    if code == want || (want == 250 && code == 251) {
        Ok(())
    } else if (400..500).contains(&code) {
        Err(Failure::Retry(format!("SMTP {what:?}: {line}")))
    } else {
        Err(Failure::Permanent(format!("SMTP {what:?}: {line}")))
    }
}

/// The message: headers, a blank line, the body with CRLF line ends and leading dots doubled (RFC 5321 4.5.2).
fn mail_message(from: &str, to: &[String], n: &Notification) -> String {
    let subject: String = n
        .text()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut body = String::new();
    body.push_str(&n.text());
    body.push_str("\n\n");
    for (k, v) in [
        ("status", n.status.clone()),
        ("rule", n.rule.clone()),
        ("severity", n.severity.clone()),
        ("group", n.group_key.clone()),
        ("condition", n.condition.clone()),
        (
            "value",
            n.value.map_or_else(|| "no data".into(), |v| v.to_string()),
        ),
        (
            "threshold",
            n.threshold.map_or_else(String::new, |v| v.to_string()),
        ),
        ("starts_at", n.starts_at.clone()),
        ("at", n.at.clone()),
    ] {
        body.push_str(&format!("{k}: {v}\n"));
    }
    let mut out = format!(
        "From: <{from}>\r\nTo: {}\r\nSubject: =?utf-8?B?{}?=\r\nDate: {}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        to.iter()
            .map(|t| format!("<{t}>"))
            .collect::<Vec<_>>()
            .join(", "),
        base64(subject.as_bytes()),
        chrono::Utc::now().to_rfc2822(),
    );
    for line in body.lines() {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

/// Standard base64 (RFC 4648) for the encoded-word subject (RFC 2047), which keeps UTF-8 subjects intact.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn send_mail(config: &ReceiverConfig, n: &Notification) -> Result<(), Failure> {
    let addr = config.smtp_addr.as_deref().unwrap_or_default();
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::Retry(format!("cannot connect to the SMTP server {addr}: {e}")))?;
    let mut reader = BufReader::new(stream);
    expect(&mut reader, 220, "greeting").await?;
    command(&mut reader, "EHLO damselfly\r\n", 250).await?;
    let from = config.from.as_deref().unwrap_or("damselfly@localhost");
    command(&mut reader, &format!("MAIL FROM:<{from}>\r\n"), 250).await?;
    for to in &config.to {
        command(&mut reader, &format!("RCPT TO:<{to}>\r\n"), 250).await?;
    }
    command(&mut reader, "DATA\r\n", 354).await?;
    command(&mut reader, &mail_message(from, &config.to, n), 250).await?;
    // The message is accepted; a failed QUIT does not make it undelivered.
    let _ = command(&mut reader, "QUIT\r\n", 221).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn notification() -> Notification {
        Notification {
            status: "firing".into(),
            rule: "cpu_high".into(),
            severity: "critical".into(),
            previous_severity: Some("warning".into()),
            group: [("vm_id".to_owned(), "vm1".to_owned())]
                .into_iter()
                .collect(),
            group_key: "vm_id=vm1".into(),
            value: Some(95.5),
            threshold: Some(90.0),
            condition: "avg(usage_user)".into(),
            op: ">".into(),
            summary: String::new(),
            starts_at: "2026-01-01T00:00:00.000Z".into(),
            at: "2026-01-01T00:00:01.000Z".into(),
            repeat: false,
        }
    }

    #[test]
    fn alert_text_names_status_rule_group_and_value() {
        assert_eq!(
            notification().text(),
            "[FIRING critical] cpu_high vm_id=vm1: avg(usage_user) = 95.5 (> 90)"
        );
    }

    #[test]
    fn alert_mail_is_dot_stuffed_and_ends_with_a_dot_line() {
        let mut n = notification();
        n.summary = "x".into();
        n.condition = ".leading".into();
        let m = mail_message("a@b", &["c@d".into()], &n);
        assert!(m.ends_with("\r\n.\r\n"));
        assert!(m.contains("\r\ncondition: .leading\r\n"));
        assert!(m.contains("Subject: =?utf-8?B?"));
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
    }

    #[test]
    fn alert_receivers_are_validated() {
        let r = |text: &str| toml::from_str::<ReceiverConfig>(text).unwrap().validate();
        assert!(r("name = \"h\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"").is_ok());
        let e = r("name = \"h\"\nkind = \"webhook\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url: missing"), "{e}");
        let e = r("name = \"m\"\nkind = \"email\"\nsmtp_addr = \"localhost\"\nto = [\"a@b\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be host:port"), "{e}");
        let e =
            r("name = \"m\"\nkind = \"email\"\nsmtp_addr = \"localhost:25\"\nto = [\"nobody\"]")
                .unwrap_err()
                .to_string();
        assert!(e.contains("not an email address"), "{e}");
        let e = r(
            "name = \"h\"\nkind = \"webhook\"\nurl = \"https://h/x\"\nca_file = \"/nonexistent/ca.pem\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let e = r(
            "name = \"m\"\nkind = \"email\"\nsmtp_addr = \"h:25\"\nto = [\"a@b\"]\nca_file = \"ca.pem\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not url or ca_file"), "{e}");
    }
}
