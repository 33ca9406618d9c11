//! Every metric name Keygate emits, in one place, and the recorder behind `/metrics`. Labels
//! are low-cardinality by construction: fixed route names, result classes and outcomes, never
//! keys, tokens, machine codes or IPs. Without an installed recorder these calls are no-ops.

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::Duration;

pub const BUILD_INFO: &str = "keygate_build_info";
pub const REQUESTS_TOTAL: &str = "keygate_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "keygate_request_duration_seconds";
pub const SIGNING_DURATION_SECONDS: &str = "keygate_signing_duration_seconds";
pub const CONNECTIONS_OPEN: &str = "keygate_connections_open";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "keygate_connections_refused_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "keygate_tls_handshakes_total";
pub const PROXY_PROTOCOL_REFUSED_TOTAL: &str = "keygate_proxy_protocol_refused_total";
pub const TLS_RELOADS_TOTAL: &str = "keygate_tls_reloads_total";
pub const RESPONSE_CACHE_TOTAL: &str = "keygate_response_cache_total";
pub const RESPONSE_CACHE_EVICTIONS_TOTAL: &str = "keygate_response_cache_evictions_total";
pub const RETENTION_ANONYMISED_TOTAL: &str = "keygate_retention_rows_anonymised_total";
pub const INACTIVE_TENANTS_CLEANED_TOTAL: &str = "keygate_inactive_tenants_cleaned_total";
pub const INACTIVE_TENANT_ROWS_TOTAL: &str = "keygate_inactive_tenant_rows_cleaned_total";
pub const RATE_LIMITED_TOTAL: &str = "keygate_rate_limited_total";
pub const SYNC_CHANGES_APPLIED_TOTAL: &str = "keygate_sync_changes_applied_total";
pub const SYNC_FAILURES_TOTAL: &str = "keygate_sync_failures_total";
pub const SYNC_LAST_SUCCESS_SECONDS: &str = "keygate_sync_last_success_timestamp_seconds";
pub const LICENSES_LOADED: &str = "keygate_licenses_loaded";
pub const STORE_FLUSH_DURATION_SECONDS: &str = "keygate_store_flush_duration_seconds";
pub const STORE_FLUSH_FAILURES_TOTAL: &str = "keygate_store_flush_failures_total";
pub const LOG_ROWS_QUEUED_TOTAL: &str = "keygate_log_rows_queued_total";
pub const LOG_ROWS_WRITTEN_TOTAL: &str = "keygate_log_rows_written_total";
pub const LOG_ROWS_DROPPED_TOTAL: &str = "keygate_log_rows_dropped_total";
pub const STORE_EVENTS_WRITTEN_TOTAL: &str = "keygate_store_events_written_total";
pub const STORE_EVENTS_LOST_TOTAL: &str = "keygate_store_events_lost_total";
pub const WAL_SYNCS_TOTAL: &str = "keygate_activation_log_syncs_total";
pub const WAL_FAILURES_TOTAL: &str = "keygate_activation_log_failures_total";
pub const LOG_ROWS_SPOOLED_TOTAL: &str = "keygate_log_rows_spooled_total";
pub const LOG_ROWS_REPLAYED_TOTAL: &str = "keygate_log_rows_replayed_total";
pub const STORE_EVENTS_SPOOLED_TOTAL: &str = "keygate_store_events_spooled_total";
pub const SPOOL_BATCHES: &str = "keygate_spool_batches";
pub const STORE_WRITER_IDLE: &str = "keygate_store_writer_idle";
pub const STORE_WRITER_RAISED_TOTAL: &str = "keygate_store_writer_raised_total";
pub const STORE_UP: &str = "keygate_store_up";
pub const SHARED_CONFLICTS_TOTAL: &str = "keygate_redis_cas_conflicts_total";
pub const SHARED_UNAVAILABLE_TOTAL: &str = "keygate_redis_unavailable_total";
pub const SHARED_APPLIED_TOTAL: &str = "keygate_redis_snapshots_applied_total";
pub const SHARED_STORED_TOTAL: &str = "keygate_redis_stream_entries_stored_total";
pub const SHARED_REQUEUED_TOTAL: &str = "keygate_redis_stream_entries_requeued_total";
pub const REDIS_UP: &str = "keygate_redis_up";
pub const CONTROL_PROPAGATION_SECONDS: &str = "keygate_control_propagation_seconds";
pub const REDIS_CAS_DURATION_SECONDS: &str = "keygate_redis_cas_duration_seconds";

/// Histogram buckets in seconds: 50 µs (a cached answer) up to 10 s (a stalled store).
const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// Installs the process-wide Prometheus recorder, with real buckets for every `_seconds`
/// histogram, and records the build info.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// The route names of `keygate_requests_total` and `keygate_request_duration_seconds`.
pub const ROUTES: [&str; 6] = [
    "activate",
    "getkey",
    "deactivate",
    "createtrialkey",
    "getwebapilog",
    "other",
];

/// The per-request metrics, registered once per route: a registry lookup hashes the name and
/// labels, which on the re-activation path cost as much as the cache lookup.
pub struct RequestMetrics {
    ok: [Counter; ROUTES.len()],
    duration: [Histogram; ROUTES.len()],
    /// `keygate_signing_duration_seconds`, recorded on the signing threads.
    pub signing: Histogram,
}

impl RequestMetrics {
    /// Registers with the recorder installed now (a no-op set when there is none).
    pub fn new() -> RequestMetrics {
        RequestMetrics {
            ok: ROUTES.map(|m| metrics::counter!(REQUESTS_TOTAL, "method" => m, "result" => "ok")),
            duration: ROUTES.map(|m| metrics::histogram!(REQUEST_DURATION_SECONDS, "method" => m)),
            signing: metrics::histogram!(SIGNING_DURATION_SECONDS),
        }
    }

    /// One answered request: `route` indexes `ROUTES`, `result` is "ok" or an error class.
    pub fn record(&self, route: usize, result: &'static str, elapsed: Duration) {
        let route = route.min(ROUTES.len() - 1);
        if result == "ok" {
            self.ok[route].increment(1);
        } else {
            metrics::counter!(REQUESTS_TOTAL, "method" => ROUTES[route], "result" => result)
                .increment(1);
        }
        self.duration[route].record(elapsed.as_secs_f64());
    }
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics::new()
    }
}

/// A connection opened (+1) or closed (-1).
pub fn connections_open(delta: f64) {
    metrics::gauge!(CONNECTIONS_OPEN).increment(delta);
}

pub fn connection_refused() {
    metrics::counter!(CONNECTIONS_REFUSED_TOTAL).increment(1);
}

/// `outcome`: "full", "resumed", "failed" or "timeout".
pub fn tls_handshake(outcome: &'static str) {
    metrics::counter!(TLS_HANDSHAKES_TOTAL, "outcome" => outcome).increment(1);
}

/// `reason`: "untrusted_peer", "invalid_header" or "timeout".
pub fn proxy_protocol_refused(reason: &'static str) {
    metrics::counter!(PROXY_PROTOCOL_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// `result`: "ok" or "failed".
pub fn tls_reload(result: &'static str) {
    metrics::counter!(TLS_RELOADS_TOTAL, "result" => result).increment(1);
}

/// The signed-response cache's counters, registered once (it counts on every request): hits,
/// misses, and entries pushed out by the size bound before their TTL.
pub fn response_cache_handles() -> (Counter, Counter, Counter) {
    (
        metrics::counter!(RESPONSE_CACHE_TOTAL, "result" => "hit"),
        metrics::counter!(RESPONSE_CACHE_TOTAL, "result" => "miss"),
        metrics::counter!(RESPONSE_CACHE_EVICTIONS_TOTAL),
    )
}

pub fn retention_anonymised(rows: usize) {
    metrics::counter!(RETENTION_ANONYMISED_TOTAL).increment(rows as u64);
}

/// `limit`: "client_ip", "token" or "license_new_machines".
pub fn rate_limited(limit: &'static str) {
    metrics::counter!(RATE_LIMITED_TOTAL, "limit" => limit).increment(1);
}

/// One successful read of the change feed: how staleness is measured
/// (`time() - keygate_sync_last_success_timestamp_seconds`).
pub fn sync_polled(applied: usize, failed: usize, licenses: usize) {
    metrics::counter!(SYNC_CHANGES_APPLIED_TOTAL).increment(applied as u64);
    if failed > 0 {
        metrics::counter!(SYNC_FAILURES_TOTAL).increment(failed as u64);
    }
    metrics::gauge!(SYNC_LAST_SUCCESS_SECONDS).set(crate::http::unix_now() as f64);
    licenses_loaded(licenses);
}

pub fn sync_poll_failed() {
    metrics::counter!(SYNC_FAILURES_TOTAL).increment(1);
}

/// Distributed mode: a compare-and-set lost to another change (the request decides again).
pub fn shared_conflict() {
    metrics::counter!(SHARED_CONFLICTS_TOTAL).increment(1);
}

/// Distributed mode: a change refused because Redis did not answer.
pub fn shared_unavailable() {
    metrics::counter!(SHARED_UNAVAILABLE_TOTAL).increment(1);
}

/// Distributed mode: snapshots from other nodes installed here (`source`: pubsub, sync).
pub fn shared_applied(source: &'static str, n: usize) {
    metrics::counter!(SHARED_APPLIED_TOTAL, "source" => source).increment(n as u64);
}

/// Distributed mode: stream entries written to the main store by this node (of several
/// entries of one license in a pass, the newest).
pub fn shared_stored(n: usize) {
    metrics::counter!(SHARED_STORED_TOTAL).increment(n as u64);
}

/// Distributed mode: refused keys' newest stream entries appended again at the end of their
/// streams, so that a key the main store keeps refusing does not stop the streams' trimming.
pub fn shared_requeued(n: usize) {
    metrics::counter!(SHARED_REQUEUED_TOTAL).increment(n as u64);
}

/// Distributed mode: from a control-plane change's announcement (the CLI, through Redis) to
/// this node having applied it.
pub fn control_propagation(d: Duration) {
    metrics::histogram!(CONTROL_PROPAGATION_SECONDS).record(d.as_secs_f64());
}

/// Distributed mode: one compare-and-set round trip to Redis (`result`: ok, error).
pub fn redis_round_trip(d: Duration, ok: bool) {
    metrics::histogram!(REDIS_CAS_DURATION_SECONDS, "result" => if ok { "ok" } else { "error" })
        .record(d.as_secs_f64());
}

pub fn redis_up(up: bool) {
    metrics::gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

/// The inactive-tenant rule: tenants cleaned, and log rows deleted plus IPs blanked.
pub fn inactive_tenants_cleaned(tenants: usize, rows: usize) {
    metrics::counter!(INACTIVE_TENANTS_CLEANED_TOTAL).increment(tenants as u64);
    metrics::counter!(INACTIVE_TENANT_ROWS_TOTAL).increment(rows as u64);
}

pub fn licenses_loaded(n: usize) {
    metrics::gauge!(LICENSES_LOADED).set(n as f64);
}

pub fn store_flush(elapsed: Duration) {
    metrics::histogram!(STORE_FLUSH_DURATION_SECONDS).record(elapsed.as_secs_f64());
}

/// Copies the store writer's own counters into the registry. Called at scrape time, so the
/// request path only bumps an atomic.
pub fn writer_stats(s: &crate::store::writer::WriterStats) {
    use std::sync::atomic::Ordering::Relaxed;
    for (name, v) in [
        (LOG_ROWS_QUEUED_TOTAL, &s.log_queued),
        (LOG_ROWS_WRITTEN_TOTAL, &s.log_written),
        (LOG_ROWS_DROPPED_TOTAL, &s.log_dropped),
        (STORE_EVENTS_WRITTEN_TOTAL, &s.events_written),
        (STORE_EVENTS_LOST_TOTAL, &s.events_lost),
        (STORE_FLUSH_FAILURES_TOTAL, &s.failed_flushes),
        (LOG_ROWS_SPOOLED_TOTAL, &s.log_spooled),
        (LOG_ROWS_REPLAYED_TOTAL, &s.log_replayed),
        (STORE_EVENTS_SPOOLED_TOTAL, &s.events_spooled),
        (WAL_SYNCS_TOTAL, &s.wal_syncs),
        (WAL_FAILURES_TOTAL, &s.wal_failures),
        (STORE_WRITER_RAISED_TOTAL, &s.writer_raised),
    ] {
        metrics::counter!(name).absolute(v.load(Relaxed));
    }
    metrics::gauge!(SPOOL_BATCHES).set(s.spool_batches.load(Relaxed) as f64);
    metrics::gauge!(STORE_UP).set(if s.store_up.load(Relaxed) { 1.0 } else { 0.0 });
    let idle = s.writer_idle.load(Relaxed);
    metrics::gauge!(STORE_WRITER_IDLE).set(if idle { 1.0 } else { 0.0 });
}
