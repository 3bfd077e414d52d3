//! Our [`Content`] in WhatsApp's protobuf and back: what the driver sends, and what it
//! understands of what it receives. Pure functions, unit-tested both ways.
//!
//! Reactions are not built here: the crate's `send_reaction` builds and sends them (it knows
//! which groups need them encrypted).

use shared::message::{ContactCard, Content, Location};
use wacore::proto_helpers::{MessageBuilderExt, MessageExt, build_quote_context};
use whatsapp_rust::waproto::{
    buffa::MessageField,
    whatsapp::{self as wa, ContextInfo},
};

use crate::driver::MessageRef;

/// The message for `content`, quoting `reply_to` when given. `own_jid` is this device's
/// account: the sender of a quoted message it sent.
pub fn to_wa(content: &Content, reply_to: Option<&MessageRef>, own_jid: &str) -> wa::Message {
    let context = reply_to.map(|quoted| {
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
    });
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
        // Only quoted (a reaction is sent by `send_reaction`): what a quote of it shows.
        Content::Reaction { reaction } => wa::Message::text(&reaction.emoji),
    }
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
    fn what_we_do_not_know_is_not_passed_on() {
        assert_eq!(from_wa(&wa::Message::default()), None);
    }
}
