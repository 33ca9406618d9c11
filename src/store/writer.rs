//! The store writer: one thread that owns a SQLite connection and writes the node's activation
//! changes and request-log rows in batched transactions, off the request path.
//!
//! Activation changes travel on an unbounded channel: they are never dropped, and their volume
//! is bounded by seat counts and heartbeats. Log rows travel on a bounded channel; when it is
//! full the row is counted as dropped instead of stalling a request. A batch is written when it
//! holds `batch_rows` items or its oldest item is `flush_interval` old, and on shutdown.

use super::{LogRow, Store, StoreEvent};
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub batch_rows: usize,
    pub flush_interval: Duration,
    pub log_queue_rows: usize,
    /// Days after which request-log rows lose their personal fields (checked hourly), unless
    /// their tenant sets its own; `None` keeps them.
    pub retention_days: Option<u64>,
}

/// How often the writer applies the retention rule.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Counters for what passed through the writer.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub log_queued: AtomicU64,
    pub log_dropped: AtomicU64,
    pub log_written: AtomicU64,
    pub events_written: AtomicU64,
    /// Activation changes in a batch given up at shutdown: acknowledged but not stored.
    pub events_lost: AtomicU64,
    pub failed_flushes: AtomicU64,
    /// False from a failed batch write until the next one succeeds (readiness).
    pub healthy: AtomicBool,
}

enum Msg {
    Event(StoreEvent),
    /// Answered once everything sent before it is committed.
    Flush(Sender<()>),
    Stop,
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct WriterSender {
    events: Sender<Msg>,
    logs: Sender<LogRow>,
    stats: Arc<WriterStats>,
}

impl WriterSender {
    pub fn event(&self, e: StoreEvent) {
        // Only fails after shutdown, when nothing is accepted any more.
        let _ = self.events.send(Msg::Event(e));
    }

    pub fn log(&self, row: LogRow) {
        match self.logs.try_send(row) {
            Ok(()) => {
                self.stats.log_queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.log_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits (blocking) until everything sent so far is committed.
    pub fn flush_blocking(&self) {
        let (tx, rx) = bounded(1);
        if self.events.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

pub struct Writer {
    sender: WriterSender,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn spawn(store: Store, policy: BatchPolicy) -> Writer {
        let (etx, erx) = unbounded();
        let (ltx, lrx) = bounded(policy.log_queue_rows.max(1));
        let stats = Arc::new(WriterStats {
            healthy: AtomicBool::new(true),
            ..WriterStats::default()
        });
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("keygate-store-writer".into())
            .spawn(move || run(store, policy, erx, lrx, st))
            .expect("spawning the store writer thread");
        Writer {
            sender: WriterSender {
                events: etx,
                logs: ltx,
                stats,
            },
            thread: Some(thread),
        }
    }

    pub fn sender(&self) -> WriterSender {
        self.sender.clone()
    }

    /// Writes everything queued, then stops the thread.
    pub fn shutdown(mut self) {
        let _ = self.sender.events.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.sender.events.send(Msg::Stop);
            let _ = t.join();
        }
    }
}

struct Pending {
    events: Vec<StoreEvent>,
    logs: Vec<LogRow>,
    since: Option<Instant>,
    acks: Vec<Sender<()>>,
}

impl Pending {
    fn len(&self) -> usize {
        self.events.len() + self.logs.len()
    }
    fn touch(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }
}

fn run(
    mut store: Store,
    policy: BatchPolicy,
    events: Receiver<Msg>,
    logs: Receiver<LogRow>,
    stats: Arc<WriterStats>,
) {
    let mut p = Pending {
        events: Vec::new(),
        logs: Vec::new(),
        since: None,
        acks: Vec::new(),
    };
    let mut stopping = false;
    // Log rows are collected by polling on this tick, never by blocking on their channel, so
    // a request handler's `try_send` finds no sleeping receiver to wake: no futex wake and no
    // context switch per request. Events (activations, flush and stop requests) still wake
    // the thread at once.
    let tick = policy.flush_interval.min(Duration::from_millis(20));
    let mut retention_due = Instant::now();
    loop {
        if Instant::now() >= retention_due {
            retention_due = Instant::now() + RETENTION_EVERY;
            match store.apply_retention(policy.retention_days, crate::http::unix_now()) {
                Ok(n) => {
                    crate::metrics::retention_anonymised(n);
                    if n > 0 {
                        tracing::info!(rows = n, "request-log rows past retention anonymised");
                    }
                }
                Err(e) => tracing::error!(error = %e, "applying the retention rule failed"),
            }
        }
        let wait = match p.since {
            Some(t) => policy.flush_interval.saturating_sub(t.elapsed()).min(tick),
            None => tick,
        };
        match events.recv_timeout(wait) {
            Ok(Msg::Event(e)) => {
                p.events.push(e);
                p.touch();
            }
            Ok(Msg::Flush(ack)) => {
                p.acks.push(ack);
                p.touch();
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => stopping = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        // Everything sent before a Flush or Stop is already in the channel: drain all of it
        // then; otherwise up to a few batches' worth per pass.
        let cap = if p.acks.is_empty() && !stopping {
            policy.batch_rows * 4
        } else {
            usize::MAX
        };
        while p.logs.len() < cap {
            match logs.try_recv() {
                Ok(r) => {
                    p.logs.push(r);
                    p.touch();
                }
                Err(_) => break,
            }
        }
        if stopping {
            // Take everything still queued; new sends after Stop are not waited for.
            while let Ok(m) = events.try_recv() {
                match m {
                    Msg::Event(e) => p.events.push(e),
                    Msg::Flush(a) => p.acks.push(a),
                    Msg::Stop => {}
                }
            }
            while let Ok(r) = logs.try_recv() {
                p.logs.push(r);
            }
        }
        let due = p.len() >= policy.batch_rows
            || !p.acks.is_empty()
            || p.since
                .is_some_and(|t| t.elapsed() >= policy.flush_interval);
        if (due || stopping) && (p.len() > 0 || !p.acks.is_empty()) {
            flush(&mut store, &mut p, &stats, stopping);
        }
        if stopping {
            return;
        }
    }
}

/// Log rows per transaction. A batch is written in slices with a yield between them, so on a
/// node whose threads share one core a large batch never stalls request handling for long.
const SLICE_ROWS: usize = 256;

/// Commits the events with the first slice of rows, then the other slices. What is committed
/// leaves `p` at once, so a retry after a failure resumes where the writing stopped.
fn write_in_slices(
    store: &mut Store,
    p: &mut Pending,
    stats: &WriterStats,
) -> crate::store::Result<()> {
    loop {
        let n = p.logs.len().min(SLICE_ROWS);
        store.write_batch(&p.events, &p.logs[..n])?;
        stats
            .events_written
            .fetch_add(p.events.len() as u64, Ordering::Relaxed);
        stats.log_written.fetch_add(n as u64, Ordering::Relaxed);
        p.events.clear();
        p.logs.drain(..n);
        if p.logs.is_empty() {
            return Ok(());
        }
        std::thread::yield_now();
    }
}

fn flush(store: &mut Store, p: &mut Pending, stats: &WriterStats, stopping: bool) {
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        match write_in_slices(store, p, stats) {
            Ok(()) => {
                crate::metrics::store_flush(started.elapsed());
                stats.healthy.store(true, Ordering::Relaxed);
                p.since = None;
                for a in p.acks.drain(..) {
                    let _ = a.send(());
                }
                return;
            }
            Err(e) => {
                attempt += 1;
                stats.failed_flushes.fetch_add(1, Ordering::Relaxed);
                stats.healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, attempt, "store batch write failed; retrying");
                if stopping && attempt >= 5 {
                    tracing::error!(
                        events = p.events.len(),
                        logs = p.logs.len(),
                        "giving up on the last batch at shutdown"
                    );
                    stats
                        .log_dropped
                        .fetch_add(p.logs.len() as u64, Ordering::Relaxed);
                    stats
                        .events_lost
                        .fetch_add(p.events.len() as u64, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))));
            }
        }
    }
}
