//! What a message says: [`Content`], one type per kind of message in the shape of Meta's
//! Cloud API, with what callers may send of each (its validation), and the actions on a
//! message already sent (edit, revoke). The message resource around it is `super`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{MediaContent, Poll, PollVote, validate_text};
use crate::error::{Error, Result};

/// The longest name or address of a location, in characters.
pub const PLACE_MAX_CHARS: usize = 1_000;
/// The longest contact card (vCard), in bytes.
pub const VCARD_MAX_BYTES: usize = 16_384;

/// What a message says: its `type` and, under a key of the same name, that type's content,
/// in the shape of Meta's Cloud API (`{"type": "location", "location": {…}}`); a text is
/// `{"type": "text", "text": "…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    Text {
        /// 1–4096 characters.
        text: String,
    },
    Location {
        location: Location,
    },
    Contact {
        contact: ContactCard,
    },
    Reaction {
        reaction: Reaction,
    },
    Poll {
        poll: Poll,
    },
    /// A contact's vote on a poll of the chat: the options it chose now (none: it took its
    /// vote back). Received only.
    PollVote {
        poll_vote: PollVote,
    },
    /// A JPEG or PNG of up to 5 MB, with an optional caption.
    Image {
        image: Box<MediaContent>,
    },
    /// An MP4 or 3GPP video of up to 16 MB, with an optional caption.
    Video {
        video: Box<MediaContent>,
    },
    /// An audio file of up to 16 MB (AAC, MP4, MP3, AMR, OGG).
    Audio {
        audio: Box<MediaContent>,
    },
    /// A push-to-talk voice note: OGG with Opus inside, up to 16 MB.
    Voice {
        voice: Box<MediaContent>,
    },
    /// Any file of up to 100 MB, with its file name and an optional caption.
    Document {
        document: Box<MediaContent>,
    },
    /// A WebP sticker of up to 500 KB.
    Sticker {
        sticker: Box<MediaContent>,
    },
    /// A new text for a text message the session sent. Queued by
    /// `PATCH …/messages/{message}`, not by `POST …/messages`.
    Edit {
        edit: Edit,
    },
    /// A message the session sent, deleted for everyone. Queued by
    /// `POST …/messages/{message}:revoke`, not by `POST …/messages`.
    Revoke {
        revoke: Revoke,
    },
}

/// A point on the map, with an optional name and address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Location {
    #[schema(minimum = -90, maximum = 90)]
    pub latitude: f64,
    #[schema(minimum = -180, maximum = 180)]
    pub longitude: f64,
    /// Up to 1000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1000)]
    pub name: Option<String>,
    /// Up to 1000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1000)]
    pub address: Option<String>,
}

/// A contact card: a vCard (`BEGIN:VCARD` … `END:VCARD`) and the name to show for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContactCard {
    /// Up to 16 KiB.
    #[schema(
        example = "BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nTEL;waid=6281234567890:+62 812-3456-7890\nEND:VCARD"
    )]
    pub vcard: String,
    /// The name shown; from the card's `FN` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1000)]
    pub name: Option<String>,
}

/// An emoji on a message of the same chat; an empty `emoji` takes the reaction back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reaction {
    /// Our id of the message reacted to (sent or received by the session).
    pub message_id: String,
    /// One emoji, or empty.
    #[schema(max_length = 32)]
    pub emoji: String,
}

/// The new text of a message the session sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Edit {
    /// Our id of the message edited.
    pub message_id: String,
    /// 1–4096 characters.
    pub text: String,
}

/// A message the session sent, deleted for everyone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revoke {
    /// Our id of the message deleted.
    pub message_id: String,
}

/// How long after it was sent WhatsApp lets a message be edited.
pub const EDIT_WINDOW_MS: i64 = 15 * 60_000;
/// How long after it was sent WhatsApp lets a message be deleted for everyone.
pub const REVOKE_WINDOW_MS: i64 = 60 * 3_600_000;

impl Content {
    /// The text of a text message (the new text of an edit, a file's caption); "" for the
    /// other types.
    pub fn text(&self) -> &str {
        match self {
            Content::Text { text } => text,
            Content::Edit { edit } => &edit.text,
            _ => self
                .media()
                .and_then(|(_, m)| m.caption.as_deref())
                .unwrap_or(""),
        }
    }

    /// The message another one of the session refers to, by our id: the one a reaction or
    /// a vote is on, the one an edit or a revoke changes.
    pub fn refers_to(&self) -> Option<&str> {
        match self {
            Content::Reaction { reaction } => Some(&reaction.message_id),
            Content::PollVote { poll_vote } => Some(&poll_vote.message_id),
            Content::Edit { edit } => Some(&edit.message_id),
            Content::Revoke { revoke } => Some(&revoke.message_id),
            _ => None,
        }
    }

    /// The file it carries, and the kind of message it goes as.
    pub fn media(&self) -> Option<(crate::media::Kind, &MediaContent)> {
        use crate::media::Kind;
        Some(match self {
            Content::Image { image } => (Kind::Image, &**image),
            Content::Video { video } => (Kind::Video, &**video),
            Content::Audio { audio } => (Kind::Audio, &**audio),
            Content::Voice { voice } => (Kind::Voice, &**voice),
            Content::Document { document } => (Kind::Document, &**document),
            Content::Sticker { sticker } => (Kind::Sticker, &**sticker),
            _ => return None,
        })
    }

    /// The file it carries, to fill in.
    pub fn media_mut(&mut self) -> Option<&mut MediaContent> {
        match self {
            Content::Image { image: m }
            | Content::Video { video: m }
            | Content::Audio { audio: m }
            | Content::Voice { voice: m }
            | Content::Document { document: m }
            | Content::Sticker { sticker: m } => Some(&mut **m),
            _ => None,
        }
    }

    /// Points a reaction, a vote, an edit or a revoke at our message `id`.
    pub fn set_refers_to(&mut self, id: String) {
        match self {
            Content::Reaction { reaction } => reaction.message_id = id,
            Content::PollVote { poll_vote } => poll_vote.message_id = id,
            Content::Edit { edit } => edit.message_id = id,
            Content::Revoke { revoke } => revoke.message_id = id,
            _ => {}
        }
    }

    /// An edit or a revoke: an action on a message already sent, queued by an endpoint of
    /// its own rather than sent as a message.
    pub fn is_action(&self) -> bool {
        matches!(self, Content::Edit { .. } | Content::Revoke { .. })
    }

    /// Whether `self`, a message the session sent at `sent_at` (`None`: not yet), may still
    /// take `action` at `now`; the reason when not.
    pub fn check_action(
        &self,
        action: &Content,
        sent_at: Option<i64>,
        now: i64,
    ) -> std::result::Result<(), String> {
        let (allowed, window, verb) = match action {
            Content::Edit { .. } => (
                matches!(self, Content::Text { .. }),
                EDIT_WINDOW_MS,
                "edited",
            ),
            Content::Revoke { .. } => (
                matches!(
                    self,
                    Content::Text { .. }
                        | Content::Location { .. }
                        | Content::Contact { .. }
                        | Content::Poll { .. }
                ) || self.media().is_some(),
                REVOKE_WINDOW_MS,
                "deleted",
            ),
            _ => return Err("only an edit or a revoke acts on a message".into()),
        };
        if !allowed {
            return Err(format!("a {} message cannot be {verb}", self.kind()));
        }
        match sent_at {
            Some(at) if now - at > window => Err(format!(
                "WhatsApp lets a message be {verb} for {} after it was sent",
                if window % 3_600_000 == 0 {
                    format!("{} hours", window / 3_600_000)
                } else {
                    format!("{} minutes", window / 60_000)
                }
            )),
            _ => Ok(()),
        }
    }

    /// The `type` callers see.
    pub fn kind(&self) -> &'static str {
        match self {
            Content::Text { .. } => "text",
            Content::Location { .. } => "location",
            Content::Contact { .. } => "contact",
            Content::Reaction { .. } => "reaction",
            Content::Poll { .. } => "poll",
            Content::PollVote { .. } => "poll_vote",
            Content::Image { .. } => "image",
            Content::Video { .. } => "video",
            Content::Audio { .. } => "audio",
            Content::Voice { .. } => "voice",
            Content::Document { .. } => "document",
            Content::Sticker { .. } => "sticker",
            Content::Edit { .. } => "edit",
            Content::Revoke { .. } => "revoke",
        }
    }

    /// Checks what a caller may send; the errors name the field as the caller wrote it.
    pub fn validate(&self) -> Result<()> {
        match self {
            Content::Text { text } => validate_text(text),
            Content::Location { location } => location.validate(),
            Content::Contact { contact } => contact.validate(),
            Content::Reaction { reaction } => reaction.validate(),
            Content::Poll { poll } => poll.validate(),
            Content::PollVote { poll_vote } => poll_vote.validate(),
            Content::Image { .. }
            | Content::Video { .. }
            | Content::Audio { .. }
            | Content::Voice { .. }
            | Content::Document { .. }
            | Content::Sticker { .. } => match self.media() {
                Some((kind, m)) => m.validate(kind),
                None => Ok(()),
            },
            Content::Edit { edit } => {
                validate_message_id("edit.messageId", &edit.message_id)?;
                validate_text(&edit.text)
            }
            Content::Revoke { revoke } => {
                validate_message_id("revoke.messageId", &revoke.message_id)
            }
        }
    }

    /// The content of a row of `messages`: its `content` column, or, for rows written before
    /// it (texts only), the `text` column.
    pub fn from_columns(content: Option<serde_json::Value>, text: String) -> Content {
        content
            .and_then(|c| serde_json::from_value(c).ok())
            .unwrap_or(Content::Text { text })
    }
}

fn validate_place(field: &str, v: Option<&String>) -> Result<()> {
    match v {
        Some(v) if v.chars().count() > PLACE_MAX_CHARS || v.contains('\0') => {
            Err(Error::invalid_field(
                field,
                format!("{field} must be at most {PLACE_MAX_CHARS} characters, without NUL"),
            ))
        }
        _ => Ok(()),
    }
}

impl Location {
    fn validate(&self) -> Result<()> {
        if !(-90.0..=90.0).contains(&self.latitude) {
            return Err(Error::invalid_field(
                "location.latitude",
                "location.latitude must be between -90 and 90",
            ));
        }
        if !(-180.0..=180.0).contains(&self.longitude) {
            return Err(Error::invalid_field(
                "location.longitude",
                "location.longitude must be between -180 and 180",
            ));
        }
        validate_place("location.name", self.name.as_ref())?;
        validate_place("location.address", self.address.as_ref())
    }
}

impl ContactCard {
    fn validate(&self) -> Result<()> {
        let card = self.vcard.trim();
        let upper = card.to_ascii_uppercase();
        if !upper.starts_with("BEGIN:VCARD") || !upper.ends_with("END:VCARD") {
            return Err(Error::invalid_field(
                "contact.vcard",
                "contact.vcard must be a vCard, from BEGIN:VCARD to END:VCARD",
            ));
        }
        if self.vcard.len() > VCARD_MAX_BYTES || self.vcard.contains('\0') {
            return Err(Error::invalid_field(
                "contact.vcard",
                format!("contact.vcard must be at most {VCARD_MAX_BYTES} bytes, without NUL"),
            ));
        }
        validate_place("contact.name", self.name.as_ref())
    }

    /// The name to show: `name`, else the card's `FN`, else "".
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.vcard
                .lines()
                .find_map(|l| {
                    let (key, value) = l.split_once(':')?;
                    key.split(';')
                        .next()
                        .is_some_and(|k| k.eq_ignore_ascii_case("FN"))
                        .then(|| value.trim().to_owned())
                })
                .unwrap_or_default()
        })
    }
}

pub(super) fn validate_message_id(field: &str, id: &str) -> Result<()> {
    if ulid::Ulid::from_string(id).is_err() {
        return Err(Error::invalid_field(
            field,
            format!("{field} must be the id of a message of this session"),
        ));
    }
    Ok(())
}

impl Reaction {
    fn validate(&self) -> Result<()> {
        validate_message_id("reaction.messageId", &self.message_id)?;
        if self.emoji.chars().count() > 32 || self.emoji.chars().any(char::is_control) {
            return Err(Error::invalid_field(
                "reaction.emoji",
                "reaction.emoji must be one emoji (at most 32 characters), or empty to take the reaction back",
            ));
        }
        Ok(())
    }
}
