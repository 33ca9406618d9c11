//! The main store: SQLite (embedded default) or PostgreSQL (production), one set of SQL for
//! both through `db`, with embedded schema migrations applied at open.
//!
//! Control-plane commands write here directly and append to the `changes` feed; a running
//! node polls that feed (`sync`) and reloads what changed. The node's own writes (activations,
//! request-log rows) arrive in batches from `writer`, off the request path.

pub mod cipher;
pub mod db;
pub mod journal;
pub mod wal;
pub mod writer;

use crate::domain::{
    Customer, DataObject, Features, License, LogFilter, Machine, MachineKind, Scope,
};
use db::{vals, Db, Engine, Row};
use std::path::Path;
use std::sync::Arc;

/// Sealing and opening of personal fields with the node's keyring; a no-op without one.
#[derive(Clone, Default)]
struct Seal(Option<Arc<cipher::Keyring>>);

impl Seal {
    fn text(&self, v: &str) -> String {
        match &self.0 {
            Some(r) => r.seal_text(v),
            None => v.to_owned(),
        }
    }

    fn opt(&self, v: Option<&str>) -> Option<String> {
        v.map(|v| self.text(v))
    }

    fn open(&self, v: String) -> Result<String> {
        Ok(cipher::open_text(self.0.as_deref(), v)?)
    }

    fn open_opt(&self, v: Option<String>) -> Result<Option<String>> {
        v.map(|v| self.open(v)).transpose()
    }

    fn bytes(&self, v: &[u8]) -> Vec<u8> {
        match &self.0 {
            Some(r) => r.seal_bytes(v),
            None => v.to_vec(),
        }
    }

    fn open_bytes(&self, v: Vec<u8>) -> Result<Vec<u8>> {
        Ok(cipher::open_bytes(self.0.as_deref(), v)?)
    }

    /// Every stored form of `v` (see `Keyring::lookup_forms`): what equality lookups match.
    fn forms(&self, v: &str) -> Vec<db::Value> {
        match &self.0 {
            Some(r) => r.lookup_forms(v).into_iter().map(db::Value::from).collect(),
            None => vec![v.into()],
        }
    }

    fn log_row(&self, r: &LogRow) -> LogRow {
        LogRow {
            client_ip: self.text(&r.client_ip).into(),
            machine_code: self.text(&r.machine_code),
            friendly_name: self.text(&r.friendly_name),
            ..r.clone()
        }
    }

    fn open_log_row(&self, r: LogRow) -> Result<LogRow> {
        Ok(LogRow {
            client_ip: self.open(r.client_ip.to_string())?.into(),
            machine_code: self.open(r.machine_code)?,
            friendly_name: self.open(r.friendly_name)?,
            ..r
        })
    }
}

/// `column IN (?first, ?first+1, ...)` for `n` values.
fn any_of(column: &str, n: usize, first: usize) -> String {
    let list: Vec<String> = (first..first + n).map(|i| format!("?{i}")).collect();
    format!("{column} IN ({})", list.join(", "))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgresql: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("{0}")]
    Cipher(#[from] cipher::CipherError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

const SQLITE_MIGRATIONS: [(i64, &str); 11] = [
    (1, include_str!("store/migrations/0001_init.sql")),
    (2, include_str!("store/migrations/0002_audit.sql")),
    (3, include_str!("store/migrations/0003_change_detail.sql")),
    (4, include_str!("store/migrations/0004_token_lock.sql")),
    (
        5,
        include_str!("store/migrations/0005_tenant_retention.sql"),
    ),
    (
        6,
        include_str!("store/migrations/0006_ingested_batches.sql"),
    ),
    (7, include_str!("store/migrations/0007_node_progress.sql")),
    (8, include_str!("store/migrations/0008_product_lock.sql")),
    (9, include_str!("store/migrations/0009_shared_version.sql")),
    (
        10,
        include_str!("store/migrations/0010_request_log_spans.sql"),
    ),
    (11, include_str!("store/migrations/0011_activation_seq.sql")),
];

/// PostgreSQL started at SQLite's version 6, as one script.
const POSTGRES_MIGRATIONS: [(i64, &str); 6] = [
    (1, include_str!("store/migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("store/migrations/postgres/0002_node_progress.sql"),
    ),
    (
        3,
        include_str!("store/migrations/postgres/0003_product_lock.sql"),
    ),
    (
        4,
        include_str!("store/migrations/postgres/0004_shared_version.sql"),
    ),
    (
        5,
        include_str!("store/migrations/postgres/0005_request_log_spans.sql"),
    ),
    (
        6,
        include_str!("store/migrations/postgres/0006_activation_seq.sql"),
    ),
];

/// Advisory lock keys (PostgreSQL): migrations, the change feed's commit order, and (plus the
/// product id) the per-product key numbers.
const LOCK_MIGRATE: i64 = 0x6b67_0001;
const LOCK_CHANGES: i64 = 0x6b67_0002;
const LOCK_KEY_NUMBERS: i64 = 0x6b67_0000_0000;

pub struct Store {
    db: Db,
    /// Who the audit log names for this connection's administrative writes.
    actor: String,
    /// Where to connect again after a PostgreSQL connection broke.
    url: Option<String>,
    /// Encryption at rest of personal fields, when a key file is configured.
    seal: Seal,
}

/// Where the main store lives: a SQLite file or a PostgreSQL URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Location {
    /// For logs: the path, or the PostgreSQL target without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(url) => match url.parse::<postgres::Config>() {
                Ok(c) => format!(
                    "postgresql user={} hosts={:?} ports={:?} dbname={}",
                    c.get_user().unwrap_or(""),
                    c.get_hosts(),
                    c.get_ports(),
                    c.get_dbname().unwrap_or("")
                ),
                Err(_) => "postgresql (unparsable URL)".into(),
            },
        }
    }
}

/// A batch of node writes with its identity, so it is written at most once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchId {
    pub node: i64,
    pub batch: i64,
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
    pub client_ip: Arc<str>,
    pub proxy_ip: Arc<str>,
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

/// What GetWebAPILog asks for; the tenant always comes from the token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogQuery {
    pub tenant_id: i64,
    pub product_id: Option<i64>,
    /// The per-product key `ID`.
    pub key_id: Option<i64>,
    pub filter: LogFilter,
}

/// One request-log row with its id and its key's string (when the key still exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub id: i64,
    pub row: LogRow,
    pub key: Option<String>,
}

/// What can carry an object lock.
#[derive(Clone, Copy)]
enum Lockable {
    Product,
    Token,
}

impl Lockable {
    /// (table, entity name in messages and the audit log)
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Lockable::Product => ("products", "product"),
            Lockable::Token => ("tokens", "token"),
        }
    }
}

/// A key as (product id, key string).
pub type KeyRef = (i64, String);

/// What `erase_machine` removed or anonymised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Erased {
    pub activations: usize,
    pub log_rows: usize,
    pub trial_keys: usize,
    /// Global ids of the keys whose activations (or trial) named the machine.
    pub keys: Vec<i64>,
}

/// The SHA-256 of a machine code, hex: how the change feed names an erased machine (machine
/// codes are SHA-256 values themselves, so this does not reveal a guessable value).
pub fn personal_digest(value: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> i64 {
    crate::http::unix_now()
}

impl Store {
    /// Opens (creating if needed) a SQLite database and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Invalid(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = rusqlite::Connection::open(path)?;
        conn.set_prepared_statement_cache_capacity(db::SQLITE_STATEMENTS);
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Plans stay as prepared. Without this SQLite compiles a statement again on every
        // execution with new parameter values wherever a value might change the plan (the
        // activation upsert's `MAX(seq)` was re-parsed for every new machine: 44 µs of a
        // ~1.1 ms new-machine request on one core, loadtest/README.md).
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        // Deleted content is overwritten, not left in free pages (erasure, assume breach).
        conn.pragma_update(None, "secure_delete", "ON")?;
        Self::with_db(Db::Sqlite(conn))
    }

    /// Connects to PostgreSQL and applies pending migrations. Blocking: call it off the async
    /// workers (the client runs its own small runtime).
    pub fn connect_postgres(url: &str) -> Result<Store> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("bad PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        config.application_name("keygate");
        let client = config.connect(postgres::NoTls)?;
        let mut store = Self::with_db(Db::Postgres(Box::new(db::Pg::new(client))))?;
        store.url = Some(url.to_owned());
        Ok(store)
    }

    /// After a failure: if the PostgreSQL connection is gone (server restarted, network cut),
    /// connects again, keeping the actor. Costs a round trip; a no-op on SQLite.
    pub fn reconnect_if_broken(&mut self) -> Result<()> {
        let Some(url) = self.url.clone() else {
            return Ok(());
        };
        if self.is_usable() {
            return Ok(());
        }
        let fresh = Self::connect_postgres(&url)?;
        self.db = fresh.db;
        // `actor` and `seal` stay: they are this store's, not the connection's.
        tracing::info!("reconnected to the main store");
        Ok(())
    }

    pub fn connect(location: &Location) -> Result<Store> {
        match location {
            Location::Sqlite(p) => Self::open(p),
            Location::Postgres(url) => Self::connect_postgres(url),
        }
    }

    fn with_db(db: Db) -> Result<Store> {
        let mut store = Store {
            db,
            actor: "keygate".into(),
            url: None,
            seal: Seal::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn engine(&self) -> Engine {
        self.db.engine()
    }

    /// True while the connection works (PostgreSQL connections can break; SQLite's cannot).
    pub fn is_usable(&mut self) -> bool {
        match &mut self.db {
            Db::Sqlite(_) => true,
            Db::Postgres(p) => {
                let c = p.client();
                !c.is_closed() && c.is_valid(std::time::Duration::from_secs(2)).is_ok()
            }
        }
    }

    /// The schema version after migrating.
    pub fn schema_version(&mut self) -> Result<i64> {
        self.db
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )?
            .i64(0)
    }

    fn migrate(&mut self) -> Result<()> {
        let engine = self.engine();
        let migrations: &[(i64, &str)] = match engine {
            Engine::Sqlite => &SQLITE_MIGRATIONS,
            Engine::Postgres => &POSTGRES_MIGRATIONS,
        };
        // Up to date: nothing to write, so a role without DDL rights (the PostgreSQL edge
        // role of deploy/postgres/roles.sql) can connect.
        let latest = migrations.last().map_or(0, |m| m.0);
        if let Ok(have) = self.schema_version() {
            if have >= latest {
                return Ok(());
            }
        }
        self.db.transaction(|db| {
            if engine == Engine::Postgres {
                // Nodes starting together migrate one at a time.
                db.query("SELECT pg_advisory_xact_lock(?1)", vals![LOCK_MIGRATE])?;
            }
            db.batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied BIGINT NOT NULL)",
            )?;
            let have = db
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )?
                .i64(0)?;
            for &(v, sql) in migrations {
                if v > have {
                    db.batch(sql)?;
                    db.exec(
                        "INSERT INTO schema_migrations (version, applied) VALUES (?1, ?2)",
                        vals![v, unix_now()],
                    )?;
                }
            }
            Ok(())
        })
    }

    /// Appends to the change feed, in the caller's transaction.
    fn note_change(db: &mut Db, entity: &str, id: i64, detail: Option<&str>) -> Result<()> {
        if db.engine() == Engine::Postgres {
            // Held to commit: feed entries commit in sequence order, so a node reading
            // `seq > last` never passes over one that commits later.
            db.query("SELECT pg_advisory_xact_lock(?1)", vals![LOCK_CHANGES])?;
        }
        db.exec(
            "INSERT INTO changes (entity, entity_id, detail) VALUES (?1, ?2, ?3)",
            vals![entity, id, detail],
        )?;
        Ok(())
    }

    /// Encrypts personal fields (and signing keys) with `ring` from now on; reads open both
    /// encrypted and plaintext values.
    pub fn set_keyring(&mut self, ring: Option<Arc<cipher::Keyring>>) {
        self.seal = Seal(ring);
    }

    /// Names who the audit log records for this store's administrative writes.
    pub fn set_actor(&mut self, actor: &str) {
        self.actor = actor.to_owned();
    }

    /// Appends `action` on `entity` `id` to the audit log, in the caller's transaction.
    fn audit(db: &mut Db, actor: &str, action: &str, entity: &str, id: i64) -> Result<()> {
        db.exec(
            "INSERT INTO audit_log (time, actor, action, entity, entity_id) VALUES (?1, ?2, ?3, ?4, ?5)",
            vals![unix_now(), actor, action, entity, id],
        )?;
        Ok(())
    }

    /// The newest audit entries first.
    pub fn audit_rows(&mut self, limit: i64) -> Result<Vec<AuditRow>> {
        self.db
            .query(
                "SELECT time, actor, action, entity, entity_id FROM audit_log ORDER BY id DESC LIMIT ?1",
                vals![limit],
            )?
            .into_iter()
            .map(|r| {
                Ok(AuditRow {
                    time: r.i64(0)?,
                    actor: r.text(1)?,
                    action: r.text(2)?,
                    entity: r.text(3)?,
                    entity_id: r.i64(4)?,
                })
            })
            .collect()
    }

    /// Inserts one row with `sql` (ending in `RETURNING <id>`), notes the change when
    /// `change` names the entity, audits `action`, all in one transaction; returns the id.
    fn insert_audited(
        &mut self,
        sql: &str,
        args: &[db::Value],
        change: Option<&str>,
        action: &str,
        entity: &str,
    ) -> Result<i64> {
        let actor = &self.actor;
        self.db.transaction(|db| {
            let id = db.query_one(sql, args)?.i64(0)?;
            if let Some(c) = change {
                Self::note_change(db, c, id, None)?;
            }
            Self::audit(db, actor, action, entity, id)?;
            Ok(id)
        })
    }

    // === control plane ===

    pub fn create_tenant(
        &mut self,
        name: &str,
        private_key: &[u8],
        xml: &str,
        now: i64,
    ) -> Result<i64> {
        self.insert_audited(
            "INSERT INTO tenants (name, private_key, public_key_xml, created) VALUES (?1, ?2, ?3, ?4) RETURNING id",
            vals![name, &self.seal.bytes(private_key)[..], xml, now],
            Some("tenant"),
            "tenant.create",
            "tenant",
        )
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
        self.insert_audited(
            "INSERT INTO products (tenant_id, name, trial_feature, time_limited_feature, created) VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
            vals![tenant_id, name, trial_feature, time_limited_feature, now],
            Some("product"),
            "product.create",
            "product",
        )
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
        let seal = self.seal.clone();
        self.insert_audited(
            "INSERT INTO customers (tenant_id, name, email, company_name, created) VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
            vals![tenant_id, seal.text(name), seal.text(email), seal.text(company), now],
            None,
            "customer.create",
            "customer",
        )
    }

    /// Inserts a key with the next per-product `ID`; returns `(id, global_id)`.
    pub fn create_key(&mut self, k: &NewKey) -> Result<(i64, i64)> {
        let product = self.product(k.product_id)?;
        if let Some(c) = k.customer_id {
            let owner = self
                .db
                .query_opt("SELECT tenant_id FROM customers WHERE id = ?1", vals![c])?
                .map(|r| r.i64(0))
                .transpose()?;
            if owner != Some(product.tenant_id) {
                return Err(StoreError::NotFound(format!("customer {c} not found")));
            }
        }
        let (actor, seal) = (&self.actor, &self.seal);
        self.db.transaction(|db| {
            if db.engine() == Engine::Postgres {
                // Per-product key numbers: one creator per product at a time. An advisory lock,
                // not a row lock, so the edge role needs no UPDATE right on products.
                db.query(
                    "SELECT pg_advisory_xact_lock(?1)",
                    vals![LOCK_KEY_NUMBERS + k.product_id],
                )?;
            }
            let id = db
                .query_one(
                    "SELECT COALESCE(MAX(id), 0) + 1 FROM license_keys WHERE product_id = ?1",
                    vals![k.product_id],
                )?
                .i64(0)?;
            let gid = db
                .query_one(
                    "INSERT INTO license_keys (product_id, id, key, created, expires, period, features, notes, block, customer_id,
                         trial_activation, max_no_of_machines, allowed_machines, trial_machine_code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) RETURNING global_id",
                    vals![
                        k.product_id, id, &k.key, k.created, k.expires, k.period, k.features.0, k.notes.as_deref(), k.block,
                        k.customer_id, k.trial_activation, k.max_no_of_machines, &k.allowed_machines, seal.opt(k.trial_machine_code.as_deref())
                    ],
                )?
                .i64(0)?;
            for (name, s, i) in &k.data_objects {
                db.exec(
                    "INSERT INTO data_objects (key_global_id, name, string_value, int_value) VALUES (?1, ?2, ?3, ?4)",
                    vals![gid, name, s, *i],
                )?;
            }
            for m in &k.machines {
                upsert_machine(db, seal, gid, m)?;
            }
            Self::note_change(db, "key", gid, None)?;
            Self::audit(db, actor, "key.create", "key", gid)?;
            Ok((id, gid))
        })
    }

    /// A key's global id from its product and key string.
    fn global_id_of(db: &mut Db, product_id: i64, key: &str) -> Result<i64> {
        db.query_opt(
            "SELECT global_id FROM license_keys WHERE product_id = ?1 AND key = ?2",
            vals![product_id, key],
        )?
        .ok_or_else(|| {
            StoreError::NotFound(format!("key {key} not found in product {product_id}"))
        })?
        .i64(0)
    }

    /// Sets `Block`; returns the key's global id.
    pub fn set_block(&mut self, product_id: i64, key: &str, block: bool) -> Result<i64> {
        let actor = &self.actor;
        self.db.transaction(|db| {
            let gid = Self::global_id_of(db, product_id, key)?;
            db.exec(
                "UPDATE license_keys SET block = ?1 WHERE global_id = ?2",
                vals![block, gid],
            )?;
            Self::note_change(db, "key", gid, None)?;
            let action = if block { "key.block" } else { "key.unblock" };
            Self::audit(db, actor, action, "key", gid)?;
            Ok(gid)
        })
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
        self.insert_audited(
            "INSERT INTO tokens (tenant_id, hash, methods, product_lock, key_lock, feature_lock, description, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
            vals![
                scope.tenant_id, hash, scope.methods, scope.product_lock, scope.key_lock,
                scope.feature_lock, description, now
            ],
            Some("token"),
            "token.create",
            "token",
        )
    }

    // === reads ===

    pub fn tenant(&mut self, id: i64) -> Result<TenantRow> {
        self.db
            .query_opt(&format!("{TENANT_SELECT} WHERE id = ?1"), vals![id])?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {id} not found")))
            .and_then(|r| tenant_row(&self.seal, &r))
    }

    pub fn tenants(&mut self) -> Result<Vec<TenantRow>> {
        self.db
            .query(&format!("{TENANT_SELECT} ORDER BY id"), &[])?
            .iter()
            .map(|r| tenant_row(&self.seal, r))
            .collect()
    }

    pub fn product(&mut self, id: i64) -> Result<ProductRow> {
        self.db
            .query_opt(&format!("{PRODUCT_SELECT} WHERE id = ?1"), vals![id])?
            .ok_or_else(|| StoreError::NotFound(format!("product {id} not found")))
            .and_then(|r| product_row(&r))
    }

    /// Products of one tenant, or all when `tenant_id` is `None`.
    pub fn products(&mut self, tenant_id: Option<i64>) -> Result<Vec<ProductRow>> {
        self.db
            .query(
                &format!("{PRODUCT_SELECT} WHERE CAST(?1 AS BIGINT) IS NULL OR tenant_id = ?1 ORDER BY id"),
                vals![tenant_id],
            )?
            .iter()
            .map(product_row)
            .collect()
    }

    /// Locks or unlocks a product against deletion.
    pub fn set_product_lock(&mut self, id: i64, locked: bool) -> Result<()> {
        self.set_object_lock(Lockable::Product, id, locked)
    }

    /// Locks or unlocks a token against deletion.
    pub fn set_token_lock(&mut self, id: i64, locked: bool) -> Result<()> {
        self.set_object_lock(Lockable::Token, id, locked)
    }

    fn set_object_lock(&mut self, what: Lockable, id: i64, locked: bool) -> Result<()> {
        let (table, entity) = what.names();
        let actor = &self.actor;
        self.db.transaction(|db| {
            let n = db.exec(
                &format!("UPDATE {table} SET locked = ?1 WHERE id = ?2"),
                vals![locked, id],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("{entity} {id} not found")));
            }
            let action = format!("{entity}.{}", if locked { "lock" } else { "unlock" });
            Self::audit(db, actor, &action, entity, id)
        })
    }

    /// The object-lock check before a deletion, in the caller's transaction.
    fn ensure_unlocked(db: &mut Db, what: Lockable, id: i64) -> Result<()> {
        let (table, entity) = what.names();
        let locked = db
            .query_opt(
                &format!("SELECT locked FROM {table} WHERE id = ?1"),
                vals![id],
            )?
            .ok_or_else(|| StoreError::NotFound(format!("{entity} {id} not found")))?
            .i64(0)?;
        if locked != 0 {
            return Err(StoreError::Invalid(format!(
                "{entity} {id} is locked; unlock it before deleting it"
            )));
        }
        Ok(())
    }

    /// Deletes a product with its keys, their data objects and activations, unless it is
    /// locked. Request-log rows stay (history, aged by retention). Running nodes drop the
    /// product and its keys on their next sync. Returns how many keys went with it.
    pub fn delete_product(&mut self, id: i64) -> Result<usize> {
        let actor = &self.actor;
        self.db.transaction(|db| {
            Self::ensure_unlocked(db, Lockable::Product, id)?;
            const KEYS: &str = "SELECT global_id FROM license_keys WHERE product_id = ?1";
            db.exec(
                &format!("DELETE FROM activations WHERE key_global_id IN ({KEYS})"),
                vals![id],
            )?;
            db.exec(
                &format!("DELETE FROM data_objects WHERE key_global_id IN ({KEYS})"),
                vals![id],
            )?;
            let keys = db.exec("DELETE FROM license_keys WHERE product_id = ?1", vals![id])?;
            db.exec("DELETE FROM products WHERE id = ?1", vals![id])?;
            Self::note_change(db, "product", id, None)?;
            Self::audit(db, actor, "product.delete", "product", id)?;
            Ok(keys)
        })
    }

    /// Deletes (revokes) a token unless it is locked; running nodes drop it on their next sync.
    pub fn delete_token(&mut self, id: i64) -> Result<()> {
        let actor = &self.actor;
        self.db.transaction(|db| {
            Self::ensure_unlocked(db, Lockable::Token, id)?;
            db.exec("DELETE FROM tokens WHERE id = ?1", vals![id])?;
            Self::note_change(db, "token", id, None)?;
            Self::audit(db, actor, "token.delete", "token", id)
        })
    }

    pub fn token(&mut self, id: i64) -> Result<TokenRow> {
        self.db
            .query_opt(&format!("{TOKEN_SELECT} WHERE id = ?1"), vals![id])?
            .ok_or_else(|| StoreError::NotFound(format!("token {id} not found")))
            .and_then(|r| token_row(&r))
    }

    pub fn tokens(&mut self, tenant_id: Option<i64>) -> Result<Vec<TokenRow>> {
        self.db
            .query(
                &format!(
                    "{TOKEN_SELECT} WHERE CAST(?1 AS BIGINT) IS NULL OR tenant_id = ?1 ORDER BY id"
                ),
                vals![tenant_id],
            )?
            .iter()
            .map(token_row)
            .collect()
    }

    /// One key with customer, data objects and activations.
    pub fn key(&mut self, global_id: i64) -> Result<KeyRow> {
        let mut rows = self.keys_where("k.global_id = ?1", vals![global_id])?;
        rows.pop()
            .ok_or_else(|| StoreError::NotFound(format!("key {global_id} not found")))
    }

    pub fn key_by_string(&mut self, product_id: i64, key: &str) -> Result<KeyRow> {
        let gid = Self::global_id_of(&mut self.db, product_id, key)?;
        self.key(gid)
    }

    /// Keys of one product, or every key when `product_id` is `None`.
    pub fn keys(&mut self, product_id: Option<i64>) -> Result<Vec<KeyRow>> {
        match product_id {
            Some(p) => self.keys_where("k.product_id = ?1", vals![p]),
            None => self.keys_where("1 = 1", &[]),
        }
    }

    /// Keys matching `cond` (over `license_keys k`), each with its data objects and machines.
    /// Three streamed queries in all, whatever the number of keys: on PostgreSQL a query per
    /// key would be a network round trip per key.
    fn keys_where(&mut self, cond: &str, args: &[db::Value]) -> Result<Vec<KeyRow>> {
        let seal = self.seal.clone();
        let mut rows: Vec<KeyRow> = Vec::new();
        self.db.for_each(
            &format!(
                "SELECT k.global_id, k.product_id, k.id, k.key, k.created, k.expires, k.period, k.features, k.notes, k.block,
                        k.trial_activation, k.max_no_of_machines, k.allowed_machines, k.trial_machine_code, p.tenant_id,
                        c.id, c.name, c.email, c.company_name, c.created
                 FROM license_keys k JOIN products p ON p.id = k.product_id
                 LEFT JOIN customers c ON c.id = k.customer_id
                 WHERE {cond} ORDER BY k.global_id"
            ),
            args,
            |r| {
                rows.push(key_row(&seal, &r)?);
                Ok(())
            },
        )?;
        let index: std::collections::HashMap<i64, usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.license.global_id, i))
            .collect();
        self.db.for_each(
            &format!(
                "SELECT d.key_global_id, d.id, d.name, d.string_value, d.int_value
                 FROM data_objects d JOIN license_keys k ON k.global_id = d.key_global_id
                 WHERE {cond} ORDER BY d.key_global_id, d.id"
            ),
            args,
            |x| {
                if let Some(&i) = index.get(&x.i64(0)?) {
                    rows[i].license.data_objects.push(DataObject {
                        id: x.i64(1)?,
                        name: x.text(2)?,
                        string_value: x.text(3)?,
                        int_value: x.i64(4)?,
                    });
                }
                Ok(())
            },
        )?;
        // Node addresses repeat across millions of machines: keep one copy of each.
        let mut node_addresses: std::collections::HashMap<String, std::sync::Arc<str>> =
            Default::default();
        self.db.for_each(
            &format!(
                "SELECT a.key_global_id, a.machine_code, a.kind, a.ip, a.proxy_ip, a.time, a.friendly_name, a.floating_expires
                 FROM activations a JOIN license_keys k ON k.global_id = a.key_global_id
                 WHERE {cond} ORDER BY a.key_global_id, a.seq"
            ),
            args,
            |x| {
                if let Some(&i) = index.get(&x.i64(0)?) {
                    let a = x.text(4)?;
                    let proxy_ip = node_addresses
                        .entry(a)
                        .or_insert_with_key(|a| a.as_str().into())
                        .clone();
                    rows[i].license.machines.push(Machine {
                        machine_code: seal.open(x.text(1)?)?,
                        kind: MachineKind::from_i64(x.i64(2)?),
                        ip: seal.open(x.text(3)?)?,
                        proxy_ip,
                        time: x.i64(5)?,
                        friendly_name: seal.open(x.text(6)?)?,
                        floating_expires: x.i64(7)?,
                    });
                }
                Ok(())
            },
        )?;
        for r in &mut rows {
            // Grown one push at a time, the lists would keep room for more.
            r.license.machines.shrink_to_fit();
            r.license.data_objects.shrink_to_fit();
        }
        Ok(rows)
    }

    /// The newest change-feed position.
    pub fn last_change(&mut self) -> Result<i64> {
        self.db
            .query_one("SELECT COALESCE(MAX(seq), 0) FROM changes", &[])?
            .i64(0)
    }

    pub fn changes_since(&mut self, seq: i64, limit: i64) -> Result<Vec<ChangeRow>> {
        self.db
            .query(
                "SELECT seq, entity, entity_id, detail FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                vals![seq, limit],
            )?
            .into_iter()
            .map(|r| {
                Ok(ChangeRow {
                    seq: r.i64(0)?,
                    entity: r.text(1)?,
                    entity_id: r.i64(2)?,
                    detail: r.opt_text(3)?,
                })
            })
            .collect()
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
        self.db.transaction(|db| {
            let mut changed = 0;
            let own = db.query(
                "SELECT id, log_retention_days FROM tenants WHERE log_retention_days > 0",
                &[],
            )?;
            for r in own {
                let (tenant, days) = (r.i64(0)?, r.i64(1)?);
                changed += db.exec(
                    &format!("{BLANK} AND id IN ({})", tenant_log_ids(2)),
                    vals![now - days * 86_400, tenant],
                )?;
            }
            if let Some(days) = default_days {
                changed += db.exec(
                    &format!(
                        "{BLANK} AND (tenant_id IS NULL OR tenant_id NOT IN
                            (SELECT id FROM tenants WHERE log_retention_days IS NOT NULL))"
                    ),
                    vals![now - days as i64 * 86_400],
                )?;
            }
            Ok(changed)
        })
    }

    /// The inactive-tenant rule: a tenant older than `days` with no request in the last `days`
    /// loses its whole request log and the client IPs of its activations (the licenses and
    /// their machines stay, so its customers keep working). Nodes blank those IPs in memory
    /// through the change feed. Returns (tenants cleaned, log rows deleted, IPs blanked); a
    /// second run finds nothing.
    pub fn clean_inactive_tenants(&mut self, days: u64, now: i64) -> Result<(usize, usize, usize)> {
        let cutoff = now - days as i64 * 86_400;
        let actor = &self.actor;
        self.db.transaction(|db| {
            let idle = ids(db.query(
                &format!(
                    "SELECT t.id FROM tenants t WHERE t.created < ?1 AND NOT EXISTS
                       (SELECT 1 {} AND r.time >= ?1)",
                    tenant_log_rows("t.id")
                ),
                vals![cutoff],
            )?)?;
            let mut totals = (0, 0, 0);
            for tenant in idle {
                const KEYS: &str = "SELECT k.global_id FROM license_keys k
                     JOIN products p ON p.id = k.product_id WHERE p.tenant_id = ?1";
                let rows = db.exec(
                    &format!("DELETE FROM request_log WHERE id IN ({})", tenant_log_ids(1)),
                    vals![tenant],
                )?;
                db.exec(
                    "DELETE FROM request_log_spans WHERE kind = 0 AND owner = ?1",
                    vals![tenant],
                )?;
                let gids = ids(db.query(
                    &format!(
                        "SELECT DISTINCT key_global_id FROM activations
                         WHERE ip != '' AND key_global_id IN ({KEYS})"
                    ),
                    vals![tenant],
                )?)?;
                let ips = db.exec(
                    &format!(
                        "UPDATE activations SET ip = '' WHERE ip != '' AND key_global_id IN ({KEYS})"
                    ),
                    vals![tenant],
                )?;
                if rows + ips == 0 {
                    continue;
                }
                for gid in &gids {
                    Self::note_change(db, "ip_erased", *gid, None)?;
                }
                Self::audit(db, actor, "tenant.inactive_cleanup", "tenant", tenant)?;
                totals = (totals.0 + 1, totals.1 + rows, totals.2 + ips);
            }
            Ok(totals)
        })
    }

    /// Sets a tenant's own request-log retention (`None`: follow the node's default).
    pub fn set_tenant_retention(&mut self, tenant: i64, days: Option<u64>) -> Result<()> {
        let actor = &self.actor;
        self.db.transaction(|db| {
            let n = db.exec(
                "UPDATE tenants SET log_retention_days = ?1 WHERE id = ?2",
                vals![days.map(|d| d as i64), tenant],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("tenant {tenant} not found")));
            }
            Self::audit(db, actor, "tenant.retention", "tenant", tenant)
        })
    }

    /// Every activation of `machine_code` (any key): (product id, key, machine).
    pub fn activations_of_machine(
        &mut self,
        machine_code: &str,
    ) -> Result<Vec<(i64, String, Machine)>> {
        self.activations_matching("machine_code", machine_code)
    }

    /// Activations recorded from `ip`: (product id, key, machine).
    pub fn activations_from_ip(&mut self, ip: &str) -> Result<Vec<(i64, String, Machine)>> {
        self.activations_matching("ip", ip)
    }

    /// Request-log rows naming `machine_code`, oldest first.
    pub fn log_rows_of_machine(&mut self, machine_code: &str) -> Result<Vec<LogRow>> {
        self.log_rows_matching("machine_code", machine_code)
    }

    /// Request-log rows whose stored client address is exactly `ip`, oldest first.
    pub fn log_rows_from_ip(&mut self, ip: &str) -> Result<Vec<LogRow>> {
        self.log_rows_matching("client_ip", ip)
    }

    /// Activations whose `column` (a fixed column name, never input) equals `value`.
    fn activations_matching(
        &mut self,
        column: &'static str,
        value: &str,
    ) -> Result<Vec<(i64, String, Machine)>> {
        let seal = self.seal.clone();
        let forms = seal.forms(value);
        self.db
            .query(
                &format!(
                    "SELECT k.product_id, k.key, a.machine_code, a.kind, a.ip, a.proxy_ip, a.time, a.friendly_name, a.floating_expires
                     FROM activations a JOIN license_keys k ON k.global_id = a.key_global_id
                     WHERE {} ORDER BY k.global_id, a.seq",
                    any_of(&format!("a.{column}"), forms.len(), 1)
                ),
                &forms,
            )?
            .into_iter()
            .map(|x| {
                Ok((
                    x.i64(0)?,
                    x.text(1)?,
                    Machine {
                        machine_code: seal.open(x.text(2)?)?,
                        kind: MachineKind::from_i64(x.i64(3)?),
                        ip: seal.open(x.text(4)?)?,
                        proxy_ip: x.text(5)?.into(),
                        time: x.i64(6)?,
                        friendly_name: seal.open(x.text(7)?)?,
                        floating_expires: x.i64(8)?,
                    },
                ))
            })
            .collect()
    }

    /// Request-log rows whose `column` (a fixed column name, never input) equals `value`.
    fn log_rows_matching(&mut self, column: &'static str, value: &str) -> Result<Vec<LogRow>> {
        let seal = self.seal.clone();
        let forms = seal.forms(value);
        self.db
            .query(
                &format!(
                    "SELECT {LOG_COLUMNS_SQL} FROM request_log WHERE {} ORDER BY id",
                    any_of(column, forms.len(), 1)
                ),
                &forms,
            )?
            .iter()
            .map(|r| seal.open_log_row(log_row_from(r, 0)?))
            .collect()
    }

    /// A customer (with their tenant id) and their keys as (product id, key).
    pub fn customer_data(&mut self, id: i64) -> Result<(i64, Customer, Vec<KeyRef>)> {
        let r = self
            .db
            .query_opt(
                "SELECT tenant_id, name, email, company_name, created FROM customers WHERE id = ?1",
                vals![id],
            )?
            .ok_or_else(|| StoreError::NotFound(format!("customer {id} not found")))?;
        let c = Customer {
            id,
            name: self.seal.open_opt(r.opt_text(1)?)?,
            email: self.seal.open_opt(r.opt_text(2)?)?,
            company_name: self.seal.open_opt(r.opt_text(3)?)?,
            created: r.i64(4)?,
        };
        let keys = self.key_refs("customer_id = ?1", vals![id])?;
        Ok((r.i64(0)?, c, keys))
    }

    fn key_refs(&mut self, cond: &str, args: &[db::Value]) -> Result<Vec<KeyRef>> {
        self.db
            .query(
                &format!(
                    "SELECT product_id, key FROM license_keys WHERE {cond} ORDER BY global_id"
                ),
                args,
            )?
            .into_iter()
            .map(|r| Ok((r.i64(0)?, r.text(1)?)))
            .collect()
    }

    /// Blanks a customer's name, email and company (the keys stay, still linked to the now
    /// anonymous customer), tells running nodes to reload those keys, and audits it.
    pub fn erase_customer(&mut self, id: i64) -> Result<usize> {
        let actor = &self.actor;
        self.db.transaction(|db| {
            let n = db.exec(
                "UPDATE customers SET name = NULL, email = NULL, company_name = NULL WHERE id = ?1",
                vals![id],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("customer {id} not found")));
            }
            let gids = ids(db.query(
                "SELECT global_id FROM license_keys WHERE customer_id = ?1",
                vals![id],
            )?)?;
            for gid in &gids {
                Self::note_change(db, "key", *gid, None)?;
            }
            Self::audit(db, actor, "privacy.erase", "customer", id)?;
            Ok(gids.len())
        })
    }

    /// Keys whose trial was made for `machine_code`: (product id, key).
    pub fn trial_keys_of_machine(&mut self, machine_code: &str) -> Result<Vec<KeyRef>> {
        let forms = self.seal.forms(machine_code);
        self.key_refs(&any_of("trial_machine_code", forms.len(), 1), &forms)
    }

    /// Blanks `ip` in activations and in the request log (the activations stay), tells
    /// running nodes by digest, and audits it. Returns (activations, log rows) changed.
    pub fn erase_ip(&mut self, ip: &str) -> Result<(usize, usize, Vec<i64>)> {
        let actor = &self.actor;
        let forms = self.seal.forms(ip);
        let n = forms.len();
        self.db.transaction(|db| {
            let gids = ids(db.query(
                &format!(
                    "SELECT DISTINCT key_global_id FROM activations WHERE {}",
                    any_of("ip", n, 1)
                ),
                &forms,
            )?)?;
            let activations = db.exec(
                &format!(
                    "UPDATE activations SET ip = '' WHERE {}",
                    any_of("ip", n, 1)
                ),
                &forms,
            )?;
            let log_rows = db.exec(
                &format!(
                    "UPDATE request_log SET client_ip = '' WHERE {}",
                    any_of("client_ip", n, 1)
                ),
                &forms,
            )?;
            // No digest here: an IPv4 address's hash is reversed by trying all 2^32. Nodes
            // compare their activations with the store's blanked copies instead.
            for gid in &gids {
                Self::note_change(db, "ip_erased", *gid, None)?;
            }
            Self::audit(
                db,
                actor,
                "privacy.erase",
                "ip",
                (activations + log_rows) as i64,
            )?;
            Ok((activations, log_rows, gids))
        })
    }

    /// Deletes every activation of `machine_code`, blanks it (with its friendly name and client
    /// network) in the request log and forgets it as a trial machine, in one transaction that
    /// also tells running nodes (by digest) and writes the audit log (without the code).
    pub fn erase_machine(&mut self, machine_code: &str) -> Result<Erased> {
        let actor = &self.actor;
        let forms = self.seal.forms(machine_code);
        let n = forms.len();
        self.db.transaction(|db| {
            let gids = ids(db.query(
                &format!(
                    "SELECT DISTINCT key_global_id FROM activations WHERE {}
                     UNION SELECT global_id FROM license_keys WHERE {}",
                    any_of("machine_code", n, 1),
                    any_of("trial_machine_code", n, 1)
                ),
                &forms,
            )?)?;
            let erased = Erased {
                activations: db.exec(
                    &format!("DELETE FROM activations WHERE {}", any_of("machine_code", n, 1)),
                    &forms,
                )?,
                log_rows: db.exec(
                    &format!(
                        "UPDATE request_log SET machine_code = '', friendly_name = '', client_ip = '' WHERE {}",
                        any_of("machine_code", n, 1)
                    ),
                    &forms,
                )?,
                trial_keys: db.exec(
                    &format!(
                        "UPDATE license_keys SET trial_machine_code = NULL WHERE {}",
                        any_of("trial_machine_code", n, 1)
                    ),
                    &forms,
                )?,
                keys: gids.clone(),
            };
            let digest = personal_digest(machine_code);
            for gid in &gids {
                Self::note_change(db, "machine_erased", *gid, Some(&digest))?;
            }
            let total = erased.activations + erased.log_rows + erased.trial_keys;
            Self::audit(db, actor, "privacy.erase", "machine", total as i64)?;
            Ok(erased)
        })
    }

    /// Request-log rows of a product (or of every product), newest first.
    pub fn log_rows(&mut self, product_id: Option<i64>, limit: i64) -> Result<Vec<(i64, LogRow)>> {
        let seal = self.seal.clone();
        let rows = match product_id {
            Some(p) => walk_log(
                &mut self.db,
                &LogWalk {
                    owner: LogOwner::Product(p),
                    ascending: false,
                    after: None,
                    before: None,
                    limit,
                },
                "r.product_id = ?1",
                vals![p],
            )?,
            None => self.db.query(
                &format!("SELECT id, {LOG_COLUMNS_SQL} FROM request_log ORDER BY id DESC LIMIT ?1"),
                vals![limit],
            )?,
        };
        rows.iter()
            .map(|r| Ok((r.i64(0)?, seal.open_log_row(log_row_from(r, 1)?)?)))
            .collect()
    }

    /// One page of a tenant's request log (GetWebAPILog), in the asked order.
    ///
    /// With encryption on, a `FriendlyName` filter cannot run in SQL (the column holds
    /// ciphertext), so rows are read in chunks along the cursor, opened and matched here, up
    /// to 100,000 rows scanned per call.
    pub fn web_api_log(&mut self, q: &LogQuery) -> Result<Vec<LogEntry>> {
        let seal = self.seal.clone();
        let (Some(name), true) = (&q.filter.friendly_name, seal.0.is_some()) else {
            return self.web_api_log_page(q, &seal, true);
        };
        const CHUNK: i64 = 500;
        let needle = name.to_lowercase();
        let limit = q.filter.limit.max(0) as usize;
        let backwards = q.filter.ending_before.is_some();
        let mut chunk_query = q.clone();
        chunk_query.filter.friendly_name = None;
        chunk_query.filter.limit = CHUNK;
        let mut out: Vec<LogEntry> = Vec::new();
        for _ in 0..200 {
            let page = self.web_api_log_page(&chunk_query, &seal, false)?;
            let (Some(first), Some(last)) = (page.first(), page.last()) else {
                break;
            };
            if backwards {
                chunk_query.filter.ending_before = Some(first.id);
            } else {
                chunk_query.filter.starting_after = Some(last.id);
            }
            let exhausted = (page.len() as i64) < CHUNK;
            let matching = page
                .into_iter()
                .filter(|e| e.row.friendly_name.to_lowercase().contains(&needle));
            if backwards {
                // Chunks arrive nearest to the cursor first; each goes in front.
                let mut m: Vec<LogEntry> = matching.collect();
                m.append(&mut out);
                out = m;
            } else {
                out.extend(matching);
            }
            if out.len() >= limit || exhausted {
                break;
            }
        }
        if backwards {
            out = out.split_off(out.len().saturating_sub(limit));
        } else {
            out.truncate(limit);
        }
        Ok(out)
    }

    /// The SQL part of `web_api_log`; `friendly_in_sql` applies the `FriendlyName` filter
    /// in the query (plaintext columns only).
    fn web_api_log_page(
        &mut self,
        q: &LogQuery,
        seal: &Seal,
        friendly_in_sql: bool,
    ) -> Result<Vec<LogEntry>> {
        let f = &q.filter;
        let mut args: Vec<db::Value> = vec![q.tenant_id.into()];
        let mut cond = vec!["r.tenant_id = ?1".to_owned()];
        let arg = |v: db::Value, args: &mut Vec<db::Value>| {
            args.push(v);
            format!("?{}", args.len())
        };
        if let Some(p) = q.product_id {
            cond.push(format!("r.product_id = {}", arg(p.into(), &mut args)));
        }
        if let Some(k) = q.key_id {
            cond.push(format!("r.key_id = {}", arg(k.into(), &mut args)));
        }
        if let Some(m) = &f.machine_code {
            let forms = seal.forms(m);
            cond.push(any_of("r.machine_code", forms.len(), args.len() + 1));
            args.extend(forms);
        }
        if let (Some(name), true) = (&f.friendly_name, friendly_in_sql) {
            let escaped = name
                .to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            let p = arg(format!("%{escaped}%").into(), &mut args);
            cond.push(format!("LOWER(r.friendly_name) LIKE {p} ESCAPE '\\'"));
        }
        if !f.states.is_empty() {
            let list: Vec<String> = f
                .states
                .iter()
                .map(|s| arg((*s).into(), &mut args))
                .collect();
            cond.push(format!("r.state IN ({})", list.join(", ")));
        }
        // Pages run in the asked order; an `ending_before` page is read backwards from its
        // cursor and turned around. In id terms the two cursors are exclusive bounds.
        let backwards = f.ending_before.is_some();
        let (after, before) = if f.ascending {
            (f.starting_after, f.ending_before)
        } else {
            (f.ending_before, f.starting_after)
        };
        let walk = LogWalk {
            owner: match q.product_id {
                Some(p) => LogOwner::Product(p),
                None => LogOwner::Tenant(q.tenant_id),
            },
            ascending: f.ascending != backwards,
            after,
            before,
            limit: f.limit,
        };
        let mut rows = walk_log(&mut self.db, &walk, &cond.join(" AND "), &args)?
            .iter()
            .map(|r| {
                Ok(LogEntry {
                    id: r.i64(0)?,
                    row: seal.open_log_row(log_row_from(r, 1)?)?,
                    key: r.opt_text(11)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if backwards {
            rows.reverse();
        }
        Ok(rows)
    }

    /// Re-encrypts every personal field (and every signing key) under the keyring's current
    /// key, plaintext included, so older keys can leave the key file. Idempotent; returns how
    /// many rows changed. The request log goes in chunks, each its own transaction.
    pub fn rotate_encryption(&mut self) -> Result<usize> {
        let seal = self.seal.clone();
        if seal.0.is_none() {
            return Err(StoreError::Invalid(
                "no privacy.encryption_key_file is configured".into(),
            ));
        }
        let reseal = |v: String| -> Result<String> { Ok(seal.text(&seal.open(v)?)) };
        let reseal_opt =
            |v: Option<String>| -> Result<Option<String>> { v.map(reseal).transpose() };
        let mut changed = 0;
        let actor = self.actor.clone();
        changed += self.db.transaction(|db| {
            let mut n = 0;
            for r in db.query("SELECT id, private_key FROM tenants", &[])? {
                let old = r.blob(1)?;
                let new = seal.bytes(&seal.open_bytes(old.clone())?);
                if new != old {
                    db.exec("UPDATE tenants SET private_key = ?1 WHERE id = ?2", vals![&new[..], r.i64(0)?])?;
                    n += 1;
                }
            }
            for r in db.query("SELECT id, name, email, company_name FROM customers", &[])? {
                let old = (r.opt_text(1)?, r.opt_text(2)?, r.opt_text(3)?);
                let new = (reseal_opt(old.0.clone())?, reseal_opt(old.1.clone())?, reseal_opt(old.2.clone())?);
                if new != old {
                    db.exec(
                        "UPDATE customers SET name = ?1, email = ?2, company_name = ?3 WHERE id = ?4",
                        vals![new.0, new.1, new.2, r.i64(0)?],
                    )?;
                    n += 1;
                }
            }
            for r in db.query(
                "SELECT global_id, trial_machine_code FROM license_keys WHERE trial_machine_code IS NOT NULL",
                &[],
            )? {
                let old = r.text(1)?;
                let new = reseal(old.clone())?;
                if new != old {
                    db.exec(
                        "UPDATE license_keys SET trial_machine_code = ?1 WHERE global_id = ?2",
                        vals![new, r.i64(0)?],
                    )?;
                    n += 1;
                }
            }
            for r in db.query(
                "SELECT key_global_id, floating, machine_code, ip, friendly_name FROM activations",
                &[],
            )? {
                let old = (r.text(2)?, r.text(3)?, r.text(4)?);
                let new = (reseal(old.0.clone())?, reseal(old.1.clone())?, reseal(old.2.clone())?);
                if new != old {
                    db.exec(
                        "UPDATE activations SET machine_code = ?1, ip = ?2, friendly_name = ?3
                         WHERE key_global_id = ?4 AND floating = ?5 AND machine_code = ?6",
                        vals![new.0, new.1, new.2, r.i64(0)?, r.i64(1)?, old.0],
                    )?;
                    n += 1;
                }
            }
            Self::audit(db, &actor, "privacy.rotate_key", "store", 0)?;
            Ok(n)
        })?;
        let mut after = 0i64;
        loop {
            let rows = self.db.query(
                "SELECT id, machine_code, client_ip, friendly_name FROM request_log
                 WHERE id > ?1 ORDER BY id LIMIT 5000",
                vals![after],
            )?;
            let Some(last) = rows.last() else { break };
            after = last.i64(0)?;
            changed += self.db.transaction(|db| {
                let mut n = 0;
                for r in &rows {
                    let old = (r.text(1)?, r.text(2)?, r.text(3)?);
                    let new = (reseal(old.0.clone())?, reseal(old.1.clone())?, reseal(old.2.clone())?);
                    if new != old {
                        db.exec(
                            "UPDATE request_log SET machine_code = ?1, client_ip = ?2, friendly_name = ?3 WHERE id = ?4",
                            vals![new.0, new.1, new.2, r.i64(0)?],
                        )?;
                        n += 1;
                    }
                }
                Ok(n)
            })?;
        }
        Ok(changed)
    }

    /// How many request-log rows the store holds.
    pub fn log_row_count(&mut self) -> Result<i64> {
        self.db
            .query_one("SELECT COUNT(*) FROM request_log", &[])?
            .i64(0)
    }

    // === node writes ===

    /// Writes one batch of node events and log rows in a single transaction.
    pub fn write_batch(&mut self, events: &[StoreEvent], logs: &[LogRow]) -> Result<()> {
        self.write_batch_once(None, None, events, logs).map(|_| ())
    }

    /// Writes one batch in a single transaction, at most once per `id`: a batch whose id is
    /// already recorded (committed before a failure hid the outcome, or replayed from the
    /// spool) is skipped. `progress` (node, sequence number) records, in the same
    /// transaction, how far the node's activation log is committed. Returns false when the
    /// batch was skipped.
    pub fn write_batch_once(
        &mut self,
        id: Option<BatchId>,
        progress: Option<(i64, u64)>,
        events: &[StoreEvent],
        logs: &[LogRow],
    ) -> Result<bool> {
        let seal = &self.seal;
        let sealed: Vec<LogRow>;
        let logs = if seal.0.is_some() {
            sealed = logs.iter().map(|r| seal.log_row(r)).collect();
            &sealed[..]
        } else {
            logs
        };
        self.db.transaction(|db| {
            if let Some(id) = id {
                let fresh = db.query(
                    "INSERT INTO ingested_batches (node, batch, time) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING RETURNING node",
                    vals![id.node, id.batch, unix_now()],
                )?;
                if fresh.is_empty() {
                    return Ok(false);
                }
            }
            for e in events {
                write_event(db, seal, e)?;
            }
            if !logs.is_empty() {
                let blocks = take_log_ids(db, logs.len())?;
                match db {
                    Db::Sqlite(conn) => insert_log_rows_sqlite(conn, &blocks, logs)?,
                    Db::Postgres(pg) => copy_log_rows_postgres(pg.client(), &blocks, logs)?,
                }
                insert_log_spans(db, &log_spans(&blocks, logs))?;
            }
            if let Some((node, seq)) = progress {
                // Batches arrive in log order, so the newest number is the highest.
                db.exec(
                    "INSERT INTO node_progress (node, wal_seq) VALUES (?1, ?2)
                     ON CONFLICT (node) DO UPDATE SET wal_seq = excluded.wal_seq",
                    vals![node, seq as i64],
                )?;
            }
            Ok(true)
        })
    }

    /// Distributed mode: stores one pass over the change streams. Of a license's entries only
    /// the newest that can be read (`snapshot(i)`, decoded only for it) is written: its
    /// snapshot replaces the license's activations if its version is newer than the stored
    /// one. Licenses go in global-id order, so nodes storing at the same time lock their rows
    /// in one order. All in one transaction of a few statements (`shared_snapshots`); if that
    /// fails, license by license, so that one that cannot be stored does not hold back the
    /// rest. An error only if none could be and the store does not answer (a store that
    /// answers but refused every key returns them all as failed).
    pub fn apply_shared_snapshots(
        &mut self,
        entries: &[SharedEntry],
        snapshot: impl Fn(usize) -> Option<crate::dist::Snapshot>,
    ) -> Result<SharedStored> {
        let mut by_license: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for (i, e) in entries.iter().enumerate() {
            by_license.entry(e.gid).or_default().push(i);
        }
        let mut picks = Vec::with_capacity(by_license.len());
        for (gid, mut idx) in by_license {
            idx.sort_by_key(|&i| std::cmp::Reverse(entries[i].version));
            match idx.iter().find_map(|&i| snapshot(i)) {
                Some(s) => picks.push((gid, s)),
                None => tracing::error!(gid, "no usable stream entry for this key; skipped"),
            }
        }
        let seal = &self.seal;
        let all = self.db.transaction(|db| shared_snapshots(db, seal, &picks));
        let e = match all {
            Ok(written) => {
                return Ok(SharedStored {
                    written,
                    failed: Vec::new(),
                })
            }
            Err(e) => e,
        };
        tracing::warn!(error = %e, "storing stream entries failed; trying key by key");
        let (mut written, mut failed, mut last) = (0, Vec::new(), e);
        for pick in picks.chunks(1) {
            match self.db.transaction(|db| shared_snapshots(db, seal, pick)) {
                Ok(w) => written += w,
                Err(e) => {
                    failed.push(pick[0].0);
                    last = e;
                }
            }
        }
        // Every key failed: the store itself, unless it still answers (then it refused each
        // of them, and the consumer goes on past them).
        if failed.len() == picks.len() && self.db.query("SELECT 1", &[]).is_err() {
            return Err(last);
        }
        Ok(SharedStored { written, failed })
    }

    /// Every key's `shared_version` (distributed mode), by global id.
    pub fn shared_versions(&mut self) -> Result<std::collections::HashMap<i64, u64>> {
        self.db
            .query("SELECT global_id, shared_version FROM license_keys", &[])?
            .iter()
            .map(|r| Ok((r.i64(0)?, r.i64(1)? as u64)))
            .collect()
    }

    /// Makes every commit so far survive a power loss, and says whether it did. PostgreSQL's
    /// commits already do. SQLite runs `synchronous=NORMAL`: a commit is in the WAL file but
    /// not synced until a checkpoint, so this runs a passive one, which syncs the WAL file,
    /// copies it into the database and syncs that; false when readers kept it from copying
    /// everything (then only a later call can tell).
    pub fn make_durable(&mut self) -> Result<bool> {
        match &mut self.db {
            Db::Postgres(_) => Ok(true),
            Db::Sqlite(conn) => {
                let (busy, log, done): (i64, i64, i64) =
                    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
                Ok(busy == 0 && log == done)
            }
        }
    }

    /// How far `node`'s activation log is committed (0: nothing yet).
    pub fn wal_progress(&mut self, node: i64) -> Result<u64> {
        Ok(self
            .db
            .query_opt(
                "SELECT wal_seq FROM node_progress WHERE node = ?1",
                vals![node],
            )?
            .map(|r| r.i64(0))
            .transpose()?
            .unwrap_or(0) as u64)
    }

    /// Forgets batch ids older than `before` (they guard only against retries and replays,
    /// which happen within minutes or, from a journal, days).
    pub fn prune_ingested_batches(&mut self, before: i64) -> Result<usize> {
        self.db.exec(
            "DELETE FROM ingested_batches WHERE time < ?1",
            vals![before],
        )
    }
}

fn ids(rows: Vec<Row>) -> Result<Vec<i64>> {
    rows.iter().map(|r| r.i64(0)).collect()
}

fn write_event(db: &mut Db, seal: &Seal, e: &StoreEvent) -> Result<()> {
    match e {
        StoreEvent::MachineUpsert {
            key_global_id,
            machine,
        } => upsert_machine(db, seal, *key_global_id, machine)?,
        StoreEvent::MachineRemove {
            key_global_id,
            machine_code,
            floating,
        } => {
            let forms = seal.forms(machine_code);
            let mut args: Vec<db::Value> = vals![*key_global_id, *floating].to_vec();
            let cond = any_of("machine_code", forms.len(), 3);
            args.extend(forms);
            db.exec(
                &format!(
                    "DELETE FROM activations WHERE key_global_id = ?1 AND floating = ?2 AND {cond}"
                ),
                &args,
            )?;
        }
        StoreEvent::FloatingExpired { key_global_id, now } => {
            db.exec(
                "DELETE FROM activations WHERE key_global_id = ?1 AND floating = 1 AND floating_expires <= ?2",
                vals![*key_global_id, *now],
            )?;
        }
        StoreEvent::ExpiresSet {
            key_global_id,
            expires,
        } => {
            db.exec(
                "UPDATE license_keys SET expires = ?1 WHERE global_id = ?2",
                vals![*expires, *key_global_id],
            )?;
        }
    }
    Ok(())
}

const LOG_COLUMNS_SQL: &str = "tenant_id, product_id, key_id, client_ip, proxy_ip, time, machine_code, friendly_name, state, floating_expires";

/// A `LogRow` from the request-log columns in table order, starting at column `first`.
fn log_row_from(r: &Row, first: usize) -> Result<LogRow> {
    Ok(LogRow {
        tenant_id: r.opt_i64(first)?,
        product_id: r.opt_i64(first + 1)?,
        key_id: r.opt_i64(first + 2)?,
        client_ip: r.text(first + 3)?.into(),
        proxy_ip: r.text(first + 4)?.into(),
        time: r.i64(first + 5)?,
        machine_code: r.text(first + 6)?,
        friendly_name: r.text(first + 7)?,
        state: r.int(first + 8)?,
        floating_expires: r.i64(first + 9)?,
    })
}

// === the request log's ids and spans ===
//
// Rows are not indexed one by one. A batch takes blocks of consecutive ids (`take_log_ids`),
// and each tenant and product with rows in a block gets one span: the first and last id of
// its rows there (`request_log_spans`). A read of one tenant's or product's rows walks its
// spans in id order and reads their id ranges from the table (`walk_log`). Spans of one owner
// never overlap, because blocks never do and ids are never reused.

/// The most ids a block holds, so a span covers fewer than this many ids: a walk that starts
/// inside a span finds it by `first_id > cursor - LOG_BLOCK_IDS`. PostgreSQL's
/// `request_log_ids` sequence steps by the same number.
const LOG_BLOCK_IDS: i64 = 256;

/// Takes ids for `n` new log rows, in blocks of consecutive ids: (first id, rows in it).
fn take_log_ids(db: &mut Db, n: usize) -> Result<Vec<(i64, usize)>> {
    let firsts: Vec<i64> = match db.engine() {
        // One writer at a time: one counter, blocks cut from one range.
        Engine::Sqlite => {
            let first = db
                .query_one(
                    "UPDATE request_log_ids SET next = next + ?1 RETURNING next - ?1",
                    vals![n as i64],
                )?
                .i64(0)?;
            (0..n.div_ceil(LOG_BLOCK_IDS as usize))
                .map(|b| first + b as i64 * LOG_BLOCK_IDS)
                .collect()
        }
        // Nodes write at the same time: each block is its own sequence value.
        Engine::Postgres => ids(db.query(
            "SELECT nextval('request_log_ids') FROM generate_series(1, CAST(?1 AS BIGINT))",
            vals![n.div_ceil(LOG_BLOCK_IDS as usize) as i64],
        )?)?,
    };
    let mut left = n;
    Ok(firsts
        .into_iter()
        .map(|first| {
            let rows = left.min(LOG_BLOCK_IDS as usize);
            left -= rows;
            (first, rows)
        })
        .collect())
}

/// The ids of `logs`, in order, from their blocks.
fn log_ids<'a>(blocks: &'a [(i64, usize)]) -> impl Iterator<Item = i64> + 'a {
    blocks
        .iter()
        .flat_map(|&(first, rows)| (0..rows as i64).map(move |i| first + i))
}

/// The spans of `logs` in `blocks`: (kind, owner, first id, last id), kind 0 a tenant's,
/// 1 a product's.
fn log_spans(blocks: &[(i64, usize)], logs: &[LogRow]) -> Vec<[i64; 4]> {
    let mut spans: Vec<[i64; 4]> = Vec::new();
    let mut rows = logs.iter();
    for &(first, n) in blocks {
        // This block's spans start at `from`; a batch seldom has more than a few owners.
        let from = spans.len();
        for (id, row) in (first..first + n as i64).zip(rows.by_ref()) {
            for (kind, owner) in [(0, row.tenant_id), (1, row.product_id)] {
                let Some(owner) = owner else { continue };
                match spans[from..]
                    .iter_mut()
                    .rev()
                    .find(|s| s[0] == kind && s[1] == owner)
                {
                    Some(s) => s[3] = id,
                    None => spans.push([kind, owner, id, id]),
                }
            }
        }
    }
    spans
}

const SPANS_PER_INSERT: usize = 64;

fn insert_log_spans(db: &mut Db, spans: &[[i64; 4]]) -> Result<()> {
    // In power-of-two pieces: a few statement texts (`padded`).
    for chunk in spans.chunks(SPANS_PER_INSERT).flat_map(pieces) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p = i * 4;
                format!("(?{}, ?{}, ?{}, ?{})", p + 1, p + 2, p + 3, p + 4)
            })
            .collect();
        let args: Vec<db::Value> = chunk.iter().flatten().map(|&v| v.into()).collect();
        db.exec(
            &format!(
                "INSERT INTO request_log_spans (kind, owner, first_id, last_id) VALUES {}",
                values.join(", ")
            ),
            &args,
        )?;
    }
    Ok(())
}

/// Whose spans a request-log read walks.
#[derive(Clone, Copy, Debug)]
enum LogOwner {
    Tenant(i64),
    Product(i64),
}

/// A read of one owner's request-log rows in id order, between two exclusive bounds.
struct LogWalk {
    owner: LogOwner,
    ascending: bool,
    after: Option<i64>,
    before: Option<i64>,
    limit: i64,
}

/// Spans read per step of a walk, and so per row query.
const SPANS_PER_STEP: i64 = 32;

/// `FROM ... WHERE ...` over tenant `tenant`'s request-log rows `r`, through its spans;
/// `tenant` is SQL (a placeholder or a column), and more conditions may follow with `AND`.
fn tenant_log_rows(tenant: &str) -> String {
    format!(
        "FROM request_log_spans s CROSS JOIN request_log r
         WHERE s.kind = 0 AND s.owner = {tenant} AND r.id BETWEEN s.first_id AND s.last_id
           AND r.tenant_id = {tenant}"
    )
}

/// The ids of tenant `?p`'s request-log rows (a subquery).
fn tenant_log_ids(p: usize) -> String {
    format!("SELECT r.id {}", tenant_log_rows(&format!("?{p}")))
}

/// The rows `w` walks that also match `cond` (SQL over `r`, with `args` as ?1...): each as
/// `r.id`, the log columns, and the key string `k.key`. `cond` must itself name the owner
/// (`r.tenant_id = ...` or `r.product_id = ...`): a span's range holds other owners' rows too.
///
/// Each step reads up to `SPANS_PER_STEP` spans in order, then their rows in one query that
/// loops over those spans (CROSS JOIN keeps SQLite from starting at the table) and sorts at
/// most their rows.
fn walk_log(db: &mut Db, w: &LogWalk, cond: &str, args: &[db::Value]) -> Result<Vec<Row>> {
    let (kind, owner) = match w.owner {
        LogOwner::Tenant(t) => (0i64, t),
        LogOwner::Product(p) => (1, p),
    };
    let n = args.len();
    let columns = format!("r.{}", LOG_COLUMNS_SQL.replace(", ", ", r."));
    let dir = if w.ascending { "ASC" } else { "DESC" };
    let rows_sql = format!(
        "SELECT r.id, {columns}, k.key FROM request_log_spans s CROSS JOIN request_log r
         LEFT JOIN license_keys k ON k.product_id = r.product_id AND k.id = r.key_id
         WHERE s.kind = ?{} AND s.owner = ?{} AND s.first_id BETWEEN ?{} AND ?{}
           AND r.id BETWEEN s.first_id AND s.last_id AND r.id > ?{} AND r.id < ?{} AND {cond}
         ORDER BY r.id {dir} LIMIT ?{}",
        n + 1,
        n + 2,
        n + 3,
        n + 4,
        n + 5,
        n + 6,
        n + 7
    );
    let (mut lo, mut hi) = (w.after.unwrap_or(i64::MIN), w.before.unwrap_or(i64::MAX));
    let mut out: Vec<Row> = Vec::new();
    while (out.len() as i64) < w.limit && hi.saturating_sub(lo) > 1 {
        let spans = if w.ascending {
            db.query(
                "SELECT first_id, last_id FROM request_log_spans
                 WHERE kind = ?1 AND owner = ?2 AND first_id > ?3 AND last_id > ?4 AND first_id < ?5
                 ORDER BY first_id LIMIT ?6",
                vals![
                    kind,
                    owner,
                    lo.saturating_sub(LOG_BLOCK_IDS),
                    lo,
                    hi,
                    SPANS_PER_STEP
                ],
            )?
        } else {
            db.query(
                "SELECT first_id, last_id FROM request_log_spans
                 WHERE kind = ?1 AND owner = ?2 AND first_id < ?3 AND last_id > ?4
                 ORDER BY first_id DESC LIMIT ?5",
                vals![kind, owner, hi, lo, SPANS_PER_STEP],
            )?
        };
        let (Some(head), Some(tail)) = (spans.first(), spans.last()) else {
            break;
        };
        let (head_first, tail_first, tail_last) = (head.i64(0)?, tail.i64(0)?, tail.i64(1)?);
        let mut a = args.to_vec();
        a.extend([
            kind.into(),
            owner.into(),
            head_first.min(tail_first).into(),
            head_first.max(tail_first).into(),
            lo.into(),
            hi.into(),
            (w.limit - out.len() as i64).into(),
        ]);
        out.extend(db.query(&rows_sql, &a)?);
        if (spans.len() as i64) < SPANS_PER_STEP {
            break;
        }
        if w.ascending {
            lo = tail_last;
        } else {
            hi = tail_first;
        }
    }
    Ok(out)
}

const LOG_ROWS_PER_INSERT: usize = 32;
const LOG_COLUMNS: usize = 11;

/// `INSERT INTO request_log ... VALUES (?, ...), (NULL, ?, ...)` for `rows` rows: the first
/// row's id is bound, the others' are left to SQLite (`insert_log_rows_sqlite` says why).
fn log_insert_sql(rows: usize) -> String {
    let rest = ["?"; LOG_COLUMNS - 1].join(", ");
    let mut values = vec![format!("(?, {rest})")];
    values.extend(std::iter::repeat_n(format!("(NULL, {rest})"), rows - 1));
    format!(
        "INSERT INTO request_log (id, {LOG_COLUMNS_SQL}) VALUES {}",
        values.join(", ")
    )
}

/// SQLite: rows go in 32 at a time, one statement step per 32 rows instead of per row
/// (more would take the bound texts past the connection's lookaside memory into malloc).
///
/// Only each statement's first row names its id. SQLite gives the others the table's
/// highest id plus one, which is the id the block assigned them: the block's ids are above
/// every id ever stored (`take_log_ids`) and consecutive. That keeps SQLite on its append
/// path: after an insert it forgets the cursor's key, so an explicit id is looked up from
/// the table's root again (about 1,000 instructions a row), while a new id is read off the
/// last cell. The last id is checked against the block after each statement.
fn insert_log_rows_sqlite(
    conn: &rusqlite::Connection,
    blocks: &[(i64, usize)],
    logs: &[LogRow],
) -> Result<()> {
    let ids: Vec<i64> = log_ids(blocks).collect();
    // Full statements, then the rest in power-of-two pieces (a few statement texts). One
    // prepared statement per size and batch: taking one from the cache and giving it back
    // hashes its text (about 6,000 instructions for the longest).
    let mut st: Option<(usize, rusqlite::CachedStatement<'_>)> = None;
    let mut at = 0;
    for rows in logs.chunks(LOG_ROWS_PER_INSERT).flat_map(pieces) {
        let n = rows.len();
        let st = match &mut st {
            Some((size, st)) if *size == n => st,
            slot => &mut slot.insert((n, conn.prepare_cached(&log_insert_sql(n))?)).1,
        };
        bind_log_rows(st, ids[at], rows)?;
        st.raw_execute()?;
        let last = ids[at] + n as i64 - 1;
        if ids[at + n - 1] != last || conn.last_insert_rowid() != last {
            return Err(StoreError::Invalid(format!(
                "request-log ids out of step: row {} took id {}, its block gave {}",
                at + n,
                conn.last_insert_rowid(),
                ids[at + n - 1]
            )));
        }
        at += n;
    }
    Ok(())
}

fn bind_log_rows(
    st: &mut rusqlite::CachedStatement<'_>,
    first_id: i64,
    rows: &[LogRow],
) -> rusqlite::Result<()> {
    st.raw_bind_parameter(1, first_id)?;
    for (i, l) in rows.iter().enumerate() {
        // The first row's ten values follow its id; every other row has ten.
        let base = 1 + i * (LOG_COLUMNS - 1);
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

/// PostgreSQL: binary COPY, the fastest way in (no per-row statement, no text parsing).
fn copy_log_rows_postgres(
    client: &mut postgres::Client,
    blocks: &[(i64, usize)],
    logs: &[LogRow],
) -> Result<()> {
    use postgres::binary_copy::BinaryCopyInWriter;
    use postgres::types::Type;
    let sink = client.copy_in(&format!(
        "COPY request_log (id, {LOG_COLUMNS_SQL}) FROM STDIN BINARY"
    ))?;
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
    ];
    let mut w = BinaryCopyInWriter::new(sink, &types);
    for (l, id) in logs.iter().zip(log_ids(blocks)) {
        let state = i64::from(l.state);
        let (client_ip, proxy_ip): (&str, &str) = (&l.client_ip, &l.proxy_ip);
        w.write(&[
            &id,
            &l.tenant_id,
            &l.product_id,
            &l.key_id,
            &client_ip,
            &proxy_ip,
            &l.time,
            &l.machine_code,
            &l.friendly_name,
            &state,
            &l.floating_expires,
        ])?;
    }
    w.finish()?;
    Ok(())
}

/// One activation, inserted or updated in place.
/// The columns an activation is inserted with, and what an upsert of an existing one changes
/// (not its `seq`, its place in the list): shared by the store writer's one-row upsert and the
/// stream consumer's many-row one.
macro_rules! activation_upsert {
    (columns) => {
        "INSERT INTO activations (key_global_id, floating, machine_code, kind, ip, proxy_ip, time, friendly_name, floating_expires, seq)"
    };
    (on_conflict) => {
        " ON CONFLICT (key_global_id, floating, machine_code) DO UPDATE SET
         kind = excluded.kind, ip = excluded.ip, proxy_ip = excluded.proxy_ip, time = excluded.time,
         friendly_name = excluded.friendly_name, floating_expires = excluded.floating_expires"
    };
}

const UPSERT_MACHINE: &str = concat!(
    activation_upsert!(columns),
    "
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, (SELECT COALESCE(MAX(seq), 0) + 1 FROM activations WHERE key_global_id = ?1))",
    activation_upsert!(on_conflict)
);

/// One stream entry to store (`Store::apply_shared_snapshots`).
pub struct SharedEntry {
    pub gid: i64,
    pub version: u64,
}

/// What `Store::apply_shared_snapshots` did.
#[derive(Debug, PartialEq, Eq)]
pub struct SharedStored {
    /// Keys whose activations were replaced (the others' entries were older or repeated).
    pub written: usize,
    /// Keys whose write failed: their entries stay unacknowledged.
    pub failed: Vec<i64>,
}

/// Licenses per statement in `shared_snapshots` (one to three arguments each, ten per row
/// upserted, well under both engines' limits). A power of two: see `padded`.
const SHARED_CHUNK: usize = 256;

/// A batched statement's text depends on how many items it lists, and each text is a
/// statement prepared (and kept) on the connection: one per count would leave hundreds on a
/// long-lived PostgreSQL connection, and thrash SQLite's statement cache. So a list is padded
/// to the next power of two by repeating its last item, for statements where a repeated item
/// changes nothing (`IN` lists, `OR` chains, a `VALUES` list joined on its key), and split
/// into power-of-two pieces (`pieces`) for inserts, where it would: a few texts per statement.
fn padded<T>(items: &[T]) -> impl Iterator<Item = &T> {
    let last = items.last();
    items
        .iter()
        .chain(std::iter::repeat_n(last, items.len().next_power_of_two() - items.len()).flatten())
}

/// `items` as consecutive slices whose lengths are powers of two, largest first (the binary
/// digits of its length).
fn pieces<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let n = 1 << items.len().ilog2();
        let (head, rest) = items.split_at(n);
        items = rest;
        Some(head)
    })
}

/// Writes these snapshots (one per license, in global-id order), each only if its version is
/// newer than the stored one; returns how many were. A handful of statements whatever the
/// number of licenses: against PostgreSQL each statement is a round trip, and a statement per
/// row left the consumer of a node busy signing at a few hundred licenses a second. Only the
/// rows that differ from what the store holds are written (`row_changes`); a license whose
/// order upserts cannot give is rewritten whole.
fn shared_snapshots(
    db: &mut Db,
    seal: &Seal,
    picks: &[(i64, crate::dist::Snapshot)],
) -> Result<usize> {
    // The version fence: the licenses whose stored version is older take the new one (and a
    // trial-activation key its `Expires`). On PostgreSQL their rows are locked first, in
    // global-id order (an UPDATE joined to a list locks in whatever order its plan reads), so
    // nodes storing overlapping licenses at once wait for each other instead of deadlocking.
    let mut newer = std::collections::HashSet::new();
    for chunk in picks.chunks(SHARED_CHUNK) {
        if db.engine() == db::Engine::Postgres {
            let (keys, args) = ids_in("global_id", padded(chunk).map(|(gid, _)| *gid));
            db.query(
                &format!(
                    "SELECT global_id FROM license_keys WHERE {keys} ORDER BY global_id FOR UPDATE"
                ),
                &args,
            )?;
        }
        // A repeated last row joins the same license with the same values: no change.
        let (values, args) = listed(
            padded(chunk),
            ", ",
            |p| {
                format!(
                    "(CAST({} AS BIGINT), CAST({} AS BIGINT), CAST({} AS BIGINT))",
                    p[0], p[1], p[2]
                )
            },
            |(gid, s)| {
                [
                    db::Value::from(*gid),
                    db::Value::from(s.version as i64),
                    s.expires.map_or(db::Value::Null, db::Value::from),
                ]
            },
        );
        let sql = format!(
            "WITH v (gid, ver, exp) AS (VALUES {values})
             UPDATE license_keys SET shared_version = v.ver,
                 expires = COALESCE(v.exp, license_keys.expires)
             FROM v
             WHERE license_keys.global_id = v.gid AND license_keys.shared_version < v.ver
             RETURNING license_keys.global_id"
        );
        for r in db.query(&sql, &args)? {
            newer.insert(r.i64(0)?);
        }
    }
    let picks: Vec<&(i64, crate::dist::Snapshot)> = picks
        .iter()
        .filter(|(gid, _)| newer.contains(gid))
        .collect();
    // What the store holds of them, in list order, and each license's highest place.
    let mut stored: std::collections::HashMap<i64, (Vec<MachineRow>, i64)> = Default::default();
    for chunk in picks.chunks(SHARED_CHUNK) {
        let (keys, args) = ids_in("key_global_id", padded(chunk).map(|(gid, _)| *gid));
        db.for_each(
            &format!(
                "SELECT key_global_id, floating, machine_code, kind, ip, proxy_ip, time, friendly_name,
                        floating_expires, seq
                 FROM activations WHERE {keys} ORDER BY key_global_id, seq"
            ),
            &args,
            |r| {
                let row = MachineRow {
                    floating: r.i64(1)? != 0,
                    code: r.text(2)?,
                    kind: r.i64(3)?,
                    ip: r.text(4)?,
                    proxy_ip: r.text(5)?,
                    time: r.i64(6)?,
                    friendly_name: r.text(7)?,
                    floating_expires: r.i64(8)?,
                };
                let held = stored.entry(r.i64(0)?).or_default();
                held.0.push(row);
                held.1 = held.1.max(r.i64(9)?);
                Ok(())
            },
        )?;
    }
    // The changes: rows to delete, licenses to empty, rows to upsert (with the place a new
    // row takes; an existing row keeps its own).
    let mut deletes: Vec<(i64, &MachineRow)> = Vec::new();
    let mut emptied: Vec<i64> = Vec::new();
    let mut upserts: Vec<(i64, MachineRow, i64)> = Vec::new();
    for (gid, snap) in &picks {
        let (held, mut last) = stored
            .get(gid)
            .map_or((&[][..], 0), |(r, seq)| (&r[..], *seq));
        let next: Vec<MachineRow> = snap
            .machines
            .iter()
            .map(|m| MachineRow::of(seal, m))
            .collect();
        match row_changes(held, &next) {
            Some(RowChanges { remove, write }) => {
                deletes.extend(remove.iter().map(|&j| (*gid, &held[j])));
                for i in write {
                    last += 1;
                    upserts.push((*gid, next[i].clone(), last));
                }
            }
            None => {
                emptied.push(*gid);
                // A machine listed twice (never made by the domain) keeps its first place
                // and its last values, as upserting the list in turn would leave it.
                let mut at: std::collections::HashMap<(bool, String), usize> = Default::default();
                let start = upserts.len();
                for r in next {
                    match at.entry((r.floating, r.code.clone())) {
                        std::collections::hash_map::Entry::Occupied(k) => upserts[*k.get()].1 = r,
                        std::collections::hash_map::Entry::Vacant(k) => {
                            k.insert(upserts.len());
                            let seq = (upserts.len() - start) as i64 + 1;
                            upserts.push((*gid, r, seq));
                        }
                    }
                }
            }
        }
    }
    for chunk in emptied.chunks(SHARED_CHUNK) {
        let (keys, args) = ids_in("key_global_id", padded(chunk).copied());
        db.exec(&format!("DELETE FROM activations WHERE {keys}"), &args)?;
    }
    for chunk in deletes.chunks(SHARED_CHUNK) {
        let (cond, args) = listed(
            padded(chunk),
            " OR ",
            |p| {
                format!(
                    "(key_global_id = {} AND floating = {} AND machine_code = {})",
                    p[0], p[1], p[2]
                )
            },
            |(gid, r)| {
                [
                    db::Value::from(*gid),
                    db::Value::from(r.floating),
                    db::Value::from(&r.code),
                ]
            },
        );
        db.exec(&format!("DELETE FROM activations WHERE {cond}"), &args)?;
    }
    // Not padded: a row listed twice in one upsert is an error on PostgreSQL.
    for chunk in upserts.chunks(SHARED_CHUNK / 2).flat_map(pieces) {
        let (values, args) = listed(
            chunk.iter(),
            ", ",
            |p| format!("({})", p.join(", ")),
            |(gid, r, seq)| {
                [
                    db::Value::from(*gid),
                    db::Value::from(r.floating),
                    db::Value::from(&r.code),
                    db::Value::from(r.kind),
                    db::Value::from(&r.ip),
                    db::Value::from(&r.proxy_ip),
                    db::Value::from(r.time),
                    db::Value::from(&r.friendly_name),
                    db::Value::from(r.floating_expires),
                    db::Value::from(*seq),
                ]
            },
        );
        db.exec(
            &format!(
                "{} VALUES {values}{}",
                activation_upsert!(columns),
                activation_upsert!(on_conflict)
            ),
            &args,
        )?;
    }
    Ok(picks.len())
}

/// `any_of` for these ids, with its arguments.
fn ids_in(column: &str, ids: impl Iterator<Item = i64>) -> (String, Vec<db::Value>) {
    let args: Vec<db::Value> = ids.map(db::Value::from).collect();
    (any_of(column, args.len(), 1), args)
}

/// A list of `items` in SQL, and its arguments: each item's `W` values (`values`) in order,
/// and a piece of SQL per item made by `piece` from its own `W` placeholders (`?1` to `?W`
/// for the first, and so on), joined by `sep`.
fn listed<T, const W: usize>(
    items: impl Iterator<Item = T>,
    sep: &str,
    piece: impl Fn(&[String]) -> String,
    values: impl Fn(T) -> [db::Value; W],
) -> (String, Vec<db::Value>) {
    let args: Vec<db::Value> = items.flat_map(values).collect();
    let sql = (0..args.len() / W)
        .map(|i| {
            let p: Vec<String> = (1..=W).map(|k| format!("?{}", W * i + k)).collect();
            piece(&p)
        })
        .collect::<Vec<_>>()
        .join(sep);
    (sql, args)
}

/// A machine's row in `activations` as stored (personal fields sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MachineRow {
    floating: bool,
    code: String,
    kind: i64,
    ip: String,
    proxy_ip: String,
    time: i64,
    friendly_name: String,
    floating_expires: i64,
}

impl MachineRow {
    /// The row `m` is stored as, under the keyring's current key (sealing is deterministic).
    fn of(seal: &Seal, m: &Machine) -> MachineRow {
        MachineRow {
            floating: m.is_floating(),
            code: seal.text(&m.machine_code),
            kind: m.kind.as_i64(),
            ip: seal.text(&m.ip),
            proxy_ip: m.proxy_ip.to_string(),
            time: m.time,
            friendly_name: seal.text(&m.friendly_name),
            floating_expires: m.floating_expires,
        }
    }
}

/// Row changes that turn a license's stored rows into `next` (both in list order):
/// `remove` indexes `stored`, `write` (upserts) indexes `next`.
#[derive(Debug, PartialEq, Eq)]
struct RowChanges {
    remove: Vec<usize>,
    write: Vec<usize>,
}

/// The rows to delete and upsert so the store holds `next` in its order, or `None` when
/// upserts cannot give that order and the license's rows are to be rewritten whole. An
/// upserted existing row keeps its place; a new one goes last. So the rows both hold must
/// keep their order, and the new ones must come after them. A row stored under an older key
/// or in plaintext is a different row here: it goes, and its machine is written anew.
fn row_changes(stored: &[MachineRow], next: &[MachineRow]) -> Option<RowChanges> {
    let at: std::collections::HashMap<(bool, &str), usize> = stored
        .iter()
        .enumerate()
        .map(|(i, r)| ((r.floating, r.code.as_str()), i))
        .collect();
    let mut kept = vec![false; stored.len()];
    let mut new_keys = std::collections::HashSet::new();
    let (mut write, mut last) = (Vec::new(), None);
    for (i, r) in next.iter().enumerate() {
        match at.get(&(r.floating, r.code.as_str())) {
            Some(&j) => {
                if !new_keys.is_empty() || last.is_some_and(|l| j <= l) {
                    return None;
                }
                last = Some(j);
                kept[j] = true;
                if stored[j] != *r {
                    write.push(i);
                }
            }
            None => {
                if !new_keys.insert((r.floating, r.code.as_str())) {
                    return None;
                }
                write.push(i);
            }
        }
    }
    let remove = (0..stored.len()).filter(|&j| !kept[j]).collect();
    Some(RowChanges { remove, write })
}

fn upsert_machine(db: &mut Db, seal: &Seal, gid: i64, m: &Machine) -> Result<()> {
    let code = seal.text(&m.machine_code);
    let others: Vec<db::Value> = seal
        .forms(&m.machine_code)
        .into_iter()
        .filter(|f| *f != db::Value::from(&code))
        .collect();
    if seal.0.is_some() && !others.is_empty() {
        // The same machine stored in another form (plaintext from before encryption, or an
        // older key not yet rotated away) goes, so the upsert below finds no twin.
        let mut args: Vec<db::Value> = vals![gid, m.is_floating()].to_vec();
        let cond = any_of("machine_code", others.len(), 3);
        args.extend(others);
        db.exec(
            &format!(
                "DELETE FROM activations WHERE key_global_id = ?1 AND floating = ?2 AND {cond}"
            ),
            &args,
        )?;
    }
    // An existing row keeps its `seq` (list position); the domain passes the first-activation
    // `time` back unchanged on a floating renewal.
    db.exec(
        UPSERT_MACHINE,
        vals![
            gid,
            m.is_floating(),
            code,
            m.kind.as_i64(),
            seal.text(&m.ip),
            &*m.proxy_ip,
            m.time,
            seal.text(&m.friendly_name),
            m.floating_expires
        ],
    )?;
    Ok(())
}

const TENANT_SELECT: &str = "SELECT id, name, private_key, public_key_xml, created FROM tenants";
const PRODUCT_SELECT: &str =
    "SELECT id, tenant_id, name, trial_feature, time_limited_feature, created FROM products";
const TOKEN_SELECT: &str =
    "SELECT id, tenant_id, hash, methods, product_lock, key_lock, feature_lock, description, created FROM tokens";

fn tenant_row(seal: &Seal, r: &Row) -> Result<TenantRow> {
    Ok(TenantRow {
        id: r.i64(0)?,
        name: r.text(1)?,
        private_key: seal.open_bytes(r.blob(2)?)?,
        public_key_xml: r.text(3)?,
        created: r.i64(4)?,
    })
}

fn product_row(r: &Row) -> Result<ProductRow> {
    Ok(ProductRow {
        id: r.i64(0)?,
        tenant_id: r.i64(1)?,
        name: r.text(2)?,
        trial_feature: r.opt_int(3)?,
        time_limited_feature: r.opt_int(4)?,
        created: r.i64(5)?,
    })
}

fn token_row(r: &Row) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.i64(0)?,
        hash: r.blob(2)?,
        scope: Scope {
            token_id: r.i64(0)?,
            tenant_id: r.i64(1)?,
            methods: r.int(3)?,
            product_lock: r.opt_i64(4)?,
            key_lock: r.opt_i64(5)?,
            feature_lock: r.int(6)?,
        },
        description: r.text(7)?,
        created: r.i64(8)?,
    })
}

fn key_row(seal: &Seal, r: &Row) -> Result<KeyRow> {
    let customer = match r.opt_i64(15)? {
        Some(id) => Some(Customer {
            id,
            name: seal.open_opt(r.opt_text(16)?)?,
            email: seal.open_opt(r.opt_text(17)?)?,
            company_name: seal.open_opt(r.opt_text(18)?)?,
            created: r.i64(19)?,
        }),
        None => None,
    };
    Ok(KeyRow {
        tenant_id: r.i64(14)?,
        trial_machine_code: seal.open_opt(r.opt_text(13)?)?,
        license: License {
            global_id: r.i64(0)?,
            product_id: r.i64(1)?,
            id: r.i64(2)?,
            key: r.text(3)?,
            created: r.i64(4)?,
            expires: r.i64(5)?,
            period: r.i64(6)?,
            features: Features(r.int(7)?),
            notes: r.opt_text(8)?,
            block: r.i64(9)? != 0,
            trial_activation: r.i64(10)? != 0,
            max_no_of_machines: r.i64(11)?,
            version: 0,
            shared_version: 0,
            allowed_machines: r.text(12)?,
            customer: customer.map(Box::new),
            data_objects: Vec::new(),
            machines: Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::TempPostgres;

    /// Runs `f` on a fresh SQLite store and on a fresh PostgreSQL store.
    fn on_both_engines(name: &str, f: impl Fn(&mut Store)) {
        let dir = std::env::temp_dir().join(format!("keygate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        f(&mut Store::open(&dir.join("k.db")).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        let pg = TempPostgres::start();
        f(&mut Store::connect_postgres(&pg.url()).unwrap());
    }

    /// `padded` repeats the last item up to the next power of two; `pieces` splits a list
    /// into power-of-two slices that put it back together.
    #[test]
    fn batched_lists_come_in_powers_of_two() {
        assert_eq!(padded::<u32>(&[]).count(), 0);
        for n in 1..=300usize {
            let items: Vec<usize> = (0..n).collect();
            let p: Vec<usize> = padded(&items).copied().collect();
            assert_eq!(p.len(), n.next_power_of_two(), "{n}");
            assert_eq!(&p[..n], &items[..]);
            assert!(p[n..].iter().all(|&x| x == n - 1), "{n}");
            let parts: Vec<&[usize]> = pieces(&items).collect();
            assert!(parts.iter().all(|s| s.len().is_power_of_two()), "{n}");
            assert!(parts.windows(2).all(|w| w[0].len() > w[1].len()), "{n}");
            assert_eq!(parts.concat(), items, "{n}");
        }
        assert_eq!(pieces::<u8>(&[]).count(), 0);
    }

    /// Passes of many sizes (so every batched statement in many lengths) store every license
    /// they carry, and leave only a few statement texts prepared on the connection: padded
    /// to powers of two, not one per length.
    #[test]
    fn passes_of_every_size_store_everything_in_a_few_statements() {
        on_both_engines("shared-sizes", |store| {
            use crate::dist::Snapshot;
            let t = store.create_tenant("t", b"k", "<x/>", 1).unwrap();
            let p = store.create_product(t, "p", None, None, 1).unwrap();
            let gids: Vec<i64> = (0..300)
                .map(|i| {
                    store
                        .create_key(&NewKey {
                            product_id: p,
                            key: format!("K{i}"),
                            max_no_of_machines: 10,
                            ..Default::default()
                        })
                        .unwrap()
                        .1
                })
                .collect();
            let m = |code: String| Machine {
                machine_code: code,
                kind: MachineKind::NodeLocked,
                ip: "192.0.2.1".into(),
                proxy_ip: "10.0.0.1".into(),
                time: 1,
                friendly_name: String::new(),
                floating_expires: 0,
            };
            let prepared = |store: &Store| match &store.db {
                Db::Postgres(pg) => pg.prepared(),
                Db::Sqlite(_) => 0,
            };
            let before = prepared(store);
            let sizes = [
                1, 2, 3, 5, 7, 9, 31, 64, 65, 100, 129, 200, 255, 256, 257, 300,
            ];
            for (round, &n) in sizes.iter().enumerate() {
                let version = round as u64 + 1;
                // Each round keeps one machine, drops the other and adds one (a delete and an
                // upsert per license); every third round empties some licenses' lists (deletes
                // only), and some rounds put the new machine first, which upserts cannot (the
                // licenses that held machines are emptied and written whole).
                let snaps: Vec<Snapshot> = (0..n)
                    .map(|i| Snapshot {
                        version,
                        expires: None,
                        machines: if round % 3 == 2 && i % 2 == 0 {
                            Vec::new()
                        } else if round % 4 == 1 {
                            vec![m(format!("r{round}-{i}")), m(format!("keep{i}"))]
                        } else {
                            vec![m(format!("keep{i}")), m(format!("r{round}-{i}"))]
                        },
                    })
                    .collect();
                let keys: Vec<SharedEntry> = (0..n)
                    .map(|i| SharedEntry {
                        gid: gids[i],
                        version,
                    })
                    .collect();
                let got = store
                    .apply_shared_snapshots(&keys, |i| Some(snaps[i].clone()))
                    .unwrap();
                assert_eq!(
                    got,
                    SharedStored {
                        written: n,
                        failed: Vec::new()
                    },
                    "{n} licenses"
                );
                for (i, s) in snaps.iter().enumerate() {
                    let held = store.key(gids[i]).unwrap().license.machines;
                    assert_eq!(held, s.machines, "license {i} of {n}");
                }
            }
            // Six statements, each in at most nine lengths (1 to 256).
            let made = prepared(store) - before;
            assert!(made <= 6 * 9, "{made} statements prepared for the passes");
        });
    }

    /// Runs `f` with the activation upsert prepared on a fresh SQLite store (foreign keys
    /// off, so that machines need no license rows).
    fn with_sqlite_upsert(
        name: &str,
        f: impl FnOnce(&rusqlite::Connection, &mut rusqlite::Statement<'_>),
    ) {
        let dir = std::env::temp_dir().join(format!("keygate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("k.db")).unwrap();
        let Db::Sqlite(conn) = &store.db else {
            unreachable!("a SQLite store")
        };
        conn.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
        f(conn, &mut conn.prepare(UPSERT_MACHINE).unwrap());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The activation upsert is compiled once, not on every execution with new values (see
    /// `Store::open`: SQLite's plan stability guarantee).
    #[test]
    fn the_activation_upsert_is_not_compiled_again_per_machine() {
        with_sqlite_upsert("qpsg", |_, st| {
            for i in 0..20 {
                st.execute(rusqlite::params![
                    i % 3,
                    0,
                    format!("m{i}"),
                    0,
                    "",
                    "",
                    0,
                    "",
                    0
                ])
                .unwrap();
            }
            assert_eq!(st.get_status(rusqlite::StatementStatus::RePrepare), 0);
        });
    }

    /// A new machine's `seq` comes from one index seek, not from reading every machine of
    /// its license: on a license with 2,000 machines the upsert takes as many virtual-machine
    /// steps as on a license with 2 (64 and 64; without `activations_seq`, 12,055 and 67).
    #[test]
    fn numbering_a_new_machine_does_not_read_its_licenses_machines() {
        with_sqlite_upsert("seq", |conn, st| {
            let mut upsert = |gid: i64, code: &str| {
                st.reset_status(rusqlite::StatementStatus::VmStep);
                st.execute(rusqlite::params![gid, 0, code, 0, "ip", "proxy", 1, "", 0])
                    .unwrap();
                st.get_status(rusqlite::StatementStatus::VmStep)
            };
            for i in 0..2000 {
                upsert(1, &format!("big-{i}"));
                upsert(2 + i % 1000, &format!("small-{i}"));
            }
            let (big, small) = (upsert(1, "big-new"), upsert(2, "small-new"));
            assert!(
                big <= small + 10,
                "{big} steps on a license with 2,000 machines, {small} on one with 2"
            );
            let seq: i64 = conn
                .query_row(
                    "SELECT seq FROM activations WHERE key_global_id = 1 AND machine_code = 'big-new'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(seq, 2001, "numbered after the license's last machine");
        });
    }

    /// Batches of every size class (full 32-row statements plus single rows) round-trip
    /// field for field and in order.
    #[test]
    fn log_rows_round_trip_in_order() {
        on_both_engines("store", log_rows_round_trip);
    }

    fn log_rows_round_trip(store: &mut Store) {
        let row = |i: i64| LogRow {
            tenant_id: Some(1),
            product_id: (i % 3 != 0).then_some(7),
            key_id: Some(i),
            client_ip: format!("203.0.113.{}", i % 250).into(),
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
        // A batch id is taken once: the same batch again is skipped, a new id is written.
        let id = BatchId { node: 1, batch: 1 };
        assert!(store
            .write_batch_once(Some(id), None, &[], &written[..3])
            .unwrap());
        assert!(!store
            .write_batch_once(Some(id), None, &[], &written[..3])
            .unwrap());
        assert_eq!(store.log_row_count().unwrap(), written.len() as i64 + 3);
    }

    /// SQLite numbers all but each statement's first row (`insert_log_rows_sqlite`): the rows
    /// still take their block's ids, and after the newest rows are deleted the next batch's
    /// ids stay above every id used before, as the spans need.
    #[test]
    fn request_log_ids_follow_their_blocks_and_are_never_reused() {
        on_both_engines("log-ids", |store| {
            let ids = |store: &mut Store| -> Vec<i64> {
                let mut ids: Vec<i64> = store
                    .log_rows(None, 1000)
                    .unwrap()
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
                ids.reverse();
                ids
            };
            store
                .write_batch(&[], &(0..70).map(walk_row).collect::<Vec<_>>())
                .unwrap();
            let first = ids(store);
            assert_eq!(first.len(), 70);
            assert!(first.windows(2).all(|w| w[1] == w[0] + 1), "{first:?}");
            let top = first[69];
            store
                .db
                .exec(
                    "DELETE FROM request_log WHERE id > ?1",
                    &[(first[29]).into()],
                )
                .unwrap();
            let batch: Vec<LogRow> = (100..133).map(walk_row).collect();
            store.write_batch(&[], &batch).unwrap();
            let now = ids(store);
            assert_eq!(now[..30], first[..30]);
            let new = &now[30..];
            assert_eq!(new.len(), 33);
            assert!(new[0] > top, "an id was used again: {} after {top}", new[0]);
            assert!(new.windows(2).all(|w| w[1] == w[0] + 1), "{new:?}");
            let read: Vec<LogRow> = store
                .log_rows(None, 33)
                .unwrap()
                .into_iter()
                .rev()
                .map(|(_, r)| r)
                .collect();
            assert!(read == batch, "rows differ");
        });
    }

    /// A request-log row of tenant 1, 2 or none, with one of three products (or none).
    fn walk_row(i: i64) -> LogRow {
        LogRow {
            tenant_id: [Some(1), Some(2), Some(1), None, Some(1)][(i % 5) as usize],
            product_id: [Some(10), Some(11), None, Some(12)][(i % 4) as usize],
            key_id: Some(i % 9),
            client_ip: "203.0.113.9".into(),
            proxy_ip: "10.0.0.1".into(),
            time: 1_800_000_000 + i,
            machine_code: format!("m-{i}"),
            friendly_name: String::new(),
            state: 2010 + (i % 3) as u16,
            floating_expires: 0,
        }
    }

    /// Every page GetWebAPILog can ask for (owner, order, cursors, limit, states), read
    /// through the spans, is what a scan of all rows gives; spans of one owner never overlap
    /// and each lies in one block.
    #[test]
    fn log_pages_through_spans_match_a_scan() {
        on_both_engines("spans", log_pages_match_a_scan);
    }

    fn log_pages_match_a_scan(store: &mut Store) {
        let mut n = 0;
        // Blocks of 256 ids: batches below, at and over one block, an empty one, and enough
        // small ones that a walk takes several steps of `SPANS_PER_STEP` spans.
        let sizes = [1, 5, 300, 0, 700, 3, 256, 41].into_iter().chain([3; 80]);
        for size in sizes {
            let batch: Vec<LogRow> = (n..n + size).map(walk_row).collect();
            store.write_batch(&[], &batch).unwrap();
            n += size;
        }
        let mut all = store.log_rows(None, 100_000).unwrap();
        all.reverse();
        assert_eq!(all.len() as i64, n);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ids rise");
        let spans = store
            .db
            .query(
                "SELECT kind, owner, first_id, last_id FROM request_log_spans
                 ORDER BY kind, owner, first_id",
                &[],
            )
            .unwrap();
        for w in spans.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if (a.i64(0).unwrap(), a.i64(1).unwrap()) == (b.i64(0).unwrap(), b.i64(1).unwrap()) {
                assert!(a.i64(3).unwrap() < b.i64(2).unwrap(), "spans overlap");
            }
        }
        for s in &spans {
            assert!(s.i64(3).unwrap() - s.i64(2).unwrap() < LOG_BLOCK_IDS);
        }
        let mid = all[all.len() / 2].0;
        let early = all[all.len() / 5].0;
        let mut pages = 0;
        for tenant in [1, 2] {
            for product in [None, Some(10), Some(12)] {
                for ascending in [false, true] {
                    for (after, before) in [
                        (None, None),
                        (Some(mid), None),
                        (None, Some(mid)),
                        (Some(early), Some(mid)),
                    ] {
                        for limit in [1, 7, 100, 5000] {
                            for states in [vec![], vec![2011]] {
                                let filter = LogFilter {
                                    limit,
                                    starting_after: after,
                                    ending_before: before,
                                    ascending,
                                    states: states.clone(),
                                    ..LogFilter::default()
                                };
                                let q = LogQuery {
                                    tenant_id: tenant,
                                    product_id: product,
                                    key_id: None,
                                    filter,
                                };
                                let got: Vec<i64> = store
                                    .web_api_log(&q)
                                    .unwrap()
                                    .iter()
                                    .map(|e| e.id)
                                    .collect();
                                // The same page from a scan, as the SQL before spans read it.
                                let backwards = before.is_some();
                                let mut want: Vec<i64> = all
                                    .iter()
                                    .filter(|(id, r)| {
                                        let beyond = |c: Option<i64>, up: bool| {
                                            c.is_none_or(|c| if up { *id > c } else { *id < c })
                                        };
                                        r.tenant_id == Some(tenant)
                                            && (product.is_none() || r.product_id == product)
                                            && (states.is_empty() || states.contains(&r.state))
                                            && beyond(after, ascending)
                                            && beyond(before, !ascending)
                                    })
                                    .map(|(id, _)| *id)
                                    .collect();
                                if ascending == backwards {
                                    want.reverse();
                                }
                                want.truncate(limit as usize);
                                if backwards {
                                    want.reverse();
                                }
                                assert_eq!(
                                    got, want,
                                    "tenant {tenant} product {product:?} ascending {ascending} \
                                     after {after:?} before {before:?} limit {limit} states {states:?}"
                                );
                                pages += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(pages, 2 * 3 * 2 * 4 * 4 * 2);
        // A product's rows for the admin listing, newest first.
        let of_12: Vec<i64> = store
            .log_rows(Some(12), 50)
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect();
        let want: Vec<i64> = all
            .iter()
            .rev()
            .filter(|(_, r)| r.product_id == Some(12))
            .take(50)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(of_12, want);
    }

    /// A store written before spans (schema version 9) gets them from its rows at open, and
    /// its new rows take ids above the old ones.
    #[test]
    fn an_older_sqlite_store_gets_spans_for_its_rows() {
        let dir = std::env::temp_dir().join(format!("keygate-spans-v9-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied BIGINT NOT NULL)",
            )
            .unwrap();
            for (v, sql) in &SQLITE_MIGRATIONS[..9] {
                c.execute_batch(sql).unwrap();
                c.execute("INSERT INTO schema_migrations VALUES (?1, 0)", [v])
                    .unwrap();
            }
            for i in 0..600 {
                let r = walk_row(i);
                c.execute(
                    &format!("INSERT INTO request_log ({LOG_COLUMNS_SQL}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                    rusqlite::params![r.tenant_id, r.product_id, r.key_id, r.client_ip, r.proxy_ip, r.time, r.machine_code, r.friendly_name, r.state, r.floating_expires],
                )
                .unwrap();
            }
        }
        let mut store = Store::open(&path).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            SQLITE_MIGRATIONS.last().unwrap().0
        );
        store
            .write_batch(&[], &(600..650).map(walk_row).collect::<Vec<_>>())
            .unwrap();
        let page = |store: &mut Store| {
            let q = LogQuery {
                tenant_id: 2,
                product_id: None,
                key_id: None,
                filter: LogFilter {
                    limit: 1000,
                    ascending: true,
                    ..LogFilter::default()
                },
            };
            store
                .web_api_log(&q)
                .unwrap()
                .iter()
                .map(|e| (e.id, e.row.machine_code.clone()))
                .collect::<Vec<_>>()
        };
        let got = page(&mut store);
        let want: Vec<(i64, String)> = (0..650)
            .filter(|i| walk_row(*i).tenant_id == Some(2))
            .map(|i| (i + 1, format!("m-{i}")))
            .collect();
        assert_eq!(got, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_audit_log_is_append_only() {
        on_both_engines("audit", audit_log_append_only);
    }

    fn audit_log_append_only(store: &mut Store) {
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
            let e = store.db.exec(sql, &[]).unwrap_err();
            assert!(format!("{e:?}").contains("append-only"), "{sql}: {e:?}");
        }
        assert_eq!(store.audit_rows(10).unwrap().len(), 1);
    }

    #[test]
    fn retention_blanks_only_old_rows_by_tenant_rule_and_only_once() {
        on_both_engines("retention", retention_by_tenant_rule);
    }

    fn retention_by_tenant_rule(store: &mut Store) {
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
    }

    #[test]
    fn a_machine_sealed_under_an_older_key_is_replaced_not_duplicated() {
        on_both_engines("twin", |store| {
            use cipher::Keyring;
            let t = store.create_tenant("t", b"k", "<x/>", 1).unwrap();
            let p = store.create_product(t, "p", None, None, 1).unwrap();
            let (_, gid) = store
                .create_key(&NewKey {
                    product_id: p,
                    key: "K".into(),
                    max_no_of_machines: 10,
                    ..Default::default()
                })
                .unwrap();
            let m = |ip: &str| StoreEvent::MachineUpsert {
                key_global_id: gid,
                machine: Machine {
                    machine_code: "mc".into(),
                    kind: MachineKind::NodeLocked,
                    ip: ip.into(),
                    proxy_ip: "10.0.0.1".into(),
                    time: 1,
                    friendly_name: "pc".into(),
                    floating_expires: 0,
                },
            };
            // In clear, then under k1, then under k2 (k1 still readable): one row throughout.
            store.write_batch(&[m("192.0.2.1")], &[]).unwrap();
            let (k1, k2) = (Keyring::new_key_line("k1"), Keyring::new_key_line("k2"));
            store.set_keyring(Some(Arc::new(Keyring::parse(&k1).unwrap())));
            store.write_batch(&[m("192.0.2.2")], &[]).unwrap();
            store.set_keyring(Some(Arc::new(
                Keyring::parse(&format!("{k2}\n{k1}")).unwrap(),
            )));
            store.write_batch(&[m("192.0.2.3")], &[]).unwrap();
            let machines = store.key(gid).unwrap().license.machines;
            assert_eq!(machines.len(), 1, "{machines:?}");
            assert_eq!(machines[0].ip, "192.0.2.3");
            assert_eq!(store.erase_machine("mc").unwrap().activations, 1);
        });
    }

    /// Distributed mode: a pass over the change streams writes each key's newest readable
    /// entry if it is newer than what the store holds; older and repeated entries change
    /// nothing, and a key with no readable entry is skipped while the rest still goes in.
    #[test]
    fn a_pass_of_shared_snapshots_writes_each_keys_newest() {
        on_both_engines("shared", |store| {
            use crate::dist::Snapshot;
            let t = store.create_tenant("t", b"k", "<x/>", 1).unwrap();
            let p = store.create_product(t, "p", None, None, 1).unwrap();
            let mut key = |k: &str| {
                store
                    .create_key(&NewKey {
                        product_id: p,
                        key: k.into(),
                        max_no_of_machines: 10,
                        ..Default::default()
                    })
                    .unwrap()
                    .1
            };
            let (g1, g2) = (key("K1"), key("K2"));
            let m = |code: &str, ip: &str| Machine {
                machine_code: code.into(),
                kind: MachineKind::NodeLocked,
                ip: ip.into(),
                proxy_ip: "10.0.0.1".into(),
                time: 1,
                friendly_name: String::new(),
                floating_expires: 0,
            };
            let snap = |version: u64, machines: Vec<Machine>| Snapshot {
                version,
                expires: None,
                machines,
            };
            let held = |store: &mut Store, gid: i64| store.key(gid).unwrap().license.machines;
            let pass = |store: &mut Store, entries: Vec<(i64, Option<Snapshot>)>| {
                let keys: Vec<SharedEntry> = entries
                    .iter()
                    .enumerate()
                    .map(|(i, (gid, s))| SharedEntry {
                        gid: *gid,
                        version: s.as_ref().map_or(100 + i as u64, |s| s.version),
                    })
                    .collect();
                store
                    .apply_shared_snapshots(&keys, |i| entries[i].1.clone())
                    .unwrap()
            };
            let written = |n: usize| SharedStored {
                written: n,
                failed: Vec::new(),
            };
            let v1 = snap(1, vec![m("a", "192.0.2.1")]);
            let v2 = snap(2, vec![m("a", "192.0.2.1"), m("b", "192.0.2.2")]);
            let v3 = snap(3, vec![m("b", "192.0.2.2"), m("c", "192.0.2.3")]);
            // Two entries of one key: only the newer is written; another key alongside.
            let got = pass(
                store,
                vec![
                    (g1, Some(v1.clone())),
                    (g2, Some(v1.clone())),
                    (g1, Some(v2.clone())),
                ],
            );
            assert_eq!(got, written(2));
            assert_eq!(held(store, g1), v2.machines);
            assert_eq!(held(store, g2), v1.machines);
            // Repeated and older entries change nothing.
            assert_eq!(
                pass(store, vec![(g1, Some(v2.clone())), (g1, Some(v1))]),
                written(0)
            );
            assert_eq!(held(store, g1), v2.machines);
            // The newest entry cannot be read: the newest that can is written.
            assert_eq!(
                pass(store, vec![(g1, Some(v3.clone())), (g1, None)]),
                written(1)
            );
            assert_eq!(held(store, g1), v3.machines);
            // A key with no readable entry is skipped; the other key still goes in.
            let v4 = snap(4, vec![m("d", "192.0.2.4")]);
            assert_eq!(
                pass(store, vec![(g2, None), (g1, Some(v4.clone()))]),
                written(1)
            );
            assert_eq!(held(store, g1), v4.machines);
            assert_eq!(held(store, g2), snap(1, vec![m("a", "192.0.2.1")]).machines);
            // A key whose write fails (here a trigger refuses it) fails alone: the pass's
            // transaction is rolled back and the keys are written one by one.
            let refuse = match &store.db {
                Db::Sqlite(_) => format!(
                    "CREATE TRIGGER refuse BEFORE UPDATE OF shared_version ON license_keys
                     WHEN NEW.global_id = {g2} BEGIN SELECT RAISE(ABORT, 'refused'); END"
                ),
                Db::Postgres(_) => format!(
                    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN
                       IF NEW.global_id = {g2} THEN RAISE EXCEPTION 'refused'; END IF;
                       RETURN NEW; END $$ LANGUAGE plpgsql;
                     CREATE TRIGGER refuse BEFORE UPDATE ON license_keys
                       FOR EACH ROW EXECUTE FUNCTION refuse()"
                ),
            };
            store.db.batch(&refuse).unwrap();
            let v5 = snap(5, vec![m("e", "192.0.2.5")]);
            let got = pass(store, vec![(g2, Some(v5.clone())), (g1, Some(v5.clone()))]);
            assert_eq!(
                got,
                SharedStored {
                    written: 1,
                    failed: vec![g2]
                }
            );
            assert_eq!(held(store, g1), v5.machines);
            // Only the rows that differ are written, and the list keeps the snapshot's order:
            // a reordered list is rewritten whole, a changed machine keeps its place.
            let mut c2 = m("c", "192.0.2.9");
            c2.time = 2;
            for (version, machines) in [
                (7, vec![m("b", "192.0.2.2"), m("c", "192.0.2.3")]),
                (8, vec![m("c", "192.0.2.3"), m("b", "192.0.2.2")]),
                (9, vec![c2, m("b", "192.0.2.2"), m("f", "192.0.2.6")]),
                (10, vec![m("f", "192.0.2.6")]),
            ] {
                let s = snap(version, machines);
                assert_eq!(pass(store, vec![(g1, Some(s.clone()))]), written(1));
                assert_eq!(held(store, g1), s.machines, "version {version}");
            }
            // A machine listed twice (the domain never makes such a list) keeps its first
            // place and its last values, as upserting the list in turn would leave it.
            let twice = snap(
                11,
                vec![
                    m("g", "192.0.2.7"),
                    m("h", "192.0.2.8"),
                    m("g", "192.0.2.9"),
                ],
            );
            assert_eq!(pass(store, vec![(g1, Some(twice))]), written(1));
            assert_eq!(
                held(store, g1),
                vec![m("g", "192.0.2.9"), m("h", "192.0.2.8")]
            );
            // A trial-activation key's snapshot moves its `Expires`; an older one does not.
            let trial = |version: u64, expires: i64| Snapshot {
                expires: Some(expires),
                ..snap(version, vec![m("g", "192.0.2.9")])
            };
            assert_eq!(pass(store, vec![(g1, Some(trial(12, 86_400)))]), written(1));
            assert_eq!(store.key(g1).unwrap().license.expires, 86_400);
            assert_eq!(pass(store, vec![(g1, Some(trial(12, 7)))]), written(0));
            assert_eq!(store.key(g1).unwrap().license.expires, 86_400);
            // Nothing can be written, but the store answers: every key comes back as failed
            // (refused), not as an error (which says the store is down).
            let keys = [SharedEntry {
                gid: g2,
                version: 6,
            }];
            let v6 = snap(6, vec![]);
            assert_eq!(
                store
                    .apply_shared_snapshots(&keys, |_| Some(v6.clone()))
                    .unwrap(),
                SharedStored {
                    written: 0,
                    failed: vec![g2]
                }
            );
        });
    }

    /// The row changes that bring a license's stored rows to a snapshot: by key (floating,
    /// stored machine code), keeping the order upserts can give, else `None` (rewrite whole).
    #[test]
    fn row_changes_keep_the_order_or_give_up() {
        let row = |code: &str, floating: bool, ip: &str| MachineRow {
            floating,
            code: code.into(),
            kind: i64::from(floating),
            ip: ip.into(),
            proxy_ip: "10.0.0.1".into(),
            time: 1,
            friendly_name: String::new(),
            floating_expires: 0,
        };
        let (a, b, c) = (
            row("a", false, "1"),
            row("b", false, "1"),
            row("c", false, "1"),
        );
        let changes = |remove: &[usize], write: &[usize]| {
            Some(RowChanges {
                remove: remove.to_vec(),
                write: write.to_vec(),
            })
        };
        let cases: Vec<(Vec<MachineRow>, Vec<MachineRow>, Option<RowChanges>)> = vec![
            (vec![], vec![], changes(&[], &[])),
            (vec![], vec![a.clone(), b.clone()], changes(&[], &[0, 1])),
            (
                vec![a.clone()],
                vec![a.clone(), b.clone()],
                changes(&[], &[1]),
            ),
            (
                vec![a.clone(), b.clone()],
                vec![b.clone()],
                changes(&[0], &[]),
            ),
            (
                vec![a.clone(), b.clone()],
                vec![b.clone(), c.clone()],
                changes(&[0], &[1]),
            ),
            // A changed field: upserted in place.
            (
                vec![a.clone(), b.clone()],
                vec![row("a", false, "2"), b.clone()],
                changes(&[], &[0]),
            ),
            // The same code as a floating seat is another row.
            (
                vec![a.clone()],
                vec![a.clone(), row("a", true, "1")],
                changes(&[], &[1]),
            ),
            // Reordered, or a new machine before a kept one: upserts cannot give that order.
            (vec![a.clone(), b.clone()], vec![b.clone(), a.clone()], None),
            (vec![a.clone()], vec![c.clone(), a.clone()], None),
            // A row stored in another form (another key, plaintext) is not the same row.
            (
                vec![row("old-a", false, "1"), b.clone()],
                vec![a.clone(), b.clone()],
                None,
            ),
            (
                vec![a.clone(), row("old-b", false, "1")],
                vec![a.clone(), b.clone()],
                changes(&[1], &[1]),
            ),
            // A machine listed twice (never made by the domain): rewritten whole.
            (vec![], vec![a.clone(), a.clone()], None),
            (vec![a.clone()], vec![a.clone(), a.clone()], None),
        ];
        for (stored, next, want) in cases {
            assert_eq!(row_changes(&stored, &next), want, "{stored:?} -> {next:?}");
        }
    }

    #[test]
    fn inactive_tenants_lose_their_log_and_activation_ips_once() {
        on_both_engines("inactive", |store| {
            const DAY: i64 = 86_400;
            let now = 1000 * DAY;
            let tenant = |store: &mut Store, name: &str, created: i64| {
                let t = store.create_tenant(name, b"k", "<x/>", created).unwrap();
                let p = store.create_product(t, "p", None, None, created).unwrap();
                let (_, gid) = store
                    .create_key(&NewKey {
                        product_id: p,
                        key: format!("K-{name}"),
                        max_no_of_machines: 5,
                        ..Default::default()
                    })
                    .unwrap();
                (t, p, gid)
            };
            let (active, ap, ag) = tenant(store, "active", now - 500 * DAY);
            let (idle, ip, ig) = tenant(store, "idle", now - 500 * DAY);
            // Created yesterday, no requests yet: not inactive.
            tenant(store, "fresh", now - DAY);
            let row = |t: i64, p: i64, age: i64| LogRow {
                tenant_id: Some(t),
                product_id: Some(p),
                key_id: Some(1),
                client_ip: "203.0.113.0".into(),
                proxy_ip: "10.0.0.1".into(),
                time: now - age * DAY,
                machine_code: "m".into(),
                friendly_name: String::new(),
                state: 2010,
                floating_expires: 0,
            };
            let machine = |gid: i64| StoreEvent::MachineUpsert {
                key_global_id: gid,
                machine: Machine {
                    machine_code: "m".into(),
                    kind: MachineKind::NodeLocked,
                    ip: "203.0.113.7".into(),
                    proxy_ip: "10.0.0.1".into(),
                    time: 1,
                    friendly_name: String::new(),
                    floating_expires: 0,
                },
            };
            store
                .write_batch(
                    &[machine(ag), machine(ig)],
                    &[row(active, ap, 1), row(active, ap, 100), row(idle, ip, 100)],
                )
                .unwrap();
            assert_eq!(store.clean_inactive_tenants(30, now).unwrap(), (1, 1, 1));
            assert_eq!(
                store.clean_inactive_tenants(30, now).unwrap(),
                (0, 0, 0),
                "once"
            );
            let left: Vec<Option<i64>> = store
                .log_rows(None, 10)
                .unwrap()
                .into_iter()
                .map(|(_, r)| r.tenant_id)
                .collect();
            assert_eq!(left, [Some(active), Some(active)]);
            assert_eq!(
                store.key(ig).unwrap().license.machines[0].ip,
                "",
                "idle: IP blanked"
            );
            assert_eq!(store.key(ag).unwrap().license.machines[0].ip, "203.0.113.7");
            assert!(store
                .audit_rows(5)
                .unwrap()
                .iter()
                .any(|a| a.action == "tenant.inactive_cleanup" && a.entity_id == idle));
        });
    }
}
