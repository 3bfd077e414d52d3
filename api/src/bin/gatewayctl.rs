//! `gatewayctl`: the SRE's command line. It reads the same environment as the api
//! (`DATABASE_URL`, `AMQP_URL`, `AUTH_ISSUER`, …) and goes through the same code paths.

use std::{collections::HashMap, time::Duration};

use clap::{Parser, Subcommand};
use shared::{
    Error, Result,
    auth::{Capabilities, mint_api_key},
    db::now_ms,
    devtoken::{DevClaims, DevSigner},
    fleet::GatewayState,
    protocol::{Command, CommandOutput},
    store,
};

#[derive(Parser)]
#[command(
    name = "gatewayctl",
    about = "Operate the WhatsApp gateway fleet",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply the database migrations not applied yet, then grant the api's role what it needs.
    Migrate {
        /// The api's own database role: given every table but the WhatsApp key store's (run
        /// with each migration, so new tables are granted too). The role must exist.
        #[arg(long, env = "DATABASE_API_ROLE")]
        api_role: Option<String>,
    },
    /// Wait until the database has every migration this build needs: how a new version's pods
    /// (an init container) start only after its migrate Job, instead of crash-looping on a
    /// schema that is still older than they need.
    SchemaWait {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Create or revoke API keys.
    #[command(subcommand)]
    Apikey(ApiKeyCmd),
    /// Write a new development signing key (P-256, PKCS#8 PEM) to a file, if it does not exist.
    DevKeygen { path: std::path::PathBuf },
    /// Print a login JWT signed by the local development key (DEV_JWT_KEY_FILE).
    DevToken {
        #[arg(long)]
        org: String,
        #[arg(long)]
        user: String,
        /// owner, admin (read+manage) or member (read).
        #[arg(long)]
        role: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
    },
    /// Drive the simulated phone of a session (the `sim` driver).
    #[command(subcommand)]
    Sim(SimCmd),
    /// The fleet: list gateways, or set one's state.
    #[command(subcommand)]
    Gateways(GatewayCmd),
    /// Secrets at rest: the WhatsApp driver's device keys (CREDENTIALS_KEYS) and the webhooks'
    /// signing secrets (WEBHOOK_SECRET_KEYS).
    #[command(subcommand)]
    Credentials(CredentialsCmd),
}

#[derive(Subcommand)]
enum CredentialsCmd {
    /// Re-seal the device keys under the first key of CREDENTIALS_KEYS, and the webhooks'
    /// secrets under the first of WEBHOOK_SECRET_KEYS (each where given; at least one). Put
    /// the new key first on every worker (or api replica), then run this; once it reports
    /// nothing left, the old key can go. Safe while they run: a value rewritten meanwhile is
    /// not overwritten.
    Rotate {
        /// The device keys' `id:base64key[,id:base64key…]`: the new key first, then every key
        /// still in use.
        #[arg(
            long,
            env = "CREDENTIALS_KEYS",
            hide_env_values = true,
            required_unless_present = "webhook_secret_keys"
        )]
        credentials_keys: Option<String>,
        /// The webhook secrets' keys, likewise.
        #[arg(long, env = "WEBHOOK_SECRET_KEYS", hide_env_values = true)]
        webhook_secret_keys: Option<String>,
        /// Values re-sealed per statement.
        #[arg(long, default_value_t = 500)]
        batch: i64,
    },
}

#[derive(Subcommand)]
enum ApiKeyCmd {
    /// Mint a key; the key itself is printed alone on the last line, once.
    Create {
        #[arg(long)]
        org: String,
        /// Comma-separated: read, manage.
        #[arg(long, value_delimiter = ',', default_value = "read,manage")]
        capabilities: Vec<String>,
        #[arg(long, default_value = "")]
        name: String,
        /// Days until it expires (never when omitted).
        #[arg(long)]
        expires_in_days: Option<i64>,
    },
    /// Revoke a key by its public prefix (gwk_<ULID>) or the whole key.
    Revoke { key: String },
}

#[derive(Subcommand)]
enum SimCmd {
    /// The phone scans the session's current QR code (or enters its pairing code).
    Scan {
        #[arg(long)]
        session: String,
        #[arg(long)]
        phone: String,
    },
    /// The phone removes the linked device.
    Unlink {
        #[arg(long)]
        session: String,
    },
    /// The same device connects elsewhere and replaces the stream.
    Conflict {
        #[arg(long)]
        session: String,
    },
    /// The network drops the connection.
    Drop {
        #[arg(long)]
        session: String,
    },
    /// A contact sends the session's number a text.
    Message {
        #[arg(long)]
        session: String,
        /// The contact's phone number.
        #[arg(long)]
        from: String,
        #[arg(long)]
        text: String,
    },
}

#[derive(Subcommand)]
enum GatewayCmd {
    /// Every gateway: state, region, capacity, load, live sessions, version, heartbeat age,
    /// and sessions a rebalance marked to move away.
    List,
    /// Move every session of the gateway to the least-loaded active peers of its region (its
    /// worker does it: each number is disconnected before its new owner connects it, with no
    /// re-pairing). Shows progress; returns when the gateway is empty, or says which sessions
    /// could not move and why. The gateway stays `draining` (no new sessions) until uncordoned.
    Drain {
        id: String,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Remove the gateway for good (a scale-down): drain it like `drain`, then, once it owns
    /// no session, remove its row and its command queue — at once when no worker runs it,
    /// else when its worker stops. A restart of its worker meanwhile keeps it decommissioning.
    Decommission {
        id: String,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// What a gateway pod's preStop hook runs on Kubernetes: when the StatefulSet no longer
    /// counts the pod's ordinal (a scale-down removes the highest), decommission the gateway
    /// and wait for it to drain; any other stop (a rollout, a node's drain) is a restart,
    /// which moves nothing. Reads the StatefulSet with the pod's service account.
    PreStop {
        id: String,
        /// The StatefulSet whose pod this is (by default the pod's name without its ordinal:
        /// `gw-sg` for `gw-sg-3`).
        #[arg(long)]
        statefulset: Option<String>,
        /// Give up waiting after this many seconds (keep it under the pod's grace period).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Show (`--dry-run`) or start now the moves that even out the region's active
    /// gateways: idle sessions of the fullest, to the emptiest, until their loads are within
    /// the tolerance. Their owners hand them over (no re-pairing); the region's reaper does
    /// the same by itself, at REBALANCE_MOVES_PER_SEC.
    Rebalance {
        #[arg(long)]
        region: String,
        /// Show the plan; mark nothing.
        #[arg(long)]
        dry_run: bool,
        /// How far apart the loads may be, as a fraction of capacity.
        #[arg(long, default_value_t = 0.1)]
        tolerance: f64,
        /// Sessions moved within this many seconds are left where they are.
        #[arg(long, default_value_t = 3600)]
        window_secs: i64,
    },
    /// Keep the gateway's sessions, but place no new ones on it.
    Cordon { id: String },
    /// Make the gateway active again (ends a drain or a cordon).
    Uncordon { id: String },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatewayctl: {}", e.body.message);
            if let Some(cause) = &e.source {
                eprintln!("  cause: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn api_config() -> Result<api::Config> {
    api::Config::try_parse_from(["gatewayctl"]).map_err(|e| Error::invalid(e.to_string()))
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = api_config()?;
    match cli.command {
        Cmd::Migrate { api_role } => {
            let applied = shared::db::migrate(&cfg.db.database_url).await?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for m in applied {
                println!("applied {m}");
            }
            if let Some(role) = api_role {
                shared::db::grant_api_role(&cfg.db.database_url, &role).await?;
                println!("granted role {role} every table but the WhatsApp key store's");
            }
        }
        Cmd::SchemaWait { timeout_secs } => {
            let db = shared::db::pool(&cfg.db.database_url, 1)?;
            let started = std::time::Instant::now();
            let mut said = None;
            loop {
                let why = match shared::db::missing_migrations(&db).await {
                    Ok(missing) if missing.is_empty() => {
                        println!("the database schema has every migration this build needs");
                        return Ok(());
                    }
                    Ok(missing) => format!(
                        "waiting for `gatewayctl migrate`: {} not applied",
                        missing.join(", ")
                    ),
                    Err(e) => format!("waiting for the database: {}", e.body.message),
                };
                if started.elapsed() > Duration::from_secs(timeout_secs) {
                    return Err(Error::unavailable(format!("after {timeout_secs} s: {why}")));
                }
                if said.as_ref() != Some(&why) {
                    println!("{why}");
                    said = Some(why);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        Cmd::Apikey(ApiKeyCmd::Create {
            org,
            capabilities,
            name,
            expires_in_days,
        }) => {
            if org.trim().is_empty() {
                return Err(Error::invalid("--org must not be empty"));
            }
            let caps = Capabilities::parse_list(&capabilities)?;
            let key = mint_api_key();
            let now = now_ms();
            let expires = expires_in_days.map(|d| now + d * 86_400_000);
            let db = shared::db::pool(&cfg.db.database_url, 1)?;
            store::api_keys::insert(&db.get().await?, &key, &org, &name, caps, expires, now)
                .await?;
            println!(
                "created API key {} for {org} ({})",
                key.id,
                caps.names().join(",")
            );
            println!("{}", key.secret);
        }
        Cmd::Apikey(ApiKeyCmd::Revoke { key }) => {
            let id = shared::auth::api_key_id(&key).unwrap_or(&key);
            let db = shared::db::pool(&cfg.db.database_url, 1)?;
            if store::api_keys::revoke(&db.get().await?, id, now_ms()).await? {
                println!("revoked {id}");
            } else {
                return Err(Error::not_found(format!("no active API key {id}")));
            }
        }
        Cmd::DevKeygen { path } => {
            if path.exists() {
                println!("{} exists; keeping it", path.display());
                return Ok(());
            }
            let pem = shared::devtoken::generate_pem()?;
            std::fs::write(&path, pem)
                .map_err(|e| Error::invalid(format!("cannot write {}: {e}", path.display())))?;
            println!("wrote {}", path.display());
        }
        Cmd::DevToken {
            org,
            user,
            role,
            ttl,
        } => {
            let path = cfg.dev_jwt_key_file.as_deref().ok_or_else(|| {
                Error::invalid("DEV_JWT_KEY_FILE is not set: dev tokens need the local signing key")
            })?;
            let token = DevSigner::from_pem_file(path)?.sign(&DevClaims {
                org: &org,
                user: &user,
                role: &role,
                issuer: &cfg.auth_issuer,
                audience: &cfg.auth_audience,
                org_claim: &cfg.auth_org_claim,
                role_claim: &cfg.auth_role_claim,
                ttl_secs: ttl,
            })?;
            println!("{token}");
        }
        Cmd::Sim(sim) => {
            let (session, command) = match sim {
                SimCmd::Scan { session, phone } => (
                    session,
                    Command::SimScan {
                        phone_number: shared::session::normalize_phone_number(&phone)?,
                    },
                ),
                SimCmd::Unlink { session } => (session, Command::SimUnlink),
                SimCmd::Conflict { session } => (session, Command::SimConflict),
                SimCmd::Drop { session } => (session, Command::SimDrop),
                SimCmd::Message {
                    session,
                    from,
                    text,
                } => {
                    shared::message::validate_text(&text)?;
                    (
                        session,
                        Command::SimMessage {
                            from: shared::message::normalize_recipient(&from)?,
                            text,
                        },
                    )
                }
            };
            let out = api::operator::send(cfg, &session, command).await?;
            if let CommandOutput::Session(s) = out {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(Error::internal)?
                );
            }
        }
        Cmd::Gateways(cmd) => fleet(&cfg, cmd).await?,
        Cmd::Credentials(CredentialsCmd::Rotate {
            credentials_keys,
            webhook_secret_keys,
            batch,
        }) => {
            let keyring = |var: &str, spec: &Option<String>| {
                spec.as_deref()
                    .map(shared::sealed::Keyring::parse)
                    .transpose()
                    .map_err(|e| Error::invalid(format!("{var}: {e}")))
            };
            let devices = keyring("CREDENTIALS_KEYS", &credentials_keys)?;
            let webhooks = keyring("WEBHOOK_SECRET_KEYS", &webhook_secret_keys)?;
            let db = shared::db::pool(&cfg.db.database_url, 1)?;
            let client = db.get().await?;
            // Every sealed column: the devices' keys and the webhooks' signing secrets.
            if let Some(keys) = devices {
                let n = store::wa_keys::rotate(&client, &keys, batch).await?;
                println!(
                    "re-sealed {n} device value(s) under key `{}`",
                    keys.current()
                );
            }
            if let Some(keys) = webhooks {
                let n = store::webhooks::reseal_secrets(&client, &keys, batch).await?;
                println!(
                    "re-sealed {n} webhook secret(s) under key `{}`",
                    keys.current()
                );
            }
        }
    }
    Ok(())
}

async fn fleet(cfg: &api::Config, cmd: GatewayCmd) -> Result<()> {
    let db = shared::db::pool(&cfg.db.database_url, 1)?;
    let set = |id: String, state: GatewayState| {
        let db = db.clone();
        async move {
            if !store::gateways::set_state(&db.get().await?, &id, state).await? {
                return Err(Error::not_found(format!("no gateway {id}")));
            }
            println!("{id} is now {}", state.as_str());
            Ok(())
        }
    };
    match cmd {
        GatewayCmd::List => print_gateways(&db, cfg).await,
        GatewayCmd::Cordon { id } => set(id, GatewayState::Cordoned).await,
        GatewayCmd::Uncordon { id } => set(id, GatewayState::Active).await,
        GatewayCmd::Drain { id, timeout_secs } => {
            set(id.clone(), GatewayState::Draining).await?;
            drain_progress(&db, cfg, &id, Duration::from_secs(timeout_secs)).await
        }
        GatewayCmd::Decommission { id, timeout_secs } => {
            set(id.clone(), GatewayState::Decommissioning).await?;
            drain_progress(&db, cfg, &id, Duration::from_secs(timeout_secs)).await?;
            remove_if_unserved(&db, cfg, &id).await
        }
        GatewayCmd::Rebalance {
            region,
            dry_run,
            tolerance,
            window_secs,
        } => {
            let settings = store::rebalance::Settings {
                tolerance,
                window_ms: window_secs * 1000,
            };
            let liveness = cfg.gateway_liveness_ms as i64;
            let client = db.get().await?;
            let moves =
                store::rebalance::run(&client, &region, liveness, settings, i64::MAX, dry_run)
                    .await?;
            if moves.is_empty() {
                println!("region {region} is balanced (within {tolerance} of capacity)");
            }
            for m in moves {
                if dry_run {
                    println!("{} -> {}: {} session(s)", m.from, m.to, m.planned);
                } else {
                    println!(
                        "{} -> {}: {} session(s) marked to move (of {} planned; busy or recently \
                         moved ones stay)",
                        m.from, m.to, m.marked, m.planned
                    );
                }
            }
            Ok(())
        }
        GatewayCmd::PreStop {
            id,
            statefulset,
            timeout_secs,
        } => {
            let statefulset = statefulset
                .or_else(|| id.rsplit_once('-').map(|(name, _)| name.to_owned()))
                .ok_or_else(|| Error::invalid(format!("{id} is not a StatefulSet pod's name")))?;
            let (start, replicas) = kubernetes::desired_ordinals(&statefulset).await?;
            if kubernetes::kept(&id, start, replicas)? {
                println!("{id} stays in {statefulset} ({replicas} replicas): a restart");
                return Ok(());
            }
            println!("{id} is beyond {statefulset}'s {replicas} replicas: decommissioning");
            set(id.clone(), GatewayState::Decommissioning).await?;
            drain_progress(&db, cfg, &id, Duration::from_secs(timeout_secs)).await
        }
    }
}

/// The little of the Kubernetes API a gateway pod's preStop needs: how many pods its
/// StatefulSet wants now.
mod kubernetes {
    use shared::{Error, Result};

    const ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

    /// The StatefulSet's first ordinal and desired replicas, read with the pod's service
    /// account (its token, its namespace and the cluster's CA, as Kubernetes mounts them).
    pub async fn desired_ordinals(statefulset: &str) -> Result<(u64, u64)> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            Error::unavailable(format!(
                "cannot read StatefulSet {statefulset}: {what}: {e}"
            ))
        };
        let read = |file: &str| {
            std::fs::read(format!("{ACCOUNT}/{file}"))
                .map_err(|e| unavailable(&format!("{ACCOUNT}/{file}"), &e))
        };
        let (token, namespace, ca) = (read("token")?, read("namespace")?, read("ca.crt")?);
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|e| unavailable("KUBERNETES_SERVICE_HOST", &e))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = reqwest::Certificate::from_pem(&ca).map_err(|e| unavailable("ca.crt", &e))?;
        let http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| unavailable("client", &e))?;
        let url = format!(
            "https://{host}:{port}/apis/apps/v1/namespaces/{}/statefulsets/{statefulset}",
            String::from_utf8_lossy(&namespace).trim()
        );
        let sts: serde_json::Value = http
            .get(&url)
            .bearer_auth(String::from_utf8_lossy(&token).trim())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| unavailable(&url, &e))?
            .json()
            .await
            .map_err(|e| unavailable(&url, &e))?;
        let spec = &sts["spec"];
        Ok((
            spec["ordinals"]["start"].as_u64().unwrap_or(0),
            spec["replicas"].as_u64().unwrap_or(1),
        ))
    }

    /// Whether the gateway's pod (`gw-sg-3`: ordinal 3) is among the `replicas` pods counted
    /// from `start`.
    pub fn kept(gateway_id: &str, start: u64, replicas: u64) -> Result<bool> {
        let ordinal: u64 = gateway_id
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::invalid(format!("{gateway_id} is not a StatefulSet pod's name"))
            })?;
        Ok(ordinal < start + replicas)
    }

    #[cfg(test)]
    mod tests {
        use super::kept;

        #[test]
        fn a_scale_down_removes_the_highest_ordinals_only() {
            // gw-sg-1 … gw-sg-3, scaled from 3 to 2: gw-sg-3 goes, the others restart.
            let kept = |id, start, replicas| kept(id, start, replicas).ok();
            assert_eq!(kept("gw-sg-1", 1, 2), Some(true));
            assert_eq!(kept("gw-sg-2", 1, 2), Some(true));
            assert_eq!(kept("gw-sg-3", 1, 2), Some(false));
            assert_eq!(kept("gw-sg-1", 1, 0), Some(false), "scaled to zero");
            assert_eq!(kept("gw-eu-west-0", 0, 1), Some(true));
            assert_eq!(kept("local", 1, 2), None);
        }
    }
}

/// Removes a drained, decommissioned gateway with its queue when no worker runs it; a live
/// worker removes its own gateway when it stops.
async fn remove_if_unserved(
    db: &deadpool_postgres::Pool,
    cfg: &api::Config,
    id: &str,
) -> Result<()> {
    let client = db.get().await?;
    let (gateways, now) = store::gateways::list(&client).await?;
    if gateways
        .iter()
        .any(|g| g.id == id && g.is_live(now, cfg.gateway_liveness_ms as i64))
    {
        println!("{id} is empty; its worker removes it when it stops");
        return Ok(());
    }
    if !store::gateways::remove_decommissioned(&client, id, None).await? {
        return Err(Error::conflict(format!(
            "{id} was not removed: it owns sessions again or is not decommissioning any more"
        )));
    }
    let dropped = cfg
        .amqp
        .delete_gateway_queue(id)
        .await
        .map_err(|e| Error::unavailable(format!("{id} removed, but not its queue: {e}")))?;
    println!("{id} is removed, with its command queue ({dropped} command(s) dropped)");
    Ok(())
}

async fn print_gateways(db: &deadpool_postgres::Pool, cfg: &api::Config) -> Result<()> {
    let client = db.get().await?;
    let (gateways, now) = store::gateways::list(&client).await?;
    let load: HashMap<String, store::gateways::Load> =
        store::gateways::load(&client).await?.into_iter().collect();
    println!(
        "{:<20} {:<8} {:<15} {:>8} {:>8} {:>8} {:<10} {:>10} {:>7}",
        "ID", "REGION", "STATE", "CAPACITY", "SESSIONS", "LIVE", "VERSION", "HEARTBEAT", "MOVING"
    );
    for g in gateways {
        let l = load.get(&g.id).copied().unwrap_or_default();
        let ago = if g.heartbeat_at == 0 {
            "never".to_owned()
        } else {
            format!("{:.1}s ago", (now - g.heartbeat_at) as f64 / 1000.0)
        };
        println!(
            "{:<20} {:<8} {:<15} {:>8} {:>8} {:>8} {:<10} {:>10} {:>7}",
            g.id,
            g.region,
            g.effective_state(now, cfg.gateway_liveness_ms as i64)
                .as_str(),
            g.capacity,
            l.sessions,
            l.leased,
            g.version,
            ago,
            l.moving
        );
        if let Some(note) = g.note {
            println!("  note: {note}");
        }
    }
    Ok(())
}

/// Follows a drain until the gateway owns no session, printing progress.
async fn drain_progress(
    db: &deadpool_postgres::Pool,
    cfg: &api::Config,
    id: &str,
    timeout: Duration,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        let client = db.get().await?;
        let (gateways, now) = store::gateways::list(&client).await?;
        let g = gateways
            .into_iter()
            .find(|g| g.id == id)
            .ok_or_else(|| Error::not_found(format!("no gateway {id}")))?;
        let left = store::gateways::load(&client)
            .await?
            .into_iter()
            .find(|(gw, _)| gw == id)
            .map_or(0, |(_, l)| l.sessions);
        if left == 0 {
            println!("{id} is drained ({:.1} s)", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if last != Some(left) {
            println!("{id}: {left} session(s) to move");
            last = Some(left);
        }
        if !g.is_live(now, cfg.gateway_liveness_ms as i64) {
            return Err(Error::unavailable(format!(
                "{id} has no live worker to drain it; its {left} session(s) move by failover \
                 once their leases expire"
            )));
        }
        if started.elapsed() > timeout {
            let why = g
                .note
                .unwrap_or_else(|| "the drain is still under way".into());
            return Err(Error::unavailable(format!(
                "{left} session(s) still on {id} after {} s: {why}",
                timeout.as_secs()
            )));
        }
        if let Some(note) = &g.note {
            println!("  {note}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
