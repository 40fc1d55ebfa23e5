//! The built-in web UI in a real browser: headless Chromium (Debian's `chromium`, installed by `scripts/test.sh`)
//! driven over the Chrome DevTools Protocol on `--remote-debugging-pipe` (null-separated JSON on fds 3 and 4, given
//! to it through two FIFOs: no websocket library, no npm), against a real collector process.
//!
//! * `damselfly up` (collector + this machine's agent): every page loads with no console error, no uncaught
//!   exception and no failed request; the fleet view shows this machine's hostname; the VM page draws its charts;
//!   a placement answer is drawn on the map; the SQL console shows a table and a chart (and a bad query's error);
//!   an alert rule posted over the API shows up firing on the alerts page. Screenshots go to
//!   `target/ui-screenshots/*.png`.
//! * 1,000 simulated VMs (registered over gRPC, their points written as line protocol while the browser works): the fleet
//!   table renders all 1,000 rows with their latest values, filters and sorts them, and every write sent meanwhile
//!   is stored.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{
    CollectorProc, Proc, create_token, http_get, http_post, http_request, now_nanos, wait_until,
};
use damselfly_proto::v1::agents_client::AgentsClient;
use damselfly_proto::v1::{RegisterRequest, Tag};
use serde_json::{Value as Json, json};

/// Where the screenshots go (CI keeps `target/` as the artifact directory).
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A headless Chromium and one page of it, driven over the DevTools protocol.
struct Browser {
    /// Kept for its drop: kills Chromium.
    _proc: Proc,
    to_browser: std::fs::File,
    from_browser: mpsc::Receiver<Json>,
    next_id: u64,
    session: String,
    /// Every event seen so far (console, exceptions, log entries).
    events: Vec<Json>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Browser {
        let chromium = std::env::var("DAMSELFLY_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let found = Command::new(&chromium)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{chromium} not found: run the suite with `bash scripts/test.sh`, which installs Debian's chromium (or \
             set DAMSELFLY_CHROMIUM)"
        );
        let profile = tempfile::TempDir::new().unwrap();
        let to_path = profile.path().join("cdp-in");
        let from_path = profile.path().join("cdp-out");
        for fifo in [&to_path, &from_path] {
            let ok = Command::new("mkfifo").arg(fifo).status().unwrap().success();
            assert!(ok, "mkfifo {}", fifo.display());
        }
        let log = profile.path().with_extension("chromium.stderr");
        // The shell opens fd 3 (reads our commands) and fd 4 (writes answers) in that order, then becomes Chromium.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$@" 3<"$CDP_IN" 4>"$CDP_OUT""#)
            .arg("sh")
            .arg(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1400,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!(
                "--user-data-dir={}",
                profile.path().join("profile").display()
            ))
            .arg("about:blank")
            .env("CDP_IN", &to_path)
            .env("CDP_OUT", &from_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start chromium");
        let proc = Proc::adopt(child, "chromium", log);
        let to_browser = std::fs::OpenOptions::new()
            .write(true)
            .open(&to_path)
            .unwrap();
        let from = std::fs::File::open(&from_path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        message.pop_if(|b| *b == 0);
                        if let Ok(v) = serde_json::from_slice::<Json>(&message)
                            && tx.send(v).is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        let mut browser = Browser {
            _proc: proc,
            to_browser,
            from_browser: rx,
            next_id: 0,
            session: String::new(),
            events: Vec::new(),
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({}));
        }
        browser
    }

    /// Sends one command (to the page once attached) and waits for its answer, keeping the events that come first.
    fn call(&mut self, method: &str, params: Json) -> Json {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .from_browser
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer to {method} from chromium: {e}"));
            if answer["id"].as_u64() == Some(id) {
                assert!(
                    answer.get("error").is_none(),
                    "{method} failed: {}",
                    answer["error"]
                );
                return answer["result"].clone();
            }
            if answer.get("method").is_some() {
                self.events.push(answer);
            }
        }
    }

    /// Loads `url` as a new document (through about:blank, so a fragment-only change still reloads).
    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": "about:blank"}));
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Evaluates a JavaScript expression in the page; its value (JSON).
    fn eval(&mut self, expression: &str) -> Json {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression} threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is `true` (throwing counts as "not yet": the page may still be building).
    fn wait_for(&mut self, expression: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(45);
        let guarded = format!(
            "(() => {{ try {{ return ({expression}) === true; }} catch (e) {{ return false; }} }})()"
        );
        while Instant::now() < deadline {
            if self.eval(&guarded) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''");
        panic!("timed out waiting for {what} ({expression}); the page shows:\n{text}");
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Console errors, uncaught exceptions and failed loads (a 4xx or 5xx answer) since the last call.
    fn errors(&mut self) -> Vec<String> {
        // A round trip first, so that events sent before it have arrived.
        self.eval("1");
        let mut out = Vec::new();
        for e in std::mem::take(&mut self.events) {
            let p = &e["params"];
            match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => out.push(format!(
                    "exception: {} {}",
                    p["exceptionDetails"]["text"],
                    p["exceptionDetails"]["exception"]["description"]
                )),
                Some("Runtime.consoleAPICalled")
                    if matches!(p["type"].as_str(), Some("error" | "assert")) =>
                {
                    out.push(format!("console.{}: {}", p["type"], p["args"]))
                }
                Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                    let url = p["entry"]["url"].as_str().unwrap_or("");
                    let text = p["entry"]["text"].as_str().unwrap_or("");
                    out.push(format!("log: {text} ({url})"));
                }
                _ => {}
            }
        }
        out
    }
}

fn assert_no_errors(browser: &mut Browser, page: &str) {
    let errors = browser.errors();
    assert!(
        errors.is_empty(),
        "the {page} page logged errors:\n{}",
        errors.join("\n")
    );
}

/// The machine's host name, as the agent reports it.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn agents(collector: &CollectorProc) -> Vec<Json> {
    let (code, body) = http_get(&format!("{}/api/v1/agents", collector.http)).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn every_page_loads_in_chromium_without_errors_and_shows_this_machine() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = CollectorProc::start_up(&dir.path().join("data"), &["--interval", "1"]);
    // The local agent registers and its first rows of every measurement the pages chart arrive.
    wait_until(Duration::from_secs(30), "the local agent's rows", || {
        ["cpu", "mem", "disk", "system"]
            .iter()
            .all(|t| collector.count(t) > 0)
            && !agents(&collector).is_empty()
    });
    let agent = agents(&collector).remove(0);
    let agent_id = agent["agent_id"].as_str().unwrap().to_string();
    let host = hostname();
    assert_eq!(agent["identity"]["hostname"], json!(host));

    // A rule that always holds (user CPU above -1 %), so the alerts page has an alert to show.
    let rule = json!({"name": "ui-cpu", "table": "cpu", "expr": "avg(usage_user)", "group_by": ["hostname"],
                      "window": "1m", "warning": -1.0});
    let (code, body) = http_request(
        "POST",
        &format!("{}/api/v1/alerts/rules", collector.http),
        &[("Content-Type", "application/json")],
        rule.to_string().as_bytes(),
    )
    .unwrap();
    assert!(
        code == 200 || code == 201,
        "{code}: {}",
        String::from_utf8_lossy(&body)
    );

    let mut browser = Browser::launch();
    let base = &collector.http;

    // Fleet: this machine's row with its latest CPU, memory and disk use.
    browser.open(&format!("{base}/"));
    browser.wait_for(
        &format!(
            "[...document.querySelectorAll('#fleet-body tr')].some(tr => tr.cells[1].textContent === {host:?} \
             && [6, 7, 8].every(i => /^\\d+\\.\\d/.test(tr.cells[i].textContent)))"
        ),
        "the fleet row of this machine with CPU, memory and disk values",
    );
    browser.screenshot("fleet");
    assert_no_errors(&mut browser, "fleet");

    // The VM page: four charts, each with a drawn line or point.
    browser.open(&format!("{base}/#/vm/{agent_id}"));
    browser.wait_for(
        "document.querySelectorAll('#vm-charts .chart').length === 4 && \
         [...document.querySelectorAll('#vm-charts svg')].every(s => s.querySelector('polyline, circle'))",
        "four charts with data on the VM page",
    );
    assert_eq!(
        browser.eval("document.getElementById('vm-title').textContent"),
        json!(host)
    );
    browser.eval("document.getElementById('vm-range').value = '15m'; document.getElementById('vm-range').dispatchEvent(new Event('change')); true");
    browser.wait_for(
        "document.querySelectorAll('#vm-charts svg polyline, #vm-charts svg circle').length > 0",
        "charts redrawn for 15 minutes",
    );
    browser.screenshot("vm");
    assert_no_errors(&mut browser, "vm");

    // The map: the world, the regions, and a placement answer drawn as candidates.
    browser.open(&format!("{base}/#/map"));
    browser.wait_for(
        "document.querySelectorAll('#map polygon.land').length > 10 && document.querySelectorAll('#map circle.region').length > 100",
        "the world outline and the region dots",
    );
    browser.eval("document.getElementById('place-run').click(); true");
    browser.wait_for(
        "document.querySelectorAll('#map g.candidate').length > 0 && document.querySelectorAll('#place-out tr').length > 1",
        "placement candidates on the map and in the table",
    );
    browser.screenshot("map");
    assert_no_errors(&mut browser, "map");

    // SQL console: a result table and a chart of a time series.
    browser.open(&format!("{base}/#/sql"));
    browser.wait_for("!!document.getElementById('sql-run')", "the SQL console");
    browser.eval("document.getElementById('sql-run').click(); true");
    browser.wait_for(
        "document.querySelectorAll('#sql-table tbody tr').length > 0 && !!document.querySelector('#sql-chart svg polyline, #sql-chart svg circle')",
        "a result table and a chart",
    );
    let cells = browser.eval(&format!(
        "[...document.querySelectorAll('#sql-table tbody tr')].some(tr => tr.cells[0].textContent === {host:?})"
    ));
    assert_eq!(cells, json!(true), "the SQL result names this machine");
    assert_no_errors(&mut browser, "sql");
    // A bad query shows the collector's message, not a blank page (the browser logs the 400: expected here).
    browser.eval("document.getElementById('sql-text').value = 'SELECT * FROM no_such_table'; document.getElementById('sql-run').click(); true");
    browser.wait_for(
        "/no_such_table/.test(document.getElementById('sql-result').textContent)",
        "the error of a bad query",
    );
    let errors = browser.errors();
    assert!(
        errors.len() == 1 && errors[0].contains("400") && errors[0].contains("/api/v1/sql"),
        "{errors:?}"
    );
    browser.eval("document.getElementById('sql-text').value = 'SELECT cpu, avg(usage_user) AS user FROM cpu GROUP BY cpu ORDER BY cpu'; document.getElementById('sql-run').click(); true");
    browser.wait_for(
        "document.querySelectorAll('#sql-chart svg rect').length > 0",
        "a bar chart of a grouped result",
    );
    browser.screenshot("sql");
    assert_no_errors(&mut browser, "sql");

    // Alerts: the rule posted at the start fires for this machine and is listed.
    browser.open(&format!("{base}/#/alerts"));
    browser.wait_for(
        &format!(
            "[...document.querySelectorAll('#alerts-table tbody tr')].some(tr => tr.cells[2].textContent === 'ui-cpu' \
             && tr.cells[3].textContent === 'hostname=' + {host:?} && tr.cells[1].textContent === 'warning')"
        ),
        "the firing alert in the alerts table",
    );
    browser.screenshot("alerts");
    assert_no_errors(&mut browser, "alerts");

    // The collector's health, read from /health and /metrics.
    browser.open(&format!("{base}/#/health"));
    browser.wait_for(
        "[...document.querySelectorAll('#metrics-table td')].some(td => td.textContent === 'damselfly_ingest_points_total')",
        "the /metrics table",
    );
    browser.screenshot("health");
    assert_no_errors(&mut browser, "health");

    for name in ["fleet", "vm", "map", "sql", "alerts", "health"] {
        let len = std::fs::metadata(screenshot_dir().join(format!("{name}.png")))
            .unwrap()
            .len();
        assert!(len > 10_000, "{name}.png is only {len} bytes");
    }
}

#[test]
fn with_auth_on_the_ui_asks_for_a_token_and_then_works() {
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("data");
    let reader = create_token(&data, "read", &[]);
    let collector = CollectorProc::start_up(&data, &["--auth", "--interval", "1"]);
    let host = hostname();

    let mut browser = Browser::launch();
    // The page itself is open; its API calls are refused until the token is given.
    browser.open(&format!("{}/", collector.http));
    browser.wait_for(
        "!document.getElementById('token-bar').hidden",
        "the token bar after a 401",
    );
    let refused = browser.errors();
    assert!(!refused.is_empty(), "no request was refused");
    assert!(
        refused.iter().all(|e| e.contains("401")),
        "only 401s expected before the token: {refused:?}"
    );
    browser.screenshot("token");

    browser.eval(&format!(
        "document.getElementById('token-input').value = {reader:?}; \
         document.getElementById('token-bar').requestSubmit(); true"
    ));
    browser.wait_for(
        &format!(
            "[...document.querySelectorAll('#fleet-body tr')].some(tr => tr.cells[1].textContent === {host:?} \
             && /^\\d+\\.\\d/.test(tr.cells[6].textContent))"
        ),
        "the fleet row of this machine once the token is set",
    );
    assert_eq!(
        browser.eval("document.getElementById('token-bar').hidden"),
        json!(true)
    );
    // The token is kept: a reload works without asking again, and so does the collector page.
    browser.open(&format!("{}/#/health", collector.http));
    browser.wait_for(
        "[...document.querySelectorAll('#metrics-table td')].some(td => td.textContent === 'damselfly_ingest_points_total')",
        "the /metrics table with the kept token",
    );
    assert_no_errors(&mut browser, "fleet and collector pages with a token");
}

/// Where the simulated VMs run: regions of the embedded catalog.
const SIM_REGIONS: [(&str, &str); 8] = [
    ("aws", "ap-northeast-2"),
    ("aws", "us-east-1"),
    ("gcp", "asia-northeast3"),
    ("azure", "koreacentral"),
    ("azure", "westeurope"),
    ("gcp", "europe-west1"),
    ("alibaba", "ap-southeast-1"),
    ("aws", "sa-east-1"),
];
const SIM_VMS: usize = 1000;

/// The identity tags of simulated VM `i`: 20 MCISes of 50 VMs, spread over [`SIM_REGIONS`] (`ns_id` comes from
/// the bucket the points are written to).
fn sim_identity(i: usize) -> Vec<(&'static str, String)> {
    let (csp, region) = SIM_REGIONS[i % SIM_REGIONS.len()];
    vec![
        ("agent_id", format!("sim-agent-{i:04}")),
        ("mcis_id", format!("mcis-{:02}", i % 20)),
        ("vm_id", format!("vm-{i:04}")),
        ("csp", csp.to_string()),
        ("region", region.to_string()),
        ("hostname", format!("sim-{i:04}")),
    ]
}

/// One round of every simulated VM in line protocol: cpu-total (VM `i` is `i % 100` % busy), memory and the root
/// file system.
fn sim_round() -> String {
    let time = now_nanos();
    let mut out = String::with_capacity(SIM_VMS * 400);
    for i in 0..SIM_VMS {
        let tags: String = sim_identity(i)
            .iter()
            .map(|(k, v)| format!(",{k}={v}"))
            .collect();
        let busy = i % 100;
        out.push_str(&format!(
            "cpu{tags},cpu=cpu-total usage_idle={},usage_user={busy} {time}\n",
            100 - busy
        ));
        out.push_str(&format!("mem{tags} used_percent={} {time}\n", 40 + i % 50));
        out.push_str(&format!(
            "disk{tags},path=/ used_percent={} {time}\n",
            10 + i % 80
        ));
    }
    out
}

/// Writes a round over the InfluxDB write API (bucket `sim`, the VMs' `ns_id`).
fn write_round(collector: &CollectorProc) {
    let (code, body) = http_post(
        &format!("{}/api/v2/write?bucket=sim&precision=ns", collector.http),
        sim_round().as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 204, "{body}");
}

#[test]
fn fleet_view_renders_a_thousand_vms_while_ingest_goes_on() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = CollectorProc::start(&dir.path().join("data"), &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = AgentsClient::connect(collector.grpc.clone()).await.unwrap();
        for i in 0..SIM_VMS {
            let identity = sim_identity(i)
                .into_iter()
                .chain([("ns_id", "sim".to_string())])
                .map(|(key, value)| Tag {
                    key: key.into(),
                    value,
                })
                .collect();
            client
                .register(RegisterRequest {
                    agent_id: format!("sim-agent-{i:04}"),
                    identity,
                    interval_secs: 10,
                    ..RegisterRequest::default()
                })
                .await
                .unwrap();
        }
    });
    write_round(&collector);
    assert_eq!(agents(&collector).len(), SIM_VMS);

    // Ingest goes on while the browser works: a round of all 1,000 VMs every 200 ms.
    let stop = AtomicBool::new(false);
    let rounds = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                write_round(&collector);
                rounds += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            rounds
        });
        browse_a_thousand(&collector);
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap()
    });
    assert!(rounds >= 2, "only {rounds} rounds were written meanwhile");
    // Every round written meanwhile was stored: 1 + rounds rounds of 1,000 cpu rows.
    assert_eq!(collector.count("cpu"), (1 + rounds) * SIM_VMS as u64);
}

/// The fleet and the map of the 1,000 simulated VMs, in the browser.
fn browse_a_thousand(collector: &CollectorProc) {
    let mut browser = Browser::launch();
    browser.open(&format!("{}/#/fleet", collector.http));
    // All 1,000 rows, each with its latest CPU, memory and disk values.
    browser.wait_for(
        "document.querySelectorAll('#fleet-body tr').length === 1000 && \
         [...document.querySelectorAll('#fleet-body tr')].every(tr => [6, 7, 8].every(i => /^\\d+\\.\\d/.test(tr.cells[i].textContent)))",
        "1,000 fleet rows with values",
    );
    assert_eq!(
        browser.eval("document.getElementById('fleet-count').textContent"),
        json!("1000 of 1000 VMs")
    );
    browser.screenshot("fleet-1000");
    // VM 7 is 7 % busy: its row says so.
    assert_eq!(
        browser.eval(
            "[...document.querySelectorAll('#fleet-body tr')].find(tr => tr.cells[1].textContent === 'sim-0007').cells[6].textContent"
        ),
        json!("7.0")
    );
    // Sorting by CPU, busiest first: VMs 99, 199, ... lead.
    browser.eval("document.querySelector('#fleet th[data-k=cpu]').click(); document.querySelector('#fleet th[data-k=cpu]').click(); true");
    assert_eq!(
        browser.eval("document.querySelector('#fleet-body tr').cells[6].textContent"),
        json!("99.0")
    );
    // Filtering: one MCIS of 50 VMs.
    browser.eval("const f = document.getElementById('fleet-filter'); f.value = 'mcis-07'; f.dispatchEvent(new Event('input')); true");
    assert_eq!(
        browser.eval("document.querySelectorAll('#fleet-body tr').length"),
        json!(SIM_VMS / 20)
    );
    assert_eq!(
        browser.eval(
            "[...document.querySelectorAll('#fleet-body tr')].every(tr => tr.cells[4].textContent === 'sim/mcis-07')"
        ),
        json!(true)
    );

    // The map: one marker per region, carrying all 1,000 VMs.
    browser.open(&format!("{}/#/map", collector.http));
    browser.wait_for(
        &format!(
            "document.querySelectorAll('#map g.vm-group').length === {}",
            SIM_REGIONS.len()
        ),
        "a marker per region",
    );
    let total = browser.eval(
        "[...document.querySelectorAll('#map g.vm-group text')].reduce((a, t) => a + Number(t.textContent), 0)",
    );
    assert_eq!(total, json!(SIM_VMS));
    browser.screenshot("map-1000");

    assert_no_errors(&mut browser, "fleet and map of 1,000 VMs");
}
