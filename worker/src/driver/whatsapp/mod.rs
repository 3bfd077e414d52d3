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
//! - [`connection`]: what a session does over its connection (pair by code, send, check
//!   numbers, log out, close);
//! - [`events`]: the crate's events mapped to our statuses and reasons;
//! - [`files`]: files both ways through WhatsApp's media hosts;
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

mod connection;
pub mod content;
pub mod events;
pub mod files;
pub mod phones;
pub mod store;
pub mod transport;
pub mod votes;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use serde_json::json;
use shared::{db::now_ms, sealed::Keyring, session::StatusReason};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use whatsapp_rust::{
    TokioRuntime,
    bot::Bot,
    http::UreqHttpClient,
    transport::TokioWebSocketTransportFactory,
    types::events::{Event, EventHandler},
};

use super::{Connection, Credentials, Driver, DriverError, DriverEvent};

#[derive(Debug, Clone)]
pub struct WhatsAppConfig {
    /// Where to connect instead of WhatsApp's endpoint (tests, proxies).
    pub ws_url: Option<String>,
    /// The WhatsApp Web client version to announce, pinned so no worker fetches it at run time.
    pub version: (u32, u32, u32),
    /// How long a connection may take to come up before it counts as failed.
    pub connect_timeout: Duration,
    /// How long one request to WhatsApp's media hosts may take (a file's download or upload).
    pub media_transfer_timeout: Duration,
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

/// The crate's HTTP client (blocking `ureq` calls on tokio's blocking threads) as the crate
/// builds it, but for a bound on each request: without one, a media host that stops
/// answering holds a thread, and the file's transfer, for good. A little past the transfer's
/// own bound, which is then what a received file's message reports.
fn http_client(transfer_timeout: Duration) -> UreqHttpClient {
    let timeout = transfer_timeout + Duration::from_secs(5);
    #[allow(unused_mut)]
    let mut config = ureq::config::Config::builder()
        .input_buffer_size(16 * 1024)
        .output_buffer_size(16 * 1024)
        .max_idle_connections(3)
        .max_idle_connections_per_host(2)
        .timeout_global(Some(timeout));
    // The test build's media hosts have a self-signed certificate (see Cargo.toml).
    #[cfg(feature = "wa-test-server")]
    {
        use ureq::tls::TlsConfig;
        config = config.tls_config(TlsConfig::builder().disable_verification(true).build());
    }
    UreqHttpClient::with_agent(config.build().into())
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

pub(super) fn store_error(e: impl std::fmt::Display) -> DriverError {
    DriverError::Connection(format!("the device store is unavailable: {e}"))
}

/// What a send the crate failed comes to. The crate writes what a send changes in the
/// device's Signal state *before* the stanza leaves, and gives up rather than send what it
/// could not save; after the stanza left it fails no more. So a failure whose cause is the
/// key store (ours: PostgreSQL, away) sent nothing, and the message may go again; any other
/// (the socket, WhatsApp) may have sent it.
pub(super) fn send_failed(e: &(dyn std::error::Error + 'static)) -> DriverError {
    let why = format!("WhatsApp did not take the message: {e}");
    if from_the_store(e) {
        DriverError::NotSent(why)
    } else {
        DriverError::Connection(why)
    }
}

fn from_the_store(e: &(dyn std::error::Error + 'static)) -> bool {
    use wacore::libsignal::protocol::SignalProtocolError;
    use whatsapp_rust::SignalMaintenanceError;
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.is::<wacore::store::error::StoreError>()
            || matches!(
                e.downcast_ref(),
                Some(SignalProtocolError::BackendError(..))
            )
            || matches!(e.downcast_ref(), Some(SignalMaintenanceError::Storage(_)))
    })
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
            .with_http_client(http_client(self.cfg.media_transfer_timeout))
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
        Ok(Box::new(connection::WhatsAppConnection {
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

pub(super) fn parse_jid(s: &str) -> Result<whatsapp_rust::Jid, DriverError> {
    s.parse()
        .map_err(|_| DriverError::Refused(format!("`{s}` is not a WhatsApp JID")))
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
    fn a_send_the_key_store_failed_sent_nothing_and_one_the_socket_failed_may_have() {
        use wacore::{libsignal::protocol::SignalProtocolError, store::error::StoreError};
        use whatsapp_rust::{ClientError, SendError};
        let down = || StoreError::Connection(Box::new(std::io::Error::other("db down")));
        let not_sent = |e: SendError| matches!(send_failed(&e), DriverError::NotSent(_));
        // As the crate reports the two seen under a PostgreSQL restart.
        assert!(not_sent(SendError::Internal(
            anyhow::Error::new(down()).context("Failed to flush signal cache")
        )));
        assert!(not_sent(SendError::Internal(
            SignalProtocolError::BackendError("backend", Box::new(down())).into()
        )));
        assert!(not_sent(SendError::Internal(
            whatsapp_rust::SignalMaintenanceError::Storage(anyhow::anyhow!("flush")).into()
        )));
        assert!(!not_sent(SendError::Client(ClientError::NotConnected)));
        assert!(!not_sent(SendError::Internal(anyhow::anyhow!(
            "socket write failed"
        ))));
    }
}
