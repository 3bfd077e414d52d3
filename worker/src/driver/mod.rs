//! The boundary between the worker and WhatsApp.
//!
//! A [`Driver`] opens a [`Connection`] for one session. Everything that happens on its own
//! (a QR code rotating, the phone scanning it, the device removed, the stream replaced, the
//! network dropping) arrives as a [`DriverEvent`] on the channel handed to `connect`. No
//! WhatsApp library type crosses this boundary: credentials are an opaque JSON document the
//! worker stores in Postgres, so any worker of the region can take a session over.
//!
//! Implementations: [`sim`] (the default; an in-process simulation of the phone and of
//! WhatsApp's multi-device pairing) and [`whatsapp`] (cargo feature `whatsapp`: real
//! multi-device connections through the `whatsapp-rust` crate, the device's keys in Postgres).

pub mod sim;
#[cfg(feature = "whatsapp")]
pub mod whatsapp;

use async_trait::async_trait;
use shared::{contacts::NumberCheck, message::Content, session::StatusReason};
use tokio::sync::mpsc;

/// A linked device's keys, opaque above the driver.
pub type Credentials = serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum DriverEvent {
    /// A new QR code to show; it replaces the previous one.
    Qr { code: String, expires_at: i64 },
    /// No code was scanned before the last one expired; the connection is closed.
    QrTimeout,
    /// The phone linked this device. Boxed: every connection's event channel allocates room
    /// for 32 of its largest event up front, and a worker holds tens of thousands of them.
    Paired(Box<Paired>),
    /// Connected and authenticated.
    Connected,
    /// The stream ended; when `reconnecting`, the driver is already trying again.
    Disconnected {
        reason: StatusReason,
        reconnecting: bool,
    },
    /// The device was unlinked (from the phone); the credentials are void.
    LoggedOut { reason: StatusReason },
    /// The connection is closed and failed: `retry` when the worker should try again later
    /// (it could not connect in time), not when trying again would do harm (the stream was
    /// replaced elsewhere, the number is banned for a while, the client is outdated).
    Failed {
        reason: StatusReason,
        details: Option<serde_json::Value>,
        retry: bool,
    },
    /// The recipient's phone got (or read) a message this connection sent.
    Receipt { message_id: String, read: bool },
    /// A message reached the number (boxed: see `Paired`).
    Message(Box<Inbound>),
}

/// A message that reached the number: one to show, or a contact's reaction to, edit of or
/// delete of a message of the chat.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// WhatsApp's id of the message.
    pub id: String,
    pub from: String,
    pub chat: String,
    /// What it says. A reaction's, an edit's or a revoke's `messageId` is left empty by the
    /// driver: the worker fills it in with our id of the message `refers_to` names.
    pub content: Content,
    /// WhatsApp's id of the message a reaction, an edit or a revoke is on.
    pub refers_to: Option<String>,
    /// Where the file it carries is, when the driver did not bring the bytes along (the
    /// worker has the driver [`Connection::download`] it before storing the message).
    pub file: Option<RemoteFile>,
    /// Of a vote on a poll: the options chosen, as WhatsApp carries them (the worker has
    /// the driver [`Connection::open_ballot`] it, then names them from the poll).
    pub ballot: Option<Ballot>,
    /// Epoch milliseconds.
    pub timestamp: i64,
}

/// A contact's vote on a poll as WhatsApp carries it: the options chosen, each by the
/// SHA-256 of its name.
#[derive(Debug, Clone, PartialEq)]
pub enum Ballot {
    /// In the clear (the simulated contacts' votes).
    Open(Vec<[u8; 32]>),
    /// Sealed with the poll's secret (AES-GCM: the payload with its tag, and the IV).
    Sealed { payload: Vec<u8>, iv: Vec<u8> },
}

/// A file a contact sent, on WhatsApp's media hosts, encrypted: its path there and what its
/// message says of it (the key that opens it, the SHA-256 of both forms, its length), and the
/// message (WhatsApp's id, its chat), by which the sender's phone is asked to upload it again
/// when its link is dead.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteFile {
    pub message_id: String,
    pub chat: String,
    pub kind: shared::media::Kind,
    pub direct_path: String,
    pub media_key: Vec<u8>,
    pub file_sha256: Vec<u8>,
    pub file_enc_sha256: Vec<u8>,
    pub file_length: u64,
}

/// A download of a file a contact sent ([`Connection::download`]).
pub type Download = futures::future::BoxFuture<'static, Result<Received, DriverError>>;

/// A file a contact sent, its plain bytes in a temporary file of its own (gone with it, so
/// memory never holds the file), and how many there are.
#[derive(Debug)]
pub struct Received {
    pub file: std::fs::File,
    pub size: u64,
}

/// A message to send, the messages it refers to resolved to what WhatsApp knows them by.
#[derive(Debug)]
pub struct Outgoing {
    /// The recipient's JID (or a group's).
    pub to: String,
    pub content: Content,
    /// The message it quotes.
    pub reply_to: Option<MessageRef>,
    /// The message a reaction is on, or that an edit or a revoke changes.
    pub refers_to: Option<MessageRef>,
    /// The bytes of the file it carries (an image, a document, …), streaming out of the
    /// media store as the driver takes them: a send holds a piece of it, never all of it.
    pub media: Option<shared::media_store::FileStream>,
}

/// A message of the session as WhatsApp knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRef {
    /// WhatsApp's id of it.
    pub wa_id: String,
    /// The chat it is in.
    pub chat: String,
    /// Sent by this session; else by `chat`'s peer.
    pub from_me: bool,
    /// What it says (a quote shows it).
    pub content: Content,
}

/// What pairing gave the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    pub phone_number: String,
    pub jid: String,
    pub lid: String,
    pub credentials: Credentials,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("not supported by this driver")]
    Unsupported,
    #[error("{0}")]
    Refused(String),
    #[error("connection failed: {0}")]
    Connection(String),
    /// A send that failed before anything went out (the device's key store could not be
    /// read or written): it may go again.
    #[error("not sent: {0}")]
    NotSent(String),
}

/// Test-and-demo actions on the simulated phone and network.
#[derive(Debug, Clone, PartialEq)]
pub enum SimAction {
    Scan {
        phone_number: String,
    },
    Unlink,
    Conflict,
    Drop,
    /// A contact sends the number a message (a text, or a reaction to, an edit of or a
    /// delete of a message of the chat, `refers_to` naming it).
    Message {
        from: String,
        content: Box<Content>,
        refers_to: Option<Box<MessageRef>>,
    },
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Opens a connection for `session_id`: with credentials it logs in, without it starts
    /// pairing. Events flow to `events` until the connection ends. `epoch` is the worker's
    /// lease on the session: a driver that keeps state in Postgres fences its writes by it.
    async fn connect(
        &self,
        session_id: &str,
        epoch: i64,
        credentials: Option<Credentials>,
        events: mpsc::UnboundedSender<DriverEvent>,
    ) -> Result<Box<dyn Connection>, DriverError>;
}

#[async_trait]
pub trait Connection: Send {
    /// Pair by phone number instead of QR; answers the `XXXX-XXXX` code to type on the phone.
    async fn request_pairing_code(&mut self, phone_number: &str) -> Result<String, DriverError>;
    /// Unlinks the device from the account and closes.
    async fn logout(&mut self) -> Result<(), DriverError>;
    /// Disconnects, keeping the pairing.
    async fn close(&mut self);
    /// Sends a message; answers WhatsApp's id of it, which its receipts name (`None` when
    /// WhatsApp's client does not tell it: a revoke).
    async fn send(&mut self, _message: Outgoing) -> Result<Option<String>, DriverError> {
        Err(DriverError::Unsupported)
    }
    /// Which of these numbers (digits with their country code) are on WhatsApp.
    async fn check_numbers(
        &mut self,
        _numbers: &[String],
    ) -> Result<Vec<NumberCheck>, DriverError> {
        Err(DriverError::Unsupported)
    }
    /// Shows "typing…" in the chat with `to`.
    async fn typing(&mut self, _to: &str) -> Result<(), DriverError> {
        Err(DriverError::Unsupported)
    }
    /// Marks a message that reached the number read.
    async fn mark_read(&mut self, _message: &Inbound) -> Result<(), DriverError> {
        Err(DriverError::Unsupported)
    }
    /// A file a contact sent, downloaded and opened (its MAC checked) into a temporary file:
    /// a download that holds what it needs of the connection, so the session goes on while
    /// it runs.
    fn download(&self, _file: RemoteFile) -> Download {
        Box::pin(async { Err(DriverError::Unsupported) })
    }
    /// The options `voter` chose on `poll`, each by the SHA-256 of its name: a sealed vote
    /// opened with the poll's secret.
    async fn open_ballot(
        &mut self,
        _poll: &MessageRef,
        _voter: &str,
        ballot: Ballot,
    ) -> Result<Vec<[u8; 32]>, DriverError> {
        match ballot {
            Ballot::Open(chosen) => Ok(chosen),
            Ballot::Sealed { .. } => Err(DriverError::Unsupported),
        }
    }
    /// Drives the simulated phone or network (the `sim` driver only).
    async fn simulate(&mut self, _action: SimAction) -> Result<(), DriverError> {
        Err(DriverError::Unsupported)
    }
}
