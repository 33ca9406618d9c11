//! Throw-away servers for tests and benchmarks: a PostgreSQL cluster of its own in a temporary
//! directory, on a free loopback port, that can be stopped and started again (fault tests)
//! and is removed on drop. Not used by `keygate` itself.
//!
//! A missing server binary is a test failure with the install command, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A private PostgreSQL cluster.
pub struct TempPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Run the server binaries as the `postgres` user (initdb refuses root).
    as_postgres: bool,
}

/// Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<version>/bin.
fn find_postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl TempPostgres {
    /// Creates and starts a cluster with `fsync = off` (tests).
    pub fn start() -> TempPostgres {
        Self::start_with(&[("fsync", "off")])
    }

    /// Creates and starts a cluster with these server settings.
    pub fn start_with(settings: &[(&str, &str)]) -> TempPostgres {
        let bin = find_postgres_bin().expect(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: apt-get install -y postgresql",
        );
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keygate-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the cluster directory");
        let pg = TempPostgres {
            dir,
            bin,
            port: free_port(),
            as_postgres: is_root(),
        };
        if pg.as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of {} to postgres failed", pg.dir.display());
        }
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "keygate",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let mut conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            pg.port,
            pg.dir.display()
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        let path = pg.data().join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&path, existing).expect("writing postgresql.auto.conf");
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again) on the same port and data.
    pub fn start_server(&self) {
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server: `fast` rolls back open transactions and closes connections, as a
    /// restart or a crash does for the clients.
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://keygate@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let mut c = postgres::Client::connect(&self.url(), postgres::NoTls)
            .expect("connecting to the test cluster");
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("creating a database");
        format!("postgres://keygate@127.0.0.1:{}/{name}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", &*data.to_string_lossy(), "-m", "immediate", "stop"].map(str::to_owned);
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(&args)
                .output()
        } else {
            Command::new(&exe).args(&args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private `redis-server` on a free loopback port, with its files in a temporary directory;
/// stopped (killed) on drop, and restartable on the same port for fault tests.
pub struct TempRedis {
    dir: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
    args: Vec<String>,
    tls: bool,
}

impl TempRedis {
    pub fn start() -> TempRedis {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments (`--aclfile <path>`, ...).
    pub fn start_with(args: &[&str]) -> TempRedis {
        Self::launch(args, false)
    }

    fn launch(args: &[&str], tls: bool) -> TempRedis {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keygate-redis-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the redis directory");
        let mut r = TempRedis {
            dir,
            port: free_port(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            tls,
        };
        r.start_server();
        r
    }

    /// TLS only (`rediss://` on `port()`): the server's certificate and key, and the CA it
    /// names for clients (which need no certificate of their own).
    pub fn start_tls(cert: &str, key: &str, ca: &str) -> TempRedis {
        Self::launch(
            &[
                "--tls-cert-file",
                cert,
                "--tls-key-file",
                key,
                "--tls-ca-cert-file",
                ca,
                "--tls-auth-clients",
                "no",
            ],
            true,
        )
    }

    /// Starts the server (again), with an append-only file so a restart keeps the data.
    pub fn start_server(&mut self) {
        let port = self.port.to_string();
        let ports: [&str; 4] = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server not found: apt-get install -y redis-server");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!(
            "redis-server did not listen on port {} within 5 s",
            self.port
        );
    }

    /// Kills the server (SIGKILL), as a crash.
    pub fn kill_server(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/?protocol=resp3", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.kill_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A three-master Redis Cluster on loopback (no replicas), built with `redis-cli --cluster
/// create`; every node is killed on drop.
pub struct TempRedisCluster {
    nodes: Vec<TempRedis>,
}

impl TempRedisCluster {
    pub fn start() -> TempRedisCluster {
        // The cluster bus listens on port + 10000: both must be free.
        let port = || loop {
            let p = free_port();
            if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                return p;
            }
        };
        let mut nodes = Vec::new();
        for _ in 0..3 {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("keygate-rcluster-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("creating the redis directory");
            let mut r = TempRedis {
                dir,
                port: port(),
                child: None,
                args: ["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]
                    .map(String::from)
                    .to_vec(),
                tls: false,
            };
            r.start_server();
            nodes.push(r);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli not found: apt-get install -y redis-server");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node agrees that all slots are served.
        for n in &nodes {
            let ok = (0..200).any(|_| {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
                false
            });
            assert!(ok, "the redis cluster did not become ready");
        }
        TempRedisCluster { nodes }
    }

    /// A URL of one node (clients discover the rest).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.nodes[0].port)
    }
}
