//! Signed responses for repeated requests. An answer that changes nothing (a known machine
//! re-activating, a GetKey) is a function of the license content, the response options and the
//! tenant's key, apart from its `SignDate`. So its canonical form (the license JSON encoded with
//! `SignDate` 0, plus the metadata numbers) keys the signed body for `cache.response_ttl_ms`: a
//! retry storm is answered without signing again, and the `SignDate` it carries is at most that
//! old. Any change to the license changes the canonical bytes, so a stale answer is never served.
//! Hits compare the whole canonical form, not just its hash.

use crate::signing::Signer;
use crate::wire::Metadata;
use moka::sync::Cache;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// What identifies a response apart from when it was signed.
pub struct Probe {
    hash: u64,
    signer: Arc<Signer>,
    canonical: Vec<u8>,
    metadata: Option<Metadata>,
    metadata_hidden: bool,
}

impl Probe {
    pub fn new(
        signer: Arc<Signer>,
        canonical: Vec<u8>,
        metadata: Option<Metadata>,
        metadata_hidden: bool,
    ) -> Probe {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        canonical.hash(&mut h);
        metadata.hash(&mut h);
        metadata_hidden.hash(&mut h);
        Probe {
            hash: h.finish(),
            signer,
            canonical,
            metadata,
            metadata_hidden,
        }
    }

    fn matches(&self, e: &Entry) -> bool {
        Arc::ptr_eq(&self.signer, &e.probe.signer)
            && self.canonical == e.probe.canonical
            && self.metadata == e.probe.metadata
            && self.metadata_hidden == e.probe.metadata_hidden
    }
}

struct Entry {
    probe: Probe,
    body: Vec<u8>,
}

/// Each entry lives between half the TTL and the TTL (by its hash). Entries made together (a
/// fleet starting at once) then do not all expire together, and their re-signing is spread
/// out instead of arriving as one burst that would stall the signing threads.
struct Jittered {
    ttl: Duration,
}

impl moka::Expiry<u64, Arc<Entry>> for Jittered {
    fn expire_after_create(
        &self,
        key: &u64,
        _value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let fraction = (key >> 11) as f64 / (1u64 << 53) as f64;
        Some(self.ttl.mul_f64(0.5 + 0.5 * fraction))
    }
}

pub struct ResponseCache {
    cache: Option<Cache<u64, Arc<Entry>>>,
}

impl ResponseCache {
    /// `max_bytes` 0 turns the cache off.
    pub fn new(ttl: Duration, max_bytes: u64) -> ResponseCache {
        if max_bytes == 0 || ttl.is_zero() {
            return ResponseCache::off();
        }
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, e: &Arc<Entry>| {
                let bytes = e.body.len() + e.probe.canonical.len() + 128;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(Jittered { ttl })
            .eviction_listener(|_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    crate::metrics::response_cache_evicted();
                }
            })
            .build();
        ResponseCache { cache: Some(cache) }
    }

    pub fn off() -> ResponseCache {
        ResponseCache { cache: None }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The signed body for `probe`, if one was made within the TTL.
    pub fn get(&self, probe: &Probe) -> Option<Vec<u8>> {
        let cache = self.cache.as_ref()?;
        let hit = cache
            .get(&probe.hash)
            .filter(|e| probe.matches(e))
            .map(|e| e.body.clone());
        crate::metrics::response_cache(hit.is_some());
        hit
    }

    pub fn insert(&self, probe: Probe, body: Vec<u8>) {
        if let Some(cache) = &self.cache {
            cache.insert(probe.hash, Arc::new(Entry { probe, body }));
        }
    }
}
