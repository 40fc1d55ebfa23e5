//! Re-encodes every Parquet file of a Damselfly data directory with alternative layouts and prints the bytes each
//! needs per stored value: the evidence behind `persist::writer_properties` and `persist::encode_floats`
//! (benches/storage-size.sh runs it on TSBS data and on real agent data; figures in benches/RESULTS.md).
//!
//! Usage: `cargo run --release -p damselfly-collector --example storage_variants -- DATA_DIR [TABLE...]`
//! (DATA_DIR is the collector's `--data-dir`; it must not be in use). Every variant holds the same rows; only the
//! encodings differ. A value is one non-null field cell (tags and time are not counted as values, but their bytes
//! are in every file).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use damselfly_collector::catalog::TableSchema;
use damselfly_collector::model::{TIME_COLUMN, tag_data_type};
use damselfly_collector::persist;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;

/// How a variant stores floats: as written by the collector (decimals where exact) or as plain f64.
#[derive(Clone, Copy, PartialEq)]
enum Floats {
    DecimalWhereExact,
    /// Decimals always at precision 18 (INT64), even where 9 digits (INT32) would do.
    DecimalInt64,
    F64,
}

struct Variant {
    name: &'static str,
    floats: Floats,
    tune: fn(WriterPropertiesBuilder, &SchemaRef) -> WriterPropertiesBuilder,
}

fn zstd(level: i32) -> Compression {
    Compression::ZSTD(ZstdLevel::try_new(level).unwrap_or_default())
}

fn columns_of(schema: &SchemaRef, pick: impl Fn(&DataType) -> bool) -> Vec<ColumnPath> {
    schema
        .fields()
        .iter()
        .filter(|f| f.name() != TIME_COLUMN && pick(f.data_type()))
        .map(|f| ColumnPath::from(f.name().as_str()))
        .collect()
}

fn variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "damselfly (as written: decimal floats, delta or dictionary ints, zstd 3)",
            floats: Floats::DecimalWhereExact,
            tune: |b, _| b,
        },
        Variant {
            name: "  zstd 1",
            floats: Floats::DecimalWhereExact,
            tune: |b, _| b.set_compression(zstd(1)),
        },
        Variant {
            name: "  zstd 6",
            floats: Floats::DecimalWhereExact,
            tune: |b, _| b.set_compression(zstd(6)),
        },
        Variant {
            name: "  zstd 9",
            floats: Floats::DecimalWhereExact,
            tune: |b, _| b.set_compression(zstd(9)),
        },
        Variant {
            name: "  zstd 15",
            floats: Floats::DecimalWhereExact,
            tune: |b, _| b.set_compression(zstd(15)),
        },
        Variant {
            name: "  no bloom filters",
            floats: Floats::DecimalWhereExact,
            tune: |mut b, s| {
                for c in columns_of(s, |t| *t == tag_data_type()) {
                    b = b.set_column_bloom_filter_enabled(c, false);
                }
                b
            },
        },
        Variant {
            name: "  pages of 100k rows (default 20k)",
            floats: Floats::DecimalWhereExact,
            tune: |b, _| b.set_data_page_row_count_limit(100_000),
        },
        Variant {
            name: "  integers and decimals: always delta (no dictionary estimate)",
            floats: Floats::DecimalWhereExact,
            tune: |mut b, s| {
                for c in columns_of(s, |t| {
                    matches!(
                        t,
                        DataType::Int64 | DataType::UInt64 | DataType::Decimal128(..)
                    )
                }) {
                    b = b.set_column_dictionary_enabled(c, false);
                }
                b
            },
        },
        Variant {
            name: "  integers: dictionary, then PLAIN",
            floats: Floats::DecimalWhereExact,
            tune: |mut b, s| {
                for c in columns_of(s, |t| matches!(t, DataType::Int64 | DataType::UInt64)) {
                    b = b
                        .set_column_dictionary_enabled(c.clone(), true)
                        .set_column_encoding(c, Encoding::PLAIN);
                }
                b
            },
        },
        Variant {
            name: "  decimals: dictionary, then delta",
            floats: Floats::DecimalWhereExact,
            tune: |mut b, s| {
                for c in columns_of(s, |t| matches!(t, DataType::Decimal128(..))) {
                    b = b.set_column_dictionary_enabled(c, true);
                }
                b
            },
        },
        Variant {
            name: "  decimals: BYTE_STREAM_SPLIT instead of delta",
            floats: Floats::DecimalWhereExact,
            tune: |mut b, s| {
                for c in columns_of(s, |t| matches!(t, DataType::Decimal128(..))) {
                    b = b.set_column_encoding(c, Encoding::BYTE_STREAM_SPLIT);
                }
                b
            },
        },
        Variant {
            name: "  decimals: BYTE_STREAM_SPLIT, zstd 15",
            floats: Floats::DecimalWhereExact,
            tune: |mut b, s| {
                for c in columns_of(s, |t| matches!(t, DataType::Decimal128(..))) {
                    b = b.set_column_encoding(c, Encoding::BYTE_STREAM_SPLIT);
                }
                b.set_compression(zstd(15))
            },
        },
        Variant {
            name: "  decimals always INT64 (precision 18)",
            floats: Floats::DecimalInt64,
            tune: |b, _| b,
        },
        Variant {
            name: "  other floats: BYTE_STREAM_SPLIT instead of dictionary",
            floats: Floats::DecimalWhereExact,
            tune: |mut b, s| {
                for c in columns_of(s, |t| *t == DataType::Float64) {
                    b = b
                        .set_column_dictionary_enabled(c.clone(), false)
                        .set_column_encoding(c, Encoding::BYTE_STREAM_SPLIT);
                }
                b
            },
        },
        Variant {
            name: "floats as f64: BYTE_STREAM_SPLIT",
            floats: Floats::F64,
            tune: |mut b, s| {
                for c in columns_of(s, |t| *t == DataType::Float64) {
                    b = b
                        .set_column_dictionary_enabled(c.clone(), false)
                        .set_column_encoding(c, Encoding::BYTE_STREAM_SPLIT);
                }
                b
            },
        },
        Variant {
            name: "floats as f64: dictionary, then PLAIN",
            floats: Floats::F64,
            tune: |b, _| b,
        },
        Variant {
            name: "floats as f64: PLAIN",
            floats: Floats::F64,
            tune: |mut b, s| {
                for c in columns_of(s, |t| *t == DataType::Float64) {
                    b = b
                        .set_column_dictionary_enabled(c.clone(), false)
                        .set_column_encoding(c, Encoding::PLAIN);
                }
                b
            },
        },
        Variant {
            name: "previous layout: sorted, zstd 3, dictionary (else PLAIN) but delta time",
            floats: Floats::F64,
            tune: |mut b, s| {
                for c in columns_of(s, |t| *t != tag_data_type()) {
                    b = b
                        .set_column_dictionary_enabled(c.clone(), true)
                        .set_column_encoding(c, Encoding::PLAIN);
                }
                b.set_bloom_filter_enabled(false)
            },
        },
    ]
}

/// Every row of one file, as the table's columns (floats as f64).
fn read_rows(path: &Path, schema: &TableSchema) -> Result<RecordBatch, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let target = schema.arrow_schema();
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("{}: {e}", path.display()))?;
        batches.push(persist::conform(&batch, &target).map_err(|e| e.to_string())?);
    }
    concat_batches(&target, &batches).map_err(|e| e.to_string())
}

fn values_in(batch: &RecordBatch) -> u64 {
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| f.name() != TIME_COLUMN && *f.data_type() != tag_data_type())
        .map(|(_, c)| (c.len() - c.null_count()) as u64)
        .sum()
}

fn write(batch: &RecordBatch, variant: &Variant, row_group_rows: usize) -> Result<usize, String> {
    let stored = match variant.floats {
        Floats::DecimalWhereExact => persist::encode_floats(batch).map_err(|e| e.to_string())?.0,
        Floats::DecimalInt64 => {
            let stored = persist::encode_floats(batch).map_err(|e| e.to_string())?.0;
            widen_decimals(&stored)?
        }
        Floats::F64 => batch.clone(),
    };
    let schema = stored.schema();
    let base = persist::file_properties(&stored, row_group_rows, Vec::new());
    let props: WriterProperties = (variant.tune)(base.into_builder(), &schema).build();
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, schema, Some(props)).map_err(|e| e.to_string())?;
    writer.write(&stored).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out.len())
}

fn widen_decimals(batch: &RecordBatch) -> Result<RecordBatch, String> {
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        match field.data_type() {
            DataType::Decimal128(_, scale) => {
                let wide = DataType::Decimal128(18, *scale);
                columns.push(arrow::compute::cast(column, &wide).map_err(|e| e.to_string())?);
                fields.push(Field::new(field.name(), wide, field.is_nullable()));
            }
            _ => {
                columns.push(column.clone());
                fields.push(field.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(data_dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: storage_variants DATA_DIR [TABLE...]");
        return ExitCode::from(2);
    };
    let only: Vec<String> = args.collect();
    match run(&data_dir.join("data"), &only) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storage_variants: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Per table: files, on-disk bytes, values, and (bytes, write seconds) per variant.
type TableSizes = (usize, u64, u64, Vec<(u64, f64)>);

fn run(tables_dir: &Path, only: &[String]) -> Result<(), String> {
    let files = persist::scan_store(tables_dir).map_err(|e| e.to_string())?;
    let variants = variants();
    // table -> (files, on-disk bytes, values, bytes and write time per variant)
    let mut per_table: BTreeMap<String, TableSizes> = BTreeMap::new();
    for (file, schema) in &files {
        if !only.is_empty() && !only.contains(&file.table) {
            continue;
        }
        let rows = read_rows(&file.path, schema)?;
        let entry = per_table
            .entry(file.table.clone())
            .or_insert_with(|| (0, 0, 0, vec![(0, 0.0); variants.len()]));
        entry.0 += 1;
        entry.1 += file.bytes;
        entry.2 += values_in(&rows);
        for (i, variant) in variants.iter().enumerate() {
            let started = Instant::now();
            let bytes = write(&rows, variant, 128 * 1024)?;
            entry.3[i].0 += bytes as u64;
            entry.3[i].1 += started.elapsed().as_secs_f64();
        }
    }
    let mut totals = vec![(0u64, 0f64); variants.len()];
    let (mut total_values, mut total_disk) = (0u64, 0u64);
    for (table, (nfiles, disk, values, sizes)) in &per_table {
        println!(
            "\n{table}: {nfiles} files, {values} values, {disk} bytes on disk ({:.3} B/value)",
            *disk as f64 / (*values).max(1) as f64
        );
        for ((variant, (bytes, secs)), total) in variants.iter().zip(sizes).zip(&mut totals) {
            println!(
                "  {:<78} {:>12} B  {:>7.3} B/value  {:>8.1} ms",
                variant.name,
                bytes,
                *bytes as f64 / (*values).max(1) as f64,
                secs * 1000.0
            );
            total.0 += bytes;
            total.1 += secs;
        }
        total_values += values;
        total_disk += disk;
    }
    println!(
        "\nall tables: {} files, {total_values} values, {total_disk} bytes on disk ({:.3} B/value)",
        files.len(),
        total_disk as f64 / total_values.max(1) as f64
    );
    println!("| variant | bytes | B/value | write ms |\n|---|---:|---:|---:|");
    for (variant, (bytes, secs)) in variants.iter().zip(&totals) {
        println!(
            "| {} | {bytes} | {:.3} | {:.0} |",
            variant.name.trim(),
            *bytes as f64 / total_values.max(1) as f64,
            secs * 1000.0
        );
    }
    Ok(())
}
