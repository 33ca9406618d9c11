//! Distributed mode: several edge nodes share every license's activations through Redis.
//!
//! Each license's activations live in one Redis hash, `kg:{s<shard>}:lic:<global id>`, as a
//! version number and a snapshot (the machine list, and `Expires` for trial-activation keys).
//! A node decides in memory as always (`domain::activate`), then commits the resulting
//! snapshot with one compare-and-set script: it succeeds only if Redis still holds the version
//! the node decided on. The script also appends the snapshot to its shard's stream (for the
//! main store) and publishes `<global id> <version>` so the other nodes refresh. A node that
//! lost the race installs the newer snapshot and decides again. The limit is exact because
//! every accepted change is one successful compare-and-set on the one hash.
//!
//! Known machines are answered from memory without a Redis round trip. Each node consumes
//! the shard streams (consumer group `kg-store`) into the main store, one transaction per
//! pass over the shards, where a snapshot replaces the license's activations only if its
//! version is newer than the stored one (of several entries of one license in a pass, only the
//! newest is written), so entries can be applied more than once, in any split between nodes.
//!
//! Keys of one license and its shard's stream share a hash tag, so the script also runs on a
//! Redis Cluster; this module talks to one Redis server or a cluster's single endpoint today.

use crate::domain::{License, Machine, MachineKind};
use crate::state::State;
use redis::aio::ConnectionManager;
use redis::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The activations of one license as Redis holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub version: u64,
    /// `Expires`, for trial-activation keys (a new machine moves it); `None` otherwise.
    pub expires: Option<i64>,
    pub machines: Vec<Machine>,
}

impl Snapshot {
    pub fn of(l: &License, version: u64) -> Snapshot {
        Snapshot {
            version,
            expires: l.trial_activation.then_some(l.expires),
            machines: l.machines.clone(),
        }
    }

    /// What `l`'s snapshot becomes with `change` (version 0 until committed), copying only
    /// its machine list.
    pub fn after(l: &License, change: &crate::domain::decide::Change, now: i64) -> Snapshot {
        let (mut machines, mut expires) = (l.machines.clone(), l.expires);
        crate::domain::decide::apply_change(&mut machines, &mut expires, change, now);
        Snapshot {
            version: 0,
            expires: l.trial_activation.then_some(expires),
            machines,
        }
    }

    /// Installs this snapshot in `l` if it is newer than what `l` holds (version fence).
    pub fn install(&self, l: &mut License) -> bool {
        if self.version <= l.shared_version {
            return false;
        }
        l.machines.clone_from(&self.machines);
        installed(l, self.version, self.expires)
    }

    /// `install`, moving the machine list instead of copying it.
    pub fn install_owned(self, l: &mut License) -> bool {
        if self.version <= l.shared_version {
            return false;
        }
        l.machines = self.machines;
        installed(l, self.version, self.expires)
    }

    pub fn encode(&self) -> String {
        let out = SnapshotOut {
            e: self.expires,
            m: MachinesOut(&self.machines),
        };
        serde_json::to_string(&out).unwrap_or_default()
    }

    pub fn decode(version: u64, text: &str) -> Option<Snapshot> {
        let v: SnapshotIn = serde_json::from_str(text).ok()?;
        Some(Snapshot {
            version,
            expires: v.e,
            machines: v.m.into_iter().map(|m| m.0).collect(),
        })
    }
}

/// The rest of installing a snapshot whose machines are in place.
fn installed(l: &mut License, version: u64, expires: Option<i64>) -> bool {
    if let Some(e) = expires {
        l.expires = e;
    }
    l.shared_version = version;
    l.version += 1;
    true
}

// The encoding of snapshots in Redis: `{"e": Expires or null, "m": machines}`, a machine as
// the array `[code, kind, ip, proxy ip, time, friendly name, floating expires]` (a reader
// ignores further elements, which a later version may add). Written and read through these
// types, not `serde_json::Value`: every new machine encodes one.

#[derive(serde::Serialize)]
struct SnapshotOut<'a> {
    e: Option<i64>,
    m: MachinesOut<'a>,
}

struct MachinesOut<'a>(&'a [Machine]);

impl serde::Serialize for MachinesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|m| {
            (
                &m.machine_code,
                m.kind.as_i64(),
                &m.ip,
                &*m.proxy_ip,
                m.time,
                &m.friendly_name,
                m.floating_expires,
            )
        }))
    }
}

#[derive(serde::Deserialize)]
struct SnapshotIn {
    e: Option<i64>,
    m: Vec<MachineIn>,
}

/// A machine's array, read by position; elements after the seventh are skipped.
struct MachineIn(Machine);

impl<'de> serde::Deserialize<'de> for MachineIn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = MachineIn;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a machine array of at least seven elements")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<MachineIn, A::Error> {
                fn next<'de, T: serde::Deserialize<'de>, A: serde::de::SeqAccess<'de>>(
                    a: &mut A,
                    i: usize,
                ) -> Result<T, A::Error> {
                    a.next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &"seven elements"))
                }
                let m = Machine {
                    machine_code: next(&mut a, 0)?,
                    kind: MachineKind::from_i64(next(&mut a, 1)?),
                    ip: next(&mut a, 2)?,
                    proxy_ip: next::<String, _>(&mut a, 3)?.into(),
                    time: next(&mut a, 4)?,
                    friendly_name: next(&mut a, 5)?,
                    floating_expires: next(&mut a, 6)?,
                };
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(MachineIn(m))
            }
        }
        d.deserialize_seq(Visit)
    }
}

/// What a compare-and-set came to.
#[derive(Debug)]
pub enum Cas {
    /// Committed as this version.
    Done(u64),
    /// Redis holds another version: this one.
    Conflict(Snapshot),
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

/// Writes a snapshot from the main store unless Redis holds this version or a newer one.
/// KEYS: state hash. ARGV: version, snapshot. Returns 1 when written.
const RESTORE_LUA: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 's', ARGV[2])
return 1
"#;

/// Compare-and-set of one license's snapshot, append to its shard's stream, publish.
/// KEYS: state hash, shard stream. ARGV: expected version, snapshot, global id, channel.
const CAS_LUA: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then
  return {0, tostring(v), redis.call('HGET', KEYS[1], 's') or ''}
end
local nv = v + 1
redis.call('HSET', KEYS[1], 'v', nv, 's', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '1000000', '*', 'g', ARGV[3], 'v', nv, 's', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3] .. ' ' .. nv)
return {1, tostring(nv)}
"#;

/// The pub/sub channel of license changes.
pub const CHANNEL: &str = "kg:licenses";
/// The pub/sub channel on which the control plane announces a committed change (payload: the
/// time it was sent, unix milliseconds); nodes then read the change feed at once.
pub const CONTROL: &str = "kg:control";
/// The consumer group that carries the shard streams into the main store.
pub const GROUP: &str = "kg-store";

pub struct Dist {
    conn: Conn,
    shards: u64,
    cas: redis::Script,
    /// With encryption at rest on, snapshots (machine codes, IPs, friendly names) are sealed
    /// in Redis too, with the same keys as the main store.
    ring: Option<Arc<crate::store::cipher::Keyring>>,
    /// How long a key's refused entries may hold back trimming before its newest is moved to
    /// the end of the stream (`store_pass`).
    requeue_after: Duration,
}

/// One Redis server (reconnecting manager) or a Redis Cluster (slot-routing connection). Both
/// multiplex and reconnect by themselves; cheap to clone.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// `text`, moving a bulk string's bytes instead of copying them.
fn into_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        other => text(&other),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

impl Dist {
    /// Connects (RESP3, so pub/sub pushes arrive on the same connection) and subscribes to the
    /// license channel; pushes go to `pushes`. The connection reconnects by itself.
    /// With `cluster`, `url` is any node of a Redis Cluster (the others are discovered). A
    /// `rediss://` URL is TLS (rustls); `ca_pem` then replaces the system's roots.
    pub async fn connect(
        url: &str,
        cluster: bool,
        ca_pem: Option<Vec<u8>>,
        shards: u64,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<Dist, DistError> {
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: ca_pem.clone(),
        };
        let conn = if cluster {
            let mut builder = redis::cluster::ClusterClient::builder(vec![url.to_owned()])
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes)
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_secs(2))
                .retries(2);
            if ca_pem.is_some() {
                builder = builder.certs(certs());
            }
            let mut c = builder.build()?.get_async_connection().await?;
            c.subscribe(&[CHANNEL, CONTROL]).await?;
            Conn::Cluster(c)
        } else {
            let url = if url.contains("protocol=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&protocol=resp3")
            } else {
                format!("{url}/?protocol=resp3")
            };
            let client = match &ca_pem {
                Some(_) => redis::Client::build_with_tls(url, certs())?,
                None => redis::Client::open(url)?,
            };
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_push_sender(pushes)
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let mut c = ConnectionManager::new_with_config(client, config).await?;
            c.subscribe(&[CHANNEL, CONTROL]).await?;
            Conn::Single(c)
        };
        Ok(Dist {
            conn,
            shards: shards.max(1),
            cas: redis::Script::new(CAS_LUA),
            ring: None,
            requeue_after: Duration::from_secs(60),
        })
    }

    /// Moves the entries of a key the main store keeps refusing to the end of its stream once
    /// the oldest is this old (`redis.requeue_refused_after_ms`).
    pub fn with_requeue_after(mut self, after: Duration) -> Dist {
        self.requeue_after = after;
        self
    }

    /// Seals snapshots in Redis with these keys (encryption at rest).
    pub fn with_keyring(mut self, ring: Option<Arc<crate::store::cipher::Keyring>>) -> Dist {
        self.ring = ring;
        self
    }

    fn seal(&self, snap: &Snapshot) -> String {
        let text = snap.encode();
        match &self.ring {
            Some(r) => r.seal_text(&text),
            None => text,
        }
    }

    fn open(&self, version: u64, stored: &str) -> Option<Snapshot> {
        match crate::store::cipher::open_text(self.ring.as_deref(), stored.to_owned()) {
            Ok(text) => Snapshot::decode(version, &text),
            Err(e) => {
                tracing::error!(error = %e, "a snapshot in redis cannot be opened");
                None
            }
        }
    }

    /// The snapshot of a stream entry (decoded only for the entries a pass writes).
    pub fn entry_snapshot(&self, c: &StreamChange) -> Option<Snapshot> {
        self.open(c.version, &c.snapshot)
    }

    pub fn shards(&self) -> u64 {
        self.shards
    }

    fn shard(&self, gid: i64) -> u64 {
        gid.unsigned_abs() % self.shards
    }

    pub fn state_key(&self, gid: i64) -> String {
        format!("kg:{{s{}}}:lic:{gid}", self.shard(gid))
    }

    pub fn stream_key(&self, shard: u64) -> String {
        format!("kg:{{s{shard}}}:changes")
    }

    /// Commits `next` as the license's new snapshot if Redis still holds `expected`.
    pub async fn cas(&self, gid: i64, expected: u64, next: &Snapshot) -> Result<Cas, DistError> {
        let mut conn = self.conn.clone();
        let started = std::time::Instant::now();
        let reply: Result<Value, _> = self
            .cas
            .key(self.state_key(gid))
            .key(self.stream_key(self.shard(gid)))
            .arg(expected)
            .arg(self.seal(next))
            .arg(gid)
            .arg(CHANNEL)
            .invoke_async(&mut conn)
            .await;
        crate::metrics::redis_round_trip(started.elapsed(), reply.is_ok());
        let reply = reply?;
        let Value::Array(parts) = &reply else {
            return Err(DistError::Reply(format!("{reply:?}")));
        };
        let field = |i: usize| parts.get(i).and_then(text);
        let version: u64 = field(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| DistError::Reply(format!("{reply:?}")))?;
        match field(0).as_deref() {
            Some("1") => Ok(Cas::Done(version)),
            Some("0") => {
                let snap = match field(2) {
                    Some(s) if !s.is_empty() => self.open(version, &s).ok_or_else(|| {
                        DistError::Reply("a snapshot that does not decode".into())
                    })?,
                    // Nothing stored: version 0, no machines.
                    _ => Snapshot {
                        version,
                        expires: None,
                        machines: Vec::new(),
                    },
                };
                Ok(Cas::Conflict(snap))
            }
            _ => Err(DistError::Reply(format!("{reply:?}"))),
        }
    }

    /// The stored snapshots of these licenses (`None`: not in Redis yet): one pipeline per
    /// shard, whose keys share a hash tag and so a cluster slot.
    pub async fn fetch(&self, gids: &[i64]) -> Result<Vec<Option<Snapshot>>, DistError> {
        let mut out = vec![None; gids.len()];
        let mut by_shard: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
        for (i, g) in gids.iter().enumerate() {
            by_shard.entry(self.shard(*g)).or_default().push(i);
        }
        let mut conn = self.conn.clone();
        for idx in by_shard.values() {
            let mut pipe = redis::pipe();
            for &i in idx {
                pipe.cmd("HMGET")
                    .arg(self.state_key(gids[i]))
                    .arg("v")
                    .arg("s");
            }
            let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
            for (&i, r) in idx.iter().zip(&replies) {
                out[i] = (|| {
                    let Value::Array(p) = r else { return None };
                    let version: u64 = text(p.first()?)?.parse().ok()?;
                    self.open(version, &text(p.get(1)?)?)
                })();
            }
        }
        Ok(out)
    }

    /// Creates the consumer group on every shard stream (from the start, so nothing written
    /// before this node came up is missed); an existing group is fine.
    pub async fn ensure_groups(&self) -> Result<(), DistError> {
        let mut conn = self.conn.clone();
        for shard in 0..self.shards {
            let r: Result<Value, _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.stream_key(shard))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match r {
                Ok(_) => {}
                Err(e) if e.to_string().contains("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Up to `count` entries of each shard for `consumer`: its own pending ones when
    /// `pending` is given (after each shard's id in it; from the start for a shard not in
    /// it), else new ones, by shard (only shards with entries). Each entry is (entry id,
    /// the change); the second is `None` for an entry that cannot be used (trimmed or
    /// damaged), which is still to be acknowledged. Snapshots are left sealed and encoded: a
    /// pass decodes only those it writes. One command for every shard on one Redis server;
    /// shard by shard on a cluster, where the streams live in different slots (a shard that
    /// cannot be read is skipped, and the error returned beside what was read).
    pub async fn read_all(
        &self,
        consumer: &str,
        pending: Option<&Sweep>,
        count: usize,
    ) -> (Vec<(u64, Vec<Entry>)>, Option<DistError>) {
        let batches: Vec<Vec<u64>> = match self.conn {
            Conn::Single(_) => vec![(0..self.shards).collect()],
            Conn::Cluster(_) => (0..self.shards).map(|s| vec![s]).collect(),
        };
        let (mut out, mut failed) = (Vec::new(), None);
        for shards in batches {
            match self.read(&shards, consumer, pending, count).await {
                Ok(read) => out.extend(read),
                Err(e) => failed = Some(e),
            }
        }
        (out, failed)
    }

    async fn read(
        &self,
        shards: &[u64],
        consumer: &str,
        pending: Option<&Sweep>,
        count: usize,
    ) -> Result<Vec<(u64, Vec<Entry>)>, DistError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS");
        for &shard in shards {
            cmd.arg(self.stream_key(shard));
        }
        for shard in shards {
            cmd.arg(match pending {
                None => ">",
                Some(after) => after.get(shard).map_or("0", String::as_str),
            });
        }
        let reply: Value = cmd.query_async(&mut conn).await?;
        // RESP3: {stream: [[id, [field, value, ...]], ...], ...}; RESP2: [[stream, [...]], ...].
        let streams: Vec<(Value, Value)> = match reply {
            Value::Nil => return Ok(Vec::new()),
            Value::Map(m) => m,
            Value::Array(a) => a
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => {
                        let v = kv.pop()?;
                        Some((kv.pop()?, v))
                    }
                    _ => None,
                })
                .collect(),
            other => return Err(DistError::Reply(format!("{other:?}"))),
        };
        let mut out = Vec::new();
        for (name, entries) in streams {
            let Some(shard) = text(&name).as_deref().and_then(stream_shard) else {
                return Err(DistError::Reply(format!("an unknown stream {name:?}")));
            };
            let Value::Array(entries) = entries else {
                continue;
            };
            let read: Vec<Entry> = entries.into_iter().filter_map(stream_entry).collect();
            if !read.is_empty() {
                out.push((shard, read));
            }
        }
        Ok(out)
    }

    /// Appends a copy of this entry to the end of its shard's stream (the entry itself is
    /// then acknowledged by the caller), as the compare-and-set appends it.
    pub async fn requeue(&self, shard: u64, c: &StreamChange) -> Result<(), DistError> {
        let mut conn = self.conn.clone();
        let _: Value = redis::cmd("XADD")
            .arg(self.stream_key(shard))
            .arg("MAXLEN")
            .arg("~")
            .arg("1000000")
            .arg("*")
            .arg("g")
            .arg(c.gid)
            .arg("v")
            .arg(c.version)
            .arg("s")
            .arg(&c.snapshot)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Acknowledges entries, by shard: one pipeline on one Redis server, shard by shard on a
    /// cluster.
    pub async fn ack(&self, acks: &[(u64, Vec<&str>)]) -> Result<(), DistError> {
        let acks: Vec<&(u64, Vec<&str>)> = acks.iter().filter(|(_, ids)| !ids.is_empty()).collect();
        let xack = |shard: u64, ids: &[&str]| {
            let mut c = redis::cmd("XACK");
            c.arg(self.stream_key(shard)).arg(GROUP).arg(ids);
            c
        };
        let mut conn = self.conn.clone();
        match self.conn {
            Conn::Single(_) if !acks.is_empty() => {
                let mut pipe = redis::pipe();
                for (shard, ids) in &acks {
                    pipe.add_command(xack(*shard, ids)).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
            }
            _ => {
                for (shard, ids) in &acks {
                    let _: Value = xack(*shard, ids).query_async(&mut conn).await?;
                }
            }
        }
        Ok(())
    }

    /// The consumer group's state on a shard stream: (pending, lag, last delivered id).
    async fn group_state(&self, shard: u64) -> Result<(u64, u64, String), DistError> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.stream_key(shard))
            .query_async(&mut conn)
            .await?;
        let Value::Array(groups) = reply else {
            return Err(DistError::Reply(format!("{reply:?}")));
        };
        for g in groups {
            // RESP3: a map; RESP2: a flat field/value list.
            let pairs: Vec<(Value, Value)> = match g {
                Value::Map(m) => m,
                Value::Array(a) => a
                    .chunks(2)
                    .filter_map(|c| Some((c.first()?.clone(), c.get(1)?.clone())))
                    .collect(),
                _ => continue,
            };
            let field = |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| text(k).as_deref() == Some(name))
                    .and_then(|(_, v)| text(v))
            };
            if field("name").as_deref() != Some(GROUP) {
                continue;
            }
            let num = |name: &str| field(name).and_then(|v| v.parse().ok()).unwrap_or(0);
            return Ok((
                num("pending"),
                num("lag"),
                field("last-delivered-id").unwrap_or_else(|| "0-0".into()),
            ));
        }
        Err(DistError::Reply(
            "no consumer group on a change stream".into(),
        ))
    }

    /// Drops the entries of a shard stream that the store already has (delivered and
    /// acknowledged): the stream keeps only what is on its way, so personal data does not
    /// linger in Redis (nor survive an erasure there).
    pub async fn trim(&self, shard: u64) -> Result<(), DistError> {
        let (pending, _, last) = self.group_state(shard).await?;
        let mut conn = self.conn.clone();
        let min = if pending > 0 {
            // The oldest entry still unacknowledged stays, with everything after it.
            let reply: Value = redis::cmd("XPENDING")
                .arg(self.stream_key(shard))
                .arg(GROUP)
                .query_async(&mut conn)
                .await?;
            match reply {
                Value::Array(p) => p.get(1).and_then(text),
                _ => None,
            }
        } else {
            // Everything up to the last delivered entry is acknowledged: keep what follows.
            last.split_once('-')
                .and_then(|(ms, seq)| Some(format!("{ms}-{}", seq.parse::<u64>().ok()? + 1)))
        };
        if let Some(min) = min {
            let _: Value = redis::cmd("XTRIM")
                .arg(self.stream_key(shard))
                .arg("MINID")
                .arg(min)
                .query_async(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Waits until the nodes have carried every shard stream into the main store (nothing
    /// pending or unread), at most `within`. False if they did not (no node running, say).
    pub async fn wait_drained(&self, within: Duration) -> Result<bool, DistError> {
        let end = std::time::Instant::now() + within;
        loop {
            let mut busy = false;
            for shard in 0..self.shards {
                let (pending, lag, _) = self.group_state(shard).await?;
                busy |= pending > 0 || lag > 0;
            }
            if !busy {
                return Ok(true);
            }
            if std::time::Instant::now() >= end {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes over entries another consumer read but did not acknowledge for `idle`.
    pub async fn claim_stale(
        &self,
        shard: u64,
        consumer: &str,
        idle: Duration,
    ) -> Result<(), DistError> {
        let mut conn = self.conn.clone();
        let _: Value = redis::cmd("XAUTOCLAIM")
            .arg(self.stream_key(shard))
            .arg(GROUP)
            .arg(consumer)
            .arg(idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(500)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// `keygate sync`: puts the main store's activations into Redis for every license that
    /// Redis does not hold at that version or newer (after Redis lost data, or to start
    /// distributed mode on an existing store). Returns how many were written.
    pub async fn restore(&self, snaps: &[(i64, Snapshot)]) -> Result<usize, DistError> {
        let script = redis::Script::new(RESTORE_LUA);
        let mut written = 0;
        let mut conn = self.conn.clone();
        for (gid, snap) in snaps {
            let n: i64 = script
                .key(self.state_key(*gid))
                .arg(snap.version.max(1))
                .arg(self.seal(snap))
                .invoke_async(&mut conn)
                .await?;
            written += n as usize;
        }
        Ok(written)
    }

    /// Changes a license's snapshot in Redis with `edit` (which says whether it changed
    /// anything), by compare-and-set, retrying on conflict: how the control plane's erasures
    /// reach Redis. The nodes install the result like any other change. Returns whether
    /// something changed.
    pub async fn edit(
        &self,
        gid: i64,
        edit: impl Fn(&mut Vec<Machine>) -> bool,
    ) -> Result<bool, DistError> {
        for _ in 0..64 {
            let Some(Some(snap)) = self.fetch(&[gid]).await?.pop() else {
                return Ok(false);
            };
            let mut machines = snap.machines.clone();
            if !edit(&mut machines) {
                return Ok(false);
            }
            let next = Snapshot {
                machines,
                ..snap.clone()
            };
            if let Cas::Done(_) = self.cas(gid, snap.version, &next).await? {
                return Ok(true);
            }
        }
        Err(DistError::Reply(format!(
            "license {gid} kept changing; not edited"
        )))
    }
}

/// One stream entry: its id, and the license change it carries if it could be read.
pub type Entry = (String, Option<StreamChange>);

/// A license change as its stream entry carries it.
#[derive(Debug)]
pub struct StreamChange {
    pub gid: i64,
    pub version: u64,
    /// The whole snapshot, sealed and encoded as stored (`Dist::entry_snapshot`).
    snapshot: String,
}

/// The shard of a stream key `kg:{s<shard>}:changes`.
fn stream_shard(key: &str) -> Option<u64> {
    key.strip_prefix("kg:{s")?.split_once('}')?.0.parse().ok()
}

/// One entry of an `XREADGROUP` reply, taken apart by value (a snapshot's text is moved out,
/// not copied); `None` without an id.
fn stream_entry(e: Value) -> Option<Entry> {
    let Value::Array(e) = e else { return None };
    let mut e = e.into_iter();
    let id = e.next().and_then(into_text)?;
    let Some(Value::Array(fields)) = e.next() else {
        return Some((id, None));
    };
    let (mut g, mut v, mut s) = (None, None, None);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(val)) = (fields.next(), fields.next()) {
        let val = into_text(val);
        match into_text(name).as_deref() {
            Some("g") => g = val.and_then(|x| x.parse::<i64>().ok()),
            Some("v") => v = val.and_then(|x| x.parse::<u64>().ok()),
            Some("s") => s = val,
            _ => {}
        }
    }
    let decoded = match (g, v, s) {
        (Some(gid), Some(version), Some(snapshot)) => Some(StreamChange {
            gid,
            version,
            snapshot,
        }),
        _ => None,
    };
    if decoded.is_none() {
        tracing::error!(entry = %id, "an unusable stream entry; skipped");
    }
    Some((id, decoded))
}

/// Brings every license this node holds up to what Redis holds (at start, and after a
/// reconnect, when pub/sub messages may have been missed). Returns how many were newer.
pub async fn sync_all(dist: &Dist, state: &State) -> Result<usize, DistError> {
    let mut installed = 0;
    for chunk in state.global_ids().chunks(1000) {
        for (gid, snap) in chunk.iter().zip(dist.fetch(chunk).await?) {
            if let Some(snap) = snap {
                installed += usize::from(state.install_shared(*gid, &snap));
            }
        }
    }
    crate::metrics::shared_applied("sync", installed);
    Ok(installed)
}

/// Follows the license channel: a change made on another node is fetched and installed here
/// (version fence: never an older one). After a reconnect, everything is synced again. Every
/// change, this node's own too, wakes the stream consumer (`changed`).
pub async fn follow(
    dist: Shared,
    state: Arc<State>,
    mut pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    control: crossbeam_channel::Sender<i64>,
    changed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    loop {
        let push = tokio::select! {
            _ = stop.cancelled() => return,
            p = pushes.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        if push.kind == redis::PushKind::Disconnection {
            crate::metrics::redis_up(false);
            // Messages sent while disconnected are lost: resync once Redis answers again, and
            // once more a second later, since the first sync can succeed before this node's
            // subscription is back (a change committed between the two would be missed).
            let (dist, state, stop) = (dist.clone(), state.clone(), stop.clone());
            tokio::spawn(async move {
                let mut synced = 0;
                while !stop.is_cancelled() && synced < 2 {
                    let pause = if synced == 0 { 250 } else { 1000 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    if let Ok(n) = sync_all(&dist, &state).await {
                        synced += 1;
                        crate::metrics::redis_up(true);
                        tracing::info!(licenses = n, "redis reachable again; resynced");
                    }
                }
            });
            continue;
        }
        if let Some(sent_ms) = parse_control(&push) {
            // The change-feed poller reads at once instead of at its next interval.
            let _ = control.try_send(sent_ms);
            continue;
        }
        let Some((gid, version)) = parse_push(&push) else {
            continue;
        };
        changed.notify_one();
        // This node's own change announces itself before the compare-and-set's reply, which
        // comes next on the same connection: once the handler it wakes has run, the license
        // is no longer behind and needs no fetch.
        tokio::task::yield_now().await;
        let behind = state
            .license_by_global(gid)
            .is_some_and(|e| e.license.lock().shared_version < version);
        if !behind {
            continue;
        }
        match dist.fetch(&[gid]).await {
            Ok(snaps) => {
                if let Some(Some(snap)) = snaps.first() {
                    if state.install_shared(gid, snap) {
                        crate::metrics::shared_applied("pubsub", 1);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, gid, "fetching a changed license failed"),
        }
    }
}

/// After the streams were empty, a pass waits this long after a change is announced, so a
/// burst is read in one pass, not one pass per change.
const STREAM_GATHER: Duration = Duration::from_millis(20);
/// While changes keep coming, passes start this far apart (unless one read as many entries as
/// it asks for): one commit of many licenses costs the store far less than many commits of a
/// few (SQLite writes each commit's changed pages again), and the main store is behind Redis
/// by this much at most.
const STREAM_BUSY_EVERY: Duration = Duration::from_millis(200);
/// Entries read from one shard in one pass, at most.
const STREAM_READ_COUNT: usize = 256;
/// With no change announced on the license channel, the streams are still read this often
/// (a message can be lost: pub/sub does not keep them).
const STREAM_IDLE_POLL: Duration = Duration::from_secs(1);
/// Acknowledged entries are trimmed from their streams this often (three commands a shard).
const STREAM_TRIM_EVERY: Duration = Duration::from_secs(1);

/// Carries the shard streams into the main store: reads entries (first its own unacknowledged
/// ones, and every few seconds those other consumers left behind), writes each snapshot
/// version-fenced, and acknowledges only after the commit. While the streams are empty it
/// waits for a change on the license channel (`changed`), or a second at most: an idle node
/// makes one read a second instead of fifty.
pub async fn store_changes(
    dist: Shared,
    store: Arc<parking_lot::Mutex<crate::store::Store>>,
    consumer: String,
    changed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    // Reading this consumer's pending entries (its own left unacknowledged, and those claimed
    // from others), from where the last such read ended: `None` while reading new entries.
    let mut sweep: Option<Sweep> = Some(Sweep::new());
    let mut claimed_at = std::time::Instant::now();
    let mut untrimmed = std::collections::BTreeSet::new();
    let mut trimmed_at = std::time::Instant::now();
    while !stop.is_cancelled() {
        let started = tokio::time::Instant::now();
        let pass = store_pass(&dist, &store, &consumer, sweep.as_ref()).await;
        crate::metrics::redis_up(pass.reachable);
        untrimmed.extend(pass.acked.iter().copied());
        // A sweep that found nothing is over, and new entries are read at once (not after
        // the idle wait below).
        let swept = sweep.is_some() && !pass.any && pass.reachable;
        sweep = next_sweep(sweep, &pass);
        // (Not right after a sweep ended: new entries are read first.)
        if !swept && claimed_at.elapsed() > Duration::from_secs(5) {
            claimed_at = std::time::Instant::now();
            for shard in 0..dist.shards() {
                if let Err(e) = dist
                    .claim_stale(shard, &consumer, Duration::from_secs(30))
                    .await
                {
                    tracing::debug!(error = %e, "claiming stale stream entries failed");
                }
            }
            // Also every few seconds without a claim: entries of keys that could not be
            // stored are tried again.
            sweep.get_or_insert_with(Sweep::new);
        }
        if trimmed_at.elapsed() >= STREAM_TRIM_EVERY {
            trimmed_at = std::time::Instant::now();
            trim(&dist, &mut untrimmed).await;
        }
        if swept {
            continue;
        }
        let next = if pass.any {
            started + STREAM_BUSY_EVERY
        } else {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = changed.notified() => {}
                _ = tokio::time::sleep(STREAM_IDLE_POLL) => {}
            }
            tokio::time::Instant::now() + STREAM_GATHER
        };
        if !pass.full {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }
    // Shutting down: carry what the streams hold now into the store before leaving (bounded,
    // and only while Redis answers), so a stopped node leaves the store up to date.
    // First this consumer's pending entries, if a sweep is under way.
    let mut failed = false;
    // Within a budget: the service manager's stop timeout (45 s in the shipped units) also
    // covers the drain before this and the writer's flush after it.
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    for _ in 0..64 {
        if std::time::Instant::now() > give_up {
            tracing::warn!("stopping with stream entries not yet carried into the store");
            break;
        }
        let pass = store_pass(&dist, &store, &consumer, sweep.as_ref()).await;
        untrimmed.extend(pass.acked.iter().copied());
        // A store that fails twice in a row now will not take the rest either: what is left
        // stays pending, for this node's next start or another node's claim.
        if !pass.reachable || (pass.again && failed) || (!pass.any && sweep.is_none()) {
            break;
        }
        failed = pass.again;
        sweep = next_sweep(sweep, &pass);
    }
    trim(&dist, &mut untrimmed).await;
}

/// Where a sweep of pending entries has got to: the last id read on each shard.
pub type Sweep = std::collections::BTreeMap<u64, String>;

/// What the consumer reads after `pass`, read with `sweep`:
/// - new entries read but not stored or acknowledged (`again`): a sweep at once, which reads
///   them again (they are pending now);
/// - during a sweep, past what was read, also past entries of keys the store refused
///   (`stuck`: they stay pending, for the next sweep), so that no run of those holds back the
///   pending entries behind it;
/// - a sweep that read nothing, or whose pass failed (the store or Redis), is over: new
///   entries next, and the rest waits for the next sweep. (Going on through a failing store
///   would read every pending entry again and again, and each read makes an entry look fresh
///   to the other nodes, whose claims take only entries idle for 30 s.)
fn next_sweep(sweep: Option<Sweep>, pass: &Pass) -> Option<Sweep> {
    match sweep {
        None if pass.again => Some(Sweep::new()),
        None => None,
        Some(_) if !pass.any || pass.again => None,
        Some(mut at) => {
            for (shard, id) in &pass.last_read {
                at.insert(*shard, id.clone());
            }
            Some(at)
        }
    }
}

/// Trims these shards' streams of what was acknowledged; a shard that fails stays listed.
async fn trim(dist: &Dist, shards: &mut std::collections::BTreeSet<u64>) {
    let mut failed = std::collections::BTreeSet::new();
    for &shard in shards.iter() {
        if let Err(e) = dist.trim(shard).await {
            tracing::debug!(error = %e, "trimming a change stream failed");
            failed.insert(shard);
        }
    }
    *shards = failed;
}

/// One read of every shard stream into the store.
async fn store_pass(
    dist: &Shared,
    store: &Arc<parking_lot::Mutex<crate::store::Store>>,
    consumer: &str,
    pending: Option<&Sweep>,
) -> Pass {
    // Every shard is read first and the lot stored in one transaction: one commit per pass,
    // and a license changed several times in the pass is written once.
    let (read, failed) = dist.read_all(consumer, pending, STREAM_READ_COUNT).await;
    let reachable = failed.is_none();
    if let Some(e) = failed {
        tracing::debug!(error = %e, "reading the change streams failed");
        if e.to_string().contains("NOGROUP") {
            // A stream lost its consumer group (its key deleted, then made again by the next
            // change): on one server a single read covers every shard, so one such stream
            // would hold back all of them. Creating the missing groups mends it.
            tracing::warn!(error = %e, "a change stream has no consumer group; creating it");
            if let Err(e) = dist.ensure_groups().await {
                tracing::warn!(error = %e, "creating the consumer groups failed");
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut pass = Pass {
        any: !read.is_empty(),
        full: read.iter().any(|(_, e)| e.len() >= STREAM_READ_COUNT),
        reachable,
        again: false,
        stuck: false,
        acked: Vec::new(),
        last_read: read
            .iter()
            .filter_map(|(shard, e)| Some((*shard, e.last()?.0.clone())))
            .collect(),
    };
    if read.is_empty() {
        return pass;
    }
    // Per shard: each entry's id and license (`None`: unusable, acknowledged all the same).
    let mut ids: Vec<(u64, Vec<EntryKey>)> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    for (shard, e) in read {
        let keys = e
            .iter()
            .map(|(id, c)| (id.clone(), c.as_ref().map(|c| c.gid)))
            .collect();
        ids.push((shard, keys));
        entries.extend(e);
    }
    let (store, d) = (store.clone(), dist.clone());
    let written = tokio::task::spawn_blocking(move || {
        let dist = d;
        let stored = {
            let changes: Vec<&StreamChange> =
                entries.iter().filter_map(|(_, c)| c.as_ref()).collect();
            let keys: Vec<crate::store::SharedEntry> = changes
                .iter()
                .map(|c| crate::store::SharedEntry {
                    gid: c.gid,
                    version: c.version,
                })
                .collect();
            let mut s = store.lock();
            s.reconnect_if_broken()
                .and_then(|()| s.apply_shared_snapshots(&keys, |i| dist.entry_snapshot(changes[i])))
        };
        // The entries come back: a refused key's newest may be requeued.
        (entries, stored)
    })
    .await
    .map(|(entries, stored)| stored.map(|stored| (entries, stored)));
    match written {
        Ok(Ok((entries, stored))) => {
            crate::metrics::shared_stored(stored.written);
            let mut requeued = std::collections::BTreeSet::new();
            if !stored.failed.is_empty() {
                // Left unacknowledged: tried again in the next sweep (every 5 s), without
                // holding back the other keys' entries meanwhile.
                tracing::error!(keys = ?stored.failed, "stream entries of these keys could not be stored");
                pass.stuck = true;
                if pending.is_some() {
                    requeued = requeue_refused(dist, &entries, &ids, &stored.failed).await;
                }
            }
            let acks: Vec<(u64, Vec<&str>)> = ids
                .iter()
                .map(|(shard, ids)| {
                    let ids = ids
                        .iter()
                        .filter(|(_, gid)| {
                            gid.is_none_or(|g| !stored.failed.contains(&g) || requeued.contains(&g))
                        })
                        .map(|(id, _)| id.as_str())
                        .collect();
                    (*shard, ids)
                })
                .collect();
            // Trimming keeps every unacknowledged entry, so the shards go to it even when
            // an acknowledgement failed (on a cluster, some shards' may have gone through).
            pass.acked = acks.iter().map(|(shard, _)| *shard).collect();
            if let Err(e) = dist.ack(&acks).await {
                // Unacknowledged entries are read again by a sweep (this consumer's pending
                // ones); writing them again is harmless.
                tracing::warn!(error = %e, "acknowledging stream entries failed");
                pass.again = true;
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "writing stream entries to the main store failed");
            pass.again = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "the store task failed");
            pass.again = true;
        }
    }
    // A sweep goes on through refused entries without pausing: it ends when it has read
    // them all, and new entries wait for that.
    if pass.stuck && pending.is_none() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pass
}

/// The refused keys (of `failed`) whose oldest entry read in this sweep is older than
/// `Dist::requeue_after`: their newest entry (highest version) is appended again at the end
/// of its stream, and the keys returned, so that their entries read here are acknowledged.
/// Otherwise a key the store refuses for long would keep every entry after its oldest in
/// Redis (trimming stops at the oldest unacknowledged entry), personal data included; the
/// copy is tried again like any new entry. A key whose copy could not be appended stays as
/// it was.
async fn requeue_refused(
    dist: &Dist,
    entries: &[Entry],
    ids: &[(u64, Vec<EntryKey>)],
    failed: &[i64],
) -> std::collections::BTreeSet<i64> {
    let now_ms = crate::http::unix_now_ms().max(0) as u64;
    let mut requeued = std::collections::BTreeSet::new();
    for &gid in failed {
        let Some((shard, oldest)) = ids.iter().find_map(|(shard, keys)| {
            let oldest = keys.iter().find(|(_, g)| *g == Some(gid))?;
            Some((*shard, oldest.0.as_str()))
        }) else {
            continue;
        };
        let written_ms = oldest
            .split_once('-')
            .and_then(|(ms, _)| ms.parse::<u64>().ok())
            .unwrap_or(now_ms);
        if now_ms.saturating_sub(written_ms) < dist.requeue_after.as_millis() as u64 {
            continue;
        }
        let Some(newest) = entries
            .iter()
            .filter_map(|(_, c)| c.as_ref())
            .filter(|c| c.gid == gid)
            .max_by_key(|c| c.version)
        else {
            continue;
        };
        match dist.requeue(shard, newest).await {
            Ok(()) => {
                requeued.insert(gid);
            }
            Err(e) => tracing::warn!(error = %e, gid, "requeueing a refused key's entry failed"),
        }
    }
    if !requeued.is_empty() {
        crate::metrics::shared_requeued(requeued.len());
        tracing::warn!(keys = ?requeued, "refused keys' newest entries moved to the end of their streams, so that the streams can be trimmed");
    }
    requeued
}

/// A stream entry's id and license.
type EntryKey = (String, Option<i64>);

/// What one pass over the shard streams found.
struct Pass {
    /// Entries were read.
    any: bool,
    /// A shard had at least as many entries as a read takes: read again without waiting.
    full: bool,
    /// Redis answered every read.
    reachable: bool,
    /// Entries read were not stored (the store failed) or not acknowledged: after new ones,
    /// a sweep reads them again at once; during a sweep, it ends there (`next_sweep`).
    again: bool,
    /// Some keys' entries could not be stored (the rest were): they stay pending, for the
    /// next sweep.
    stuck: bool,
    /// The shards whose entries were (or may have been) acknowledged: to be trimmed.
    acked: Vec<u64>,
    /// The last entry id read on each shard that had any.
    last_read: Vec<(u64, String)>,
}

/// Parses a channel message `<global id> <version>`.
pub fn parse_push(p: &redis::PushInfo) -> Option<(i64, u64)> {
    if p.kind != redis::PushKind::Message || text(p.data.first()?)? != CHANNEL {
        return None;
    }
    let payload = text(p.data.get(1)?)?;
    let (g, v) = payload.split_once(' ')?;
    Some((g.parse().ok()?, v.parse().ok()?))
}

/// Parses a control announcement: the time it was sent.
pub fn parse_control(p: &redis::PushInfo) -> Option<i64> {
    if p.kind != redis::PushKind::Message || text(p.data.first()?)? != CONTROL {
        return None;
    }
    text(p.data.get(1)?)?.parse().ok()
}

/// The control plane (the CLI) announces a committed change. Best effort: nodes that miss it
/// still read the change feed within `store.sync_interval_ms`.
pub fn announce_control_change(url: &str, ca_pem: Option<Vec<u8>>) -> Result<(), DistError> {
    let client = match ca_pem {
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        )?,
        None => redis::Client::open(url)?,
    };
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    redis::cmd("PUBLISH")
        .arg(CONTROL)
        .arg(crate::http::unix_now_ms())
        .query::<i64>(&mut conn)?;
    Ok(())
}

/// Shared handle.
pub type Shared = Arc<Dist>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the consumer reads next, after each kind of pass (`next_sweep`).
    #[test]
    fn sweeps_of_pending_entries_go_on_past_what_they_read_and_end_when_empty() {
        let pass = |any: bool, again: bool, stuck: bool, last: &[(u64, &str)]| Pass {
            any,
            full: false,
            reachable: true,
            again,
            stuck,
            acked: Vec::new(),
            last_read: last.iter().map(|(s, id)| (*s, id.to_string())).collect(),
        };
        let at =
            |v: &[(u64, &str)]| -> Sweep { v.iter().map(|(s, id)| (*s, id.to_string())).collect() };
        let cases: Vec<(Option<Sweep>, Pass, Option<Sweep>)> = vec![
            // New entries stored: new entries again.
            (None, pass(true, false, false, &[(0, "5-0")]), None),
            // New entries not stored or acknowledged: a sweep from the start.
            (
                None,
                pass(true, true, false, &[(0, "5-0")]),
                Some(Sweep::new()),
            ),
            // Nothing new: nothing changes.
            (None, pass(false, false, false, &[]), None),
            // A sweep goes on past what it read: stored, or refused (`stuck`).
            (
                Some(Sweep::new()),
                pass(true, false, false, &[(0, "5-0")]),
                Some(at(&[(0, "5-0")])),
            ),
            (
                Some(at(&[(0, "5-0"), (1, "2-0")])),
                pass(true, false, true, &[(0, "9-1")]),
                Some(at(&[(0, "9-1"), (1, "2-0")])),
            ),
            // A sweep whose pass failed (the store, or an acknowledgement) is over.
            (
                Some(at(&[(0, "5-0")])),
                pass(true, true, false, &[(0, "7-0")]),
                None,
            ),
            // A sweep that read nothing is over.
            (
                Some(at(&[(0, "9-1")])),
                pass(false, false, false, &[]),
                None,
            ),
        ];
        for (i, (sweep, p, want)) in cases.into_iter().enumerate() {
            assert_eq!(next_sweep(sweep, &p), want, "case {i}");
        }
    }

    #[test]
    fn snapshots_round_trip_and_install_only_when_newer() {
        let m = Machine {
            machine_code: "m\"1".into(),
            kind: MachineKind::Floating,
            ip: "203.0.113.1".into(),
            proxy_ip: "10.0.0.1".into(),
            time: 5,
            friendly_name: "pc".into(),
            floating_expires: 9,
        };
        let s = Snapshot {
            version: 3,
            expires: Some(77),
            machines: vec![m.clone()],
        };
        assert_eq!(Snapshot::decode(3, &s.encode()), Some(s.clone()));
        // The format in Redis, which nodes of other versions read and write too.
        let text = r#"{"e":77,"m":[["m\"1",1,"203.0.113.1","10.0.0.1",5,"pc",9]]}"#;
        assert_eq!(s.encode(), text);
        assert_eq!(Snapshot::decode(3, text), Some(s.clone()));
        let none = r#"{"e":null,"m":[]}"#;
        assert_eq!(Snapshot::decode(1, none).map(|s| s.expires), Some(None));
        // A later version may add elements to a machine (read past) or fields (ignored).
        let later = r#"{"e":77,"m":[["m\"1",1,"203.0.113.1","10.0.0.1",5,"pc",9,"x",[1]]],"z":1}"#;
        assert_eq!(Snapshot::decode(3, later), Some(s.clone()));
        let short = r#"{"e":77,"m":[["m",1,"203.0.113.1","10.0.0.1",5,"pc"]]}"#;
        assert_eq!(Snapshot::decode(3, short), None);
        let mut l = License {
            product_id: 1,
            id: 1,
            global_id: 1,
            key: "K".into(),
            created: 0,
            expires: 10,
            period: 0,
            features: Default::default(),
            notes: None,
            block: false,
            customer: None,
            trial_activation: true,
            max_no_of_machines: 5,
            version: 0,
            shared_version: 0,
            allowed_machines: String::new(),
            data_objects: vec![],
            machines: vec![],
        };
        l.shared_version = 3;
        assert!(!s.install(&mut l), "same version: fenced");
        let newer = Snapshot { version: 4, ..s };
        assert!(newer.install(&mut l));
        assert_eq!((l.machines.len(), l.expires, l.shared_version), (1, 77, 4));
    }
}
