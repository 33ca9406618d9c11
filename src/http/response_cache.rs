//! Signed responses for repeated requests. An answer that changes nothing (a known machine
//! re-activating, a GetKey) depends only on the license's content, the caller, the response
//! options, the tenant's key and the time, and, apart from its `SignDate`, on the time only
//! through the metadata numbers and through which floating leases are still running. So a
//! `Shape` (license id and version, caller, options, mask, the metadata numbers and the count
//! of running leases) identifies it: the signed body is kept for up to `cache.response_ttl_ms`
//! and any change to the license (its version moves) makes a new one. A retry storm is answered
//! without encoding or signing; the `SignDate` it carries is at most the TTL old.
//!
//! Why the lease count suffices: without a new version, leases only run out, never start, so
//! the running ones at two moments are nested sets and their count tells them apart.
//!
//! The cache is on the re-activation path of every request, so it is a plain sharded hash map
//! (a lookup is a hash, a short lock and a reference-count increment; a general-purpose cache
//! recorded every read for its eviction policy, which cost more than the rest of the lookup).
//! Entries leave by their TTL, checked on read, or oldest first when a shard is over its share
//! of `cache.response_max_bytes`.

use crate::signing::Signer;
use crate::wire::Metadata;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Everything an unchanged answer depends on, except when it was signed. Borrowed, so a
/// lookup that hits allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape<'a> {
    pub license_global_id: i64,
    pub license_version: u64,
    /// The caller's own entry, for Activate: (machine code, floating).
    pub caller: Option<(&'a str, bool)>,
    pub model_version: i64,
    pub mask: i64,
    pub metadata: Option<Metadata>,
    pub running_leases: usize,
}

/// `Shape`, owned by a cache entry.
struct OwnedShape {
    license_global_id: i64,
    license_version: u64,
    caller: Option<(Box<str>, bool)>,
    model_version: i64,
    mask: i64,
    metadata: Option<Metadata>,
    running_leases: usize,
}

impl OwnedShape {
    fn of(s: &Shape<'_>) -> OwnedShape {
        OwnedShape {
            license_global_id: s.license_global_id,
            license_version: s.license_version,
            caller: s.caller.map(|(m, f)| (m.into(), f)),
            model_version: s.model_version,
            mask: s.mask,
            metadata: s.metadata,
            running_leases: s.running_leases,
        }
    }

    fn borrow(&self) -> Shape<'_> {
        Shape {
            license_global_id: self.license_global_id,
            license_version: self.license_version,
            caller: self.caller.as_ref().map(|(m, f)| (&**m, *f)),
            model_version: self.model_version,
            mask: self.mask,
            metadata: self.metadata,
            running_leases: self.running_leases,
        }
    }
}

/// The probe hash, seeded once per process (foldhash: several times cheaper than SipHash).
static PROBE_HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// A lookup: the shape, and the tenant key that signs it.
pub struct Probe<'a> {
    hash: u64,
    signer: Arc<Signer>,
    shape: Shape<'a>,
}

impl<'a> Probe<'a> {
    pub fn new(signer: Arc<Signer>, shape: Shape<'a>) -> Probe<'a> {
        // Seeded per process: callers choose machine codes, so the hash must not be one they
        // can predict.
        let hash = PROBE_HASHER.hash_one((shape, Arc::as_ptr(&signer)));
        Probe {
            hash,
            signer,
            shape,
        }
    }

    fn matches(&self, e: &Entry) -> bool {
        Arc::ptr_eq(&self.signer, &e.signer) && self.shape == e.shape.borrow()
    }

    /// What the entry keeps of this probe once the answer is signed.
    pub fn to_key(&self) -> ProbeKey {
        ProbeKey {
            hash: self.hash,
            signer: self.signer.clone(),
            shape: OwnedShape::of(&self.shape),
        }
    }
}

/// An owned `Probe`, carried past the license lock to the insert after signing.
pub struct ProbeKey {
    hash: u64,
    signer: Arc<Signer>,
    shape: OwnedShape,
}

struct Entry {
    signer: Arc<Signer>,
    shape: OwnedShape,
    body: Bytes,
    expires: Instant,
    /// Insertion number, to tell this entry from a replaced one in the shard's `order`.
    seq: u64,
}

impl Entry {
    fn weight(&self) -> usize {
        self.body.len() + 256
    }
}

/// The keys are already hashes.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default)]
struct Shard {
    map: HashMap<u64, Entry, BuildHasherDefault<Identity>>,
    /// Insertion order (hash, seq); entries replaced since are skipped when met.
    order: VecDeque<(u64, u64)>,
    bytes: usize,
    seq: u64,
}

impl Shard {
    /// Drops the oldest entries until the shard is within `budget`; returns how many of them
    /// had not expired yet (evictions proper).
    fn shrink_to(&mut self, budget: usize, now: Instant) -> u64 {
        let mut evicted = 0;
        while self.bytes > budget {
            let Some((hash, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&hash).is_some_and(|e| e.seq == seq) {
                let e = self.map.remove(&hash).expect("present");
                self.bytes -= e.weight();
                evicted += u64::from(e.expires > now);
            }
        }
        // Replaced entries leave stale order records; drop them before they outnumber the map.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(h, s)| map.get(h).is_some_and(|e| e.seq == *s));
        }
        evicted
    }
}

const SHARDS: usize = 16;

pub struct ResponseCache {
    shards: Box<[Mutex<Shard>]>,
    ttl: Duration,
    /// Each shard's share of `cache.response_max_bytes`.
    shard_budget: usize,
    hits: metrics::Counter,
    misses: metrics::Counter,
    evictions: metrics::Counter,
}

impl ResponseCache {
    /// `max_bytes` 0 or a zero TTL turns the cache off.
    pub fn new(ttl: Duration, max_bytes: u64) -> ResponseCache {
        let on = max_bytes > 0 && !ttl.is_zero();
        let (hits, misses, evictions) = crate::metrics::response_cache_handles();
        ResponseCache {
            shards: (0..if on { SHARDS } else { 0 })
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            ttl,
            shard_budget: usize::try_from(max_bytes).unwrap_or(usize::MAX) / SHARDS,
            hits,
            misses,
            evictions,
        }
    }

    pub fn off() -> ResponseCache {
        ResponseCache::new(Duration::ZERO, 0)
    }

    pub fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[(hash >> 60) as usize % self.shards.len()]
    }

    /// The signed body for `probe`, if one was made within the TTL.
    pub fn get(&self, probe: &Probe<'_>) -> Option<Bytes> {
        if !self.enabled() {
            return None;
        }
        let hit = {
            let shard = self.shard(probe.hash).lock();
            shard
                .map
                .get(&probe.hash)
                .filter(|e| e.expires > Instant::now() && probe.matches(e))
                .map(|e| e.body.clone())
        };
        match hit {
            Some(_) => self.hits.increment(1),
            None => self.misses.increment(1),
        }
        hit
    }

    pub fn insert(&self, key: ProbeKey, body: Bytes) {
        if !self.enabled() {
            return;
        }
        // Each entry lives between half the TTL and the TTL (by its hash). Entries made
        // together (a fleet starting at once) then do not all expire together, and their
        // re-signing is spread out instead of arriving as one burst that would stall the
        // signing threads.
        let fraction = (key.hash >> 11) as f64 / (1u64 << 53) as f64;
        let now = Instant::now();
        let mut shard = self.shard(key.hash).lock();
        shard.seq += 1;
        let entry = Entry {
            signer: key.signer,
            shape: key.shape,
            body,
            expires: now + self.ttl.mul_f64(0.5 + 0.5 * fraction),
            seq: shard.seq,
        };
        let seq = entry.seq;
        shard.bytes += entry.weight();
        if let Some(old) = shard.map.insert(key.hash, entry) {
            shard.bytes -= old.weight();
        }
        shard.order.push_back((key.hash, seq));
        let evicted = shard.shrink_to(self.shard_budget, now);
        drop(shard);
        if evicted > 0 {
            self.evictions.increment(evicted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Arc<Signer> {
        Arc::new(Signer::from_pkcs8(&crate::signing::generate_pkcs8().unwrap()).unwrap())
    }

    fn shape(gid: i64, caller: &str) -> Shape<'_> {
        Shape {
            license_global_id: gid,
            license_version: 1,
            caller: Some((caller, false)),
            model_version: 3,
            mask: 0,
            metadata: None,
            running_leases: 0,
        }
    }

    #[test]
    fn hit_needs_the_same_shape_and_signer() {
        let c = ResponseCache::new(Duration::from_secs(60), 1 << 20);
        let (s1, s2) = (signer(), signer());
        let p = Probe::new(s1.clone(), shape(1, "m"));
        assert_eq!(c.get(&p), None);
        c.insert(p.to_key(), Bytes::from_static(b"body"));
        assert_eq!(
            c.get(&Probe::new(s1.clone(), shape(1, "m"))).as_deref(),
            Some(&b"body"[..])
        );
        assert_eq!(c.get(&Probe::new(s1.clone(), shape(1, "n"))), None);
        assert_eq!(c.get(&Probe::new(s1, shape(2, "m"))), None);
        assert_eq!(c.get(&Probe::new(s2, shape(1, "m"))), None);
    }

    #[test]
    fn entries_expire_within_the_ttl() {
        // 300 ms, so that a test thread preempted between insert and get still hits.
        let c = ResponseCache::new(Duration::from_millis(300), 1 << 20);
        let s = signer();
        let p = Probe::new(s.clone(), shape(1, "m"));
        c.insert(p.to_key(), Bytes::from_static(b"body"));
        assert!(c.get(&p).is_some());
        std::thread::sleep(Duration::from_millis(310));
        assert_eq!(c.get(&p), None);
    }

    #[test]
    fn the_byte_bound_holds_and_drops_the_oldest_first() {
        // 16 shards of 4 KiB; each entry weighs 1,024 + 256 bytes.
        let c = ResponseCache::new(Duration::from_secs(60), 16 * 4096);
        let s = signer();
        let codes: Vec<String> = (0..2000).map(|i| format!("m{i}")).collect();
        for code in &codes {
            let p = Probe::new(s.clone(), shape(1, code));
            c.insert(p.to_key(), Bytes::from(vec![0u8; 1024]));
        }
        let held: usize = c.shards.iter().map(|s| s.lock().map.len()).sum();
        assert!(held <= 16 * 3, "{held} entries held");
        for sh in c.shards.iter() {
            let sh = sh.lock();
            assert!(sh.bytes <= 4096);
            assert!(sh.order.len() <= 2 * sh.map.len() + 64);
        }
        // The newest is still there, the first is gone.
        assert!(c.get(&Probe::new(s.clone(), shape(1, "m1999"))).is_some());
        assert!(c.get(&Probe::new(s, shape(1, "m0"))).is_none());
    }

    #[test]
    fn replacing_an_entry_keeps_the_byte_count_and_the_order_short() {
        let c = ResponseCache::new(Duration::from_secs(60), 1 << 20);
        let s = signer();
        let p = Probe::new(s.clone(), shape(1, "m"));
        for i in 0..1000u32 {
            c.insert(p.to_key(), Bytes::from(i.to_string()));
        }
        assert_eq!(c.get(&p).as_deref(), Some(&b"999"[..]));
        let sh = c.shard(p.hash).lock();
        assert_eq!(sh.map.len(), 1);
        assert_eq!(sh.bytes, 3 + 256);
        assert!(sh.order.len() <= 2 + 64);
    }

    #[test]
    fn off_holds_nothing() {
        let c = ResponseCache::off();
        let p = Probe::new(signer(), shape(1, "m"));
        c.insert(p.to_key(), Bytes::from_static(b"x"));
        assert!(!c.enabled());
        assert_eq!(c.get(&p), None);
    }
}
