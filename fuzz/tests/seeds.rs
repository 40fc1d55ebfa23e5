//! Writes the starting corpus under `fuzz/seeds/` (valid and nearly valid inputs of each target):
//! `cargo test -p damselfly-fuzz --test seeds -- --ignored`. The files are committed; this says how they were made.

use std::path::Path;

use damselfly_collector::ingest::remote_write::{Label, Sample, TimeSeries, WriteRequest};
use damselfly_proto::v1::{
    Field, FieldColumn, Point, Series, TableChunk, Tag, WriteBatch, field::Value,
};
use prost::Message;

fn tag(key: &str, value: &str) -> Tag {
    Tag {
        key: key.into(),
        value: value.into(),
    }
}

fn batches() -> Vec<WriteBatch> {
    let point = |measurement: &str, value: Value, time: i64| Point {
        measurement: measurement.into(),
        tags: vec![tag("host", "vm-1"), tag("cloud", "aws")],
        fields: vec![Field {
            key: "usage".into(),
            value: Some(value),
        }],
        time_unix_nano: time,
    };
    let points = WriteBatch {
        agent_id: "agent-1".into(),
        seq: 7,
        common_tags: vec![tag("ns_id", "ns1"), tag("mcis_id", "web")],
        points: vec![
            point("cpu", Value::F64(12.5), 1_700_000_000_000_000_000),
            point("cpu", Value::F64(13.5), 1_700_000_001_000_000_000),
            point("mem", Value::U64(1 << 30), 1_700_000_000_000_000_000),
            point("disk", Value::I64(-3), 1_700_000_000_000_000_000),
            point("net", Value::Bool(true), 1_700_000_000_000_000_000),
            point("os", Value::Str("linux".into()), 1_700_000_000_000_000_000),
        ],
        chunks: Vec::new(),
    };
    let chunks = WriteBatch {
        agent_id: "agent-2".into(),
        seq: 1,
        common_tags: vec![tag("ns_id", "ns1")],
        points: Vec::new(),
        chunks: vec![TableChunk {
            measurement: "cpu".into(),
            tag_keys: vec!["host".into(), "core".into()],
            series: vec![
                Series {
                    tag_values: vec!["vm-1".into(), "0".into()],
                },
                Series {
                    tag_values: vec!["vm-1".into(), "1".into()],
                },
            ],
            series_index: vec![0, 1, 0],
            time_unix_nano: vec![1, 1, 2],
            fields: vec![
                FieldColumn {
                    key: "usage".into(),
                    f64: vec![1.0, 2.0, 3.0],
                    ..Default::default()
                },
                FieldColumn {
                    key: "state".into(),
                    str: vec!["up".into(), "down".into()],
                    present: vec![0b101],
                    ..Default::default()
                },
            ],
        }],
    };
    let unkeyed = WriteBatch {
        chunks: chunks.chunks.clone(),
        ..Default::default()
    };
    vec![points, chunks, unkeyed]
}

fn write_request() -> WriteRequest {
    let label = |name: &str, value: &str| Label {
        name: name.into(),
        value: value.into(),
    };
    WriteRequest {
        timeseries: vec![
            TimeSeries {
                labels: vec![
                    label("__name__", "node_cpu_seconds_total"),
                    label("cpu", "0"),
                    label("mode", "idle"),
                ],
                samples: vec![
                    Sample {
                        value: 1.5,
                        timestamp: 1_700_000_000_000,
                    },
                    Sample {
                        value: f64::from_bits(0x7ff0_0000_0000_0002),
                        timestamp: 1_700_000_001_000,
                    },
                ],
                histograms: Vec::new(),
            },
            TimeSeries {
                labels: vec![label("__name__", "up"), label("time", "x")],
                samples: vec![Sample {
                    value: 1.0,
                    timestamp: 1_700_000_000_000,
                }],
                histograms: vec![vec![1, 2, 3]],
            },
        ],
    }
}

fn save(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).expect("create the seeds dir");
    std::fs::write(dir.join(name), data).expect("write a seed");
}

#[test]
#[ignore = "writes fuzz/seeds; run by hand when the formats change"]
fn write_seeds() {
    let lines = [
        (
            "agent",
            "cpu,host=vm-1,cloud=aws usage=12.5,idle=87.5 1700000000000000000\nmem,host=vm-1 used=123i,free=5u,ok=t 1700000000000000000\n",
        ),
        (
            "escapes",
            "my\\ table,tag\\,k=v\\=1\\ x field\\ one=\"quoted \\\"s\\\" \\\\\",b=FALSE\n# comment\n\n  cpu usage=1 -5\n",
        ),
        (
            "errors",
            "cpu\ncpu,host usage=1\ncpu usage=1i,usage=2\ncpu usage=nan\ncpu usage=1 99999999999999999999\ncpu,ns_id=other usage=1\n",
        ),
        ("conflict", "t f=1i\nt f=1.5\nt,f=x g=1\nt time=1\n"),
    ];
    for (name, body) in lines {
        save("line_protocol", name, body.as_bytes());
    }

    let request = write_request().encode_to_vec();
    let mut snappy = vec![0u8];
    snappy.extend(
        snap::raw::Encoder::new()
            .compress_vec(&request)
            .expect("snappy"),
    );
    save("remote_write", "snappy", &snappy);
    let mut raw = vec![1u8];
    raw.extend(&request);
    save("remote_write", "raw", &raw);
    let mut no_ns = vec![3u8];
    no_ns.extend(&request);
    save("remote_write", "raw_no_ns", &no_ns);

    for (i, batch) in batches().iter().enumerate() {
        save("grpc_batch", &format!("batch{i}"), &batch.encode_to_vec());
    }

    // Framed, whole and cut in the middle; then raw records as the WAL writes them.
    let mut framed = vec![1u8, 255];
    for batch in batches() {
        let payload = batch.encode_to_vec();
        framed.extend((payload.len() as u16).to_le_bytes());
        framed.extend(payload);
    }
    save("wal_segment", "framed", &framed);
    framed[1] = 128;
    save("wal_segment", "framed_cut", &framed);
    let mut raw = vec![0u8];
    for (i, batch) in batches().iter().enumerate() {
        damselfly_collector::wal::encode_record(&mut raw, i as u64 + 1, &batch.encode_to_vec())
            .expect("encode a record");
    }
    save("wal_segment", "raw", &raw);
}
