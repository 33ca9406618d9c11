//! Operations over real sockets: Prometheus metrics during real traffic, `/livez` and
//! `/readyz`, SIGTERM during load (readiness off, drain, nothing accepted is lost), SIGHUP
//! certificate reload, and `X-Forwarded-For` believed only from trusted proxies.

use super::helpers::{
    activate, answer, cli, eventually, license_text, raw_tls, Seed, Server, TempDir,
};
use keygate_loadtest::{form, tls_config, Connection, Protocol};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The value of one exposition line `name{labels} value`, `name` including its labels.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_real_traffic_and_health_endpoints_answer() {
    let dir = TempDir::new("metrics");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "5"]);
    let server = Server::start(&dir.0, &[]);
    assert_eq!(server.admin_get("/livez"), (200, "ok\n".into()));
    assert_eq!(server.admin_get("/readyz"), (200, "ready\n".into()));
    assert_eq!(server.admin_get("/nope").0, 404);

    let mut conn = server.connect(Protocol::Http2).await;
    for i in 0..7 {
        let r = conn
            .post(
                "/api/key/Activate",
                &activate(&seed, &key, &format!("m{i}")),
            )
            .await
            .unwrap();
        assert_eq!(r.status, if i < 5 { 200 } else { 400 }, "{}", r.text());
    }
    assert_eq!(conn.post("/api/key/Unknown", "").await.unwrap().status, 404);

    let (status, m) = server.admin_get("/metrics");
    assert_eq!(status, 200);
    let expect = [
        (
            r#"keygate_requests_total{method="activate",result="ok"}"#,
            5.0,
        ),
        (
            r#"keygate_requests_total{method="activate",result="limit_reached"}"#,
            2.0,
        ),
        (
            r#"keygate_requests_total{method="other",result="bad_request"}"#,
            1.0,
        ),
        (
            r#"keygate_request_duration_seconds_count{method="activate"}"#,
            7.0,
        ),
        ("keygate_signing_duration_seconds_count", 5.0),
        (r#"keygate_tls_handshakes_total{outcome="full"}"#, 1.0),
        ("keygate_connections_open", 1.0),
        ("keygate_log_rows_queued_total", 8.0),
        ("keygate_licenses_loaded", 1.0),
        // The writer applied the retention rule at start: nothing was old enough.
        ("keygate_retention_rows_anonymised_total", 0.0),
        (r#"keygate_build_info{version="0.1.0"}"#, 1.0),
    ];
    for (series, want) in expect {
        assert_eq!(sample(&m, series), Some(want), "{series} in\n{m}");
    }
    let synced = sample(&m, "keygate_sync_last_success_timestamp_seconds").unwrap_or(0.0);
    assert!(synced > 1.7e9, "the change feed is being read: {synced}");
    // Real histograms: cumulative buckets ending in +Inf.
    let inf = sample(
        &m,
        r#"keygate_request_duration_seconds_bucket{method="activate",le="+Inf"}"#,
    );
    assert_eq!(inf, Some(7.0), "{m}");
    assert!(m.contains(r#"keygate_request_duration_seconds_bucket{method="activate",le="0.001"}"#));
    // No key, token, machine code or IP ever appears in a label.
    for secret in [key.as_str(), seed.token.as_str(), "m0", "127.0.0.1"] {
        assert!(!m.contains(secret), "{secret} leaked into /metrics");
    }
    // The writer's counters catch up once the batch is flushed.
    let written = eventually(Duration::from_secs(5), || async {
        let (_, m) = server.admin_get("/metrics");
        (sample(&m, "keygate_log_rows_written_total") == Some(8.0)).then_some(())
    })
    .await;
    assert!(written.is_some(), "log rows were not reported as written");
}

/// The drain closes idle keep-alive connections at once (HTTP/1.1 and HTTP/2) instead of
/// waiting out `server.drain_timeout_ms` (60 s here): SIGTERM to exit takes well under that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let dir = TempDir::new("idle-drain");
    let mut server = Server::start(&dir.0, &[("KEYGATE_SERVER__DRAIN_TIMEOUT_MS", "60000")]);
    let mut h2 = server.connect(Protocol::Http2).await;
    assert_eq!(h2.post("/api/key/Nothing", "").await.unwrap().status, 404);
    let mut h1 = raw_tls(&server).await;
    h1.write_all(b"POST /api/key/Nothing HTTP/1.1\r\nHost: k\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut h1, &mut first)
        .await
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 404");
    // Both connections idle now, and open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = std::time::Instant::now();
    server.stop();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM to exit took {took:?}"
    );
    // The HTTP/1.1 connection got the rest of its answer, then the close.
    let rest = answer(&mut h1).await;
    assert!(rest.contains("application/json"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_turns_readiness_off_and_loses_nothing_accepted() {
    let dir = TempDir::new("sigterm");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "1000000"]);
    let mut server = Server::start(&dir.0, &[("KEYGATE_SERVER__SHUTDOWN_DELAY_MS", "3000")]);

    // Four clients activate new machines back to back until the server closes their
    // connection in its drain.
    let mut tasks = Vec::new();
    for c in 0..4 {
        let mut conn = server.connect(Protocol::Http1).await;
        let (seed_token, product, key) = (seed.token.clone(), seed.product, key.clone());
        tasks.push(tokio::spawn(async move {
            let (mut accepted, mut answered) = (Vec::new(), 0u32);
            for i in 0.. {
                let machine = format!("c{c}-{i}");
                let body = form(&[
                    ("token", &seed_token),
                    ("ProductId", &product.to_string()),
                    ("Key", &key),
                    ("MachineCode", &machine),
                ]);
                match conn.post("/api/key/Activate", &body).await {
                    Ok(r) => {
                        answered += 1;
                        assert_eq!(r.status, 200, "{}", r.text());
                        accepted.push(machine);
                    }
                    Err(_) => break, // the server closed the connection: not accepted
                }
            }
            (accepted, answered)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.signal("TERM");
    // During the shutdown delay the node says it is not ready, yet still answers. (Up to
    // 2.5 s of the 3 s delay: four busy clients share two cores with the node.)
    let unready = eventually(Duration::from_millis(2500), || async {
        (server.admin_get("/readyz").0 == 503).then_some(())
    })
    .await;
    assert!(unready.is_some(), "/readyz did not turn 503 after SIGTERM");
    assert_eq!(server.admin_get("/livez").0, 200);
    let mut accepted = Vec::new();
    let mut answered = 0;
    for t in tasks {
        let (a, n) = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("the drain did not close the client connections")
            .unwrap();
        accepted.extend(a);
        answered += n;
    }
    server.stop();
    println!(
        "accepted {} activations, answered {answered} requests",
        accepted.len()
    );
    assert!(accepted.len() > 20, "too little load: {}", accepted.len());

    // Every accepted activation and every answered request is in the store.
    let mut stored = seed.mids(&dir.0, &key);
    stored.sort();
    accepted.sort();
    assert_eq!(stored, accepted);
    let logs = cli(&dir.0, &["log", "list", "--limit", "1000000"]);
    assert_eq!(logs["logs"].as_array().unwrap().len(), answered as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = TempDir::new("sighup");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &[]);
    let mut server = Server::start(&dir.0, &[]);
    let old_cert = dir.0.join("old-cert.pem");
    std::fs::copy(&server.cert, &old_cert).unwrap();
    let mut old_conn = server.connect(Protocol::Http1).await;

    // A new pair in place of the generated one.
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.0.join("tls/key.pem"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.0.join("tls/cert.pem"), ck.cert.pem()).unwrap();
    server.signal("HUP");

    let addr = server.addr;
    let connect_with = |ca: std::path::PathBuf| async move {
        let tls = tls_config(&ca, Protocol::Http1).unwrap();
        Connection::connect(addr, tls, Protocol::Http1).await
    };
    let reloaded = eventually(Duration::from_secs(5), || async {
        connect_with(dir.0.join("tls/cert.pem"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(
        reloaded.is_some(),
        "the new certificate was not served after SIGHUP"
    );
    assert!(
        connect_with(old_cert.clone()).await.is_err(),
        "new handshakes must not get the old certificate"
    );
    // The connection made before the reload still works.
    let r = old_conn
        .post("/api/key/GetKey", &activate(&seed, &key, ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // A broken pair is refused and the current one stays.
    std::fs::write(dir.0.join("tls/key.pem"), "not a key").unwrap();
    server.signal("HUP");
    let failed = eventually(Duration::from_secs(5), || async {
        let (_, m) = server.admin_get("/metrics");
        (sample(&m, r#"keygate_tls_reloads_total{result="failed"}"#) == Some(1.0)).then_some(())
    })
    .await;
    assert!(failed.is_some(), "the failed reload was not counted");
    assert!(server.running());
    let mut c = connect_with(dir.0.join("tls/cert.pem")).await.unwrap();
    let r = c
        .post("/api/key/GetKey", &activate(&seed, &key, ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let (_, m) = server.admin_get("/metrics");
    assert_eq!(
        sample(&m, r#"keygate_tls_reloads_total{result="ok"}"#),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let dir = TempDir::new("xff");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "10"]);
    async fn send(server: &Server, body: String) {
        let mut c = server.connect(Protocol::Http1).await;
        let headers = [("X-Forwarded-For", "198.51.100.23, 203.0.113.50")];
        let r = c
            .request("POST", "/api/key/Activate", &headers, body)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // No trusted proxies: a client cannot choose its logged IP.
    let mut server = Server::start(&dir.0, &[]);
    send(&server, activate(&seed, &key, "spoofer")).await;
    server.stop();
    // Loopback as the trusted proxy: the nearest untrusted hop is the client.
    let mut server = Server::start(
        &dir.0,
        &[
            ("KEYGATE_SERVER__TRUSTED_PROXIES", r#"["127.0.0.0/8"]"#),
            // This node keeps whole addresses in its log.
            ("KEYGATE_PRIVACY__LOG_IPV4_PREFIX", "32"),
        ],
    );
    send(&server, activate(&seed, &key, "proxied")).await;
    server.stop();

    let ips = seed.mids_and_ips(&dir.0, &key);
    assert_eq!(
        ips,
        [
            ("spoofer".into(), "127.0.0.1".into()),
            ("proxied".into(), "203.0.113.50".into())
        ]
    );
    let logs = cli(&dir.0, &["log", "list", "--limit", "10"]);
    let log_ips: Vec<&str> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["client_ip"].as_str().unwrap())
        .collect();
    // Newest first; the first node kept the default /24.
    assert_eq!(log_ips, ["203.0.113.50", "127.0.0.0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_with_429_and_count() {
    let dir = TempDir::new("rate");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "10"]);
    const TOO_MANY: &str = "Too many requests. Please try again later.";

    // Per client IP: a burst of 5 at 1/s, so the 6th request in a row is refused.
    let mut server = Server::start(
        &dir.0,
        &[
            ("KEYGATE_RATE_LIMITS__PER_CLIENT_IP_PER_SECOND", "1"),
            ("KEYGATE_RATE_LIMITS__PER_CLIENT_IP_BURST", "5"),
        ],
    );
    let mut c = server.connect(Protocol::Http2).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            c.post("/api/key/GetKey", &activate(&seed, &key, ""))
                .await
                .unwrap(),
        );
    }
    let codes: Vec<u16> = statuses.iter().map(|r| r.status).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
    let v = statuses[5].json().unwrap();
    assert_eq!(
        (v["result"].as_i64(), v["message"].as_str()),
        (Some(1), Some(TOO_MANY))
    );
    let (_, m) = server.admin_get("/metrics");
    assert_eq!(
        sample(&m, r#"keygate_rate_limited_total{limit="client_ip"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"keygate_requests_total{method="getkey",result="rate_limited"}"#
        ),
        Some(1.0)
    );
    server.stop();

    // Per license: two new machines a minute; known machines and other licenses still pass.
    let other = seed.key(&dir.0, &["--max-machines", "10"]);
    let mut server = Server::start(
        &dir.0,
        &[(
            "KEYGATE_RATE_LIMITS__NEW_MACHINES_PER_LICENSE_PER_MINUTE",
            "2",
        )],
    );
    let mut c = server.connect(Protocol::Http1).await;
    let cases = [
        (&key, "m1", 200, "new"),
        (&key, "m2", 200, "new"),
        (&key, "m3", 429, "a third new machine within the minute"),
        (&key, "m1", 200, "re-activation is not churn"),
        (&other, "m3", 200, "each license has its own budget"),
    ];
    for (k, m, want, why) in cases {
        let r = c
            .post("/api/key/Activate", &activate(&seed, k, m))
            .await
            .unwrap();
        assert_eq!(r.status, want, "{m}: {why}: {}", r.text());
    }
    server.stop();
    assert_eq!(
        seed.mids(&dir.0, &key),
        ["m1", "m2"],
        "the refused machine was not recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_cut_off_while_normal_clients_are_served() {
    let dir = TempDir::new("headers");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &[]);
    let server = Server::start(&dir.0, &[("KEYGATE_SERVER__MAX_HEADER_BYTES", "8192")]);
    let mut normal = server.connect(Protocol::Http1).await;
    let big = "x".repeat(20_000);
    for proto in [Protocol::Http1, Protocol::Http2] {
        let mut c = server.connect(proto).await;
        let refused = c
            .request(
                "POST",
                "/api/key/GetKey",
                &[("X-Padding", &big)],
                activate(&seed, &key, ""),
            )
            .await;
        // HTTP/1.1 answers 431; HTTP/2 resets the stream or the connection.
        if let Ok(r) = refused {
            assert_eq!(r.status, 431, "{proto:?}: {}", r.text());
        }
        let r = normal
            .post("/api/key/GetKey", &activate(&seed, &key, ""))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "other clients are still served");
    }
}

/// A PROXY protocol v2 PROXY/TCP4 header, built by hand from the specification.
fn proxy_v2(src: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&4711u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_names_the_client_and_plain_http_is_opt_in() {
    let dir = TempDir::new("ppv2");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "10"]);
    // A PROXY header from a peer that is not a trusted proxy closes the connection.
    let mut server = Server::start(
        &dir.0,
        &[
            ("KEYGATE_SERVER__PROXY_PROTOCOL", "true"),
            ("KEYGATE_SERVER__TRUSTED_PROXIES", r#"["10.0.0.0/8"]"#),
        ],
    );
    assert!(server.plain.is_none(), "no plain HTTP unless configured");
    let tls = tls_config(&server.cert, Protocol::Http1).unwrap();
    let spoof = proxy_v2([198, 51, 100, 1]);
    let refused = Connection::connect_with_prefix(server.addr, tls, Protocol::Http1, &spoof).await;
    assert!(refused.is_err());
    let (_, m) = server.admin_get("/metrics");
    assert_eq!(
        sample(
            &m,
            r#"keygate_proxy_protocol_refused_total{reason="untrusted_peer"}"#
        ),
        Some(1.0)
    );
    server.stop();

    let mut server = Server::start(
        &dir.0,
        &[
            ("KEYGATE_SERVER__PROXY_PROTOCOL", "true"),
            ("KEYGATE_SERVER__TRUSTED_PROXIES", r#"["127.0.0.1"]"#),
            ("KEYGATE_SERVER__PLAIN_HTTP_LISTEN", "127.0.0.1:0"),
        ],
    );
    let tls = tls_config(&server.cert, Protocol::Http2).unwrap();
    let mut c = Connection::connect_with_prefix(
        server.addr,
        tls.clone(),
        Protocol::Http2,
        &proxy_v2([198, 51, 100, 77]),
    )
    .await
    .unwrap();
    let r = c
        .post("/api/key/Activate", &activate(&seed, &key, "via-tls"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Without the header the connection is refused (the TLS hello is not a PROXY header).
    assert!(Connection::connect(server.addr, tls, Protocol::Http2)
        .await
        .is_err());
    // Plain HTTP, also behind the PROXY header.
    let plain = server.plain.expect("plain listener");
    let mut tcp = tokio::net::TcpStream::connect(plain).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = activate(&seed, &key, "via-plain");
    let req = format!(
        "POST /api/key/Activate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(&proxy_v2([203, 0, 113, 88])).await.unwrap();
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let (_, m) = server.admin_get("/metrics");
    assert_eq!(
        sample(
            &m,
            r#"keygate_proxy_protocol_refused_total{reason="invalid_header"}"#
        ),
        Some(1.0),
        "{m}"
    );
    server.stop();

    let ips = seed.mids_and_ips(&dir.0, &key);
    assert_eq!(
        ips,
        [
            ("via-tls".into(), "198.51.100.77".into()),
            ("via-plain".into(), "203.0.113.88".into())
        ]
    );
}

/// The key exchange a default rustls client ends up with: the hybrid post-quantum group unless
/// `server.tls_post_quantum` is false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_quantum_key_exchange_is_preferred_unless_turned_off() {
    async fn negotiated(server: &Server) -> String {
        let tls = tls_config(&server.cert, Protocol::Http1).unwrap();
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(server.addr.ip().into());
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        let group = stream.get_ref().1.negotiated_key_exchange_group().unwrap();
        format!("{:?}", group.name())
    }
    let dir = TempDir::new("pq");
    let mut server = Server::start(&dir.0, &[]);
    assert_eq!(negotiated(&server).await, "X25519MLKEM768");
    server.stop();
    let mut server = Server::start(&dir.0, &[("KEYGATE_SERVER__TLS_POST_QUANTUM", "false")]);
    assert_eq!(negotiated(&server).await, "X25519");
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_address_is_exported_then_erased_everywhere() {
    let dir = TempDir::new("erase-ip");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "3"]);
    let ip = "198.51.100.77";
    // Behind a trusted proxy that names the client, and a log that keeps whole addresses.
    let mut server = Server::start(
        &dir.0,
        &[
            ("KEYGATE_SERVER__TRUSTED_PROXIES", r#"["127.0.0.1"]"#),
            ("KEYGATE_PRIVACY__LOG_IPV4_PREFIX", "32"),
        ],
    );
    let mut c = server.connect(Protocol::Http1).await;
    let r = c
        .request(
            "POST",
            "/api/key/Activate",
            &[("X-Forwarded-For", ip)],
            activate(&seed, &key, "m1"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    async fn getkey(c: &mut Connection, body: String) -> String {
        let r = c.post("/api/key/GetKey", &body).await.unwrap();
        license_text(&r.text())
    }
    assert!(getkey(&mut c, activate(&seed, &key, "")).await.contains(ip));
    let exported = eventually(Duration::from_secs(5), || async {
        let e = cli(&dir.0, &["privacy", "export", "--ip", ip]);
        // The activation (through the activation log) and the log row reach the store in
        // separate batches, in either order.
        let arrived = |k: &str| !e[k].as_array().unwrap().is_empty();
        (arrived("request_log") && arrived("activations")).then_some(e)
    })
    .await
    .expect("the activation and the log row reach the store");
    assert_eq!(
        exported["activations"].as_array().unwrap().len(),
        1,
        "{exported}"
    );

    let erased = cli(&dir.0, &["privacy", "erase", "--ip", ip]);
    assert_eq!(erased["erased"]["activations"], 1, "{erased}");
    let after = cli(&dir.0, &["privacy", "export", "--ip", ip]);
    assert!(
        after["activations"].as_array().unwrap().is_empty()
            && after["request_log"].as_array().unwrap().is_empty(),
        "{after}"
    );
    for v in [
        cli(
            &dir.0,
            &[
                "key",
                "show",
                "--product",
                &seed.product.to_string(),
                "--key",
                &key,
            ],
        ),
        cli(&dir.0, &["log", "list", "--limit", "100"]),
    ] {
        assert!(!v.to_string().contains(ip), "{v}");
    }
    let forgotten = eventually(Duration::from_secs(5), || async {
        let mut c = server.connect(Protocol::Http1).await;
        (!getkey(&mut c, activate(&seed, &key, "")).await.contains(ip)).then_some(())
    })
    .await;
    assert!(
        forgotten.is_some(),
        "the node still answers with the erased IP"
    );
    server.stop();
    assert_eq!(
        seed.mids(&dir.0, &key),
        ["m1"],
        "the activation itself stays"
    );
}
