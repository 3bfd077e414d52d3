//! The message resource: what a session sends, queued in Postgres and sent by the session's
//! worker within the session's rate limits, and what it receives. [`Content`] is the one
//! model of what a message says, from the api through the queue and the drivers to the
//! events (`content.rs`; the file a message carries in `file.rs`, polls and votes in
//! `poll.rs`). Validation of what callers may send lives beside each type.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};

mod content;
mod file;
mod poll;
pub use content::*;
pub use file::*;
pub use poll::*;

/// The longest text a message may carry, in characters.
pub const TEXT_MAX_CHARS: usize = 4_096;
/// The longest idempotency key, in characters.
pub const IDEMPOTENCY_KEY_MAX_CHARS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Accepted, waiting for its turn within the session's rate limits.
    Queued,
    /// The worker is sending it.
    Sending,
    /// WhatsApp accepted it.
    Sent,
    Delivered,
    Read,
    Failed,
    /// A message that reached the session (`direction: in`).
    Received,
}

impl MessageStatus {
    pub const ALL: [MessageStatus; 7] = [
        MessageStatus::Queued,
        MessageStatus::Sending,
        MessageStatus::Sent,
        MessageStatus::Delivered,
        MessageStatus::Read,
        MessageStatus::Failed,
        MessageStatus::Received,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Queued => "queued",
            MessageStatus::Sending => "sending",
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Read => "read",
            MessageStatus::Failed => "failed",
            MessageStatus::Received => "received",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Whether the session sent a message or received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Out,
    In,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Direction::Out, Direction::In]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// A message as the API shows it: one the session sends (`direction: out`), or one it
/// received (`direction: in`, with `from`; its `status` is `received`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// ULID.
    pub id: String,
    pub session_id: String,
    pub direction: Direction,
    /// The recipient's JID (`<digits>@s.whatsapp.net` for a phone number); of a message
    /// received, the session's own.
    pub to: String,
    /// Of a message received: the sender's JID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(flatten)]
    pub content: Content,
    /// Our id of the message this one quotes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    pub status: MessageStatus,
    /// Epoch milliseconds.
    pub created_at: i64,
    pub sent_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub read_at: Option<i64>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// When its sender last edited it (its content is the new one), epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<i64>,
    /// When its sender deleted it for everyone, epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// A new message's id: a ULID later than every one this process made before. A session's
/// queue goes out in id order, and two plain `Ulid::new()` of the same millisecond order at
/// random: messages a client sent one after the other could go out swapped.
pub fn new_id() -> String {
    static IDS: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    let next = IDS.lock().unwrap_or_else(|p| p.into_inner()).generate();
    // Only 2^80 ids in one millisecond overflow it.
    next.unwrap_or_else(|_| ulid::Ulid::new()).to_string()
}

/// A recipient as callers write it (a phone number with its country code, with or without
/// `+`, spaces or dashes; or a JID), as WhatsApp addresses it.
pub fn normalize_recipient(to: &str) -> Result<String> {
    let to = to.trim();
    let invalid = || {
        Error::invalid_field(
            "to",
            "`to` must be a phone number with its country code (e.g. +6281234567890) or a \
             WhatsApp JID (e.g. 6281234567890@s.whatsapp.net)",
        )
    };
    if let Some((user, server)) = to.split_once('@') {
        let known = matches!(server, "s.whatsapp.net" | "g.us" | "lid");
        let user_ok = !user.is_empty()
            && user.len() <= 64
            && user.chars().all(|c| c.is_ascii_digit() || c == '-');
        return if known && user_ok {
            Ok(to.to_owned())
        } else {
            Err(invalid())
        };
    }
    let digits: String = to
        .trim_start_matches('+')
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
        .collect();
    if (6..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0')
    {
        Ok(format!("{digits}@s.whatsapp.net"))
    } else {
        Err(invalid())
    }
}

pub fn validate_text(text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::invalid_field("text", "text must not be empty"));
    }
    if text.contains('\0') {
        return Err(Error::invalid_field("text", "text must not contain NUL"));
    }
    if text.chars().count() > TEXT_MAX_CHARS {
        return Err(Error::invalid_field(
            "text",
            format!("text must be at most {TEXT_MAX_CHARS} characters"),
        ));
    }
    Ok(())
}

pub fn validate_idempotency_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.chars().count() > IDEMPOTENCY_KEY_MAX_CHARS
        || key.chars().any(char::is_control)
    {
        return Err(Error::invalid_field(
            "idempotencyKey",
            format!("idempotencyKey must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} printable characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_one_after_the_other_sort_in_that_order() {
        let ids: Vec<String> = (0..10_000).map(|_| new_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn recipients_become_jids() {
        for (given, jid) in [
            ("+62 812-3456-7890", "6281234567890@s.whatsapp.net"),
            ("6281234567890", "6281234567890@s.whatsapp.net"),
            (
                "6281234567890@s.whatsapp.net",
                "6281234567890@s.whatsapp.net",
            ),
            ("120363021033254949@g.us", "120363021033254949@g.us"),
        ] {
            assert_eq!(
                normalize_recipient(given).ok().as_deref(),
                Some(jid),
                "{given}"
            );
        }
        for bad in [
            "",
            "abc",
            "+0812345",
            "12345",
            "1@example.com",
            "@s.whatsapp.net",
        ] {
            assert!(normalize_recipient(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn texts_are_bounded() {
        assert!(validate_text("hi").is_ok());
        assert!(validate_text("  ").is_err());
        assert!(validate_text(&"x".repeat(TEXT_MAX_CHARS)).is_ok());
        assert!(validate_text(&"x".repeat(TEXT_MAX_CHARS + 1)).is_err());
    }
}
