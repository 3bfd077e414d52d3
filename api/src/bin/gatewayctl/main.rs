//! `gatewayctl`: the SRE's command line. It reads the same environment as the api
//! (`DATABASE_URL`, `AMQP_URL`, `AUTH_ISSUER`, …) and goes through the same code paths.

use std::time::Duration;

/// `println!` for what the tool answers, but a reader that went away (`| head`, `| grep -q`)
/// ends it quietly, as it ends any Unix tool, rather than with a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("cannot write the answer: {e}");
        }
    }};
}

mod gateways;
mod kubernetes;

use clap::{Parser, Subcommand};
use shared::{
    Error, Result,
    auth::{Capabilities, mint_api_key},
    db::now_ms,
    devtoken::{DevClaims, DevSigner},
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
    Gateways(gateways::GatewayCmd),
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
    /// A contact sends the session's number a text (`--text`) or a file (`--file PATH
    /// [--caption C]`), reacts to a message of the chat (`--reaction EMOJI --to-message ID`),
    /// votes on a poll (`--vote OPTION … --to-message ID`; `--vote ""` alone takes the vote
    /// back), edits a text it sent (`--text T --edit ID`) or deletes one for everyone (`--revoke
    /// ID`). IDs are the gateway's message ids.
    Message {
        #[arg(long)]
        session: String,
        /// The contact's phone number.
        #[arg(long)]
        from: String,
        #[arg(long, required_unless_present_any = ["reaction", "vote", "revoke", "file"])]
        text: Option<String>,
        /// A file the contact sends: its kind (image, video, audio, voice note, document,
        /// sticker) follows what its bytes are.
        #[arg(long, conflicts_with_all = ["text", "reaction", "edit", "revoke"])]
        file: Option<std::path::PathBuf>,
        /// The file's caption (an image, a video, a document).
        #[arg(long, requires = "file")]
        caption: Option<String>,
        /// An emoji ("" takes a reaction back), on the message `--to-message` names.
        #[arg(long, requires = "to_message", conflicts_with_all = ["text", "edit", "revoke"])]
        reaction: Option<String>,
        /// An option of the poll `--to-message` names, chosen (repeat it for each).
        #[arg(long, requires = "to_message", conflicts_with_all = ["text", "reaction", "edit", "revoke"])]
        vote: Vec<String>,
        #[arg(long)]
        to_message: Option<String>,
        /// The message (one the contact sent) that `--text` replaces.
        #[arg(long, requires = "text", conflicts_with = "revoke")]
        edit: Option<String>,
        /// The message (one the contact sent) deleted for everyone.
        #[arg(long, conflicts_with = "text")]
        revoke: Option<String>,
    },
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
                say!("database is up to date");
            }
            for m in applied {
                say!("applied {m}");
            }
            if let Some(role) = api_role {
                shared::db::grant_api_role(&cfg.db.database_url, &role).await?;
                say!("granted role {role} every table but the WhatsApp key store's");
            }
        }
        Cmd::SchemaWait { timeout_secs } => {
            let db = shared::db::pool(&cfg.db.database_url, 1)?;
            let started = std::time::Instant::now();
            let mut said = None;
            loop {
                let why = match shared::db::missing_migrations(&db).await {
                    Ok(missing) if missing.is_empty() => {
                        say!("the database schema has every migration this build needs");
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
                    say!("{why}");
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
            say!(
                "created API key {} for {org} ({})",
                key.id,
                caps.names().join(",")
            );
            say!("{}", key.secret);
        }
        Cmd::Apikey(ApiKeyCmd::Revoke { key }) => {
            let id = shared::auth::api_key_id(&key).unwrap_or(&key);
            let db = shared::db::pool(&cfg.db.database_url, 1)?;
            if store::api_keys::revoke(&db.get().await?, id, now_ms()).await? {
                say!("revoked {id}");
            } else {
                return Err(Error::not_found(format!("no active API key {id}")));
            }
        }
        Cmd::DevKeygen { path } => {
            if path.exists() {
                say!("{} exists; keeping it", path.display());
                return Ok(());
            }
            let pem = shared::devtoken::generate_pem()?;
            std::fs::write(&path, pem)
                .map_err(|e| Error::invalid(format!("cannot write {}: {e}", path.display())))?;
            say!("wrote {}", path.display());
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
            say!("{token}");
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
                    file: Some(path),
                    caption,
                    ..
                } => {
                    let bytes = std::fs::read(&path).map_err(|e| {
                        Error::invalid(format!("cannot read {}: {e}", path.display()))
                    })?;
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    let from = shared::message::normalize_recipient(&from)?;
                    let out =
                        api::operator::send_file(cfg, &session, from, bytes, caption, name).await?;
                    if let CommandOutput::Session(s) = out {
                        say!(
                            "{}",
                            serde_json::to_string_pretty(&s).map_err(Error::internal)?
                        );
                    }
                    return Ok(());
                }
                SimCmd::Message {
                    session,
                    from,
                    text,
                    reaction,
                    vote,
                    to_message,
                    edit,
                    revoke,
                    ..
                } => {
                    use shared::message::{self, Content};
                    let content = match (text, reaction, to_message, edit, revoke) {
                        (_, Some(emoji), Some(message_id), ..) => Content::Reaction {
                            reaction: message::Reaction { message_id, emoji },
                        },
                        (_, _, Some(message_id), ..) if !vote.is_empty() => Content::PollVote {
                            poll_vote: message::PollVote {
                                message_id,
                                options: vote.into_iter().filter(|o| !o.is_empty()).collect(),
                            },
                        },
                        (Some(text), _, _, Some(message_id), _) => Content::Edit {
                            edit: message::Edit { message_id, text },
                        },
                        (_, _, _, _, Some(message_id)) => Content::Revoke {
                            revoke: message::Revoke { message_id },
                        },
                        (Some(text), ..) => Content::Text { text },
                        _ => return Err(Error::invalid("say what the contact sends")),
                    };
                    content.validate()?;
                    (
                        session,
                        Command::SimMessage {
                            from: message::normalize_recipient(&from)?,
                            text: content.text().to_owned(),
                            content: Some(content).filter(|c| !matches!(c, Content::Text { .. })),
                        },
                    )
                }
            };
            let out = api::operator::send(cfg, &session, command).await?;
            if let CommandOutput::Session(s) = out {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(Error::internal)?
                );
            }
        }
        Cmd::Gateways(cmd) => gateways::run(&cfg, cmd).await?,
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
                say!(
                    "re-sealed {n} device value(s) under key `{}`",
                    keys.current()
                );
            }
            if let Some(keys) = webhooks {
                let n = store::webhooks::reseal_secrets(&client, &keys, batch).await?;
                say!(
                    "re-sealed {n} webhook secret(s) under key `{}`",
                    keys.current()
                );
            }
        }
    }
    Ok(())
}
