//! The wire protocol between the api tier and the gateway workers.
//!
//! A [`CommandEnvelope`] travels on `gw.commands` routed by gateway id; its AMQP
//! `correlation_id` is the command's ULID and `reply_to` names the publishing api's reply queue.
//! The worker answers with a [`Reply`] carrying the same id. Workers also publish [`Event`]s to
//! `gw.events` (topic `<org>.<session>.<type>`), which api replicas fan out over SSE.
//!
//! Each command is one variant of [`Command`]; the worker handles each in one place
//! (`worker/src/session_actor/commands.rs`). Adding a variant makes the compiler list the
//! places to touch.

use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::error::ErrorBody;
use crate::session::{DesiredState, Session, SessionStatus, StatusReason};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Connect; an unpaired session goes to `scan_qr_code`.
    Start,
    /// Disconnect, keeping the pairing.
    Stop,
    /// Stop then start in the background, keeping the pairing.
    Restart,
    /// Unlink the device; idempotent.
    Logout,
    /// The current QR code; starts pairing when none is ready.
    Qr,
    /// Pair by phone number instead of QR.
    RequestPairingCode { phone_number: String },
    /// The session's settings changed in Postgres; the worker re-reads them.
    ApplySettings,
    /// Stop, unlink the device and remove the row.
    Delete,
    /// Simulated phone (the `sim` driver only): scan the current QR as this number.
    SimScan { phone_number: String },
    /// Simulated phone: remove the linked device.
    SimUnlink,
    /// Simulated WhatsApp: the same device connects elsewhere and replaces this stream.
    SimConflict,
    /// Simulated network: the connection drops.
    SimDrop,
    /// Simulated contact: `from` sends the session a text, or, in `content`, another type:
    /// a reaction to, an edit of or a revoke of a message of the chat (by our id).
    SimMessage {
        from: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<crate::message::Content>,
    },
    /// Messages of the session were queued in Postgres: the worker sends what its rate
    /// limits allow (a notice; nobody waits for an answer).
    SendMessages,
    /// Which of these numbers (digits) are on WhatsApp, asked through the session's
    /// connection.
    CheckNumbers { numbers: Vec<String> },
}

impl Command {
    /// What the command asks the session to be from now on, if it says: what the fleet
    /// brings back after a move.
    pub fn desired_state(&self) -> Option<DesiredState> {
        match self {
            Command::Start
            | Command::Restart
            | Command::Qr
            | Command::RequestPairingCode { .. } => Some(DesiredState::Running),
            Command::Stop | Command::Logout => Some(DesiredState::Stopped),
            _ => None,
        }
    }

    /// The name used in the audit log, metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Start => "start",
            Command::Stop => "stop",
            Command::Restart => "restart",
            Command::Logout => "logout",
            Command::Qr => "qr",
            Command::RequestPairingCode { .. } => "request_pairing_code",
            Command::ApplySettings => "apply_settings",
            Command::Delete => "delete",
            Command::SimScan { .. } => "sim_scan",
            Command::SimUnlink => "sim_unlink",
            Command::SimConflict => "sim_conflict",
            Command::SimDrop => "sim_drop",
            Command::SimMessage { .. } => "sim_message",
            Command::SendMessages => "send_messages",
            Command::CheckNumbers { .. } => "check_numbers",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    pub id: Ulid,
    pub organization_id: String,
    pub session_id: String,
    pub gateway_id: String,
    /// Who asked (a user id or an API key's prefix), for the audit log.
    pub requested_by: String,
    /// Epoch ms after which the command must not run.
    pub deadline_ms: i64,
    pub command: Command,
}

/// What a successful command hands back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandOutput {
    /// The refreshed session row.
    Session(Box<Session>),
    Qr {
        qr: String,
        expires_at: i64,
    },
    PairingCode {
        code: String,
    },
    /// What WhatsApp said of each number of a `CheckNumbers`.
    Numbers {
        numbers: Vec<crate::contacts::NumberCheck>,
    },
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(CommandOutput),
    Error(ErrorBody),
    /// The worker does not own the session (any more): a drain or a failover moved it. The
    /// command did not run and has no record; the api re-reads the owner and sends it there.
    Moved,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub command_id: Ulid,
    pub outcome: Outcome,
}

/// An event about a session, as published by workers and streamed to callers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventKind {
    #[serde(rename = "auth.qr", rename_all = "camelCase")]
    Qr { qr: String, expires_at: i64 },
    #[serde(rename = "auth.pair_code")]
    PairCode { code: String },
    #[serde(rename = "session.status", rename_all = "camelCase")]
    Status {
        status: SessionStatus,
        status_reason: Option<StatusReason>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status_details: Option<serde_json::Value>,
    },
    #[serde(rename = "session.deleted")]
    Deleted,
    /// A message reached the session.
    #[serde(rename = "message.received", rename_all = "camelCase")]
    MessageReceived {
        /// Our id of the stored message.
        message_id: String,
        /// The sender's JID, the chat's (the sender's own, or a group), and the text (""
        /// for what is not a text).
        from: String,
        chat: String,
        text: String,
        /// What it says: its `type` and that type's content. Absent from events stored
        /// before it was (texts only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<crate::message::Content>,
        /// When it was sent, epoch milliseconds.
        timestamp: i64,
    },
    /// A contact reacted to a message of the chat (an empty `emoji` takes it back).
    #[serde(rename = "message.reaction", rename_all = "camelCase")]
    MessageReaction {
        /// Our id of the message reacted to.
        message_id: String,
        /// The contact's JID.
        from: String,
        emoji: String,
        /// When it was sent, epoch milliseconds.
        timestamp: i64,
    },
    /// A contact voted on a poll of the chat (no options: it took its vote back).
    #[serde(rename = "message.poll_vote", rename_all = "camelCase")]
    MessagePollVote {
        /// Our id of the poll.
        message_id: String,
        /// The contact's JID.
        from: String,
        /// The options it chose, in the poll's order.
        options: Vec<String>,
        /// When it was sent, epoch milliseconds.
        timestamp: i64,
    },
    /// A contact edited a message it sent the session: the stored message has the new text.
    #[serde(rename = "message.edited", rename_all = "camelCase")]
    MessageEdited {
        /// Our id of the message edited.
        message_id: String,
        from: String,
        /// The new text.
        text: String,
        timestamp: i64,
    },
    /// A contact deleted a message it sent the session for everyone.
    #[serde(rename = "message.revoked", rename_all = "camelCase")]
    MessageRevoked {
        /// Our id of the message deleted.
        message_id: String,
        from: String,
        timestamp: i64,
    },
    /// An outgoing message changed status.
    #[serde(rename = "message.status", rename_all = "camelCase")]
    MessageStatus {
        message_id: String,
        status: crate::message::MessageStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A webhook endpoint was disabled: it answered 410 Gone, or failed for too long. Not
    /// about a session (stored with an empty session id).
    #[serde(rename = "webhook.disabled", rename_all = "camelCase")]
    WebhookDisabled {
        webhook_id: String,
        url: String,
        /// `gone` or `failing`.
        reason: String,
    },
    /// An event of a kind this build does not know: written by a newer worker during a
    /// rolling update. Read, never written: the stream passes over it, a webhook delivery
    /// carries it as it was stored.
    #[serde(other)]
    Unknown,
}

impl EventKind {
    /// Every event name, as webhook subscriptions name them.
    pub const NAMES: &[&str] = &[
        "auth.qr",
        "auth.pair_code",
        "session.status",
        "session.deleted",
        "message.status",
        "message.received",
        "message.reaction",
        "message.poll_vote",
        "message.edited",
        "message.revoked",
        "webhook.disabled",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Qr { .. } => "auth.qr",
            EventKind::PairCode { .. } => "auth.pair_code",
            EventKind::Status { .. } => "session.status",
            EventKind::Deleted => "session.deleted",
            EventKind::MessageStatus { .. } => "message.status",
            EventKind::MessageReceived { .. } => "message.received",
            EventKind::MessageReaction { .. } => "message.reaction",
            EventKind::MessagePollVote { .. } => "message.poll_vote",
            EventKind::MessageEdited { .. } => "message.edited",
            EventKind::MessageRevoked { .. } => "message.revoked",
            EventKind::WebhookDisabled { .. } => "webhook.disabled",
            EventKind::Unknown => "unknown",
        }
    }

    /// What a caller must hold to see this event, on the stream and on replay. A QR or a
    /// pairing code links the number to whoever scans it first, and a disabled webhook names
    /// its URL: both are `manage`'s, like the routes that show them.
    pub fn required_capability(&self) -> crate::auth::Capability {
        use crate::auth::Capability;
        match self {
            EventKind::Qr { .. }
            | EventKind::PairCode { .. }
            | EventKind::WebhookDisabled { .. }
            | EventKind::Unknown => Capability::Manage,
            EventKind::Status { .. }
            | EventKind::Deleted
            | EventKind::MessageStatus { .. }
            | EventKind::MessageReceived { .. }
            | EventKind::MessageReaction { .. }
            | EventKind::MessagePollVote { .. }
            | EventKind::MessageEdited { .. }
            | EventKind::MessageRevoked { .. } => Capability::Read,
        }
    }
}

/// An event as stored in the `events` table (its `id` is the SSE event id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: i64,
    pub organization_id: String,
    pub session_id: String,
    /// Epoch ms.
    pub at: i64,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// The topic routing key on `gw.events`: `<org>.<session>.<type>`.
    pub fn routing_key(&self) -> String {
        format!(
            "{}.{}.{}",
            self.organization_id,
            self.session_id,
            self.kind.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_tagged_by_type() {
        let json = serde_json::to_value(Command::RequestPairingCode {
            phone_number: "628".into(),
        })
        .ok();
        assert_eq!(
            json,
            Some(serde_json::json!({"type": "request_pairing_code", "phone_number": "628"}))
        );
    }

    #[test]
    fn an_event_of_a_newer_kind_reads_as_unknown() {
        let kind: Result<EventKind, _> =
            serde_json::from_value(serde_json::json!({"type": "message.new_kind", "x": 1}));
        assert!(matches!(kind, Ok(EventKind::Unknown)), "{kind:?}");
    }

    #[test]
    fn events_serialize_with_their_documented_names() {
        let e = Event {
            id: 7,
            organization_id: "o".into(),
            session_id: "s".into(),
            at: 1,
            kind: EventKind::Qr {
                qr: "2@abc".into(),
                expires_at: 60,
            },
        };
        let v = serde_json::to_value(&e).ok();
        assert_eq!(
            v,
            Some(
                serde_json::json!({"id": 7, "organizationId": "o", "sessionId": "s", "at": 1,
                "type": "auth.qr", "qr": "2@abc", "expiresAt": 60})
            )
        );
        assert_eq!(e.routing_key(), "o.s.auth.qr");
    }
}
