//! `ai/GetWebAPILog` over real sockets, on SQLite and on PostgreSQL: the calling tenant's rows
//! only, filters, cursors both ways, token scopes, and the Python SDK's own call.

use super::helpers::{use_postgres, Seed, Server, TempDir};
use keygate::testkit::TempPostgres;
use keygate_loadtest::{form, Connection, Protocol};
use serde_json::Value;
use std::time::Duration;

async fn post(conn: &mut Connection, path: &str, fields: &[(&str, &str)]) -> (u16, Value) {
    let r = conn.post(path, &form(fields)).await.unwrap();
    (
        r.status,
        serde_json::from_str(&r.text()).expect("a JSON body"),
    )
}

fn ids(v: &Value) -> Vec<i64> {
    v["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect()
}

async fn exercise(dir: &TempDir) {
    let seed = Seed::new(&dir.0);
    let key = seed.key(&dir.0, &["--max-machines", "100"]);
    let other_key = seed.key(&dir.0, &["--max-machines", "100"]);
    let product = seed.product.to_string();
    let reader = seed.token(&dir.0, &["--methods", "GetWebAPILog"]);
    // Another tenant with its own traffic: never visible to the first.
    let other = Seed::new(&dir.0);
    let other_tenant_key = other.key(&dir.0, &[]);
    let other_reader = other.token(&dir.0, &["--methods", "GetWebAPILog"]);

    let locked = seed.token(
        &dir.0,
        &[
            "--methods",
            "GetWebAPILog",
            "--product",
            &product,
            "--key-lock",
            "-1",
        ],
    );

    let server = Server::start(&dir.0, &[("KEYGATE_STORE__FLUSH_INTERVAL_MS", "20")]);
    let mut conn = server.connect(Protocol::Http1).await;
    // 12 activations on `key` (pc-0..pc-11, "Laptop" for the even ones), 3 on `other_key`,
    // one refused Deactivate, and the other tenant's 2.
    for i in 0..12 {
        let name = if i % 2 == 0 { "Ada's LAPTOP" } else { "desk_1" };
        let (s, _) = post(
            &mut conn,
            "/api/key/Activate",
            &[
                ("token", &seed.token),
                ("ProductId", &product),
                ("Key", &key),
                ("MachineCode", &format!("pc-{i}")),
                ("FriendlyName", name),
            ],
        )
        .await;
        assert_eq!(s, 200);
    }
    for i in 0..3 {
        post(
            &mut conn,
            "/api/key/Activate",
            &[
                ("token", &seed.token),
                ("ProductId", &product),
                ("Key", &other_key),
                ("MachineCode", &format!("o-{i}")),
            ],
        )
        .await;
    }
    let (s, _) = post(
        &mut conn,
        "/api/key/Deactivate",
        &[
            ("token", &seed.token),
            ("ProductId", &product),
            ("Key", &key),
            ("MachineCode", "never"),
        ],
    )
    .await;
    assert_eq!(s, 400);
    for i in 0..2 {
        post(
            &mut conn,
            "/api/key/Activate",
            &[
                ("token", &other.token),
                ("ProductId", &other.product.to_string()),
                ("Key", &other_tenant_key),
                ("MachineCode", &format!("x-{i}")),
            ],
        )
        .await;
    }
    // The rows reach the store within a flush interval.
    let mut all = Value::Null;
    for _ in 0..200 {
        let (s, v) = post(
            &mut conn,
            "/api/ai/GetWebAPILog",
            &[
                ("token", &reader),
                ("ProductId", &product),
                ("Limit", "1000"),
            ],
        )
        .await;
        assert_eq!(s, 200, "{v}");
        if v["logs"].as_array().unwrap().len() >= 16 {
            all = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let logs = all["logs"]
        .as_array()
        .expect("the tenant's 16 rows arrived");
    assert_eq!(
        logs.len(),
        16,
        "12 + 3 activations and 1 deactivation; never the other tenant's"
    );
    assert_eq!(all["result"], 0);
    let newest = &logs[0];
    assert_eq!(
        newest["state"], 6020,
        "newest first: the refused Deactivate"
    );
    let first = &logs[15];
    assert_eq!(
        (
            first["key"].as_str(),
            first["machineCode"].as_str(),
            first["friendlyName"].as_str(),
            first["state"].as_i64(),
            first["ip"].as_str(),
            first["productId"].as_i64()
        ),
        (
            Some(key.as_str()),
            Some("pc-0"),
            Some("Ada's LAPTOP"),
            Some(2011),
            Some("127.0.0.0"),
            Some(seed.product)
        )
    );
    let every: Vec<i64> = ids(&all);
    assert!(
        every.windows(2).all(|w| w[0] > w[1]),
        "descending ids: {every:?}"
    );

    // Default limit 10; the next page starts after the last id, without overlap or gap.
    // (With ProductId, so the log reads themselves, which name no product, stay out.)
    let (_, p1) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[("token", &reader), ("ProductId", &product)],
    )
    .await;
    assert_eq!(ids(&p1), every[..10]);
    let last = every[9].to_string();
    let (_, p2) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &reader),
            ("ProductId", &product),
            ("StartingAfter", &last),
        ],
    )
    .await;
    assert_eq!(ids(&p2), every[10..]);
    // And back: the page before p2's first id is p1's last 10, still newest first.
    let (_, back) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &reader),
            ("ProductId", &product),
            ("EndingBefore", &every[10].to_string()),
            ("Limit", "3"),
        ],
    )
    .await;
    assert_eq!(ids(&back), every[7..10]);
    // Ascending.
    let (_, asc) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &reader),
            ("ProductId", &product),
            ("OrderBy", "Id ascending"),
            ("Limit", "4"),
        ],
    )
    .await;
    let oldest: Vec<i64> = every.iter().rev().take(4).copied().collect();
    assert_eq!(ids(&asc), oldest);

    // Filters.
    let count = |v: &Value| v["logs"].as_array().unwrap().len();
    let (_, by_key) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &reader),
            ("ProductId", &product),
            ("Key", &other_key),
            ("Limit", "100"),
        ],
    )
    .await;
    assert_eq!(count(&by_key), 3);
    let (_, by_mc) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[("token", &reader), ("MachineCode", "pc-3")],
    )
    .await;
    assert_eq!(count(&by_mc), 1);
    let (_, by_name) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &reader),
            ("FriendlyName", "laptop"),
            ("Limit", "100"),
        ],
    )
    .await;
    assert_eq!(count(&by_name), 6, "contains, case-insensitive");
    let (_, wildcard) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &reader),
            ("FriendlyName", "k_1"),
            ("Limit", "100"),
        ],
    )
    .await;
    assert_eq!(count(&wildcard), 6, "`_` is a character, not a wildcard");
    let (_, by_state) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &reader),
            ("States", "[6020, 1010]"),
            ("Limit", "100"),
        ],
    )
    .await;
    assert_eq!(count(&by_state), 1);

    // Scopes and refusals.
    let (s, v) = post(&mut conn, "/api/ai/GetWebAPILog", &[("token", &seed.token)]).await;
    assert_eq!(
        (s, v["message"].as_str()),
        (403, Some("Access denied.")),
        "client tokens cannot read the log"
    );
    let (s, v) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[("token", &reader), ("Limit", "1001")],
    )
    .await;
    assert_eq!(
        (s, v["message"].as_str()),
        (400, Some("The input parameters were incorrect."))
    );
    let (s, v) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[("token", &other_reader), ("ProductId", &product)],
    )
    .await;
    assert_eq!(
        (s, v["message"].as_str()),
        (400, Some("Could not find the product.")),
        "another tenant's product"
    );
    // The other tenant sees its own two activations (once stored), nothing of the first's.
    let mut theirs = 0;
    for _ in 0..100 {
        let (_, v) = post(
            &mut conn,
            "/api/ai/GetWebAPILog",
            &[
                ("token", &other_reader),
                ("States", "[2010, 2011, 2012]"),
                ("Limit", "100"),
            ],
        )
        .await;
        theirs = count(&v);
        if theirs >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(theirs, 2);
    let (s, _) = post(&mut conn, "/api/ai/GetWebAPILog", &[("token", &locked)]).await;
    assert_eq!(s, 400, "a -1 key lock must name the key");
    let (s, v) = post(
        &mut conn,
        "/api/ai/GetWebAPILog",
        &[
            ("token", &locked),
            ("ProductId", &product),
            ("Key", &key),
            ("Limit", "100"),
        ],
    )
    .await;
    assert_eq!((s, count(&v)), (200, 13));
    // The reads themselves are logged (5011, tenant only), as every request is; they reach
    // the store within a flush interval.
    let mut reads = 0;
    for _ in 0..100 {
        let (_, v) = post(
            &mut conn,
            "/api/ai/GetWebAPILog",
            &[("token", &reader), ("States", "[5011]"), ("Limit", "1000")],
        )
        .await;
        reads = count(&v);
        if reads > 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reads > 10, "only {reads} reads logged");

    // The Python SDK's own call (licensing 0.54 `AI.get_web_api_log`) parses the answer.
    let python = std::env::var("KEYGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        r#"
from licensing.internal import HelperMethods
from licensing.methods import AI
HelperMethods.server_address = "{url}/api/"
logs, msg = AI.get_web_api_log("{reader}", product_id={product}, key="{key}", limit=5)
assert msg == "", msg
assert len(logs) == 5 and logs[0]["key"] == "{key}", logs
print("python ok", len(logs))
"#,
        url = server.url(),
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .env("SSL_CERT_FILE", &server.cert)
        .output()
        .expect("running python (KEYGATE_PYTHON)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("python ok 5"),
        "python SDK: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_api_log_on_sqlite() {
    let dir = TempDir::new("weblog");
    exercise(&dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_api_log_on_postgres() {
    let pg = TempPostgres::start();
    let dir = TempDir::new("weblog-pg");
    use_postgres(&dir.0, &pg.url());
    exercise(&dir).await;
}
