//! Entry points of the fuzz targets (`fuzz/`) and of their regression tests (`tests/fuzz_regressions.rs`).
//!
//! Each takes arbitrary bytes through the code a collector runs on untrusted input — the line-protocol parser, the
//! remote-write decoder, the WAL reader and the gRPC batch decoder — and then through what the writer does with an
//! accepted batch, minus the disk: validation, the schema check, the write buffer and its Arrow conversion. Errors
//! are the expected outcome for most inputs; a panic (or a broken invariant, asserted here) is a bug. Each returns
//! the rows it stored, so tests can tell that valid inputs get all the way through.

use std::collections::HashMap;

use damselfly_proto::v1::{Tag, WriteBatch};
use prost::Message;

use crate::buffer::Buffer;
use crate::catalog::Catalog;
use crate::ingest::line_protocol::{self, ParseOptions, Precision};
use crate::ingest::prometheus::SchemaGuard;
use crate::ingest::remote_write;
use crate::model::{BatchLimits, prepare_batch, prepare_unkeyed_batch};

/// Bodies and batches bigger than this are cut: the limits that bound them are checked before the parsers run.
const MAX_INPUT_BYTES: usize = 1 << 20;
/// The collector's default `max_batch_points`.
const MAX_BATCH_POINTS: usize = 100_000;
/// The collector's default `max_line_bytes`.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// The writer's in-memory state: the schema catalog and the write buffer.
#[derive(Debug, Default)]
struct MemoryStore {
    catalog: Catalog,
    buffer: Buffer,
}

impl MemoryStore {
    /// What `Store::write` does with a prepared batch, minus the WAL: check the schema, apply it, buffer the rows.
    /// Returns the rows stored, or `None` when the schema check refuses the batch.
    fn write(&mut self, batch: &WriteBatch) -> Option<usize> {
        self.catalog.check_batch(batch, &mut HashMap::new()).ok()?;
        if let Err(conflict) = self.catalog.apply_batch(batch) {
            panic!("check_batch passed but apply_batch refused: {conflict}");
        }
        Some(self.buffer.append_batch(batch, |_, _| true))
    }

    /// What a flush does before writing Parquet: every table's buffered rows as Arrow, conformed to the table's
    /// schema. Every buffered row must come out.
    fn flush(&mut self) {
        let mut rows = 0;
        let names: Vec<String> = self.buffer.table_names().map(str::to_string).collect();
        for name in names {
            let Some(table) = self.buffer.table_mut(&name) else {
                continue;
            };
            let schema = match self.catalog.table(&name) {
                Some(schema) => schema.arrow_schema(),
                None => panic!("table {name:?} is buffered but not in the catalog"),
            };
            for batch in table.snapshot() {
                rows += batch.num_rows();
                if let Err(e) = crate::persist::conform(&batch, &schema) {
                    panic!("buffered rows of {name:?} do not conform to the catalog: {e}");
                }
            }
        }
        assert_eq!(
            rows,
            self.buffer.rows(),
            "rows lost between buffer and Arrow"
        );
    }
}

/// A directory of its own under the system's temporary directory, removed when dropped.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("damselfly-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cut(data: &[u8]) -> &[u8] {
    &data[..data.len().min(MAX_INPUT_BYTES)]
}

/// The InfluxDB line-protocol parser (`POST /api/v2/write`): the body is parsed for namespace `fuzz`, the accepted
/// rows stored. The parser checks rows against the stored schema, so whatever it accepts the store must accept.
pub fn line_protocol(data: &[u8]) -> usize {
    let data = cut(data);
    let mut store = MemoryStore::default();
    let mut stored = 0;
    // Twice: the second pass parses against the schema the first one stored.
    for pass in 0..2 {
        let forced = [("ns_id", "fuzz")];
        let options = ParseOptions {
            precision: if pass == 0 {
                Precision::Nanoseconds
            } else {
                Precision::Seconds
            },
            default_time_ns: 1_700_000_000_000_000_000,
            max_line_bytes: MAX_LINE_BYTES,
            forced_tags: &forced,
        };
        let catalog = store.catalog.clone();
        let parsed = line_protocol::parse(data, &options, &mut |t| catalog.table(t).cloned());
        let lines = data.split(|&b| b == b'\n').count();
        assert!(
            parsed.errors.len() <= lines,
            "more errors than lines: {:?}",
            parsed.errors
        );
        if parsed.rows == 0 || parsed.rows > MAX_BATCH_POINTS {
            continue;
        }
        let batch = WriteBatch {
            common_tags: vec![Tag {
                key: "ns_id".into(),
                value: "fuzz".into(),
            }],
            chunks: parsed.chunks,
            ..Default::default()
        };
        let batch = match prepare_unkeyed_batch(batch, BatchLimits::points(MAX_BATCH_POINTS)) {
            Ok(batch) => batch,
            Err(e) => panic!("the parser accepted rows the store refuses: {e}"),
        };
        match store.write(&batch) {
            Some(rows) => assert_eq!(rows, parsed.rows, "rows lost between parser and buffer"),
            None => panic!("the parser accepted rows that conflict with the schema it was given"),
        }
        stored += parsed.rows;
        store.flush();
    }
    stored
}

/// The Prometheus remote-write decoder (`POST /api/v1/write`): snappy block decompression bounded by
/// `max_write_bytes`, the `WriteRequest` protobuf, the mapping of series to tables, then the store.
pub fn remote_write(data: &[u8]) -> usize {
    let data = cut(data);
    // The first byte picks whether the rest is taken as snappy-compressed (as sent) or as the raw protobuf, so the
    // fuzzer reaches the decoder without having to learn snappy.
    let Some((&mode, body)) = data.split_first() else {
        return 0;
    };
    let raw = if mode & 1 == 0 {
        match remote_write::decompress(body, MAX_INPUT_BYTES) {
            Ok(raw) => raw,
            Err(_) => return 0,
        }
    } else {
        body.to_vec()
    };
    let mut store = MemoryStore::default();
    let catalog = store.catalog.clone();
    let guard = SchemaGuard::with_lookup(|t| catalog.table(t).cloned());
    let ns = (mode & 2 == 0).then_some("fuzz");
    let Ok(mapped) = remote_write::decode_request(raw, ns, MAX_BATCH_POINTS, guard) else {
        return 0;
    };
    let mut rows = 0;
    for batch in mapped.batches {
        let batch = match prepare_unkeyed_batch(batch, BatchLimits::points(MAX_BATCH_POINTS)) {
            Ok(batch) => batch,
            Err(e) => panic!("remote write mapped samples the store refuses: {e}"),
        };
        // Batches of one request share tables: a later one may conflict only if the mapping let it through.
        match store.write(&batch) {
            Some(stored) => rows += stored,
            None => panic!("remote write mapped samples that conflict with the schema"),
        }
    }
    assert_eq!(rows, mapped.rows, "samples lost between decoder and buffer");
    store.flush();
    rows
}

/// The gRPC batch decoder (`WriteBatch` of `Ingest/Write` and `Ingest/Stream`): the protobuf, validation and
/// normalization (points to columnar chunks), then the store.
pub fn grpc_batch(data: &[u8]) -> usize {
    let data = cut(data);
    let Ok(batch) = WriteBatch::decode(data) else {
        return 0;
    };
    let Ok(batch) = prepare_batch(batch, BatchLimits::points(MAX_BATCH_POINTS)) else {
        return 0;
    };
    let rows: usize = batch
        .chunks
        .iter()
        .map(damselfly_proto::columnar::chunk_rows)
        .sum();
    let mut store = MemoryStore::default();
    match store.write(&batch) {
        Some(stored) => {
            assert_eq!(stored, rows, "rows lost between decoder and buffer");
            store.flush();
            stored
        }
        None => 0,
    }
}

/// The WAL reader: a segment file as found after a crash, read by `Wal::open`, whose records go through the
/// replay's decoding into the store.
///
/// The first byte picks the form of the rest. Raw: the rest is the segment's bytes after the magic, as is (the
/// reader must stop at the first damaged record). Framed: the rest is split into payloads (a 2-byte length before
/// each), written as well-formed records (so the fuzzer does not have to learn CRC-32C), then cut at a point the
/// second byte picks, as a crash mid-write would: the reader must give back exactly the records before the cut.
pub fn wal_segment(data: &[u8]) -> usize {
    let data = cut(data);
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let dir = ScratchDir::new();
    let mut segment = crate::wal::SEGMENT_MAGIC.to_vec();
    let mut expected: Option<Vec<Vec<u8>>> = None;
    if mode & 1 == 0 {
        segment.extend_from_slice(rest);
    } else if let Some((&cut_at, mut rest)) = rest.split_first() {
        let mut payloads = Vec::new();
        let mut ends = Vec::new();
        while rest.len() >= 2 {
            let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
            let payload = rest[2..2 + len].to_vec();
            rest = &rest[2 + len..];
            let seq = payloads.len() as u64 + 1;
            if crate::wal::encode_record(&mut segment, seq, &payload).is_err() {
                return 0;
            }
            payloads.push(payload);
            ends.push(segment.len());
        }
        // A cut anywhere in the file (255: no cut).
        if cut_at != u8::MAX {
            let keep = segment.len() * usize::from(cut_at) / 255;
            segment.truncate(keep.max(crate::wal::SEGMENT_MAGIC.len()));
        }
        let whole = ends.iter().filter(|&&end| end <= segment.len()).count();
        payloads.truncate(whole);
        expected = Some(payloads);
    }
    let path = dir.0.join(format!("{:020}.wal", 1));
    if std::fs::create_dir_all(&dir.0).is_err() || std::fs::write(&path, &segment).is_err() {
        return 0;
    }
    let replay = match crate::wal::Wal::open(&dir.0, 1, false) {
        Ok((_, replay)) => replay,
        Err(e) => {
            assert!(expected.is_none(), "well-formed records refused: {e}");
            return 0;
        }
    };
    if let Some(expected) = expected {
        let got: Vec<&[u8]> = replay
            .records
            .iter()
            .map(|r| r.payload.as_slice())
            .collect();
        let want: Vec<&[u8]> = expected.iter().map(Vec::as_slice).collect();
        assert_eq!(
            got, want,
            "the WAL reader did not give back the whole records"
        );
    }
    let mut store = MemoryStore::default();
    let mut stored = 0;
    for record in &replay.records {
        if let Ok(batch) = crate::store::decode_wal_batch(&record.payload) {
            stored += store.write(&batch).unwrap_or(0);
        }
    }
    store.flush();
    stored
}
