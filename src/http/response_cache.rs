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

use crate::signing::Signer;
use crate::wire::Metadata;
use moka::sync::Cache;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// Everything an unchanged answer depends on, except when it was signed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub license_global_id: i64,
    pub license_version: u64,
    /// The caller's own entry, for Activate: (machine code, floating).
    pub caller: Option<(String, bool)>,
    pub model_version: i64,
    pub mask: i64,
    pub metadata: Option<Metadata>,
    pub running_leases: usize,
}

/// A lookup: the shape, and the tenant key that signs it.
pub struct Probe {
    hash: u64,
    signer: Arc<Signer>,
    shape: Shape,
}

impl Probe {
    pub fn new(signer: Arc<Signer>, shape: Shape) -> Probe {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        shape.hash(&mut h);
        Arc::as_ptr(&signer).hash(&mut h);
        Probe {
            hash: h.finish(),
            signer,
            shape,
        }
    }

    fn matches(&self, e: &Entry) -> bool {
        Arc::ptr_eq(&self.signer, &e.probe.signer) && self.shape == e.probe.shape
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
                let bytes = e.body.len() + 256;
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
