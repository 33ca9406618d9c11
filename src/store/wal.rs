//! The activation log: every activation change is on local disk (appended and synced) before
//! the client is told it succeeded, so a `kill -9` or a crash loses no accepted activation.
//!
//! A thread (`keygate-wal`) takes changes from the request handlers, appends each group that
//! is waiting to the current segment file with one `fdatasync` (group commit), then forwards
//! them in order to the store writer and answers the handlers. Each group has a sequence
//! number; the writer records the highest one it has committed (or spooled) in the store's
//! `node_progress` row, in the same transaction. Segments whose changes are all safe are
//! deleted. At start, changes past the store's recorded number are written to the store before
//! the node loads its state (`replay`), so a crash between commit and delete writes nothing
//! twice.

use super::journal::{decode_events, encode_events, EventRecord};
use super::{Store, StoreEvent};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, Write};
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
/// acknowledged, so it is ignored.
fn read_segment(path: &Path) -> std::io::Result<Vec<(u64, Vec<StoreEvent>)>> {
    let mut out = Vec::new();
    let f = std::io::BufReader::new(File::open(path)?);
    for line in f.split(b'\n') {
        let line = line?;
        match serde_json::from_slice::<Line>(&line) {
            Ok(l) => out.push((l.seq, decode_events(l.events))),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The activation log's files, owned by the WAL thread.
pub struct Wal {
    dir: PathBuf,
    pub node: i64,
    next_seq: u64,
    /// The segment being appended to: number, file, last sequence number in it.
    current: Option<(u64, File, u64)>,
    /// Older segments not yet deleted: number, last sequence number.
    closed: Vec<(u64, u64)>,
    next_segment: u64,
}

impl Wal {
    /// Opens the directory and writes to `store` every change it holds past what the store
    /// has recorded for this node, then deletes the old segments. Call before loading state.
    pub fn open_and_replay(dir: &Path, store: &mut Store) -> anyhow::Result<(Wal, usize)> {
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
        for (_, path) in &segs {
            std::fs::remove_file(path)?;
        }
        let next_segment = segs.last().map_or(1, |(n, _)| n + 1);
        Ok((
            Wal {
                dir: dir.to_owned(),
                node,
                next_seq: last + 1,
                current: None,
                closed: Vec::new(),
                next_segment,
            },
            replayed,
        ))
    }

    /// Appends groups of changes, synced; returns their sequence numbers.
    pub fn append(&mut self, groups: &[&[StoreEvent]]) -> std::io::Result<Vec<u64>> {
        if self.current.is_none() {
            let n = self.next_segment;
            self.next_segment += 1;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{n:020}.wal")))?;
            // The new name must survive a crash too.
            File::open(&self.dir)?.sync_all()?;
            self.current = Some((n, f, 0));
        }
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
        let (_, f, last) = self.current.as_mut().expect("opened above");
        f.write_all(&buf)?;
        f.sync_data()?;
        if let Some(s) = seqs.last() {
            *last = *s;
        }
        Ok(seqs)
    }

    /// Deletes segments whose changes are all committed or spooled (`safe` and below). The
    /// current segment is closed first when all of it is safe, so the log does not grow.
    pub fn collect(&mut self, safe: u64) -> std::io::Result<()> {
        if let Some((n, _, last)) = &self.current {
            if *last > 0 && *last <= safe {
                self.closed.push((*n, *last));
                self.current = None;
            }
        }
        let dir = &self.dir;
        let mut err = Ok(());
        self.closed.retain(|(n, last)| {
            if *last <= safe {
                if let Err(e) = std::fs::remove_file(dir.join(format!("{n:020}.wal"))) {
                    err = Err(e);
                    return true;
                }
                false
            } else {
                true
            }
        });
        err
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::{Machine, MachineKind};

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
        // A crash in the middle of an append leaves a torn line.
        let seg = segments(&wal_dir).unwrap().pop().unwrap().1;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(b"{\"seq\":4,\"ev")
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
        assert!(segments(&wal_dir).unwrap().is_empty(), "all safe: deleted");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
