//! Request-log ingestion into PostgreSQL through the node's store writer, against the ceiling
//! of a raw binary COPY of the same rows into the same cluster, in one run.
//!
//! A private PostgreSQL cluster (default durability: fsync on, synchronous commit) is started in
//! a temporary directory. A producer thread offers rows to `WriterSender::log` at a fixed rate
//! (`KEYGATE_BENCH_RATE`, default 100,000 rows/s) for `KEYGATE_BENCH_SECONDS` (default 10), as
//! request handlers do. Reported: rows written per second, rows dropped (queue full), and the
//! lag (how long ago the newest committed row was offered), sampled every 50 ms.
//!
//! `KEYGATE_BENCH_ENCRYPT=1` turns on encryption at rest (three sealed fields per row).
//!
//! `cargo bench --bench log_ingest`

use keygate::store::journal::Journal;
use keygate::store::writer::{BatchPolicy, Writer};
use keygate::store::{LogRow, Store};
use keygate::testkit::TempPostgres;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn row(i: u64) -> LogRow {
    LogRow {
        tenant_id: Some(1),
        product_id: Some(1 + (i % 7) as i64),
        key_id: Some((i % 100_000) as i64),
        client_ip: format!("203.0.{}.0", i % 256).into(),
        proxy_ip: "10.0.0.1".into(),
        time: 1_800_000_000 + (i / 100_000) as i64,
        // SDK machine codes are 64 hex characters.
        machine_code: format!("{i:064x}"),
        friendly_name: String::new(),
        state: 2010,
        floating_expires: 0,
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The ceiling: one binary COPY of `n` rows per transaction of 8,192, straight from a client.
fn raw_copy_rate(
    url: &str,
    n: u64,
    ring: Option<std::sync::Arc<keygate::store::cipher::Keyring>>,
) -> f64 {
    let mut store = Store::connect_postgres(url).unwrap();
    store.set_keyring(ring);
    let rows: Vec<LogRow> = (0..n).map(|i| row(1 << 40 | i)).collect();
    let started = Instant::now();
    for chunk in rows.chunks(8192) {
        store.write_batch(&[], chunk).unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this as a quick smoke test.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let rate = env_u64("KEYGATE_BENCH_RATE", 100_000);
    let seconds = env_u64("KEYGATE_BENCH_SECONDS", if smoke { 1 } else { 10 });
    let pg = TempPostgres::start_with(&[]);
    let url = pg.url();
    let spool = pg.dir().join("spool");

    let encrypt = std::env::var("KEYGATE_BENCH_ENCRYPT").is_ok_and(|v| v == "1");
    let ring = encrypt.then(|| {
        std::sync::Arc::new(
            keygate::store::cipher::Keyring::parse(&keygate::store::cipher::Keyring::new_key_line(
                "bench",
            ))
            .unwrap(),
        )
    });
    let mut store = Store::connect_postgres(&url).unwrap();
    store.set_keyring(ring.clone());
    let writer = Writer::spawn(
        store,
        Journal::open(&spool).unwrap(),
        None,
        BatchPolicy {
            batch_rows: 1000,
            batch_bytes: 1 << 20,
            flush_interval: Duration::from_millis(200),
            log_queue_rows: 100_000,
            retention_days: None,
            inactive_tenant_days: None,
            idle_priority: false,
        },
    );
    let tx = writer.sender();
    let total = rate * seconds;
    // Offered counts over time, so a written count maps back to when its row was offered.
    let offered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let producer = {
        let (tx, offered) = (tx.clone(), offered.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while i < total {
                // Rows due by now (fixed rate, no coordinated omission), offered in bursts.
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while i < due.min(total) {
                    tx.log(row(i));
                    i += 1;
                }
                offered.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let mut lags = Vec::new();
    let stats = tx.stats();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = started.elapsed().as_secs_f64();
        let written = stats.log_written.load(Ordering::Relaxed);
        // The newest committed row was offered at about written / rate seconds.
        lags.push((now - written as f64 / rate as f64).max(0.0));
        let dropped = stats.log_dropped.load(Ordering::Relaxed);
        if written + dropped >= total && offered.load(Ordering::Relaxed) >= total {
            break;
        }
        assert!(
            now < seconds as f64 * 5.0 + 30.0,
            "the writer fell far behind"
        );
    }
    producer.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    writer.shutdown();
    let written = stats.log_written.load(Ordering::Relaxed);
    let dropped = stats.log_dropped.load(Ordering::Relaxed);
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p) as usize];
    let ceiling = raw_copy_rate(&url, if smoke { 20_000 } else { 1_000_000 }, ring);
    let achieved = written as f64 / elapsed;
    println!(
        "log ingestion into PostgreSQL (fsync on{}), offered {rate} rows/s for {seconds} s",
        if encrypt { ", encryption at rest" } else { "" }
    );
    println!("  written         {written} rows in {elapsed:.2} s = {achieved:.0} rows/s");
    println!("  dropped         {dropped} rows (queue full)");
    println!(
        "  lag             p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!("  raw COPY        {ceiling:.0} rows/s (the ceiling, same cluster)");
    println!(
        "  ratio           offered rate / raw COPY = {:.2}",
        rate as f64 / ceiling
    );
    assert_eq!(
        written + dropped,
        total,
        "every offered row is accounted for"
    );
}
