//! What `whatsapp-rust` says, in our words: its events mapped to [`DriverEvent`]s, the
//! statuses and reasons the API shows. A pure function, so every mapping is unit-tested.

use serde_json::{Value, json};
use shared::session::StatusReason;
use wacore::types::presence::ReceiptType;
use whatsapp_rust::types::events::{ConnectFailureReason, Event};

use crate::driver::{DriverEvent, Inbound, Paired};

/// What the worker stores in `device_credentials` for a device of this driver: the keys
/// themselves are in the `wa_*` tables (sealed, fenced), this only says where.
pub fn credentials() -> Value {
    json!({"driver": "whatsapp", "store": "postgres"})
}

/// Our events for one of the crate's: a batch of messages and a receipt naming several
/// messages give several; the rest is [`map`].
pub fn map_all(event: &Event, now_ms: i64) -> Vec<DriverEvent> {
    match event {
        Event::Messages(batch) => batch
            .messages
            .iter()
            .filter(|m| !m.info.source.is_from_me)
            .filter_map(|m| {
                let (content, refers_to) = super::content::received(&m.message)?;
                Some(DriverEvent::Message(Box::new(Inbound {
                    id: m.info.id.to_string(),
                    from: m.info.source.sender.to_non_ad_string(),
                    chat: m.info.source.chat.to_non_ad_string(),
                    content,
                    refers_to,
                    file: super::files::remote_file(
                        &m.message,
                        &m.info.id,
                        &m.info.source.chat.to_non_ad_string(),
                    ),
                    ballot: super::votes::sealed(&m.message),
                    timestamp: m.info.timestamp.timestamp_millis(),
                })))
            })
            .collect(),
        Event::Receipt(r) => {
            let read = match r.r#type {
                ReceiptType::Delivered => false,
                ReceiptType::Read | ReceiptType::Played => true,
                _ => return vec![],
            };
            r.message_ids
                .iter()
                .map(|id| DriverEvent::Receipt {
                    message_id: id.to_string(),
                    read,
                })
                .collect()
        }
        _ => map(event, now_ms).into_iter().collect(),
    }
}

/// Our event for one of the crate's, or `None` for those the session's status does not
/// depend on (presence, app-state sync, …; messages and receipts are [`map_all`]'s).
pub fn map(event: &Event, now_ms: i64) -> Option<DriverEvent> {
    Some(match event {
        Event::PairingQrCode(qr) => DriverEvent::Qr {
            code: qr.code.clone(),
            expires_at: now_ms + qr.timeout.as_millis() as i64,
        },
        Event::PairingQrCodesExhausted(_) => DriverEvent::QrTimeout,
        Event::PairSuccess(p) => DriverEvent::Paired(Box::new(Paired {
            phone_number: p.id.user.to_string(),
            jid: p.id.to_non_ad_string(),
            lid: p.lid.to_non_ad_string(),
            credentials: credentials(),
        })),
        Event::Connected(_) => DriverEvent::Connected,
        // The crate reconnects by itself after these; the worker's deadline watches it.
        Event::Disconnected(_) => DriverEvent::Disconnected {
            reason: StatusReason::ConnectionLost,
            reconnecting: true,
        },
        Event::LoggedOut(out) => DriverEvent::LoggedOut {
            reason: logged_out_reason(out.reason),
        },
        Event::ConnectFailure(f) if f.reason.is_logged_out() => DriverEvent::LoggedOut {
            reason: logged_out_reason(f.reason),
        },
        Event::StreamReplaced(_) => DriverEvent::Failed {
            reason: StatusReason::Conflict,
            details: Some(json!({
                "message": "this device connected from somewhere else; WhatsApp closed this stream",
            })),
            retry: false,
        },
        Event::TemporaryBan(ban) => DriverEvent::Failed {
            reason: StatusReason::TemporaryBan,
            details: Some(json!({
                "expiresAt": now_ms + ban.expire.num_milliseconds(),
                "code": ban.code.to_string(),
                "message": ban.message.clone().unwrap_or_else(|| ban.code.to_string()),
            })),
            retry: false,
        },
        Event::ClientOutdated(_) => outdated(),
        Event::ConnectFailure(f) if f.reason == ConnectFailureReason::ClientOutdated => outdated(),
        _ => return None,
    })
}

fn outdated() -> DriverEvent {
    DriverEvent::Failed {
        reason: StatusReason::ClientOutdated,
        details: Some(json!({
            "message": "WhatsApp refuses this client version; update WA_CLIENT_VERSION",
        })),
        retry: false,
    }
}

/// Why WhatsApp unlinked the device: locked accounts are banned, anything else was removed.
fn logged_out_reason(reason: ConnectFailureReason) -> StatusReason {
    match reason {
        ConnectFailureReason::AccountLocked => StatusReason::Banned,
        _ => StatusReason::DeviceRemoved,
    }
}

/// Whether an event shows the connection is up (or pairing is under way): the end of the
/// connect deadline.
pub fn is_up(event: &DriverEvent) -> bool {
    matches!(
        event,
        DriverEvent::Qr { .. } | DriverEvent::Paired(_) | DriverEvent::Connected
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use whatsapp_rust::types::events::{
        ClientOutdated, ConnectFailure, Connected, Disconnected, LoggedOut, PairSuccess,
        PairingQrCode, PairingQrCodesExhausted, StreamReplaced, TempBanReason, TemporaryBan,
    };

    use std::sync::Arc;

    use wacore::{
        proto_helpers::MessageBuilderExt,
        types::{
            events::{BatchOrigin, InboundMessage, MessageBatch, Receipt},
            message::{MessageInfo, MessageSource},
        },
    };
    use whatsapp_rust::waproto::whatsapp as wa;

    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn jid(s: &str) -> whatsapp_rust::Jid {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn a_qr_code_rotating_is_auth_qr_with_its_expiry() {
        let event = Event::PairingQrCode(
            PairingQrCode::builder()
                .code("2@abc,def".into())
                .timeout(Duration::from_secs(60))
                .build(),
        );
        assert_eq!(
            map(&event, NOW),
            Some(DriverEvent::Qr {
                code: "2@abc,def".into(),
                expires_at: NOW + 60_000
            })
        );
        let exhausted = Event::PairingQrCodesExhausted(
            PairingQrCodesExhausted::builder()
                .disconnected(true)
                .build(),
        );
        assert_eq!(map(&exhausted, NOW), Some(DriverEvent::QrTimeout));
    }

    #[test]
    fn pair_success_gives_the_phone_number_jid_and_lid() {
        let event = Event::PairSuccess(
            PairSuccess::builder()
                .id(jid("15551234567:12@s.whatsapp.net"))
                .lid(jid("100000012345678:12@lid"))
                .business_name(String::new())
                .platform("android".into())
                .build(),
        );
        let Some(DriverEvent::Paired(p)) = map(&event, NOW) else {
            panic!("not paired");
        };
        assert_eq!(p.phone_number, "15551234567");
        assert_eq!(p.jid, "15551234567@s.whatsapp.net");
        assert_eq!(p.lid, "100000012345678@lid");
        assert_eq!(p.credentials, credentials());
    }

    #[test]
    fn connection_events() {
        assert_eq!(
            map(&Event::Connected(Connected::builder().build()), NOW),
            Some(DriverEvent::Connected)
        );
        let dropped = Event::Disconnected(
            Disconnected::builder()
                .reason(wacore::net::DisconnectReason::StreamEnded)
                .build(),
        );
        assert_eq!(
            map(&dropped, NOW),
            Some(DriverEvent::Disconnected {
                reason: StatusReason::ConnectionLost,
                reconnecting: true
            })
        );
    }

    #[test]
    fn logged_out_keeps_its_reason() {
        for (reason, ours) in [
            (ConnectFailureReason::LoggedOut, StatusReason::DeviceRemoved),
            (ConnectFailureReason::AccountLocked, StatusReason::Banned),
            (
                ConnectFailureReason::UnknownLogout,
                StatusReason::DeviceRemoved,
            ),
        ] {
            let event =
                Event::LoggedOut(LoggedOut::builder().on_connect(true).reason(reason).build());
            assert_eq!(
                map(&event, NOW),
                Some(DriverEvent::LoggedOut { reason: ours }),
                "{reason:?}"
            );
            let failure = Event::ConnectFailure(ConnectFailure::builder().reason(reason).build());
            assert_eq!(
                map(&failure, NOW),
                Some(DriverEvent::LoggedOut { reason: ours })
            );
        }
    }

    #[test]
    fn a_replaced_stream_fails_for_good_as_conflict() {
        let Some(DriverEvent::Failed { reason, retry, .. }) = map(
            &Event::StreamReplaced(StreamReplaced::builder().build()),
            NOW,
        ) else {
            panic!("not failed");
        };
        assert_eq!((reason, retry), (StatusReason::Conflict, false));
    }

    #[test]
    fn a_temporary_ban_says_when_it_ends() {
        let event = Event::TemporaryBan(
            TemporaryBan::builder()
                .code(TempBanReason::SentToTooManyPeople)
                .expire(wacore::chrono::TimeDelta::seconds(3600))
                .build(),
        );
        let Some(DriverEvent::Failed {
            reason,
            details: Some(details),
            retry,
        }) = map(&event, NOW)
        else {
            panic!("not failed");
        };
        assert_eq!((reason, retry), (StatusReason::TemporaryBan, false));
        assert_eq!(details["expiresAt"], NOW + 3_600_000);
        assert!(details["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    #[test]
    fn an_outdated_client_fails_for_good() {
        for event in [
            Event::ClientOutdated(ClientOutdated::builder().build()),
            Event::ConnectFailure(
                ConnectFailure::builder()
                    .reason(ConnectFailureReason::ClientOutdated)
                    .build(),
            ),
        ] {
            let Some(DriverEvent::Failed { reason, retry, .. }) = map(&event, NOW) else {
                panic!("not failed");
            };
            assert_eq!((reason, retry), (StatusReason::ClientOutdated, false));
        }
    }

    fn inbound(id: &str, from: &str, from_me: bool, message: wa::Message) -> InboundMessage {
        let info = MessageInfo {
            source: MessageSource {
                chat: jid(from),
                sender: jid(from),
                is_from_me: from_me,
                ..Default::default()
            },
            id: id.into(),
            timestamp: wacore::chrono::DateTime::from_timestamp_millis(NOW).expect("time"),
            ..Default::default()
        };
        InboundMessage::builder()
            .message(Arc::new(message))
            .info(Arc::new(info))
            .build()
    }

    #[test]
    fn a_batch_gives_the_texts_others_wrote_and_nothing_else() {
        let batch = MessageBatch::builder()
            .messages(Arc::from(vec![
                inbound(
                    "A1",
                    "6281100000002:3@s.whatsapp.net",
                    false,
                    wa::Message::text("hi"),
                ),
                // Our own send echoed back, and a message with no text (a sticker, say).
                inbound(
                    "A2",
                    "6281100000009@s.whatsapp.net",
                    true,
                    wa::Message::text("mine"),
                ),
                inbound(
                    "A3",
                    "6281100000002@s.whatsapp.net",
                    false,
                    wa::Message::default(),
                ),
            ]))
            .origin(BatchOrigin::Live)
            .build();
        assert_eq!(
            map_all(&Event::Messages(batch), NOW),
            [DriverEvent::Message(Box::new(Inbound {
                id: "A1".into(),
                from: "6281100000002@s.whatsapp.net".into(),
                chat: "6281100000002@s.whatsapp.net".into(),
                content: shared::message::Content::Text { text: "hi".into() },
                refers_to: None,
                file: None,
                ballot: None,
                timestamp: NOW,
            }))]
        );
    }

    #[test]
    fn receipts_say_delivered_or_read_for_each_message_they_name() {
        let receipt = |t: ReceiptType| {
            Event::Receipt(
                Receipt::builder()
                    .source(MessageSource::default())
                    .message_ids(vec!["M1".into(), "M2".into()])
                    .timestamp(wacore::chrono::Utc::now())
                    .r#type(t)
                    .offline(false)
                    .build(),
            )
        };
        let each = |read| {
            ["M1", "M2"]
                .map(|id| DriverEvent::Receipt {
                    message_id: id.into(),
                    read,
                })
                .to_vec()
        };
        assert_eq!(map_all(&receipt(ReceiptType::Delivered), NOW), each(false));
        assert_eq!(map_all(&receipt(ReceiptType::Read), NOW), each(true));
        assert_eq!(map_all(&receipt(ReceiptType::Played), NOW), each(true));
        // Not about the recipient's phone: nothing to record.
        assert_eq!(map_all(&receipt(ReceiptType::Retry), NOW), []);
        assert_eq!(map_all(&receipt(ReceiptType::Sender), NOW), []);
    }

    #[test]
    fn a_passing_connect_failure_is_left_to_the_reconnect() {
        let event = Event::ConnectFailure(
            ConnectFailure::builder()
                .reason(ConnectFailureReason::ServiceUnavailable)
                .build(),
        );
        assert_eq!(map(&event, NOW), None);
    }
}
