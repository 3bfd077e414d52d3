//! The crate's WebSocket transport, watched: what became of the connection attempts, so a
//! connection that never comes up is reported with its cause. The crate retries a failed
//! connect by itself and only logs why; the one cause an operator must not mistake for a
//! network problem is a server that answers the handshake but is not WhatsApp (its
//! certificate chain is not signed by WhatsApp's root key): a client that gets an answer to
//! its first handshake message and hangs up without sending the second has rejected it.
//!
//! It also keeps the connection's open sockets, so that closing a connection closes every one
//! of them, whatever the client was doing: a `:restart` that lands while the client is still
//! connecting must not leave a socket that logs in after the next connection did, which
//! WhatsApp would see as the device connected twice (and end one of them as `replaced`).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use whatsapp_rust::transport::{
    TokioWebSocketTransportFactory, Transport, TransportEvent, TransportFactory,
};

/// What the latest connection attempt came to, as far as the transport can see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Attempt {
    #[default]
    None,
    /// The endpoint could not be reached (refused, unresolvable, no WebSocket).
    Unreachable,
    /// The socket opened; the handshake is under way or done.
    Opened,
    /// The server answered the handshake's first message and the client hung up instead of
    /// finishing it: the server did not prove it is WhatsApp.
    HandshakeRejected,
}

pub struct WatchedTransports {
    inner: TokioWebSocketTransportFactory,
    sockets: Sockets,
}

impl WatchedTransports {
    pub fn new(inner: TokioWebSocketTransportFactory) -> (Self, Sockets) {
        let sockets = Sockets::default();
        (
            WatchedTransports {
                inner,
                sockets: sockets.clone(),
            },
            sockets,
        )
    }
}

/// What the driver sees of a connection's sockets: how the latest attempt went, and the
/// sockets still open.
#[derive(Clone, Default)]
pub struct Sockets(Arc<SocketsInner>);

#[derive(Default)]
struct SocketsInner {
    last: Mutex<Attempt>,
    /// Sockets the server has not closed, by a number of our own.
    open: Mutex<HashMap<u64, Arc<dyn Transport>>>,
    next: AtomicU64,
    /// Set once the connection is closed: no socket opens after it.
    closed: AtomicBool,
}

impl Sockets {
    pub fn last(&self) -> Attempt {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, attempt: Attempt) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = attempt;
    }

    fn opened(&self, socket: Arc<dyn Transport>) -> u64 {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        self.0
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, socket);
        id
    }

    fn ended(&self, id: u64) {
        self.0
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// How many sockets are open.
    pub fn open(&self) -> usize {
        self.0.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Opens no socket any more: a connect the client has under way fails instead of logging
    /// in only to be closed again.
    pub fn refuse_new(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
    }

    /// Opens no socket any more and closes the open ones (a WebSocket close each, within
    /// `within`): once this returns, WhatsApp has been told that no stream of this connection
    /// goes on.
    pub async fn close_all(&self, within: Duration) {
        self.refuse_new();
        let open: Vec<_> = self
            .0
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, socket)| socket)
            .collect();
        for socket in open {
            if tokio::time::timeout(within, socket.disconnect())
                .await
                .is_err()
            {
                tracing::warn!("a WhatsApp socket did not close within {within:?}");
            }
        }
    }
}

/// One socket: how many messages the client sent on it and whether the server said anything.
struct Watched {
    inner: Arc<dyn Transport>,
    sent: AtomicU32,
    answered: Arc<AtomicBool>,
    sockets: Sockets,
}

#[async_trait]
impl TransportFactory for WatchedTransports {
    async fn create_transport(
        &self,
    ) -> Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>), anyhow::Error> {
        if self.sockets.0.closed.load(Ordering::SeqCst) {
            anyhow::bail!("the connection is closed");
        }
        let (inner, events) = match self.inner.create_transport().await {
            Ok(opened) => opened,
            Err(e) => {
                self.sockets.record(Attempt::Unreachable);
                return Err(e);
            }
        };
        let id = self.sockets.opened(inner.clone());
        if self.sockets.0.closed.load(Ordering::SeqCst) {
            // Closed while this socket opened: `close_all` may have missed it.
            self.sockets.close_all(Duration::from_secs(5)).await;
            anyhow::bail!("the connection is closed");
        }
        self.sockets.record(Attempt::Opened);
        let answered = Arc::new(AtomicBool::new(false));
        // The client reads our copy of the events; the first data marks the server as heard,
        // and the end (the server's or ours) takes the socket off the open ones.
        let (tx, rx) = async_channel::bounded(events.capacity().unwrap_or(64).max(1));
        let heard = answered.clone();
        let sockets = self.sockets.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    TransportEvent::DataReceived(_) => heard.store(true, Ordering::Relaxed),
                    TransportEvent::Disconnected(_) => sockets.ended(id),
                    _ => {}
                }
                if tx.send(event).await.is_err() {
                    break;
                }
            }
            sockets.ended(id);
        });
        let watched = Watched {
            inner,
            sent: AtomicU32::new(0),
            answered,
            sockets: self.sockets.clone(),
        };
        Ok((Arc::new(watched), rx))
    }
}

#[async_trait]
impl Transport for Watched {
    async fn send(&self, data: Bytes) -> Result<(), anyhow::Error> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.inner.send(data).await
    }

    async fn disconnect(&self) {
        if self.sent.load(Ordering::Relaxed) == 1 && self.answered.load(Ordering::Relaxed) {
            self.sockets.record(Attempt::HandshakeRejected);
        }
        self.inner.disconnect().await;
    }

    fn resource_report(&self) -> Option<wacore::stats::TransportResourceReport> {
        self.inner.resource_report()
    }
}
