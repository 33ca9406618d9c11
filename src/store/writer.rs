//! The store writer: one thread that owns a main-store connection and writes the node's
//! activation changes and request-log rows in batched transactions, off the request path.
//!
//! Activation changes travel on an unbounded channel: they are never dropped, and their volume
//! is bounded by seat counts and heartbeats. Log rows travel on a bounded channel; when it is
//! full the row is counted as dropped instead of stalling a request. A batch is written when it
//! holds `batch_rows` items or `batch_bytes` of row text, or its oldest item is
//! `flush_interval` old, and on shutdown.
//!
//! When the store refuses a batch (down, unreachable, failing), the batch goes to the node's
//! spool (`journal`) on local disk instead, and so does every later batch until the spool is
//! replayed, oldest first, so the store receives everything in order. Each transaction carries
//! a `BatchId` the store records, so a retry or replay of a batch it already committed is
//! skipped: every row arrives exactly once.

use super::journal::{Batch, Journal};
use super::wal::Wal;
use super::{BatchId, LogRow, Store, StoreEvent};
use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub batch_rows: usize,
    /// ...or when its log rows hold about this many bytes (long friendly names).
    pub batch_bytes: usize,
    pub flush_interval: Duration,
    pub log_queue_rows: usize,
    /// Days after which request-log rows lose their personal fields (checked hourly), unless
    /// their tenant sets its own; `None` keeps them.
    pub retention_days: Option<u64>,
    /// The inactive-tenant rule (`Store::clean_inactive_tenants`); `None`: off.
    pub inactive_tenant_days: Option<u64>,
    /// Run the writer under Linux `SCHED_IDLE` while it keeps up (`Priority`).
    pub idle_priority: bool,
}

/// Makes the store's commits durable and then lets the activation log delete what they
/// cover: on SQLite a commit survives a power loss only after a checkpoint, and until then the
/// log's copy is what would bring it back.
fn make_durable(store: &mut Store, stats: &WriterStats) {
    let committed = stats.committed_wal_seq.load(Ordering::Relaxed);
    if committed <= stats.safe_wal_seq.load(Ordering::Relaxed) {
        return;
    }
    match store.make_durable() {
        Ok(true) => {
            stats.safe_wal_seq.fetch_max(committed, Ordering::Relaxed);
        }
        // Readers held the checkpoint back: the activation log asks again.
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "making the store's commits durable failed"),
    }
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
    /// Rows and changes written to the local spool while the store refused them, and how many
    /// of those the store has since taken back.
    pub log_spooled: AtomicU64,
    pub log_replayed: AtomicU64,
    pub events_spooled: AtomicU64,
    /// Batches in the spool now.
    pub spool_batches: AtomicU64,
    /// False while batches reach neither the store nor the spool (readiness): a store outage
    /// alone does not make the node unready, since the spool takes its writes.
    pub healthy: AtomicBool,
    /// False from a failed store write until the next one succeeds.
    pub store_up: AtomicBool,
    /// The highest activation-log number whose changes are durably in the store or the
    /// spool: segments up to it can go.
    pub safe_wal_seq: AtomicU64,
    /// The highest one committed to the store, durable or not yet (SQLite: until its next
    /// checkpoint).
    pub committed_wal_seq: AtomicU64,
    /// Set by the activation log when full segments wait for `committed_wal_seq` to become
    /// safe; the writer then makes its commits durable (`Store::make_durable`).
    pub wal_wants_durable: AtomicBool,
    /// Change groups the activation log could not write (disk full, I/O error): answered, but
    /// without crash durability.
    pub wal_failures: AtomicU64,
    /// False from a failed activation-log write until the next one succeeds (readiness). Kept
    /// apart from `healthy`, which the writer's next successful flush sets again.
    pub wal_healthy: AtomicBool,
    /// Syncs of the activation log (each covers every group waiting at the time).
    pub wal_syncs: AtomicU64,
    /// The writer thread's id, so that its real policy can be read from `/proc` (tests).
    pub writer_tid: AtomicU64,
    /// Whether the writer runs under `SCHED_IDLE` now (`keygate_store_writer_idle`).
    pub writer_idle: AtomicBool,
    /// Times it left `SCHED_IDLE` because work piled up or someone waited for a flush.
    pub writer_raised: AtomicU64,
    /// The writer thread (`pthread_t`), when it last passed the top of its loop (`now_ms`),
    /// how long it may go without one under `SCHED_IDLE` (its flush interval), when the rows
    /// it holds are due to be written (`u64::MAX`: none held), and whether a request handler
    /// raised it since (`nudge_if_starved`).
    writer_pthread: AtomicU64,
    writer_pass_ms: AtomicU64,
    starved_after_ms: AtomicU64,
    flush_due_ms: AtomicU64,
    raised_from_outside: AtomicBool,
}

/// How late a flush may be before a handler raises the idle writer: a wake-up under
/// `SCHED_IDLE` on a busy core is late by a few milliseconds without anything being wrong.
const OVERDUE_MS: u64 = 20;

/// Milliseconds since the first call in this process: a clock the handlers and the writer
/// share through atomics.
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl WriterStats {
    /// Called by request handlers while the writer is under `SCHED_IDLE`: if the rows it holds
    /// are overdue, or it has not come round its loop (to collect new ones) for a flush
    /// interval, something else is keeping its core busy and it would wait for a sliver of
    /// time (about a second) to notice; the handler raises it to the normal policy instead,
    /// once, and the writer flushes at once and stays raised until it has (`Priority::follow`).
    /// So rows wait about a flush interval at most, as without `SCHED_IDLE`, and a `kill -9`
    /// loses no more.
    fn nudge_if_starved(&self) {
        let now = now_ms();
        let pass = self.writer_pass_ms.load(Ordering::Relaxed);
        let due = self.flush_due_ms.load(Ordering::Relaxed);
        let overdue = now > due.saturating_add(OVERDUE_MS);
        let starved =
            overdue || now.saturating_sub(pass) > self.starved_after_ms.load(Ordering::Relaxed);
        if starved && !self.raised_from_outside.swap(true, Ordering::Relaxed) {
            let thread = self.writer_pthread.load(Ordering::Relaxed);
            if let Err(e) = crate::sched::set_thread(thread, crate::sched::Policy::Other) {
                tracing::warn!(error = ?e, "could not raise the starved store writer");
            }
        }
    }

    /// `groups` change groups the activation log did not make crash-safe: counted, and the
    /// node unready until the log writes again.
    fn wal_failed(&self, groups: usize) {
        self.wal_failures
            .fetch_add(groups as u64, Ordering::Relaxed);
        self.wal_healthy.store(false, Ordering::Relaxed);
    }
}

enum Msg {
    /// A group of changes and its activation-log number, if the log is on.
    Events(Vec<StoreEvent>, Option<u64>),
    /// Answered once everything sent before it is committed.
    Flush(Sender<()>),
    Stop,
}

/// What the activation-log thread is sent.
enum WalMsg {
    /// A group of changes and its acknowledgement.
    Events(Vec<StoreEvent>, Ack),
    Flush(Sender<()>),
    Stop,
}

/// A group's acknowledgement, shared by every answer that has to wait for it.
#[derive(Default)]
struct Synced {
    done: AtomicBool,
    notify: tokio::sync::Notify,
}

/// The activation log's end of a `Synced`: set when dropped, so a group that can no longer be
/// written (the log stopped) releases its waiters, as a closed channel would.
struct Ack(Arc<Synced>);

impl Drop for Ack {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct WriterSender {
    events: Sender<Msg>,
    /// The activation log, when on: changes go through it to `events`.
    wal: Option<Sender<WalMsg>>,
    logs: Sender<LogRow>,
    stats: Arc<WriterStats>,
}

/// Resolves once a group of changes is on local disk (at once without the activation log).
/// Clones wait for the same group: every answer that shows the change waits for it
/// (`LicenseEntry::fence`).
#[derive(Clone)]
pub struct Durable(Option<Arc<Synced>>);

impl Durable {
    /// Nothing to wait for.
    pub fn ready() -> Durable {
        Durable(None)
    }

    /// Whether this stands for a group of changes (synced or not).
    pub fn is_group(&self) -> bool {
        self.0.is_some()
    }

    /// Whether there is nothing (more) to wait for.
    pub fn is_done(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|s| s.done.load(Ordering::Acquire))
    }

    pub async fn wait(&self) {
        let Some(synced) = &self.0 else {
            return;
        };
        loop {
            let notified = synced.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a sync between the two is not missed.
            notified.as_mut().enable();
            if synced.done.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl WriterSender {
    /// Sends one request's activation changes, in order. Call under the license lock (so the
    /// store sees one license's changes in order) and await the result after releasing it.
    /// The activation log syncs at once, with every group that arrived meanwhile, so a sync
    /// runs while the answer is being signed.
    pub fn changes(&self, events: Vec<StoreEvent>) -> Durable {
        if events.is_empty() {
            return Durable(None);
        }
        match &self.wal {
            Some(wal) => {
                let synced = Arc::new(Synced::default());
                if let Err(e) = wal.send(WalMsg::Events(events, Ack(synced.clone()))) {
                    // The activation log's thread is gone (stopped, or died): the group goes
                    // straight to the writer instead of being dropped. After shutdown the
                    // writer is gone too.
                    forward_unsynced(e.into_inner(), &self.events, &self.stats);
                }
                Durable(Some(synced))
            }
            None => {
                let _ = self.events.send(Msg::Events(events, None));
                Durable(None)
            }
        }
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
        if self.stats.writer_idle.load(Ordering::Relaxed) {
            self.stats.nudge_if_starved();
        }
    }

    /// What a handler's `log` does for an idle writer, without a row: raises it if it is
    /// starved (`WriterStats::nudge_if_starved`). The server calls it four times per flush
    /// interval, so a writer starved while no requests come (another process busy on its
    /// core) is raised as soon as it would be under load.
    pub fn nudge(&self) {
        if self.stats.writer_idle.load(Ordering::Relaxed) {
            self.stats.nudge_if_starved();
        }
    }

    /// Waits (blocking) until everything sent so far is committed.
    pub fn flush_blocking(&self) {
        let (tx, rx) = bounded(1);
        let sent = match &self.wal {
            // Through the log thread, behind the changes it still holds.
            Some(wal) => wal.send(WalMsg::Flush(tx)).is_ok(),
            None => self.events.send(Msg::Flush(tx)).is_ok(),
        };
        if sent {
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
    wal_thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// `wal`, when given, makes every activation change durable before it is acknowledged.
    pub fn spawn(store: Store, journal: Journal, wal: Option<Wal>, policy: BatchPolicy) -> Writer {
        let (etx, erx) = unbounded();
        let node = wal.as_ref().map(|w| w.node);
        let (ltx, lrx) = bounded(policy.log_queue_rows.max(1));
        let stats = Arc::new(WriterStats {
            healthy: AtomicBool::new(true),
            store_up: AtomicBool::new(true),
            wal_healthy: AtomicBool::new(true),
            ..WriterStats::default()
        });
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("keygate-store-writer".into())
            .spawn(move || {
                let sink = Sink::new(store, journal, node, &st);
                run(sink, policy, erx, lrx, st)
            })
            .expect("spawning the store writer thread");
        let (wal_tx, wal_thread) = match wal {
            Some(wal) => {
                let (tx, rx) = unbounded();
                let (etx, st) = (etx.clone(), stats.clone());
                let t = std::thread::Builder::new()
                    .name("keygate-wal".into())
                    .spawn(move || run_wal(wal, rx, etx, st))
                    .expect("spawning the activation-log thread");
                (Some(tx), Some(t))
            }
            None => (None, None),
        };
        Writer {
            sender: WriterSender {
                events: etx,
                wal: wal_tx,
                logs: ltx,
                stats,
            },
            thread: Some(thread),
            wal_thread,
        }
    }

    pub fn sender(&self) -> WriterSender {
        self.sender.clone()
    }

    /// Writes everything queued, then stops the threads: the activation log first (it hands
    /// the writer what it holds), then the writer.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.wal_thread.take() {
            if let Some(wal) = &self.sender.wal {
                let _ = wal.send(WalMsg::Stop);
            }
            let _ = t.join();
        }
        if let Some(t) = self.thread.take() {
            let _ = self.sender.events.send(Msg::Stop);
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The activation-log thread: appends every group waiting for it with one sync (group
/// commit: the groups that arrive during a sync share the next one), forwards them to the
/// writer and answers the handlers; deletes what the writer made safe.
fn run_wal(mut wal: Wal, rx: Receiver<WalMsg>, writer: Sender<Msg>, stats: Arc<WriterStats>) {
    let _leftovers = Leftovers {
        rx: &rx,
        writer: &writer,
        stats: &stats,
    };
    let mut stopping = false;
    let mut disconnected = false;
    while !stopping && !disconnected {
        // Groups, with flushes kept in place among them, in arrival order.
        let mut held: Vec<WalMsg> = Vec::new();
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => held.push(m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => disconnected = true,
        }
        while held.len() < 4096 {
            match rx.try_recv() {
                Ok(m) => held.push(m),
                Err(_) => break,
            }
        }
        if !held.is_empty() {
            stopping = sync_held(&mut wal, held, &writer, &stats);
        }
        // Also when idle: segments become safe when the writer's commits are durable.
        if let Err(e) = wal.collect(stats.safe_wal_seq.load(Ordering::Relaxed)) {
            tracing::warn!(error = %e, "deleting old activation-log segments failed");
        }
        if wal.waiting_for(stats.committed_wal_seq.load(Ordering::Relaxed)) {
            stats.wal_wants_durable.store(true, Ordering::Relaxed);
        }
    }
}

/// Groups taken from the channel and not yet forwarded. Dropped with groups still in it (the
/// activation-log thread panicking), it forwards them to the writer unsynced, so that a
/// change already answered for, or about to be, still reaches the store.
struct Held<'a> {
    msgs: Vec<WalMsg>,
    writer: &'a Sender<Msg>,
    stats: &'a WriterStats,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for m in self.msgs.drain(..) {
            forward_unsynced(m, self.writer, self.stats);
        }
    }
}

/// Hands a message to the writer without the activation log: a group as not crash-safe (no
/// sequence number), counted as a log failure as after a failed write (which also makes the
/// node unready), its `Ack` released once it is on its way.
fn forward_unsynced(m: WalMsg, writer: &Sender<Msg>, stats: &WriterStats) {
    match m {
        WalMsg::Events(events, _ack) => {
            stats.wal_failed(1);
            let _ = writer.send(Msg::Events(events, None));
        }
        WalMsg::Flush(ack) => {
            let _ = writer.send(Msg::Flush(ack));
        }
        WalMsg::Stop => {}
    }
}

/// Owned by the activation-log thread: when it ends, by a stop or a panic, whatever is still
/// queued for it goes to the writer instead of being dropped with the channel.
struct Leftovers<'a> {
    rx: &'a Receiver<WalMsg>,
    writer: &'a Sender<Msg>,
    stats: &'a WriterStats,
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        for m in self.rx.try_iter() {
            forward_unsynced(m, self.writer, self.stats);
        }
    }
}

/// Appends `held`'s groups with one sync, forwards them (and flushes) to the writer in order,
/// and acknowledges them. Returns whether a stop was among them.
fn sync_held(wal: &mut Wal, held: Vec<WalMsg>, writer: &Sender<Msg>, stats: &WriterStats) -> bool {
    let mut held = Held {
        msgs: held,
        writer,
        stats,
    };
    let groups: Vec<&[StoreEvent]> = held
        .msgs
        .iter()
        .filter_map(|m| match m {
            WalMsg::Events(e, _) => Some(e.as_slice()),
            _ => None,
        })
        .collect();
    let seqs = if groups.is_empty() {
        Vec::new()
    } else {
        stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
        match wal.append(&groups) {
            Ok(s) => {
                stats.wal_healthy.store(true, Ordering::Relaxed);
                s
            }
            Err(e) => {
                stats.wal_failed(groups.len());
                tracing::error!(error = %e, "activation log write failed; changes are not crash-safe");
                Vec::new()
            }
        }
    };
    let mut seqs = seqs.into_iter();
    let mut stopping = false;
    for m in std::mem::take(&mut held.msgs) {
        match m {
            WalMsg::Events(events, ack) => {
                let _ = writer.send(Msg::Events(events, seqs.next()));
                drop(ack);
            }
            WalMsg::Flush(ack) => {
                let _ = writer.send(Msg::Flush(ack));
            }
            WalMsg::Stop => stopping = true,
        }
    }
    stopping
}

struct Pending {
    events: Vec<StoreEvent>,
    /// The highest activation-log number among `events`.
    wal_seq: Option<u64>,
    /// About how many bytes `logs` holds (reset when a flush empties it).
    log_bytes: usize,
    logs: Vec<LogRow>,
    since: Option<Instant>,
    acks: Vec<Sender<()>>,
    /// The id and row count of a slice whose write failed: the store may have committed it
    /// anyway (a connection lost at COMMIT), so it must keep that id when spooled.
    failed_slice: Option<(BatchId, usize)>,
}

impl Pending {
    fn push_log(&mut self, row: LogRow) {
        self.log_bytes += row_bytes(&row);
        self.logs.push(row);
    }

    fn take(&mut self, events: Vec<StoreEvent>, seq: Option<u64>) {
        self.events.extend(events);
        if seq.is_some() {
            self.wal_seq = seq;
        }
    }

    fn len(&self) -> usize {
        self.events.len() + self.logs.len()
    }
    fn touch(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }
}

/// Where batches go: the store, or the spool while the store refuses them.
struct Sink {
    store: Store,
    journal: Journal,
    /// This process's batch ids: a random node number and a counter.
    node: i64,
    next_batch: i64,
    /// No store attempt before this instant after a failure (the spool takes batches).
    retry_at: Option<Instant>,
    /// This node's key in `node_progress`, when the activation log is on.
    wal_node: Option<i64>,
}

/// How long the writer leaves a failing store alone before trying it again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

impl Sink {
    fn new(store: Store, journal: Journal, wal_node: Option<i64>, stats: &WriterStats) -> Sink {
        let mut node = [0u8; 8];
        aws_lc_rs::rand::fill(&mut node).expect("system randomness");
        stats
            .spool_batches
            .store(journal.len() as u64, Ordering::Relaxed);
        Sink {
            store,
            journal,
            // Positive, so it reads the same in every tool.
            node: i64::from_le_bytes(node) & i64::MAX,
            next_batch: 1,
            retry_at: None,
            wal_node,
        }
    }

    fn next_id(&mut self) -> BatchId {
        let id = BatchId {
            node: self.node,
            batch: self.next_batch,
        };
        self.next_batch += 1;
        id
    }

    fn store_paused(&self) -> bool {
        self.retry_at.is_some_and(|t| Instant::now() < t)
    }

    fn failed(&mut self, e: &super::StoreError, stats: &WriterStats) {
        stats.failed_flushes.fetch_add(1, Ordering::Relaxed);
        stats.store_up.store(false, Ordering::Relaxed);
        tracing::error!(error = %e, spooled_batches = self.journal.len(), "store write failed; spooling to local disk");
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
        if let Err(e) = self.store.reconnect_if_broken() {
            tracing::warn!(error = %e, "main store still unreachable");
        }
    }

    /// Replays spooled batches, oldest first, while the store takes them. True when the spool
    /// is empty afterwards.
    fn replay(&mut self, stats: &WriterStats) -> bool {
        while !self.journal.is_empty() {
            if self.store_paused() {
                return false;
            }
            let batch = match self.journal.front() {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "a spooled batch cannot be read; replay stopped");
                    self.retry_at = Some(Instant::now() + Duration::from_secs(60));
                    return false;
                }
                None => break,
            };
            match self.store.write_batch_once(
                Some(batch.id),
                self.wal_node.zip(batch.wal_seq),
                &batch.events,
                &batch.logs,
            ) {
                Ok(fresh) => {
                    if fresh {
                        stats
                            .log_replayed
                            .fetch_add(batch.logs.len() as u64, Ordering::Relaxed);
                        stats
                            .log_written
                            .fetch_add(batch.logs.len() as u64, Ordering::Relaxed);
                        stats
                            .events_written
                            .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
                    }
                    // The file goes only once the store's copy survives a power loss; until
                    // then a replay of it is skipped by its id.
                    match self.store.make_durable() {
                        Ok(true) => {}
                        Ok(false) => {
                            self.retry_at = Some(Instant::now() + RETRY_AFTER);
                            return false;
                        }
                        Err(e) => {
                            self.failed(&e, stats);
                            return false;
                        }
                    }
                    if let Err(e) = self.journal.pop_front() {
                        // The store has it; replaying it again later is skipped by its id.
                        tracing::error!(error = %e, "cannot delete a replayed batch file");
                        self.retry_at = Some(Instant::now() + RETRY_AFTER);
                        return false;
                    }
                    stats
                        .spool_batches
                        .store(self.journal.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.failed(&e, stats);
                    return false;
                }
            }
        }
        self.retry_at = None;
        stats.store_up.store(true, Ordering::Relaxed);
        true
    }
}

/// Change groups waiting in the channel that count as falling behind.
const GROUPS_BEHIND: usize = 256;

/// Whether the writer should run under `SCHED_IDLE` now: not while someone waits for a flush
/// or once two batches' rows (or `GROUPS_BEHIND` change groups) wait; again once less than one
/// batch and half as many groups do. In between it keeps its current policy, so it does not
/// switch at every pass around one threshold.
fn wants_idle(was_idle: bool, rows: usize, groups: usize, waited_on: bool, batch: usize) -> bool {
    if waited_on || rows >= 2 * batch || groups >= GROUPS_BEHIND {
        false
    } else if rows < batch && groups < GROUPS_BEHIND / 2 {
        true
    } else {
        was_idle
    }
}

/// The writer thread's CPU priority (`store.writer_idle_priority`, Linux). While it keeps up,
/// it runs under `SCHED_IDLE`: on a core it shares with the async workers, a worker woken by a
/// request preempts it at once, instead of waiting out the time slice of a transaction in
/// progress (a 256-row slice takes about a millisecond). Its stretches of work then add
/// nothing to the answers' latency. When work piles up (`wants_idle`) it returns to
/// `SCHED_OTHER` and takes its fair share until it has caught up: requests that keep the core
/// busy leave it a sliver of the CPU under `SCHED_IDLE`, enough to notice its backlog.
/// Only used where the thread can leave `SCHED_IDLE` again (`sched::can_leave_idle`).
struct Priority {
    enabled: bool,
    idle: bool,
    warned: bool,
}

impl Priority {
    fn start(wanted: bool, flush_interval: Duration, stats: &WriterStats) -> Priority {
        let tid = crate::sched::current_tid().unwrap_or(0);
        stats.writer_tid.store(tid, Ordering::Relaxed);
        stats
            .writer_pthread
            .store(crate::sched::current_thread(), Ordering::Relaxed);
        stats
            .starved_after_ms
            .store(flush_interval.as_millis().max(1) as u64, Ordering::Relaxed);
        stats.writer_pass_ms.store(now_ms(), Ordering::Relaxed);
        stats.flush_due_ms.store(u64::MAX, Ordering::Relaxed);
        let enabled = wanted && crate::sched::can_leave_idle();
        if wanted && !enabled {
            tracing::info!(
                "the store writer keeps the normal priority: leaving SCHED_IDLE again needs \
                 CAP_SYS_NICE or an RLIMIT_NICE of 20 (store.writer_idle_priority)"
            );
        }
        Priority {
            enabled,
            idle: false,
            warned: false,
        }
    }

    /// Sets the policy for this pass; returns whether a handler raised the writer since the
    /// last one (`nudge_if_starved`): it then flushes now, and keeps the normal policy for
    /// this pass, since under `SCHED_IDLE` the flush's own wake-ups would starve as well.
    fn follow(
        &mut self,
        rows: usize,
        groups: usize,
        waited_on: bool,
        batch: usize,
        stats: &WriterStats,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        stats.writer_pass_ms.store(now_ms(), Ordering::Relaxed);
        // A raise noted while idle is made sure of by the switch below (the handler's own call
        // may have failed, or not have landed yet): `wants_idle` says no while nudged.
        let mut nudged = stats.raised_from_outside.swap(false, Ordering::Relaxed) && self.idle;
        let idle = wants_idle(self.idle, rows, groups, waited_on || nudged, batch);
        if idle != self.idle {
            self.switch(idle, stats);
        }
        // A handler that still saw the writer idle may have raised it between the swap above
        // and the switch: its flag would otherwise hold off every later raise until the
        // writer's next pass, which under SCHED_IDLE on a busy core is a second away.
        if self.idle && stats.raised_from_outside.swap(false, Ordering::Relaxed) {
            self.switch(false, stats);
            nudged = true;
        }
        nudged
    }

    fn switch(&mut self, idle: bool, stats: &WriterStats) {
        use crate::sched::Policy;
        match crate::sched::set_current(if idle { Policy::Idle } else { Policy::Other }) {
            Ok(()) => {
                self.idle = idle;
                stats.writer_idle.store(idle, Ordering::Relaxed);
                if !idle {
                    stats.writer_raised.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Could not idle: stay normal for good.
            Err(e) if idle => {
                tracing::warn!(error = ?e, "could not put the store writer under SCHED_IDLE");
                self.enabled = false;
            }
            // Could not leave SCHED_IDLE (the probe said it could): tried again on every pass,
            // said once.
            Err(e) => {
                if !self.warned {
                    tracing::error!(error = ?e, "could not raise the store writer from SCHED_IDLE");
                    self.warned = true;
                }
            }
        }
    }

    /// Tells the handlers when the rows held now are due (`nudge_if_starved`).
    fn publish_due(&self, since: Option<Instant>, interval: Duration, stats: &WriterStats) {
        if self.enabled {
            let due = since.map_or(u64::MAX, |t| {
                now_ms().saturating_sub(t.elapsed().as_millis() as u64)
                    + interval.as_millis() as u64
            });
            stats.flush_due_ms.store(due, Ordering::Relaxed);
        }
    }
}

fn run(
    mut sink: Sink,
    policy: BatchPolicy,
    events: Receiver<Msg>,
    logs: Receiver<LogRow>,
    stats: Arc<WriterStats>,
) {
    let mut p = Pending {
        events: Vec::new(),
        wal_seq: None,
        log_bytes: 0,
        logs: Vec::new(),
        since: None,
        acks: Vec::new(),
        failed_slice: None,
    };
    let mut stopping = false;
    // Log rows are collected by polling on this tick, never by blocking on their channel, so
    // a request handler's `try_send` finds no sleeping receiver to wake: no futex wake and no
    // context switch per request. Events (activations, flush and stop requests) still wake
    // the thread at once.
    let tick = policy.flush_interval.min(Duration::from_millis(20));
    let mut retention_due = Instant::now();
    let mut priority = Priority::start(policy.idle_priority, policy.flush_interval, &stats);
    loop {
        if stats.wal_wants_durable.swap(false, Ordering::Relaxed) {
            make_durable(&mut sink.store, &stats);
        }
        // A handler raised the writer: it flushes on this pass.
        let mut nudged = false;
        if Instant::now() >= retention_due {
            retention_due = Instant::now() + RETENTION_EVERY;
            // Raised for it: its updates hold the store's write lock, which others wait for.
            nudged = priority.follow(0, 0, true, policy.batch_rows, &stats);
            retention(
                &mut sink.store,
                policy.retention_days,
                policy.inactive_tenant_days,
            );
        }
        // Behind (a full batch already waiting): no pause, so the writer keeps up with
        // whatever rate the store can take.
        let wait = if logs.len() >= policy.batch_rows {
            Duration::ZERO
        } else {
            match p.since {
                Some(t) => policy.flush_interval.saturating_sub(t.elapsed()).min(tick),
                None => tick,
            }
        };
        match events.recv_timeout(wait) {
            Ok(Msg::Events(e, seq)) => {
                p.take(e, seq);
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
            (policy.batch_rows * 4).max(slice_rows(&sink.store))
        } else {
            usize::MAX
        };
        while p.logs.len() < cap {
            match logs.try_recv() {
                Ok(r) => {
                    p.push_log(r);
                    p.touch();
                }
                Err(_) => break,
            }
        }
        if stopping {
            // Take everything still queued; new sends after Stop are not waited for.
            while let Ok(m) = events.try_recv() {
                match m {
                    Msg::Events(e, seq) => p.take(e, seq),
                    Msg::Flush(a) => p.acks.push(a),
                    Msg::Stop => {}
                }
            }
            while let Ok(r) = logs.try_recv() {
                p.push_log(r);
            }
        }
        // A spool to replay counts as a backlog: the replay runs through it in one go.
        nudged |= priority.follow(
            logs.len() + p.len(),
            events.len(),
            nudged || !p.acks.is_empty() || stopping || !sink.journal.is_empty(),
            policy.batch_rows,
            &stats,
        );
        let due = nudged
            || p.len() >= policy.batch_rows
            || p.log_bytes >= policy.batch_bytes
            || !p.acks.is_empty()
            || p.since
                .is_some_and(|t| t.elapsed() >= policy.flush_interval);
        if (due || stopping) && (p.len() > 0 || !p.acks.is_empty()) {
            // While the flush runs (PostgreSQL round trips, slices with yields between them)
            // its rows are not late: only a flush that takes a whole interval is.
            priority.publish_due(Some(Instant::now()), policy.flush_interval, &stats);
            flush(&mut sink, &mut p, &stats, stopping);
        } else if !sink.journal.is_empty() {
            sink.replay(&stats);
        }
        priority.publish_due(p.since, policy.flush_interval, &stats);
        if stopping {
            // No handler raises a thread that is gone, even if the last raise failed.
            stats.writer_idle.store(false, Ordering::Relaxed);
            return;
        }
    }
}

fn retention(store: &mut Store, days: Option<u64>, inactive_days: Option<u64>) {
    let now = crate::http::unix_now();
    if let Some(d) = inactive_days {
        match store.clean_inactive_tenants(d, now) {
            Ok((0, _, _)) => {}
            Ok((tenants, rows, ips)) => {
                crate::metrics::inactive_tenants_cleaned(tenants, rows + ips);
                tracing::info!(tenants, rows, ips, "inactive tenants cleaned up");
            }
            Err(e) => tracing::error!(error = %e, "the inactive-tenant rule failed"),
        }
    }
    match store.apply_retention(days, now) {
        Ok(n) => {
            crate::metrics::retention_anonymised(n);
            if n > 0 {
                tracing::info!(rows = n, "request-log rows past retention anonymised");
            }
        }
        Err(e) => tracing::error!(error = %e, "applying the retention rule failed"),
    }
    // Batch ids guard against retries and replays; a month covers any spool left behind.
    if let Err(e) = store.prune_ingested_batches(now - 30 * 86_400) {
        tracing::error!(error = %e, "pruning old batch ids failed");
    }
}

/// A log row's size for the byte threshold: its text plus the fixed columns.
fn row_bytes(r: &LogRow) -> usize {
    r.client_ip.len() + r.proxy_ip.len() + r.machine_code.len() + r.friendly_name.len() + 48
}

/// Log rows per transaction. A batch is written in slices with a yield between them, so on a
/// node whose threads share one core a large batch never stalls request handling for long.
/// PostgreSQL runs elsewhere and takes a COPY of thousands of rows in milliseconds, so its
/// slices are larger.
fn slice_rows(store: &Store) -> usize {
    match store.engine() {
        super::db::Engine::Sqlite => 256,
        super::db::Engine::Postgres => 8192,
    }
}

/// Commits the events with the first slice of rows, then the other slices, each in its own
/// transaction with its own batch id. What is committed leaves `p` at once, so what is left
/// after a failure is exactly what the store does not have.
fn write_in_slices(
    sink: &mut Sink,
    p: &mut Pending,
    stats: &WriterStats,
) -> crate::store::Result<()> {
    let slice = slice_rows(&sink.store);
    loop {
        // A slice that failed before is retried as it was, under the same id.
        let (id, n) = match p.failed_slice {
            Some((id, n)) => (id, n.min(p.logs.len())),
            None => (sink.next_id(), p.logs.len().min(slice)),
        };
        p.failed_slice = Some((id, n));
        let progress = sink.wal_node.zip(p.wal_seq);
        sink.store
            .write_batch_once(Some(id), progress, &p.events, &p.logs[..n])?;
        p.failed_slice = None;
        if let Some(seq) = p.wal_seq.take() {
            stats.committed_wal_seq.fetch_max(seq, Ordering::Relaxed);
        }
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

/// Writes what is pending to the store, or, when the store refuses it or older batches wait
/// in the spool, to the spool. Flush requests are answered once the batch is in one of them.
fn flush(sink: &mut Sink, p: &mut Pending, stats: &WriterStats, stopping: bool) {
    let started = Instant::now();
    if sink.replay(stats) {
        match write_in_slices(sink, p, stats) {
            Ok(()) => {
                crate::metrics::store_flush(started.elapsed());
                stats.store_up.store(true, Ordering::Relaxed);
                stats.healthy.store(true, Ordering::Relaxed);
            }
            Err(e) => sink.failed(&e, stats),
        }
    }
    if p.len() > 0 {
        spool(sink, p, stats, stopping);
    }
    if p.len() == 0 {
        p.since = None;
        p.log_bytes = 0;
        for a in p.acks.drain(..) {
            let _ = a.send(());
        }
    }
}

/// Puts what is pending into the spool. If even the local disk refuses it, the batch stays in
/// memory and is tried again on the next pass; at shutdown it is counted as lost.
fn spool(sink: &mut Sink, p: &mut Pending, stats: &WriterStats, stopping: bool) {
    if let Some((id, n)) = p.failed_slice.take() {
        // The slice that failed keeps its id, so its replay is skipped if it did commit.
        let rest = p.logs.split_off(n.min(p.logs.len()));
        spool_batch(sink, p, id, stats, stopping);
        if p.len() > 0 {
            // The disk refused it: keep the rest behind it, in order.
            p.logs.extend(rest);
            return;
        }
        p.logs = rest;
        if p.logs.is_empty() {
            return;
        }
    }
    let id = sink.next_id();
    spool_batch(sink, p, id, stats, stopping);
}

fn spool_batch(sink: &mut Sink, p: &mut Pending, id: BatchId, stats: &WriterStats, stopping: bool) {
    let batch = Batch {
        id,
        wal_seq: p.wal_seq.take(),
        events: std::mem::take(&mut p.events),
        logs: std::mem::take(&mut p.logs),
    };
    match sink.journal.append(&batch) {
        Ok(()) => {
            stats.healthy.store(true, Ordering::Relaxed);
            if let Some(seq) = batch.wal_seq {
                // On local disk now, synced: the activation log may let go of it.
                stats.safe_wal_seq.fetch_max(seq, Ordering::Relaxed);
            }
            stats
                .log_spooled
                .fetch_add(batch.logs.len() as u64, Ordering::Relaxed);
            stats
                .events_spooled
                .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
            stats
                .spool_batches
                .store(sink.journal.len() as u64, Ordering::Relaxed);
        }
        Err(e) if stopping => {
            stats.healthy.store(false, Ordering::Relaxed);
            tracing::error!(error = %e, events = batch.events.len(), logs = batch.logs.len(),
                "neither the store nor the spool took the last batch at shutdown");
            stats
                .log_dropped
                .fetch_add(batch.logs.len() as u64, Ordering::Relaxed);
            stats
                .events_lost
                .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        }
        Err(e) => {
            stats.healthy.store(false, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot write to the spool; keeping the batch in memory");
            p.events = batch.events;
            p.logs = batch.logs;
            p.wal_seq = batch.wal_seq;
            p.failed_slice = Some((id, p.logs.len()));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wal::tests::{segment_count, store_with_a_key, upsert};

    /// Group commit: the groups waiting when the log thread looks are appended with one sync,
    /// acknowledged, and forwarded to the writer in order, flushes kept in place.
    #[test]
    fn waiting_groups_share_one_sync_in_order() {
        let (dir, mut store, gid) = store_with_a_key("wal-group");
        let (wal, _) = Wal::open_and_replay(&dir.join("wal"), &mut store).unwrap();
        let (tx, rx) = unbounded();
        let (etx, erx) = unbounded();
        let stats = Arc::new(WriterStats::default());
        let synced: Vec<Arc<Synced>> = (0..20).map(|_| Arc::default()).collect();
        for (i, s) in synced.iter().enumerate() {
            let group = vec![upsert(gid, &format!("g{i}"))];
            tx.send(WalMsg::Events(group, Ack(s.clone()))).unwrap();
        }
        let (ftx, _frx) = bounded(1);
        tx.send(WalMsg::Flush(ftx)).unwrap();
        tx.send(WalMsg::Stop).unwrap();
        run_wal(wal, rx, etx, stats.clone());
        assert_eq!(
            stats.wal_syncs.load(Ordering::Relaxed),
            1,
            "one sync for 20 groups"
        );
        assert!(synced.iter().all(|s| s.done.load(Ordering::Acquire)));
        let forwarded: Vec<Msg> = erx.try_iter().collect();
        assert_eq!(forwarded.len(), 21);
        for (i, m) in forwarded[..20].iter().enumerate() {
            match m {
                Msg::Events(events, seq) => {
                    assert_eq!(*seq, Some(i as u64 + 1));
                    assert_eq!(events, &vec![upsert(gid, &format!("g{i}"))]);
                }
                _ => panic!("group {i} out of place"),
            }
        }
        assert!(
            matches!(forwarded[20], Msg::Flush(_)),
            "the flush after them"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The groups an activation-log thread would drop by dying (held mid-sync, or still
    /// queued) and the changes sent after it is gone all reach the writer, unsynced, in
    /// order, and release their waiters.
    #[test]
    fn without_the_activation_log_thread_changes_still_reach_the_writer() {
        let gid = 7;
        let (etx, erx) = unbounded();
        let forwarded = |erx: &Receiver<Msg>| -> Vec<String> {
            erx.try_iter()
                .map(|m| match m {
                    Msg::Events(events, None) => match &events[..] {
                        [StoreEvent::MachineUpsert { machine, .. }] => machine.machine_code.clone(),
                        _ => panic!("one upsert per group"),
                    },
                    _ => panic!("an unsynced group expected"),
                })
                .collect()
        };
        let group = |name: &str| -> (Arc<Synced>, WalMsg) {
            let s = Arc::new(Synced::default());
            (s.clone(), WalMsg::Events(vec![upsert(gid, name)], Ack(s)))
        };

        // Held mid-sync when the thread panics.
        let (s1, m1) = group("held-1");
        let (s2, m2) = group("held-2");
        let stats = WriterStats {
            wal_healthy: AtomicBool::new(true),
            ..WriterStats::default()
        };
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = Held {
                msgs: vec![m1, m2],
                writer: &etx,
                stats: &stats,
            };
            panic!("the activation log's thread dies");
        }));
        assert!(unwound.is_err());
        assert_eq!(forwarded(&erx), ["held-1", "held-2"]);
        assert!(s1.done.load(Ordering::Acquire) && s2.done.load(Ordering::Acquire));
        assert_eq!(stats.wal_failures.load(Ordering::Relaxed), 2);
        assert!(!stats.wal_healthy.load(Ordering::Relaxed));

        // Still queued when it ends.
        let (tx, rx) = unbounded();
        let (s3, m3) = group("queued");
        tx.send(m3).unwrap();
        drop(Leftovers {
            rx: &rx,
            writer: &etx,
            stats: &stats,
        });
        assert_eq!(forwarded(&erx), ["queued"]);
        assert!(s3.done.load(Ordering::Acquire));
        assert_eq!(stats.wal_failures.load(Ordering::Relaxed), 3);

        // Sent after it is gone.
        drop(rx);
        let (ltx, _lrx) = bounded(1);
        let sender = WriterSender {
            events: etx,
            wal: Some(tx),
            logs: ltx,
            stats: Arc::new(WriterStats {
                wal_healthy: AtomicBool::new(true),
                ..WriterStats::default()
            }),
        };
        let durable = sender.changes(vec![upsert(gid, "late")]);
        assert!(durable.is_done(), "its waiters are released");
        assert_eq!(forwarded(&erx), ["late"]);
        assert_eq!(sender.stats.wal_failures.load(Ordering::Relaxed), 1);
        assert!(
            !sender.stats.wal_healthy.load(Ordering::Relaxed),
            "the node turns unready"
        );
    }

    /// Small batches flushed often, so that the tests' few changes reach the store quickly.
    fn small_batches() -> BatchPolicy {
        BatchPolicy {
            batch_rows: 100,
            batch_bytes: 1 << 20,
            flush_interval: Duration::from_millis(20),
            log_queue_rows: 100,
            retention_days: None,
            inactive_tenant_days: None,
            idle_priority: false,
        }
    }

    /// The writer idles while it keeps up, is raised from two batches or a waiting flush on,
    /// and in between keeps what it has.
    #[test]
    fn the_writer_idles_only_while_it_keeps_up() {
        let b = 100;
        for (was_idle, rows, groups, waited_on, idle) in [
            (false, 0, 0, false, true),
            (true, 99, 127, false, true),
            (false, 150, 0, false, false),
            (true, 150, 0, false, true),
            (true, 199, 0, false, true),
            (true, 200, 0, false, false),
            (false, 0, 200, false, false),
            (true, 0, 200, false, true),
            (true, 0, GROUPS_BEHIND, false, false),
            (true, 0, 0, true, false),
        ] {
            assert_eq!(
                wants_idle(was_idle, rows, groups, waited_on, b),
                idle,
                "was idle {was_idle}, {rows} rows, {groups} groups, waited on {waited_on}"
            );
        }
    }

    /// A pile of rows raises the writer from `SCHED_IDLE` (the thread's real policy, read
    /// from /proc); it writes every row and returns to `SCHED_IDLE` once caught up. Where the
    /// thread could not return to the normal policy, it never leaves it.
    #[test]
    fn a_pile_of_rows_raises_the_writer_until_it_has_caught_up() {
        let (dir, store, _) = store_with_a_key("writer-idle");
        let journal = Journal::open(&dir.join("spool")).unwrap();
        let policy = BatchPolicy {
            idle_priority: true,
            log_queue_rows: 10_000,
            ..small_batches()
        };
        let writer = Writer::spawn(store, journal, None, policy);
        let tx = writer.sender();
        let stats = tx.stats();
        let can = crate::sched::can_leave_idle();
        let expected = if can { 5 } else { 0 };
        let writer_policy = || {
            let tid = stats.writer_tid.load(Ordering::Relaxed);
            crate::sched::policy_and_nice_of(&format!("/proc/self/task/{tid}/stat")).0
        };
        let eventually = |what: &str, f: &dyn Fn() -> bool| {
            let started = Instant::now();
            while !f() {
                assert!(started.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        eventually("the writer's first policy", &|| {
            stats.writer_tid.load(Ordering::Relaxed) != 0 && writer_policy() == expected
        });
        assert_eq!(stats.writer_raised.load(Ordering::Relaxed), 0);

        // 5,000 rows at once: 50 batches.
        for i in 0..5000 {
            tx.log(LogRow {
                tenant_id: Some(1),
                product_id: Some(1),
                key_id: Some(1),
                client_ip: "203.0.113.7".into(),
                proxy_ip: "".into(),
                time: 1_800_000_000,
                machine_code: format!("m{i}"),
                friendly_name: String::new(),
                state: 2010,
                floating_expires: 0,
            });
        }
        eventually("every row written", &|| {
            stats.log_written.load(Ordering::Relaxed) == 5000
        });
        let raised = stats.writer_raised.load(Ordering::Relaxed);
        if can {
            assert!(raised >= 1, "raised {raised} times");
        } else {
            assert_eq!(raised, 0);
        }
        eventually("back to its idle policy", &|| writer_policy() == expected);
        assert_eq!(stats.writer_idle.load(Ordering::Relaxed), can);
        assert_eq!(stats.log_dropped.load(Ordering::Relaxed), 0);
        writer.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A request handler raises a writer under `SCHED_IDLE` (the thread's real policy, from
    /// /proc) that has not come round its loop for a flush interval, or whose rows are overdue,
    /// once; the writer's next pass counts it, makes sure of it, flushes under the normal policy
    /// and idles again on the pass after. A stand-in thread plays the writer.
    #[test]
    fn a_handler_raises_a_starved_writer_once() {
        let can = crate::sched::can_leave_idle();
        let stats = Arc::new(WriterStats::default());
        let (to_writer, commands) = std::sync::mpsc::channel::<bool>();
        let (to_test, answers) = std::sync::mpsc::channel::<(u64, u64)>();
        let writer = std::thread::spawn(move || {
            let tid = crate::sched::current_tid().unwrap();
            crate::sched::set_current(crate::sched::Policy::Idle).unwrap();
            to_test.send((crate::sched::current_thread(), tid)).unwrap();
            // `true`: go idle again.
            while let Ok(idle) = commands.recv() {
                if idle {
                    crate::sched::set_current(crate::sched::Policy::Idle).unwrap();
                }
                to_test.send((0, 0)).unwrap();
            }
        });
        let (pthread, tid) = answers.recv().unwrap();
        let policy = || crate::sched::policy_and_nice_of(&format!("/proc/self/task/{tid}/stat")).0;
        stats.writer_pthread.store(pthread, Ordering::Relaxed);
        stats.starved_after_ms.store(500, Ordering::Relaxed);
        stats.writer_pass_ms.store(now_ms(), Ordering::Relaxed);
        stats.flush_due_ms.store(u64::MAX, Ordering::Relaxed);
        stats.writer_idle.store(true, Ordering::Relaxed);
        stats.nudge_if_starved();
        assert_eq!(policy(), 5, "it came round 0 ms ago: left alone");
        std::thread::sleep(Duration::from_millis(600));
        stats.nudge_if_starved();
        assert!(stats.raised_from_outside.load(Ordering::Relaxed));
        assert_eq!(policy(), if can { 0 } else { 5 }, "starved: raised");
        to_writer.send(true).unwrap();
        answers.recv().unwrap();
        stats.nudge_if_starved();
        assert_eq!(policy(), 5, "once until the writer has seen it");

        // Rows held past their flush: raised although it came round just now.
        stats.raised_from_outside.store(false, Ordering::Relaxed);
        stats.starved_after_ms.store(60_000, Ordering::Relaxed);
        stats.flush_due_ms.store(now_ms() + 200, Ordering::Relaxed);
        stats.nudge_if_starved();
        assert_eq!(policy(), 5, "its rows are not due yet");
        std::thread::sleep(Duration::from_millis(250));
        stats.writer_pass_ms.store(now_ms(), Ordering::Relaxed);
        stats.nudge_if_starved();
        assert_eq!(policy(), if can { 0 } else { 5 }, "overdue: raised");
        drop(to_writer);
        writer.join().unwrap();

        // The writer's next pass takes note, and makes sure of the raise (here the handler's
        // call did not land): the normal policy, one raise counted, a flush now although few
        // rows wait; idle again on the pass after.
        std::thread::spawn(move || {
            let tid = crate::sched::current_tid().unwrap();
            let policy =
                || crate::sched::policy_and_nice_of(&format!("/proc/self/task/{tid}/stat")).0;
            crate::sched::set_current(crate::sched::Policy::Idle).unwrap();
            let mut p = Priority {
                enabled: true,
                idle: true,
                warned: false,
            };
            stats.writer_idle.store(true, Ordering::Relaxed);
            stats.raised_from_outside.store(true, Ordering::Relaxed);
            assert!(p.follow(1, 0, false, 100, &stats), "flush now");
            assert!(!stats.raised_from_outside.load(Ordering::Relaxed));
            // Without the right to leave SCHED_IDLE the raise fails and the writer says so.
            assert_eq!(stats.writer_raised.load(Ordering::Relaxed), u64::from(can));
            assert_eq!(p.idle, !can);
            assert_eq!(stats.writer_idle.load(Ordering::Relaxed), !can);
            assert_eq!(policy(), if can { 0 } else { 5 }, "normal for the flush");
            assert!(!p.follow(1, 0, false, 100, &stats));
            assert!(p.idle && stats.writer_idle.load(Ordering::Relaxed));
            assert_eq!(policy(), 5);
        })
        .join()
        .unwrap();
    }

    /// Every group is synced before its answer leaves and reaches the store; full segments
    /// go once the store's commits are durable; an answer that changed nothing waits for its
    /// license's latest group; after shutdown a change is refused and waiting on it returns
    /// at once.
    #[tokio::test(flavor = "current_thread")]
    async fn groups_are_synced_before_answers_and_none_is_left_behind() {
        let (dir, mut store, gid) = store_with_a_key("writer");
        // Small segments, so that 20 groups fill several.
        let (wal, _) = Wal::open_with(&dir.join("wal"), &mut store, 1024).unwrap();
        let journal = Journal::open(&dir.join("spool")).unwrap();
        let policy = small_batches();
        let license = store.key(gid).unwrap().license;
        let writer = Writer::spawn(store, journal, Some(wal), policy);
        let tx = writer.sender();
        let syncs = || tx.stats().wal_syncs.load(Ordering::Relaxed);

        // One at a time, as from handlers that each wait for their answer's sync.
        for i in 0..20 {
            let d = tx.changes(vec![upsert(gid, &format!("d{i}"))]);
            d.wait().await;
            assert!(d.is_done());
        }
        assert_eq!(syncs(), 20);
        assert_eq!(tx.stats().wal_failures.load(Ordering::Relaxed), 0);
        // Committed, then made durable on the writer's next pass, then the full segments are
        // deleted by the log. Only full segments ask for durability, so `safe_wal_seq` may stay
        // below 20 when the last groups sit in the current segment (a CI run saw 19).
        tx.flush_blocking();
        assert_eq!(tx.stats().committed_wal_seq.load(Ordering::Relaxed), 20);
        let wal_files = || segment_count(&dir.join("wal"));
        let started = Instant::now();
        while wal_files() > 1 && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(wal_files(), 1, "only the current segment is left");
        let safe = tx.stats().safe_wal_seq.load(Ordering::Relaxed);
        assert!((1..=20).contains(&safe), "safe_wal_seq {safe}");

        // An answer from a license waits for the license's latest change to be synced, even
        // an answer that changed nothing.
        let entry = crate::state::LicenseEntry::new(1, license);
        let sent = entry.fence(tx.changes(vec![upsert(gid, "fenced")]));
        let shown = entry.fence(Durable::ready());
        assert!(
            shown.is_group(),
            "the unchanged answer waits for the change"
        );
        shown.wait().await;
        assert!(sent.is_done(), "one group: synced for both");
        assert!(
            !entry.fence(Durable::ready()).is_group(),
            "nothing left to wait for"
        );

        tx.flush_blocking();
        writer.shutdown();
        tx.changes(vec![upsert(gid, "late")]).wait().await;
        drop(tx);
        let mut store = Store::open(&dir.join("k.db")).unwrap();
        let machines = store.key(gid).unwrap().license.machines.len();
        assert_eq!(machines, 21);
        let _ = std::fs::remove_dir_all(&dir);
    }
    /// A failed activation-log write makes the node unready until a write succeeds again;
    /// the writer's later flushes do not hide it, and the change is still answered and stored.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_activation_log_keeps_the_node_unready_until_it_writes_again() {
        let (dir, mut store, gid) = store_with_a_key("wal-fails");
        let wal_dir = dir.join("wal");
        let (wal, _) = Wal::open_with(&wal_dir, &mut store, 1024).unwrap();
        let journal = Journal::open(&dir.join("spool")).unwrap();
        let policy = small_batches();
        let writer = Writer::spawn(store, journal, Some(wal), policy);
        let tx = writer.sender();
        let health = crate::http::admin::Health {
            serving: AtomicBool::new(true),
            writer: tx.clone(),
        };
        let failures = || tx.stats().wal_failures.load(Ordering::Relaxed);
        tx.changes(vec![upsert(gid, "before")]).wait().await;
        assert_eq!(health.ready(), Ok(()));

        // Its directory gone, the log fails when it next starts a segment. (Retried: the
        // thread preparing the next segment may create its file during the removal.)
        let started = Instant::now();
        while let Err(e) = std::fs::remove_dir_all(&wal_dir) {
            assert!(started.elapsed() < Duration::from_secs(10), "{e}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut sent = 1;
        while failures() == 0 && sent < 60 {
            let d = tx.changes(vec![upsert(gid, &format!("m{sent}"))]);
            d.wait().await;
            assert!(d.is_done(), "a change is answered even when the log fails");
            sent += 1;
        }
        assert!(failures() > 0, "no append failed in {sent} groups");
        let unready = health.ready().unwrap_err();
        assert!(unready.contains("activation log"), "{unready}");
        // The store takes the changes, and that does not make the node ready.
        tx.flush_blocking();
        assert!(tx.stats().healthy.load(Ordering::Relaxed));
        assert_eq!(health.ready(), Err(unready));

        // Writable again: the next group is synced and the node is ready.
        std::fs::create_dir_all(&wal_dir).unwrap();
        let d = tx.changes(vec![upsert(gid, "after")]);
        d.wait().await;
        assert_eq!(health.ready(), Ok(()));
        assert_eq!(
            segment_count(&wal_dir),
            1,
            "the new segment holds the last group"
        );

        tx.flush_blocking();
        writer.shutdown();
        drop(tx);
        drop(health);
        let mut store = Store::open(&dir.join("k.db")).unwrap();
        let machines = store.key(gid).unwrap().license.machines.len();
        assert_eq!(machines, sent + 1, "every change reached the store");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
