//! Wiring for `keygate serve`: install the metrics recorder, open the store, load state, start
//! the writer, the sync poller and the admin listener, serve HTTPS until SIGTERM/SIGINT
//! (reloading the certificate on SIGHUP), then turn readiness off, drain connections and flush
//! the writer.

use crate::config::Config;
use crate::http::admin::{self, Admin, Health};
use crate::http::client_ip::TrustedProxies;
use crate::http::rate::RateLimits;
use crate::http::response_cache::ResponseCache;
use crate::http::sign_pool::SignPool;
use crate::http::{self, Ctx, Limits};
use crate::state::{State, Sync};
use crate::store::journal::Journal;
use crate::store::wal::Wal;
use crate::store::writer::{BatchPolicy, Writer};
use crate::store::{Location, Store};
use crate::tls::CertResolver;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cfg.server.worker_threads > 0 {
        rt.worker_threads(cfg.server.worker_threads);
    }
    // Set by the signing pool while signatures wait in its queue.
    let signing_backlog = Arc::new(AtomicBool::new(false));
    if cfg.server.worker_batch_scheduling {
        rt.on_thread_start(|| set_batch_scheduling(true));
    } else if cfg.server.yield_to_signing {
        let backlog = signing_backlog.clone();
        rt.on_thread_park(move || follow_signing_backlog(&backlog));
    }
    rt.build()?.block_on(serve(cfg, signing_backlog))
}

thread_local! {
    /// Whether this worker thread runs under `SCHED_BATCH` now.
    static BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Called by each worker just before it parks: under `SCHED_BATCH` while the signing pool has
/// a backlog, the normal policy otherwise. The policy decides what happens when the worker is
/// next woken, so setting it before parking is enough; a syscall only when the state changes.
///
/// During a backlog the signing thread has its core's work for the next milliseconds, and a
/// worker preempting it at every packet cost two context switches per new machine. Measured on
/// one pinned core (loadtest/README.md): new machines 5–8 % faster with workers under
/// `SCHED_BATCH`; re-activations, which sign nothing, are not affected.
fn follow_signing_backlog(backlog: &AtomicBool) {
    let want = backlog.load(Ordering::Relaxed);
    if BATCH.get() != want {
        // Recorded even on failure, so a refused change is not retried at every park.
        BATCH.set(want);
        set_batch_scheduling(want);
    }
}

/// Puts the calling thread under Linux's `SCHED_BATCH` policy (same priority, same share of
/// the CPU), or back under the normal one. Under `SCHED_BATCH` its wake-ups no longer preempt
/// the thread that is running. An async worker is woken by every packet; under load,
/// preempting the signing or store thread at each one cost two context switches per request
/// on a shared core. Measured A/B on one pinned core (loadtest/README.md), a noisy VM, always
/// on (`server.worker_batch_scheduling`): re-activation 1.17 over six interleaved rounds
/// (single runs 0.85–1.30), new machines 0.97–1.09, p99 no worse.
fn set_batch_scheduling(batch: bool) {
    use crate::sched::Policy;
    let policy = if batch { Policy::Batch } else { Policy::Other };
    if let Err(e) = crate::sched::set_current(policy) {
        tracing::warn!(error = ?e, batch, "could not set a worker thread's scheduling policy");
    }
}

async fn serve(cfg: Config, signing_backlog: Arc<AtomicBool>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", cfg.data_dir.display()))?;
    // One recorder per process; a second `serve` in the same process (tests) records nothing.
    let metrics_handle = match crate::metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics is off");
            None
        }
    };
    if let Some(h) = metrics_handle.clone() {
        // Upkeep folds the samples recorded since the last run into the histograms. With tens
        // of thousands of samples per second that takes milliseconds, so it runs often (small
        // batches) and on its own thread, never on an async worker where it would stall every
        // connection.
        std::thread::Builder::new()
            .name("keygate-metrics".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(500));
                h.run_upkeep();
            })?;
    }
    let location = cfg.store_location();
    // The PostgreSQL client runs its own small runtime, so connecting and loading happen on a
    // plain thread, not on an async worker.
    let Opened {
        store,
        journal,
        wal,
        sync: sync_store,
        control: mut control_store,
        log: log_store,
        state,
        seq,
    } = {
        let location = location.clone();
        let spool = cfg.spool_dir();
        let wal_dir = cfg.store.activation_log.then(|| cfg.data_dir.join("wal"));
        let ring = cfg.keyring()?;
        tokio::task::spawn_blocking(move || open_store(&location, ring, &spool, wal_dir.as_deref()))
            .await??
    };
    let state = Arc::new(state);
    tracing::info!(licenses = state.license_count(), store = %location.describe(), "state loaded");
    crate::metrics::licenses_loaded(state.license_count());

    // Distributed mode: connect, catch up with what the other nodes committed, then follow
    // their changes and carry the change streams into the main store.
    let dist_stop = CancellationToken::new();
    let mut dist_tasks = Vec::new();
    let (poke_tx, poke_rx) = crossbeam_channel::bounded(64);
    let dist = match &cfg.redis.url {
        None => None,
        Some(url) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let d = crate::dist::Dist::connect(
                url,
                cfg.redis.cluster,
                cfg.redis_ca()?,
                cfg.redis.shards,
                tx,
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to redis: {e}"))?
            .with_keyring(cfg.keyring()?)
            .with_requeue_after(Duration::from_millis(cfg.redis.requeue_refused_after_ms));
            d.ensure_groups().await?;
            let d = Arc::new(d);
            let newer = crate::dist::sync_all(&d, &state).await?;
            crate::metrics::redis_up(true);
            tracing::info!(
                licenses_newer_in_redis = newer,
                "distributed mode: synced from redis"
            );
            let consumer = format!(
                "node-{}",
                crate::store::wal::node_key(&cfg.data_dir.join("wal"))?
            );
            let store = {
                let (location, ring) = (location.clone(), cfg.keyring()?);
                tokio::task::spawn_blocking(move || -> anyhow::Result<Store> {
                    let mut s = Store::connect(&location)?;
                    s.set_keyring(ring);
                    Ok(s)
                })
                .await??
            };
            // The license channel's messages wake the stream consumer (`store_changes`).
            let changed = Arc::new(tokio::sync::Notify::new());
            dist_tasks.push(tokio::spawn(crate::dist::follow(
                d.clone(),
                state.clone(),
                rx,
                poke_tx,
                changed.clone(),
                dist_stop.clone(),
            )));
            dist_tasks.push(tokio::spawn(crate::dist::store_changes(
                d.clone(),
                Arc::new(parking_lot::Mutex::new(store)),
                consumer,
                changed,
                dist_stop.clone(),
            )));
            Some(d)
        }
    };

    let (cert, key) = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => crate::tls::ensure_self_signed(&cfg.data_dir.join("tls"), &cfg.server.tls_names)?,
    };
    let (tls, resolver) = crate::tls::server_config(&cert, &key, cfg.server.tls_post_quantum)?;

    let writer = Writer::spawn(
        store,
        journal,
        wal,
        BatchPolicy {
            batch_rows: cfg.store.batch_rows,
            batch_bytes: cfg.store.batch_bytes,
            flush_interval: Duration::from_millis(cfg.store.flush_interval_ms),
            log_queue_rows: cfg.store.log_queue_rows,
            retention_days: (cfg.privacy.log_retention_days > 0)
                .then_some(cfg.privacy.log_retention_days),
            inactive_tenant_days: (cfg.privacy.inactive_tenant_days > 0)
                .then_some(cfg.privacy.inactive_tenant_days),
            idle_priority: cfg.store.writer_idle_priority,
        },
    );
    let sync = Sync::spawn(
        state.clone(),
        sync_store,
        seq,
        Duration::from_millis(cfg.store.sync_interval_ms),
        cfg.redis.url.is_some().then_some(poke_rx),
    );
    let s = &cfg.server;
    let ctx = Arc::new(Ctx {
        dist,
        state,
        writer: writer.sender(),
        control_store: Arc::new(parking_lot::Mutex::new({
            // The only administrative write the API makes: keys created by CreateTrialKey.
            control_store.set_actor("api:CreateTrialKey");
            control_store
        })),
        log_store: Arc::new(parking_lot::Mutex::new(log_store)),
        trial_lock: tokio::sync::Mutex::new(()),
        limits: Limits {
            max_body_bytes: s.max_body_bytes,
            max_header_bytes: s.max_header_bytes,
            body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
            header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
            tls_handshake_timeout: Duration::from_millis(s.tls_handshake_timeout_ms),
            max_connections: s.max_connections,
            drain_timeout: Duration::from_millis(s.drain_timeout_ms),
        },
        proxy_ip: s.proxy_ip.clone(),
        trusted_proxies: TrustedProxies::parse(&s.trusted_proxies).map_err(anyhow::Error::msg)?,
        rate_limits: RateLimits::new(&cfg.rate_limits),
        sign_pool: SignPool::new(s.signing_threads, 1024, signing_backlog),
        node_addresses: Default::default(),
        log_ip_prefixes: (cfg.privacy.log_ipv4_prefix, cfg.privacy.log_ipv6_prefix),
        responses: ResponseCache::new(
            Duration::from_millis(cfg.cache.response_ttl_ms),
            cfg.cache.response_max_bytes,
        ),
        request_metrics: crate::metrics::RequestMetrics::new(),
    });
    // Handlers raise a starved idle writer when they queue a row; this does it between
    // requests (a writer starved on a quiet node would otherwise wait about a second), four
    // times per flush interval so that overdue rows are seen soon after they are due.
    let watched = writer.sender();
    let every = Duration::from_millis((cfg.store.flush_interval_ms / 4).max(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            watched.nudge();
        }
    });
    let housekeeping_ctx = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            housekeeping_ctx.rate_limits.housekeeping();
        }
    });

    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", s.listen))?;
    let addr = listener.local_addr()?;
    let os_signals =
        Signals::install().map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
    // Scripts and tests read these lines to find the ports.
    println!(
        "keygate listening on https://{addr} (certificate {})",
        cert.display()
    );
    let mut listeners = vec![http::Listener {
        tcp: listener,
        tls: Some(tls),
        proxy_protocol: s.proxy_protocol,
    }];
    if !s.plain_http_listen.is_empty() {
        let plain = tokio::net::TcpListener::bind(&s.plain_http_listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", s.plain_http_listen))?;
        println!("keygate plain HTTP on http://{}", plain.local_addr()?);
        tracing::warn!(
            "plain HTTP is on (server.plain_http_listen): only behind a TLS-terminating proxy"
        );
        listeners.push(http::Listener {
            tcp: plain,
            tls: None,
            proxy_protocol: s.proxy_protocol,
        });
    }

    let health = Arc::new(Health {
        serving: AtomicBool::new(false),
        writer: writer.sender(),
    });
    // State is loaded and the client port is bound: ready from here until shutdown begins.
    health.serving.store(true, Ordering::Relaxed);
    let admin_stop = CancellationToken::new();
    if !cfg.admin.listen.is_empty() {
        let admin_listener = tokio::net::TcpListener::bind(&cfg.admin.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (admin): {e}", cfg.admin.listen))?;
        println!("keygate admin on http://{}", admin_listener.local_addr()?);
        let admin = Arc::new(Admin {
            metrics: metrics_handle,
            health: health.clone(),
        });
        tokio::spawn(admin::serve_admin(
            admin_listener,
            admin,
            admin_stop.clone(),
        ));
    }

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    let shutdown_delay = Duration::from_millis(s.shutdown_delay_ms);
    let health_on_signal = health.clone();
    tokio::spawn(async move {
        wait_for_signal(os_signals, &resolver).await;
        // Readiness first, so load balancers stop sending before the listener closes.
        health_on_signal.serving.store(false, Ordering::Relaxed);
        tracing::info!(
            delay_ms = shutdown_delay.as_millis() as u64,
            "shutting down"
        );
        tokio::time::sleep(shutdown_delay).await;
        signals.cancel();
    });
    let served = listeners
        .into_iter()
        .map(|l| tokio::spawn(http::serve_listener(l, ctx.clone(), shutdown.clone())));
    for s in served.collect::<Vec<_>>() {
        s.await?;
    }
    sync.shutdown();
    dist_stop.cancel();
    for t in dist_tasks {
        let _ = t.await;
    }
    let writer_stats = writer.sender();
    tokio::task::spawn_blocking(move || writer.shutdown()).await?;
    admin_stop.cancel();
    let st = writer_stats.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    if load(&st.events_lost) > 0 {
        tracing::error!(
            events_lost = load(&st.events_lost),
            "activation changes were not stored"
        );
    }
    tracing::info!(
        log_written = load(&st.log_written),
        log_dropped = load(&st.log_dropped),
        events_written = load(&st.events_written),
        "store writer flushed; bye"
    );
    Ok(())
}

/// Connects to the main store (three connections: writer, sync, control), replays batches an
/// earlier run left in the spool, then loads the state, so the node starts with everything
/// it had acknowledged.
#[allow(clippy::type_complexity)]
fn open_store(
    location: &Location,
    ring: Option<Arc<crate::store::cipher::Keyring>>,
    spool: &std::path::Path,
    wal_dir: Option<&std::path::Path>,
) -> anyhow::Result<Opened> {
    // Every connection seals and opens personal fields with the same keys.
    let connect = || -> anyhow::Result<Store> {
        let mut s = Store::connect(location)?;
        s.set_keyring(ring.clone());
        Ok(s)
    };
    let mut store = connect()?;
    let journal = Journal::open(spool)
        .map_err(|e| anyhow::anyhow!("cannot open the spool {}: {e}", spool.display()))?;
    let wal_node = wal_dir.map(crate::store::wal::node_key).transpose()?;
    // The spool first: it holds older changes than the activation log's newest.
    let journal = replay_spool(&mut store, journal, wal_node)?;
    let wal = match wal_dir {
        Some(dir) => {
            let (wal, replayed) = Wal::open_and_replay(dir, &mut store).map_err(|e| {
                anyhow::anyhow!("replaying the activation log {}: {e}", dir.display())
            })?;
            if replayed > 0 {
                tracing::info!(
                    changes = replayed,
                    "activation changes from an earlier run replayed"
                );
            }
            Some(wal)
        }
        None => None,
    };
    let (state, seq) = State::load(&mut store)?;
    let sync = connect()?;
    let control = connect()?;
    let log = connect()?;
    Ok(Opened {
        store,
        journal,
        wal,
        sync,
        control,
        log,
        state,
        seq,
    })
}

/// What `open_store` hands to `serve`.
struct Opened {
    store: Store,
    journal: Journal,
    wal: Option<Wal>,
    sync: Store,
    control: Store,
    log: Store,
    state: State,
    seq: i64,
}

/// Writes every spooled batch to the store, oldest first; an error stops the start (the node
/// would otherwise serve without activations it had acknowledged).
fn replay_spool(
    store: &mut Store,
    mut journal: Journal,
    wal_node: Option<i64>,
) -> anyhow::Result<Journal> {
    let mut replayed = 0usize;
    while let Some(batch) = journal.front() {
        let b = batch?;
        store
            .write_batch_once(Some(b.id), wal_node.zip(b.wal_seq), &b.events, &b.logs)
            .map_err(|e| anyhow::anyhow!("replaying the spool into the main store: {e}"))?;
        journal.pop_front()?;
        replayed += 1;
    }
    if replayed > 0 {
        tracing::info!(
            batches = replayed,
            "spooled batches from an earlier run replayed"
        );
    }
    Ok(journal)
}

/// SIGTERM, SIGINT and SIGHUP, taken over from their default actions.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installed before the node says it listens, so a SIGTERM right after start is a clean
    /// shutdown, never the default action (death without a flush).
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Waits for SIGTERM or SIGINT; reloads the TLS certificate on every SIGHUP meanwhile.
async fn wait_for_signal(signals: Signals, resolver: &CertResolver) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => match resolver.reload() {
                Ok(()) => {
                    tracing::info!("TLS certificate reloaded");
                    crate::metrics::tls_reload("ok");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate reload failed; keeping the old one");
                    crate::metrics::tls_reload("failed");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::sched::policy_and_nice;

    #[test]
    fn batch_scheduling_changes_the_policy_and_keeps_nice_0() {
        std::thread::spawn(|| {
            assert_eq!(
                policy_and_nice(),
                (0, 0),
                "SCHED_OTHER at nice 0 to begin with"
            );
            super::set_batch_scheduling(true);
            assert_eq!(policy_and_nice(), (3, 0), "SCHED_BATCH is 3");
            super::set_batch_scheduling(false);
            assert_eq!(policy_and_nice(), (0, 0), "back to SCHED_OTHER");
        })
        .join()
        .unwrap();
    }

    /// A worker follows the signing backlog each time it parks, and only then.
    #[test]
    fn a_parking_worker_follows_the_signing_backlog() {
        use std::sync::atomic::{AtomicBool, Ordering};
        std::thread::spawn(|| {
            let backlog = AtomicBool::new(false);
            super::follow_signing_backlog(&backlog);
            assert_eq!(policy_and_nice().0, 0, "no backlog: SCHED_OTHER");
            backlog.store(true, Ordering::Relaxed);
            assert_eq!(
                policy_and_nice().0,
                0,
                "nothing changes before the next park"
            );
            super::follow_signing_backlog(&backlog);
            assert_eq!(
                policy_and_nice(),
                (3, 0),
                "a backlog: SCHED_BATCH, nice kept"
            );
            super::follow_signing_backlog(&backlog);
            assert_eq!(policy_and_nice().0, 3);
            backlog.store(false, Ordering::Relaxed);
            super::follow_signing_backlog(&backlog);
            assert_eq!(policy_and_nice(), (0, 0), "the backlog is over");
        })
        .join()
        .unwrap();
    }
}
