//! Shared harness for the black-box tests: real `damselfly` and `damselfly-agent` processes on 127.0.0.1 with
//! ephemeral ports, talked to over real sockets.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `damselfly` binary cargo built for these tests.
pub fn damselfly_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_damselfly"))
}

/// Whether `url` answers a GET with a 2xx over HTTPS, its certificate verified against the CA `ca` (curl).
pub fn https_ok(url: &str, ca: &Path) -> bool {
    Command::new("curl")
        .args(["-sf", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `damselfly certs init` into `dir`: a CA (`ca.pem`), a server certificate for localhost and 127.0.0.1
/// (`collector.pem`, `collector-key.pem`) and an agent client certificate (`agent.pem`, `agent-key.pem`).
pub fn certs_init(dir: &Path) {
    let out = Command::new(damselfly_bin())
        .args(["certs", "init", "--host", "localhost,127.0.0.1", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `damselfly-agent` binary: another package's binary, so cargo does not build it for these tests; build it
/// once (a no-op when `scripts/test.sh` or `cargo build --workspace` already did). `--workspace` keeps the
/// features the workspace build unified: with `-p damselfly-agent` alone, cargo would build the agent's
/// dependencies a second time with the agent's own feature set (over a minute on CI's two cores).
pub fn agent_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = damselfly_bin().parent().unwrap().to_path_buf();
            let path = dir.join(format!("damselfly-agent{}", std::env::consts::EXE_SUFFIX));
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "-q", "--workspace", "--bin", "damselfly-agent"]);
            // cargo gives this test process the variables of *its* package (CARGO_MANIFEST_DIR, CARGO_PKG_NAME,
            // OUT_DIR, ...). Build scripts such as ring's rerun when those change, so passing them on would rebuild
            // ring and all above it here, and again in the next plain `cargo build` (8 minutes on two cores).
            for (key, _) in std::env::vars_os() {
                let key = key.to_string_lossy();
                if key == "OUT_DIR"
                    || key == "CARGO_CRATE_NAME"
                    || key == "CARGO_PRIMARY_PACKAGE"
                    || key == "CARGO_TARGET_TMPDIR"
                    || key.starts_with("CARGO_MANIFEST_")
                    || key.starts_with("CARGO_PKG_")
                    || key.starts_with("CARGO_BIN_")
                {
                    build.env_remove(key.as_ref());
                }
            }
            // The test binary lives in target/<profile>/deps; build the same profile.
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build for damselfly-agent");
            assert!(
                status.success(),
                "cargo build --workspace --bin damselfly-agent failed"
            );
            assert!(path.exists(), "{} missing after build", path.display());
            path
        })
        .clone()
}

/// A running child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
    stderr_log: PathBuf,
}

impl Proc {
    /// Takes charge of a child started elsewhere (killed on drop; its stderr log shown if the test fails).
    pub fn adopt(child: Child, name: &'static str, stderr_log: PathBuf) -> Proc {
        Proc {
            child,
            name,
            stderr_log,
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        signal(&self.child, "TERM");
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{} did not exit within 30 s of SIGTERM", self.name));
        std::mem::forget(self);
        status
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.name, self.stderr());
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} failed");
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A collector process and where it listens.
pub struct CollectorProc {
    pub proc: Proc,
    pub grpc: String,
    pub http: String,
    /// The PostgreSQL protocol address (`127.0.0.1:PORT`) when started with `--pg`.
    pub pg: Option<String>,
    pub data_dir: PathBuf,
}

impl CollectorProc {
    /// Starts `damselfly collector` on `data_dir` with free ports; `extra` are more flags. Returns once both
    /// endpoints are printed and `/health` answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> CollectorProc {
        Self::start_command("collector", data_dir, extra)
    }

    /// Same for `damselfly up` (collector plus the in-process agent).
    pub fn start_up(data_dir: &Path, extra: &[&str]) -> CollectorProc {
        Self::start_command("up", data_dir, extra)
    }

    /// `damselfly collector` on given addresses (e.g. a shard whose addresses are in the shards file).
    pub fn start_at(data_dir: &Path, grpc: &str, http: &str, extra: &[&str]) -> CollectorProc {
        Self::start_command_at("collector", data_dir, grpc, http, extra)
    }

    fn start_command(command: &str, data_dir: &Path, extra: &[&str]) -> CollectorProc {
        Self::start_command_at(command, data_dir, "127.0.0.1:0", "127.0.0.1:0", extra)
    }

    /// `damselfly collector` whose config turns TLS on: waits for `/health` over HTTPS (curl with the CA `ca`).
    pub fn start_with_tls(data_dir: &Path, extra: &[&str], ca: &Path) -> CollectorProc {
        Self::start_at_with_tls(data_dir, "127.0.0.1:0", "127.0.0.1:0", extra, ca)
    }

    /// [`CollectorProc::start_with_tls`] on the given gRPC and HTTP addresses.
    pub fn start_at_with_tls(
        data_dir: &Path,
        grpc: &str,
        http: &str,
        extra: &[&str],
        ca: &Path,
    ) -> CollectorProc {
        let collector = Self::launch("collector", data_dir, grpc, http, extra);
        wait_until(
            Duration::from_secs(30),
            "collector /health over TLS",
            || https_ok(&format!("{}/health", collector.http), ca),
        );
        collector
    }

    fn start_command_at(
        command: &str,
        data_dir: &Path,
        grpc: &str,
        http: &str,
        extra: &[&str],
    ) -> CollectorProc {
        let collector = Self::launch(command, data_dir, grpc, http, extra);
        wait_until(Duration::from_secs(30), "collector /health", || {
            http_get(&format!("{}/health", collector.http)).is_ok_and(|(code, _)| code == 200)
        });
        collector
    }

    /// Starts the process and reads the endpoints it prints.
    fn launch(
        command: &str,
        data_dir: &Path,
        grpc: &str,
        http: &str,
        extra: &[&str],
    ) -> CollectorProc {
        let stderr_log = data_dir.with_extension(format!("{command}.{}.stderr", unique()));
        let mut child = Command::new(damselfly_bin())
            .arg(command)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--grpc", grpc, "--http", http])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .expect("spawn damselfly");
        let stdout = child.stdout.take().unwrap();
        let mut proc = Proc {
            child,
            name: "damselfly",
            stderr_log,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut grpc = None;
            let mut http = None;
            let mut pg = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(v) = line.trim().strip_prefix("grpc: ") {
                    grpc = Some(v.to_owned());
                }
                if let Some(v) = line.trim().strip_prefix("pg: ") {
                    pg = Some(v.to_owned());
                }
                if let Some(v) = line.trim().strip_prefix("http: ") {
                    http = Some(v.to_owned());
                }
                if let (Some(g), Some(h)) = (&grpc, &http) {
                    let _ = tx.send((g.clone(), h.clone(), pg.take()));
                    grpc = None;
                }
            }
        });
        let (grpc, http, pg) = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let status = proc.child.try_wait().ok().flatten();
                panic!(
                    "damselfly {command} did not print its endpoints (exit: {status:?}):\n{}",
                    proc.stderr()
                );
            }
        };
        CollectorProc {
            proc,
            grpc,
            http,
            pg,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Runs SQL over HTTP (JSON format) and returns the rows.
    pub fn sql(&self, sql: &str) -> Vec<serde_json::Value> {
        let (code, body) =
            http_post(&format!("{}/api/v1/sql", self.http), sql.as_bytes()).expect("POST sql");
        assert_eq!(code, 200, "{sql}: {body}");
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap_or_else(|e| panic!("{sql}: {e}: {body}"))
    }

    /// `SELECT count(*)` of a table, 0 if the table does not exist yet.
    pub fn count(&self, table: &str) -> u64 {
        let (code, body) = http_post(
            &format!("{}/api/v1/sql", self.http),
            format!("SELECT count(*) AS n FROM {table}").as_bytes(),
        )
        .expect("POST sql");
        if code != 200 {
            return 0;
        }
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        rows[0]["n"].as_u64().unwrap()
    }
}

/// A `damselfly-agent` process.
pub fn start_agent(collector_grpc: &str, state_dir: &Path, extra: &[&str]) -> Proc {
    let stderr_log = state_dir.with_extension(format!("agent.{}.stderr", unique()));
    let child = Command::new(agent_bin())
        .args(["--collector", collector_grpc, "--interval", "1"])
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .expect("spawn damselfly-agent");
    Proc {
        child,
        name: "damselfly-agent",
        stderr_log,
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Polls `done` every 100 ms until it holds or `timeout` passes (then panics naming `what`).
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Minimal blocking HTTP/1.1 client over a real socket (keeps the tests free of an HTTP client stack).
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http:// URL");
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // The server may answer (413) before reading a large body; a failed write is then not the test's concern.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "no HTTP header in {:?}",
                String::from_utf8_lossy(&raw)
            ))
        })?;
    let header = String::from_utf8_lossy(&raw[..text_end]).to_string();
    let code: u16 = header
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {header}")))?;
    let mut payload = raw[text_end + 4..].to_vec();
    if header
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload);
    }
    Ok((code, payload))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        let start = eol + 2;
        if size == 0 || data.len() < start + size {
            break;
        }
        out.extend_from_slice(&data[start..start + size]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    http_request("GET", url, &[], b"").map(|(c, b)| (c, String::from_utf8_lossy(&b).into_owned()))
}

pub fn http_post(url: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    http_request("POST", url, &[("Content-Type", "text/plain")], body)
        .map(|(c, b)| (c, String::from_utf8_lossy(&b).into_owned()))
}

/// Every Parquet file under the store's `data/` directory.
pub fn parquet_files(data_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir.join("data"), &mut out);
    out.sort();
    out
}

/// The Python interpreter that has `pyarrow` (installed by `scripts/test.sh`): the independent Parquet reader.
pub fn python_with_pyarrow() -> String {
    let python = std::env::var("DAMSELFLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import pyarrow.parquet"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import pyarrow: run the suite with `bash scripts/test.sh`, which installs it (or set \
         DAMSELFLY_TEST_PYTHON to an interpreter that has it)"
    );
    python
}

/// The interpreter with `prometheus_client` (installed by `scripts/test.sh`).
pub fn python_with_prometheus_client() -> String {
    let python = std::env::var("DAMSELFLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import prometheus_client.parser"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import prometheus_client: run the suite with `bash scripts/test.sh`, which installs it (or \
         set DAMSELFLY_TEST_PYTHON to an interpreter that has it)"
    );
    python
}

/// Parses a Prometheus text exposition with `prometheus_client`'s parser; returns `{family: {type, samples:
/// [[name, labels, value-as-text]]}}`. Panics if the parser rejects the text.
pub fn parse_exposition(text: &str) -> serde_json::Map<String, serde_json::Value> {
    use std::io::Write;
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    if fam.name in out:
        raise SystemExit("family %s appears twice" % fam.name)
    out[fam.name] = {"type": fam.type,
                     "samples": [[s.name, s.labels, repr(float(s.value))] for s in fam.samples]}
print(json.dumps(out))
"#;
    let mut child = Command::new(python_with_prometheus_client())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected /metrics: {}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap() {
        serde_json::Value::Object(m) => m,
        other => panic!("unexpected parser output {other}"),
    }
}

/// A `tokio-postgres` client on the collector's pg port (`--pg`), its connection driven by a spawned task (call
/// inside a tokio runtime).
pub async fn pg_connect(port: u16) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=grafana dbname=metrics"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

/// `damselfly tokens create` on `data_dir`; returns the token.
pub fn create_token(data_dir: &Path, role: &str, namespaces: &[&str]) -> String {
    let mut command = Command::new(damselfly_bin());
    command
        .args(["tokens", "create", "--quiet", "--role", role, "--data-dir"])
        .arg(data_dir);
    for ns in namespaces {
        command.args(["--ns", ns]);
    }
    let out = command.output().expect("run damselfly tokens");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("dfy_"), "{token}");
    token
}

/// Now, in nanoseconds since the epoch.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// `YYYY-MM-DDTHH:MM:SSZ` for nanoseconds since the epoch (civil-from-days, proleptic Gregorian).
pub fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A free port below the kernel's ephemeral range (`ip_local_port_range`): nothing that binds port 0 or connects
/// out (every other test, and the agent itself) can be handed it while a server is down, so it is still free when
/// the server comes back.
pub fn free_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if low > 11_024 {
        let mut x = (now_nanos() as u64) ^ (u64::from(std::process::id()) << 20);
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let port = low - 1 - ((x >> 33) % 10_000) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `POST /api/v1/sql` (JSON) on a raw socket, to see the headers: (status, the `x-damselfly-partial` header or
/// "", the JSON body).
pub fn sql_with_headers(http: &str, sql: &str) -> (u16, String, String) {
    // The harness's client drops headers; read them from a raw request.
    use std::io::{Read, Write};
    let addr = http.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /api/v1/sql HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sql}",
        sql.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let partial = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-damselfly-partial")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    // The body may be chunked: keep what lies between the first '[' and the last ']'.
    let body = match (body.find('['), body.rfind(']')) {
        (Some(a), Some(b)) if a <= b => body[a..=b].to_string(),
        _ => body.to_string(),
    };
    (code, partial, body)
}
