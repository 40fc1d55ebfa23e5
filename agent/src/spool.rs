//! The disk spool: a [`BatchQueue`] on disk, so batches survive a collector outage of any length (up to
//! `spool_max_bytes`) and an agent restart or crash.
//!
//! # Files
//!
//! A spool is a directory holding segment files `<id:020>.seg`, one `ack` file, and a `lock` file that the open
//! spool holds an exclusive lock on (two agents on one spool would corrupt it; the second one refuses to start).
//!
//! * A segment starts with the 8-byte magic `DMSFSPL1`, followed by records
//!
//!   ```text
//!   u32 LE payload length | u32 LE CRC-32C of (seq bytes ++ payload) | u64 LE seq | payload
//!   ```
//!
//!   where the payload is the protobuf-encoded `WriteBatch`, exactly as it will be sent (so a replayed batch keeps
//!   its original timestamps and seq). Segments are append-only; the agent appends to one at a time and starts a
//!   new one when it would grow past an eighth of `spool_max_bytes` (at most 16 MiB), or after a restart.
//! * `ack` holds, in decimal, the *ack watermark*: the highest seq such that every spooled batch at or below it is
//!   done (acknowledged STORED/DUPLICATE, REJECTED, or dropped). It is replaced atomically: written to `ack.tmp`,
//!   fsynced, renamed over `ack`, and the directory fsynced. Batches done above a gap (acks arriving out of order)
//!   are forgotten in memory only; after a restart they are sent again and the collector answers DUPLICATE.
//!
//! Removing a batch is cheap: it only changes the in-memory index. A segment whose batches are all done is
//! deleted at the next [`DiskSpool::checkpoint`], after the watermark covering it is on disk (so a segment that
//! reappears after a power loss is skipped, not resent). The segment being written is also replaced by a fresh one
//! when a push finds all its batches done and it holds 64 KiB or more, so delivered data does not linger while the
//! collector keeps up (should it reappear after a power loss, its batches are resent and answered DUPLICATE).
//! [`BatchQueue::bytes`] counts the pending records; [`DiskSpool::disk_bytes`] the files.
//!
//! # Durability (fsync policy)
//!
//! Appends are plain writes; [`DiskSpool::checkpoint`] fsyncs the segment being written (and the directory when a
//! segment was created), then the watermark. The agent calls it once per collection round, right after pushing the
//! round's batches (off the async threads), and at shutdown: one fsync per round however many batches it made.
//! A killed process loses nothing that was pushed (the data is in the OS page cache); a power loss can cost the
//! round being written.
//!
//! # Opening
//!
//! Every segment is read in id order; records at or below the watermark are skipped. A record cut short or failing
//! its CRC ends its segment: the file is truncated there (a torn tail from a crash mid-write) and the rest of the
//! spool is still used. A segment file too short for its magic (a crash while creating it) is removed; one with a
//! foreign magic is renamed to `*.seg.corrupt` and left alone. New batches go to a fresh segment.
//!
//! # Bound
//!
//! The files never exceed `max_bytes` in total. Making room first deletes segments whose batches are all done, then
//! the oldest segments with batches still pending; those are dropped and reported ([`Dropped`]) for the caller to
//! count and log. A single batch larger than the whole bound is dropped itself.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use damselfly_proto::v1::WriteBatch;
use prost::Message;

use crate::queue::{BatchQueue, Dropped};

const MAGIC: &[u8; 8] = b"DMSFSPL1";
const MAGIC_BYTES: u64 = MAGIC.len() as u64;
const HEADER_BYTES: usize = 16;
/// Largest record payload; anything larger found in a file is damage, and a larger batch is not spooled.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// Largest segment size the spool aims for.
const MAX_SEGMENT_BYTES: u64 = 16 << 20;
/// A segment being written whose batches are all done is replaced by a fresh one once it is this large, so
/// delivered data does not linger on disk while the collector keeps up.
const RECYCLE_BYTES: u64 = 64 << 10;
const SEGMENT_EXT: &str = "seg";
const ACK_FILE: &str = "ack";
const ACK_TMP: &str = "ack.tmp";
const LOCK_FILE: &str = "lock";

/// Where a pending batch is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    segment: u64,
    offset: u64,
    len: u32,
    points: u32,
}

/// A segment file's bookkeeping.
#[derive(Debug)]
struct Segment {
    /// File size (magic included).
    bytes: u64,
    /// Pending (not done) batches in it.
    live: usize,
    /// Seq range of the records in it.
    first_seq: u64,
    last_seq: u64,
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    id: u64,
    file: File,
    /// Written since the last fsync.
    dirty: bool,
}

/// A disk-backed [`BatchQueue`]; see the module docs for the format.
#[derive(Debug)]
pub struct DiskSpool {
    dir: PathBuf,
    max_bytes: u64,
    segment_target: u64,
    /// Pending batches by seq.
    index: BTreeMap<u64, Entry>,
    segments: BTreeMap<u64, Segment>,
    active: Option<Active>,
    next_segment_id: u64,
    total_bytes: u64,
    /// Bytes of the pending records (headers included): what [`BatchQueue::bytes`] reports.
    live_bytes: u64,
    /// Highest seq ever held (or covered by the watermark).
    last_seq: u64,
    /// The watermark as it is on disk.
    persisted_ack: u64,
    /// A segment was created since the directory was last fsynced.
    dir_dirty: bool,
    dropped: u64,
    /// Bytes cut off torn or damaged tails when opening.
    truncated_bytes: u64,
    /// Seqs whose record could not be read back (reported by `next_after`, which cannot change the index):
    /// forgotten and counted as dropped at the next `push` or `checkpoint`.
    unreadable: RefCell<Vec<u64>>,
    /// Holds the directory's lock while open.
    _lock: File,
}

impl DiskSpool {
    /// Opens (or creates) the spool in `dir`, bounded by `max_bytes` (the agent's config requires at least 1 MiB;
    /// tests use less). Scans the segments as described in the module docs.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    format!(
                        "in use by another agent (it holds the lock on {})",
                        lock_path.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        match std::fs::remove_file(dir.join(ACK_TMP)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let acked = read_ack(dir)?;
        let max_bytes = max_bytes.max(1);
        let mut spool = Self {
            dir: dir.to_owned(),
            max_bytes,
            segment_target: (max_bytes / 8).clamp(1, MAX_SEGMENT_BYTES),
            index: BTreeMap::new(),
            segments: BTreeMap::new(),
            active: None,
            next_segment_id: 1,
            total_bytes: 0,
            live_bytes: 0,
            last_seq: acked,
            persisted_ack: acked,
            dir_dirty: false,
            dropped: 0,
            truncated_bytes: 0,
            unreadable: RefCell::new(Vec::new()),
            _lock: lock,
        };
        for (id, path) in list_segments(dir)? {
            spool.next_segment_id = spool.next_segment_id.max(id.saturating_add(1));
            spool.load_segment(id, &path)?;
        }
        spool.delete_done_segments();
        if !spool.index.is_empty() || spool.truncated_bytes > 0 {
            tracing::info!(
                dir = %dir.display(),
                batches = spool.index.len(),
                bytes = spool.live_bytes,
                first_seq = spool.index.keys().next().copied().unwrap_or(0),
                last_seq = spool.last_seq,
                truncated_bytes = spool.truncated_bytes,
                "disk spool holds batches from an earlier run; they are sent first"
            );
        }
        // Making room may be needed at once if the bound shrank since the last run.
        let dropped = spool.make_room(0);
        if !dropped.is_empty() {
            tracing::warn!(
                batches = dropped.batches,
                points = dropped.points,
                "disk spool is larger than spool_max_bytes: dropped the {} oldest batches; {} points are lost",
                dropped.batches,
                dropped.points
            );
        }
        Ok(spool)
    }

    /// The highest seq this spool has held (pending, done, or covered by the watermark): new batches must be
    /// numbered above it (see [`crate::seq::SeqAllocator::ensure_above`]).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The ack watermark: every batch at or below it is done.
    pub fn watermark(&self) -> u64 {
        let w = match self.index.keys().next() {
            Some(&first) => first - 1,
            None => self.last_seq,
        };
        w.max(self.persisted_ack)
    }

    /// Bytes cut off torn or damaged segment tails when the spool was opened.
    pub fn truncated_bytes(&self) -> u64 {
        self.truncated_bytes
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.{SEGMENT_EXT}"))
    }

    /// Indexes the records of one segment file, truncating a torn or damaged tail.
    fn load_segment(&mut self, id: u64, path: &Path) -> std::io::Result<()> {
        let data = std::fs::read(path)?;
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            if data.len() < MAGIC.len() && MAGIC.starts_with(&data) {
                tracing::warn!(segment = %path.display(), "spool segment was cut short while being created; removing it");
                std::fs::remove_file(path)?;
            } else {
                let bad = path.with_extension("seg.corrupt");
                tracing::error!(
                    segment = %path.display(),
                    renamed_to = %bad.display(),
                    "spool segment does not start with the spool magic; setting it aside"
                );
                std::fs::rename(path, &bad)?;
            }
            return Ok(());
        }
        let mut pos = MAGIC.len();
        let mut seg = Segment {
            bytes: 0,
            live: 0,
            first_seq: u64::MAX,
            last_seq: 0,
        };
        let mut damage = None;
        while pos < data.len() {
            let (seq, batch, consumed) = match parse_record(&data[pos..]) {
                Ok(r) => r,
                Err(why) => {
                    damage = Some(why);
                    break;
                }
            };
            seg.first_seq = seg.first_seq.min(seq);
            seg.last_seq = seg.last_seq.max(seq);
            self.last_seq = self.last_seq.max(seq);
            if seq > self.persisted_ack && !self.index.contains_key(&seq) {
                self.index.insert(
                    seq,
                    Entry {
                        segment: id,
                        offset: pos as u64,
                        len: (consumed - HEADER_BYTES) as u32,
                        points: damselfly_proto::columnar::batch_rows(&batch)
                            .try_into()
                            .unwrap_or(u32::MAX),
                    },
                );
                seg.live += 1;
                self.live_bytes += consumed as u64;
            }
            pos += consumed;
        }
        if let Some(why) = damage {
            let cut = (data.len() - pos) as u64;
            tracing::warn!(
                segment = %path.display(),
                valid_bytes = pos,
                cut_bytes = cut,
                reason = why,
                "spool segment has a torn or damaged tail (crash mid-write?); truncating it"
            );
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(pos as u64)?;
            f.sync_all()?;
            self.truncated_bytes += cut;
        }
        seg.bytes = pos as u64;
        self.total_bytes += seg.bytes;
        self.segments.insert(id, seg);
        Ok(())
    }

    /// Reads one pending record back.
    fn read(&self, seq: u64, e: &Entry) -> std::io::Result<WriteBatch> {
        let mut f = File::open(self.segment_path(e.segment))?;
        f.seek(SeekFrom::Start(e.offset))?;
        let mut buf = vec![0u8; HEADER_BYTES + e.len as usize];
        f.read_exact(&mut buf)?;
        match parse_record(&buf) {
            Ok((s, batch, _)) if s == seq => Ok(batch),
            Ok((s, _, _)) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("record holds seq {s}"),
            )),
            Err(why) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)),
        }
    }

    /// Forgets batches `next_after` could not read, counting them as dropped.
    fn take_unreadable(&mut self) -> Dropped {
        let seqs = std::mem::take(&mut *self.unreadable.borrow_mut());
        let mut dropped = Dropped::default();
        for seq in seqs {
            if let Some(e) = self.forget(seq) {
                dropped.add(seq, u64::from(e.points));
            }
        }
        self.dropped += dropped.batches;
        dropped
    }

    /// Removes `seq` from the index.
    fn forget(&mut self, seq: u64) -> Option<Entry> {
        let e = self.index.remove(&seq)?;
        self.forgotten(&e);
        Some(e)
    }

    /// Bookkeeping for an entry just taken out of the index.
    fn forgotten(&mut self, e: &Entry) {
        if let Some(seg) = self.segments.get_mut(&e.segment) {
            seg.live = seg.live.saturating_sub(1);
        }
        self.live_bytes = self
            .live_bytes
            .saturating_sub(HEADER_BYTES as u64 + u64::from(e.len));
    }

    /// Bytes of the segment files (what the bound applies to), acknowledged records not yet deleted included.
    pub fn disk_bytes(&self) -> u64 {
        self.total_bytes
    }

    fn active_id(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.id)
    }

    /// Stops appending to the active segment (fsyncing it first, so sealed segments need no more syncs).
    fn seal(&mut self) {
        if let Some(mut a) = self.active.take()
            && a.dirty
        {
            if let Err(e) = a.file.sync_data() {
                tracing::error!(error = %e, "cannot fsync a spool segment");
            }
            a.dirty = false;
        }
    }

    /// Deletes a segment file and its bookkeeping; returns its pending batches as dropped.
    fn delete_segment(&mut self, id: u64) -> Dropped {
        if self.active_id() == Some(id) {
            self.active = None;
        }
        let mut dropped = Dropped::default();
        let Some(seg) = self.segments.remove(&id) else {
            return dropped;
        };
        if seg.live > 0 && seg.first_seq <= seg.last_seq {
            let seqs: Vec<u64> = self
                .index
                .range(seg.first_seq..=seg.last_seq)
                .filter(|(_, e)| e.segment == id)
                .map(|(s, _)| *s)
                .collect();
            for seq in seqs {
                if let Some(e) = self.index.remove(&seq) {
                    self.live_bytes = self
                        .live_bytes
                        .saturating_sub(HEADER_BYTES as u64 + u64::from(e.len));
                    dropped.add(seq, u64::from(e.points));
                }
            }
        }
        self.total_bytes = self.total_bytes.saturating_sub(seg.bytes);
        let path = self.segment_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(segment = %path.display(), error = %e, "cannot delete a spool segment")
            }
        }
        self.dropped += dropped.batches;
        dropped
    }

    /// Deletes every segment with no pending batch (the active one included: the next append starts a new one).
    fn delete_done_segments(&mut self) {
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| s.live == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.delete_segment(id);
        }
    }

    /// Frees space until `incoming` more bytes fit: done segments first, then the oldest sealed segments.
    fn make_room(&mut self, incoming: u64) -> Dropped {
        let mut dropped = Dropped::default();
        if self.total_bytes + incoming <= self.max_bytes {
            return dropped;
        }
        let active = self.active_id();
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(id, s)| s.live == 0 && Some(**id) != active)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.delete_segment(id);
        }
        while self.total_bytes + incoming > self.max_bytes {
            let Some(&oldest) = self.segments.keys().next() else {
                break;
            };
            if Some(oldest) == active {
                break;
            }
            dropped.merge(self.delete_segment(oldest));
        }
        dropped
    }

    /// Appends one record to the active segment, creating it if needed.
    fn append(&mut self, seq: u64, payload: &[u8], points: u32) -> std::io::Result<()> {
        if self.active.is_none() {
            let id = self.next_segment_id;
            self.next_segment_id += 1;
            let path = self.segment_path(id);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            if let Err(e) = file.write_all(MAGIC) {
                drop(file);
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            self.segments.insert(
                id,
                Segment {
                    bytes: MAGIC_BYTES,
                    live: 0,
                    first_seq: seq,
                    last_seq: seq,
                },
            );
            self.total_bytes += MAGIC_BYTES;
            self.active = Some(Active {
                id,
                file,
                dirty: true,
            });
            self.dir_dirty = true;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(std::io::Error::other("no active spool segment"));
        };
        let Some(seg) = self.segments.get_mut(&active.id) else {
            return Err(std::io::Error::other("active spool segment not indexed"));
        };
        let offset = seg.bytes;
        let mut rec = Vec::with_capacity(HEADER_BYTES + payload.len());
        encode_record(&mut rec, seq, payload);
        active.dirty = true;
        if let Err(e) = active.file.write_all(&rec) {
            // Roll back a partial record so the file stays well-formed, and start a fresh segment next time.
            let _ = active.file.set_len(offset);
            self.active = None;
            return Err(e);
        }
        seg.bytes += rec.len() as u64;
        seg.live += 1;
        seg.first_seq = seg.first_seq.min(seq);
        seg.last_seq = seg.last_seq.max(seq);
        self.total_bytes += rec.len() as u64;
        self.live_bytes += rec.len() as u64;
        self.index.insert(
            seq,
            Entry {
                segment: active.id,
                offset,
                len: payload.len() as u32,
                points,
            },
        );
        Ok(())
    }

    /// Writes the watermark file atomically.
    fn write_ack(&self, w: u64) -> std::io::Result<()> {
        let tmp = self.dir.join(ACK_TMP);
        {
            let mut f = File::create(&tmp)?;
            writeln!(f, "{w}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(ACK_FILE))?;
        sync_dir(&self.dir)
    }
}

impl BatchQueue for DiskSpool {
    fn push(&mut self, batch: WriteBatch) -> Dropped {
        let mut dropped = self.take_unreadable();
        let seq = batch.seq;
        let points = damselfly_proto::columnar::batch_rows(&batch) as u64;
        if seq <= self.last_seq {
            // The seq allocator is moved above the spool at start-up, so this is a bug; do not break the order.
            tracing::error!(
                seq,
                last_seq = self.last_seq,
                "batch seq is not above the spool's; dropping it"
            );
            dropped.add(seq, points);
            self.dropped += 1;
            return dropped;
        }
        self.last_seq = seq;
        let payload = batch.encode_to_vec();
        if payload.len() > MAX_RECORD_BYTES {
            tracing::error!(
                seq,
                bytes = payload.len(),
                "batch is too large for the spool; dropping it"
            );
            dropped.add(seq, points);
            self.dropped += 1;
            return dropped;
        }
        let rec = (HEADER_BYTES + payload.len()) as u64;
        if let Some(id) = self.active_id()
            && let Some(seg) = self.segments.get(&id)
            && seg.live == 0
            && seg.bytes >= RECYCLE_BYTES
        {
            self.delete_segment(id);
        }
        if MAGIC_BYTES + rec > self.max_bytes {
            // Checked first: making room for it would only throw older batches away in vain.
            tracing::error!(
                seq,
                bytes = rec,
                max_bytes = self.max_bytes,
                "batch is larger than the whole spool; dropping it"
            );
            dropped.add(seq, points);
            self.dropped += 1;
            return dropped;
        }
        if let Some(id) = self.active_id()
            && let Some(seg) = self.segments.get(&id)
            && seg.bytes > MAGIC_BYTES
            && seg.bytes + rec > self.segment_target
        {
            self.seal();
        }
        let new_segment = if self.active.is_none() {
            MAGIC_BYTES
        } else {
            0
        };
        // Cannot fail to make enough room: the active segment plus this record stays within the segment target
        // (at most the bound), or the record starts a new segment and fits the bound on its own (checked above).
        dropped.merge(self.make_room(new_segment + rec));
        if let Err(e) = self.append(seq, &payload, points.try_into().unwrap_or(u32::MAX)) {
            tracing::error!(seq, dir = %self.dir.display(), error = %e, "cannot write to the spool; dropping the batch");
            dropped.add(seq, points);
            self.dropped += 1;
        }
        dropped
    }

    fn next_after(&self, seq: u64) -> Option<WriteBatch> {
        let from = seq.checked_add(1)?;
        for (&s, e) in self.index.range(from..) {
            match self.read(s, e) {
                Ok(batch) => return Some(batch),
                Err(err) => {
                    tracing::error!(seq = s, segment = e.segment, error = %err, "cannot read a spooled batch back; skipping it");
                    self.unreadable.borrow_mut().push(s);
                }
            }
        }
        None
    }

    fn remove(&mut self, seq: u64) -> Option<WriteBatch> {
        let e = *self.index.get(&seq)?;
        let batch = self.read(seq, &e);
        self.forget(seq);
        match batch {
            Ok(b) => Some(b),
            Err(err) => {
                tracing::error!(seq, error = %err, "cannot read a spooled batch back while removing it");
                None
            }
        }
    }

    fn discard(&mut self, seq: u64) -> bool {
        self.forget(seq).is_some()
    }

    fn ack_through(&mut self, seq: u64) -> u64 {
        let keep = match seq.checked_add(1) {
            Some(from) => self.index.split_off(&from),
            None => BTreeMap::new(),
        };
        let done = std::mem::replace(&mut self.index, keep);
        for e in done.values() {
            self.forgotten(e);
        }
        done.len() as u64
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn bytes(&self) -> u64 {
        self.live_bytes
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }

    fn durable(&self) -> bool {
        true
    }

    fn checkpoint(&mut self) -> std::io::Result<()> {
        let lost = self.take_unreadable();
        if !lost.is_empty() {
            tracing::warn!(
                batches = lost.batches,
                points = lost.points,
                "dropped {} unreadable spooled batches; {} points are lost",
                lost.batches,
                lost.points
            );
        }
        if let Some(a) = self.active.as_mut()
            && a.dirty
        {
            a.file.sync_data()?;
            a.dirty = false;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        let w = self.watermark();
        if w != self.persisted_ack {
            self.write_ack(w)?;
            self.persisted_ack = w;
        }
        self.delete_done_segments();
        Ok(())
    }
}

/// Appends one record (header and payload) to `buf`.
fn encode_record(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let seq_bytes = seq.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&seq_bytes), payload);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&seq_bytes);
    buf.extend_from_slice(payload);
}

/// Parses the record at the start of `buf`: its seq, the batch, and the bytes it takes.
fn parse_record(buf: &[u8]) -> Result<(u64, WriteBatch, usize), &'static str> {
    if buf.len() < HEADER_BYTES {
        return Err("record header cut short");
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let len = word(0) as usize;
    let crc = word(4);
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&buf[8..16]);
    if len > MAX_RECORD_BYTES {
        return Err("record length out of range");
    }
    let Some(payload) = buf.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Err("record payload cut short");
    };
    if crc32c::crc32c_append(crc32c::crc32c(&seq_bytes), payload) != crc {
        return Err("record CRC mismatch");
    }
    let seq = u64::from_le_bytes(seq_bytes);
    let batch = WriteBatch::decode(payload).map_err(|_| "record payload is not a WriteBatch")?;
    if batch.seq != seq || seq == 0 {
        return Err("record seq does not match its batch");
    }
    Ok((seq, batch, HEADER_BYTES + len))
}

/// The segment files of `dir`, by id.
fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == SEGMENT_EXT)
            && let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((id, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The watermark on disk; 0 when there is none. An unreadable file only costs resends (the collector deduplicates),
/// so it is logged, not fatal.
fn read_ack(dir: &Path) -> std::io::Result<u64> {
    let path = dir.join(ACK_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse::<u64>().unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "spool ack file is damaged; resending every spooled batch");
            0
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Makes renames and new files in `dir` durable (no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::{Field, Point, field};

    /// A batch with `n` points of ~`pad` bytes each, time = seq * 1000.
    fn batch(seq: u64, n: usize, pad: usize) -> WriteBatch {
        WriteBatch {
            chunks: Vec::new(),
            agent_id: "agent-1".into(),
            seq,
            common_tags: Vec::new(),
            points: (0..n)
                .map(|i| Point {
                    measurement: "m".into(),
                    tags: Vec::new(),
                    fields: vec![
                        Field {
                            key: "v".into(),
                            value: Some(field::Value::U64(seq * 100 + i as u64)),
                        },
                        Field {
                            key: "pad".into(),
                            value: Some(field::Value::Str("x".repeat(pad))),
                        },
                    ],
                    time_unix_nano: (seq * 1000) as i64,
                })
                .collect(),
        }
    }

    fn seqs(s: &DiskSpool) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cursor = 0;
        while let Some(b) = s.next_after(cursor) {
            out.push(b.seq);
            cursor = b.seq;
        }
        out
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn disk_bytes(dir: &Path) -> u64 {
        list_segments(dir)
            .expect("list")
            .iter()
            .map(|(_, p)| std::fs::metadata(p).expect("meta").len())
            .sum()
    }

    const BIG: u64 = 1 << 30;

    #[test]
    fn round_trip_keeps_batches_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
        assert!(s.is_empty() && s.durable());
        for seq in 1..=5 {
            assert!(s.push(batch(seq, 3, 10)).is_empty());
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s.disk_bytes(), disk_bytes(dir.path()));
        assert_eq!(s.bytes(), s.disk_bytes() - MAGIC_BYTES);
        assert_eq!(s.next_after(0), Some(batch(1, 3, 10)));
        assert_eq!(s.next_after(3), Some(batch(4, 3, 10)));
        assert_eq!(s.next_after(5), None);
        assert_eq!(s.next_after(u64::MAX), None);
        assert_eq!(s.remove(1), Some(batch(1, 3, 10)));
        assert_eq!(s.remove(1), None);
        assert!(!s.discard(1));
        assert!(s.discard(2));
        assert_eq!(seqs(&s), [3, 4, 5]);
        s.checkpoint().expect("checkpoint");
        assert_eq!(s.watermark(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(ACK_FILE))
                .expect("ack")
                .trim(),
            "2"
        );
    }

    #[test]
    fn restart_resumes_pending_in_order_with_original_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
            for seq in [3, 4, 7, 9, 12] {
                s.push(batch(seq, 2, 5));
            }
            assert!(s.discard(3));
            assert!(s.discard(4));
            s.checkpoint().expect("checkpoint");
            // Not checkpointed: a crash now still keeps 13 (it is in the file) and forgets the removal of 7.
            s.push(batch(13, 2, 5));
            assert!(s.discard(7));
        }
        let s = DiskSpool::open(dir.path(), BIG).expect("reopen");
        assert_eq!(seqs(&s), [7, 9, 12, 13]);
        assert_eq!(s.next_after(8), Some(batch(9, 2, 5)));
        assert_eq!(s.last_seq(), 13);
        assert_eq!(s.watermark(), 6);
        assert_eq!(s.truncated_bytes(), 0);
    }

    #[test]
    fn torn_tail_is_truncated_and_the_spool_stays_usable() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
            for seq in 1..=3 {
                s.push(batch(seq, 2, 50));
            }
            s.checkpoint().expect("checkpoint");
        }
        let (_, seg) = list_segments(dir.path()).expect("list").remove(0);
        let full = std::fs::metadata(&seg).expect("meta").len();
        // A crash in the middle of writing record 4: its header and half its payload made it to disk.
        let mut rec = Vec::new();
        encode_record(&mut rec, 4, &batch(4, 2, 50).encode_to_vec());
        let mut f = OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("open seg");
        f.write_all(&rec[..rec.len() / 2]).expect("write");
        drop(f);

        let mut s = DiskSpool::open(dir.path(), BIG).expect("reopen");
        assert_eq!(seqs(&s), [1, 2, 3]);
        assert_eq!(s.truncated_bytes(), rec.len() as u64 / 2);
        assert_eq!(std::fs::metadata(&seg).expect("meta").len(), full);
        assert_eq!(s.last_seq(), 3);
        // Numbering continues and a new segment takes new batches.
        assert!(s.push(batch(4, 2, 50)).is_empty());
        s.checkpoint().expect("checkpoint");
        drop(s);
        let s = DiskSpool::open(dir.path(), BIG).expect("reopen again");
        assert_eq!(seqs(&s), [1, 2, 3, 4]);
        assert_eq!(s.truncated_bytes(), 0);
    }

    #[test]
    fn corrupt_record_ends_its_segment_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
            for seq in 1..=3 {
                s.push(batch(seq, 1, 10));
            }
            s.checkpoint().expect("checkpoint");
        }
        {
            // A second run appends to a second segment.
            let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
            s.push(batch(4, 1, 10));
            s.checkpoint().expect("checkpoint");
        }
        let segs = list_segments(dir.path()).expect("list");
        assert_eq!(segs.len(), 2);
        // Flip a payload byte of record 2 in the first segment.
        let mut data = std::fs::read(&segs[0].1).expect("read");
        let rec1 = HEADER_BYTES + batch(1, 1, 10).encode_to_vec().len();
        let at = MAGIC.len() + rec1 + HEADER_BYTES + 3;
        data[at] ^= 0xff;
        std::fs::write(&segs[0].1, &data).expect("write");
        let s = DiskSpool::open(dir.path(), BIG).expect("reopen");
        assert_eq!(seqs(&s), [1, 4]);
        assert!(s.truncated_bytes() > 0);
    }

    #[test]
    fn bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let max = 16 * 1024;
        let mut s = DiskSpool::open(dir.path(), max).expect("open");
        let mut dropped = Dropped::default();
        for seq in 1..=100 {
            dropped.merge(s.push(batch(seq, 2, 200)));
            assert!(s.disk_bytes() <= max, "{} > {max}", s.disk_bytes());
            assert!(s.bytes() <= s.disk_bytes());
            assert!(disk_bytes(dir.path()) <= max);
        }
        assert!(dropped.batches > 50, "{dropped:?}");
        assert_eq!(dropped.first_seq, 1, "the oldest go first");
        assert_eq!(dropped.points, 2 * dropped.batches);
        assert_eq!(s.dropped(), dropped.batches);
        // What is left is the newest, contiguous, in order.
        let left = seqs(&s);
        assert_eq!(left.len() as u64 + dropped.batches, 100);
        assert_eq!(left.first().copied(), Some(dropped.last_seq + 1));
        assert_eq!(left.last().copied(), Some(100));
        // Acknowledged segments make room without loss.
        assert_eq!(s.ack_through(100), left.len() as u64);
        assert!(s.push(batch(101, 2, 200)).is_empty());
        assert_eq!(s.len(), 1);

        // A batch larger than the whole spool is dropped itself.
        let d = s.push(batch(102, 1, 20_000));
        assert_eq!((d.batches, d.first_seq), (1, 102));
        assert_eq!(seqs(&s), [101]);
    }

    #[test]
    fn ack_watermark_deletes_done_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Small segments: ~2 batches each.
        let mut s = DiskSpool::open(dir.path(), 8 * 1024).expect("open");
        for seq in 1..=8 {
            assert!(s.push(batch(seq, 1, 300)).is_empty());
        }
        let before = list_segments(dir.path()).expect("list").len();
        assert!(before >= 3, "{before}");
        assert_eq!(s.ack_through(4), 4);
        s.checkpoint().expect("checkpoint");
        assert_eq!(s.watermark(), 4);
        let after = list_segments(dir.path()).expect("list").len();
        assert!(after < before, "{after} >= {before}");
        assert_eq!(s.disk_bytes(), disk_bytes(dir.path()));
        for seq in 5..=8 {
            assert!(s.discard(seq));
        }
        s.checkpoint().expect("checkpoint");
        // Everything done: only the watermark remains; it also carries the seq floor across a restart.
        assert_eq!(files(dir.path()), [ACK_FILE, LOCK_FILE]);
        assert_eq!((s.bytes(), s.disk_bytes()), (0, 0));
        drop(s);
        let s = DiskSpool::open(dir.path(), 8 * 1024).expect("reopen");
        assert!(s.is_empty());
        assert_eq!((s.last_seq(), s.watermark()), (8, 8));
    }

    #[test]
    fn delivered_data_does_not_linger_while_the_collector_keeps_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
        // Each batch is acknowledged right after it is pushed, as with a healthy collector.
        for seq in 1..=200 {
            s.push(batch(seq, 1, 2000));
            s.checkpoint().expect("checkpoint");
            assert!(s.discard(seq));
            assert!(s.disk_bytes() <= RECYCLE_BYTES + 4096, "{}", s.disk_bytes());
        }
        assert_eq!(s.bytes(), 0);
        s.checkpoint().expect("checkpoint");
        assert_eq!(files(dir.path()), [ACK_FILE, LOCK_FILE]);
    }

    #[test]
    fn gap_keeps_the_watermark_below_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
            for seq in 1..=4 {
                s.push(batch(seq, 1, 1));
            }
            assert!(s.discard(1));
            // 3 is done before 2 (e.g. a REJECTED answer on another stream): the watermark stays at 1.
            assert!(s.discard(3));
            s.checkpoint().expect("checkpoint");
            assert_eq!(s.watermark(), 1);
            assert_eq!(seqs(&s), [2, 4]);
        }
        // After a restart 3 is pending again (the collector will answer DUPLICATE); nothing is lost.
        let mut s = DiskSpool::open(dir.path(), BIG).expect("reopen");
        assert_eq!(seqs(&s), [2, 3, 4]);
        assert!(s.discard(2));
        assert!(s.discard(3));
        assert_eq!(s.watermark(), 3);
        s.checkpoint().expect("checkpoint");
        drop(s);
        let s = DiskSpool::open(dir.path(), BIG).expect("reopen");
        assert_eq!(seqs(&s), [4]);
    }

    #[test]
    fn stale_or_foreign_files_do_not_stop_the_spool() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(format!("{:020}.seg", 1)), b"DMS").expect("torn");
        std::fs::write(
            dir.path().join(format!("{:020}.seg", 2)),
            b"not a spool file",
        )
        .expect("foreign");
        std::fs::write(dir.path().join(ACK_TMP), b"12").expect("tmp");
        let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
        assert!(s.is_empty());
        assert_eq!(
            files(dir.path()),
            [format!("{:020}.seg.corrupt", 2), LOCK_FILE.to_owned()],
            "torn segment and temp file removed, foreign file set aside"
        );
        s.push(batch(1, 1, 1));
        s.checkpoint().expect("checkpoint");
        drop(s);
        let s = DiskSpool::open(dir.path(), BIG).expect("reopen");
        assert_eq!(seqs(&s), [1]);
    }

    #[test]
    fn a_spool_in_use_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = DiskSpool::open(dir.path(), BIG).expect("open");
        let err = DiskSpool::open(dir.path(), BIG).expect_err("locked");
        assert!(err.to_string().contains("in use by another agent"), "{err}");
        drop(s);
        DiskSpool::open(dir.path(), BIG).expect("free again");
    }

    #[test]
    fn seq_not_above_the_spool_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
        s.push(batch(5, 1, 1));
        let d = s.push(batch(5, 1, 1));
        assert_eq!(d.batches, 1);
        assert_eq!(s.push(batch(4, 1, 1)).batches, 1);
        assert_eq!(seqs(&s), [5]);
    }

    #[test]
    fn unreadable_record_is_skipped_then_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DiskSpool::open(dir.path(), BIG).expect("open");
        for seq in 1..=3 {
            s.push(batch(seq, 1, 10));
        }
        s.checkpoint().expect("checkpoint");
        // Damage record 2 behind the spool's back (bit rot).
        let (_, seg) = list_segments(dir.path()).expect("list").remove(0);
        let mut data = std::fs::read(&seg).expect("read");
        let rec = HEADER_BYTES + batch(1, 1, 10).encode_to_vec().len();
        data[MAGIC.len() + rec + HEADER_BYTES + 1] ^= 0xff;
        std::fs::write(&seg, &data).expect("write");
        assert_eq!(seqs(&s), [1, 3]);
        let d = s.push(batch(4, 1, 10));
        assert_eq!((d.batches, d.first_seq), (1, 2));
        assert_eq!(seqs(&s), [1, 3, 4]);
    }
}
