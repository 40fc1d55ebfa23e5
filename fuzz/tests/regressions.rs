//! Every input kept under `fuzz/regressions/<target>/` (crashes the fuzzers found, fixed since) and
//! `fuzz/seeds/<target>/` (the starting corpus: valid and nearly valid inputs) goes through its target again.
//! A target panics on a bug, so a failure names the file that brought it back.

use std::path::{Path, PathBuf};

use damselfly_collector::fuzzing;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for kind in ["regressions", "seeds"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

/// Runs every kept input; returns the rows stored from the seeds, which must reach the store (a target that
/// refused its valid seeds would be fuzzing nothing but the first check).
fn replay(target: &str, run: fn(&[u8]) -> usize) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no seeds or regressions for {target}");
    let mut seed_rows = 0;
    for file in files {
        let data = std::fs::read(&file).expect("read a kept input");
        let outcome = std::panic::catch_unwind(|| run(&data));
        let Ok(rows) = outcome else {
            panic!("{target}: {} fails again", file.display());
        };
        if file.components().any(|c| c.as_os_str() == "seeds") {
            seed_rows += rows;
        }
    }
    assert!(seed_rows > 0, "{target}: no seed stored a row");
}

#[test]
fn line_protocol_inputs() {
    replay("line_protocol", fuzzing::line_protocol);
}

#[test]
fn remote_write_inputs() {
    replay("remote_write", fuzzing::remote_write);
}

#[test]
fn grpc_batch_inputs() {
    replay("grpc_batch", fuzzing::grpc_batch);
}

#[test]
fn wal_segment_inputs() {
    replay("wal_segment", fuzzing::wal_segment);
}
