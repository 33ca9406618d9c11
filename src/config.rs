//! Typed configuration: built-in defaults, then a TOML file, then `KEYGATE_*` environment
//! variables (`KEYGATE_DATA_DIR`, `KEYGATE_SERVER__LISTEN`, ...), then validated with every
//! problem listed at once. The environment comes in as a map so tests never touch the process's.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite store, the generated certificate and other state live.
    pub data_dir: PathBuf,
    pub server: Server,
    pub store: StoreCfg,
    pub admin: Admin,
    pub rate_limits: RateLimitCfg,
    pub cache: CacheCfg,
    pub privacy: PrivacyCfg,
    pub redis: RedisCfg,
}

/// Distributed mode (`dist`): nodes share license activations through Redis.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisCfg {
    /// `redis://[user:password@]host:port/` (or `rediss://`); unset: one node on its own.
    pub url: Option<String>,
    /// `url` names one node of a Redis Cluster (the others are discovered).
    pub cluster: bool,
    /// For a `rediss://` URL: the CA certificate (PEM) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Streams the changes are spread over (and hash tags): more lets more nodes share the
    /// work of writing them to the main store. Every node must use the same number.
    pub shards: u64,
    /// A key whose stream entries the main store refuses: once its oldest waiting entry is
    /// this old, its newest is appended again at the end of the stream and the rest are
    /// acknowledged, so that the stream can be trimmed past them.
    pub requeue_refused_after_ms: u64,
}

impl Default for RedisCfg {
    fn default() -> Self {
        RedisCfg {
            url: None,
            cluster: false,
            ca_file: None,
            shards: 16,
            requeue_refused_after_ms: 60_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// HTTPS listen address; port 0 picks a free port (printed at start).
    pub listen: String,
    /// PEM certificate chain; when unset a self-signed one is generated in `data_dir/tls`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Subject names of the generated certificate.
    pub tls_names: Vec<String>,
    /// Prefer the hybrid post-quantum key exchange (X25519MLKEM768) with clients that offer
    /// it; false offers only classical groups, which makes new handshakes cheaper.
    pub tls_post_quantum: bool,
    /// The address recorded as this node's "proxy IP"; the local socket address when unset.
    pub proxy_ip: Option<String>,
    pub max_body_bytes: usize,
    /// Request line plus headers (HTTP/1.1), or the header list (HTTP/2).
    pub max_header_bytes: usize,
    /// Peers (CIDR ranges) whose `X-Forwarded-For` is believed; from anyone else it is ignored.
    pub trusted_proxies: Vec<String>,
    /// Every connection must start with a PROXY protocol v2 header from a trusted proxy.
    pub proxy_protocol: bool,
    /// Plain-HTTP client API (for a TLS-terminating balancer in front); "" = off.
    pub plain_http_listen: String,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub tls_handshake_timeout_ms: u64,
    pub max_connections: usize,
    pub drain_timeout_ms: u64,
    /// On SIGTERM, how long `/readyz` answers 503 before the listener closes, so that load
    /// balancers stop sending first.
    pub shutdown_delay_ms: u64,
    /// Tokio worker threads; 0 = one per core.
    pub worker_threads: usize,
    /// Run the worker threads under `SCHED_BATCH` (Linux): a worker woken by the network does
    /// not preempt the thread running (signing, store writer), which saves context switches
    /// where they share a core, at the price of waiting for that thread's time slice. Off by
    /// default: the throughput gain measured here was within the machine's noise for latency.
    pub worker_batch_scheduling: bool,
    /// While signatures wait in the signing queue, the worker threads run under `SCHED_BATCH`
    /// (Linux), and return to the normal policy once the queue is empty: during a signing
    /// backlog a worker woken by the network does not preempt a signature in progress (two
    /// context switches per new machine on a shared core); without one, nothing changes.
    pub yield_to_signing: bool,
    /// Threads that do the RSA signing, off the async workers; 0 = one per core.
    pub signing_threads: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Plain-HTTP listener for `/metrics`, `/livez` and `/readyz`; "" turns it off. Keep it on
    /// loopback or a private network: it has no authentication.
    pub listen: String,
}

/// What the request log keeps of a client IP: its first `log_ipv4_prefix` / `log_ipv6_prefix`
/// bits (32 / 128 keep the whole address). Activation records keep the full address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyCfg {
    pub log_ipv4_prefix: u8,
    pub log_ipv6_prefix: u8,
    /// Request-log rows older than this many days lose machine code, friendly name and client
    /// network (checked hourly by the store writer); 0 keeps them.
    pub log_retention_days: u64,
    /// Key file for encryption at rest of personal fields (one `<id> <base64 32 bytes>` per
    /// line; the first encrypts, all decrypt). Unset: stored in clear.
    pub encryption_key_file: Option<PathBuf>,
    /// A tenant with no request for this many days loses its request log and its
    /// activations' client IPs (checked hourly); 0 turns the rule off.
    pub inactive_tenant_days: u64,
}

impl Default for PrivacyCfg {
    fn default() -> Self {
        PrivacyCfg {
            log_ipv4_prefix: 24,
            log_ipv6_prefix: 48,
            log_retention_days: 730,
            encryption_key_file: None,
            inactive_tenant_days: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheCfg {
    /// How long a signed answer that changed nothing is reused for an identical request; its
    /// `SignDate` is at most this old (clients use it to bound offline use in days, so a
    /// minute is immaterial, while re-signing every cached answer more often costs CPU).
    /// 0 turns the cache off.
    pub response_ttl_ms: u64,
    /// Memory bound of the signed-response cache; 0 turns it off.
    pub response_max_bytes: u64,
}

impl Default for CacheCfg {
    fn default() -> Self {
        CacheCfg {
            response_ttl_ms: 60_000,
            response_max_bytes: 64 << 20,
        }
    }
}

/// Per-node rate limits; a rate of 0 turns that limit off. A burst below the rate means the rate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitCfg {
    /// Requests per second from one client IP (after trusted-proxy resolution).
    pub per_client_ip_per_second: u32,
    pub per_client_ip_burst: u32,
    /// Requests per second with one access token.
    pub per_token_per_second: u32,
    pub per_token_burst: u32,
    /// New machines (node-locked or floating) activated per license per minute.
    pub new_machines_per_license_per_minute: u32,
    pub new_machines_per_license_burst: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreCfg {
    /// SQLite database; `data_dir/keygate.db` when unset.
    pub sqlite_path: Option<PathBuf>,
    /// PostgreSQL main store (`postgres://user:password@host:port/db`); when set, used
    /// instead of SQLite.
    pub postgres_url: Option<String>,
    /// Where batches wait while the main store refuses them; `data_dir/spool` when unset.
    pub spool_dir: Option<PathBuf>,
    /// Every activation change is appended and synced to `data_dir/wal` before the client is
    /// answered, so a crash loses none. Off: up to one flush interval of changes can be lost.
    pub activation_log: bool,
    /// How often a node polls the control-plane change feed.
    pub sync_interval_ms: u64,
    /// A batch is written when it holds this many rows...
    pub batch_rows: usize,
    /// ...or once its log rows hold about this many bytes...
    pub batch_bytes: usize,
    /// ...or when its oldest row is this old.
    pub flush_interval_ms: u64,
    /// Request-log rows waiting for the writer; more are counted as dropped.
    pub log_queue_rows: usize,
    /// Run the store writer under Linux `SCHED_IDLE` while it keeps up, back under the normal
    /// policy once rows pile up: a request woken on a core they share preempts it at once
    /// instead of waiting for its time slice. Needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20
    /// to return to normal (root outside containers has it); without it the writer keeps the
    /// normal policy. Request handlers raise a writer whose rows are overdue, so rows still
    /// wait about a flush interval at most (ARCHITECTURE.md).
    pub writer_idle_priority: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("keygate-data"),
            server: Server::default(),
            store: StoreCfg::default(),
            admin: Admin::default(),
            rate_limits: RateLimitCfg::default(),
            cache: CacheCfg::default(),
            redis: RedisCfg::default(),
            privacy: PrivacyCfg::default(),
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: "127.0.0.1:8443".into(),
            tls_cert: None,
            tls_key: None,
            tls_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            tls_post_quantum: true,
            proxy_ip: None,
            max_body_bytes: 16 * 1024,
            max_header_bytes: 16 * 1024,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            plain_http_listen: String::new(),
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            max_connections: 10_000,
            drain_timeout_ms: 20_000,
            shutdown_delay_ms: 0,
            worker_threads: 0,
            worker_batch_scheduling: false,
            yield_to_signing: true,
            signing_threads: 0,
        }
    }
}

impl Default for RateLimitCfg {
    fn default() -> Self {
        // Generous per IP (offices behind one NAT start many machines at 9:00); token and
        // license limits are the vendor's call, so off.
        RateLimitCfg {
            per_client_ip_per_second: 100,
            per_client_ip_burst: 200,
            per_token_per_second: 0,
            per_token_burst: 0,
            new_machines_per_license_per_minute: 0,
            new_machines_per_license_burst: 0,
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl Default for StoreCfg {
    fn default() -> Self {
        StoreCfg {
            sqlite_path: None,
            postgres_url: None,
            spool_dir: None,
            activation_log: true,
            sync_interval_ms: 200,
            batch_rows: 1000,
            batch_bytes: 1 << 20,
            flush_interval_ms: 200,
            log_queue_rows: 100_000,
            writer_idle_priority: true,
        }
    }
}

/// All the problems found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

const ENV_PREFIX: &str = "KEYGATE_";
/// Top-level keys settable from the environment without a section.
const ENV_TOP: [&str; 1] = ["DATA_DIR"];

impl Config {
    /// Defaults, then `file` (if any), then the `KEYGATE_*` entries of `env`.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut merged = toml::Table::try_from(Config::default()).expect("defaults serialize");
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => match text.parse::<toml::Table>() {
                    Ok(t) => merge(&mut merged, t),
                    Err(e) => problems.push(format!("{}: {e}", path.display())),
                },
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
        for (k, v) in env {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = if rest.contains("__") {
                rest.split("__").map(str::to_ascii_lowercase).collect()
            } else if ENV_TOP.contains(&rest) {
                vec![rest.to_ascii_lowercase()]
            } else {
                continue;
            };
            set_path(&mut merged, &path, env_value(v));
        }
        let cfg = match Config::deserialize(toml::Value::Table(merged)) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(e.to_string().trim().to_owned());
                None
            }
        };
        if let Some(c) = &cfg {
            problems.extend(c.problems());
        }
        match cfg {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(ConfigError { problems }),
        }
    }

    /// Checks the values that types alone cannot.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let s = &self.server;
        if s.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "server.listen: {:?} is not an address like 127.0.0.1:8443",
                s.listen
            ));
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            p.push("server.tls_cert and server.tls_key must be set together".into());
        }
        if let Some(ip) = &s.proxy_ip {
            if ip.parse::<std::net::IpAddr>().is_err() {
                p.push(format!("server.proxy_ip: {ip:?} is not an IP address"));
            }
        }
        if !(256..=1 << 20).contains(&s.max_body_bytes) {
            p.push("server.max_body_bytes must be between 256 and 1048576".into());
        }
        if !(1024..=1 << 20).contains(&s.max_header_bytes) {
            p.push("server.max_header_bytes must be between 1024 and 1048576".into());
        }
        for c in &s.trusted_proxies {
            if let Err(e) = c.parse::<crate::http::client_ip::Cidr>() {
                p.push(format!("server.trusted_proxies: {e}"));
            }
        }
        if s.proxy_protocol && s.trusted_proxies.is_empty() {
            p.push("server.proxy_protocol needs server.trusted_proxies: the balancers allowed to send it".into());
        }
        if !s.plain_http_listen.is_empty() && s.plain_http_listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "server.plain_http_listen: {:?} is not an address like 127.0.0.1:8080 (or \"\" for off)",
                s.plain_http_listen
            ));
        }
        if !self.admin.listen.is_empty() && self.admin.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "admin.listen: {:?} is not an address like 127.0.0.1:9464 (or \"\" to turn it off)",
                self.admin.listen
            ));
        }
        for (name, v) in [
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.body_read_timeout_ms", s.body_read_timeout_ms),
            (
                "server.tls_handshake_timeout_ms",
                s.tls_handshake_timeout_ms,
            ),
            ("store.sync_interval_ms", self.store.sync_interval_ms),
            ("store.flush_interval_ms", self.store.flush_interval_ms),
        ] {
            if v == 0 {
                p.push(format!("{name} must be greater than 0"));
            }
        }
        if self.privacy.log_ipv4_prefix > 32 || self.privacy.log_ipv6_prefix > 128 {
            p.push("privacy.log_ipv4_prefix must be at most 32 and privacy.log_ipv6_prefix at most 128".into());
        }
        if s.max_connections == 0 {
            p.push("server.max_connections must be greater than 0".into());
        }
        if self.store.batch_rows == 0
            || self.store.batch_bytes == 0
            || self.store.log_queue_rows == 0
        {
            p.push("store.batch_rows, store.batch_bytes and store.log_queue_rows must be greater than 0".into());
        }
        if let Some(url) = &self.store.postgres_url {
            if let Err(e) = url.parse::<postgres::Config>() {
                // The error text never echoes the URL, which may hold a password.
                p.push(format!("store.postgres_url is not a PostgreSQL URL: {e}"));
            }
            if self.store.sqlite_path.is_some() {
                p.push("set store.postgres_url or store.sqlite_path, not both".into());
            }
        }
        if let Err(e) = self.redis_ca() {
            p.push(format!("redis.ca_file cannot be read: {e}"));
        }
        if !(1..=1024).contains(&self.redis.shards) {
            p.push("redis.shards must be between 1 and 1024".into());
        }
        if !(1_000..=86_400_000).contains(&self.redis.requeue_refused_after_ms) {
            p.push("redis.requeue_refused_after_ms must be between 1000 and 86400000".into());
        }
        if let Some(url) = &self.redis.url {
            if redis::parse_redis_url(url).is_none() {
                p.push("redis.url is not a redis:// or rediss:// URL".into());
            }
        }
        if let Err(e) = self.keyring() {
            p.push(e.to_string());
        }
        if s.tls_cert.is_none() && s.tls_names.is_empty() {
            p.push("server.tls_names must not be empty when no certificate is configured".into());
        }
        p
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.store
            .sqlite_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keygate.db"))
    }

    /// The main store: PostgreSQL when `store.postgres_url` is set, else SQLite.
    pub fn store_location(&self) -> crate::store::Location {
        match &self.store.postgres_url {
            Some(url) => crate::store::Location::Postgres(url.clone()),
            None => crate::store::Location::Sqlite(self.sqlite_path()),
        }
    }

    /// The Redis CA certificate (PEM), when `redis.ca_file` is set.
    pub fn redis_ca(&self) -> std::io::Result<Option<Vec<u8>>> {
        self.redis.ca_file.as_deref().map(std::fs::read).transpose()
    }

    /// The encryption keys, when `privacy.encryption_key_file` is set.
    pub fn keyring(
        &self,
    ) -> Result<
        Option<std::sync::Arc<crate::store::cipher::Keyring>>,
        crate::store::cipher::CipherError,
    > {
        self.privacy
            .encryption_key_file
            .as_deref()
            .map(|p| crate::store::cipher::Keyring::load(p).map(std::sync::Arc::new))
            .transpose()
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.store
            .spool_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("spool"))
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn set_path(t: &mut toml::Table, path: &[String], v: toml::Value) {
    match path {
        [] => {}
        [last] => {
            t.insert(last.clone(), v);
        }
        [first, rest @ ..] => {
            let e = t
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = e {
                set_path(inner, rest, v);
            } else {
                *e = toml::Value::Table(toml::Table::new());
                if let toml::Value::Table(inner) = e {
                    set_path(inner, rest, v);
                }
            }
        }
    }
}

/// Environment values are TOML literals when they parse as one (`5`, `true`, `["a"]`), else strings.
fn env_value(v: &str) -> toml::Value {
    format!("v = {v}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.sqlite_path(), PathBuf::from("keygate-data/keygate.db"));
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let dir = std::env::temp_dir().join(format!("kg-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k.toml");
        std::fs::write(
            &f,
            "data_dir = \"/srv/kg\"\n[server]\nlisten = \"0.0.0.0:443\"\nmax_connections = 5\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&f),
            &env(&[
                ("KEYGATE_SERVER__MAX_CONNECTIONS", "7"),
                ("KEYGATE_BIN", "/ignored"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/kg"));
        assert_eq!(c.server.listen, "0.0.0.0:443");
        assert_eq!(c.server.max_connections, 7);
    }

    #[test]
    fn every_problem_is_listed() {
        let e = Config::load(
            None,
            &env(&[
                ("KEYGATE_SERVER__LISTEN", "nowhere"),
                ("KEYGATE_SERVER__TLS_CERT", "/x.pem"),
                ("KEYGATE_STORE__FLUSH_INTERVAL_MS", "0"),
                ("KEYGATE_SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/33\"]"),
                ("KEYGATE_ADMIN__LISTEN", "localhost"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 5, "{e}");
        let unknown = Config::load(None, &env(&[("KEYGATE_SERVER__LISTN", "1")])).unwrap_err();
        assert!(unknown.to_string().contains("listn"), "{unknown}");
    }

    /// The commented example in deploy/ sets every key, so it must parse and validate.
    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/keygate.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::load(Some(&path), &env(&[])).unwrap();
        // Every key of the effective configuration appears in the example.
        let effective = toml::Table::try_from(&c).unwrap();
        for (section, v) in &effective {
            match v {
                toml::Value::Table(t) => {
                    assert!(
                        text.contains(&format!("[{section}]")),
                        "[{section}] missing"
                    );
                    for k in t.keys() {
                        assert!(text.contains(&format!("{k} =")), "{section}.{k} missing");
                    }
                }
                _ => assert!(text.contains(&format!("{section} =")), "{section} missing"),
            }
        }
    }
}
