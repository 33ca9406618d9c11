//! The `keygate` binary: the server (`serve`) and the control-plane CLI.

use clap::{Args, Parser, Subcommand};
use keygate::config::Config;
use keygate::control::{self, KeySpec, TokenSpec};
use keygate::domain::Features;
use keygate::store::Store;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of the C library's allocator: about a fifth more re-activations per second
/// on one core (loadtest/README.md), as every request allocates and frees its small buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "Cryptolens-compatible license-activation edge server"
)]
struct Cli {
    /// TOML configuration file (defaults, then this file, then KEYGATE_* variables).
    #[arg(long, global = true, env = "KEYGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (SQLite store, generated certificate); overrides the configuration.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the Web API over HTTPS (HTTP/1.1 and HTTP/2).
    Serve {
        /// Distributed mode: share activations with other nodes through this Redis
        /// (`redis.url`).
        #[arg(long)]
        redis: Option<String>,
    },
    /// Validate the configuration and print it.
    CheckConfig,
    /// Apply pending schema migrations to the main store and print its schema version
    /// (`serve` and every command also do this on their own).
    Migrate,
    /// Distributed mode: rebuild Redis from the main store (licenses Redis lost, or holds at
    /// an older version). Needs `redis.url`.
    Sync,
    /// Tenants: vendors, each with its own RSA-2048 signing key.
    #[command(subcommand)]
    Tenant(TenantCmd),
    #[command(subcommand)]
    Product(ProductCmd),
    #[command(subcommand)]
    Customer(CustomerCmd),
    #[command(subcommand)]
    Key(KeyCmd),
    /// Access tokens (only their hashes are stored; the token is shown once).
    #[command(subcommand)]
    Token(TokenCmd),
    /// The request log.
    #[command(subcommand)]
    Log(LogCmd),
    /// The append-only log of administrative actions (who created or blocked what, when).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Data-subject requests about a machine code.
    #[command(subcommand)]
    Privacy(PrivacyCmd),
}

#[derive(Subcommand)]
enum PrivacyCmd {
    /// Everything stored about a machine code, a customer or an IP address, as JSON.
    Export(Subject),
    /// Print a new encryption key line for `privacy.encryption_key_file`.
    NewKey {
        /// The key's id (1-32 characters, no ':'), e.g. the date: 2026-11.
        #[arg(long)]
        id: String,
    },
    /// Re-encrypt every personal field under the key file's first key (after adding a key;
    /// restart the nodes first). Then older keys can be removed from the file.
    RotateKey,
    /// Remove it everywhere, recorded in the audit log. A machine code: activations deleted,
    /// request-log rows blanked, trial records forgotten. A customer: name, email and company
    /// blanked (their keys stay). An IP: blanked in activations and the request log. Running
    /// nodes apply it on their next sync.
    Erase(Subject),
}

/// Whose data: exactly one of these.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Subject {
    #[arg(long)]
    machine_code: Option<String>,
    /// A customer id.
    #[arg(long)]
    customer: Option<i64>,
    #[arg(long)]
    ip: Option<String>,
}

#[derive(Subcommand)]
enum AuditCmd {
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant and its key pair; prints the public key as <RSAKeyValue> XML.
    Create {
        #[arg(long)]
        name: String,
    },
    List,
    /// The tenant's own request-log retention: after this many days rows lose machine code,
    /// friendly name and client network (0 keeps them). --default follows the node's setting.
    Retention {
        #[arg(long)]
        tenant: i64,
        #[arg(long, required_unless_present = "default", conflicts_with = "default")]
        days: Option<u64>,
        #[arg(long)]
        default: bool,
    },
}

#[derive(Subcommand)]
enum ProductCmd {
    Create {
        #[arg(long)]
        tenant: i64,
        #[arg(long)]
        name: String,
        /// Which feature (1-8) marks a trial; reported in metadata and set on trial keys.
        #[arg(long)]
        trial_feature: Option<u8>,
        /// Which feature (1-8) marks a time-limited key; expiry then invalidates it in metadata.
        #[arg(long)]
        time_limited_feature: Option<u8>,
    },
    List {
        #[arg(long)]
        tenant: Option<i64>,
    },
    /// Delete a product with all its keys and their activations (refused while locked).
    Delete {
        #[arg(long)]
        id: i64,
    },
    /// Protect a product against deletion.
    Lock {
        #[arg(long)]
        id: i64,
    },
    Unlock {
        #[arg(long)]
        id: i64,
    },
}

#[derive(Subcommand)]
enum CustomerCmd {
    Create {
        #[arg(long)]
        tenant: i64,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long, default_value = "")]
        company: String,
    },
}

#[derive(Args)]
struct KeyRef {
    #[arg(long)]
    product: i64,
    #[arg(long)]
    key: String,
}

#[derive(Args)]
struct KeyCreate {
    #[arg(long)]
    product: i64,
    /// Create this many keys with the same settings (printed as a list).
    #[arg(long, default_value_t = 1, conflicts_with = "customer_name")]
    count: u32,
    /// Validity in days (Expires = now + period unless --expires is given).
    #[arg(long, default_value_t = 30)]
    period: i64,
    /// Expiry as unix seconds.
    #[arg(long)]
    expires: Option<i64>,
    #[arg(long)]
    f1: bool,
    #[arg(long)]
    f2: bool,
    #[arg(long)]
    f3: bool,
    #[arg(long)]
    f4: bool,
    #[arg(long)]
    f5: bool,
    #[arg(long)]
    f6: bool,
    #[arg(long)]
    f7: bool,
    #[arg(long)]
    f8: bool,
    #[arg(long)]
    notes: Option<String>,
    #[arg(long)]
    block: bool,
    /// Each new machine's activation sets Expires = now + period.
    #[arg(long)]
    trial_activation: bool,
    /// Node-locking limit; 0 = unlimited and machines are not recorded.
    #[arg(long, default_value_t = 0)]
    max_machines: i64,
    /// Machine codes that may always activate (comma-separated).
    #[arg(long, value_delimiter = ',')]
    allowed_machines: Vec<String>,
    /// An existing customer's id.
    #[arg(long, conflicts_with = "customer_name")]
    customer: Option<i64>,
    /// Create a customer for this key.
    #[arg(long)]
    customer_name: Option<String>,
    #[arg(long, default_value = "")]
    customer_email: String,
    #[arg(long, default_value = "")]
    customer_company: String,
    /// A data object NAME=STRING:INT (repeatable).
    #[arg(long)]
    data_object: Vec<String>,
}

#[derive(Subcommand)]
enum KeyCmd {
    Create(Box<KeyCreate>),
    List {
        #[arg(long)]
        product: i64,
    },
    Show(KeyRef),
    Block(KeyRef),
    Unblock(KeyRef),
}

#[derive(Subcommand)]
enum TokenCmd {
    Create {
        #[arg(long)]
        tenant: i64,
        /// Allowed methods (comma-separated): Activate, GetKey, Deactivate, CreateTrialKey,
        /// GetWebAPILog. Default: the first four (the log must be named).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Only this product.
        #[arg(long)]
        product: Option<i64>,
        /// Only the key with this ID, or -1: any key but the caller must name it.
        #[arg(long, allow_negative_numbers = true)]
        key_lock: Option<i64>,
        /// Field mask for Activate/GetKey; trial days for CreateTrialKey.
        #[arg(long, default_value_t = 0)]
        feature_lock: i64,
        #[arg(long, default_value = "")]
        description: String,
    },
    List {
        #[arg(long)]
        tenant: Option<i64>,
    },
    /// Revoke a token: it stops authenticating on every node within the sync interval.
    /// Refused while the token is locked.
    Delete {
        #[arg(long)]
        id: i64,
    },
    /// Protect a token from deletion.
    Lock {
        #[arg(long)]
        id: i64,
    },
    Unlock {
        #[arg(long)]
        id: i64,
    },
}

#[derive(Subcommand)]
enum LogCmd {
    List {
        #[arg(long)]
        product: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let mut cfg = match Config::load(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keygate: {e}");
            return ExitCode::from(64);
        }
    };
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Cmd::Serve { redis: Some(url) } = &cli.cmd {
        cfg.redis.url = Some(url.clone());
        let problems = cfg.problems();
        if !problems.is_empty() {
            eprintln!(
                "keygate: invalid configuration:\n  - {}",
                problems.join("\n  - ")
            );
            return ExitCode::from(64);
        }
    }
    match cli.cmd {
        Cmd::Serve { .. } => match keygate::app::run(cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keygate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::CheckConfig => {
            println!("{}", toml::to_string(&cfg).unwrap_or_default());
            ExitCode::SUCCESS
        }
        cmd => {
            let erasure = match &cmd {
                Cmd::Privacy(PrivacyCmd::Erase(Subject {
                    machine_code: Some(mc),
                    ..
                })) => Some(control::Erasure::Machine(mc.clone())),
                Cmd::Privacy(PrivacyCmd::Erase(Subject { ip: Some(ip), .. })) => {
                    Some(control::Erasure::Ip(ip.clone()))
                }
                _ => None,
            };
            if let (Some(url), Some(_)) = (&cfg.redis.url, &erasure) {
                match control::wait_for_streams(&cfg, url) {
                    Ok(true) => {}
                    Ok(false) => eprintln!(
                        "keygate: warning: the nodes have not carried every change into the main store (is one running?); erasing what it holds"
                    ),
                    Err(e) => eprintln!("keygate: warning: redis: {e}"),
                }
            }
            match control_command(&cfg, cmd) {
                Ok(v) => {
                    // Distributed mode: an erasure also leaves Redis (and so every node's memory
                    // and, through the streams, the store stay without it).
                    if let (Some(url), Some(what)) = (&cfg.redis.url, &erasure) {
                        if let Err(e) = control::erase_in_redis(&cfg, url, what, &v) {
                            eprintln!(
                                "keygate: erased in the main store, but not yet in redis: {e}"
                            );
                            return ExitCode::FAILURE;
                        }
                    }
                    // Distributed mode: nodes apply the change now, not at their next poll.
                    if let Some(url) = &cfg.redis.url {
                        let ca = cfg.redis_ca().ok().flatten();
                        if let Err(e) = keygate::dist::announce_control_change(url, ca) {
                            tracing::warn!(error = %e, "could not announce the change through redis; nodes pick it up at their next poll");
                        }
                    }
                    print_value(&v, cli.json);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keygate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn control_command(cfg: &Config, cmd: Cmd) -> Result<Value, control::ControlError> {
    let mut store = Store::connect(&cfg.store_location())?;
    store.set_keyring(
        cfg.keyring()
            .map_err(|e| control::ControlError::Invalid(e.to_string()))?,
    );
    // The audit log names the operating-system user who ran the command.
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    store.set_actor(&format!("cli:{user}"));
    let s = &mut store;
    match cmd {
        Cmd::Serve { .. } | Cmd::CheckConfig => unreachable!("handled in main"),
        Cmd::Sync => control::sync_redis(cfg, s),
        Cmd::Migrate => Ok(serde_json::json!({
            "store": cfg.store_location().describe(),
            "schema_version": s.schema_version()?,
        })),
        Cmd::Tenant(TenantCmd::Create { name }) => control::create_tenant(s, &name),
        Cmd::Tenant(TenantCmd::Retention { tenant, days, .. }) => {
            control::set_tenant_retention(s, tenant, days)
        }
        Cmd::Tenant(TenantCmd::List) => control::list_tenants(s),
        Cmd::Product(ProductCmd::Create {
            tenant,
            name,
            trial_feature,
            time_limited_feature,
        }) => control::create_product(s, tenant, &name, trial_feature, time_limited_feature),
        Cmd::Product(ProductCmd::List { tenant }) => control::list_products(s, tenant),
        Cmd::Product(ProductCmd::Delete { id }) => control::delete_product(s, id),
        Cmd::Product(ProductCmd::Lock { id }) => control::set_product_lock(s, id, true),
        Cmd::Product(ProductCmd::Unlock { id }) => control::set_product_lock(s, id, false),
        Cmd::Customer(CustomerCmd::Create {
            tenant,
            name,
            email,
            company,
        }) => control::create_customer(s, tenant, &name, &email, &company),
        Cmd::Key(KeyCmd::Create(k)) => {
            let k = *k;
            let flags = [k.f1, k.f2, k.f3, k.f4, k.f5, k.f6, k.f7, k.f8];
            let features = flags
                .iter()
                .enumerate()
                .fold(Features::default(), |f, (i, on)| f.with(i as u8 + 1, *on));
            let spec = KeySpec {
                product_id: k.product,
                period: k.period,
                expires: k.expires,
                features,
                notes: k.notes,
                block: k.block,
                trial_activation: k.trial_activation,
                max_no_of_machines: k.max_machines,
                allowed_machines: k.allowed_machines,
                customer_id: k.customer,
                new_customer: k
                    .customer_name
                    .map(|n| (n, k.customer_email, k.customer_company)),
                data_objects: k.data_object,
            };
            if k.count == 1 {
                control::create_key(s, &spec)
            } else {
                (0..k.count)
                    .map(|_| control::create_key(s, &spec))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|keys| serde_json::json!({ "count": keys.len(), "keys": keys }))
            }
        }
        Cmd::Key(KeyCmd::List { product }) => control::list_keys(s, product),
        Cmd::Key(KeyCmd::Show(r)) => control::show_key(s, r.product, &r.key),
        Cmd::Key(KeyCmd::Block(r)) => control::set_block(s, r.product, &r.key, true),
        Cmd::Key(KeyCmd::Unblock(r)) => control::set_block(s, r.product, &r.key, false),
        Cmd::Token(TokenCmd::Create {
            tenant,
            methods,
            product,
            key_lock,
            feature_lock,
            description,
        }) => control::create_token(
            s,
            &TokenSpec {
                tenant_id: tenant,
                methods,
                product_lock: product,
                key_lock,
                feature_lock,
                description,
            },
        ),
        Cmd::Token(TokenCmd::List { tenant }) => control::list_tokens(s, tenant),
        Cmd::Token(TokenCmd::Delete { id }) => control::delete_token(s, id),
        Cmd::Token(TokenCmd::Lock { id }) => control::set_token_lock(s, id, true),
        Cmd::Token(TokenCmd::Unlock { id }) => control::set_token_lock(s, id, false),
        Cmd::Log(LogCmd::List { product, limit }) => control::list_log(s, product, limit),
        Cmd::Audit(AuditCmd::List { limit }) => control::list_audit(s, limit),
        Cmd::Privacy(PrivacyCmd::Export(who)) => match who {
            Subject {
                machine_code: Some(mc),
                ..
            } => control::privacy_export(s, &mc),
            Subject {
                customer: Some(c), ..
            } => control::privacy_export_customer(s, c),
            Subject { ip: Some(ip), .. } => control::privacy_export_ip(s, &ip),
            _ => unreachable!("clap requires one of them"),
        },
        Cmd::Privacy(PrivacyCmd::NewKey { id }) => {
            let line = keygate::store::cipher::Keyring::new_key_line(&id);
            keygate::store::cipher::Keyring::parse(&line)
                .map_err(control::ControlError::Invalid)?;
            Ok(serde_json::json!({ "key_line": line }))
        }
        Cmd::Privacy(PrivacyCmd::RotateKey) => Ok(serde_json::json!({
            "rows_reencrypted": s.rotate_encryption()?,
        })),
        Cmd::Privacy(PrivacyCmd::Erase(who)) => match who {
            Subject {
                machine_code: Some(mc),
                ..
            } => control::privacy_erase(s, &mc),
            Subject {
                customer: Some(c), ..
            } => control::privacy_erase_customer(s, c),
            Subject { ip: Some(ip), .. } => control::privacy_erase_ip(s, &ip),
            _ => unreachable!("clap requires one of them"),
        },
    }
}

/// JSON on one line, or `name: value` lines for people.
/// Prints a command's result; a closed stdout (`keygate key list | head`) ends quietly.
fn print_value(v: &Value, json: bool) {
    let mut out = String::new();
    match v {
        Value::Object(map) if !json => {
            for (k, val) in map {
                match val {
                    Value::Array(items) if items.iter().all(Value::is_object) => {
                        out.push_str(&format!("{k}: {}\n", items.len()));
                        for i in items {
                            out.push_str(&format!("  {i}\n"));
                        }
                    }
                    Value::String(s) => out.push_str(&format!("{k}: {s}\n")),
                    other => out.push_str(&format!("{k}: {other}\n")),
                }
            }
        }
        _ => out.push_str(&format!("{v}\n")),
    }
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}
