//! The node's in-memory state: tenants' signers, products, licenses with their activations,
//! and token scopes keyed by token hash. The request path reads only this.
//!
//! Each license sits behind its own mutex: an activation decides and applies under it, so
//! parallel activations of one license can never exceed its limit, while different licenses
//! never contend. Control-plane changes arrive through `sync`, which reloads definitions from
//! the store but keeps the activations this node holds.

use crate::domain::{License, Scope};
use crate::signing::Signer;
use crate::store::writer::Durable;
use crate::store::{ChangeRow, KeyRow, ProductRow, Store, StoreError};
use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct LicenseEntry {
    pub tenant_id: i64,
    pub license: Mutex<License>,
    /// Distributed mode: one compare-and-set in flight per license on this node, so the
    /// node's own requests do not race each other in Redis (only other nodes do).
    pub writer: tokio::sync::Mutex<()>,
    /// The latest group of this license's changes sent to the activation log (see `fence`).
    unsynced: Mutex<Durable>,
}

impl LicenseEntry {
    pub fn new(tenant_id: i64, license: License) -> LicenseEntry {
        LicenseEntry {
            tenant_id,
            license: Mutex::new(license),
            writer: tokio::sync::Mutex::new(()),
            unsynced: Mutex::new(Durable::ready()),
        }
    }

    /// Call under the license lock with what this answer sent to the activation log (or
    /// `Durable::ready()`): returns what the answer must wait for before it is sent. A new group
    /// becomes the license's latest; an answer that sent nothing waits for the latest group if
    /// it is not synced yet, since the state it shows includes that change (one license's
    /// groups are sent in order under its lock and synced in order, so the latest covers the
    /// earlier ones).
    pub fn fence(&self, sent: Durable) -> Durable {
        let mut latest = self.unsynced.lock();
        if sent.is_group() {
            *latest = sent.clone();
            sent
        } else if latest.is_done() {
            *latest = Durable::ready();
            sent
        } else {
            latest.clone()
        }
    }
}

/// The maps hash with foldhash (seeded per process, as hashbrown's default): several lookups
/// sit on every request's path, and SipHash cost more than the rest of a lookup.
type Map<K, V> = DashMap<K, V, foldhash::fast::RandomState>;

/// A (product id, text) key of `licenses` and `trials`, so that a lookup borrows its text
/// instead of building a `String` per request. Hashes and compares as `(i64, String)` does.
trait Named {
    fn parts(&self) -> (i64, &str);
}

impl Named for (i64, String) {
    fn parts(&self) -> (i64, &str) {
        (self.0, &self.1)
    }
}

impl Named for (i64, &str) {
    fn parts(&self) -> (i64, &str) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn Named + 'a> for (i64, String) {
    fn borrow(&self) -> &(dyn Named + 'a) {
        self
    }
}

impl std::hash::Hash for dyn Named + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.parts().hash(h);
    }
}

impl PartialEq for dyn Named + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn Named + '_ {}

#[derive(Default)]
pub struct State {
    tenants: Map<i64, Arc<Signer>>,
    products: Map<i64, Arc<ProductRow>>,
    licenses: Map<(i64, String), Arc<LicenseEntry>>,
    /// The same entries by global key id (for reloads), sharing the `Arc`, not the key text.
    keys_by_global: Map<i64, Arc<LicenseEntry>>,
    tokens: Map<[u8; 32], Arc<Scope>>,
    token_hashes: Map<i64, [u8; 32]>,
    /// (product, machine code) → global id of the trial key made for it.
    trials: Map<(i64, String), i64>,
}

/// SHA-256 of a token: what the store keeps and what requests are matched by.
pub fn token_hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl State {
    /// Loads everything from the store. Returns the change-feed position read *before* loading,
    /// so changes made during the load are applied again (reloads are idempotent).
    pub fn load(store: &mut Store) -> Result<(State, i64), StoreError> {
        let seq = store.last_change()?;
        let s = State::default();
        for t in store.tenants()? {
            s.put_tenant(&t.private_key, t.id)?;
        }
        for p in store.products(None)? {
            s.products.insert(p.id, Arc::new(p));
        }
        for k in store.keys(None)? {
            s.put_key(k, false);
        }
        for t in store.tokens(None)? {
            s.put_token(t.id, &t.hash, t.scope);
        }
        Ok((s, seq))
    }

    fn put_tenant(&self, private_key: &[u8], id: i64) -> Result<(), StoreError> {
        let signer = Signer::from_pkcs8(private_key)
            .map_err(|e| StoreError::Invalid(format!("tenant {id}: {e}")))?;
        self.tenants.insert(id, Arc::new(signer));
        Ok(())
    }

    fn put_token(&self, id: i64, hash: &[u8], scope: Scope) {
        let Ok(h) = <[u8; 32]>::try_from(hash) else {
            tracing::warn!(token_id = id, "token hash has the wrong length; ignored");
            return;
        };
        if let Some(old) = self.token_hashes.insert(id, h) {
            self.tokens.remove(&old);
        }
        self.tokens.insert(h, Arc::new(scope));
    }

    /// Inserts or refreshes a key. With `keep_machines`, the activations already held in memory
    /// win over the store's copy, which may lag behind the writer.
    pub fn put_key(&self, row: KeyRow, keep_machines: bool) {
        let KeyRow {
            tenant_id,
            trial_machine_code,
            license,
        } = row;
        let k = (license.product_id, license.key.clone());
        if let Some(mc) = trial_machine_code {
            self.trials
                .insert((license.product_id, mc), license.global_id);
        }
        let gid = license.global_id;
        match self.licenses.entry(k) {
            dashmap::Entry::Occupied(e) => {
                let mut cur = e.get().license.lock();
                let machines = std::mem::take(&mut cur.machines);
                let expires = cur.expires;
                let trial = cur.trial_activation;
                let version = cur.version + 1;
                let shared = cur.shared_version;
                *cur = license;
                cur.version = version;
                if keep_machines {
                    cur.machines = machines;
                    cur.shared_version = shared;
                    // A trial activation on this node may have moved Expires ahead of the store.
                    if trial && cur.trial_activation {
                        cur.expires = cur.expires.max(expires);
                    }
                }
            }
            dashmap::Entry::Vacant(v) => {
                let entry = Arc::new(LicenseEntry::new(tenant_id, license));
                self.keys_by_global.insert(gid, entry.clone());
                v.insert(entry);
            }
        }
    }

    /// Applies one control-plane change by reloading the entity from the store.
    pub fn apply_change(&self, store: &mut Store, c: &ChangeRow) -> Result<(), StoreError> {
        match c.entity.as_str() {
            "tenant" => {
                let t = store.tenant(c.entity_id)?;
                self.put_tenant(&t.private_key, t.id)?;
            }
            "product" => match store.product(c.entity_id) {
                Ok(p) => {
                    self.products.insert(p.id, Arc::new(p));
                }
                // Deleted, with its keys: nothing of it is served any more.
                Err(StoreError::NotFound(_)) => {
                    let id = c.entity_id;
                    self.products.remove(&id);
                    self.licenses.retain(|(p, _), _| *p != id);
                    self.keys_by_global
                        .retain(|_, e| e.license.lock().product_id != id);
                    self.trials.retain(|(p, _), _| *p != id);
                }
                Err(e) => return Err(e),
            },
            "key" => self.put_key(store.key(c.entity_id)?, true),
            // A data-subject erasure: forget the machine (named by digest) on this key.
            "machine_erased" => {
                let Some(digest) = c.detail.as_deref() else {
                    return Ok(());
                };
                let erased = |mc: &str| crate::store::personal_digest(mc) == digest;
                if let Some(e) = self.license_by_global(c.entity_id) {
                    e.license
                        .lock()
                        .remove_machines_where(|m| erased(&m.machine_code));
                }
                self.trials.retain(|(_, mc), _| !erased(mc));
            }
            // An erased IP address: blank the IPs the store now holds blank for this key.
            "ip_erased" => {
                let Some(e) = self.license_by_global(c.entity_id) else {
                    return Ok(());
                };
                let stored = store.key(c.entity_id)?.license.machines;
                let blanked = |m: &crate::domain::Machine| {
                    stored.iter().any(|s| {
                        s.ip.is_empty()
                            && s.machine_code == m.machine_code
                            && s.is_floating() == m.is_floating()
                    })
                };
                e.license.lock().blank_ips_where(blanked);
            }
            "token" => match store.token(c.entity_id) {
                Ok(t) => self.put_token(t.id, &t.hash, t.scope),
                // Deleted (revoked): it stops authenticating here too.
                Err(StoreError::NotFound(_)) => {
                    if let Some((_, h)) = self.token_hashes.remove(&c.entity_id) {
                        self.tokens.remove(&h);
                    }
                }
                Err(e) => return Err(e),
            },
            other => tracing::warn!(entity = other, "unknown change-feed entity; ignored"),
        }
        Ok(())
    }

    /// Distributed mode: installs a license's snapshot from Redis if it is newer than what
    /// this node holds. Returns whether it was.
    pub fn install_shared(&self, gid: i64, snap: &crate::dist::Snapshot) -> bool {
        match self.license_by_global(gid) {
            Some(e) => snap.install(&mut e.license.lock()),
            None => false,
        }
    }

    /// Every license's global id (distributed mode's start-up sync).
    pub fn global_ids(&self) -> Vec<i64> {
        self.keys_by_global.iter().map(|e| *e.key()).collect()
    }

    pub fn scope(&self, token: &str) -> Option<Arc<Scope>> {
        self.tokens.get(&token_hash(token)).map(|s| s.clone())
    }

    pub fn product(&self, id: i64) -> Option<Arc<ProductRow>> {
        self.products.get(&id).map(|p| p.clone())
    }

    pub fn signer(&self, tenant_id: i64) -> Option<Arc<Signer>> {
        self.tenants.get(&tenant_id).map(|s| s.clone())
    }

    pub fn license(&self, product_id: i64, key: &str) -> Option<Arc<LicenseEntry>> {
        self.licenses
            .get(&(product_id, key) as &dyn Named)
            .map(|e| e.clone())
    }

    pub fn license_by_global(&self, global_id: i64) -> Option<Arc<LicenseEntry>> {
        self.keys_by_global.get(&global_id).map(|e| e.clone())
    }

    pub fn trial_key(&self, product_id: i64, machine_code: &str) -> Option<Arc<LicenseEntry>> {
        let gid = *self.trials.get(&(product_id, machine_code) as &dyn Named)?;
        self.license_by_global(gid)
    }

    pub fn license_count(&self) -> usize {
        self.licenses.len()
    }
}

/// Polls the store's change feed and applies it, until `stop` is set.
pub struct Sync {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sync {
    /// `poke` wakes the poller before its interval is up (distributed mode: a control-plane
    /// change was announced through Redis, with the time it was sent, in unix milliseconds).
    pub fn spawn(
        state: Arc<State>,
        mut store: Store,
        mut seq: i64,
        interval: Duration,
        poke: Option<crossbeam_channel::Receiver<i64>>,
    ) -> Sync {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("keygate-sync".into())
            .spawn(move || {
                let mut announced: Option<i64> = None;
                while !flag.load(Ordering::Relaxed) {
                    match store.changes_since(seq, 1000) {
                        Ok(changes) => {
                            let mut failed = 0;
                            for c in &changes {
                                if let Err(e) = state.apply_change(&mut store, c) {
                                    tracing::warn!(seq = c.seq, entity = %c.entity, error = %e, "change not applied");
                                    failed += 1;
                                }
                                seq = c.seq;
                            }
                            crate::metrics::sync_polled(changes.len() - failed, failed, state.license_count());
                            if let (Some(sent), false) = (announced.take(), changes.is_empty()) {
                                let ms = (crate::http::unix_now_ms() - sent).max(0);
                                crate::metrics::control_propagation(Duration::from_millis(ms as u64));
                            }
                            if changes.len() == 1000 {
                                continue;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the change feed failed");
                            crate::metrics::sync_poll_failed();
                            if let Err(e) = store.reconnect_if_broken() {
                                tracing::debug!(error = %e, "main store still unreachable");
                            }
                        }
                    }
                    match &poke {
                        Some(p) => {
                            if let Ok(sent) = p.recv_timeout(interval) {
                                while p.try_recv().is_ok() {}
                                announced = Some(sent);
                            }
                        }
                        None => std::thread::sleep(interval),
                    }
                }
            })
            .expect("spawning the sync thread");
        Sync {
            stop,
            thread: Some(thread),
        }
    }

    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup by `(i64, &str)` must hash and compare exactly as the stored `(i64, String)`:
    /// otherwise every license lookup would miss.
    #[test]
    fn a_borrowed_name_finds_its_owned_key() {
        let m: Map<(i64, String), u32> = Map::default();
        for (i, k) in ["ABCDE-FGHIJ", "", "é-ü", "KEY"].iter().enumerate() {
            m.insert((i as i64, (*k).to_owned()), i as u32);
        }
        for (i, k) in ["ABCDE-FGHIJ", "", "é-ü", "KEY"].iter().enumerate() {
            let found = m.get(&(i as i64, *k) as &dyn Named).map(|v| *v);
            assert_eq!(found, Some(i as u32), "{k:?}");
        }
        assert!(m.get(&(0i64, "KEY") as &dyn Named).is_none());
        assert!(m.get(&(3i64, "key") as &dyn Named).is_none());
        assert!(m.get(&(3i64, "KEY ") as &dyn Named).is_none());
    }

    /// Every cached license is one `Arc<LicenseEntry>` allocation: at most 320 bytes keeps it
    /// in mimalloc's 320-byte size class (the next is 384), so that a million licenses stay
    /// under 1 GiB (`cargo bench --bench memory`; an inline `Customer` once took it to 448).
    #[test]
    fn a_license_entry_fits_its_size_class() {
        let arc_inner = std::mem::size_of::<LicenseEntry>() + 2 * std::mem::size_of::<usize>();
        assert!(
            arc_inner <= 320,
            "Arc<LicenseEntry> takes {arc_inner} bytes"
        );
    }
}
