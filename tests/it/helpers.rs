//! Test harness: temp data dirs, the `keygate` CLI, and a served instance on a free port.

use keygate_loadtest::{tls_config, Connection, Protocol};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// A directory removed when dropped. With `KEYGATE_TEST_STORE=postgres` it also owns a private
/// PostgreSQL cluster and a `keygate.toml` pointing at it, so every CLI call and server on
/// this directory runs on PostgreSQL: the same system tests, on the other engine. With
/// `KEYGATE_TEST_STORE=redis` it owns a private redis-server instead, and every server on it
/// runs in distributed mode (SQLite store).
pub struct TempDir(
    pub PathBuf,
    #[expect(
        dead_code,
        reason = "held for its Drop: lives as long as the directory"
    )]
    Option<keygate::testkit::TempPostgres>,
    #[expect(
        dead_code,
        reason = "held for its Drop: lives as long as the directory"
    )]
    Option<keygate::testkit::TempRedis>,
);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "keygate-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        let (mut pg, mut redis) = (None, None);
        match std::env::var("KEYGATE_TEST_STORE").as_deref() {
            Ok("postgres") => {
                let cluster = keygate::testkit::TempPostgres::start();
                use_postgres(&p, &cluster.url());
                pg = Some(cluster);
            }
            Ok("redis") => {
                let server = keygate::testkit::TempRedis::start();
                std::fs::write(
                    p.join("keygate.toml"),
                    format!("[redis]\nurl = \"{}\"\n", server.url()),
                )
                .unwrap();
                redis = Some(server);
            }
            Ok("sqlite") | Err(_) => {}
            Ok(other) => panic!("KEYGATE_TEST_STORE={other}: expected sqlite, postgres or redis"),
        }
        TempDir(p, pg, redis)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `keygate --data-dir <dir>`, plus `--config <dir>/keygate.toml` when the test wrote one
/// (how a test points the CLI and the server at PostgreSQL).
pub fn keygate(data_dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir").arg(data_dir);
    let config = data_dir.join("keygate.toml");
    if config.exists() {
        cmd.arg("--config").arg(config);
    }
    cmd
}

/// Makes every later `cli` and `Server::start` on `data_dir` use this PostgreSQL store.
pub fn use_postgres(data_dir: &Path, url: &str) {
    std::fs::write(
        data_dir.join("keygate.toml"),
        format!("[store]\npostgres_url = \"{url}\"\n"),
    )
    .unwrap();
}

/// Runs a CLI command with `--json` and returns its output, failing the test on error.
pub fn cli(data_dir: &Path, args: &[&str]) -> Value {
    let out = keygate(data_dir)
        .args(args)
        .arg("--json")
        .output()
        .expect("running keygate");
    assert!(
        out.status.success(),
        "keygate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// The form of an Activate for `machine` on `key` with the seed's token and product.
pub fn activate(seed: &Seed, key: &str, machine: &str) -> String {
    keygate_loadtest::form(&[
        ("token", &seed.token),
        ("ProductId", &seed.product.to_string()),
        ("Key", key),
        ("MachineCode", machine),
        ("SignMethod", "1"),
    ])
}

/// Sends each (machine code, Activate form) in turn on `conn`; returns the machine codes
/// accepted. Every refusal must be the machine-limit one.
pub async fn activate_each(mut conn: Connection, bodies: Vec<(String, String)>) -> Vec<String> {
    let mut accepted = Vec::new();
    for (m, body) in bodies {
        let r = conn.post("/api/key/Activate", &body).await.unwrap();
        match r.status {
            200 => accepted.push(m),
            400 => assert!(r.text().contains("limit has been reached"), "{}", r.text()),
            s => panic!("{s}: {}", r.text()),
        }
    }
    accepted
}

/// A tenant with one product, one token for all methods and its public key.
pub struct Seed {
    pub tenant: i64,
    pub product: i64,
    pub token: String,
    pub public_key: String,
}

impl Seed {
    pub fn new(dir: &Path) -> Seed {
        let t = cli(dir, &["tenant", "create", "--name", "acme"]);
        let tenant = t["tenant_id"].as_i64().unwrap();
        let p = cli(
            dir,
            &[
                "product",
                "create",
                "--tenant",
                &tenant.to_string(),
                "--name",
                "app",
            ],
        );
        let product = p["product_id"].as_i64().unwrap();
        let tok = cli(dir, &["token", "create", "--tenant", &tenant.to_string()]);
        Seed {
            tenant,
            product,
            token: tok["token"].as_str().unwrap().to_owned(),
            public_key: t["public_key"].as_str().unwrap().to_owned(),
        }
    }

    /// Creates a key with extra `key create` flags; returns the key string.
    pub fn key(&self, dir: &Path, extra: &[&str]) -> String {
        let pid = self.product.to_string();
        let mut args = vec!["key", "create", "--product", &pid];
        args.extend_from_slice(extra);
        cli(dir, &args)["key"].as_str().unwrap().to_owned()
    }

    /// Creates another token for the seed's tenant with extra `token create` flags; returns
    /// the token.
    pub fn token(&self, dir: &Path, extra: &[&str]) -> String {
        let tid = self.tenant.to_string();
        let mut args = vec!["token", "create", "--tenant", &tid];
        args.extend_from_slice(extra);
        cli(dir, &args)["token"].as_str().unwrap().to_owned()
    }

    /// The key's global id (`key show`).
    pub fn global_id(&self, dir: &Path, key: &str) -> i64 {
        let pid = self.product.to_string();
        cli(dir, &["key", "show", "--product", &pid, "--key", key])["global_id"]
            .as_i64()
            .expect("key show gives the global id")
    }

    /// The key's activations as the store holds them (`key show`), in list order.
    pub fn activations(&self, dir: &Path, key: &str) -> Vec<Value> {
        let pid = self.product.to_string();
        let shown = cli(dir, &["key", "show", "--product", &pid, "--key", key]);
        shown["activations"]
            .as_array()
            .expect("key show lists activations")
            .clone()
    }

    /// `(mid, client IP)` of each stored activation, in list order.
    pub fn mids_and_ips(&self, dir: &Path, key: &str) -> Vec<(String, String)> {
        self.activations(dir, key)
            .iter()
            .map(|a| {
                (
                    a["mid"].as_str().unwrap().into(),
                    a["ip"].as_str().unwrap().into(),
                )
            })
            .collect()
    }

    /// The `mid` of each stored activation, in list order.
    pub fn mids(&self, dir: &Path, key: &str) -> Vec<String> {
        self.activations(dir, key)
            .iter()
            .map(|m| m["mid"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// A running `keygate serve`.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The plain-HTTP client listener, when `KEYGATE_SERVER__PLAIN_HTTP_LISTEN` turned it on.
    pub plain: Option<SocketAddr>,
    /// The admin listener (`/metrics`, `/livez`, `/readyz`), on its own free port.
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub cert: PathBuf,
}

impl Server {
    /// Starts on free loopback ports (client and admin) with a fast sync interval, no per-IP
    /// rate limit, and extra `KEYGATE_*` settings (which win).
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = keygate(data_dir);
        cmd.arg("serve")
            .env("KEYGATE_SERVER__LISTEN", "127.0.0.1:0")
            .env("KEYGATE_ADMIN__LISTEN", "127.0.0.1:0")
            // Every test client is 127.0.0.1; the rate-limit test turns this back on.
            .env("KEYGATE_RATE_LIMITS__PER_CLIENT_IP_PER_SECOND", "0")
            .env("KEYGATE_STORE__SYNC_INTERVAL_MS", "50")
            .env("KEYGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting keygate serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The client port first, then the plain-HTTP port if any, then the admin port.
        let (mut addr, mut plain) = (None, None);
        let admin = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("keygate did not report its addresses within 60 s");
            let url = |scheme: &str| -> Option<SocketAddr> {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(scheme))?
                    .parse()
                    .ok()
            };
            if line.starts_with("keygate listening on") {
                addr = url("https://");
            } else if line.starts_with("keygate plain HTTP on") {
                plain = url("http://");
            } else if line.starts_with("keygate admin on") {
                break url("http://").expect("admin address");
            } else {
                panic!("unexpected line: {line}");
            }
        };
        let addr = addr.expect("client address before the admin line");
        Server {
            child: Some(child),
            addr,
            plain,
            admin,
            data_dir: data_dir.to_owned(),
            cert: data_dir.join("tls/cert.pem"),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub async fn connect(&self, protocol: Protocol) -> Connection {
        let tls = tls_config(&self.cert, protocol).unwrap();
        Connection::connect(self.addr, tls, protocol).await.unwrap()
    }

    /// Sends a signal (`"TERM"`, `"HUP"`, ...) to the server process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "sending SIG{sig} failed");
    }

    /// GET on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).expect("admin port");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("admin response");
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (status, body)
    }

    /// SIGKILL: no drain, no flush, as a crash or an OOM kill.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM, then waits for a clean exit (connections drained, store writer flushed).
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        for _ in 0..600 {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "keygate exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        panic!("keygate did not exit within 30 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The decoded `licenseKey` JSON text of a license response body.
pub fn license_text(body: &str) -> String {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_str(body).expect("a JSON response");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["licenseKey"].as_str().expect("a licenseKey"))
        .unwrap();
    String::from_utf8(raw).unwrap()
}

/// Retries `f` until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A TLS connection (HTTP/1.1) to the node, for writing requests byte by byte.
pub async fn raw_tls(server: &Server) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = keygate_loadtest::tls_config(&server.cert, Protocol::Http1).unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls_pki_types::ServerName::IpAddress(server.addr.ip().into()),
            tcp,
        )
        .await
        .unwrap()
}

/// Everything the server sends until it closes the connection, which must be within 5 s.
pub async fn answer(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let mut buf = Vec::new();
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(s, &mut buf),
    )
    .await;
    assert!(n.is_ok(), "no answer within 5 s");
    String::from_utf8_lossy(&buf).into_owned()
}
