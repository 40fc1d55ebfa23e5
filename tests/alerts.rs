//! Black-box tests of alerting: a real collector evaluates rules over points written through the line-protocol
//! API (and over a real agent's heartbeats) and notifies real receivers started here on 127.0.0.1: an HTTP server
//! (webhook and Slack-style bodies) and an SMTP server (Python's `aiosmtpd`, installed by `scripts/test.sh`).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    CollectorProc, Proc, damselfly_bin, free_port, http_get, http_request, now_nanos, start_agent,
    wait_until,
};
use serde_json::Value;

/// An HTTP server recording every request body it gets (by path), answering 200.
struct HttpReceiver {
    url: String,
    bodies: Arc<Mutex<Vec<(String, Value)>>>,
}

impl HttpReceiver {
    fn start() -> HttpReceiver {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn start_on(listener: TcpListener) -> HttpReceiver {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).is_err() {
                        return;
                    }
                    let path = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .to_owned();
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    seen.lock().unwrap().push((path, value));
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                });
            }
        });
        HttpReceiver { url, bodies }
    }

    fn at(&self, path: &str) -> Vec<Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// A real SMTP server (aiosmtpd) writing each message it accepts as a JSON line to a file.
struct SmtpReceiver {
    addr: String,
    out: PathBuf,
    _proc: Proc,
}

const SMTP_SERVER: &str = r#"
import json, sys
from aiosmtpd.controller import Controller
out = sys.argv[2]
class Handler:
    async def handle_DATA(self, server, session, envelope):
        with open(out, "a") as f:
            f.write(json.dumps({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                                "data": envelope.content.decode("utf-8", "replace")}) + "\n")
        return "250 Message accepted"
controller = Controller(Handler(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
"#;

/// Runs `script` with the test virtualenv's Python (`scripts/test.sh` makes it) and `args`, and waits for it to
/// print `ready`.
fn start_python(dir: &Path, name: &'static str, script: &str, args: &[String]) -> Proc {
    let python = std::env::var("DAMSELFLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let log = dir.join(format!("{name}.stderr"));
    let mut child = Command::new(&python)
        .args(["-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("start python for {name}: {e}"));
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(
        ready.trim(),
        "ready",
        "{name} did not start (run the suite with scripts/test.sh, which installs what it needs): {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Proc::adopt(child, name, log)
}

/// The JSON lines a receiver wrote to `out`.
fn json_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

impl SmtpReceiver {
    fn start(dir: &Path) -> SmtpReceiver {
        let port = free_port();
        let out = dir.join("mail.jsonl");
        let proc = start_python(
            dir,
            "aiosmtpd",
            SMTP_SERVER,
            &[port.to_string(), out.display().to_string()],
        );
        SmtpReceiver {
            addr: format!("127.0.0.1:{port}"),
            out,
            _proc: proc,
        }
    }

    fn messages(&self) -> Vec<Value> {
        json_lines(&self.out)
    }
}

/// A real HTTPS server (Python's http.server in an ssl context) that answers 200 to every POST and writes
/// `{"path": ..., "body": ...}` for each as a JSON line. Args: port, certificate, key, output file.
const HTTPS_SERVER: &str = r#"
import http.server, json, ssl, sys
port, cert, key, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(out, "a") as f:
            f.write(json.dumps({"path": self.path, "body": json.loads(body)}) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"#;

/// A collector whose `[alerts]` evaluate every 100 ms, with `rules` (TOML) in its rules file.
fn collector(dir: &Path, rules: &str, extra_config: &str) -> CollectorProc {
    let rules_file = dir.join("rules.toml");
    std::fs::write(&rules_file, rules).unwrap();
    let config = dir.join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "wal_sync = \"none\"\n{extra_config}\n[alerts]\nrules_file = {:?}\neval_interval_ms = 100\nretry_initial_ms = 100\nretry_max_ms = 300\nmax_attempts = 1000\n",
            rules_file.display().to_string()
        ),
    )
    .unwrap();
    CollectorProc::start(&dir.join("data"), &["--config", config.to_str().unwrap()])
}

/// Writes `cpu,vm_id=<vm>,cpu=cpu-total usage_user=<value>` for each VM every 50 ms until dropped; the values can
/// be changed meanwhile.
struct Load {
    values: Vec<(String, Arc<AtomicU64>)>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
}

impl Load {
    fn start(http: &str, vms: &[(&str, f64)]) -> Load {
        let values: Vec<(String, Arc<AtomicU64>)> = vms
            .iter()
            .map(|(vm, v)| ((*vm).to_owned(), Arc::new(AtomicU64::new(v.to_bits()))))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (url, values2, stop2, accepted2) = (
            format!("{http}/api/v2/write?bucket=ns1&precision=ns"),
            values.clone(),
            stop.clone(),
            accepted.clone(),
        );
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let t = now_nanos();
                let body: String = values2
                    .iter()
                    .map(|(vm, v)| {
                        format!(
                            "cpu,vm_id={vm},cpu=cpu-total usage_user={} {t}\n",
                            f64::from_bits(v.load(Ordering::Relaxed))
                        )
                    })
                    .collect();
                let (code, _) = http_request("POST", &url, &[], body.as_bytes()).unwrap();
                assert_eq!(code, 204, "line protocol write refused");
                accepted2.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Load {
            values,
            stop,
            accepted,
        }
    }

    fn set(&self, vm: &str, value: f64) {
        let (_, v) = self.values.iter().find(|(name, _)| name == vm).unwrap();
        v.store(value.to_bits(), Ordering::Relaxed);
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn get_json(url: &str) -> Value {
    let (code, body) = http_get(url).unwrap();
    assert_eq!(code, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let (code, body) = http_request(
        "POST",
        url,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .unwrap();
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The rules-file `[[receivers]]` entry of a webhook receiver named `hook` posting to `receiver`'s `/hook`.
fn webhook(receiver: &HttpReceiver) -> String {
    format!(
        "[[receivers]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}/hook\"\n",
        receiver.url
    )
}

/// The `(status, severity)` of each webhook body.
fn states(bodies: &[Value]) -> Vec<(String, String)> {
    bodies
        .iter()
        .map(|b| {
            (
                b["status"].as_str().unwrap().to_owned(),
                b["severity"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn loaded_vm_fires_warning_then_critical_then_resolves_each_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = HttpReceiver::start();
    let smtp = SmtpReceiver::start(dir.path());
    let rules = format!(
        r#"
{receiver}
[[receivers]]
name = "chat"
kind = "slack"
url = "{hook}/slack"

[[receivers]]
name = "ops-mail"
kind = "email"
smtp_addr = "{smtp}"
from = "damselfly@example.com"
to = ["ops@example.com"]

[[rules]]
name = "cpu_high"
table = "cpu"
expr = "max(usage_user)"
where = "cpu = 'cpu-total'"
group_by = ["vm_id"]
window = "1s"
warning = 80.0
critical = 90.0
recovery = 70.0
for = "200ms"
receivers = ["hook", "chat", "ops-mail"]
summary = "CPU busy"
"#,
        receiver = webhook(&hooks),
        hook = hooks.url,
        smtp = smtp.addr
    );
    let c = collector(dir.path(), &rules, "");
    let load = Load::start(&c.http, &[("vm-busy", 40.0), ("vm-idle", 5.0)]);
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        hooks.at("/hook").is_empty(),
        "fired while below the thresholds"
    );

    load.set("vm-busy", 85.0);
    wait_until(Duration::from_secs(15), "the warning", || {
        !hooks.at("/hook").is_empty()
    });
    // While it fires, the API and the CLI list it.
    let active = get_json(&format!("{}/api/v1/alerts", c.http));
    assert_eq!(active.as_array().unwrap().len(), 1, "{active}");
    assert_eq!(active[0]["group"]["vm_id"], "vm-busy");
    assert_eq!(active[0]["state"], "firing");
    assert_eq!(active[0]["severity"], "warning");
    let out = Command::new(damselfly_bin())
        .args(["alerts", "--url", &c.http])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("cpu_high") && table.contains("vm_id=vm-busy") && table.contains("warning")
    );
    assert!(table.contains("(1 active alert)"), "{table}");
    let out = Command::new(damselfly_bin())
        .args(["alerts", "--url", &c.http, "--format", "json"])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["rule"], "cpu_high");

    load.set("vm-busy", 95.0);
    wait_until(Duration::from_secs(15), "the critical alert", || {
        hooks.at("/hook").len() >= 2
    });
    load.set("vm-busy", 30.0);
    wait_until(Duration::from_secs(15), "the resolution", || {
        hooks.at("/hook").len() >= 3
    });
    wait_until(Duration::from_secs(15), "three emails", || {
        smtp.messages().len() >= 3
    });
    // Nothing more comes: each change was delivered once.
    std::thread::sleep(Duration::from_millis(1500));
    let hook = hooks.at("/hook");
    assert_eq!(
        states(&hook),
        [
            ("firing".to_owned(), "warning".to_owned()),
            ("firing".to_owned(), "critical".to_owned()),
            ("resolved".to_owned(), "critical".to_owned()),
        ],
        "{hook:?}"
    );
    assert!(
        hook.iter()
            .all(|b| b["group"]["vm_id"] == "vm-busy" && b["rule"] == "cpu_high")
    );
    assert_eq!(hook[1]["previous_severity"], "warning");
    assert!(hook[1]["value"].as_f64().unwrap() > 90.0);
    assert_eq!(hook[1]["threshold"], 90.0);

    let slack: Vec<String> = hooks
        .at("/slack")
        .iter()
        .map(|b| b["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(slack.len(), 3, "{slack:?}");
    assert!(
        slack[0].starts_with("[FIRING warning] cpu_high vm_id=vm-busy"),
        "{slack:?}"
    );
    assert!(
        slack[1].starts_with("[FIRING critical] cpu_high"),
        "{slack:?}"
    );
    assert!(
        slack[2].starts_with("[RESOLVED critical] cpu_high"),
        "{slack:?}"
    );

    let mails = smtp.messages();
    assert_eq!(mails.len(), 3, "{mails:?}");
    let bodies: Vec<&str> = mails.iter().map(|m| m["data"].as_str().unwrap()).collect();
    assert_eq!(mails[0]["to"], serde_json::json!(["ops@example.com"]));
    assert_eq!(mails[0]["from"], "damselfly@example.com");
    for (body, (status, severity)) in bodies.iter().zip([
        ("firing", "warning"),
        ("firing", "critical"),
        ("resolved", "critical"),
    ]) {
        assert!(body.contains(&format!("status: {status}\r\n")), "{body}");
        assert!(
            body.contains(&format!("severity: {severity}\r\n")),
            "{body}"
        );
        assert!(body.contains("group: vm_id=vm-busy"), "{body}");
    }

    // The history, in SQL: every change, the pending phase included.
    let rows = c.sql(
        "SELECT from_state, to_state, severity, vm_id FROM alerts WHERE rule = 'cpu_high' ORDER BY time",
    );
    let changes: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}>{}:{}",
                r["from_state"].as_str().unwrap(),
                r["to_state"].as_str().unwrap(),
                r["severity"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            "inactive>pending:warning",
            "pending>firing:warning",
            "firing>firing:critical",
            "firing>resolved:critical"
        ],
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r["vm_id"] == "vm-busy"));
    assert!(
        get_json(&format!("{}/api/v1/alerts", c.http))
            .as_array()
            .unwrap()
            .is_empty()
    );
    drop(load);
}

#[test]
fn value_oscillating_around_the_threshold_does_not_flap() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = HttpReceiver::start();
    // Two rules on the same value: one with a recovery value (hysteresis), one without, to show the value does
    // cross the threshold back and forth.
    let rules = format!(
        r#"
{receiver}
[[rules]]
name = "steady"
table = "cpu"
expr = "last_value(usage_user ORDER BY time)"
group_by = ["vm_id"]
window = "1s"
warning = 80.0
recovery = 60.0
receivers = ["hook"]

[[rules]]
name = "no_band"
table = "cpu"
expr = "last_value(usage_user ORDER BY time)"
group_by = ["vm_id"]
window = "1s"
warning = 80.0
"#,
        receiver = webhook(&hooks)
    );
    let c = collector(dir.path(), &rules, "");
    let load = Load::start(&c.http, &[("vm-hover", 85.0)]);
    for i in 0..40 {
        load.set("vm-hover", if i % 2 == 0 { 85.0 } else { 75.0 });
        std::thread::sleep(Duration::from_millis(150));
    }
    drop(load);
    std::thread::sleep(Duration::from_millis(300));
    let flaps = c.count("alerts WHERE rule = 'no_band'");
    assert!(
        flaps >= 6,
        "without hysteresis the rule should change state often, it changed {flaps} times"
    );
    let steady = c.sql("SELECT from_state, to_state FROM alerts WHERE rule = 'steady'");
    assert_eq!(steady.len(), 1, "{steady:?}");
    assert_eq!(steady[0]["to_state"], "firing");
    let hook = hooks.at("/hook");
    assert_eq!(
        states(&hook),
        [("firing".to_owned(), "warning".to_owned())],
        "{hook:?}"
    );
}

#[test]
fn stopped_agent_fires_the_absence_rule_and_resolves_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = HttpReceiver::start();
    let rules = format!(
        r#"
{receiver}
[[rules]]
name = "agent_silent"
kind = "absence"
absent_intervals = 3
receivers = ["hook"]
"#,
        receiver = webhook(&hooks)
    );
    let c = collector(dir.path(), &rules, "heartbeat_interval_secs = 1");
    let state = dir.path().join("agent-state");
    let agent = start_agent(&c.grpc, &state, &[]);
    let agents_url = format!("{}/api/v1/agents", c.http);
    wait_until(Duration::from_secs(60), "the agent's batches", || {
        get_json(&agents_url)
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["last_batch"].is_string()))
    });
    let agent_id = get_json(&agents_url)[0]["agent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        hooks.at("/hook").is_empty(),
        "a live agent counted as absent"
    );

    agent.kill();
    wait_until(Duration::from_secs(20), "the absence alert", || {
        !hooks.at("/hook").is_empty()
    });
    let fired = &hooks.at("/hook")[0];
    assert_eq!(fired["status"], "firing");
    assert_eq!(fired["severity"], "critical");
    assert_eq!(fired["rule"], "agent_silent");
    assert_eq!(fired["group"]["agent_id"], agent_id.as_str());
    assert!(fired["value"].as_f64().unwrap() > 3.0, "{fired}");
    let active = get_json(&format!("{}/api/v1/alerts", c.http));
    assert_eq!(active[0]["group"]["agent_id"], agent_id.as_str());

    let _agent = start_agent(&c.grpc, &state, &[]);
    wait_until(Duration::from_secs(60), "the resolution", || {
        hooks.at("/hook").len() >= 2
    });
    assert_eq!(
        states(&hooks.at("/hook")),
        [
            ("firing".to_owned(), "critical".to_owned()),
            ("resolved".to_owned(), "critical".to_owned())
        ]
    );
}

#[test]
fn bad_rules_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = HttpReceiver::start();
    let c = collector(dir.path(), &webhook(&hooks), "");
    let load = Load::start(&c.http, &[("vm1", 10.0)]);
    wait_until(Duration::from_secs(10), "the cpu table", || {
        c.count("cpu") > 0
    });
    let url = format!("{}/api/v1/alerts/rules", c.http);
    let base = serde_json::json!({
        "name": "r1", "table": "cpu", "expr": "avg(usage_user)", "group_by": ["vm_id"],
        "window": "1m", "warning": 80.0, "receivers": ["hook"]
    });
    let with = |k: &str, v: Value| {
        let mut rule = base.clone();
        if v.is_null() {
            rule.as_object_mut().unwrap().remove(k);
        } else {
            rule[k] = v;
        }
        rule
    };
    let cases = [
        (with("expr", "avg(usage_user".into()), "expr: "),
        (
            with("expr", "avg(x) FROM cpu; DROP".into()),
            "must be one SQL expression",
        ),
        (with("table", "nope".into()), "unknown table \"nope\""),
        (with("warning", Value::Null), "missing threshold"),
        (
            with("window", "5 minutes".into()),
            "window: \"5 minutes\" is not a duration",
        ),
        (
            with("for", "soon".into()),
            "for: \"soon\" is not a duration",
        ),
        (
            with("expr", "avg(no_such_column)".into()),
            "does not run as SQL",
        ),
        (
            with("receivers", serde_json::json!(["pager"])),
            "unknown receiver \"pager\"",
        ),
        (with("group_by", serde_json::json!(["vm id"])), "group_by: "),
        (with("critical", 50.0.into()), "critical: with op \">\""),
        (with("bogus", 1.into()), "unknown field `bogus`"),
    ];
    for (rule, want) in cases {
        let (code, body) = post_json(&url, &rule);
        assert_eq!(code, 400, "{rule}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(want), "{rule}: {error:?} lacks {want:?}");
    }
    let (code, body) = http_request("POST", &url, &[], b"not json").unwrap();
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    assert!(get_json(&url).as_array().unwrap().is_empty());

    // A good rule is taken, listed, survives a restart (saved state) and can be deleted.
    let (code, body) = post_json(&url, &base);
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["source"], "api");
    let listed = get_json(&url);
    assert_eq!(listed[0]["name"], "r1");

    // Silences: refused without matchers or with a bad duration; listed; deleted.
    let silences = format!("{}/api/v1/alerts/silences", c.http);
    let (code, body) = post_json(
        &silences,
        &serde_json::json!({"matchers": {}, "duration": "1h"}),
    );
    assert_eq!(code, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("at least one matcher"),
        "{body}"
    );
    let (code, body) = post_json(
        &silences,
        &serde_json::json!({"matchers": {"rule": "r1"}, "duration": "forever"}),
    );
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("duration: "),
        "{body}"
    );
    let (code, silence) = post_json(
        &silences,
        &serde_json::json!({"matchers": {"rule": "r1", "vm_id": "vm1"}, "duration": "1h", "comment": "maintenance"}),
    );
    assert_eq!(code, 201, "{silence}");
    let id = silence["id"].as_str().unwrap().to_owned();
    assert_eq!(get_json(&silences)[0]["id"], id.as_str());

    // The silenced alert fires (and is listed as silenced) but nothing is sent; once the silence is gone, the
    // receiver hears of it.
    load.set("vm1", 95.0);
    let alerts = format!("{}/api/v1/alerts", c.http);
    wait_until(Duration::from_secs(10), "the silenced alert", || {
        get_json(&alerts)
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["state"] == "firing")
    });
    assert_eq!(get_json(&alerts)[0]["silenced"], true);
    std::thread::sleep(Duration::from_millis(500));
    assert!(hooks.at("/hook").is_empty(), "a silenced alert was sent");

    drop(load);
    let data = c.data_dir.clone();
    c.proc.terminate();
    let config = dir.path().join("collector.toml");
    let c = CollectorProc::start(&data, &["--config", config.to_str().unwrap()]);
    let load = Load::start(&c.http, &[("vm1", 95.0)]);
    let url = format!("{}/api/v1/alerts/rules", c.http);
    let silences = format!("{}/api/v1/alerts/silences", c.http);
    assert_eq!(
        get_json(&url)[0]["name"],
        "r1",
        "the API rule is gone after a restart"
    );
    assert_eq!(get_json(&silences)[0]["id"], id.as_str());
    let (code, _) = http_request("DELETE", &format!("{silences}/{id}"), &[], b"").unwrap();
    assert_eq!(code, 204);
    wait_until(
        Duration::from_secs(10),
        "the notification after the silence",
        || !hooks.at("/hook").is_empty(),
    );
    assert_eq!(
        states(&hooks.at("/hook")),
        [("firing".to_owned(), "warning".to_owned())]
    );
    drop(load);
    let (code, _) = http_request("DELETE", &format!("{url}/r1"), &[], b"").unwrap();
    assert_eq!(code, 204);
    let (code, _) = http_request("DELETE", &format!("{url}/r1"), &[], b"").unwrap();
    assert_eq!(code, 404);
    assert!(get_json(&url).as_array().unwrap().is_empty());
    assert!(get_json(&silences).as_array().unwrap().is_empty());

    // A bad rules file stops the collector at start, naming the rule and the field.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[rules]]\nname = \"slow\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 1.0\nwindow = \"5x\"\n").unwrap();
    let bad_config = dir.path().join("bad-collector.toml");
    std::fs::write(
        &bad_config,
        format!("[alerts]\nrules_file = {:?}\n", bad.display().to_string()),
    )
    .unwrap();
    let out = Command::new(damselfly_bin())
        .args([
            "collector",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("bad-data"))
        .args(["--config", bad_config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rule \"slow\": window: \"5x\" is not a duration"),
        "{stderr}"
    );
}

#[test]
fn receiver_that_is_down_gets_retries_and_the_collector_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let rules = format!(
        r#"
[[receivers]]
name = "late"
kind = "webhook"
url = "http://127.0.0.1:{port}/hook"
timeout_ms = 500

[[rules]]
name = "busy"
table = "cpu"
expr = "max(usage_user)"
group_by = ["vm_id"]
window = "1s"
critical = 90.0
receivers = ["late"]
"#
    );
    let c = collector(dir.path(), &rules, "");
    let load = Load::start(&c.http, &[("vm1", 99.0)]);
    let receivers = format!("{}/api/v1/alerts/receivers", c.http);
    wait_until(Duration::from_secs(15), "several failed attempts", || {
        get_json(&receivers)[0]["failed_attempts"].as_u64().unwrap() >= 4
    });
    let status = get_json(&receivers);
    assert_eq!(status[0]["sent"], 0);
    assert_eq!(status[0]["queued"], 1, "{status}");
    assert!(status[0]["last_error"].is_string(), "{status}");
    // Meanwhile ingest and SQL go on.
    let before = load.accepted.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        load.accepted.load(Ordering::Relaxed) > before,
        "ingest stalled"
    );
    assert!(c.count("cpu") > 0);
    assert_eq!(
        get_json(&format!("{}/api/v1/alerts", c.http))[0]["state"],
        "firing"
    );

    // The receiver comes up: the notification arrives, once.
    let hooks = HttpReceiver::start_on(TcpListener::bind(("127.0.0.1", port)).unwrap());
    wait_until(Duration::from_secs(15), "the delivery", || {
        !hooks.at("/hook").is_empty()
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        states(&hooks.at("/hook")),
        [("firing".to_owned(), "critical".to_owned())]
    );
    let status = get_json(&receivers);
    assert_eq!(status[0]["sent"], 1);
    assert_eq!(status[0]["queued"], 0);

    // A restart rebuilds the firing alert from the alerts table: it is active again at once and not re-sent.
    drop(load);
    let data = c.data_dir.clone();
    c.proc.terminate();
    let config = dir.path().join("collector.toml");
    let c = CollectorProc::start(&data, &["--config", config.to_str().unwrap()]);
    let load = Load::start(&c.http, &[("vm1", 99.0)]);
    wait_until(Duration::from_secs(10), "the restored alert", || {
        get_json(&format!("{}/api/v1/alerts", c.http))
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["state"] == "firing")
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(hooks.at("/hook").len(), 1, "re-sent after the restart");
    assert_eq!(c.count("alerts"), 1, "the restored alert fired again");
    drop(load);
}

/// A webhook over HTTPS to an endpoint whose certificate a private CA signed: delivered when the receiver trusts
/// that CA (`ca_file`); refused for an unknown issuer, and said so, when it does not.
#[test]
fn webhooks_reach_an_https_receiver_of_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    common::certs_init(&certs);
    let port = free_port();
    let received = dir.path().join("https.jsonl");
    let _server = start_python(
        dir.path(),
        "https-receiver",
        HTTPS_SERVER,
        &[
            port.to_string(),
            certs.join("collector.pem").display().to_string(),
            certs.join("collector-key.pem").display().to_string(),
            received.display().to_string(),
        ],
    );
    let rules = format!(
        r#"
[[receivers]]
name = "trusting"
kind = "webhook"
url = "https://127.0.0.1:{port}/trusting"
ca_file = {ca:?}

[[receivers]]
name = "untrusting"
kind = "webhook"
url = "https://127.0.0.1:{port}/untrusting"

[[rules]]
name = "cpu_high"
table = "cpu"
expr = "max(usage_user)"
where = "cpu = 'cpu-total'"
group_by = ["vm_id"]
window = "1s"
critical = 90.0
receivers = ["trusting", "untrusting"]
"#,
        ca = certs.join("ca.pem").display().to_string()
    );
    let c = collector(dir.path(), &rules, "");
    let _load = Load::start(&c.http, &[("vm-hot", 95.0)]);
    wait_until(Duration::from_secs(15), "the alert over HTTPS", || {
        !json_lines(&received).is_empty()
    });
    let bodies = json_lines(&received);
    assert_eq!(bodies[0]["path"], "/trusting", "{bodies:?}");
    assert_eq!(bodies[0]["body"]["status"], "firing", "{bodies:?}");
    assert_eq!(bodies[0]["body"]["group"]["vm_id"], "vm-hot", "{bodies:?}");
    let receivers = format!("{}/api/v1/alerts/receivers", c.http);
    wait_until(
        Duration::from_secs(15),
        "the untrusting receiver's failure",
        || {
            get_json(&receivers).as_array().unwrap().iter().any(|r| {
                r["name"] == "untrusting"
                    && r["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("UnknownIssuer"))
            })
        },
    );
    assert!(
        json_lines(&received)
            .iter()
            .all(|b| b["path"] == "/trusting"),
        "a receiver without the CA delivered"
    );
}
