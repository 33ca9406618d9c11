//! Every metric name Keygate emits, in one place. The recorder and `/metrics` endpoint are set
//! up by the binary; without a recorder these calls are no-ops.

use std::time::Duration;

pub const REQUESTS_TOTAL: &str = "keygate_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "keygate_request_duration_seconds";
pub const SIGNATURES_TOTAL: &str = "keygate_signatures_total";
pub const STORE_FLUSH_DURATION_SECONDS: &str = "keygate_store_flush_duration_seconds";
pub const LOG_ROWS_WRITTEN_TOTAL: &str = "keygate_log_rows_written_total";
pub const LOG_ROWS_DROPPED_TOTAL: &str = "keygate_log_rows_dropped_total";
pub const STORE_EVENTS_WRITTEN_TOTAL: &str = "keygate_store_events_written_total";

/// One answered request: `method` is a fixed route name, `result` "ok" or an error class.
pub fn request(method: &'static str, result: &'static str, elapsed: Duration) {
    metrics::counter!(REQUESTS_TOTAL, "method" => method, "result" => result).increment(1);
    metrics::histogram!(REQUEST_DURATION_SECONDS, "method" => method).record(elapsed.as_secs_f64());
}

pub fn signature() {
    metrics::counter!(SIGNATURES_TOTAL).increment(1);
}

pub fn store_flush(elapsed: Duration, log_rows: usize, events: usize) {
    metrics::histogram!(STORE_FLUSH_DURATION_SECONDS).record(elapsed.as_secs_f64());
    metrics::counter!(LOG_ROWS_WRITTEN_TOTAL).increment(log_rows as u64);
    metrics::counter!(STORE_EVENTS_WRITTEN_TOTAL).increment(events as u64);
}

pub fn log_rows_dropped() {
    metrics::counter!(LOG_ROWS_DROPPED_TOTAL).increment(1);
}
