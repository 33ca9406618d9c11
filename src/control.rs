//! The control plane behind the CLI: tenants (with their RSA keys), products, customers,
//! license keys and access tokens, written straight to the main store. Running nodes pick the
//! changes up from the store's change feed.

use crate::config::Config;
use crate::domain::{Features, Machine, Method, Scope, DAY_SECONDS};
use crate::signing::{self, Signer};
use crate::store::{KeyRow, NewKey, Store, StoreError};
use base64::Engine;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, ControlError>;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("system random source");
    b
}

/// A Cryptolens-style key string `AAAAA-BBBBB-CCCCC-DDDDD` (26^20 ≈ 2^94 possibilities).
pub fn random_key_string() -> String {
    let mut letters = String::with_capacity(23);
    let mut n = 0;
    while n < 20 {
        for b in random_bytes::<32>() {
            // Reject the top of the byte range so every letter is equally likely.
            if b < 234 && n < 20 {
                if n > 0 && n % 5 == 0 {
                    letters.push('-');
                }
                letters.push((b'A' + b % 26) as char);
                n += 1;
            }
        }
    }
    letters
}

/// A new access token (256 random bits); only its hash is stored.
pub fn new_token() -> String {
    format!(
        "kg_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
    )
}

pub fn now() -> i64 {
    crate::http::unix_now()
}

pub fn create_tenant(store: &mut Store, name: &str) -> Result<Value> {
    let der = signing::generate_pkcs8().map_err(|e| ControlError::Invalid(e.to_string()))?;
    let signer = Signer::from_pkcs8(&der).map_err(|e| ControlError::Invalid(e.to_string()))?;
    let id = store.create_tenant(name, &der, signer.public_key_xml(), now())?;
    Ok(json!({"tenant_id": id, "name": name, "public_key": signer.public_key_xml()}))
}

pub fn list_tenants(store: &mut Store) -> Result<Value> {
    let rows: Vec<Value> = store
        .tenants()?
        .into_iter()
        .map(|t| json!({"tenant_id": t.id, "name": t.name, "public_key": t.public_key_xml, "created": t.created}))
        .collect();
    Ok(json!({"tenants": rows}))
}

fn check_feature(name: &str, f: Option<u8>) -> Result<()> {
    match f {
        Some(n) if !(1..=8).contains(&n) => {
            Err(ControlError::Invalid(format!("{name} must be 1..8")))
        }
        _ => Ok(()),
    }
}

pub fn create_product(
    store: &mut Store,
    tenant: i64,
    name: &str,
    trial_feature: Option<u8>,
    time_limited_feature: Option<u8>,
) -> Result<Value> {
    check_feature("--trial-feature", trial_feature)?;
    check_feature("--time-limited-feature", time_limited_feature)?;
    let id = store.create_product(tenant, name, trial_feature, time_limited_feature, now())?;
    Ok(json!({"product_id": id, "tenant_id": tenant, "name": name}))
}

pub fn list_products(store: &mut Store, tenant: Option<i64>) -> Result<Value> {
    let rows: Vec<Value> = store
        .products(tenant)?
        .into_iter()
        .map(|p| {
            json!({"product_id": p.id, "tenant_id": p.tenant_id, "name": p.name,
                   "trial_feature": p.trial_feature, "time_limited_feature": p.time_limited_feature})
        })
        .collect();
    Ok(json!({"products": rows}))
}

pub fn create_customer(
    store: &mut Store,
    tenant: i64,
    name: &str,
    email: &str,
    company: &str,
) -> Result<Value> {
    let id = store.create_customer(tenant, name, email, company, now())?;
    Ok(json!({"customer_id": id}))
}

/// Options of `key create`.
#[derive(Clone, Debug, Default)]
pub struct KeySpec {
    pub product_id: i64,
    /// Days; 0 = no period (Expires = Created).
    pub period: i64,
    pub expires: Option<i64>,
    pub features: Features,
    pub notes: Option<String>,
    pub block: bool,
    pub trial_activation: bool,
    pub max_no_of_machines: i64,
    pub allowed_machines: Vec<String>,
    pub customer_id: Option<i64>,
    /// Creates a customer of the product's tenant for this key.
    pub new_customer: Option<(String, String, String)>,
    /// `NAME=STRING:INT` items.
    pub data_objects: Vec<String>,
}

/// Parses `NAME=STRING:INT` (the last `:` splits the integer; both parts after `=` optional).
pub fn parse_data_object(s: &str) -> Result<(String, String, i64)> {
    let bad = || ControlError::Invalid(format!("--data-object {s:?}: expected NAME=STRING:INT"));
    let (name, rest) = s.split_once('=').unwrap_or((s, ""));
    if name.is_empty() {
        return Err(bad());
    }
    let (sv, iv) = match rest.rsplit_once(':') {
        Some((sv, iv)) if !iv.is_empty() => (sv, iv.parse().map_err(|_| bad())?),
        Some((sv, _)) => (sv, 0),
        None => (rest, 0),
    };
    Ok((name.to_owned(), sv.to_owned(), iv))
}

pub fn create_key(store: &mut Store, spec: &KeySpec) -> Result<Value> {
    if spec.period < 0 || spec.max_no_of_machines < 0 {
        return Err(ControlError::Invalid(
            "--period and --max-machines must not be negative".into(),
        ));
    }
    if spec.notes.as_ref().is_some_and(|n| n.chars().count() > 500) {
        return Err(ControlError::Invalid(
            "The notes field cannot be more than 500 characters.".into(),
        ));
    }
    let product = store.product(spec.product_id)?;
    let customer_id = match &spec.new_customer {
        Some((n, e, c)) => Some(store.create_customer(product.tenant_id, n, e, c, now())?),
        None => spec.customer_id,
    };
    let data_objects = spec
        .data_objects
        .iter()
        .map(|d| parse_data_object(d))
        .collect::<Result<Vec<_>>>()?;
    let created = now();
    let key = random_key_string();
    let new = NewKey {
        product_id: spec.product_id,
        key: key.clone(),
        created,
        expires: spec.expires.unwrap_or(created + spec.period * DAY_SECONDS),
        period: spec.period,
        features: spec.features,
        notes: spec.notes.clone(),
        block: spec.block,
        customer_id,
        trial_activation: spec.trial_activation,
        max_no_of_machines: spec.max_no_of_machines,
        allowed_machines: spec.allowed_machines.join("\n"),
        data_objects,
        trial_machine_code: None,
        machines: Vec::new(),
    };
    let (id, gid) = store.create_key(&new)?;
    Ok(json!({"key": key, "id": id, "global_id": gid, "product_id": spec.product_id}))
}

fn machine_json(m: &Machine) -> Value {
    json!({"mid": m.mid(), "ip": m.ip, "proxy_ip": &*m.proxy_ip, "time": m.time,
           "friendly_name": m.friendly_name, "floating_expires": m.floating_expires})
}

pub fn key_json(k: &KeyRow) -> Value {
    let l = &k.license;
    json!({
        "key": l.key, "id": l.id, "global_id": l.global_id, "product_id": l.product_id,
        "created": l.created, "expires": l.expires, "period": l.period,
        "features": (1..=8u8).filter(|n| l.features.get(*n)).collect::<Vec<_>>(),
        "notes": l.notes, "blocked": l.block, "trial_activation": l.trial_activation,
        "max_machines": l.max_no_of_machines,
        "allowed_machines": l.allowed_machines.split('\n').filter(|s| !s.is_empty()).collect::<Vec<_>>(),
        "customer": l.customer.as_ref().map(|c| json!({"id": c.id, "name": c.name, "email": c.email, "company": c.company_name})),
        "data_objects": l.data_objects.iter().map(|d| json!({"id": d.id, "name": d.name, "string_value": d.string_value, "int_value": d.int_value})).collect::<Vec<_>>(),
        "activations": l.machines.iter().map(machine_json).collect::<Vec<_>>(),
    })
}

pub fn list_keys(store: &mut Store, product: i64) -> Result<Value> {
    store.product(product)?;
    Ok(json!({"keys": store.keys(Some(product))?.iter().map(key_json).collect::<Vec<_>>()}))
}

pub fn show_key(store: &mut Store, product: i64, key: &str) -> Result<Value> {
    Ok(key_json(&store.key_by_string(product, key)?))
}

pub fn set_block(store: &mut Store, product: i64, key: &str, block: bool) -> Result<Value> {
    store.set_block(product, key, block)?;
    Ok(json!({"key": key, "product_id": product, "blocked": block}))
}

/// Options of `token create`.
#[derive(Clone, Debug, Default)]
pub struct TokenSpec {
    pub tenant_id: i64,
    /// Method names; empty = all client methods.
    pub methods: Vec<String>,
    pub product_lock: Option<i64>,
    pub key_lock: Option<i64>,
    pub feature_lock: i64,
    pub description: String,
}

pub fn create_token(store: &mut Store, spec: &TokenSpec) -> Result<Value> {
    let mut methods = 0i64;
    for m in &spec.methods {
        let parsed = Method::parse(m).ok_or_else(|| {
            ControlError::Invalid(format!(
                "unknown method {m:?}; expected one of {}",
                Method::ALL.map(Method::name).join(", ")
            ))
        })?;
        methods |= parsed as i64;
    }
    if spec.methods.is_empty() {
        methods = Method::client_bits();
    }
    if spec.key_lock.is_some_and(|k| k < -1 || k == 0) {
        return Err(ControlError::Invalid(
            "--key-lock must be a key ID or -1".into(),
        ));
    }
    let scope = Scope {
        token_id: 0, // the row id, assigned by the store
        tenant_id: spec.tenant_id,
        methods,
        product_lock: spec.product_lock,
        key_lock: spec.key_lock,
        feature_lock: spec.feature_lock,
    };
    let token = new_token();
    let id = store.create_token(
        &crate::state::token_hash(&token),
        &scope,
        &spec.description,
        now(),
    )?;
    Ok(json!({"token": token, "token_id": id, "methods": method_names(methods)}))
}

fn method_names(bits: i64) -> Vec<&'static str> {
    Method::ALL
        .into_iter()
        .filter(|m| bits & *m as i64 != 0)
        .map(Method::name)
        .collect()
}

pub fn delete_token(store: &mut Store, id: i64) -> Result<Value> {
    store.delete_token(id)?;
    Ok(json!({"token_id": id, "deleted": true}))
}

pub fn set_product_lock(store: &mut Store, id: i64, locked: bool) -> Result<Value> {
    store.set_product_lock(id, locked)?;
    Ok(json!({"product_id": id, "locked": locked}))
}

pub fn delete_product(store: &mut Store, id: i64) -> Result<Value> {
    let keys = store.delete_product(id)?;
    Ok(json!({"product_id": id, "deleted": true, "keys_deleted": keys}))
}

pub fn set_token_lock(store: &mut Store, id: i64, locked: bool) -> Result<Value> {
    store.set_token_lock(id, locked)?;
    Ok(json!({"token_id": id, "locked": locked}))
}

pub fn list_tokens(store: &mut Store, tenant: Option<i64>) -> Result<Value> {
    let rows: Vec<Value> = store
        .tokens(tenant)?
        .into_iter()
        .map(|t| {
            json!({"token_id": t.id, "tenant_id": t.scope.tenant_id, "methods": method_names(t.scope.methods),
                   "product_lock": t.scope.product_lock, "key_lock": t.scope.key_lock,
                   "feature_lock": t.scope.feature_lock, "description": t.description, "created": t.created})
        })
        .collect();
    Ok(json!({"tokens": rows}))
}

/// Everything stored about a machine code, as one JSON document (a data-subject export).
pub fn privacy_export(store: &mut Store, machine_code: &str) -> Result<Value> {
    let activations: Vec<Value> = store
        .activations_of_machine(machine_code)?
        .into_iter()
        .map(|(product_id, key, m)| {
            json!({"product_id": product_id, "key": key, "mid": m.mid(), "ip": m.ip,
                   "proxy_ip": &*m.proxy_ip, "time": m.time, "friendly_name": m.friendly_name,
                   "floating_expires": m.floating_expires})
        })
        .collect();
    let log: Vec<Value> = store
        .log_rows_of_machine(machine_code)?
        .into_iter()
        .map(|l| {
            json!({"tenant_id": l.tenant_id, "product_id": l.product_id, "key_id": l.key_id,
                   "client_ip": &*l.client_ip, "proxy_ip": &*l.proxy_ip, "time": l.time,
                   "friendly_name": l.friendly_name, "state": l.state})
        })
        .collect();
    let trials: Vec<Value> = store
        .trial_keys_of_machine(machine_code)?
        .into_iter()
        .map(|(product_id, key)| json!({"product_id": product_id, "key": key}))
        .collect();
    Ok(
        json!({"machine_code": machine_code, "activations": activations,
              "request_log": log, "trial_keys": trials}),
    )
}

/// Removes a machine code everywhere it is stored; running nodes forget it on their next sync.
pub fn privacy_erase(store: &mut Store, machine_code: &str) -> Result<Value> {
    let e = store.erase_machine(machine_code)?;
    Ok(
        json!({"erased": {"activations": e.activations, "request_log_rows": e.log_rows,
                         "trial_keys": e.trial_keys, "keys": e.keys}}),
    )
}

/// A customer's stored personal data and their keys.
pub fn privacy_export_customer(store: &mut Store, id: i64) -> Result<Value> {
    let (tenant_id, c, keys) = store.customer_data(id)?;
    let keys: Vec<Value> = keys
        .into_iter()
        .map(|(product_id, key)| json!({"product_id": product_id, "key": key}))
        .collect();
    Ok(json!({
        "customer": {"id": id, "tenant_id": tenant_id, "name": c.name, "email": c.email,
                     "company_name": c.company_name, "created": c.created},
        "keys": keys,
    }))
}

pub fn privacy_erase_customer(store: &mut Store, id: i64) -> Result<Value> {
    let keys = store.erase_customer(id)?;
    Ok(json!({"erased": {"customer": id, "keys_updated": keys}}))
}

/// Activations recorded from an IP address, and request-log rows that kept it whole.
pub fn privacy_export_ip(store: &mut Store, ip: &str) -> Result<Value> {
    let activations: Vec<Value> = store
        .activations_from_ip(ip)?
        .into_iter()
        .map(|(product_id, key, m)| {
            json!({"product_id": product_id, "key": key, "mid": m.mid(), "ip": m.ip,
                   "time": m.time, "friendly_name": m.friendly_name})
        })
        .collect();
    let log: Vec<Value> = store
        .log_rows_from_ip(ip)?
        .into_iter()
        .map(|l| {
            json!({"product_id": l.product_id, "key_id": l.key_id, "time": l.time,
                        "machine_code": l.machine_code, "state": l.state})
        })
        .collect();
    Ok(json!({"ip": ip, "activations": activations, "request_log": log}))
}

pub fn privacy_erase_ip(store: &mut Store, ip: &str) -> Result<Value> {
    let (activations, log_rows, keys) = store.erase_ip(ip)?;
    Ok(json!({"erased": {"activations": activations, "request_log_rows": log_rows, "keys": keys}}))
}

pub fn set_tenant_retention(store: &mut Store, tenant: i64, days: Option<u64>) -> Result<Value> {
    store.set_tenant_retention(tenant, days)?;
    Ok(json!({"tenant_id": tenant, "log_retention_days": days}))
}

pub fn list_audit(store: &mut Store, limit: i64) -> Result<Value> {
    let rows: Vec<Value> = store
        .audit_rows(limit)?
        .into_iter()
        .map(|a| {
            json!({"time": a.time, "actor": a.actor, "action": a.action, "entity": a.entity, "entity_id": a.entity_id})
        })
        .collect();
    Ok(json!({"audit": rows}))
}

pub fn list_log(store: &mut Store, product: Option<i64>, limit: i64) -> Result<Value> {
    let rows: Vec<Value> = store
        .log_rows(product, limit)?
        .into_iter()
        .map(|(id, l)| {
            json!({"id": id, "tenant_id": l.tenant_id, "product_id": l.product_id, "key_id": l.key_id,
                   "client_ip": &*l.client_ip, "proxy_ip": &*l.proxy_ip, "time": l.time, "machine_code": l.machine_code,
                   "friendly_name": l.friendly_name, "state": l.state, "floating_expires": l.floating_expires})
        })
        .collect();
    Ok(json!({"logs": rows}))
}

/// Distributed mode: what a privacy erasure removes from the activations held in Redis.
pub enum Erasure {
    Machine(String),
    Ip(String),
}

/// The CLI's connection to Redis (distributed mode), with the runtime it runs on.
fn connect_redis(
    cfg: &Config,
    url: &str,
) -> std::result::Result<(tokio::runtime::Runtime, crate::dist::Dist), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let ca = cfg.redis_ca().map_err(|e| e.to_string())?;
    let ring = cfg.keyring().map_err(|e| e.to_string())?;
    let d = rt
        .block_on(async {
            // Pub/sub pushes are not read here.
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            crate::dist::Dist::connect(url, cfg.redis.cluster, ca, cfg.redis.shards, tx).await
        })
        .map_err(|e| e.to_string())?
        .with_keyring(ring);
    Ok((rt, d))
}

/// Distributed mode, before an erasure: waits (up to 10 s) until the nodes have carried every
/// change stream into the main store, so the store knows every key that holds the machine or
/// address. False if they did not (no node running): the erasure then covers what the store
/// holds, and the caller says so.
pub fn wait_for_streams(cfg: &Config, url: &str) -> std::result::Result<bool, String> {
    let (rt, d) = connect_redis(cfg, url)?;
    rt.block_on(d.wait_drained(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())
}

/// After the store's erasure (`out`, which names the keys it touched), edits those keys'
/// snapshots in Redis by compare-and-set; nodes install the result like any change.
pub fn erase_in_redis(
    cfg: &Config,
    url: &str,
    what: &Erasure,
    out: &Value,
) -> std::result::Result<(), String> {
    let keys: Vec<i64> = out["erased"]["keys"]
        .as_array()
        .map(|k| k.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    if keys.is_empty() {
        return Ok(());
    }
    let (rt, d) = connect_redis(cfg, url)?;
    rt.block_on(async {
        for gid in keys {
            d.edit(gid, |machines| match what {
                Erasure::Machine(code) => {
                    let before = machines.len();
                    machines.retain(|m| &m.machine_code != code);
                    machines.len() != before
                }
                Erasure::Ip(ip) => {
                    let mut changed = false;
                    for m in machines.iter_mut().filter(|m| &m.ip == ip) {
                        m.ip.clear();
                        changed = true;
                    }
                    changed
                }
            })
            .await?;
        }
        Ok::<_, crate::dist::DistError>(())
    })
    .map_err(|e| e.to_string())
}

/// `keygate sync` (distributed mode): the main store's activations into Redis, for every
/// license Redis does not hold at that version or newer.
pub fn sync_redis(cfg: &Config, store: &mut Store) -> Result<Value> {
    let url = cfg
        .redis
        .url
        .clone()
        .ok_or_else(|| ControlError::Invalid("keygate sync needs redis.url".into()))?;
    let versions = store.shared_versions()?;
    let snaps: Vec<(i64, crate::dist::Snapshot)> = store
        .keys(None)?
        .into_iter()
        .map(|k| {
            let v = versions.get(&k.license.global_id).copied().unwrap_or(0);
            (
                k.license.global_id,
                crate::dist::Snapshot::of(&k.license, v),
            )
        })
        .collect();
    let (rt, d) = connect_redis(cfg, &url).map_err(ControlError::Invalid)?;
    let written = rt
        .block_on(d.restore(&snaps))
        .map_err(|e| ControlError::Invalid(e.to_string()))?;
    Ok(json!({"licenses": snaps.len(), "written": written}))
}
