//! The node's spool: batches the main store could not take, kept on local disk until it can.
//!
//! One file per batch (`<number>.batch`, JSON), written to a temporary name, synced, then
//! renamed, so a file is either whole or absent after a crash. Files are replayed in number
//! order and deleted only after the store committed them; a batch keeps the `BatchId` it was
//! given, so a replay that the store already took (crash between commit and delete) is
//! skipped by the store, never written twice.

use super::{BatchId, LogRow, StoreEvent};
use crate::domain::{Machine, MachineKind};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A batch as it travels to the store or sits in the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub id: BatchId,
    /// The highest activation-log sequence number among `events`, if any.
    pub wal_seq: Option<u64>,
    pub events: Vec<StoreEvent>,
    pub logs: Vec<LogRow>,
}

pub struct Journal {
    dir: PathBuf,
    /// Spooled files, oldest first.
    files: std::collections::VecDeque<(u64, PathBuf)>,
    next: u64,
}

/// What a batch file holds: `StoreEvent`s in a stable, explicit form.
#[derive(Serialize, Deserialize)]
struct File {
    node: i64,
    batch: i64,
    #[serde(default)]
    wal_seq: Option<u64>,
    events: Vec<EventRecord>,
    logs: Vec<Log>,
}

/// A `LogRow` in the file.
#[derive(Serialize, Deserialize)]
struct Log {
    tenant: Option<i64>,
    product: Option<i64>,
    key: Option<i64>,
    client_ip: String,
    proxy_ip: String,
    time: i64,
    code: String,
    name: String,
    state: u16,
    floating_expires: i64,
}

impl From<&LogRow> for Log {
    fn from(l: &LogRow) -> Log {
        Log {
            tenant: l.tenant_id,
            product: l.product_id,
            key: l.key_id,
            client_ip: l.client_ip.to_string(),
            proxy_ip: l.proxy_ip.to_string(),
            time: l.time,
            code: l.machine_code.clone(),
            name: l.friendly_name.clone(),
            state: l.state,
            floating_expires: l.floating_expires,
        }
    }
}

impl From<Log> for LogRow {
    fn from(l: Log) -> LogRow {
        LogRow {
            tenant_id: l.tenant,
            product_id: l.product,
            key_id: l.key,
            client_ip: l.client_ip.into(),
            proxy_ip: l.proxy_ip.into(),
            time: l.time,
            machine_code: l.code,
            friendly_name: l.name,
            state: l.state,
            floating_expires: l.floating_expires,
        }
    }
}

/// A `StoreEvent` as the spool and the activation log write it.
#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum EventRecord {
    Upsert {
        key: i64,
        code: String,
        kind: i64,
        ip: String,
        proxy_ip: String,
        time: i64,
        name: String,
        floating_expires: i64,
    },
    Remove {
        key: i64,
        code: String,
        floating: bool,
    },
    Expires {
        key: i64,
        expires: i64,
    },
    FloatingExpired {
        key: i64,
        now: i64,
    },
}

impl From<&StoreEvent> for EventRecord {
    fn from(e: &StoreEvent) -> EventRecord {
        match e {
            StoreEvent::MachineUpsert {
                key_global_id,
                machine: m,
            } => EventRecord::Upsert {
                key: *key_global_id,
                code: m.machine_code.clone(),
                kind: m.kind.as_i64(),
                ip: m.ip.clone(),
                proxy_ip: m.proxy_ip.to_string(),
                time: m.time,
                name: m.friendly_name.clone(),
                floating_expires: m.floating_expires,
            },
            StoreEvent::MachineRemove {
                key_global_id,
                machine_code,
                floating,
            } => EventRecord::Remove {
                key: *key_global_id,
                code: machine_code.clone(),
                floating: *floating,
            },
            StoreEvent::ExpiresSet {
                key_global_id,
                expires,
            } => EventRecord::Expires {
                key: *key_global_id,
                expires: *expires,
            },
            StoreEvent::FloatingExpired { key_global_id, now } => EventRecord::FloatingExpired {
                key: *key_global_id,
                now: *now,
            },
        }
    }
}

impl From<EventRecord> for StoreEvent {
    fn from(e: EventRecord) -> StoreEvent {
        match e {
            EventRecord::Upsert {
                key,
                code,
                kind,
                ip,
                proxy_ip,
                time,
                name,
                floating_expires,
            } => StoreEvent::MachineUpsert {
                key_global_id: key,
                machine: Machine {
                    machine_code: code,
                    kind: MachineKind::from_i64(kind),
                    ip,
                    proxy_ip: proxy_ip.into(),
                    time,
                    friendly_name: name,
                    floating_expires,
                },
            },
            EventRecord::Remove {
                key,
                code,
                floating,
            } => StoreEvent::MachineRemove {
                key_global_id: key,
                machine_code: code,
                floating,
            },
            EventRecord::Expires { key, expires } => StoreEvent::ExpiresSet {
                key_global_id: key,
                expires,
            },
            EventRecord::FloatingExpired { key, now } => StoreEvent::FloatingExpired {
                key_global_id: key,
                now,
            },
        }
    }
}

pub(super) fn encode_events(events: &[StoreEvent]) -> Vec<EventRecord> {
    events.iter().map(EventRecord::from).collect()
}

pub(super) fn decode_events(records: Vec<EventRecord>) -> Vec<StoreEvent> {
    records.into_iter().map(StoreEvent::from).collect()
}

fn number_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".batch")?
        .parse()
        .ok()
}

impl Journal {
    /// Opens (creating) the spool directory and finds batches left by an earlier run.
    /// Leftover temporary files (a crash mid-write) are removed: their batch was never
    /// acknowledged as spooled.
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)?;
            } else if let Some(n) = number_of(&path) {
                files.push((n, path));
            }
        }
        files.sort();
        let next = files.last().map_or(1, |(n, _)| n + 1);
        Ok(Journal {
            dir: dir.to_owned(),
            files: files.into(),
            next,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Spooled batches.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Writes a batch durably (synced file and directory) at the end of the spool.
    pub fn append(&mut self, b: &Batch) -> std::io::Result<()> {
        let n = self.next;
        let body = serde_json::to_vec(&File {
            node: b.id.node,
            batch: b.id.batch,
            wal_seq: b.wal_seq,
            events: encode_events(&b.events),
            logs: b.logs.iter().map(Log::from).collect(),
        })?;
        let tmp = self.dir.join(format!("{n:020}.tmp"));
        let path = self.dir.join(format!("{n:020}.batch"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.next = n + 1;
        self.files.push_back((n, path));
        Ok(())
    }

    /// The oldest spooled batch. A file that cannot be read back is an error that names it
    /// (it stays in place for an operator to look at).
    pub fn front(&self) -> Option<std::io::Result<Batch>> {
        let (_, path) = self.files.front()?;
        Some(read(path))
    }

    /// Deletes the oldest batch: call after the store committed it.
    pub fn pop_front(&mut self) -> std::io::Result<()> {
        if let Some((_, path)) = self.files.pop_front() {
            std::fs::remove_file(&path)?;
        }
        Ok(())
    }
}

fn read(path: &Path) -> std::io::Result<Batch> {
    let bytes = std::fs::read(path)?;
    let f: File = serde_json::from_slice(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    Ok(Batch {
        id: BatchId {
            node: f.node,
            batch: f.batch,
        },
        wal_seq: f.wal_seq,
        events: decode_events(f.events),
        logs: f.logs.into_iter().map(LogRow::from).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: i64) -> Batch {
        Batch {
            id: BatchId { node: 7, batch: n },
            wal_seq: Some(n as u64),
            events: vec![
                StoreEvent::MachineUpsert {
                    key_global_id: n,
                    machine: Machine {
                        machine_code: format!("m{n}"),
                        kind: MachineKind::Floating,
                        ip: "203.0.113.9".into(),
                        proxy_ip: "10.0.0.1".into(),
                        time: 1_800_000_000,
                        friendly_name: "pc \"1\"".into(),
                        floating_expires: 1_800_000_100,
                    },
                },
                StoreEvent::MachineRemove {
                    key_global_id: n,
                    machine_code: "x".into(),
                    floating: true,
                },
                StoreEvent::ExpiresSet {
                    key_global_id: n,
                    expires: 5,
                },
                StoreEvent::FloatingExpired {
                    key_global_id: n,
                    now: 6,
                },
            ],
            logs: vec![LogRow {
                tenant_id: None,
                product_id: Some(3),
                key_id: Some(n),
                client_ip: "203.0.113.0".into(),
                proxy_ip: "10.0.0.1".into(),
                time: 1_800_000_000 + n,
                machine_code: "é".into(),
                friendly_name: String::new(),
                state: 2010,
                floating_expires: 0,
            }],
        }
    }

    #[test]
    fn batches_come_back_whole_in_order_across_reopen_and_torn_writes_vanish() {
        let dir = std::env::temp_dir().join(format!("keygate-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut j = Journal::open(&dir).unwrap();
        assert!(j.is_empty());
        for n in 1..=3 {
            j.append(&batch(n)).unwrap();
        }
        // A crash in the middle of writing the fourth leaves only its temporary file.
        std::fs::write(dir.join(format!("{:020}.tmp", 4)), b"{\"node\":").unwrap();
        drop(j);
        let mut j = Journal::open(&dir).unwrap();
        assert_eq!(j.len(), 3);
        assert!(!dir.join(format!("{:020}.tmp", 4)).exists());
        for n in 1..=3 {
            assert_eq!(j.front().unwrap().unwrap(), batch(n));
            j.pop_front().unwrap();
        }
        assert!(j.front().is_none());
        // Numbering continues after what was used, never reusing a name.
        j.append(&batch(9)).unwrap();
        assert_eq!(
            Journal::open(&dir).unwrap().front().unwrap().unwrap(),
            batch(9)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
