//! Our [`Content`] in WhatsApp's protobuf and back: what the driver sends, and what it
//! understands of what it receives. Pure functions, unit-tested both ways.
//!
//! Files are `files.rs`'s: their messages carry where the bytes are. Reactions, polls, edits
//! and revokes are not built here: the crate's `send_reaction`, `polls().create`,
//! `edit_message` and `revoke_message` build and send them (they know which groups need
//! what, and a poll's vote secret).

use shared::message::{ContactCard, Content, Edit, Location, Poll, PollVote, Reaction, Revoke};
use wacore::proto_helpers::{MessageBuilderExt, MessageExt, build_quote_context};
use whatsapp_rust::waproto::{
    buffa::MessageField,
    whatsapp::{self as wa, ContextInfo},
};

use crate::driver::MessageRef;

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
        // Only quoted (a vote is received, never sent): the options it chose.
        Content::PollVote { poll_vote } => wa::Message::text(poll_vote.options.join(", ")),
        Content::Revoke { .. } => wa::Message::default(),
    }
}

/// The quote of `reply_to` a message carries.
pub(super) fn quote(reply_to: Option<&MessageRef>, own_jid: &str) -> Option<ContextInfo> {
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
    if let Some(u) = base.poll_update_message.as_option() {
        // The options it names are sealed: opened by the worker through the driver
        // (`votes.rs`), then named from the poll.
        let target = u.poll_creation_message_key.as_option()?.id.clone()?;
        let vote = PollVote {
            message_id: String::new(),
            options: vec![],
        };
        return Some((Content::PollVote { poll_vote: vote }, Some(target)));
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
    if let Some(content) = super::files::file_from_wa(base) {
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
    fn what_we_do_not_know_is_not_passed_on() {
        assert_eq!(from_wa(&wa::Message::default()), None);
    }
}
