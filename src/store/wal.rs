//! The activation log: every activation change is on local disk (appended and synced) before
//! the client is told it succeeded, so a `kill -9` or a crash loses no accepted activation.
//!
//! A thread (`keygate-wal`) takes changes from the request handlers, appends each group that
//! is waiting to the current segment file with one `fdatasync` (group commit), then forwards
//! them in order to the store writer and answers the handlers. Each group has a sequence
//! number; the writer records the highest one it has committed (or spooled) in the store's
//! `node_progress` row, in the same transaction. Full segments whose changes are all safe
//! are deleted. At start, changes past the store's recorded number are written to the store
//! before the node loads its state (`replay`), so a crash between commit and delete writes
//! nothing twice.
//!
//! Segments are preallocated: a helper thread writes the next one full of zeros and syncs it
//! while the current one fills, so an append overwrites blocks the file already has and its
//! `fdatasync` writes data only, no size or allocation change (on this project's test VM
//! about a third less time per sync; loadtest/README.md). A reader stops at the first line
//! that does not parse, which the zeros after the last append never do.

use super::journal::{decode_events, encode_events, EventRecord};
use super::{Store, StoreEvent};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of a segment: a group of changes from one request and its sequence number.
#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    events: Vec<EventRecord>,
}

/// This node's identity in `node_progress`, kept in `<dir>/node-id` so it survives restarts.
pub fn node_key(dir: &Path) -> std::io::Result<i64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("node-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(v) = text.trim().parse() {
            return Ok(v);
        }
    }
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| std::io::Error::other("no system randomness"))?;
    let v = i64::from_le_bytes(b) & i64::MAX;
    let tmp = dir.join("node-id.tmp");
    std::fs::write(&tmp, v.to_string())?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(v)
}

fn segment_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".wal")?
        .parse()
        .ok()
}

/// Segment `n`'s file: the number zero-padded, so that names sort as numbers do.
fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.wal"))
}

fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if let Some(n) = segment_number(&p) {
            v.push((n, p));
        }
    }
    v.sort();
    Ok(v)
}

/// Reads a segment's complete lines. A torn last line (crash mid-append) was never
/// acknowledged, so it is ignored, as are the zeros of the preallocated rest. Numbers only
/// grow within a segment: a line that breaks that is not this segment's (defensive: a failed
/// append gives its segment up, so nothing is written over a torn one).
fn read_segment(path: &Path) -> std::io::Result<Vec<(u64, Vec<StoreEvent>)>> {
    let mut out: Vec<(u64, Vec<StoreEvent>)> = Vec::new();
    let bytes = std::fs::read(path)?;
    for line in bytes.split(|b| *b == b'\n') {
        match serde_json::from_slice::<Line>(line) {
            Ok(l) if out.last().is_none_or(|(prev, _)| l.seq > *prev) => {
                out.push((l.seq, decode_events(l.events)))
            }
            _ => break,
        }
    }
    Ok(out)
}

/// The size of a segment: appends go to one until the next group would not fit.
const SEGMENT_BYTES: u64 = 8 << 20;

/// Writes `path` full of zeros, `len` bytes, and syncs it.
fn prepare_segment(path: &Path, len: u64) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// The segment being appended to.
struct Current {
    number: u64,
    file: File,
    /// Where the next group goes.
    at: u64,
    /// The last sequence number in it (0: none yet).
    last: u64,
}

/// The activation log's files, owned by the WAL thread.
pub struct Wal {
    dir: PathBuf,
    pub node: i64,
    next_seq: u64,
    current: Option<Current>,
    /// Older (full) segments not yet deleted: number, last sequence number.
    closed: Vec<(u64, u64)>,
    next_segment: u64,
    segment_bytes: u64,
    /// The next segment, being written full of zeros by a helper thread.
    spare: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Wal {
    /// Opens the directory and writes to `store` every change it holds past what the store
    /// has recorded for this node, then deletes the old segments. Call before loading state.
    pub fn open_and_replay(dir: &Path, store: &mut Store) -> anyhow::Result<(Wal, usize)> {
        Wal::open_with(dir, store, SEGMENT_BYTES)
    }

    /// `open_and_replay` with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(
        dir: &Path,
        store: &mut Store,
        segment_bytes: u64,
    ) -> anyhow::Result<(Wal, usize)> {
        std::fs::create_dir_all(dir)?;
        let node = node_key(dir)?;
        let done = store.wal_progress(node)?;
        let mut last = done;
        let mut pending: Vec<StoreEvent> = Vec::new();
        let segs = segments(dir)?;
        for (_, path) in &segs {
            for (seq, events) in read_segment(path)? {
                if seq > done {
                    pending.extend(events);
                }
                last = last.max(seq);
            }
        }
        let replayed = pending.len();
        if !pending.is_empty() || last > done {
            store.write_batch_once(None, Some((node, last)), &pending, &[])?;
        }
        // Deleted once the store's copy survives a power loss; else kept as full segments,
        // for `collect` when later commits are made durable.
        let mut closed = Vec::new();
        if store.make_durable()? {
            for (_, path) in &segs {
                std::fs::remove_file(path)?;
            }
        } else {
            closed = segs.iter().map(|(n, _)| (*n, last)).collect();
        }
        // A spare left by the last run may be partly written: made afresh.
        let _ = std::fs::remove_file(dir.join(SPARE));
        let next_segment = segs.last().map_or(1, |(n, _)| n + 1);
        let mut wal = Wal {
            dir: dir.to_owned(),
            node,
            next_seq: last + 1,
            current: None,
            closed,
            next_segment,
            segment_bytes,
            spare: None,
        };
        wal.prepare_spare();
        Ok((wal, replayed))
    }

    fn prepare_spare(&mut self) {
        let path = self.dir.join(SPARE);
        let len = self.segment_bytes;
        self.spare = std::thread::Builder::new()
            .name("keygate-wal-prep".into())
            .spawn(move || prepare_segment(&path, len))
            .ok();
    }

    /// Starts the next segment: the prepared spare when it is ready, else an empty file (its
    /// appends then grow it, which is slower to sync but as safe). Never waits for the spare.
    fn open_segment(&mut self) -> std::io::Result<()> {
        let n = self.next_segment;
        self.next_segment += 1;
        let path = segment_path(&self.dir, n);
        let ready = match self.spare.take() {
            Some(h) if h.is_finished() => {
                let ok = matches!(h.join(), Ok(Ok(())));
                if !ok {
                    // A spare that could not be written (disk full) gives its space back.
                    let _ = std::fs::remove_file(self.dir.join(SPARE));
                }
                ok
            }
            // Still being written: kept for the next segment.
            unfinished => {
                self.spare = unfinished;
                false
            }
        };
        if ready {
            std::fs::rename(self.dir.join(SPARE), &path)?;
        }
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            // The new name must survive a crash too.
            .and_then(|file| File::open(&self.dir)?.sync_all().map(|()| file));
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                // It may exist (renamed, or created before the sync failed) and holds no
                // change: a closed segment, so `collect` deletes it once what came before is
                // safe, instead of it staying until a restart.
                self.closed.push((n, self.next_seq.saturating_sub(1)));
                return Err(e);
            }
        };
        self.current = Some(Current {
            number: n,
            file,
            at: 0,
            last: 0,
        });
        if self.spare.is_none() {
            self.prepare_spare();
        }
        Ok(())
    }

    /// Waits until the spare segment is written (tests: so that the next one is preallocated).
    #[cfg(test)]
    fn settle(&self) {
        while self.spare.as_ref().is_some_and(|h| !h.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Appends groups of changes, synced; returns their sequence numbers.
    pub fn append(&mut self, groups: &[&[StoreEvent]]) -> std::io::Result<Vec<u64>> {
        let mut buf = Vec::new();
        let mut seqs = Vec::with_capacity(groups.len());
        for g in groups {
            let seq = self.next_seq;
            self.next_seq += 1;
            serde_json::to_writer(
                &mut buf,
                &Line {
                    seq,
                    events: encode_events(g),
                },
            )?;
            buf.push(b'\n');
            seqs.push(seq);
        }
        // A full segment is closed; it is deleted once all of it is safe (`collect`).
        if let Some(c) = &self.current {
            if c.at > 0 && c.at + buf.len() as u64 > self.segment_bytes {
                self.closed.push((c.number, c.last));
                self.current = None;
            }
        }
        if self.current.is_none() {
            self.open_segment()?;
        }
        let c = self.current.as_mut().expect("opened above");
        let written = std::os::unix::fs::FileExt::write_all_at(&c.file, &buf, c.at)
            .and_then(|()| c.file.sync_data());
        if let Err(e) = written {
            // Part of it may be on disk: nothing more goes into this segment, so no later
            // line lands over a torn one. Its whole lines are replayed as any others.
            let (n, last) = (c.number, c.last);
            self.closed
                .push((n, last.max(seqs.last().copied().unwrap_or(last))));
            self.current = None;
            return Err(e);
        }
        c.at += buf.len() as u64;
        if let Some(s) = seqs.last() {
            c.last = *s;
        }
        Ok(seqs)
    }

    /// Whether a full segment waits only for commits up to `committed` to become durable.
    pub fn waiting_for(&self, committed: u64) -> bool {
        self.closed.iter().any(|(_, last)| *last <= committed)
    }

    /// Deletes the full segments whose changes are all durably in the store or the spool
    /// (`safe` and below). The current segment stays until it is full: its blocks are the
    /// next appends'.
    pub fn collect(&mut self, safe: u64) -> std::io::Result<()> {
        let dir = &self.dir;
        let mut err = Ok(());
        self.closed.retain(|(n, last)| {
            if *last <= safe {
                match std::fs::remove_file(segment_path(dir, *n)) {
                    // One whose opening failed may never have been made.
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        err = Err(e);
                        return true;
                    }
                    _ => {}
                }
                false
            } else {
                true
            }
        });
        err
    }
}

impl Drop for Wal {
    /// Waits for the helper writing the spare, so that no write of it outlives the log (a
    /// reopened log deletes and rewrites the spare).
    fn drop(&mut self) {
        if let Some(h) = self.spare.take() {
            let _ = h.join();
        }
    }
}

/// The name of the prepared next segment (not a segment until renamed).
const SPARE: &str = "next.wal-spare";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::{Machine, MachineKind};

    /// How many segment files `dir` holds.
    pub(crate) fn segment_count(dir: &Path) -> usize {
        segments(dir).unwrap().len()
    }

    /// A new machine on license `gid`, as the activation log and the writer carry it.
    pub(crate) fn upsert(gid: i64, code: &str) -> StoreEvent {
        StoreEvent::MachineUpsert {
            key_global_id: gid,
            machine: Machine {
                machine_code: code.into(),
                kind: MachineKind::NodeLocked,
                ip: "203.0.113.1".into(),
                proxy_ip: "10.0.0.1".into(),
                time: 1_800_000_000,
                friendly_name: String::new(),
                floating_expires: 0,
            },
        }
    }

    /// A fresh directory `keygate-<name>-<pid>` holding a SQLite store with one key (room for
    /// 100 machines); returns the directory, the store and the key's global id.
    pub(crate) fn store_with_a_key(name: &str) -> (PathBuf, Store, i64) {
        let dir = std::env::temp_dir().join(format!("keygate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir.join("k.db")).unwrap();
        let t = store.create_tenant("t", b"k", "<x/>", 1).unwrap();
        let p = store.create_product(t, "p", None, None, 1).unwrap();
        let (_, gid) = store
            .create_key(&crate::store::NewKey {
                product_id: p,
                key: "K".into(),
                max_no_of_machines: 100,
                ..Default::default()
            })
            .unwrap();
        (dir, store, gid)
    }

    #[test]
    fn changes_past_the_stores_mark_are_replayed_once_and_torn_lines_ignored() {
        let (dir, mut store, gid) = store_with_a_key("wal");
        let wal_dir = dir.join("wal");
        let (mut wal, n) = Wal::open_and_replay(&wal_dir, &mut store).unwrap();
        assert_eq!(n, 0);
        wal.settle();
        let seqs = wal
            .append(&[&[upsert(gid, "a")], &[upsert(gid, "b")]])
            .unwrap();
        assert_eq!(seqs, vec![1, 2]);
        // The writer committed the first group before the crash, the second not.
        store
            .write_batch_once(None, Some((wal.node, 1)), &[upsert(gid, "a")], &[])
            .unwrap();
        wal.append(&[&[upsert(gid, "c")]]).unwrap();
        drop(wal);
        // A crash in the middle of an append leaves a torn line, right after the last one.
        let seg = segments(&wal_dir).unwrap().pop().unwrap().1;
        let end = std::fs::read(&seg)
            .unwrap()
            .iter()
            .position(|b| *b == 0)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&seg).unwrap(),
            b"{\"seq\":4,\"ev",
            end as u64,
        )
        .unwrap();

        let (mut wal, n) = Wal::open_and_replay(&wal_dir, &mut store).unwrap();
        assert_eq!(n, 2, "b and c");
        let codes: Vec<String> = store
            .key(gid)
            .unwrap()
            .license
            .machines
            .iter()
            .map(|m| m.machine_code.clone())
            .collect();
        assert_eq!(codes, ["a", "b", "c"]);
        assert!(segments(&wal_dir).unwrap().is_empty());
        assert_eq!(store.wal_progress(wal.node).unwrap(), 3);
        // Numbering goes on after what was seen; a second open replays nothing.
        assert_eq!(wal.append(&[&[upsert(gid, "d")]]).unwrap(), vec![4]);
        wal.collect(4).unwrap();
        assert_eq!(
            segments(&wal_dir).unwrap().len(),
            1,
            "the current one stays"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn segments_are_preallocated_and_deleted_once_full_and_safe() {
        let (dir, mut store, gid) = store_with_a_key("wal-segments");
        let wal_dir = dir.join("wal");
        let size = 4096;
        let (mut wal, _) = Wal::open_with(&wal_dir, &mut store, size).unwrap();
        let append_one = |wal: &mut Wal, code: &str| {
            wal.settle();
            wal.append(&[&[upsert(gid, code)]]).unwrap();
            segments(&wal_dir).unwrap()
        };
        let first = append_one(&mut wal, "m0");
        assert_eq!(first.len(), 1);
        assert_eq!(
            std::fs::metadata(&first[0].1).unwrap().len(),
            size,
            "the appended segment was written full beforehand"
        );
        // Enough appends to fill several segments; none is deleted before it is safe.
        for i in 1..60 {
            wal.settle();
            wal.append(&[&[upsert(gid, &format!("m{i}"))]]).unwrap();
            wal.collect(0).unwrap();
        }
        let all = segments(&wal_dir).unwrap();
        assert!(all.len() >= 3, "rotated: {} segments", all.len());
        // Every line is read back once, in order, the zeros after the last ignored.
        let seqs: Vec<u64> = all
            .iter()
            .flat_map(|(_, p)| read_segment(p).unwrap())
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(seqs, (1..=60).collect::<Vec<u64>>());
        // The store took the first 30: the full segments holding only those go.
        let last_of = |p: &PathBuf| read_segment(p).unwrap().last().unwrap().0;
        let safe_ones = all[..all.len() - 1]
            .iter()
            .filter(|(_, p)| last_of(p) <= 30)
            .count();
        assert!(safe_ones > 0);
        wal.collect(30).unwrap();
        let left = segments(&wal_dir).unwrap();
        assert_eq!(left.len(), all.len() - safe_ones);
        assert!(left.iter().all(|(_, p)| last_of(p) > 30));
        // A restart replays the rest (31..60) and starts over with a fresh spare.
        store
            .write_batch_once(None, Some((wal.node, 30)), &[], &[])
            .unwrap();
        drop(wal);
        let (mut wal, n) = Wal::open_with(&wal_dir, &mut store, size).unwrap();
        assert_eq!(n, 30);
        assert!(segments(&wal_dir).unwrap().is_empty());
        assert_eq!(wal.append(&[&[upsert(gid, "after")]]).unwrap(), vec![61]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
