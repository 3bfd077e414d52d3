//! Our [`Content`] in WhatsApp's protobuf and back: what the driver sends, and what it
//! understands of what it receives. Pure functions, unit-tested both ways.
//!
//! A file's message is built with its upload (`media_to_wa`): WhatsApp's hosts keep the
//! bytes, encrypted, and the message carries the key. Reactions, polls, edits and revokes
//! are not built here: the crate's `send_reaction`,
//! `polls().create`, `edit_message` and `revoke_message` build and send them (they know
//! which groups need what, and a poll's vote secret).

use shared::{
    media::Kind,
    message::{ContactCard, Content, Edit, Location, MediaContent, Poll, Reaction, Revoke},
};
use wacore::{
    download::{Downloadable, MediaType},
    proto_helpers::{MessageBuilderExt, MessageExt, build_quote_context},
};
use whatsapp_rust::{
    upload::UploadResponse,
    waproto::{
        buffa::MessageField,
        whatsapp::{self as wa, ContextInfo},
    },
};

use crate::driver::{MessageRef, RemoteFile};

/// The message for `content`, quoting `reply_to` when given. `own_jid` is this device's
/// account: the sender of a quoted message it sent.
pub fn to_wa(content: &Content, reply_to: Option<&MessageRef>, own_jid: &str) -> wa::Message {
    let context = quote(reply_to, own_jid);
    let field =
        |context: Option<ContextInfo>| context.map_or_else(MessageField::none, MessageField::some);
    match content {
        Content::Text { text } => match context {
            Some(context) => wa::Message::text_with_context(text, context),
            None => wa::Message::text(text),
        },
        Content::Location { location } => wa::Message {
            location_message: MessageField::some(wa::message::LocationMessage {
                degrees_latitude: Some(location.latitude),
                degrees_longitude: Some(location.longitude),
                name: location.name.clone(),
                address: location.address.clone(),
                context_info: field(context),
                ..Default::default()
            }),
            ..Default::default()
        },
        Content::Contact { contact } => wa::Message {
            contact_message: MessageField::some(wa::message::ContactMessage {
                display_name: Some(contact.display_name()),
                vcard: Some(contact.vcard.clone()),
                context_info: field(context),
                ..Default::default()
            }),
            ..Default::default()
        },
        // Only quoted (a reaction is sent by `send_reaction`, an edit by `edit_message`, a
        // revoke by `revoke_message`): what a quote of it shows.
        Content::Reaction { reaction } => wa::Message::text(&reaction.emoji),
        // Only quoted (a poll is sent by `polls().create`, which keeps its vote secret).
        Content::Poll { poll } => wa::Message::text(&poll.name),
        // Only quoted (a file goes with its upload: `media_to_wa`): its caption.
        Content::Image { .. }
        | Content::Video { .. }
        | Content::Audio { .. }
        | Content::Voice { .. }
        | Content::Document { .. }
        | Content::Sticker { .. } => wa::Message::text(content.text()),
        Content::Edit { edit } => wa::Message::text(&edit.text),
        Content::Revoke { .. } => wa::Message::default(),
    }
}

/// The quote of `reply_to` a message carries.
fn quote(reply_to: Option<&MessageRef>, own_jid: &str) -> Option<ContextInfo> {
    reply_to.map(|quoted| {
        let sender = if quoted.from_me {
            own_jid
        } else {
            quoted.chat.as_str()
        };
        build_quote_context(
            &quoted.wa_id,
            sender,
            &to_wa(&quoted.content, None, own_jid),
        )
    })
}

/// How WhatsApp's media hosts file a kind of file (its keys are derived by it).
pub fn media_type(kind: Kind) -> MediaType {
    match kind {
        Kind::Image => MediaType::Image,
        Kind::Video => MediaType::Video,
        Kind::Audio | Kind::Voice => MediaType::Audio,
        Kind::Document => MediaType::Document,
        Kind::Sticker => MediaType::Sticker,
    }
}

/// A file on WhatsApp's media hosts, as a message names it: where it is and the key that
/// opens it (the crate's upload answers it; the test server's phones make their own).
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub url: String,
    pub direct_path: String,
    pub media_key: [u8; 32],
    pub file_sha256: [u8; 32],
    pub file_enc_sha256: [u8; 32],
    pub file_length: u64,
    /// When the key was made (Unix seconds).
    pub media_key_timestamp: i64,
    /// Audio and video: the HMAC table that lets a player seek before the whole file is in.
    pub streaming_sidecar: Option<Vec<u8>>,
}

impl From<UploadResponse> for Uploaded {
    fn from(u: UploadResponse) -> Uploaded {
        Uploaded {
            url: u.url,
            direct_path: u.direct_path,
            media_key: u.media_key,
            file_sha256: u.file_sha256,
            file_enc_sha256: u.file_enc_sha256,
            file_length: u.file_length,
            media_key_timestamp: u.media_key_timestamp,
            streaming_sidecar: u.streaming_sidecar,
        }
    }
}

/// One of WhatsApp's file messages: the fields every one has, from `$u`, then its own.
macro_rules! file_message {
    ($ty:ident, $u:expr, $mime:expr, $context:expr, { $($field:ident: $value:expr),* $(,)? }) => {
        MessageField::some(wa::message::$ty {
            url: Some($u.url),
            direct_path: Some($u.direct_path),
            media_key: Some($u.media_key.to_vec()),
            file_sha256: Some($u.file_sha256.to_vec()),
            file_enc_sha256: Some($u.file_enc_sha256.to_vec()),
            file_length: Some($u.file_length),
            media_key_timestamp: Some($u.media_key_timestamp),
            mimetype: Some($mime),
            context_info: $context,
            $($field: $value,)*
            ..Default::default()
        })
    };
}

/// The message for the file `content` carries, once uploaded, quoting `reply_to`. `None`
/// for content that carries no file.
pub fn media_to_wa(
    content: &Content,
    u: Uploaded,
    reply_to: Option<&MessageRef>,
    own_jid: &str,
) -> Option<wa::Message> {
    let (kind, file) = content.media()?;
    let context = quote(reply_to, own_jid).map_or_else(MessageField::none, MessageField::some);
    let mime = file
        .mime_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    let caption = file.caption.clone();
    let mut message = wa::Message::default();
    match kind {
        Kind::Image => {
            message.image_message =
                file_message!(ImageMessage, u, mime, context, { caption: caption })
        }
        Kind::Video => {
            let sidecar = u.streaming_sidecar.clone();
            message.video_message = file_message!(VideoMessage, u, mime, context,
                { caption: caption, streaming_sidecar: sidecar })
        }
        Kind::Audio | Kind::Voice => {
            let sidecar = u.streaming_sidecar.clone();
            message.audio_message = file_message!(AudioMessage, u, mime, context,
                { ptt: Some(kind == Kind::Voice), streaming_sidecar: sidecar })
        }
        Kind::Document => {
            message.document_message = file_message!(DocumentMessage, u, mime, context, {
                caption: caption,
                file_name: file.file_name.clone(),
                title: file.file_name.clone(),
            })
        }
        Kind::Sticker => {
            message.sticker_message = file_message!(StickerMessage, u, mime, context, {})
        }
    }
    Some(message)
}

/// What a received message says, and, for a reaction, an edit or a revoke, WhatsApp's id
/// of the message it is on (its `messageId` is left empty: the worker fills in ours).
/// `None` for a type we do not know.
pub fn received(message: &wa::Message) -> Option<(Content, Option<String>)> {
    use wa::message::protocol_message::Type;
    let base = message.get_base_message();
    if let Some(r) = base.reaction_message.as_option() {
        let target = r.key.as_option()?.id.clone()?;
        let reaction = Reaction {
            message_id: String::new(),
            emoji: r.text.clone().unwrap_or_default(),
        };
        return Some((Content::Reaction { reaction }, Some(target)));
    }
    if let Some(p) = base.protocol_message.as_option() {
        let target = p.key.as_option()?.id.clone()?;
        let content = match p.r#type {
            Some(Type::Revoke) => Content::Revoke {
                revoke: Revoke {
                    message_id: String::new(),
                },
            },
            Some(Type::MessageEdit) => {
                let text = from_wa(p.edited_message.as_option()?)?.text().to_owned();
                Content::Edit {
                    edit: Edit {
                        message_id: String::new(),
                        text,
                    },
                }
            }
            _ => return None,
        };
        return Some((content, Some(target)));
    }
    from_wa(message).map(|c| (c, None))
}

/// What a received message says, when it is of a type we know; `None` otherwise (it is
/// not passed on).
pub fn from_wa(message: &wa::Message) -> Option<Content> {
    let base = message.get_base_message();
    if let Some(text) = base.text_content() {
        return Some(Content::Text {
            text: text.to_owned(),
        });
    }
    if let Some(l) = base.location_message.as_option() {
        return Some(Content::Location {
            location: Location {
                latitude: l.degrees_latitude?,
                longitude: l.degrees_longitude?,
                name: l.name.clone(),
                address: l.address.clone(),
            },
        });
    }
    if let Some(c) = base.contact_message.as_option() {
        return Some(Content::Contact {
            contact: ContactCard {
                vcard: c.vcard.clone()?,
                name: c.display_name.clone(),
            },
        });
    }
    if let Some(content) = file_from_wa(base) {
        return Some(content);
    }
    // Single-choice polls come as v3, others as v1 (WhatsApp Web's choice, the crate's too).
    let poll = [
        &base.poll_creation_message_v3,
        &base.poll_creation_message,
        &base.poll_creation_message_v2,
    ]
    .into_iter()
    .find_map(MessageField::as_option);
    if let Some(p) = poll {
        return Some(Content::Poll {
            poll: Poll {
                name: p.name.clone()?,
                options: p
                    .options
                    .iter()
                    .filter_map(|o| o.option_name.clone())
                    .collect(),
                selectable_count: p.selectable_options_count.unwrap_or(0).max(1),
            },
        });
    }
    None
}

/// A file message as our content: what WhatsApp says of the file (its type, size, SHA-256 of
/// the plain bytes, caption, name). `mediaId` is left empty: the bytes are not here (they
/// are on WhatsApp's media hosts, encrypted: [`remote_file`] says where).
fn file_from_wa(base: &wa::Message) -> Option<Content> {
    let f = FileMessage::of(base)?;
    Some(f.kind.content(MediaContent {
        media_id: String::new(),
        url: None,
        caption: f.caption.map(str::to_owned),
        file_name: f.file_name.map(str::to_owned),
        mime_type: f.mime_type.map(str::to_owned),
        size: f.fetch.file_length().and_then(|n| i64::try_from(n).ok()),
        sha256: f.fetch.file_sha256().map(shared::hex),
        status: None,
        error: None,
    }))
}

/// Where the file a received message carries is: WhatsApp's direct path and what the message
/// says of it. `None` for a message without a file (or one without its keys).
pub fn remote_file(message: &wa::Message, id: &str, chat: &str) -> Option<RemoteFile> {
    let f = FileMessage::of(message.get_base_message())?;
    Some(RemoteFile {
        message_id: id.to_owned(),
        chat: chat.to_owned(),
        kind: f.kind,
        direct_path: f.fetch.direct_path()?.to_owned(),
        media_key: f.fetch.media_key()?.to_vec(),
        file_sha256: f.fetch.file_sha256()?.to_vec(),
        file_enc_sha256: f.fetch.file_enc_sha256()?.to_vec(),
        file_length: f.fetch.file_length().unwrap_or(0),
    })
}

/// One of WhatsApp's five file messages, read alike.
struct FileMessage<'a> {
    kind: Kind,
    /// Where it is and its keys.
    fetch: &'a dyn Downloadable,
    mime_type: Option<&'a str>,
    caption: Option<&'a str>,
    file_name: Option<&'a str>,
}

impl<'a> FileMessage<'a> {
    fn of(base: &'a wa::Message) -> Option<FileMessage<'a>> {
        let f = |kind, fetch, mime: &'a Option<String>, caption: Option<&'a String>| FileMessage {
            kind,
            fetch,
            mime_type: mime.as_deref(),
            caption: caption.map(String::as_str),
            file_name: None,
        };
        if let Some(m) = base.image_message.as_option() {
            return Some(f(Kind::Image, m, &m.mimetype, m.caption.as_ref()));
        }
        if let Some(m) = base.video_message.as_option() {
            return Some(f(Kind::Video, m, &m.mimetype, m.caption.as_ref()));
        }
        if let Some(m) = base.audio_message.as_option() {
            let kind = if m.ptt == Some(true) {
                Kind::Voice
            } else {
                Kind::Audio
            };
            return Some(f(kind, m, &m.mimetype, None));
        }
        if let Some(m) = base.document_message.as_option() {
            let document = f(Kind::Document, m, &m.mimetype, m.caption.as_ref());
            return Some(FileMessage {
                file_name: m.file_name.as_deref(),
                ..document
            });
        }
        let m = base.sticker_message.as_option()?;
        Some(f(Kind::Sticker, m, &m.mimetype, None))
    }
}

/// What the crate downloads by: our [`RemoteFile`] as WhatsApp's message fields.
pub struct Remote<'a>(pub &'a RemoteFile);

impl Downloadable for Remote<'_> {
    fn direct_path(&self) -> Option<&str> {
        Some(&self.0.direct_path)
    }
    fn media_key(&self) -> Option<&[u8]> {
        Some(&self.0.media_key)
    }
    fn file_enc_sha256(&self) -> Option<&[u8]> {
        Some(&self.0.file_enc_sha256)
    }
    fn file_sha256(&self) -> Option<&[u8]> {
        Some(&self.0.file_sha256)
    }
    fn file_length(&self) -> Option<u64> {
        Some(self.0.file_length)
    }
    fn app_info(&self) -> MediaType {
        media_type(self.0.kind)
    }
}

/// The message a received one quotes: WhatsApp's id of it.
pub fn quoted_id(message: &wa::Message) -> Option<String> {
    let base = message.get_base_message();
    let contexts = [
        base.extended_text_message
            .as_option()
            .map(|m| &m.context_info),
        base.location_message.as_option().map(|m| &m.context_info),
        base.contact_message.as_option().map(|m| &m.context_info),
    ];
    let context = contexts
        .into_iter()
        .flatten()
        .find_map(MessageField::as_option)?;
    context.stanza_id.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "6281100000001@s.whatsapp.net";
    const PEER: &str = "6281100000002@s.whatsapp.net";

    fn location() -> Content {
        Content::Location {
            location: Location {
                latitude: -6.2,
                longitude: 106.8,
                name: Some("Monas".into()),
                address: Some("Jakarta".into()),
            },
        }
    }

    fn contact(name: Option<&str>) -> Content {
        Content::Contact {
            contact: ContactCard {
                vcard: "BEGIN:VCARD\nVERSION:3.0\nFN:Ana\nEND:VCARD".into(),
                name: name.map(str::to_owned),
            },
        }
    }

    #[test]
    fn every_type_reads_back_as_it_was_sent() {
        for content in [
            Content::Text { text: "hi".into() },
            location(),
            contact(Some("Ana")),
        ] {
            assert_eq!(from_wa(&to_wa(&content, None, OWN)), Some(content));
        }
        // A card's shown name comes from its FN when none is given.
        let Some(Content::Contact { contact }) = from_wa(&to_wa(&contact(None), None, OWN)) else {
            panic!("not a contact");
        };
        assert_eq!(contact.name.as_deref(), Some("Ana"));
    }

    #[test]
    fn a_reply_quotes_the_message_by_its_id_and_sender() {
        let quoted = |from_me| MessageRef {
            wa_id: "3EB0QUOTED".into(),
            chat: PEER.into(),
            from_me,
            content: Content::Text {
                text: "the question".into(),
            },
        };
        for content in [
            Content::Text {
                text: "the answer".into(),
            },
            location(),
            contact(Some("Ana")),
        ] {
            let sent = to_wa(&content, Some(&quoted(false)), OWN);
            assert_eq!(quoted_id(&sent).as_deref(), Some("3EB0QUOTED"));
            assert_eq!(from_wa(&sent), Some(content));
        }
        let sent = to_wa(
            &Content::Text {
                text: "me again".into(),
            },
            Some(&quoted(true)),
            OWN,
        );
        let context = sent.extended_text_message.context_info.clone();
        assert_eq!(context.participant.as_deref(), Some(OWN));
        assert_eq!(
            context.quoted_message.conversation.as_deref(),
            Some("the question")
        );
    }

    #[test]
    fn a_contacts_reaction_edit_and_revoke_name_the_message_they_are_on() {
        use wa::message::{ProtocolMessage, ReactionMessage, protocol_message::Type};
        let key = || {
            MessageField::some(wa::MessageKey {
                remote_jid: Some(PEER.into()),
                from_me: Some(false),
                id: Some("3EB0TARGET".into()),
                ..Default::default()
            })
        };
        let reaction = wa::Message {
            reaction_message: MessageField::some(ReactionMessage {
                key: key(),
                text: Some("👍".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let protocol = |r#type, edited_message| wa::Message {
            protocol_message: MessageField::some(ProtocolMessage {
                key: key(),
                r#type: Some(r#type),
                edited_message,
                ..Default::default()
            }),
            ..Default::default()
        };
        let edit = protocol(
            Type::MessageEdit,
            MessageField::some(wa::Message::text("the new text")),
        );
        let revoke = protocol(Type::Revoke, MessageField::none());
        let target = Some("3EB0TARGET".to_owned());
        assert_eq!(
            received(&reaction),
            Some((
                Content::Reaction {
                    reaction: Reaction {
                        message_id: String::new(),
                        emoji: "👍".into()
                    }
                },
                target.clone()
            ))
        );
        assert_eq!(
            received(&edit),
            Some((
                Content::Edit {
                    edit: Edit {
                        message_id: String::new(),
                        text: "the new text".into()
                    }
                },
                target.clone()
            ))
        );
        assert_eq!(
            received(&revoke),
            Some((
                Content::Revoke {
                    revoke: Revoke {
                        message_id: String::new()
                    }
                },
                target
            ))
        );
        // Other protocol messages (history sync, app-state keys, …) are not messages.
        assert_eq!(
            received(&protocol(
                Type::HistorySyncNotification,
                MessageField::none()
            )),
            None
        );
        let text = wa::Message::text("plain");
        assert_eq!(
            received(&text),
            Some((
                Content::Text {
                    text: "plain".into()
                },
                None
            ))
        );
    }

    #[test]
    fn a_file_message_reads_back_with_where_its_bytes_are() {
        let uploaded = Uploaded {
            url: "https://mmg.example/v/t62/abc".into(),
            direct_path: "/v/t62/abc".into(),
            media_key: [1; 32],
            file_sha256: [2; 32],
            file_enc_sha256: [3; 32],
            file_length: 1234,
            media_key_timestamp: 1_700_000_000,
            streaming_sidecar: None,
        };
        for (kind, caption, name) in [
            (Kind::Image, Some("parcel"), None),
            (Kind::Document, Some("invoice"), Some("invoice.pdf")),
            (Kind::Voice, None, None),
            (Kind::Audio, None, None),
            (Kind::Video, Some("clip"), None),
            (Kind::Sticker, None, None),
        ] {
            let content = kind.content(MediaContent {
                media_id: "01J0000000000000000000000A".into(),
                url: None,
                caption: caption.map(str::to_owned),
                file_name: name.map(str::to_owned),
                mime_type: Some("application/x-test".into()),
                size: Some(1234),
                sha256: None,
                status: None,
                error: None,
            });
            let wa = media_to_wa(&content, uploaded.clone(), None, "").expect("a file message");
            let (back_kind, back) = from_wa(&wa)
                .and_then(|c| {
                    let (k, f) = c.media()?;
                    Some((k, f.clone()))
                })
                .expect("read back");
            assert_eq!(back_kind, kind);
            assert_eq!(back.caption.as_deref(), caption, "{kind:?}");
            assert_eq!(back.file_name.as_deref(), name, "{kind:?}");
            assert_eq!(back.mime_type.as_deref(), Some("application/x-test"));
            assert_eq!(back.size, Some(1234));
            assert_eq!(back.sha256, Some(shared::hex(&[2; 32])));
            assert!(back.media_id.is_empty(), "the bytes are not here");
            let remote = remote_file(&wa, "3EB0", "6281100000002@s.whatsapp.net").expect("where");
            assert_eq!(
                (remote.kind, remote.direct_path.as_str(), remote.file_length),
                (kind, "/v/t62/abc", 1234)
            );
            assert_eq!(remote.media_key, vec![1; 32]);
        }
    }

    #[test]
    fn what_we_do_not_know_is_not_passed_on() {
        assert_eq!(from_wa(&wa::Message::default()), None);
    }
}
