//! Commands sent by an operator rather than an API caller (`gatewayctl sim …`): the session is
//! found in any organization, and the command then takes the ordinary command path, audited
//! as requested by `gatewayctl`.

use std::time::Duration;

use shared::{
    Error, Result,
    auth::{Capabilities, Capability, Principal},
    media::{self, Media},
    message::MediaContent,
    protocol::{Command, CommandOutput},
    store,
};
use tokio_util::sync::CancellationToken;

use crate::{Config, build_state, command_client};

pub async fn send(cfg: Config, session_id: &str, command: Command) -> Result<CommandOutput> {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let state = build_state(cfg, shutdown).await?;
    run(&state, session_id, || Ok((command, None))).await
}

/// A simulated contact sends the session a file (`gatewayctl sim message --file`): the bytes
/// go into the media store as WhatsApp's servers would hold them, the kind follows what they
/// are (sniffed), and the contact's phone sends a message carrying them.
pub async fn send_file(
    cfg: Config,
    session_id: &str,
    from: String,
    bytes: Vec<u8>,
    caption: Option<String>,
    file_name: Option<String>,
) -> Result<CommandOutput> {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let state = build_state(cfg, shutdown).await?;
    let head = &bytes[..bytes.len().min(media::SNIFF_BYTES)];
    let mime_type = media::sniff(head, None).map_err(Error::invalid)?;
    let kind = media::Kind::for_mime(&mime_type);
    kind.accepts("file", &mime_type, bytes.len() as u64)?;
    let retention = state.cfg.media.retention_ms();
    run(&state, session_id, move || {
        let file = Media::of(&bytes, mime_type, retention);
        let content = kind.content(MediaContent {
            media_id: file.id.clone(),
            url: None,
            caption: caption.clone(),
            file_name: file_name.filter(|_| kind == media::Kind::Document),
            mime_type: Some(file.mime_type.clone()),
            size: Some(file.size),
            sha256: Some(file.sha256.clone()),
            status: None,
            error: None,
        });
        content.validate()?;
        let command = Command::SimMessage {
            from,
            text: caption.unwrap_or_default(),
            content: Some(content),
        };
        Ok((command, Some((file, bytes))))
    })
    .await
}

/// A command (and the file it carries, stored first, in the session's organization).
type Prepared = (Command, Option<(Media, Vec<u8>)>);

/// Finds the session in any organization, prepares the command (storing its file in the
/// session's organization), and sends it as `gatewayctl`.
async fn run(
    state: &crate::AppState,
    session_id: &str,
    prepare: impl FnOnce() -> Result<Prepared>,
) -> Result<CommandOutput> {
    let session = store::sessions::get_for_operator(&state.db.get().await?, session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    let (command, file) = prepare()?;
    if let Some((file, bytes)) = file {
        let mut client = state.db.get().await?;
        let tx = client.transaction().await?;
        (state.media)
            .put(&tx, &session.organization_id, &file, &bytes)
            .await?;
        tx.commit().await?;
    }
    let operator = Principal {
        organization_id: session.organization_id,
        subject: "gatewayctl".into(),
        capabilities: Capabilities::of(&[Capability::Read, Capability::Manage]),
        expires_at_ms: None,
    };
    for _ in 0..100 {
        if state.bus.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    command_client::run(state, &operator, session_id, command).await
}
