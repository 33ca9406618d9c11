//! The main store: SQLite (embedded default) with an embedded schema migration.
//!
//! Control-plane commands write here directly and append to the `changes` feed; a running
//! node polls that feed (`sync`) and reloads what changed. The node's own writes (activations,
//! request-log rows) arrive in batches from `writer`, off the request path.

pub mod writer;

use crate::domain::{Customer, DataObject, Features, License, Machine, MachineKind, Scope};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

const MIGRATIONS: [(i64, &str); 5] = [
    (1, include_str!("store/migrations/0001_init.sql")),
    (2, include_str!("store/migrations/0002_audit.sql")),
    (3, include_str!("store/migrations/0003_change_detail.sql")),
    (4, include_str!("store/migrations/0004_token_lock.sql")),
    (
        5,
        include_str!("store/migrations/0005_tenant_retention.sql"),
    ),
];

pub struct Store {
    conn: Connection,
    /// Who the audit log names for this connection's administrative writes.
    actor: String,
}

/// A tenant row with its signing key.
#[derive(Clone, Debug)]
pub struct TenantRow {
    pub id: i64,
    pub name: String,
    pub private_key: Vec<u8>,
    pub public_key_xml: String,
    pub created: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductRow {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    pub trial_feature: Option<u8>,
    pub time_limited_feature: Option<u8>,
    pub created: i64,
}

#[derive(Clone, Debug)]
pub struct TokenRow {
    pub id: i64,
    pub hash: Vec<u8>,
    pub scope: Scope,
    pub description: String,
    pub created: i64,
}

/// A license with its owner and, when made by CreateTrialKey, the machine it was made for.
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub tenant_id: i64,
    pub trial_machine_code: Option<String>,
    pub license: License,
}

/// What `key create` needs besides generated identifiers.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub product_id: i64,
    pub key: String,
    pub created: i64,
    pub expires: i64,
    pub period: i64,
    pub features: Features,
    pub notes: Option<String>,
    pub block: bool,
    pub customer_id: Option<i64>,
    pub trial_activation: bool,
    pub max_no_of_machines: i64,
    pub allowed_machines: String,
    pub data_objects: Vec<(String, String, i64)>,
    pub trial_machine_code: Option<String>,
    /// Activations to record with the key (CreateTrialKey pre-activates its machine).
    pub machines: Vec<Machine>,
}

/// One administrative action from the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub time: i64,
    pub actor: String,
    pub action: String,
    pub entity: String,
    pub entity_id: i64,
}

/// One request-log row (`GGSD` state code); see ARCHITECTURE.md for the codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRow {
    pub tenant_id: Option<i64>,
    pub product_id: Option<i64>,
    pub key_id: Option<i64>,
    pub client_ip: String,
    pub proxy_ip: String,
    pub time: i64,
    pub machine_code: String,
    pub friendly_name: String,
    pub state: u16,
    pub floating_expires: i64,
}

/// A node's write to the main store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    MachineUpsert {
        key_global_id: i64,
        machine: Machine,
    },
    MachineRemove {
        key_global_id: i64,
        machine_code: String,
        floating: bool,
    },
    ExpiresSet {
        key_global_id: i64,
        expires: i64,
    },
    /// Deletes the key's floating leases that ended at or before `now`, as `License::apply`
    /// prunes them in memory, so expired leases do not pile up in the store.
    FloatingExpired {
        key_global_id: i64,
        now: i64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRow {
    pub seq: i64,
    pub entity: String,
    pub entity_id: i64,
    pub detail: Option<String>,
}

/// A key as (product id, key string).
pub type KeyRef = (i64, String);

/// What `erase_machine` removed or anonymised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Erased {
    pub activations: usize,
    pub log_rows: usize,
    pub trial_keys: usize,
}

/// The SHA-256 of a machine code, hex: how the change feed names an erased machine (machine
/// codes are SHA-256 values themselves, so this does not reveal a guessable value).
pub fn personal_digest(value: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn bool_i(b: bool) -> i64 {
    i64::from(b)
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Invalid(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Deleted content is overwritten, not left in free pages (erasure, assume breach).
        conn.pragma_update(None, "secure_delete", "ON")?;
        let mut store = Store {
            conn,
            actor: "keygate".into(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)",
        )?;
        let have: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?;
        for (v, sql) in MIGRATIONS {
            if v > have {
                tx.execute_batch(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations VALUES (?1, strftime('%s','now'))",
                    [v],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn note_change(conn: &Connection, entity: &str, id: i64) -> Result<()> {
        conn.execute(
            "INSERT INTO changes (entity, entity_id) VALUES (?1, ?2)",
            params![entity, id],
        )?;
        Ok(())
    }

    /// Names who the audit log records for this store's administrative writes.
    pub fn set_actor(&mut self, actor: &str) {
        self.actor = actor.to_owned();
    }

    /// Appends `action` on `entity` `id` to the audit log, in the caller's transaction.
    fn audit(conn: &Connection, actor: &str, action: &str, entity: &str, id: i64) -> Result<()> {
        conn.execute(
            "INSERT INTO audit_log (time, actor, action, entity, entity_id)
             VALUES (strftime('%s','now'), ?1, ?2, ?3, ?4)",
            params![actor, action, entity, id],
        )?;
        Ok(())
    }

    /// The newest audit entries first.
    pub fn audit_rows(&self, limit: i64) -> Result<Vec<AuditRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT time, actor, action, entity, entity_id FROM audit_log ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st
            .query_map([limit], |r| {
                Ok(AuditRow {
                    time: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    entity: r.get(3)?,
                    entity_id: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    // === control plane ===

    pub fn create_tenant(
        &mut self,
        name: &str,
        private_key: &[u8],
        xml: &str,
        now: i64,
    ) -> Result<i64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO tenants (name, private_key, public_key_xml, created) VALUES (?1, ?2, ?3, ?4)",
            params![name, private_key, xml, now],
        )?;
        let id = tx.last_insert_rowid();
        Self::note_change(&tx, "tenant", id)?;
        Self::audit(&tx, &self.actor, "tenant.create", "tenant", id)?;
        tx.commit()?;
        Ok(id)
    }

    pub fn create_product(
        &mut self,
        tenant_id: i64,
        name: &str,
        trial_feature: Option<u8>,
        time_limited_feature: Option<u8>,
        now: i64,
    ) -> Result<i64> {
        self.tenant(tenant_id)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO products (tenant_id, name, trial_feature, time_limited_feature, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![tenant_id, name, trial_feature, time_limited_feature, now],
        )?;
        let id = tx.last_insert_rowid();
        Self::note_change(&tx, "product", id)?;
        Self::audit(&tx, &self.actor, "product.create", "product", id)?;
        tx.commit()?;
        Ok(id)
    }

    pub fn create_customer(
        &mut self,
        tenant_id: i64,
        name: &str,
        email: &str,
        company: &str,
        now: i64,
    ) -> Result<i64> {
        self.tenant(tenant_id)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO customers (tenant_id, name, email, company_name, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![tenant_id, name, email, company, now],
        )?;
        let id = tx.last_insert_rowid();
        Self::audit(&tx, &self.actor, "customer.create", "customer", id)?;
        tx.commit()?;
        Ok(id)
    }

    /// Inserts a key with the next per-product `ID`; returns `(id, global_id)`.
    pub fn create_key(&mut self, k: &NewKey) -> Result<(i64, i64)> {
        let product = self.product(k.product_id)?;
        if let Some(c) = k.customer_id {
            let owner: Option<i64> = self
                .conn
                .query_row("SELECT tenant_id FROM customers WHERE id = ?1", [c], |r| {
                    r.get(0)
                })
                .optional()?;
            if owner != Some(product.tenant_id) {
                return Err(StoreError::NotFound(format!("customer {c} not found")));
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id: i64 = tx.query_row(
            "SELECT COALESCE(MAX(id), 0) + 1 FROM license_keys WHERE product_id = ?1",
            [k.product_id],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO license_keys (product_id, id, key, created, expires, period, features, notes, block, customer_id,
                 trial_activation, max_no_of_machines, allowed_machines, trial_machine_code)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                k.product_id, id, k.key, k.created, k.expires, k.period, k.features.0, k.notes, bool_i(k.block),
                k.customer_id, bool_i(k.trial_activation), k.max_no_of_machines, k.allowed_machines, k.trial_machine_code
            ],
        )?;
        let gid = tx.last_insert_rowid();
        for (name, s, i) in &k.data_objects {
            tx.execute(
                "INSERT INTO data_objects (key_global_id, name, string_value, int_value) VALUES (?1, ?2, ?3, ?4)",
                params![gid, name, s, i],
            )?;
        }
        for m in &k.machines {
            upsert_machine(&tx, gid, m)?;
        }
        Self::note_change(&tx, "key", gid)?;
        Self::audit(&tx, &self.actor, "key.create", "key", gid)?;
        tx.commit()?;
        Ok((id, gid))
    }

    /// Sets `Block`; returns the key's global id.
    pub fn set_block(&mut self, product_id: i64, key: &str, block: bool) -> Result<i64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let gid: Option<i64> = tx
            .query_row(
                "SELECT global_id FROM license_keys WHERE product_id = ?1 AND key = ?2",
                params![product_id, key],
                |r| r.get(0),
            )
            .optional()?;
        let gid = gid.ok_or_else(|| {
            StoreError::NotFound(format!("key {key} not found in product {product_id}"))
        })?;
        tx.execute(
            "UPDATE license_keys SET block = ?1 WHERE global_id = ?2",
            params![bool_i(block), gid],
        )?;
        Self::note_change(&tx, "key", gid)?;
        let action = if block { "key.block" } else { "key.unblock" };
        Self::audit(&tx, &self.actor, action, "key", gid)?;
        tx.commit()?;
        Ok(gid)
    }

    pub fn create_token(
        &mut self,
        hash: &[u8],
        scope: &Scope,
        description: &str,
        now: i64,
    ) -> Result<i64> {
        self.tenant(scope.tenant_id)?;
        if let Some(p) = scope.product_lock {
            if self.product(p)?.tenant_id != scope.tenant_id {
                return Err(StoreError::NotFound(format!("product {p} not found")));
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO tokens (tenant_id, hash, methods, product_lock, key_lock, feature_lock, description, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![scope.tenant_id, hash, scope.methods, scope.product_lock, scope.key_lock, scope.feature_lock, description, now],
        )?;
        let id = tx.last_insert_rowid();
        Self::note_change(&tx, "token", id)?;
        Self::audit(&tx, &self.actor, "token.create", "token", id)?;
        tx.commit()?;
        Ok(id)
    }

    // === reads ===

    pub fn tenant(&self, id: i64) -> Result<TenantRow> {
        self.conn
            .query_row(
                "SELECT id, name, private_key, public_key_xml, created FROM tenants WHERE id = ?1",
                [id],
                tenant_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {id} not found")))
    }

    pub fn tenants(&self) -> Result<Vec<TenantRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, name, private_key, public_key_xml, created FROM tenants ORDER BY id",
        )?;
        let rows = st
            .query_map([], tenant_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn product(&self, id: i64) -> Result<ProductRow> {
        self.conn
            .query_row(
                &format!("{PRODUCT_SELECT} WHERE id = ?1"),
                [id],
                product_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("product {id} not found")))
    }

    /// Products of one tenant, or all when `tenant_id` is `None`.
    pub fn products(&self, tenant_id: Option<i64>) -> Result<Vec<ProductRow>> {
        let mut st = self.conn.prepare(&format!(
            "{PRODUCT_SELECT} WHERE ?1 IS NULL OR tenant_id = ?1 ORDER BY id"
        ))?;
        let rows = st
            .query_map([tenant_id], product_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Locks or unlocks a token against deletion.
    pub fn set_token_lock(&mut self, id: i64, locked: bool) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE tokens SET locked = ?1 WHERE id = ?2",
            params![bool_i(locked), id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("token {id} not found")));
        }
        let action = if locked { "token.lock" } else { "token.unlock" };
        Self::audit(&tx, &self.actor, action, "token", id)?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes (revokes) a token unless it is locked; running nodes drop it on their next sync.
    pub fn delete_token(&mut self, id: i64) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let locked: Option<i64> = tx
            .query_row("SELECT locked FROM tokens WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        match locked {
            None => return Err(StoreError::NotFound(format!("token {id} not found"))),
            Some(1) => {
                return Err(StoreError::Invalid(format!(
                    "token {id} is locked; unlock it before deleting it"
                )))
            }
            Some(_) => {}
        }
        tx.execute("DELETE FROM tokens WHERE id = ?1", [id])?;
        Self::note_change(&tx, "token", id)?;
        Self::audit(&tx, &self.actor, "token.delete", "token", id)?;
        tx.commit()?;
        Ok(())
    }

    pub fn token(&self, id: i64) -> Result<TokenRow> {
        self.conn
            .query_row(&format!("{TOKEN_SELECT} WHERE id = ?1"), [id], token_row)
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("token {id} not found")))
    }

    pub fn tokens(&self, tenant_id: Option<i64>) -> Result<Vec<TokenRow>> {
        let mut st = self.conn.prepare(&format!(
            "{TOKEN_SELECT} WHERE ?1 IS NULL OR tenant_id = ?1 ORDER BY id"
        ))?;
        let rows = st
            .query_map([tenant_id], token_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// One key with customer, data objects and activations.
    pub fn key(&self, global_id: i64) -> Result<KeyRow> {
        let mut rows = self.keys_where("k.global_id = ?1", global_id)?;
        rows.pop()
            .ok_or_else(|| StoreError::NotFound(format!("key {global_id} not found")))
    }

    pub fn key_by_string(&self, product_id: i64, key: &str) -> Result<KeyRow> {
        let gid: Option<i64> = self
            .conn
            .query_row(
                "SELECT global_id FROM license_keys WHERE product_id = ?1 AND key = ?2",
                params![product_id, key],
                |r| r.get(0),
            )
            .optional()?;
        self.key(gid.ok_or_else(|| {
            StoreError::NotFound(format!("key {key} not found in product {product_id}"))
        })?)
    }

    /// Keys of one product, or every key when `product_id` is `None`.
    pub fn keys(&self, product_id: Option<i64>) -> Result<Vec<KeyRow>> {
        match product_id {
            Some(p) => self.keys_where("k.product_id = ?1", p),
            None => self.keys_where("?1 = ?1", 0),
        }
    }

    fn keys_where(&self, cond: &str, arg: i64) -> Result<Vec<KeyRow>> {
        let sql = format!(
            "SELECT k.global_id, k.product_id, k.id, k.key, k.created, k.expires, k.period, k.features, k.notes, k.block,
                    k.trial_activation, k.max_no_of_machines, k.allowed_machines, k.trial_machine_code, p.tenant_id,
                    c.id, c.name, c.email, c.company_name, c.created
             FROM license_keys k JOIN products p ON p.id = k.product_id
             LEFT JOIN customers c ON c.id = k.customer_id
             WHERE {cond} ORDER BY k.global_id"
        );
        let mut st = self.conn.prepare_cached(&sql)?;
        let mut rows: Vec<KeyRow> = st
            .query_map([arg], key_row)?
            .collect::<rusqlite::Result<_>>()?;
        drop(st);
        let mut dos = self.conn.prepare_cached(
            "SELECT id, name, string_value, int_value FROM data_objects WHERE key_global_id = ?1 ORDER BY id",
        )?;
        let mut ms = self.conn.prepare_cached(
            "SELECT machine_code, kind, ip, proxy_ip, time, friendly_name, floating_expires
             FROM activations WHERE key_global_id = ?1 ORDER BY seq",
        )?;
        // Node addresses repeat across millions of machines: keep one copy of each.
        let mut node_addresses: std::collections::HashMap<String, std::sync::Arc<str>> =
            Default::default();
        for r in &mut rows {
            let gid = r.license.global_id;
            r.license.data_objects = dos
                .query_map([gid], |x| {
                    Ok(DataObject {
                        id: x.get(0)?,
                        name: x.get(1)?,
                        string_value: x.get(2)?,
                        int_value: x.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            r.license.machines = ms
                .query_map([gid], |x| {
                    Ok(Machine {
                        machine_code: x.get(0)?,
                        kind: MachineKind::from_i64(x.get(1)?),
                        ip: x.get(2)?,
                        proxy_ip: {
                            let a: String = x.get(3)?;
                            node_addresses
                                .entry(a)
                                .or_insert_with_key(|a| a.as_str().into())
                                .clone()
                        },
                        time: x.get(4)?,
                        friendly_name: x.get(5)?,
                        floating_expires: x.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            // Collected without a size hint, the list would keep room for more machines.
            r.license.machines.shrink_to_fit();
        }
        Ok(rows)
    }

    /// The newest change-feed position.
    pub fn last_change(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
                r.get(0)
            })?)
    }

    pub fn changes_since(&self, seq: i64, limit: i64) -> Result<Vec<ChangeRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, entity, entity_id, detail FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = st
            .query_map([seq, limit], |r| {
                Ok(ChangeRow {
                    seq: r.get(0)?,
                    entity: r.get(1)?,
                    entity_id: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    // === data-subject requests ===

    /// Blanks the personal fields (machine code, friendly name, client network) of request-log
    /// rows older than `cutoff`; returns how many rows changed.
    ///
    /// Tenants with their own `log_retention_days` use it (0 keeps their rows); every other row
    /// follows `default_days` (`None` keeps them).
    pub fn apply_retention(&mut self, default_days: Option<u64>, now: i64) -> Result<usize> {
        const BLANK: &str =
            "UPDATE request_log SET machine_code = '', friendly_name = '', client_ip = ''
             WHERE (machine_code != '' OR friendly_name != '' OR client_ip != '') AND time < ?1";
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut changed = 0;
        let own: Vec<(i64, i64)> = {
            let mut st = tx.prepare(
                "SELECT id, log_retention_days FROM tenants WHERE log_retention_days > 0",
            )?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        for (tenant, days) in own {
            changed += tx.execute(
                &format!("{BLANK} AND tenant_id = ?2"),
                params![now - days * 86_400, tenant],
            )?;
        }
        if let Some(days) = default_days {
            changed += tx.execute(
                &format!(
                    "{BLANK} AND (tenant_id IS NULL OR tenant_id NOT IN
                        (SELECT id FROM tenants WHERE log_retention_days IS NOT NULL))"
                ),
                [now - days as i64 * 86_400],
            )?;
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Sets a tenant's own request-log retention (`None`: follow the node's default).
    pub fn set_tenant_retention(&mut self, tenant: i64, days: Option<u64>) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE tenants SET log_retention_days = ?1 WHERE id = ?2",
            params![days.map(|d| d as i64), tenant],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("tenant {tenant} not found")));
        }
        Self::audit(&tx, &self.actor, "tenant.retention", "tenant", tenant)?;
        tx.commit()?;
        Ok(())
    }

    /// Every activation of `machine_code` (any key): (product id, key, machine).
    pub fn activations_of_machine(
        &self,
        machine_code: &str,
    ) -> Result<Vec<(i64, String, Machine)>> {
        self.activations_matching("machine_code", machine_code)
    }

    /// Activations recorded from `ip`: (product id, key, machine).
    pub fn activations_from_ip(&self, ip: &str) -> Result<Vec<(i64, String, Machine)>> {
        self.activations_matching("ip", ip)
    }

    /// Request-log rows naming `machine_code`, oldest first.
    pub fn log_rows_of_machine(&self, machine_code: &str) -> Result<Vec<LogRow>> {
        self.log_rows_matching("machine_code", machine_code)
    }

    /// Request-log rows whose stored client address is exactly `ip`, oldest first.
    pub fn log_rows_from_ip(&self, ip: &str) -> Result<Vec<LogRow>> {
        self.log_rows_matching("client_ip", ip)
    }

    /// Activations whose `column` (a fixed column name, never input) equals `value`.
    fn activations_matching(
        &self,
        column: &'static str,
        value: &str,
    ) -> Result<Vec<(i64, String, Machine)>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT k.product_id, k.key, a.machine_code, a.kind, a.ip, a.proxy_ip, a.time, a.friendly_name, a.floating_expires
             FROM activations a JOIN license_keys k ON k.global_id = a.key_global_id
             WHERE a.{column} = ?1 ORDER BY k.global_id, a.seq"
        ))?;
        let rows = st
            .query_map([value], |x| {
                Ok((
                    x.get(0)?,
                    x.get(1)?,
                    Machine {
                        machine_code: x.get(2)?,
                        kind: MachineKind::from_i64(x.get(3)?),
                        ip: x.get(4)?,
                        proxy_ip: x.get::<_, String>(5)?.into(),
                        time: x.get(6)?,
                        friendly_name: x.get(7)?,
                        floating_expires: x.get(8)?,
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Request-log rows whose `column` (a fixed column name, never input) equals `value`.
    fn log_rows_matching(&self, column: &'static str, value: &str) -> Result<Vec<LogRow>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT tenant_id, product_id, key_id, client_ip, proxy_ip, time, machine_code, friendly_name, state, floating_expires
             FROM request_log WHERE {column} = ?1 ORDER BY id"
        ))?;
        let rows = st
            .query_map([value], |r| log_row_from(r, 0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// A customer (with their tenant id) and their keys as (product id, key).
    pub fn customer_data(&self, id: i64) -> Result<(i64, Customer, Vec<KeyRef>)> {
        let (tenant_id, c) = self
            .conn
            .query_row(
                "SELECT tenant_id, name, email, company_name, created FROM customers WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get(0)?,
                        Customer {
                            id,
                            name: r.get(1)?,
                            email: r.get(2)?,
                            company_name: r.get(3)?,
                            created: r.get(4)?,
                        },
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("customer {id} not found")))?;
        let mut st = self.conn.prepare_cached(
            "SELECT product_id, key FROM license_keys WHERE customer_id = ?1 ORDER BY global_id",
        )?;
        let keys = st
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok((tenant_id, c, keys))
    }

    /// Blanks a customer's name, email and company (the keys stay, still linked to the now
    /// anonymous customer), tells running nodes to reload those keys, and audits it.
    pub fn erase_customer(&mut self, id: i64) -> Result<usize> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE customers SET name = NULL, email = NULL, company_name = NULL WHERE id = ?1",
            [id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("customer {id} not found")));
        }
        let gids: Vec<i64> = {
            let mut st = tx.prepare("SELECT global_id FROM license_keys WHERE customer_id = ?1")?;
            let rows = st
                .query_map([id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        for gid in &gids {
            Self::note_change(&tx, "key", *gid)?;
        }
        Self::audit(&tx, &self.actor, "privacy.erase", "customer", id)?;
        tx.commit()?;
        Ok(gids.len())
    }

    /// Keys whose trial was made for `machine_code`: (product id, key).
    pub fn trial_keys_of_machine(&self, machine_code: &str) -> Result<Vec<KeyRef>> {
        let mut st = self.conn.prepare_cached(
            "SELECT product_id, key FROM license_keys WHERE trial_machine_code = ?1 ORDER BY global_id",
        )?;
        let rows = st
            .query_map([machine_code], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Blanks `ip` in activations and in the request log (the activations stay), tells
    /// running nodes by digest, and audits it. Returns (activations, log rows) changed.
    pub fn erase_ip(&mut self, ip: &str) -> Result<(usize, usize)> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let gids: Vec<i64> = {
            let mut st =
                tx.prepare("SELECT DISTINCT key_global_id FROM activations WHERE ip = ?1")?;
            let rows = st
                .query_map([ip], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        let activations = tx.execute("UPDATE activations SET ip = '' WHERE ip = ?1", [ip])?;
        let log_rows = tx.execute(
            "UPDATE request_log SET client_ip = '' WHERE client_ip = ?1",
            [ip],
        )?;
        // No digest here: an IPv4 address's hash is reversed by trying all 2^32. Nodes compare
        // their activations with the store's blanked copies instead.
        for gid in &gids {
            Self::note_change(&tx, "ip_erased", *gid)?;
        }
        Self::audit(
            &tx,
            &self.actor,
            "privacy.erase",
            "ip",
            (activations + log_rows) as i64,
        )?;
        tx.commit()?;
        Ok((activations, log_rows))
    }

    /// Deletes every activation of `machine_code`, blanks it (with its friendly name and client
    /// network) in the request log and forgets it as a trial machine, in one transaction that
    /// also tells running nodes (by digest) and writes the audit log (without the code).
    pub fn erase_machine(&mut self, machine_code: &str) -> Result<Erased> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let gids: Vec<i64> = {
            let mut st = tx.prepare(
                "SELECT DISTINCT key_global_id FROM activations WHERE machine_code = ?1
                 UNION SELECT global_id FROM license_keys WHERE trial_machine_code = ?1",
            )?;
            let rows = st
                .query_map([machine_code], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            rows
        };
        let erased = Erased {
            activations: tx.execute("DELETE FROM activations WHERE machine_code = ?1", [machine_code])?,
            log_rows: tx.execute(
                "UPDATE request_log SET machine_code = '', friendly_name = '', client_ip = '' WHERE machine_code = ?1",
                [machine_code],
            )?,
            trial_keys: tx.execute(
                "UPDATE license_keys SET trial_machine_code = NULL WHERE trial_machine_code = ?1",
                [machine_code],
            )?,
        };
        let digest = personal_digest(machine_code);
        for gid in &gids {
            tx.execute(
                "INSERT INTO changes (entity, entity_id, detail) VALUES ('machine_erased', ?1, ?2)",
                params![gid, digest],
            )?;
        }
        let total = erased.activations + erased.log_rows + erased.trial_keys;
        Self::audit(&tx, &self.actor, "privacy.erase", "machine", total as i64)?;
        tx.commit()?;
        Ok(erased)
    }

    /// Request-log rows of a product, newest first.
    pub fn log_rows(&self, product_id: Option<i64>, limit: i64) -> Result<Vec<(i64, LogRow)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, tenant_id, product_id, key_id, client_ip, proxy_ip, time, machine_code, friendly_name, state, floating_expires
             FROM request_log WHERE ?1 IS NULL OR product_id = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st
            .query_map(params![product_id, limit], |r| {
                Ok((r.get(0)?, log_row_from(r, 1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    // === node writes ===

    /// Writes one batch of node events and log rows in a single transaction.
    pub fn write_batch(&mut self, events: &[StoreEvent], logs: &[LogRow]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for e in events {
            match e {
                StoreEvent::MachineUpsert {
                    key_global_id,
                    machine,
                } => upsert_machine(&tx, *key_global_id, machine)?,
                StoreEvent::MachineRemove {
                    key_global_id,
                    machine_code,
                    floating,
                } => {
                    tx.prepare_cached(
                        "DELETE FROM activations WHERE key_global_id = ?1 AND floating = ?2 AND machine_code = ?3",
                    )?
                    .execute(params![key_global_id, bool_i(*floating), machine_code])?;
                }
                StoreEvent::FloatingExpired { key_global_id, now } => {
                    tx.prepare_cached(
                        "DELETE FROM activations WHERE key_global_id = ?1 AND floating = 1 AND floating_expires <= ?2",
                    )?
                    .execute(params![key_global_id, now])?;
                }
                StoreEvent::ExpiresSet {
                    key_global_id,
                    expires,
                } => {
                    tx.prepare_cached("UPDATE license_keys SET expires = ?1 WHERE global_id = ?2")?
                        .execute(params![expires, key_global_id])?;
                }
            }
        }
        // Rows go in 32 at a time: one statement step per 32 rows instead of per row.
        let mut chunks = logs.chunks_exact(LOG_ROWS_PER_INSERT);
        if logs.len() >= LOG_ROWS_PER_INSERT {
            let mut st = tx.prepare_cached(&log_insert_sql(LOG_ROWS_PER_INSERT))?;
            for chunk in chunks.by_ref() {
                bind_log_rows(&mut st, chunk)?;
                st.raw_execute()?;
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut st = tx.prepare_cached(&log_insert_sql(1))?;
            for row in rest {
                bind_log_rows(&mut st, std::slice::from_ref(row))?;
                st.raw_execute()?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// A `LogRow` from the request-log columns in table order, starting at column `first`.
fn log_row_from(r: &Row<'_>, first: usize) -> rusqlite::Result<LogRow> {
    Ok(LogRow {
        tenant_id: r.get(first)?,
        product_id: r.get(first + 1)?,
        key_id: r.get(first + 2)?,
        client_ip: r.get(first + 3)?,
        proxy_ip: r.get(first + 4)?,
        time: r.get(first + 5)?,
        machine_code: r.get(first + 6)?,
        friendly_name: r.get(first + 7)?,
        state: r.get(first + 8)?,
        floating_expires: r.get(first + 9)?,
    })
}

const LOG_ROWS_PER_INSERT: usize = 32;
const LOG_COLUMNS: usize = 10;

/// `INSERT INTO request_log ... VALUES (?, ...), (?, ...)` for `rows` rows.
fn log_insert_sql(rows: usize) -> String {
    let one = format!("({})", ["?"; LOG_COLUMNS].join(", "));
    format!(
        "INSERT INTO request_log (tenant_id, product_id, key_id, client_ip, proxy_ip, time, machine_code,
             friendly_name, state, floating_expires) VALUES {}",
        vec![one; rows].join(", ")
    )
}

fn bind_log_rows(st: &mut rusqlite::CachedStatement<'_>, rows: &[LogRow]) -> rusqlite::Result<()> {
    for (i, l) in rows.iter().enumerate() {
        let base = i * LOG_COLUMNS;
        st.raw_bind_parameter(base + 1, l.tenant_id)?;
        st.raw_bind_parameter(base + 2, l.product_id)?;
        st.raw_bind_parameter(base + 3, l.key_id)?;
        st.raw_bind_parameter(base + 4, &l.client_ip)?;
        st.raw_bind_parameter(base + 5, &l.proxy_ip)?;
        st.raw_bind_parameter(base + 6, l.time)?;
        st.raw_bind_parameter(base + 7, &l.machine_code)?;
        st.raw_bind_parameter(base + 8, &l.friendly_name)?;
        st.raw_bind_parameter(base + 9, l.state)?;
        st.raw_bind_parameter(base + 10, l.floating_expires)?;
    }
    Ok(())
}

fn upsert_machine(conn: &Connection, gid: i64, m: &Machine) -> Result<()> {
    // An existing row keeps its `seq` (list position); the domain passes the first-activation
    // `time` back unchanged on a floating renewal.
    conn.prepare_cached(
        "INSERT INTO activations (key_global_id, floating, machine_code, kind, ip, proxy_ip, time, friendly_name, floating_expires, seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, (SELECT COALESCE(MAX(seq), 0) + 1 FROM activations WHERE key_global_id = ?1))
         ON CONFLICT (key_global_id, floating, machine_code) DO UPDATE SET
             kind = excluded.kind, ip = excluded.ip, proxy_ip = excluded.proxy_ip, time = excluded.time,
             friendly_name = excluded.friendly_name, floating_expires = excluded.floating_expires",
    )?
    .execute(params![
        gid,
        bool_i(m.is_floating()),
        m.machine_code,
        m.kind.as_i64(),
        m.ip,
        m.proxy_ip,
        m.time,
        m.friendly_name,
        m.floating_expires
    ])?;
    Ok(())
}

const PRODUCT_SELECT: &str =
    "SELECT id, tenant_id, name, trial_feature, time_limited_feature, created FROM products";
const TOKEN_SELECT: &str =
    "SELECT id, tenant_id, hash, methods, product_lock, key_lock, feature_lock, description, created FROM tokens";

fn tenant_row(r: &Row<'_>) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        id: r.get(0)?,
        name: r.get(1)?,
        private_key: r.get(2)?,
        public_key_xml: r.get(3)?,
        created: r.get(4)?,
    })
}

fn product_row(r: &Row<'_>) -> rusqlite::Result<ProductRow> {
    Ok(ProductRow {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        name: r.get(2)?,
        trial_feature: r.get(3)?,
        time_limited_feature: r.get(4)?,
        created: r.get(5)?,
    })
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        id: r.get(0)?,
        hash: r.get(2)?,
        scope: Scope {
            token_id: r.get(0)?,
            tenant_id: r.get(1)?,
            methods: r.get(3)?,
            product_lock: r.get(4)?,
            key_lock: r.get(5)?,
            feature_lock: r.get(6)?,
        },
        description: r.get(7)?,
        created: r.get(8)?,
    })
}

fn key_row(r: &Row<'_>) -> rusqlite::Result<KeyRow> {
    let customer = match r.get::<_, Option<i64>>(15)? {
        Some(id) => Some(Customer {
            id,
            name: r.get(16)?,
            email: r.get(17)?,
            company_name: r.get(18)?,
            created: r.get(19)?,
        }),
        None => None,
    };
    Ok(KeyRow {
        tenant_id: r.get(14)?,
        trial_machine_code: r.get(13)?,
        license: License {
            global_id: r.get(0)?,
            product_id: r.get(1)?,
            id: r.get(2)?,
            key: r.get(3)?,
            created: r.get(4)?,
            expires: r.get(5)?,
            period: r.get(6)?,
            features: Features(r.get(7)?),
            notes: r.get(8)?,
            block: r.get::<_, i64>(9)? != 0,
            trial_activation: r.get::<_, i64>(10)? != 0,
            max_no_of_machines: r.get(11)?,
            version: 0,
            allowed_machines: r.get(12)?,
            customer,
            data_objects: Vec::new(),
            machines: Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches of every size class (full 32-row statements plus single rows) round-trip
    /// field for field and in order.
    #[test]
    fn log_rows_round_trip_in_order() {
        let dir = std::env::temp_dir().join(format!("keygate-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir.join("k.db")).unwrap();
        let row = |i: i64| LogRow {
            tenant_id: Some(1),
            product_id: (i % 3 != 0).then_some(7),
            key_id: Some(i),
            client_ip: format!("203.0.113.{}", i % 250),
            proxy_ip: "10.0.0.1".into(),
            time: 1_800_000_000 + i,
            machine_code: format!("m-{i}"),
            friendly_name: if i % 2 == 0 {
                String::new()
            } else {
                format!("pc {i}")
            },
            state: 2010 + (i % 3) as u16,
            floating_expires: i * 10,
        };
        let mut written = Vec::new();
        for n in [0, 1, 31, 32, 33, 70] {
            let batch: Vec<LogRow> = (0..n).map(|i| row(written.len() as i64 + i)).collect();
            store.write_batch(&[], &batch).unwrap();
            written.extend(batch);
        }
        let mut read: Vec<LogRow> = store
            .log_rows(None, 1000)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        read.reverse();
        assert_eq!(read.len(), written.len());
        assert!(read == written, "rows differ");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_audit_log_is_append_only() {
        let dir = std::env::temp_dir().join(format!("keygate-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir.join("k.db")).unwrap();
        store.set_actor("test");
        let t = store.create_tenant("t", b"k", "<RSAKeyValue/>", 1).unwrap();
        let rows = store.audit_rows(10).unwrap();
        let r = &rows[0];
        assert_eq!(
            (
                r.actor.as_str(),
                r.action.as_str(),
                r.entity.as_str(),
                r.entity_id
            ),
            ("test", "tenant.create", "tenant", t)
        );
        for sql in ["UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log"] {
            let e = store.conn.execute(sql, []).unwrap_err();
            assert!(e.to_string().contains("append-only"), "{sql}: {e}");
        }
        assert_eq!(store.audit_rows(10).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn retention_blanks_only_old_rows_by_tenant_rule_and_only_once() {
        let dir = std::env::temp_dir().join(format!("keygate-retention-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir.join("k.db")).unwrap();
        let keeps = store.create_tenant("keeps", b"k", "<x/>", 1).unwrap();
        let week = store.create_tenant("week", b"k", "<x/>", 1).unwrap();
        let follows = store.create_tenant("follows", b"k", "<x/>", 1).unwrap();
        store.set_tenant_retention(keeps, Some(0)).unwrap();
        store.set_tenant_retention(week, Some(7)).unwrap();
        const DAY: i64 = 86_400;
        let now = 1000 * DAY;
        let row = |tenant: Option<i64>, age_days: i64| LogRow {
            tenant_id: tenant,
            product_id: Some(2),
            key_id: Some(3),
            client_ip: "203.0.113.0".into(),
            proxy_ip: "10.0.0.1".into(),
            time: now - age_days * DAY,
            machine_code: format!("m{age_days}"),
            friendly_name: "pc".into(),
            state: 2010,
            floating_expires: 0,
        };
        let rows: Vec<LogRow> = [keeps, week, follows]
            .into_iter()
            .map(Some)
            .chain([None])
            .flat_map(|t| [row(t, 10), row(t, 5), row(t, 1)])
            .collect();
        store.write_batch(&[], &rows).unwrap();
        // Default 3 days: `follows` and unknown-tenant rows older than 3 days; `week` older
        // than 7; `keeps` never.
        assert_eq!(store.apply_retention(Some(3), now).unwrap(), 5);
        assert_eq!(
            store.apply_retention(Some(3), now).unwrap(),
            0,
            "already blank"
        );
        let mut left: Vec<(Option<i64>, String)> = store
            .log_rows(None, 100)
            .unwrap()
            .into_iter()
            .map(|(_, r)| (r.tenant_id, r.machine_code))
            .collect();
        left.reverse();
        let want: Vec<(Option<i64>, String)> = [
            (Some(keeps), "m10"),
            (Some(keeps), "m5"),
            (Some(keeps), "m1"),
            (Some(week), ""),
            (Some(week), "m5"),
            (Some(week), "m1"),
            (Some(follows), ""),
            (Some(follows), ""),
            (Some(follows), "m1"),
            (None, ""),
            (None, ""),
            (None, "m1"),
        ]
        .into_iter()
        .map(|(t, m)| (t, m.to_owned()))
        .collect();
        assert_eq!(left, want);
        // No default: only tenants with their own rule age out.
        assert_eq!(
            store.apply_retention(None, now + 10 * DAY).unwrap(),
            2,
            "week's m5 and m1"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
