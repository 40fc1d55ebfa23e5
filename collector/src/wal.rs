//! The write-ahead log: every accepted batch is appended here and made durable before it is acknowledged.
//!
//! A WAL is a directory of segment files `<id:020>.wal`. Each segment starts with the 8-byte magic `DMSFWAL1`,
//! followed by records:
//!
//! ```text
//! u32 LE payload length | u32 LE CRC-32C of (seq bytes ++ payload) | u64 LE sequence | payload
//! ```
//!
//! Sequence numbers increase by one across the whole WAL (and across restarts: the next sequence is above every
//! sequence already persisted). On open, every segment is read in order; a record that is cut short or whose CRC
//! does not match ends the segment: the file is truncated there (a torn tail from a crash mid-write), and replay
//! stops at the first such damage. Writing goes to a fresh segment; `rotate` seals the current one so that the
//! flusher can delete sealed segments once their rows are in Parquet.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{CollectorError, Result};
use crate::fsutil::sync_dir;

/// The first bytes of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"DMSFWAL1";
const MAGIC: &[u8; 8] = SEGMENT_MAGIC;
const HEADER_BYTES: usize = 16;
/// Largest payload a record may carry; anything larger in a file is damage, not data.
pub const MAX_RECORD_BYTES: usize = 256 << 20;

/// One record read back from the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What opening the WAL found.
#[derive(Debug, Default)]
pub struct Replay {
    pub records: Vec<WalRecord>,
    /// Bytes cut off torn or damaged segment tails.
    pub truncated_bytes: u64,
}

#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    file: File,
    segment_id: u64,
    len: u64,
    next_seq: u64,
    sync: bool,
}

impl Wal {
    /// Opens the WAL in `dir`, replays every segment and starts a new segment for writing. `min_next_seq` is the
    /// lowest sequence the next record may get (one above everything already persisted elsewhere).
    pub fn open(dir: &Path, min_next_seq: u64, sync: bool) -> Result<(Wal, Replay)> {
        std::fs::create_dir_all(dir).map_err(|e| CollectorError::io(dir, e))?;
        let segments = list_segments(dir)?;
        let mut replay = Replay::default();
        let mut last_seq = 0u64;
        let mut damaged = false;
        for (_, path) in &segments {
            if damaged {
                // Records after damage cannot be trusted to be in order: keep the file for inspection.
                tracing::error!(segment = %path.display(), "WAL segment after a damaged one is not replayed");
                continue;
            }
            let (records, valid_len, file_len) = read_segment(path)?;
            if valid_len < file_len {
                tracing::warn!(
                    segment = %path.display(),
                    valid_len,
                    file_len,
                    "WAL segment has a torn or damaged tail; truncating it"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| CollectorError::io(path, e))?;
                f.set_len(valid_len)
                    .map_err(|e| CollectorError::io(path, e))?;
                f.sync_all().map_err(|e| CollectorError::io(path, e))?;
                replay.truncated_bytes += file_len - valid_len;
                damaged = true;
            }
            for record in records {
                if record.seq <= last_seq {
                    return Err(CollectorError::Wal(format!(
                        "segment {} holds sequence {} after {}: the WAL is out of order",
                        path.display(),
                        record.seq,
                        last_seq
                    )));
                }
                last_seq = record.seq;
                replay.records.push(record);
            }
        }
        let segment_id = segments.last().map_or(1, |(id, _)| id + 1);
        let next_seq = min_next_seq.max(last_seq + 1).max(1);
        let file = create_segment(dir, segment_id)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                file,
                segment_id,
                len: MAGIC.len() as u64,
                next_seq,
                sync,
            },
            replay,
        ))
    }

    /// The sequence the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The id of the segment being written.
    pub fn segment_id(&self) -> u64 {
        self.segment_id
    }

    /// Appends records (one per payload) and makes them durable with one fsync (group commit). Returns the
    /// sequence of the last record. On error nothing of this call remains in the file.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<u64> {
        let start_len = self.len;
        let start_seq = self.next_seq;
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + HEADER_BYTES).sum());
        let mut seq = self.next_seq;
        for payload in payloads {
            encode_record(&mut buf, seq, payload)?;
            seq += 1;
        }
        let result = self.file.write_all(&buf).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.next_seq = seq;
                Ok(seq - 1)
            }
            Err(e) => {
                // Cut back whatever part of the group reached the file, so a later success is not preceded by
                // garbage; if even that fails, the CRC check on replay still catches it.
                let _ = self.file.set_len(start_len);
                self.next_seq = start_seq;
                Err(CollectorError::io(self.segment_path(self.segment_id), e))
            }
        }
    }

    /// Seals the current segment and starts the next. Returns the id of the sealed segment: it and every
    /// segment below it hold only records with sequences below [`Wal::next_seq`].
    pub fn rotate(&mut self) -> Result<u64> {
        if self.sync {
            self.file
                .sync_all()
                .map_err(|e| CollectorError::io(self.segment_path(self.segment_id), e))?;
        }
        let sealed = self.segment_id;
        self.file = create_segment(&self.dir, sealed + 1)?;
        self.segment_id = sealed + 1;
        self.len = MAGIC.len() as u64;
        Ok(sealed)
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id)
    }
}

/// Deletes every segment with an id at or below `up_to` (their rows are persisted).
pub fn remove_segments(dir: &Path, up_to: u64) -> Result<usize> {
    let mut removed = 0;
    for (id, path) in list_segments(dir)? {
        if id <= up_to {
            std::fs::remove_file(&path).map_err(|e| CollectorError::io(&path, e))?;
            removed += 1;
        }
    }
    sync_dir(dir)?;
    Ok(removed)
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

fn create_segment(dir: &Path, id: u64) -> Result<File> {
    let path = segment_path(dir, id);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| CollectorError::io(&path, e))?;
    file.write_all(MAGIC)
        .map_err(|e| CollectorError::io(&path, e))?;
    file.sync_all().map_err(|e| CollectorError::io(&path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CollectorError::io(dir, e))? {
        let entry = entry.map_err(|e| CollectorError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((id, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub fn encode_record(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) -> Result<()> {
    if payload.len() > MAX_RECORD_BYTES {
        return Err(CollectorError::Wal(format!(
            "record of {} bytes exceeds the {MAX_RECORD_BYTES}-byte limit",
            payload.len()
        )));
    }
    let seq_bytes = seq.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&seq_bytes), payload);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&seq_bytes);
    buf.extend_from_slice(payload);
    Ok(())
}

/// Decodes the records of one segment's bytes (after the magic). Returns the records and how many bytes
/// (counted from the start of `data`) are valid; parsing stops at the first short or damaged record.
pub fn decode_records(data: &[u8]) -> (Vec<WalRecord>, usize) {
    let mut records = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= HEADER_BYTES {
        let h = &data[pos..pos + HEADER_BYTES];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let seq_bytes = [h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]];
        if len > MAX_RECORD_BYTES || data.len() - pos - HEADER_BYTES < len {
            break;
        }
        let payload = &data[pos + HEADER_BYTES..pos + HEADER_BYTES + len];
        if crc32c::crc32c_append(crc32c::crc32c(&seq_bytes), payload) != crc {
            break;
        }
        records.push(WalRecord {
            seq: u64::from_le_bytes(seq_bytes),
            payload: payload.to_vec(),
        });
        pos += HEADER_BYTES + len;
    }
    (records, pos)
}

fn read_segment(path: &Path) -> Result<(Vec<WalRecord>, u64, u64)> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| CollectorError::io(path, e))?;
    let file_len = data.len() as u64;
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        // A segment created but cut before its magic was written holds nothing.
        return Ok((Vec::new(), 0, file_len));
    }
    let (records, valid) = decode_records(&data[MAGIC.len()..]);
    Ok((records, (MAGIC.len() + valid) as u64, file_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("record {i}").into_bytes()).collect()
    }

    #[test]
    fn appends_replay_in_order_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut wal, replay) = Wal::open(dir.path(), 1, true).expect("open");
            assert!(replay.records.is_empty());
            assert_eq!(wal.append(&payloads(3)).expect("append"), 3);
            wal.rotate().expect("rotate");
            assert_eq!(wal.append(&payloads(2)).expect("append"), 5);
        }
        let (wal, replay) = Wal::open(dir.path(), 1, true).expect("reopen");
        let seqs: Vec<u64> = replay.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(replay.records[4].payload, b"record 1");
        assert_eq!(wal.next_seq(), 6);
    }

    #[test]
    fn torn_tail_is_truncated_and_writing_resumes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment;
        {
            let (mut wal, _) = Wal::open(dir.path(), 1, true).expect("open");
            wal.append(&payloads(2)).expect("append");
            segment = segment_path(dir.path(), wal.segment_id());
        }
        // Simulate a crash in the middle of the next record.
        let mut partial = Vec::new();
        encode_record(&mut partial, 3, b"half written record").expect("encode");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&segment)
            .expect("open segment");
        f.write_all(&partial[..partial.len() - 5]).expect("write");
        drop(f);
        let before = std::fs::metadata(&segment).expect("meta").len();
        let (mut wal, replay) = Wal::open(dir.path(), 1, true).expect("reopen");
        assert_eq!(replay.records.len(), 2);
        assert_eq!(replay.truncated_bytes, (partial.len() - 5) as u64);
        assert!(std::fs::metadata(&segment).expect("meta").len() < before);
        assert_eq!(wal.append(&payloads(1)).expect("append"), 3);
    }

    #[test]
    fn flipped_bit_stops_replay_at_the_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment;
        {
            let (mut wal, _) = Wal::open(dir.path(), 1, true).expect("open");
            wal.append(&payloads(3)).expect("append");
            segment = segment_path(dir.path(), wal.segment_id());
        }
        let mut bytes = std::fs::read(&segment).expect("read");
        let last = bytes.len() - 2;
        bytes[last] ^= 0x40;
        std::fs::write(&segment, &bytes).expect("write");
        let (_, replay) = Wal::open(dir.path(), 1, true).expect("reopen");
        assert_eq!(replay.records.len(), 2);
    }

    #[test]
    fn sequences_continue_above_the_persisted_minimum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path(), 100, true).expect("open");
        assert_eq!(wal.append(&payloads(1)).expect("append"), 100);
        let sealed = wal.rotate().expect("rotate");
        assert_eq!(remove_segments(dir.path(), sealed).expect("remove"), 1);
    }

    #[test]
    fn garbage_is_not_a_record() {
        let (records, valid) = decode_records(&[0xff; 64]);
        assert!(records.is_empty());
        assert_eq!(valid, 0);
    }
}
