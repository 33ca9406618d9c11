//! Hostile and malformed input: every case gets a Cryptolens-style JSON error with a fitting
//! status, nothing panics or hangs, and normal clients keep being served afterwards.

use super::helpers::{answer, raw_tls, Seed, Server, TempDir};
use keygate_loadtest::{form, Protocol};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn assert_error(r: &keygate_loadtest::Reply, status: u16, message: &str) {
    let v = r
        .json()
        .unwrap_or_else(|_| panic!("not JSON: {}", r.text()));
    assert_eq!(
        (r.status, v["result"].as_i64(), v["message"].as_str()),
        (status, Some(1), Some(message)),
        "{}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors_and_the_server_stays_up() {
    let dir = TempDir::new("hostile");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "3"]);
    let server = Server::start(&dir.0, &[("KEYGATE_SERVER__BODY_READ_TIMEOUT_MS", "700")]);
    let pid = seed.product.to_string();
    let good = form(&[
        ("token", &seed.token),
        ("ProductId", &pid),
        ("Key", &key),
        ("MachineCode", "m"),
        ("SignMethod", "1"),
    ]);

    for proto in [Protocol::Http1, Protocol::Http2] {
        let mut c = server.connect(proto).await;
        let big = format!("{good}&pad={}", "x".repeat(20_000));
        assert_error(
            &c.post("/api/key/activate", &big).await.unwrap(),
            413,
            "The request body is too large.",
        );
        let mut c = server.connect(proto).await;
        let incorrect = "The input parameters were incorrect.";
        let cases: Vec<(String, u16, &str)> = vec![
            (
                format!("token={}&ProductId=abc&Key={key}", seed.token),
                400,
                incorrect,
            ),
            (
                format!("token={}&ProductId=%FF%FE&Key={key}", seed.token),
                400,
                incorrect,
            ),
            (
                format!("token={}&ProductId={pid}", seed.token),
                400,
                incorrect,
            ),
            (
                format!(
                    "token={}&ProductId={pid}&Key={key}&Metadata=perhaps",
                    seed.token
                ),
                400,
                incorrect,
            ),
            (
                format!(
                    "token={}&ProductId={pid}&Key={key}&MachineCode={}",
                    seed.token,
                    "m".repeat(2000)
                ),
                400,
                incorrect,
            ),
            (
                format!(
                    "token={}&ProductId=99999999999999999999&Key={key}",
                    seed.token
                ),
                400,
                incorrect,
            ),
            (
                format!("ProductId={pid}&Key={key}"),
                401,
                "Unable to authenticate.",
            ),
            (
                "token=%zz%&ProductId=1&Key=%".to_owned(),
                401,
                "Unable to authenticate.",
            ),
            (
                "\u{0}\u{1}==&&&%%%".to_owned(),
                401,
                "Unable to authenticate.",
            ),
            (
                format!("token={}&ProductId=424242&Key={key}", seed.token),
                400,
                "Could not find the product.",
            ),
            (
                format!("token={}&ProductId={pid}&Key=NOPE", seed.token),
                400,
                "Could not find the key.",
            ),
        ];
        for (body, status, msg) in &cases {
            assert_error(
                &c.post("/api/key/activate", body).await.unwrap(),
                *status,
                msg,
            );
        }
        assert_error(
            &c.post("/api/key/nothing", &good).await.unwrap(),
            404,
            "The requested method does not exist.",
        );
        assert_error(
            &c.post("/api/data/IncrementIntValueToKey", &good)
                .await
                .unwrap(),
            404,
            "The requested method does not exist.",
        );
        assert_error(
            &c.post("/Ext/Activate", &good).await.unwrap(),
            404,
            "Web API 2 is not supported. Please use Web API 3 (/api/key/Activate).",
        );
        assert_error(
            &c.request("PUT", "/api/key/activate", &[], good.clone())
                .await
                .unwrap(),
            405,
            "Only GET and POST are supported.",
        );
        assert_error(
            &c.request(
                "POST",
                "/api/key/activate",
                &[("content-encoding", "gzip")],
                good.clone(),
            )
            .await
            .unwrap(),
            415,
            "The request body must be application/x-www-form-urlencoded without content encoding.",
        );
        // Random bytes: always a JSON error, never a crash.
        let mut seedv: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..100 {
            let body: Vec<u8> = (0..256)
                .map(|_| {
                    seedv ^= seedv << 13;
                    seedv ^= seedv >> 7;
                    seedv ^= seedv << 17;
                    (seedv >> 24) as u8
                })
                .collect();
            let r = c
                .request("POST", "/api/key/GetKey", &[], body)
                .await
                .unwrap();
            assert_eq!(r.json().unwrap()["result"], 1, "{}", r.text());
        }
        let r = c.post("/api/key/activate", &good).await.unwrap();
        assert_eq!(
            r.status,
            200,
            "normal clients are still served: {}",
            r.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_broken_clients_are_cut_off() {
    let dir = TempDir::new("slow");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &[]);
    // 1.5 s timeouts: the 200 and 300 ms pauses below stay well within them on a loaded
    // machine, and every cut-off still comes inside `answer`'s 5 s.
    let server = Arc::new(Server::start(
        &dir.0,
        &[
            ("KEYGATE_SERVER__BODY_READ_TIMEOUT_MS", "1500"),
            ("KEYGATE_SERVER__HEADER_READ_TIMEOUT_MS", "1500"),
            ("KEYGATE_SERVER__TLS_HANDSHAKE_TIMEOUT_MS", "1500"),
        ],
    ));
    // A body that never completes: 408 with a JSON error, within a bounded time.
    let mut s = raw_tls(&server).await;
    s.write_all(b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ntoken=")
        .await
        .unwrap();
    let text = answer(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains(r#"{"result":1,"message":"The request body was not received in time."}"#),
        "{text}"
    );

    // A body that arrives in two parts, the second well within the timeout: answered. (The
    // timeout is armed only when the first read does not finish the body.)
    let get_key = form(&[
        ("token", &seed.token),
        ("ProductId", &seed.product.to_string()),
        ("Key", &key),
    ]);
    let (first, second) = get_key.split_at(get_key.len() / 2);
    let mut s = raw_tls(&server).await;
    let head = format!(
        "POST /api/key/GetKey HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{first}",
        get_key.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(second.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let text = answer(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""result":0"#), "{text}");

    // Chunked bodies (no declared length): one in three chunks is answered; one past the
    // body limit is refused with 413 once the limit is passed.
    let chunked = |chunks: &[&str]| {
        let mut req = String::from(
            "POST /api/key/GetKey HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        for c in chunks {
            req.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
        }
        req.push_str("0\r\n\r\n");
        req
    };
    let third = get_key.len() / 3;
    let parts = [
        &get_key[..third],
        &get_key[third..2 * third],
        &get_key[2 * third..],
    ];
    let pad = format!("&pad={}", "x".repeat(20_000));
    for (chunks, want) in [
        (chunked(&parts), "HTTP/1.1 200"),
        (chunked(&[&get_key, &pad]), "HTTP/1.1 413"),
    ] {
        let mut s = raw_tls(&server).await;
        s.write_all(chunks.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        let text = answer(&mut s).await;
        assert!(text.starts_with(want), "{want}: {text}");
        if want.ends_with("200") {
            assert!(text.contains(r#""result":0"#), "{text}");
        } else {
            assert!(
                text.contains(r#"{"result":1,"message":"The request body is too large."}"#),
                "{text}"
            );
        }
    }

    // A keep-alive connection: a request, another 300 ms later (inside the 1.5 s header
    // timeout, which restarts after each request), then silence. Both are answered, and the
    // idle connection is closed by the header timeout, not before it.
    let keep_alive = format!(
        "POST /api/key/GetKey HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{get_key}",
        get_key.len()
    );
    let mut s = raw_tls(&server).await;
    s.write_all(keep_alive.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(keep_alive.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let second_sent = std::time::Instant::now();
    let text = answer(&mut s).await;
    let idle = second_sent.elapsed();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert!(
        idle >= Duration::from_millis(1200),
        "closed {idle:?} after the last request, before the 1.5 s header timeout"
    );

    // Headers that never complete (slowloris): the connection is closed.
    let mut s = raw_tls(&server).await;
    s.write_all(b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // `answer` asserts the close comes within 5 s.
    answer(&mut s).await;

    // Plain TCP that never starts TLS, and plaintext HTTP on the TLS port: closed, no answer.
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "idle pre-TLS connection kept open: {r:?}"
    );
    let mut plain = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut b))
        .await
        .expect("plaintext not closed");

    // Meanwhile and afterwards, normal requests are served.
    let mut c = server.connect(Protocol::Http2).await;
    let body = form(&[
        ("token", &seed.token),
        ("ProductId", &seed.product.to_string()),
        ("Key", &key),
    ]);
    assert_eq!(c.post("/api/key/GetKey", &body).await.unwrap().status, 200);
}
