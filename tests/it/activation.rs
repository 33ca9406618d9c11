//! Activation behaviour over real sockets: parallel activations never exceed the limit, state
//! survives a restart, every request is logged with client and proxy IP, h1 and h2 both serve.

use super::helpers::{answer, cli, eventually, license_text, raw_tls, Seed, Server, TempDir};
use keygate_loadtest::{form, Protocol};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const LIMIT_MSG: &str = "Cannot activate the new device as the limit has been reached.";

fn activate_form(seed: &Seed, key: &str, machine: &str) -> String {
    form(&[
        ("token", &seed.token),
        ("ProductId", &seed.product.to_string()),
        ("Key", key),
        ("MachineCode", machine),
        ("Sign", "true"),
        ("SignMethod", "1"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_new_machines_never_exceed_the_limit_and_survive_restart() {
    let dir = TempDir::new("limit");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "5"]);
    let mut server = Server::start(&dir.0, &[]);

    // 4 HTTP/2 connections x 60 concurrent streams + 4 HTTP/1.1 connections x 15 sequential.
    let mut tasks = Vec::new();
    for c in 0..4 {
        let conn = server.connect(Protocol::Http2).await;
        for s in 0..60 {
            let mut h = conn.clone_h2().unwrap();
            let body = activate_form(&seed, &key, &format!("h2-{c}-{s}"));
            tasks.push(tokio::spawn(async move {
                vec![h.post("/api/key/Activate", &body).await.unwrap()]
            }));
        }
    }
    for c in 0..4 {
        let mut conn = server.connect(Protocol::Http1).await;
        let bodies: Vec<String> = (0..15)
            .map(|s| activate_form(&seed, &key, &format!("h1-{c}-{s}")))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut replies = Vec::new();
            for b in bodies {
                replies.push(conn.post("/api/key/activate", &b).await.unwrap());
            }
            replies
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for r in futures_flatten(tasks).await {
        let v = r.json().unwrap();
        if r.status == 200 {
            assert_eq!(v["result"], 0);
            ok += 1;
        } else {
            assert_eq!(
                (r.status, v["result"].as_i64(), v["message"].as_str()),
                (400, Some(1), Some(LIMIT_MSG))
            );
            refused += 1;
        }
    }
    assert_eq!(
        (ok, refused),
        (5, 295),
        "300 distinct machines on a limit of 5"
    );
    // Exactly five machines are recorded, in the store after a clean stop.
    server.stop();
    let machines = seed.mids(&dir.0, &key);
    assert_eq!(machines.len(), 5, "{machines:?}");

    // After a restart the same five are known and a sixth is still refused.
    let server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    for m in &machines {
        let r = conn
            .post("/api/key/Activate", &activate_form(&seed, &key, m))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = conn
        .post("/api/key/Activate", &activate_form(&seed, &key, "newcomer"))
        .await
        .unwrap();
    assert_eq!(r.json().unwrap()["message"], LIMIT_MSG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floating_leases_persist_and_expired_ones_are_pruned_from_the_store() {
    let dir = TempDir::new("float");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "2"]);
    let mut server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    let lease = |m: &str, secs: u32| {
        format!(
            "{}&FloatingTimeInterval={secs}",
            activate_form(&seed, &key, m)
        )
    };
    for (m, secs) in [("short", 3), ("long", 600)] {
        let r = conn
            .post("/api/key/Activate", &lease(m, secs))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Both seats are taken until the three-second lease has run out. Times are whole seconds:
    // with a one-second lease, a third call in the next second (a few milliseconds later
    // across a second boundary) already found it expired, so CI sometimes saw 200 here.
    let r = conn
        .post("/api/key/Activate", &lease("third", 600))
        .await
        .unwrap();
    assert_eq!(
        r.json().unwrap()["message"],
        "Cannot activate the new device as the limit has been reached."
    );
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let r = conn
        .post("/api/key/Activate", &lease("third", 600))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    server.stop();

    let mids = seed.mids(&dir.0, &key);
    assert_eq!(
        mids,
        ["floating:long", "floating:third"],
        "the expired lease is gone from the store"
    );

    // After a restart both live leases still hold their seats.
    let server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    let r = conn
        .post("/api/key/Activate", &lease("fourth", 600))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = conn
        .post("/api/key/Activate", &lease("long", 600))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "a heartbeat after restart renews: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_with_client_and_proxy_ip() {
    let dir = TempDir::new("log");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "1"]);
    let mut server = Server::start(&dir.0, &[("KEYGATE_SERVER__PROXY_IP", "192.0.2.7")]);
    let mut conn = server.connect(Protocol::Http2).await;
    let mut codes = Vec::new();
    for (i, (machine, name)) in [("m1", "laptop"), ("m1", ""), ("m2", "")]
        .iter()
        .enumerate()
    {
        let body = format!(
            "{}&FriendlyName={name}",
            activate_form(&seed, &key, machine)
        );
        let r = conn.post("/api/key/Activate", &body).await.unwrap();
        assert_eq!(r.status, if i < 2 { 200 } else { 400 }, "{}", r.text());
    }
    codes.extend([2011, 2010, 2021]);
    let r = conn
        .post("/api/key/GetKey", &activate_form(&seed, &key, ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    codes.push(1010);
    let r = conn
        .post("/api/key/activate", "token=nope&ProductId=1&Key=K")
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    codes.push(2020);
    let r = conn.post("/api/key/Unknown", "").await.unwrap();
    assert_eq!(r.status, 404);
    codes.push(5020);
    server.stop();

    let logs = cli(&dir.0, &["log", "list", "--limit", "100"]);
    let mut rows: Vec<_> = logs["logs"].as_array().unwrap().clone();
    rows.reverse();
    let got: Vec<i64> = rows.iter().map(|r| r["state"].as_i64().unwrap()).collect();
    assert_eq!(got, codes);
    for r in &rows {
        // The log keeps the client's /24 (privacy.log_ipv4_prefix); the activation keeps it all.
        assert_eq!(r["client_ip"], "127.0.0.0");
        assert_eq!(r["proxy_ip"], "192.0.2.7");
        assert!(r["time"].as_i64().unwrap() > 1_700_000_000);
    }
    assert_eq!(rows[0]["machine_code"], "m1");
    assert_eq!(rows[0]["friendly_name"], "laptop");
    assert_eq!(rows[0]["product_id"], seed.product);
    assert_eq!(rows[0]["key_id"], 1);
    assert_eq!(rows[0]["tenant_id"], seed.tenant);
    // The activation records the client IP, the proxy IP and the first-activation time.
    let a = &seed.activations(&dir.0, &key)[0];
    assert_eq!(
        (a["mid"].as_str(), a["ip"].as_str(), a["proxy_ip"].as_str()),
        (Some("m1"), Some("127.0.0.1"), Some("192.0.2.7"))
    );
    assert_eq!(a["time"], rows[0]["time"]);
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A call's time is read once, when its head arrives: with the body sent 2.5 s later, the new
/// activation and its log row both carry the second the head was sent in (or the next, should
/// the head's delivery cross a second boundary); a time read after the body would be at least
/// two seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_has_one_time_read_when_its_head_arrives() {
    let dir = TempDir::new("call-time");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "2"]);
    let mut server = Server::start(&dir.0, &[]);
    let body = activate_form(&seed, &key, "slow-body");
    let mut s = raw_tls(&server).await;
    let before = unix_seconds();
    let head = format!(
        "POST /api/key/Activate HTTP/1.1\r\nHost: k\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let head_sent = unix_seconds();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.write_all(body.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let text = answer(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    server.stop();

    let logs = cli(&dir.0, &["log", "list", "--limit", "10"]);
    let row = &logs["logs"].as_array().unwrap()[0];
    assert_eq!(row["state"], 2011, "{row}");
    let time = row["time"].as_i64().unwrap();
    assert!(
        (before..=head_sent + 1).contains(&time),
        "logged at {time}, head sent in {before}..={head_sent}, body 2.5 s later"
    );
    assert_eq!(seed.activations(&dir.0, &key)[0]["time"], time);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_requests_with_query_strings_work_like_posts() {
    let dir = TempDir::new("get");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "2"]);
    let server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    let q = activate_form(&seed, &key, "browser");
    let r = conn
        .request("GET", &format!("/api/key/Activate?{q}"), &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["result"], 0);
    // Signed with the tenant's key, over exactly the licenseKey bytes.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let xml = &seed.public_key;
    let modulus = b64
        .decode(&xml["<RSAKeyValue><Modulus>".len()..xml.find("</Modulus>").unwrap()])
        .unwrap();
    let lk = b64.decode(v["licenseKey"].as_str().unwrap()).unwrap();
    let sig = b64.decode(v["signature"].as_str().unwrap()).unwrap();
    assert!(keygate::signing::verify_sha256(
        &modulus,
        &[1, 0, 1],
        &lk,
        &sig
    ));
    let lic: serde_json::Value = serde_json::from_slice(&lk).unwrap();
    assert_eq!(lic["ActivatedMachines"][0]["Mid"], "browser");
    assert_eq!(lic["Key"], key.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_changes_reach_a_running_node() {
    let dir = TempDir::new("sync");
    let server = Server::start(&dir.0, &[]);
    // Everything is created while the node runs.
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "1"]);
    let conn = server.connect(Protocol::Http2).await;
    let body = activate_form(&seed, &key, "m");
    let ok = super::helpers::eventually(Duration::from_secs(10), || {
        let mut c = conn.clone_h2().unwrap();
        let b = body.clone();
        async move { (c.post("/api/key/Activate", &b).await.unwrap().status == 200).then_some(()) }
    })
    .await;
    assert!(
        ok.is_some(),
        "a key created while serving was not picked up within 10 s"
    );
    cli(
        &dir.0,
        &[
            "key",
            "block",
            "--product",
            &seed.product.to_string(),
            "--key",
            &key,
        ],
    );
    let blocked = super::helpers::eventually(Duration::from_secs(10), || {
        let mut c = conn.clone_h2().unwrap();
        let b = body.clone();
        async move {
            let v = c
                .post("/api/key/Activate", &b)
                .await
                .unwrap()
                .json()
                .unwrap();
            (v["message"] == "The key is blocked and cannot be accessed.").then_some(())
        }
    })
    .await;
    assert!(blocked.is_some(), "a block was not applied within 10 s");
}

async fn futures_flatten(
    tasks: Vec<tokio::task::JoinHandle<Vec<keygate_loadtest::Reply>>>,
) -> Vec<keygate_loadtest::Reply> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_answers_come_from_the_cache_until_the_license_changes() {
    let dir = TempDir::new("cache");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "5"]);
    let mut server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http2).await;
    async fn ok(conn: &mut keygate_loadtest::Connection, body: String) -> String {
        let r = conn.post("/api/key/Activate", &body).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }
    let first = ok(&mut conn, activate_form(&seed, &key, "m1")).await;
    let again = ok(&mut conn, activate_form(&seed, &key, "m1")).await;
    let third = ok(&mut conn, activate_form(&seed, &key, "m1")).await;
    assert_eq!(again, third, "an unchanged answer is reused byte for byte");
    // A new machine changes the license, so m1's next answer is signed afresh and lists m2.
    ok(&mut conn, activate_form(&seed, &key, "m2")).await;
    let after = ok(&mut conn, activate_form(&seed, &key, "m1")).await;
    assert_ne!(after, third);
    assert!(!license_text(&first).contains("\"Mid\":\"m2\""));
    assert!(
        license_text(&after).contains("\"Mid\":\"m2\""),
        "{}",
        license_text(&after)
    );
    let (_, m) = server.admin_get("/metrics");
    let hits = m
        .lines()
        .find_map(|l| l.strip_prefix(r#"keygate_response_cache_total{result="hit"} "#))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(hits, Some(1.0), "{m}");

    // A floating lease that runs out leaves the answer without any change to the license: the
    // next GetKey must not come from the cache that still listed it.
    let getkey = format!("{}&ModelVersion=3", activate_form(&seed, &key, ""));
    // Three seconds: a lease ends on a whole second, so with one second a GetKey a few
    // milliseconds later could cross its end (the floating-lease test's race, 902b0b8).
    let lease = format!(
        "{}&FloatingTimeInterval=3",
        activate_form(&seed, &key, "f1")
    );
    ok(&mut conn, lease).await;
    let listed = conn.post("/api/key/GetKey", &getkey).await.unwrap().text();
    let again = conn.post("/api/key/GetKey", &getkey).await.unwrap().text();
    assert_eq!(listed, again, "cached");
    assert!(
        license_text(&listed).contains("\"Mid\":\"floating:f1\""),
        "{}",
        license_text(&listed)
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let expired = conn.post("/api/key/GetKey", &getkey).await.unwrap().text();
    assert!(
        !license_text(&expired).contains("floating:f1"),
        "{}",
        license_text(&expired)
    );
    // A block is a rejection decided before any cache lookup.
    let pid = seed.product.to_string();
    cli(&dir.0, &["key", "block", "--product", &pid, "--key", &key]);
    let blocked = eventually(Duration::from_secs(5), || async {
        let mut c = server.connect(Protocol::Http1).await;
        let r = c
            .post("/api/key/Activate", &activate_form(&seed, &key, "m1"))
            .await
            .unwrap();
        (r.status == 400).then(|| r.json().unwrap()["message"].clone())
    })
    .await;
    assert_eq!(
        blocked.unwrap(),
        "The key is blocked and cannot be accessed."
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn administrative_actions_are_audited_append_only() {
    let dir = TempDir::new("audit");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "1"]);
    let pid = seed.product.to_string();
    cli(&dir.0, &["key", "block", "--product", &pid, "--key", &key]);
    cli(
        &dir.0,
        &["key", "unblock", "--product", &pid, "--key", &key],
    );
    let audit = cli(&dir.0, &["audit", "list"]);
    let mut actions: Vec<String> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert!(a["actor"].as_str().unwrap().starts_with("cli:"), "{a}");
            assert!(a["time"].as_i64().unwrap() > 1_700_000_000);
            format!(
                "{} {}",
                a["action"].as_str().unwrap(),
                a["entity"].as_str().unwrap()
            )
        })
        .collect();
    actions.reverse();
    assert_eq!(
        actions,
        [
            "tenant.create tenant",
            "product.create product",
            "token.create token",
            "key.create key",
            "key.block key",
            "key.unblock key"
        ]
    );
    // Never the token itself.
    assert!(!audit.to_string().contains(&seed.token));
    // A trial key made through the API is audited under the API's name.
    let mut server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    let body = form(&[
        ("token", &seed.token),
        ("ProductId", &pid),
        ("MachineCode", "trial-pc"),
    ]);
    let r = conn.post("/api/key/CreateTrialKey", &body).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    server.stop();
    let newest = &cli(&dir.0, &["audit", "list", "--limit", "1"])["audit"][0];
    assert_eq!(
        (newest["actor"].as_str(), newest["action"].as_str()),
        (Some("api:CreateTrialKey"), Some("key.create"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_is_exported_then_erased_everywhere() {
    let dir = TempDir::new("erase");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "2"]);
    let pid = seed.product.to_string();
    let gone = "erase-me-7f3a9c";
    let mut server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    for m in [gone, "stays"] {
        let body = format!("{}&FriendlyName=laptop-{m}", activate_form(&seed, &key, m));
        let r = conn.post("/api/key/Activate", &body).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let trial = form(&[
        ("token", &seed.token),
        ("ProductId", &pid),
        ("MachineCode", gone),
    ]);
    assert_eq!(
        conn.post("/api/key/CreateTrialKey", &trial)
            .await
            .unwrap()
            .status,
        200
    );
    // The writer commits within its flush interval; the export reads the store.
    let exported = eventually(Duration::from_secs(5), || async {
        let e = cli(&dir.0, &["privacy", "export", "--machine-code", gone]);
        // Activations (through the activation log) and log rows arrive in separate batches.
        let n = |k: &str| e[k].as_array().unwrap().len();
        (n("request_log") >= 2 && n("activations") >= 2).then_some(e)
    })
    .await
    .expect("the activations and log rows reach the store");
    // Two activations (the key, and the trial key made for it), the trial key, the log rows.
    assert_eq!(
        exported["activations"].as_array().unwrap().len(),
        2,
        "{exported}"
    );
    assert_eq!(
        exported["activations"][0]["friendly_name"],
        format!("laptop-{gone}")
    );
    assert_eq!(
        exported["trial_keys"].as_array().unwrap().len(),
        1,
        "{exported}"
    );

    let erased = cli(&dir.0, &["privacy", "erase", "--machine-code", gone]);
    assert_eq!(erased["erased"]["activations"], 2, "{erased}");
    assert_eq!(erased["erased"]["trial_keys"], 1, "{erased}");
    // No CLI finds it any more.
    let after = cli(&dir.0, &["privacy", "export", "--machine-code", gone]);
    for part in ["activations", "request_log", "trial_keys"] {
        assert_eq!(after[part].as_array().unwrap().len(), 0, "{part}: {after}");
    }
    let everything = [
        cli(&dir.0, &["key", "show", "--product", &pid, "--key", &key]),
        cli(&dir.0, &["log", "list", "--limit", "1000"]),
        cli(&dir.0, &["key", "list", "--product", &pid]),
        cli(&dir.0, &["audit", "list"]),
    ];
    for v in &everything {
        assert!(!v.to_string().contains(gone), "{v}");
    }
    assert_eq!(seed.mids(&dir.0, &key), ["stays"]);
    // The running node forgot it too: GetKey no longer lists it, and it activates as new.
    let listed = eventually(Duration::from_secs(5), || async {
        let mut c = server.connect(Protocol::Http1).await;
        let r = c
            .post("/api/key/GetKey", &activate_form(&seed, &key, ""))
            .await
            .unwrap();
        let text = license_text(&r.text());
        (!text.contains(gone)).then_some(text)
    })
    .await;
    assert!(listed.is_some(), "the node still lists the erased machine");
    let trial_again = conn.post("/api/key/CreateTrialKey", &trial).await.unwrap();
    assert_eq!(trial_again.status, 200, "{}", trial_again.text());
    let audit = cli(&dir.0, &["audit", "list", "--limit", "5"]);
    assert!(audit.to_string().contains("privacy.erase"), "{audit}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_and_a_locked_one_cannot_be_revoked() {
    let dir = TempDir::new("revoke");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &[]);
    let id = cli(&dir.0, &["token", "list"])["tokens"][0]["token_id"]
        .as_i64()
        .unwrap()
        .to_string();
    let server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    let r = conn
        .post("/api/key/GetKey", &activate_form(&seed, &key, ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    cli(&dir.0, &["token", "lock", "--id", &id]);
    let refused = super::helpers::keygate(&dir.0)
        .args(["token", "delete", "--id", &id])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("locked"));
    cli(&dir.0, &["token", "unlock", "--id", &id]);
    cli(&dir.0, &["token", "delete", "--id", &id]);
    assert_eq!(
        cli(&dir.0, &["token", "list"])["tokens"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let revoked = eventually(Duration::from_secs(5), || async {
        let mut c = server.connect(Protocol::Http1).await;
        let r = c
            .post("/api/key/GetKey", &activate_form(&seed, &key, ""))
            .await
            .unwrap();
        (r.status == 401).then(|| r.json().unwrap()["message"].clone())
    })
    .await;
    assert_eq!(revoked.unwrap(), "Unable to authenticate.");
    let audit = cli(&dir.0, &["audit", "list", "--limit", "3"]).to_string();
    for action in ["token.lock", "token.unlock", "token.delete"] {
        assert!(audit.contains(action), "{action}: {audit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_is_exported_then_erased_from_every_answer() {
    let dir = TempDir::new("customer");
    let seed = Seed::new(&dir.0);
    let email = "ada.lovelace.7c1@example.com";
    let key = seed.key(
        &dir.0,
        &[
            "--customer-name",
            "Ada Lovelace",
            "--customer-email",
            email,
            "--customer-company",
            "Engines",
        ],
    );
    let customer = cli(
        &dir.0,
        &[
            "key",
            "show",
            "--product",
            &seed.product.to_string(),
            "--key",
            &key,
        ],
    );
    let cid = customer["customer"]["id"]
        .as_i64()
        .expect("key show names the customer")
        .to_string();
    let server = Server::start(&dir.0, &[]);
    let mut conn = server.connect(Protocol::Http1).await;
    let before = conn
        .post("/api/key/GetKey", &activate_form(&seed, &key, ""))
        .await
        .unwrap();
    assert!(license_text(&before.text()).contains(email));

    let exported = cli(&dir.0, &["privacy", "export", "--customer", &cid]);
    assert_eq!(exported["customer"]["email"], email);
    assert_eq!(exported["keys"][0]["key"], key.as_str());
    let erased = cli(&dir.0, &["privacy", "erase", "--customer", &cid]);
    assert_eq!(erased["erased"]["keys_updated"], 1);
    assert_eq!(
        cli(&dir.0, &["privacy", "export", "--customer", &cid])["customer"]["email"],
        serde_json::Value::Null
    );
    // The node reloads the key: its answers no longer carry the customer's data.
    let clean = eventually(Duration::from_secs(5), || async {
        let mut c = server.connect(Protocol::Http1).await;
        let r = c
            .post("/api/key/GetKey", &activate_form(&seed, &key, ""))
            .await
            .unwrap();
        let text = license_text(&r.text());
        (!text.contains(email) && !text.contains("Lovelace")).then_some(text)
    })
    .await;
    assert!(
        clean.is_some(),
        "the node still answers with the erased customer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_product_cannot_be_deleted_and_a_deleted_one_is_gone_everywhere() {
    let dir = TempDir::new("product-lock");
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "3"]);
    let server = Server::start(&dir.0, &[]);
    let mut c = server.connect(Protocol::Http1).await;
    let r = c
        .post("/api/key/Activate", &activate_form(&seed, &key, "m1"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The activation reaches the store within a flush interval.
    for _ in 0..100 {
        if !seed.mids(&dir.0, &key).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let id = seed.product.to_string();
    cli(&dir.0, &["product", "lock", "--id", &id]);
    let refused = super::helpers::keygate(&dir.0)
        .args(["product", "delete", "--id", &id])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("locked"));
    assert_eq!(seed.mids(&dir.0, &key), ["m1"], "nothing was deleted");
    cli(&dir.0, &["product", "unlock", "--id", &id]);
    let deleted = cli(&dir.0, &["product", "delete", "--id", &id]);
    assert_eq!(deleted["keys_deleted"], 1);
    assert!(cli(&dir.0, &["product", "list"])["products"]
        .as_array()
        .unwrap()
        .is_empty());

    // The running node drops the product and its keys.
    let gone = eventually(Duration::from_secs(5), || async {
        let mut c = server.connect(Protocol::Http1).await;
        let r = c
            .post("/api/key/Activate", &activate_form(&seed, &key, "m1"))
            .await
            .unwrap();
        (r.status != 200).then(|| r.json().unwrap()["message"].clone())
    })
    .await;
    assert_eq!(gone.unwrap(), "Could not find the product.");
    let audit = cli(&dir.0, &["audit", "list", "--limit", "3"]).to_string();
    for action in ["product.lock", "product.unlock", "product.delete"] {
        assert!(audit.contains(action), "{action}: {audit}");
    }
}
