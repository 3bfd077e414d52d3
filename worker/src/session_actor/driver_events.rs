//! What WhatsApp (or its simulation) says on its own: a QR code rotating, the phone pairing,
//! the connection coming up or going down, the device removed. Each becomes a session change
//! written like a command's, fenced by the lease ([`Actor::apply`]).

use serde_json::Value;
use shared::{
    protocol::EventKind,
    session::{DesiredState, SessionStatus, StatusReason},
};

use super::{Actor, Flow};
use crate::{
    driver::{DriverEvent, Paired},
    store::{Change, Pairing},
};

impl Actor {
    pub(super) async fn on_driver_event(&mut self, event: DriverEvent) -> Flow {
        // The connection answered: it no longer counts as one being set up.
        self.connecting = None;
        let event = match event {
            DriverEvent::Receipt { message_id, read } => {
                return self.on_receipt(&message_id, read).await;
            }
            DriverEvent::Message(m) => return self.on_inbound(*m).await,
            event => event,
        };
        let stopped = Some(DesiredState::Stopped);
        let (change, events) = match event {
            DriverEvent::Qr { code, expires_at } => {
                self.qr = Some((code.clone(), expires_at));
                (
                    Some(self.change(SessionStatus::ScanQrCode, None)),
                    vec![EventKind::Qr {
                        qr: code,
                        expires_at,
                    }],
                )
            }
            DriverEvent::QrTimeout => {
                self.disconnect().await;
                (
                    Some(Change {
                        desired: stopped,
                        ..self.change(SessionStatus::Stopped, Some(StatusReason::QrTimeout))
                    }),
                    vec![],
                )
            }
            DriverEvent::Paired(paired) => {
                let Paired {
                    phone_number,
                    jid,
                    lid,
                    credentials,
                } = *paired;
                self.qr = None;
                self.credentials = Some(credentials.clone());
                (
                    Some(Change {
                        pairing: Pairing::Set {
                            phone_number,
                            jid,
                            lid,
                            credentials,
                        },
                        ..self.change(SessionStatus::Starting, None)
                    }),
                    vec![],
                )
            }
            DriverEvent::Connected => {
                // Up: the next failure starts its backoff afresh, and messages may go.
                self.retry_backoff = super::RETRY_FIRST;
                self.pump_soon();
                (
                    Some(Change {
                        connected_now: true,
                        ..self.change(SessionStatus::Working, None)
                    }),
                    vec![],
                )
            }
            DriverEvent::Disconnected {
                reason,
                reconnecting: true,
            } => (
                Some(self.change(SessionStatus::Starting, Some(reason))),
                vec![],
            ),
            DriverEvent::Disconnected { reason, .. } => {
                // Replaced elsewhere (conflict) or failed for good: do not reconnect, here or
                // on another gateway after a move.
                self.disconnect().await;
                (
                    Some(Change {
                        desired: stopped,
                        ..self.change(SessionStatus::Failed, Some(reason))
                    }),
                    vec![],
                )
            }
            DriverEvent::Failed {
                reason,
                details,
                retry: true,
            } => {
                self.disconnect().await;
                let mut change = self.connect_failed(String::new());
                change.reason = Some(reason);
                if let (Some(Value::Object(planned)), Some(Value::Object(said))) =
                    (change.details.as_mut(), details)
                {
                    planned.extend(said);
                }
                (Some(change), vec![])
            }
            DriverEvent::Failed {
                reason, details, ..
            } => {
                // Trying again would do harm (a replaced stream, a ban): stop, here and after
                // a move, until the owner starts the session again.
                self.disconnect().await;
                (
                    Some(Change {
                        desired: stopped,
                        details,
                        ..self.change(SessionStatus::Failed, Some(reason))
                    }),
                    vec![],
                )
            }
            // Handled above: they are about messages, not the session.
            DriverEvent::Receipt { .. } | DriverEvent::Message(_) => (None, vec![]),
            DriverEvent::LoggedOut { reason } => {
                self.disconnect().await;
                self.credentials = None;
                (
                    Some(Change {
                        pairing: Pairing::Clear,
                        desired: stopped,
                        ..self.change(SessionStatus::LoggedOut, Some(reason))
                    }),
                    vec![],
                )
            }
        };
        self.apply(change, events).await
    }
}
