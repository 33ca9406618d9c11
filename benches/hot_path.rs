//! Criterion benches of the activation hot path, piece by piece and whole (no socket):
//! decode, scope lookup, decide, encode, sign, the full re-activation handler (the cache-hit
//! path), and pushing a log row. Results and the command: benches/README.md.

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::domain::{self, ActivateInput, Machine, Mask};
use keygate::http::handlers::{self, LogCtx};
use keygate::http::{Ctx, Limits};
use keygate::request::{self, ActivateRequest, Request};
use keygate::state::State;
use keygate::store::writer::{BatchPolicy, Writer};
use keygate::store::{LogRow, Store};
use keygate::wire::{self, LicenseView};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

/// The allocator the `keygate` binary uses, so the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Fixture {
    ctx: Arc<Ctx>,
    _writer: Writer,
    token: String,
    product: i64,
    key: String,
    dir: std::path::PathBuf,
}

/// A node's context over a fresh store with one key; `cached` turns the response cache on.
fn fixture(cached: bool) -> Fixture {
    let dir = std::env::temp_dir().join(format!("keygate-bench-{}-{cached}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = dir.join("k.db");
    let mut store = Store::open(&db).unwrap();
    let t = keygate::control::create_tenant(&mut store, "bench").unwrap();
    let tenant = t["tenant_id"].as_i64().unwrap();
    let product = keygate::control::create_product(&mut store, tenant, "p", None, None).unwrap()
        ["product_id"]
        .as_i64()
        .unwrap();
    let spec = keygate::control::KeySpec {
        product_id: product,
        period: 30,
        max_no_of_machines: 10,
        notes: Some("bench".into()),
        new_customer: Some(("Ada".into(), "ada@example.com".into(), "Engines".into())),
        data_objects: vec!["cryptolens_features=[\"a\",\"b\"]:1".into()],
        ..Default::default()
    };
    let key = keygate::control::create_key(&mut store, &spec).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let tok = keygate::control::create_token(
        &mut store,
        &keygate::control::TokenSpec {
            tenant_id: tenant,
            ..Default::default()
        },
    )
    .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (state, _) = State::load(&mut store).unwrap();
    let writer = Writer::spawn(
        store,
        keygate::store::journal::Journal::open(&dir.join("spool")).unwrap(),
        None,
        BatchPolicy {
            batch_rows: 1000,
            batch_bytes: 1 << 20,
            flush_interval: Duration::from_millis(200),
            log_queue_rows: 1 << 20,
            retention_days: None,
            inactive_tenant_days: None,
            idle_priority: false,
        },
    );
    let ctx = Arc::new(Ctx {
        state: Arc::new(state),
        writer: writer.sender(),
        dist: None,
        control_store: Arc::new(parking_lot::Mutex::new(Store::open(&db).unwrap())),
        log_store: Arc::new(parking_lot::Mutex::new(Store::open(&db).unwrap())),
        trial_lock: tokio::sync::Mutex::new(()),
        limits: Limits {
            max_body_bytes: 16384,
            max_header_bytes: 16384,
            body_read_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 100,
            drain_timeout: Duration::from_secs(1),
        },
        proxy_ip: None,
        trusted_proxies: Default::default(),
        rate_limits: keygate::http::rate::RateLimits::off(),
        sign_pool: keygate::http::sign_pool::SignPool::new(1, 64, Default::default()),
        node_addresses: Default::default(),
        log_ip_prefixes: (24, 48),
        responses: if cached {
            keygate::http::response_cache::ResponseCache::new(Duration::from_secs(3600), 1 << 20)
        } else {
            keygate::http::response_cache::ResponseCache::off()
        },
        request_metrics: Default::default(),
    });
    Fixture {
        ctx,
        _writer: writer,
        token: tok,
        product,
        key,
        dir,
    }
}

fn python_body(f: &Fixture, machine: &str) -> String {
    format!(
        "token={}&ProductId={}&key={}&MachineCode={machine}&FieldsToReturn=0&metadata=False&FloatingTimeInterval=0&MaxOverdraft=0&FriendlyName=None&ModelVersion=3&Sign=True&SignMethod=1",
        f.token, f.product, f.key
    )
}

/// Benches encoding `lic`'s ModelVersion 3 JSON listing `machines`; returns the JSON.
fn bench_encode(
    c: &mut Criterion,
    name: &str,
    lic: &domain::License,
    machines: &[&Machine],
) -> Vec<u8> {
    let mut json = Vec::new();
    c.bench_function(name, |b| {
        b.iter(|| {
            json.clear();
            wire::encode_license(
                &LicenseView {
                    license: lic,
                    machines,
                    model_version: 3,
                    mask: Mask(0),
                    sign_date: 1_800_000_000,
                },
                &mut json,
            );
            black_box(json.len())
        })
    });
    json
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let f = fixture(false);
    let cached = fixture(true);
    let machine = "9d9520019964e2f4aae3d0098ceae3c83bc0b841a21fe6d087d7e70937d6f5f8";
    let body = python_body(&f, machine);
    // Activate once so the benches below see a known machine (the re-activation storm case).
    let Ok(Request::Activate(req)) = request::decode("/api/key/activate", b"", body.as_bytes())
    else {
        panic!("decode failed")
    };
    let node: Arc<str> = "10.0.0.1".into();
    let reactivate = |f: &Fixture, req: &ActivateRequest| {
        let mut log = LogCtx::at(keygate::http::unix_now());
        rt.block_on(handlers::activate(
            &f.ctx,
            req.clone(),
            "203.0.113.5",
            &node,
            &mut log,
        ))
        .unwrap()
    };
    reactivate(&f, &req);
    let Ok(Request::Activate(cached_req)) = request::decode(
        "/api/key/activate",
        b"",
        python_body(&cached, machine).as_bytes(),
    ) else {
        panic!("decode failed")
    };
    reactivate(&cached, &cached_req);

    c.bench_function("decode_python_activate", |b| {
        b.iter(|| {
            request::decode(
                black_box("/api//key/activate"),
                b"",
                black_box(body.as_bytes()),
            )
            .unwrap()
        })
    });
    c.bench_function("scope_lookup", |b| {
        b.iter(|| f.ctx.state.scope(black_box(&f.token)).unwrap())
    });
    let entry = f.ctx.state.license(f.product, &f.key).unwrap();
    let lic = entry.license.lock().clone();
    let input = ActivateInput {
        machine_code: machine,
        friendly_name: "None",
        floating_interval: 0,
        max_overdraft: 0,
        ip: "203.0.113.5",
        proxy_ip: &node,
        now: 1_800_000_000,
    };
    c.bench_function("decide_known_machine", |b| {
        b.iter(|| domain::activate(black_box(&lic), black_box(&input)))
    });
    let machines: Vec<&Machine> = lic.machines.iter().collect();
    let json = bench_encode(c, "encode_license_mv3", &lic, &machines);
    // A license with 25 machines, as new-machine answers list by the end of bench.sh's
    // 1,000-key run: the escaping of machine codes and addresses dominates.
    let many: Vec<Machine> = (0..25)
        .map(|i| Machine {
            machine_code: format!("{i:02}{}", &machine[2..]),
            ip: format!("198.51.100.{i}"),
            friendly_name: format!("host-{i}"),
            ..lic.machines[0].clone()
        })
        .collect();
    let many: Vec<&Machine> = many.iter().collect();
    bench_encode(c, "encode_license_mv3_25_machines", &lic, &many);
    let signer = f.ctx.state.signer(1).unwrap();
    c.bench_function("sign_rsa2048_sha256", |b| {
        b.iter(|| signer.sign_sha256(black_box(&json)).unwrap())
    });
    // The whole handler, signing on the pool every time (cache off)...
    c.bench_function("handler_reactivate_known_machine", |b| {
        b.iter(|| reactivate(&f, black_box(&req)))
    });
    // ...and answered from the signed-response cache (a retry storm).
    c.bench_function("handler_reactivate_cached", |b| {
        b.iter(|| reactivate(&cached, black_box(&cached_req)))
    });
    let row = LogRow {
        tenant_id: Some(1),
        product_id: Some(f.product),
        key_id: Some(1),
        client_ip: "203.0.113.5".into(),
        proxy_ip: "10.0.0.1".into(),
        time: 1_800_000_000,
        machine_code: machine.into(),
        friendly_name: String::new(),
        state: 2010,
        floating_expires: 0,
    };
    c.bench_function("log_row_push", |b| {
        b.iter(|| f.ctx.writer.log(black_box(row.clone())))
    });
    let _ = std::fs::remove_dir_all(&f.dir);
    let _ = std::fs::remove_dir_all(&cached.dir);
}

criterion_group! {
    name = hot_path;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(hot_path);
