//! The real WhatsApp driver: multi-device connections through the `whatsapp-rust` crate
//! (cargo feature `whatsapp`, selected per worker with `WA_DRIVER=whatsapp`).
//!
//! Read it by file:
//! - here, a connection's life: the crate's client built on our Postgres store, its events
//!   forwarded in order, and a deadline on coming up — the crate retries a failed connect by
//!   itself with backoff for up to 15 minutes and no event says so, so the driver watches:
//!   a connection not up (a QR code shown, or logged in) within `WA_CONNECT_TIMEOUT_MS` is
//!   closed and reported [`DriverEvent::Failed`] with `retry`, and the worker tries again with
//!   its own backoff while the session should run;
//! - [`events`]: the crate's events mapped to our statuses and reasons;
//! - [`transport`]: the crate's WebSocket transport, watched, so a connection that does not
//!   come up says why (a server that is not WhatsApp's is not a network problem);
//! - [`phones`]: `gatewayctl sim …` through the simulated phones of the local protocol
//!   server, for the test build only;
//! - [`store`]: the crate's storage traits on Postgres, every device's keys sealed with
//!   AES-256-GCM and every write fenced by the worker's lease on the session, so any worker of
//!   the region can carry the number after a drain or a failover, and one that lost the
//!   session cannot write its keys.
//!
//! Logout unlinks the device and wipes its keys; stop disconnects and keeps them; a new
//! pairing starts from none.

pub mod content;
pub mod events;
pub mod phones;
pub mod store;
pub mod transport;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use serde_json::json;
use shared::{
    contacts::NumberCheck, db::now_ms, message::Content, sealed::Keyring, session::StatusReason,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use whatsapp_rust::{
    MediaRetryResult, MediaReuploadRequest, RevokeType, TokioRuntime,
    bot::{Bot, BotHandle},
    http::UreqHttpClient,
    pair_code::PairCodeOptions,
    transport::TokioWebSocketTransportFactory,
    types::events::{Event, EventHandler},
    upload::UploadOptions,
    waproto::whatsapp as wa,
};

use super::{Connection, Credentials, Driver, DriverError, DriverEvent, SimAction};

#[derive(Debug, Clone)]
pub struct WhatsAppConfig {
    /// Where to connect instead of WhatsApp's endpoint (tests, proxies).
    pub ws_url: Option<String>,
    /// The WhatsApp Web client version to announce, pinned so no worker fetches it at run time.
    pub version: (u32, u32, u32),
    /// How long a connection may take to come up before it counts as failed.
    pub connect_timeout: Duration,
    /// The control API of the local protocol server's simulated phones (test build only):
    /// what `sim` commands act through.
    pub sim_control_url: Option<String>,
}

pub struct WhatsAppDriver {
    db: Pool,
    keyring: Arc<Keyring>,
    cfg: WhatsAppConfig,
}

impl WhatsAppDriver {
    pub fn new(db: Pool, keyring: Arc<Keyring>, cfg: WhatsAppConfig) -> Self {
        WhatsAppDriver { db, keyring, cfg }
    }
}

/// Parses `WA_CLIENT_VERSION` (`2.3000.1042742319`).
pub fn parse_version(s: &str) -> Result<(u32, u32, u32), String> {
    let parts: Vec<u32> = s
        .split('.')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`{s}` is not a version like 2.3000.1042742319"))?;
    match parts[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => Err(format!("`{s}` is not a version like 2.3000.1042742319")),
    }
}

/// Forwards the crate's events, mapped, in the order it dispatches them (a raw handler runs
/// inline on its event bus), and tells the deadline whether the connection is up.
struct Forward {
    events: mpsc::UnboundedSender<DriverEvent>,
    up: watch::Sender<bool>,
    shown: phones::Shown,
}

impl EventHandler for Forward {
    fn handle_event(&self, event: Arc<Event>) {
        for mapped in events::map_all(&event, now_ms()) {
            if events::is_up(&mapped) {
                self.up.send_replace(true);
            } else if matches!(mapped, DriverEvent::Disconnected { .. }) {
                self.up.send_replace(false);
            }
            if let DriverEvent::Qr { code, .. } = &mapped {
                self.shown.qr(code);
            }
            let _ = self.events.send(mapped);
        }
    }
}

fn store_error(e: impl std::fmt::Display) -> DriverError {
    DriverError::Connection(format!("the device store is unavailable: {e}"))
}

#[async_trait]
impl Driver for WhatsAppDriver {
    async fn connect(
        &self,
        session_id: &str,
        epoch: i64,
        credentials: Option<Credentials>,
        events: mpsc::UnboundedSender<DriverEvent>,
    ) -> Result<Box<dyn Connection>, DriverError> {
        if credentials.is_none() {
            // A new pairing starts from no keys: whatever an earlier device left goes.
            if !store::wipe(&self.db, session_id, epoch)
                .await
                .map_err(store_error)?
            {
                return Err(DriverError::Refused(
                    "this worker no longer holds the session".into(),
                ));
            }
        }
        let backend = Arc::new(store::PgBackend::new(
            self.db.clone(),
            self.keyring.clone(),
            session_id.to_owned(),
            epoch,
        ));
        self.start(backend.clone(), Some(backend), session_id, epoch, events)
            .await
    }
}

impl WhatsAppDriver {
    /// Starts a client on `backend` (the benchmark runs the crate's in-memory one beside
    /// ours for comparison) and the deadline that watches it.
    pub async fn open(
        &self,
        backend: Arc<dyn wacore::store::traits::Backend>,
        session_id: &str,
        epoch: i64,
        events: mpsc::UnboundedSender<DriverEvent>,
    ) -> Result<Box<dyn Connection>, DriverError> {
        self.start(backend, None, session_id, epoch, events).await
    }

    /// [`WhatsAppDriver::open`], with our store (`pg`, the same as `backend`) retired at
    /// logout.
    async fn start(
        &self,
        backend: Arc<dyn wacore::store::traits::Backend>,
        pg: Option<Arc<store::PgBackend>>,
        session_id: &str,
        epoch: i64,
        events: mpsc::UnboundedSender<DriverEvent>,
    ) -> Result<Box<dyn Connection>, DriverError> {
        let mut transport = TokioWebSocketTransportFactory::new();
        if let Some(url) = &self.cfg.ws_url {
            transport = transport.with_url(url.clone());
        }
        let (transport, sockets) = transport::WatchedTransports::new(transport);
        let (up, up_rx) = watch::channel(false);
        let shown = phones::Shown::default();
        let bot = Bot::builder()
            .with_backend_arc(backend)
            .with_transport_factory(transport)
            .with_http_client(UreqHttpClient::new())
            .with_runtime(TokioRuntime)
            .with_version(self.cfg.version)
            .skip_history_sync()
            .with_event_handler(Forward {
                events: events.clone(),
                up,
                shown: shown.clone(),
            })
            .build()
            .await
            .map_err(store_error)?;
        let handle = bot.spawn();
        let closed = CancellationToken::new();
        tokio::spawn(deadline(
            handle.client(),
            up_rx,
            sockets.clone(),
            events,
            self.cfg.clone(),
            closed.clone(),
        ));
        Ok(Box::new(WhatsAppConnection {
            handle: Some(handle),
            store: pg,
            db: self.db.clone(),
            session_id: session_id.to_owned(),
            epoch,
            connect_timeout: self.cfg.connect_timeout,
            closed,
            sockets,
            sim_control_url: self.cfg.sim_control_url.clone(),
            shown,
        }))
    }
}

/// Watches a connection come up, and come back after each drop: one that is not up within
/// the timeout is closed and reported failed (to be retried by the worker).
async fn deadline(
    client: Arc<whatsapp_rust::Client>,
    mut up: watch::Receiver<bool>,
    sockets: transport::Sockets,
    events: mpsc::UnboundedSender<DriverEvent>,
    cfg: WhatsAppConfig,
    closed: CancellationToken,
) {
    loop {
        let came_up = tokio::select! {
            _ = closed.cancelled() => return,
            r = tokio::time::timeout(cfg.connect_timeout, up.wait_for(|up| *up)) => r.map(|r| r.map(|_| ())),
        };
        match came_up {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                client.disconnect().await;
                let endpoint = cfg.ws_url.as_deref().unwrap_or("WhatsApp");
                let why = match sockets.last() {
                    transport::Attempt::HandshakeRejected => {
                        ": the server is not WhatsApp's (its certificate chain is not signed by \
                         WhatsApp, so the client rejected its handshake)"
                    }
                    _ => "",
                };
                let _ = events.send(DriverEvent::Failed {
                    reason: StatusReason::ConnectFailed,
                    details: Some(json!({
                        "message": format!(
                            "could not connect to {endpoint} within {} ms{why}",
                            cfg.connect_timeout.as_millis()
                        ),
                    })),
                    retry: true,
                });
                return;
            }
        }
        tokio::select! {
            _ = closed.cancelled() => return,
            r = up.wait_for(|up| !*up) => if r.is_err() { return },
        }
    }
}

struct WhatsAppConnection {
    handle: Option<BotHandle>,
    /// The session's key store, retired at logout.
    store: Option<Arc<store::PgBackend>>,
    db: Pool,
    session_id: String,
    epoch: i64,
    connect_timeout: Duration,
    closed: CancellationToken,
    /// Closed after the client, whatever it was doing: see `transport.rs`.
    sockets: transport::Sockets,
    sim_control_url: Option<String>,
    shown: phones::Shown,
}

impl WhatsAppConnection {
    fn client(&self) -> Result<Arc<whatsapp_rust::Client>, DriverError> {
        self.handle
            .as_ref()
            .map(BotHandle::client)
            .ok_or_else(|| DriverError::Connection("the connection is closed".into()))
    }
}

#[async_trait]
impl Connection for WhatsAppConnection {
    async fn request_pairing_code(&mut self, phone_number: &str) -> Result<String, DriverError> {
        let number = phone_number.trim_start_matches('+');
        let client = self.client()?;
        // The code can only be asked for over an open stream.
        let opened = async {
            while !client.is_connected() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(self.connect_timeout, opened)
            .await
            .is_err()
        {
            return Err(DriverError::Connection(
                "could not reach WhatsApp to ask for a pairing code".into(),
            ));
        }
        client
            .pair_with_code(PairCodeOptions {
                phone_number: number.to_owned(),
                ..PairCodeOptions::default()
            })
            .await
            .map(|code| {
                let code = format_code(&code);
                self.shown.code(number, &code);
                code
            })
            .map_err(|e| DriverError::Refused(format!("WhatsApp refused a pairing code: {e}")))
    }

    async fn simulate(&mut self, action: SimAction) -> Result<(), DriverError> {
        let Some(url) = &self.sim_control_url else {
            return Err(DriverError::Unsupported);
        };
        let device = self
            .client()?
            .persistence_manager()
            .get_device_snapshot()
            .pn
            .clone();
        phones::Phones {
            url,
            shown: &self.shown,
            device,
        }
        .act(action)
        .await
    }

    async fn logout(&mut self) -> Result<(), DriverError> {
        let client = self.client()?;
        // Unlinking needs the stream up; a device that cannot connect is still wiped here
        // (WhatsApp drops a linked device that never comes back).
        if client
            .wait_for_connected(self.connect_timeout)
            .await
            .is_err()
        {
            tracing::warn!(session_id = %self.session_id, "logging out without reaching WhatsApp; wiping the keys only");
        }
        client.logout().await;
        self.close().await;
        // The client's own tasks may still be writing (app-state sync, pre-keys): none may
        // bring keys back once they are wiped.
        if let Some(store) = &self.store {
            store.retire();
        }
        match store::wipe(&self.db, &self.session_id, self.epoch).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(DriverError::Refused(
                "this worker no longer holds the session".into(),
            )),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn send(&mut self, message: &super::Outgoing) -> Result<Option<String>, DriverError> {
        let client = self.client()?;
        let jid = parse_jid(&message.to)?;
        if !client.is_logged_in() {
            return Err(DriverError::Connection(
                "the session is not connected to WhatsApp".into(),
            ));
        }
        let refused =
            |e: String| DriverError::Connection(format!("WhatsApp did not take the message: {e}"));
        let own = client
            .pn()
            .map(|j| j.to_non_ad_string())
            .unwrap_or_default();
        let target = || {
            message.refers_to.as_ref().ok_or_else(|| {
                DriverError::Refused(format!(
                    "a {} needs the message it is on",
                    message.content.kind()
                ))
            })
        };
        match &message.content {
            Content::Reaction { reaction } => {
                let target = target()?;
                let key = wa::MessageKey {
                    remote_jid: Some(target.chat.clone()),
                    from_me: Some(target.from_me),
                    id: Some(target.wa_id.clone()),
                    ..Default::default()
                };
                let sent = client.send_reaction(jid, key, &reaction.emoji).await;
                sent.map(|s| Some(s.message_id))
                    .map_err(|e| refused(e.to_string()))
            }
            // The vote secret it makes is not kept: votes are not read yet (issue 21).
            Content::Poll { poll } => {
                let sent = client
                    .polls()
                    .create(jid, &poll.name, &poll.options, poll.selectable_count)
                    .await;
                sent.map(|(s, _secret)| Some(s.message_id))
                    .map_err(|e| refused(e.to_string()))
            }
            // WhatsApp's client answers the original's id for an edit, and nothing for a
            // revoke: the stanza's own id is not told, and no receipt names it here.
            Content::Edit { edit } => {
                let text = Content::Text {
                    text: edit.text.clone(),
                };
                let new = content::to_wa(&text, None, &own);
                let sent = client.edit_message(jid, target()?.wa_id.clone(), new).await;
                sent.map(|_| None).map_err(|e| refused(e.to_string()))
            }
            Content::Revoke { .. } => {
                let sent = client
                    .revoke_message(jid, target()?.wa_id.clone(), RevokeType::Sender)
                    .await;
                sent.map(|_| None).map_err(|e| refused(e.to_string()))
            }
            // A file: encrypted and uploaded to WhatsApp's media hosts (the hosts a
            // `media_conn` query names), then its message, carrying the key, to the contact.
            content if let Some((kind, _)) = content.media() => {
                let bytes = message.media.clone().ok_or_else(|| {
                    DriverError::Refused(format!("the {} has no file to send", kind.as_str()))
                })?;
                let upload = client
                    .upload(bytes, content::media_type(kind), UploadOptions::default())
                    .await
                    .map_err(|e| {
                        DriverError::Connection(format!(
                            "could not upload the file to WhatsApp's media hosts: {e}"
                        ))
                    })?;
                let wa_message =
                    content::media_to_wa(content, upload.into(), message.reply_to.as_ref(), &own)
                        .ok_or_else(|| DriverError::Refused("not a file".into()))?;
                let sent = client.send_message(jid, wa_message).await;
                sent.map(|s| Some(s.message_id))
                    .map_err(|e| refused(e.to_string()))
            }
            content => {
                let wa_message = content::to_wa(content, message.reply_to.as_ref(), &own);
                let sent = client.send_message(jid, wa_message).await;
                sent.map(|s| Some(s.message_id))
                    .map_err(|e| refused(e.to_string()))
            }
        }
    }

    async fn check_numbers(&mut self, numbers: &[String]) -> Result<Vec<NumberCheck>, DriverError> {
        let client = self.client()?;
        if !client.is_logged_in() {
            return Err(DriverError::Connection(
                "the session is not connected to WhatsApp".into(),
            ));
        }
        let jids: Vec<whatsapp_rust::Jid> = numbers
            .iter()
            .map(|n| parse_jid(&format!("{n}@s.whatsapp.net")))
            .collect::<Result<_, _>>()?;
        let answers = client
            .contacts()
            .is_on_whatsapp(&jids)
            .await
            .map_err(|e| DriverError::Connection(format!("WhatsApp did not answer: {e}")))?;
        // One answer per number asked, in the order asked; one WhatsApp left out is not on it.
        Ok(numbers
            .iter()
            .map(|n| {
                let answer = answers
                    .iter()
                    .find(|a| a.jid.user == *n || a.pn_jid.as_ref().is_some_and(|p| p.user == *n))
                    .filter(|a| a.is_registered);
                NumberCheck {
                    number: n.clone(),
                    on_whatsapp: answer.is_some(),
                    jid: answer.map(|_| format!("{n}@s.whatsapp.net")),
                    lid: answer
                        .and_then(|a| a.lid.as_ref())
                        .map(|l| l.to_non_ad_string()),
                }
            })
            .collect())
    }

    async fn typing(&mut self, to: &str) -> Result<(), DriverError> {
        let client = self.client()?;
        let jid = parse_jid(to)?;
        client
            .chatstate()
            .send_composing(&jid)
            .await
            .map_err(|e| DriverError::Connection(format!("cannot show typing: {e}")))
    }

    async fn mark_read(&mut self, message: &super::Inbound) -> Result<(), DriverError> {
        let client = self.client()?;
        let chat = parse_jid(&message.chat)?;
        let sender = parse_jid(&message.from)?;
        let sender = (message.chat != message.from).then_some(&sender);
        client
            .mark_as_read(&chat, sender, &[message.id.as_str()])
            .await
            .map_err(|e| DriverError::Connection(format!("cannot mark read: {e}")))
    }

    async fn download(&mut self, file: &super::RemoteFile) -> Result<Vec<u8>, DriverError> {
        let client = self.client()?;
        let first = match client.download(&content::Remote(file)).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) => e,
        };
        // A dead link (WhatsApp's hosts keep a file for a while): the sender's phone is asked
        // to upload it again (WhatsApp's media re-upload request), then the new path is read.
        let failed = |why: String| {
            DriverError::Connection(format!("could not download the file ({first}); {why}"))
        };
        let chat = parse_jid(&file.chat)?;
        let asked = client
            .media_reupload()
            .request(&MediaReuploadRequest {
                msg_id: &file.message_id,
                chat_jid: &chat,
                media_key: &file.media_key,
                is_from_me: false,
                participant: None,
            })
            .await;
        let direct_path = match asked {
            Ok(MediaRetryResult::Success { direct_path }) => direct_path,
            Ok(MediaRetryResult::NotFound) => {
                return Err(failed("the sender's phone no longer has it".into()));
            }
            Ok(other) => {
                return Err(failed(format!(
                    "the sender's phone could not upload it again ({other:?})"
                )));
            }
            Err(e) => return Err(failed(format!("asking for it again failed: {e}"))),
        };
        let again = super::RemoteFile {
            direct_path,
            ..file.clone()
        };
        client
            .download(&content::Remote(&again))
            .await
            .map_err(|e| failed(format!("uploaded again, it still could not be read: {e}")))
    }

    async fn close(&mut self) {
        self.closed.cancel();
        if let Some(handle) = self.handle.take() {
            // Flushes the device's state to the store, then ends the client's tasks.
            if tokio::time::timeout(Duration::from_secs(10), handle.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(session_id = %self.session_id, "the WhatsApp client did not stop in time");
            }
        }
        // The client closes the socket it is connected on, but not one it is still
        // connecting on when the stop comes: close that too, before the worker connects again.
        let open = self.sockets.open();
        if open > 0 {
            tracing::info!(session_id = %self.session_id, open, "closing the sockets the client left open");
        }
        self.sockets.close_all(SOCKET_CLOSE).await;
    }
}

/// How long a socket may take to send its WebSocket close.
const SOCKET_CLOSE: Duration = Duration::from_secs(5);

impl Drop for WhatsAppConnection {
    fn drop(&mut self) {
        // Dropping the handle aborts the client; the deadline goes with it, and the sockets
        // are closed behind it.
        self.closed.cancel();
        let sockets = self.sockets.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { sockets.close_all(SOCKET_CLOSE).await });
        }
    }
}

fn parse_jid(s: &str) -> Result<whatsapp_rust::Jid, DriverError> {
    s.parse()
        .map_err(|_| DriverError::Refused(format!("`{s}` is not a WhatsApp JID")))
}

/// `ABCD1234` → `ABCD-1234`, the form the API promises.
fn format_code(code: &str) -> String {
    let code: String = code.chars().filter(|c| *c != '-').collect();
    match code.len() {
        8 => format!("{}-{}", &code[..4], &code[4..]),
        _ => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_or_say_why_not() {
        assert_eq!(
            parse_version("2.3000.1042742319"),
            Ok((2, 3000, 1042742319))
        );
        assert!(parse_version("2.3000").is_err());
        assert!(parse_version("2.x.1").is_err());
    }

    #[test]
    fn pairing_codes_read_as_two_halves() {
        assert_eq!(format_code("ABCD1234"), "ABCD-1234");
        assert_eq!(format_code("ABCD-1234"), "ABCD-1234");
    }
}
