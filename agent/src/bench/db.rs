//! `dbR` and `dbW`: transactions per second on an embedded [redb](https://docs.rs/redb) database in a fresh
//! directory under the work directory, a small stand-in for sysbench's OLTP tests on MySQL.
//!
//! The table has [`ROWS`] rows of [`ROW_BYTES`] bytes keyed by a `u64` id, loaded in one transaction before the
//! clock starts (within the time limit). Keys are drawn uniformly with xorshift64*.
//!
//! - `dbR` (sysbench `oltp_read_only`): a read transaction with 10 point reads and one range read of 100
//!   consecutive rows.
//! - `dbW` (sysbench `oltp_write_only`): a write transaction with 2 updates, then a delete and an insert of one id,
//!   committed with redb's default durability (`fsync` before the commit returns).
//!
//! `detail`: `rows`, `transactions`, and `p50_ms` / `p99_ms` transaction latencies (over a uniform sample of at
//! most [`LATENCY_SAMPLES`] transactions, so a long run keeps its memory bounded).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use redb::{Database, ReadableDatabase, TableDefinition};

use super::{Outcome, quantile, remove_scratch, scratch_dir};

/// Rows in the table.
pub const ROWS: u64 = 10_000;
/// Bytes per row (sysbench's `c` column is 120 characters).
pub const ROW_BYTES: usize = 120;
/// Most transaction latencies kept for the percentiles.
pub const LATENCY_SAMPLES: usize = 10_000;
/// Point reads per `dbR` transaction.
const POINT_READS: usize = 10;
/// Rows per `dbR` range read.
const RANGE_ROWS: u64 = 100;

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("sbtest");

/// `dbR`: read transactions until the deadline.
pub(crate) fn read(dir: &Path, deadline: Instant) -> Outcome {
    run(dir, deadline, |db, rng| {
        let tx = db.begin_read().map_err(err("begin read"))?;
        let table = tx.open_table(TABLE).map_err(err("open table"))?;
        let mut seen = 0usize;
        for _ in 0..POINT_READS {
            if let Some(row) = table.get(rng.below(ROWS)).map_err(err("get"))? {
                seen += row.value().len();
            }
        }
        let low = rng.below(ROWS - RANGE_ROWS);
        for item in table.range(low..low + RANGE_ROWS).map_err(err("range"))? {
            let (_, row) = item.map_err(err("range"))?;
            seen += row.value().len();
        }
        black_box(seen);
        Ok(())
    })
}

/// `dbW`: durable write transactions until the deadline.
pub(crate) fn write(dir: &Path, deadline: Instant) -> Outcome {
    run(dir, deadline, |db, rng| {
        let tx = db.begin_write().map_err(err("begin write"))?;
        {
            let mut table = tx.open_table(TABLE).map_err(err("open table"))?;
            for _ in 0..2 {
                let id = rng.below(ROWS);
                table
                    .insert(id, row(rng.next()).as_slice())
                    .map_err(err("update"))?;
            }
            let id = rng.below(ROWS);
            table.remove(id).map_err(err("delete"))?;
            table
                .insert(id, row(rng.next()).as_slice())
                .map_err(err("insert"))?;
        }
        tx.commit().map_err(err("commit"))
    })
}

/// Sets the database up, runs `transaction` until the deadline, removes the database.
fn run(
    dir: &Path,
    deadline: Instant,
    mut transaction: impl FnMut(&Database, &mut Rng) -> Result<(), String>,
) -> Outcome {
    let scratch = scratch_dir(dir)?;
    let path = scratch.path().join("bench.redb");
    let db = Database::builder()
        // The table is ~1.5 MiB: a small cache holds it, and the agent stays small.
        .set_cache_size(16 << 20)
        .create(&path)
        .map_err(err("create database"))?;
    load(&db)?;

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut latencies = Reservoir::default();
    let start = Instant::now();
    let mut transactions = 0u64;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        transaction(&db, &mut rng)?;
        latencies.add(t0.elapsed().as_secs_f64() * 1e3, &mut rng);
        transactions += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(db);
    remove_scratch(scratch);
    if transactions == 0 || secs <= 0.0 {
        return Err("the time limit is too short for one transaction".into());
    }
    let mut sorted = latencies.samples;
    sorted.sort_by(f64::total_cmp);
    let mut detail = BTreeMap::new();
    detail.insert("rows".into(), ROWS as f64);
    detail.insert("transactions".into(), transactions as f64);
    detail.insert("p50_ms".into(), quantile(&sorted, 0.5));
    detail.insert("p99_ms".into(), quantile(&sorted, 0.99));
    Ok((transactions as f64 / secs, detail))
}

/// Fills the table in one transaction.
fn load(db: &Database) -> Result<(), String> {
    let tx = db.begin_write().map_err(err("begin write"))?;
    {
        let mut table = tx.open_table(TABLE).map_err(err("open table"))?;
        for id in 0..ROWS {
            table.insert(id, row(id).as_slice()).map_err(err("load"))?;
        }
    }
    tx.commit().map_err(err("commit"))
}

/// A row's bytes, derived from a seed.
fn row(seed: u64) -> [u8; ROW_BYTES] {
    let mut row = [0u8; ROW_BYTES];
    for (i, chunk) in row.chunks_mut(8).enumerate() {
        let word = seed
            .wrapping_add(i as u64)
            .wrapping_mul(0x2545_F491_4F6C_DD1D);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    row
}

/// A redb error as the benchmark's error, naming the step.
fn err<E: Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// xorshift64*: fast, deterministic, good enough to pick keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` for `n` far below 2⁶⁴.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A uniform sample of at most [`LATENCY_SAMPLES`] values (Vitter's algorithm R).
#[derive(Default)]
struct Reservoir {
    samples: Vec<f64>,
    seen: u64,
}

impl Reservoir {
    fn add(&mut self, value: f64, rng: &mut Rng) {
        self.seen += 1;
        if self.samples.len() < LATENCY_SAMPLES {
            self.samples.push(value);
        } else if let Ok(slot) = usize::try_from(rng.below(self.seen))
            && slot < LATENCY_SAMPLES
        {
            self.samples[slot] = value;
        }
    }
}
