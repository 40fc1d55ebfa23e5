//! Black-box tests of the agent registry: `Agents.Register` / `Agents.Heartbeat` over real gRPC, the status an
//! agent gets as it goes silent, `GET /api/v1/agents`, `damselfly agents`, the registry surviving a restart, and
//! invalid requests refused with precise messages. Each test runs its own collector process on a fresh directory.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{CollectorProc, damselfly_bin, http_get, http_request, wait_until};
use damselfly_proto::v1::agents_client::AgentsClient;
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{
    AckStatus, AgentMode, Field, HeartbeatRequest, HostFacts, Point, RegisterRequest, Tag,
    WriteBatch,
};
use tonic::Code;
use tonic::transport::Channel;

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::TempDir::new().unwrap(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts a collector that wants a heartbeat every second (stale after 3 s, down after 10 s).
    fn start(&self) -> CollectorProc {
        let config = self.dir.path().join("collector.toml");
        std::fs::write(&config, "heartbeat_interval_secs = 1\n").unwrap();
        CollectorProc::start(&self.data_dir(), &["--config", config.to_str().unwrap()])
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag {
        key: key.into(),
        value: value.into(),
    }
}

fn registration(agent_id: &str, vm: &str, mode: AgentMode, listen_addr: &str) -> RegisterRequest {
    RegisterRequest {
        agent_id: agent_id.into(),
        identity: vec![
            tag("ns_id", "ns1"),
            tag("mcis_id", "mcis1"),
            tag("vm_id", vm),
            tag("csp", "aws"),
            tag("region", "ap-northeast-2"),
            tag("zone", "ap-northeast-2a"),
            tag("hostname", &format!("{vm}.internal")),
            tag("os_type", "linux"),
            tag("agent_id", agent_id),
        ],
        facts: Some(HostFacts {
            vcpus: 4,
            memory_bytes: 16 << 30,
            os_name: "Ubuntu".into(),
            os_version: "24.04".into(),
            kernel_version: "6.8.0-45-generic".into(),
            cpu_model: "Intel(R) Xeon(R) Platinum 8375C".into(),
            arch: "x86_64".into(),
            agent_version: "0.1.0-test".into(),
        }),
        mode: mode as i32,
        listen_addr: listen_addr.into(),
        interval_secs: 10,
    }
}

fn heartbeat(agent_id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        agent_id: agent_id.into(),
        pending_batches: 5,
        pending_bytes: 12_345,
        dropped_batches: 2,
        uptime_secs: 42,
        ..HeartbeatRequest::default()
    }
}

async fn agents_client(url: &str) -> AgentsClient<Channel> {
    AgentsClient::connect(url.to_owned())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// `GET /api/v1/agents` (with `query`, e.g. `?status=stale`): the agents, in the order served.
fn list(collector: &CollectorProc, query: &str) -> Vec<serde_json::Value> {
    let (code, body) = http_get(&format!("{}/api/v1/agents{query}", collector.http)).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn ids(agents: &[serde_json::Value]) -> Vec<&str> {
    agents
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect()
}

fn find<'a>(agents: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    agents
        .iter()
        .find(|a| a["agent_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {agents:?}"))
}

fn damselfly(args: &[&str]) -> Output {
    Command::new(damselfly_bin())
        .args(args)
        .env_remove("DAMSELFLY_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run damselfly")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

#[test]
fn registration_heartbeats_status_cli_and_restart() {
    let scratch = Scratch::new();
    let collector = scratch.start();
    let rt = runtime();
    let grpc = collector.grpc.clone();

    // Two agents register: one pushes, one is pulled from.
    let (push_interval, pull_interval) = rt.block_on(async {
        let mut client = agents_client(&grpc).await;
        let push = client
            .register(registration("agent-push", "vm-1", AgentMode::Push, ""))
            .await
            .expect("register the push agent")
            .into_inner();
        let pull = client
            .register(registration(
                "agent-pull",
                "vm-2",
                AgentMode::Pull,
                "10.0.0.7:7070",
            ))
            .await
            .expect("register the pull agent")
            .into_inner();
        let hb = client
            .heartbeat(heartbeat("agent-push"))
            .await
            .expect("heartbeat")
            .into_inner();
        assert!(hb.registered);
        (push.heartbeat_interval_ms, pull.heartbeat_interval_ms)
    });
    assert_eq!((push_interval, pull_interval), (1000, 1000));

    // An agent that only pushes batches is listed too, as unregistered.
    rt.block_on(async {
        let mut ingest = IngestClient::connect(grpc.clone()).await.unwrap();
        let ack = ingest
            .write(WriteBatch {
                chunks: Vec::new(),
                agent_id: "agent-batch".into(),
                seq: 1,
                common_tags: vec![tag("vm_id", "vm-3")],
                points: vec![Point {
                    measurement: "cpu".into(),
                    tags: vec![],
                    fields: vec![Field {
                        key: "usage".into(),
                        value: Some(Value::F64(1.0)),
                    }],
                    time_unix_nano: 1_700_000_000_000_000_000,
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    });

    let agents = list(&collector, "");
    assert_eq!(ids(&agents), ["agent-batch", "agent-pull", "agent-push"]);
    let push = find(&agents, "agent-push");
    assert_eq!(push["status"], "healthy");
    assert_eq!(push["mode"], "push");
    assert_eq!(push["listen_addr"], "");
    assert_eq!(push["version"], "0.1.0-test");
    assert_eq!(push["interval_secs"], 10);
    assert_eq!(push["registered"], true);
    assert_eq!(push["identity"]["ns_id"], "ns1");
    assert_eq!(push["identity"]["vm_id"], "vm-1");
    assert_eq!(push["identity"]["region"], "ap-northeast-2");
    assert_eq!(push["facts"]["vcpus"], 4);
    assert_eq!(push["facts"]["memory_bytes"], 16u64 << 30);
    assert_eq!(push["facts"]["kernel_version"], "6.8.0-45-generic");
    assert_eq!(push["pending_batches"], 5);
    assert_eq!(push["pending_bytes"], 12_345);
    assert_eq!(push["dropped_batches"], 2);
    assert_eq!(push["uptime_secs"], 42);
    assert!(push["last_heartbeat"].is_string(), "{push}");
    assert!(push["first_registered"].is_string(), "{push}");
    assert!(push["last_seen_secs_ago"].as_u64().unwrap() <= 1, "{push}");
    let pull = find(&agents, "agent-pull");
    assert_eq!(pull["status"], "healthy");
    assert_eq!(pull["mode"], "pull");
    assert_eq!(pull["listen_addr"], "10.0.0.7:7070");
    assert!(pull["last_heartbeat"].is_null(), "{pull}");
    let batch_only = find(&agents, "agent-batch");
    assert_eq!(batch_only["status"], "unregistered");
    assert_eq!(batch_only["registered"], false);
    assert!(batch_only["last_batch"].is_string(), "{batch_only}");
    let pull_registered = pull["last_registered"].clone();

    // agent-push keeps beating; agent-pull stays silent and turns stale after 3 intervals.
    let beats = rt.spawn({
        let grpc = grpc.clone();
        async move {
            let mut client = agents_client(&grpc).await;
            loop {
                let r = client.heartbeat(heartbeat("agent-push")).await;
                assert!(r.expect("heartbeat").into_inner().registered);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    wait_until(Duration::from_secs(10), "agent-pull to turn stale", || {
        ids(&list(&collector, "?status=stale")) == ["agent-pull"]
    });
    let stale = list(&collector, "?status=stale");
    assert!(stale[0]["last_seen_secs_ago"].as_u64().unwrap() >= 3);
    assert_eq!(ids(&list(&collector, "?status=healthy")), ["agent-push"]);
    assert_eq!(
        ids(&list(&collector, "?status=unregistered")),
        ["agent-batch"]
    );
    let (code, body) =
        http_get(&format!("{}/api/v1/agents?status=sleepy", collector.http)).unwrap();
    assert_eq!(code, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("unknown status \"sleepy\""),
        "{body}"
    );
    let (code, body) = http_request(
        "POST",
        &format!("{}/api/v1/agents", collector.http),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(code, 405, "{}", String::from_utf8_lossy(&body));

    // The CLI.
    let out = damselfly(&["agents", "--url", &collector.http]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("agent_id")
            && lines[0].contains("ns_id")
            && lines[0].contains("last_seen")
            && lines[0].ends_with("version"),
        "{text}"
    );
    let row = |id: &str| -> Vec<&str> {
        lines
            .iter()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id} in\n{text}"))
            .split_whitespace()
            .collect()
    };
    let push_row = row("agent-push");
    assert_eq!(
        push_row[..9],
        [
            "agent-push",
            "ns1",
            "mcis1",
            "vm-1",
            "aws",
            "ap-northeast-2",
            "vm-1.internal",
            "push",
            "healthy",
        ],
        "{text}"
    );
    assert!(push_row[9].ends_with('s'), "{text}");
    assert_eq!(push_row[10..], ["ago", "0.1.0-test"], "{text}");
    let pull_row = row("agent-pull");
    assert_eq!(pull_row[7..9], ["pull", "stale"], "{text}");
    assert_eq!(
        row("agent-batch")[1..9],
        ["-", "-", "-", "-", "-", "-", "push", "unregistered"],
        "{text}"
    );
    // Columns are aligned: every row has `status` where the header has it.
    let status_col = lines[0].find("status").unwrap();
    for l in &lines[1..4] {
        assert!(
            ["healthy", "stale", "unregistered"]
                .iter()
                .any(|s| l[status_col..].starts_with(s)),
            "{text}"
        );
    }
    assert_eq!(lines[4], "(3 agents)", "{text}");

    let out = damselfly(&["agents", "--url", &collector.http, "--format", "json"]);
    assert!(out.status.success(), "{out:?}");
    let json: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(ids(&json), ["agent-batch", "agent-pull", "agent-push"]);
    let out = damselfly(&["agents", "--url", &collector.http, "--status", "stale"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("agent-pull") && !text.contains("agent-push"),
        "{text}"
    );
    assert!(text.ends_with("(1 agent)\n"), "{text}");

    // A restarted collector still lists them.
    beats.abort();
    let status = collector.proc.terminate();
    assert!(status.success(), "{status:?}");
    assert!(scratch.data_dir().join("state/agents.json").is_file());
    let collector = scratch.start();
    let agents = list(&collector, "");
    assert_eq!(ids(&agents), ["agent-batch", "agent-pull", "agent-push"]);
    let pull = find(&agents, "agent-pull");
    assert_eq!(pull["listen_addr"], "10.0.0.7:7070");
    assert_eq!(pull["identity"]["vm_id"], "vm-2");
    assert_eq!(pull["last_registered"], pull_registered);
    assert_eq!(find(&agents, "agent-push")["pending_bytes"], 12_345);
    assert_eq!(find(&agents, "agent-batch")["status"], "unregistered");
    // Known agents keep beating without registering again; unknown ones are asked to register.
    let grpc = collector.grpc.clone();
    rt.block_on(async {
        let mut client = agents_client(&grpc).await;
        let known = client.heartbeat(heartbeat("agent-push")).await.unwrap();
        assert!(known.into_inner().registered);
        let unknown = client.heartbeat(heartbeat("agent-new")).await.unwrap();
        assert!(!unknown.into_inner().registered);
        let batch_only = client.heartbeat(heartbeat("agent-batch")).await.unwrap();
        assert!(!batch_only.into_inner().registered);
    });
    // The silent agent's status follows its last_seen across the restart: down after 10 intervals.
    wait_until(Duration::from_secs(15), "agent-pull to be down", || {
        find(&list(&collector, ""), "agent-pull")["status"] == "down"
    });
    let out = damselfly(&["agents", "--url", &collector.http, "--status", "down"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("agent-pull"), "{}", stdout(&out));
}

#[test]
fn invalid_requests_are_refused_precisely() {
    let scratch = Scratch::new();
    let collector = scratch.start();
    let rt = runtime();
    let grpc = collector.grpc.clone();
    rt.block_on(async {
        let mut client = agents_client(&grpc).await;
        let many_tags: Vec<Tag> = (0..33).map(|i| tag(&format!("k{i}"), "v")).collect();
        let cases = [
            (
                registration("", "vm-1", AgentMode::Push, ""),
                "agent_id is empty",
            ),
            (
                registration(&"a".repeat(257), "vm-1", AgentMode::Push, ""),
                "agent_id must be 1-256 bytes without control characters",
            ),
            (
                registration("p", "vm-1", AgentMode::Pull, ""),
                "listen_addr is required in pull mode",
            ),
            (
                registration("p", "vm-1", AgentMode::Pull, "http://10.0.0.7:7070"),
                "listen_addr \"http://10.0.0.7:7070\" must be host:port without a scheme",
            ),
            (
                RegisterRequest {
                    identity: many_tags,
                    ..registration("t", "vm-1", AgentMode::Push, "")
                },
                "identity has 33 tags; the limit is 32",
            ),
            (
                RegisterRequest {
                    identity: vec![tag("vm_id", &"x".repeat(5000))],
                    ..registration("t", "vm-1", AgentMode::Push, "")
                },
                "identity tags are more than 4096 bytes in total",
            ),
            (
                RegisterRequest {
                    identity: vec![tag("csp", "aws"), tag("csp", "gcp")],
                    ..registration("t", "vm-1", AgentMode::Push, "")
                },
                "identity tag \"csp\" appears twice",
            ),
            (
                RegisterRequest {
                    mode: 9,
                    ..registration("t", "vm-1", AgentMode::Push, "")
                },
                "mode 9 is not a known AgentMode",
            ),
        ];
        for (request, want) in cases {
            let status = client
                .register(request)
                .await
                .expect_err("an invalid registration");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains(want),
                "{:?} should contain {want:?}",
                status.message()
            );
        }
        let status = client
            .heartbeat(heartbeat(""))
            .await
            .expect_err("empty agent id");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), "agent_id is empty");
        let unknown = client
            .heartbeat(heartbeat("never-registered"))
            .await
            .unwrap();
        assert!(!unknown.into_inner().registered);
    });
    assert!(list(&collector, "").is_empty(), "nothing was registered");
}
