//! `damselfly-tsbs`: the TSBS "cpu-only" data set (Time Series Benchmark Suite), generated deterministically, sent
//! to a Damselfly collector over gRPC or printed as InfluxDB line protocol for another database, so both store the
//! very same values (benches/storage-size.sh compares the bytes each needs per value).
//!
//! Shape, as in TSBS's `cpu-only` use case: one `cpu` row per host every `--interval-secs`, 10 tags (`hostname`,
//! `region`, `datacenter`, `rack`, `os`, `arch`, `team`, `service`, `service_version`, `service_environment`) and
//! 10 f64 fields (`usage_user` ... `usage_guest_nice`), each a random walk with normal steps (mean 0, sd 1, as
//! TSBS) clamped to [0, 100], reported with two decimals. `--step uniform --step-size 5` draws steps uniformly from
//! [-5, 5] instead (about 10 bits of entropy per value instead of 8.7). A host's values depend only on
//! `(seed, host)` and the step settings.

use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Parser, Subcommand};
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{AckStatus, Field, Point, Tag, WriteBatch, field::Value};
use tonic::codec::CompressionEncoding;

const FIELDS: [&str; 10] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
];
const REGIONS: [(&str, [&str; 3]); 9] = [
    ("us-east-1", ["us-east-1a", "us-east-1b", "us-east-1c"]),
    ("us-west-1", ["us-west-1a", "us-west-1b", "us-west-1c"]),
    ("us-west-2", ["us-west-2a", "us-west-2b", "us-west-2c"]),
    ("eu-west-1", ["eu-west-1a", "eu-west-1b", "eu-west-1c"]),
    (
        "eu-central-1",
        ["eu-central-1a", "eu-central-1b", "eu-central-1c"],
    ),
    (
        "ap-southeast-1",
        ["ap-southeast-1a", "ap-southeast-1b", "ap-southeast-1c"],
    ),
    (
        "ap-southeast-2",
        ["ap-southeast-2a", "ap-southeast-2b", "ap-southeast-2c"],
    ),
    (
        "ap-northeast-1",
        ["ap-northeast-1a", "ap-northeast-1b", "ap-northeast-1c"],
    ),
    ("sa-east-1", ["sa-east-1a", "sa-east-1b", "sa-east-1c"]),
];
const OSES: [&str; 3] = ["Ubuntu16.10", "Ubuntu16.04LTS", "Ubuntu15.10"];
const ARCHES: [&str; 2] = ["x64", "x86"];
const TEAMS: [&str; 4] = ["SF", "NYC", "LON", "CHI"];
const ENVIRONMENTS: [&str; 3] = ["production", "staging", "test"];

#[derive(Debug, Parser)]
#[command(
    name = "damselfly-tsbs",
    version,
    about = "TSBS cpu-only data for storage benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send the data set to a collector (unary `Ingest.Write`, one batch per host and hour; RETRY is honoured).
    Push {
        /// Collector gRPC URL (127.0.0.1 in the benchmarks).
        #[arg(long, default_value = "http://127.0.0.1:4317")]
        collector: String,
        /// Batches in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Print the data set as InfluxDB line protocol (nanosecond timestamps) on stdout.
    LineProtocol {
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Debug, Clone, Copy, ClapArgs)]
struct DataArgs {
    /// Hosts (one series of 10 fields each).
    #[arg(long, default_value_t = 100)]
    hosts: u64,
    /// Hours of data per host.
    #[arg(long, default_value_t = 24)]
    hours: u64,
    /// Seconds between rows of a host.
    #[arg(long, default_value_t = 10)]
    interval_secs: u64,
    /// Seed of the random walks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// First timestamp, Unix seconds (TSBS's default start, 2016-01-01T00:00:00Z).
    #[arg(long, default_value_t = 1_451_606_400)]
    start: i64,
    /// Distribution of the random walks' steps.
    #[arg(long, value_enum, default_value_t = Step::Normal)]
    step: Step,
    /// Standard deviation (normal) or half-width (uniform) of a step.
    #[arg(long, default_value_t = 1.0)]
    step_size: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Step {
    /// Normal, mean 0 (TSBS's `ND(0, 1)` with the default size).
    Normal,
    /// Uniform in [-size, size].
    Uniform,
}

impl DataArgs {
    fn rows_per_hour(&self) -> u64 {
        3600 / self.interval_secs.max(1)
    }
}

/// splitmix64: tiny, fast and fully specified, so the data set never changes with a dependency's version.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// One host: its tags and the state of its 10 random walks.
#[derive(Debug)]
struct Host {
    tags: Vec<(&'static str, String)>,
    walks: [f64; 10],
    rng: Rng,
    row: u64,
    step: Step,
    step_size: f64,
}

impl Host {
    fn new(data: &DataArgs, index: u64) -> Host {
        let mut rng = Rng::new(data.seed, index);
        let (region, datacenters) = REGIONS[rng.below(REGIONS.len())];
        let tags = vec![
            ("hostname", format!("host_{index}")),
            ("region", region.to_string()),
            ("datacenter", datacenters[rng.below(3)].to_string()),
            ("rack", rng.below(100).to_string()),
            ("os", OSES[rng.below(OSES.len())].to_string()),
            ("arch", ARCHES[rng.below(ARCHES.len())].to_string()),
            ("team", TEAMS[rng.below(TEAMS.len())].to_string()),
            ("service", rng.below(20).to_string()),
            ("service_version", rng.below(2).to_string()),
            (
                "service_environment",
                ENVIRONMENTS[rng.below(3)].to_string(),
            ),
        ];
        let walks = std::array::from_fn(|_| rng.unit() * 100.0);
        Host {
            tags,
            walks,
            rng,
            row: 0,
            step: data.step,
            step_size: data.step_size,
        }
    }

    /// The next row: its time offset index and 10 values with two decimals.
    fn next_row(&mut self) -> (u64, [f64; 10]) {
        let values = std::array::from_fn(|i| {
            let step = match self.step {
                Step::Normal => self.rng.normal() * self.step_size,
                Step::Uniform => (self.rng.unit() * 2.0 - 1.0) * self.step_size,
            };
            let v = (self.walks[i] + step).clamp(0.0, 100.0);
            self.walks[i] = v;
            (v * 100.0).round() / 100.0
        });
        let row = self.row;
        self.row += 1;
        (row, values)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::LineProtocol { data } => line_protocol(data),
        Command::Push {
            collector,
            concurrency,
            data,
        } => push(collector, concurrency.max(1), data),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("damselfly-tsbs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn line_protocol(data: DataArgs) -> Result<(), String> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let rows = data.rows_per_hour() * data.hours;
    for h in 0..data.hosts {
        let mut host = Host::new(&data, h);
        let mut prefix = String::from("cpu");
        for (k, v) in &host.tags {
            prefix.push_str(&format!(",{k}={v}"));
        }
        for _ in 0..rows {
            let (row, values) = host.next_row();
            let t = time_nanos(&data, row);
            let mut line = prefix.clone();
            for (i, (name, v)) in FIELDS.iter().zip(values).enumerate() {
                // `{}` prints the shortest text that parses back to the same f64: the receiver stores these values.
                line.push_str(&format!("{}{name}={v}", if i == 0 { ' ' } else { ',' }));
            }
            line.push_str(&format!(" {t}\n"));
            out.write_all(line.as_bytes())
                .map_err(|e| format!("writing stdout: {e}"))?;
        }
    }
    out.flush().map_err(|e| format!("writing stdout: {e}"))
}

fn time_nanos(data: &DataArgs, row: u64) -> i64 {
    (data.start + (row * data.interval_secs) as i64) * 1_000_000_000
}

/// One batch: one host's rows of one hour.
fn batch(data: &DataArgs, host: &mut Host, index: u64, hour: u64) -> WriteBatch {
    let points = (0..data.rows_per_hour())
        .map(|_| {
            let (row, values) = host.next_row();
            Point {
                measurement: "cpu".into(),
                tags: vec![],
                fields: FIELDS
                    .iter()
                    .zip(values)
                    .map(|(k, v)| Field {
                        key: (*k).into(),
                        value: Some(Value::F64(v)),
                    })
                    .collect(),
                time_unix_nano: time_nanos(data, row),
            }
        })
        .collect();
    WriteBatch {
        agent_id: format!("tsbs-{}-host_{index}", data.seed),
        seq: hour + 1,
        common_tags: host
            .tags
            .iter()
            .map(|(k, v)| Tag {
                key: (*k).into(),
                value: v.clone(),
            })
            .collect(),
        points,
        ..Default::default()
    }
}

fn push(collector: String, concurrency: usize, data: DataArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    runtime.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(collector.clone())
            .map_err(|e| format!("bad collector URL {collector:?}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connecting to {collector}: {e}"))?;
        let client = IngestClient::new(channel)
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(1 << 20);
        let started = Instant::now();
        let stored = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for worker in 0..concurrency as u64 {
            let client = client.clone();
            let stored = stored.clone();
            workers.push(tokio::spawn(async move {
                // Worker w sends hosts w, w + concurrency, ...: each host's walk is generated in order.
                let mut index = worker;
                while index < data.hosts {
                    let mut host = Host::new(&data, index);
                    for hour in 0..data.hours {
                        let batch = batch(&data, &mut host, index, hour);
                        let points = write_until_stored(client.clone(), batch).await?;
                        stored.fetch_add(points, Ordering::Relaxed);
                    }
                    index += concurrency as u64;
                }
                Ok::<(), String>(())
            }));
        }
        for worker in workers {
            worker.await.map_err(|e| format!("worker: {e}"))??;
        }
        let points = stored.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "points_stored": points,
                "values_stored": points * FIELDS.len() as u64,
                "seconds": secs,
                "values_per_sec": (points * FIELDS.len() as u64) as f64 / secs,
            })
        );
        Ok(())
    })
}

/// Sends one batch until the collector answers STORED (or DUPLICATE: stored by an earlier attempt).
async fn write_until_stored(
    mut client: IngestClient<tonic::transport::Channel>,
    batch: WriteBatch,
) -> Result<u64, String> {
    let expected = batch.points.len() as u64;
    for _attempt in 0..1000 {
        let ack = match client.write(batch.clone()).await {
            Ok(ack) => ack.into_inner(),
            // The unary call answers "retry later" (buffer full, flush under way) as UNAVAILABLE.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(format!("write {} seq {}: {e}", batch.agent_id, batch.seq)),
        };
        match AckStatus::try_from(ack.status) {
            Ok(AckStatus::Stored) | Ok(AckStatus::Duplicate) => return Ok(expected),
            Ok(AckStatus::Retry) => {
                tokio::time::sleep(Duration::from_millis(ack.retry_after_ms.clamp(10, 5_000)))
                    .await;
            }
            _ => {
                return Err(format!(
                    "{} seq {} not stored: {:?} {}",
                    batch.agent_id, batch.seq, ack.status, ack.message
                ));
            }
        }
    }
    Err(format!(
        "{} seq {}: gave up after 1000 RETRY answers",
        batch.agent_id, batch.seq
    ))
}
