//! The client methods. Each one authorizes, takes the license lock, lets `domain` decide,
//! applies and forwards the change, encodes under the lock and signs after releasing it.
//! This is the only place that sequences I/O for a request; it never awaits the main store
//! (CreateTrialKey, which creates a key, is the one documented exception).

use super::error::{ApiError, Failure};
use super::response_cache::{Probe, ProbeKey, Shape};
use super::Ctx;
use crate::dist::{Cas, Snapshot};
use crate::domain::{
    self, decide::Change, ActivateInput, ActivateOutcome, DeactivateOutcome, License, Machine,
    Mask, Method, Scope, StateCode, DAY_SECONDS,
};
use crate::request::{
    ActivateRequest, CreateTrialKeyRequest, DeactivateRequest, GetKeyRequest, ResponseOptions,
    WebApiLogRequest,
};
use crate::signing::Signer;
use crate::state::LicenseEntry;
use crate::store::writer::Durable;
use crate::store::{LogQuery, LogRow, NewKey, ProductRow, StoreEvent};
use crate::wire::{self, LicenseStatus, LicenseView, Metadata};
use bytes::Bytes;
use std::sync::Arc;

/// What the request log records about a call; filled in as the call learns it.
#[derive(Default)]
pub struct LogCtx {
    /// The call's time (Unix seconds), read once when it arrives: the decision, the
    /// activation it records and its log row all carry this one value.
    pub time: i64,
    pub tenant_id: Option<i64>,
    pub product_id: Option<i64>,
    pub key_id: Option<i64>,
    pub machine_code: String,
    pub friendly_name: String,
    pub floating_expires: i64,
}

impl LogCtx {
    /// A call arriving at `time`.
    pub fn at(time: i64) -> LogCtx {
        LogCtx {
            time,
            ..LogCtx::default()
        }
    }

    /// The addresses are shared (one allocation per connection, not two per row).
    pub fn row(self, client_ip: Arc<str>, proxy_ip: Arc<str>, state: StateCode) -> LogRow {
        LogRow {
            tenant_id: self.tenant_id,
            product_id: self.product_id,
            key_id: self.key_id,
            client_ip,
            proxy_ip,
            time: self.time,
            machine_code: self.machine_code,
            friendly_name: self.friendly_name,
            state: state.0,
            floating_expires: self.floating_expires,
        }
    }
}

pub type Outcome = Result<(Bytes, StateCode), Failure>;

/// Token, method and product checks, in the order Cryptolens reports them.
fn authorize(
    ctx: &Ctx,
    token: &str,
    method: Method,
    product_id: i64,
    log: &mut LogCtx,
) -> Result<(Arc<Scope>, Arc<ProductRow>), ApiError> {
    let scope = ctx.state.scope(token).ok_or(ApiError::Unauthenticated)?;
    log.tenant_id = Some(scope.tenant_id);
    ctx.rate_limits
        .token(scope.token_id)
        .map_err(|_| ApiError::RateLimited)?;
    scope
        .allows_method(method)
        .map_err(|_| ApiError::AccessDenied)?;
    let product = ctx
        .state
        .product(product_id)
        .filter(|p| p.tenant_id == scope.tenant_id)
        .ok_or(ApiError::ProductNotFound)?;
    scope
        .allows_product(product_id)
        .map_err(|_| ApiError::AccessDenied)?;
    Ok((scope, product))
}

/// The key check that follows `authorize` for the methods that name a key.
fn authorize_key(
    ctx: &Ctx,
    scope: &Scope,
    product_id: i64,
    key: &str,
    log: &mut LogCtx,
) -> Result<Arc<LicenseEntry>, ApiError> {
    let entry = ctx
        .state
        .license(product_id, key)
        .filter(|e| e.tenant_id == scope.tenant_id)
        .ok_or(ApiError::KeyNotFound)?;
    let key_id = entry.license.lock().id;
    log.key_id = Some(key_id);
    scope
        .allows_key(key_id)
        .map_err(|_| ApiError::AccessDenied)?;
    Ok(entry)
}

/// A request for a named key that passed every check, with what answering it needs.
struct Authorized {
    scope: Arc<Scope>,
    product: Arc<ProductRow>,
    entry: Arc<LicenseEntry>,
    signer: Arc<Signer>,
}

/// `authorize` and `authorize_key`, plus the tenant's signer: the common start of the methods
/// that answer with a signed license.
fn authorize_answer(
    ctx: &Ctx,
    token: &str,
    method: Method,
    product_id: i64,
    key: &str,
    log: &mut LogCtx,
) -> Result<Authorized, ApiError> {
    let (scope, product) = authorize(ctx, token, method, product_id, log)?;
    let entry = authorize_key(ctx, &scope, product_id, key, log)?;
    let signer = ctx
        .state
        .signer(scope.tenant_id)
        .ok_or(ApiError::Internal)?;
    Ok(Authorized {
        scope,
        product,
        entry,
        signer,
    })
}

/// The license JSON plus the metadata numbers, produced under the license lock.
struct Encoded {
    license_json: Vec<u8>,
    metadata: Option<Metadata>,
}

fn license_status(lic: &License, product: &ProductRow, now: i64) -> LicenseStatus {
    let has = |f: Option<u8>| f.is_some_and(|n| lic.features.get(n));
    let time_limited = has(product.time_limited_feature);
    let expired = time_limited && lic.expires < now;
    let reason = if lic.block {
        2
    } else if expired {
        1
    } else {
        0
    };
    LicenseStatus {
        is_valid: reason == 0,
        reason_for_invalidity: reason,
        trial: has(product.trial_feature),
        time_limited,
        time_left_days: if time_limited {
            ((lic.expires - now) / DAY_SECONDS).max(0)
        } else {
            0
        },
    }
}

fn metadata(lic: &License, product: &ProductRow, now: i64) -> Metadata {
    Metadata {
        activated_machines: lic.node_locked().count() as i64,
        status: license_status(lic, product, now),
        used_floating_machines: lic.active_floating(now).count() as i64,
    }
}

fn encode(
    lic: &License,
    product: &ProductRow,
    opts: &ResponseOptions,
    mask: Mask,
    caller: Option<&Machine>,
    now: i64,
) -> Encoded {
    let machines = lic.visible_machines(
        opts.model_version,
        caller,
        mask.hides(Mask::ACTIVATED_MACHINES),
        now,
    );
    let mut license_json = Vec::with_capacity(1024);
    wire::encode_license(
        &LicenseView {
            license: lic,
            machines: &machines,
            model_version: opts.model_version,
            mask,
            sign_date: now,
        },
        &mut license_json,
    );
    let metadata = opts.metadata.then(|| metadata(lic, product, now));
    Encoded {
        license_json,
        metadata,
    }
}

/// What a handler takes out of the license lock: a cached answer, or what to sign.
enum Prepared {
    Cached(Bytes),
    Sign(Encoded, Option<ProbeKey>),
}

/// Encodes under the license lock. A `cacheable` answer (one that changed nothing) is first
/// looked up by its `Shape` in the response cache, which costs no encoding.
#[allow(clippy::too_many_arguments)]
fn prepare(
    ctx: &Ctx,
    signer: &Arc<Signer>,
    lic: &License,
    product: &ProductRow,
    opts: &ResponseOptions,
    mask: Mask,
    caller: Option<&Machine>,
    now: i64,
    cacheable: bool,
) -> Prepared {
    if !(cacheable && ctx.responses.enabled()) {
        return Prepared::Sign(encode(lic, product, opts, mask, caller, now), None);
    }
    let probe = Probe::new(
        signer.clone(),
        Shape {
            license_global_id: lic.global_id,
            license_version: lic.version,
            caller: caller.map(|m| (m.machine_code.as_str(), m.is_floating())),
            model_version: opts.model_version,
            mask: mask.0,
            metadata: opts.metadata.then(|| metadata(lic, product, now)),
            running_leases: lic.active_floating(now).count(),
        },
    );
    match ctx.responses.get(&probe) {
        Some(body) => Prepared::Cached(body),
        None => Prepared::Sign(
            encode(lic, product, opts, mask, caller, now),
            Some(probe.to_key()),
        ),
    }
}

/// Signs on the signing pool (never on an async worker), builds the response body and
/// remembers it when it is cacheable.
async fn respond(
    ctx: &Ctx,
    signer: Arc<Signer>,
    prepared: Prepared,
    mask: Mask,
    now: i64,
) -> Result<Bytes, ApiError> {
    let (enc, probe) = match prepared {
        Prepared::Cached(body) => return Ok(body),
        Prepared::Sign(enc, probe) => (enc, probe),
    };
    let hide_metadata = mask.hides(Mask::METADATA);
    let signing = ctx.request_metrics.signing.clone();
    let body = ctx
        .sign_pool
        .run(move || -> Result<Vec<u8>, ApiError> {
            let started = std::time::Instant::now();
            let sig = signer
                .sign_sha256(&enc.license_json)
                .map_err(|_| ApiError::Internal)?;
            signing.record(started.elapsed().as_secs_f64());
            let md = match enc.metadata {
                Some(_) if hide_metadata => Some(b"null".to_vec()),
                Some(md) => {
                    let data = wire::metadata_data(&md);
                    let dsig = signer.sign_sha512(&data).map_err(|_| ApiError::Internal)?;
                    Some(wire::metadata_object(&md, &data, &dsig, now))
                }
                None => None,
            };
            Ok(wire::license_response(
                &enc.license_json,
                &sig,
                md.as_deref(),
            ))
        })
        .await
        .map_err(|_| ApiError::Internal)??;
    let body = Bytes::from(body);
    if let Some(probe) = probe {
        ctx.responses.insert(probe, body.clone());
    }
    Ok(body)
}

pub async fn activate(
    ctx: &Ctx,
    r: ActivateRequest,
    client_ip: &str,
    proxy_ip: &Arc<str>,
    log: &mut LogCtx,
) -> Outcome {
    log.product_id = Some(r.product_id);
    let outcome = activate_decided(ctx, &r, client_ip, proxy_ip, log).await;
    // Moved, not copied: the request is done with them.
    log.machine_code = r.machine_code;
    log.friendly_name = r.friendly_name;
    outcome
}

async fn activate_decided(
    ctx: &Ctx,
    r: &ActivateRequest,
    client_ip: &str,
    proxy_ip: &Arc<str>,
    log: &mut LogCtx,
) -> Outcome {
    let fail = |e: ApiError| Failure::new(e, StateCode::ACTIVATE_FAILED);
    let Authorized {
        scope,
        product,
        entry,
        signer,
    } = authorize_answer(ctx, &r.token, Method::Activate, r.product_id, &r.key, log)
        .map_err(fail)?;
    let now = log.time;
    let input = ActivateInput {
        machine_code: &r.machine_code,
        friendly_name: &r.friendly_name,
        floating_interval: r.floating_interval,
        max_overdraft: r.max_overdraft,
        ip: client_ip,
        proxy_ip,
        now,
    };
    let mask = scope.mask(r.options.fields_to_return);
    /// What one decision under the lock leads to.
    enum Step {
        /// Answered (single node, or nothing to commit).
        Done(Prepared, StateCode, Durable),
        /// Refused; in distributed mode for a limit, checked against Redis first.
        Refused(domain::decide::Reject),
        /// Distributed mode: become this license's writer on this node, then decide again.
        NeedWriter,
        /// Distributed mode: commit this snapshot, decided from version `expected`.
        Commit(StateCode, Change, Snapshot, u64),
    }
    // A license's global id never changes: read once, not under the lock on every attempt.
    let gid = entry.license.lock().global_id;
    let mut attempt = 0u32;
    let mut writer: Option<tokio::sync::MutexGuard<'_, ()>> = None;
    // The new-machine rate limit is charged once per request, however often it decides.
    let mut charged = false;
    // Distributed mode: a limit refusal is checked once against Redis, since a seat freed on
    // another node may not have reached this node's memory yet.
    let mut refreshed = false;
    let (prepared, code, durable) = loop {
        attempt += 1;
        // Decide under the lock. On one node the change is applied at once; in distributed
        // mode it is first committed in Redis (compare-and-set), after the lock is released,
        // by the one writer of this license on this node.
        let step = {
            let mut lic = entry.license.lock();
            match domain::activate(&lic, &input) {
                ActivateOutcome::Rejected(rj) => Step::Refused(rj),
                ActivateOutcome::Accepted { code, change } => {
                    if let (false, Change::Upsert(m) | Change::UpsertWithExpiry(m, _)) =
                        (charged, &change)
                    {
                        let known = lic.machines.iter().any(|x| {
                            x.machine_code == m.machine_code && x.is_floating() == m.is_floating()
                        });
                        if !known {
                            charged = true;
                            ctx.rate_limits.new_machine(lic.global_id).map_err(|_| {
                                Failure::new(ApiError::RateLimited, StateCode::ACTIVATE_FAILED)
                            })?;
                        }
                    }
                    let writes = matches!(change, Change::Upsert(_) | Change::UpsertWithExpiry(..));
                    if ctx.dist.is_some() && writes {
                        if writer.is_none() {
                            Step::NeedWriter
                        } else {
                            let next = Snapshot::after(&lic, &change, now);
                            Step::Commit(code, change, next, lic.shared_version)
                        }
                    } else {
                        lic.apply(&change, now);
                        // Forwarded under the lock, so the store sees one license's changes in
                        // order. (Distributed mode: nothing to store for a non-writing answer.)
                        // Its sync starts at once and runs while the answer waits for its
                        // signature.
                        let sent = match ctx.dist {
                            Some(_) => Durable::ready(),
                            None => ctx
                                .writer
                                .changes(store_events(&change, lic.global_id, now)),
                        };
                        // Also an answer that changed nothing waits for this license's
                        // latest change to be synced: it shows that change.
                        let durable = entry.fence(sent);
                        let prepared =
                            answer(ctx, &lic, &change, r, &product, &signer, mask, now, log);
                        Step::Done(prepared, code, durable)
                    }
                }
            }
        };
        match step {
            Step::Done(prepared, code, durable) => break (prepared, code, durable),
            Step::Refused(rj) => {
                let limit = !matches!(rj, domain::decide::Reject::Blocked);
                match &ctx.dist {
                    Some(dist) if limit && !refreshed => {
                        refreshed = true;
                        match dist.fetch(&[gid]).await {
                            Ok(mut snaps) => {
                                if let Some(Some(snap)) = snaps.pop() {
                                    snap.install(&mut entry.license.lock());
                                }
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "redis unreachable: refusal not rechecked");
                            }
                        }
                        return Err(Failure::new(rj.into(), rj.code()));
                    }
                    _ => return Err(Failure::new(rj.into(), rj.code())),
                }
            }
            Step::NeedWriter => {
                writer = Some(entry.writer.lock().await);
                attempt = 0;
            }
            Step::Commit(code, change, next, expected) => {
                match commit_shared(ctx, &entry, gid, expected, next, attempt).await {
                    Ok(Some(())) => {
                        let lic = entry.license.lock();
                        let prepared =
                            answer(ctx, &lic, &change, r, &product, &signer, mask, now, log);
                        break (prepared, code, Durable::ready());
                    }
                    Ok(None) => {}
                    Err(e) => return Err(fail(e)),
                }
            }
        }
    };
    drop(writer);
    // Signing and the activation log's sync run at the same time; the answer waits for both.
    // The sync is awaited only after the signature, so an acknowledgement that arrives while
    // the signature is still being made wakes nothing.
    let body = respond(ctx, signer, prepared, mask, now).await;
    durable.wait().await;
    Ok((body.map_err(fail)?, code))
}

/// How often a change is decided again after losing a compare-and-set race in Redis (to
/// other nodes: on one node, one writer per license at a time).
const MAX_SHARED_ATTEMPTS: u32 = 64;

/// Distributed mode: commits a decided snapshot in Redis. `Some(())`: committed and installed
/// here; `None`: another node (or request) changed the license first, its state is now
/// installed here, decide again.
async fn commit_shared(
    ctx: &Ctx,
    entry: &LicenseEntry,
    gid: i64,
    expected: u64,
    next: Snapshot,
    attempt: u32,
) -> Result<Option<()>, ApiError> {
    let dist = ctx.dist.as_ref().ok_or(ApiError::Internal)?;
    match dist.cas(gid, expected, &next).await {
        Ok(Cas::Done(v)) => {
            Snapshot { version: v, ..next }.install_owned(&mut entry.license.lock());
            Ok(Some(()))
        }
        Ok(Cas::Conflict(theirs)) => {
            tracing::debug!(
                gid,
                expected,
                theirs = theirs.version,
                attempt,
                "compare-and-set conflict"
            );
            {
                let mut lic = entry.license.lock();
                if theirs.version < lic.shared_version {
                    // Redis lost this license (flushed or restored from an older copy): the
                    // next attempt writes this node's state back, on top of what Redis holds.
                    lic.shared_version = theirs.version;
                } else {
                    theirs.install(&mut lic);
                }
            }
            crate::metrics::shared_conflict();
            if attempt >= MAX_SHARED_ATTEMPTS {
                tracing::error!(gid, "gave up after {attempt} compare-and-set conflicts");
                return Err(ApiError::Internal);
            }
            // No back-off: the conflict reply carries the winner's state, so the next attempt
            // is as fresh as it can be, and waiting would only hand the race to the others.
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "redis unreachable: change refused");
            crate::metrics::shared_unavailable();
            Err(ApiError::Unavailable)
        }
    }
}

/// The store events of one activation change (single-node mode).
fn store_events(change: &Change, gid: i64, now: i64) -> Vec<StoreEvent> {
    match change {
        Change::Upsert(m) if m.is_floating() => vec![
            StoreEvent::FloatingExpired {
                key_global_id: gid,
                now,
            },
            StoreEvent::MachineUpsert {
                key_global_id: gid,
                machine: m.clone(),
            },
        ],
        Change::Upsert(m) => vec![StoreEvent::MachineUpsert {
            key_global_id: gid,
            machine: m.clone(),
        }],
        Change::UpsertWithExpiry(m, e) => vec![
            StoreEvent::MachineUpsert {
                key_global_id: gid,
                machine: m.clone(),
            },
            StoreEvent::ExpiresSet {
                key_global_id: gid,
                expires: *e,
            },
        ],
        Change::None | Change::Transient(_) => Vec::new(),
    }
}

/// The answer to an Activate, prepared under the license lock once its change is in place.
#[allow(clippy::too_many_arguments)]
fn answer(
    ctx: &Ctx,
    lic: &License,
    change: &Change,
    r: &ActivateRequest,
    product: &ProductRow,
    signer: &Arc<Signer>,
    mask: Mask,
    now: i64,
    log: &mut LogCtx,
) -> Prepared {
    let floating = r.floating_interval > 0;
    let caller = match change {
        Change::Transient(m) => Some(m),
        _ => lic
            .machines
            .iter()
            .find(|m| m.is_floating() == floating && m.machine_code == r.machine_code),
    };
    log.floating_expires = caller.as_ref().map_or(0, |m| m.floating_expires);
    let cacheable = *change == Change::None;
    prepare(
        ctx, signer, lic, product, &r.options, mask, caller, now, cacheable,
    )
}

pub async fn get_key(ctx: &Ctx, r: GetKeyRequest, log: &mut LogCtx) -> Outcome {
    let fail = |e: ApiError| Failure::new(e, StateCode::GETKEY_FAILED);
    log.product_id = Some(r.product_id);
    let Authorized {
        scope,
        product,
        entry,
        signer,
    } = authorize_answer(ctx, &r.token, Method::GetKey, r.product_id, &r.key, log).map_err(fail)?;
    let now = log.time;
    let mask = scope.mask(r.options.fields_to_return);
    let (prepared, durable) = {
        let lic = entry.license.lock();
        let prepared = prepare(
            ctx, &signer, &lic, &product, &r.options, mask, None, now, true,
        );
        (prepared, entry.fence(Durable::ready()))
    };
    let body = respond(ctx, signer, prepared, mask, now)
        .await
        .map_err(fail)?;
    durable.wait().await;
    Ok((body, StateCode::GETKEY_OK))
}

pub async fn deactivate(ctx: &Ctx, r: DeactivateRequest, log: &mut LogCtx) -> Outcome {
    let fail = |e: ApiError| Failure::new(e, StateCode::DEACTIVATE_FAILED);
    log.product_id = Some(r.product_id);
    log.machine_code.clone_from(&r.machine_code);
    let (scope, _) =
        authorize(ctx, &r.token, Method::Deactivate, r.product_id, log).map_err(fail)?;
    let entry = authorize_key(ctx, &scope, r.product_id, &r.key, log).map_err(fail)?;
    let gid = entry.license.lock().global_id;
    let mut attempt = 0u32;
    // Distributed mode: one writer of this license per node (see `LicenseEntry::writer`).
    let _writer = match ctx.dist {
        Some(_) => Some(entry.writer.lock().await),
        None => None,
    };
    // Distributed mode: "never activated" is checked once against Redis, since an activation
    // on another node may not have reached this node's memory yet.
    let mut refreshed = ctx.dist.is_none();
    let (code, durable) = loop {
        attempt += 1;
        let decided = {
            let mut lic = entry.license.lock();
            let outcome = domain::deactivate(&lic, &r.machine_code, r.floating);
            let code = outcome.code();
            match outcome {
                DeactivateOutcome::Blocked => return Err(Failure::new(ApiError::Blocked, code)),
                DeactivateOutcome::NotActivated if refreshed => {
                    return Err(Failure::new(ApiError::NotActivated, code))
                }
                DeactivateOutcome::NotActivated => None,
                DeactivateOutcome::FloatingReleased { removed: false } => {
                    break (code, entry.fence(Durable::ready()))
                }
                DeactivateOutcome::Removed
                | DeactivateOutcome::FloatingReleased { removed: true } => {
                    if ctx.dist.is_some() {
                        let mut next = lic.clone();
                        next.remove_machine(&r.machine_code, r.floating);
                        Some((code, Snapshot::of(&next, 0), lic.shared_version))
                    } else {
                        lic.remove_machine(&r.machine_code, r.floating);
                        let sent = ctx.writer.changes(vec![StoreEvent::MachineRemove {
                            key_global_id: lic.global_id,
                            machine_code: r.machine_code.clone(),
                            floating: r.floating,
                        }]);
                        break (code, entry.fence(sent));
                    }
                }
            }
        };
        let Some((code, next, expected)) = decided else {
            refreshed = true;
            if let Some(dist) = &ctx.dist {
                if let Ok(mut snaps) = dist.fetch(&[gid]).await {
                    if let Some(Some(snap)) = snaps.pop() {
                        snap.install(&mut entry.license.lock());
                    }
                }
            }
            continue;
        };
        match commit_shared(ctx, &entry, gid, expected, next, attempt).await {
            Ok(Some(())) => break (code, Durable::ready()),
            Ok(None) => continue,
            Err(e) => return Err(fail(e)),
        }
    };
    durable.wait().await;
    Ok((wire::ok_response().into(), code))
}

/// GetWebAPILog: one page of the calling tenant's request log. Like CreateTrialKey it reads
/// the main store (the log lives only there), on the blocking pool through its own
/// connection; rows reach the store within a flush interval of their request.
pub async fn get_web_api_log(ctx: &Ctx, r: WebApiLogRequest, log: &mut LogCtx) -> Outcome {
    let fail = |e: ApiError| Failure::new(e, StateCode::OTHER_FAILED);
    let scope = match r.product_id {
        Some(p) => {
            authorize(ctx, &r.token, Method::GetWebApiLog, p, log)
                .map_err(fail)?
                .0
        }
        None => {
            let scope = ctx
                .state
                .scope(&r.token)
                .ok_or(fail(ApiError::Unauthenticated))?;
            log.tenant_id = Some(scope.tenant_id);
            ctx.rate_limits
                .token(scope.token_id)
                .map_err(|_| fail(ApiError::RateLimited))?;
            scope
                .allows_method(Method::GetWebApiLog)
                .map_err(|_| fail(ApiError::AccessDenied))?;
            scope
        }
    };
    // A product-locked token reads only its product; a key-locked one only its key, and a
    // token locked to -1 must name the key.
    let product_id = r.product_id.or(scope.product_lock);
    let key_id = match (&r.key, r.product_id) {
        (Some(k), Some(p)) => Some(
            authorize_key(ctx, &scope, p, k, log)
                .map_err(fail)?
                .license
                .lock()
                .id,
        ),
        _ => match scope.key_lock {
            Some(-1) => return Err(fail(ApiError::BadInput)),
            other => other,
        },
    };
    // A read of the log is logged under its tenant only (no product, no key), so reads never
    // show in a product's or a key's own log.
    log.key_id = None;
    let query = LogQuery {
        tenant_id: scope.tenant_id,
        product_id,
        key_id,
        filter: r.filter,
    };
    let store = ctx.log_store.clone();
    let entries = tokio::task::spawn_blocking(move || {
        let mut s = store.lock();
        s.reconnect_if_broken()?;
        s.web_api_log(&query)
    })
    .await
    .map_err(|_| fail(ApiError::Internal))?
    .map_err(|e| {
        tracing::error!(error = %e, "reading the request log failed");
        fail(ApiError::Internal)
    })?;
    let view: Vec<wire::WebApiLogEntry<'_>> = entries
        .iter()
        .map(|e| wire::WebApiLogEntry {
            id: e.id,
            product_id: e.row.product_id,
            key: e.key.as_deref(),
            ip: &e.row.client_ip,
            time: e.row.time,
            state: e.row.state,
            machine_code: &e.row.machine_code,
            friendly_name: &e.row.friendly_name,
            floating_expires: e.row.floating_expires,
        })
        .collect();
    Ok((
        wire::web_api_log_response(&view).into(),
        StateCode::LOG_READ_OK,
    ))
}

/// Trial length when the token's feature lock does not set one.
pub const DEFAULT_TRIAL_DAYS: i64 = 15;
/// CreateTrialKey's documented machine-code limit.
pub const MAX_TRIAL_MACHINE_CODE: usize = 128;

pub async fn create_trial_key(
    ctx: &Arc<Ctx>,
    r: CreateTrialKeyRequest,
    client_ip: &str,
    proxy_ip: &Arc<str>,
    log: &mut LogCtx,
) -> Outcome {
    let fail = |e: ApiError| Failure::new(e, StateCode::TRIAL_FAILED);
    log.product_id = Some(r.product_id);
    log.machine_code.clone_from(&r.machine_code);
    log.friendly_name.clone_from(&r.friendly_name);
    let (scope, product) =
        authorize(ctx, &r.token, Method::CreateTrialKey, r.product_id, log).map_err(fail)?;
    if r.machine_code.is_empty() {
        return Err(fail(ApiError::TrialMachineNull));
    }
    if r.machine_code.chars().count() > MAX_TRIAL_MACHINE_CODE {
        return Err(fail(ApiError::TrialMachineTooLong));
    }
    // One creation at a time per node, so two calls for one machine cannot make two keys.
    let _guard = ctx.trial_lock.lock().await;
    if let Some(e) = ctx.state.trial_key(r.product_id, &r.machine_code) {
        let lic = e.license.lock();
        log.key_id = Some(lic.id);
        if lic.block {
            return Err(fail(ApiError::TrialAlreadyUsed));
        }
        return Ok((wire::key_response(&lic.key).into(), StateCode::TRIAL_REUSED));
    }
    let now = log.time;
    let days = if scope.feature_lock > 0 {
        scope.feature_lock
    } else {
        DEFAULT_TRIAL_DAYS
    };
    let mut features = domain::Features::default();
    for f in [product.trial_feature, product.time_limited_feature]
        .into_iter()
        .flatten()
    {
        features = features.with(f, true);
    }
    let new = NewKey {
        product_id: r.product_id,
        key: crate::control::random_key_string(),
        created: now,
        expires: now + days * DAY_SECONDS,
        period: days,
        features,
        max_no_of_machines: 1,
        trial_machine_code: Some(r.machine_code.clone()),
        machines: vec![Machine {
            machine_code: r.machine_code.clone(),
            kind: domain::MachineKind::NodeLocked,
            ip: client_ip.to_owned(),
            proxy_ip: proxy_ip.clone(),
            time: now,
            friendly_name: r.friendly_name.clone(),
            floating_expires: 0,
        }],
        ..NewKey::default()
    };
    let store = ctx.control_store.clone();
    let row = tokio::task::spawn_blocking(move || {
        let mut s = store.lock();
        // The one request-path write: after a store restart its connection is new.
        s.reconnect_if_broken()?;
        let (_, gid) = s.create_key(&new)?;
        s.key(gid)
    })
    .await
    .map_err(|_| fail(ApiError::Internal))?
    .map_err(|e| {
        tracing::error!(error = %e, "creating a trial key failed");
        fail(ApiError::Internal)
    })?;
    log.key_id = Some(row.license.id);
    let key = row.license.key.clone();
    ctx.state.put_key(row, true);
    Ok((wire::key_response(&key).into(), StateCode::TRIAL_CREATED))
}
