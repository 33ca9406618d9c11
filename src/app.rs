//! Wiring for `keygate serve`: open the store, load state, start the writer and the sync
//! poller, serve HTTPS until SIGTERM/SIGINT, then drain connections and flush the writer.

use crate::config::Config;
use crate::http::{self, Ctx, Limits};
use crate::state::{State, Sync};
use crate::store::writer::{BatchPolicy, Writer};
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cfg.server.worker_threads > 0 {
        rt.worker_threads(cfg.server.worker_threads);
    }
    rt.build()?.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", cfg.data_dir.display()))?;
    let db = cfg.sqlite_path();
    let store = Store::open(&db)?;
    let (state, seq) = State::load(&store)?;
    let state = Arc::new(state);
    tracing::info!(licenses = state.license_count(), db = %db.display(), "state loaded");

    let (cert, key) = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => crate::tls::ensure_self_signed(&cfg.data_dir.join("tls"), &cfg.server.tls_names)?,
    };
    let tls = crate::tls::server_config(&cert, &key)?;

    let writer = Writer::spawn(
        store,
        BatchPolicy {
            batch_rows: cfg.store.batch_rows,
            flush_interval: Duration::from_millis(cfg.store.flush_interval_ms),
            log_queue_rows: cfg.store.log_queue_rows,
        },
    );
    let sync = Sync::spawn(
        state.clone(),
        Store::open(&db)?,
        seq,
        Duration::from_millis(cfg.store.sync_interval_ms),
    );
    let s = &cfg.server;
    let ctx = Arc::new(Ctx {
        state,
        writer: writer.sender(),
        control_store: Arc::new(parking_lot::Mutex::new(Store::open(&db)?)),
        trial_lock: tokio::sync::Mutex::new(()),
        limits: Limits {
            max_body_bytes: s.max_body_bytes,
            body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
            header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
            tls_handshake_timeout: Duration::from_millis(s.tls_handshake_timeout_ms),
            max_connections: s.max_connections,
            drain_timeout: Duration::from_millis(s.drain_timeout_ms),
        },
        proxy_ip: s.proxy_ip.clone(),
    });

    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", s.listen))?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to find the port.
    println!(
        "keygate listening on https://{addr} (certificate {})",
        cert.display()
    );

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signals.cancel();
    });
    http::serve_tls(listener, tls, ctx, shutdown).await;
    sync.shutdown();
    let writer_stats = writer.sender();
    tokio::task::spawn_blocking(move || writer.shutdown()).await?;
    let st = writer_stats.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
