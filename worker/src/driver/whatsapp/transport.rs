//! The crate's WebSocket transport, watched: what became of the connection attempts, so a
//! connection that never comes up is reported with its cause. The crate retries a failed
//! connect by itself and only logs why; the one cause an operator must not mistake for a
//! network problem is a server that answers the handshake but is not WhatsApp (its
//! certificate chain is not signed by WhatsApp's root key): a client that gets an answer to
//! its first handshake message and hangs up without sending the second has rejected it.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU32, Ordering},
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
    last: Arc<Mutex<Attempt>>,
}

impl WatchedTransports {
    pub fn new(inner: TokioWebSocketTransportFactory) -> (Self, Arc<Mutex<Attempt>>) {
        let last = Arc::new(Mutex::new(Attempt::None));
        (
            WatchedTransports {
                inner,
                last: last.clone(),
            },
            last,
        )
    }
}

fn record(last: &Mutex<Attempt>, attempt: Attempt) {
    *last.lock().unwrap_or_else(|e| e.into_inner()) = attempt;
}

/// One socket: how many messages the client sent on it and whether the server said anything.
struct Watched {
    inner: Arc<dyn Transport>,
    sent: AtomicU32,
    answered: Arc<AtomicBool>,
    last: Arc<Mutex<Attempt>>,
}

#[async_trait]
impl TransportFactory for WatchedTransports {
    async fn create_transport(
        &self,
    ) -> Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>), anyhow::Error> {
        let (inner, events) = match self.inner.create_transport().await {
            Ok(opened) => opened,
            Err(e) => {
                record(&self.last, Attempt::Unreachable);
                return Err(e);
            }
        };
        record(&self.last, Attempt::Opened);
        let answered = Arc::new(AtomicBool::new(false));
        // The client reads our copy of the events; the first data marks the server as heard.
        let (tx, rx) = async_channel::bounded(events.capacity().unwrap_or(64).max(1));
        let heard = answered.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                if matches!(event, TransportEvent::DataReceived(_)) {
                    heard.store(true, Ordering::Relaxed);
                }
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        let watched = Watched {
            inner,
            sent: AtomicU32::new(0),
            answered,
            last: self.last.clone(),
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
            record(&self.last, Attempt::HandshakeRejected);
        }
        self.inner.disconnect().await;
    }

    fn resource_report(&self) -> Option<wacore::stats::TransportResourceReport> {
        self.inner.resource_report()
    }
}
