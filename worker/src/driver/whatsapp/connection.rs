//! What a session does over its connection: pair by code, send, check numbers, show
//! "typing…", mark read, fetch a file, log out, close (every socket with it: see
//! `transport.rs`). `mod.rs` opens the connection and watches it come up.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use shared::{contacts::NumberCheck, message::Content};
use tokio_util::sync::CancellationToken;
use whatsapp_rust::{
    RevokeType, bot::BotHandle, pair_code::PairCodeOptions, waproto::whatsapp as wa,
};

use super::{content, files, parse_jid, phones, send_failed, store, store_error, transport, votes};
use crate::driver::{
    Ballot, Connection, Download, DriverError, Inbound, MessageRef, Outgoing, RemoteFile, SimAction,
};

pub(super) struct WhatsAppConnection {
    pub(super) handle: Option<BotHandle>,
    /// The session's key store, retired at logout.
    pub(super) store: Option<Arc<store::PgBackend>>,
    pub(super) db: Pool,
    pub(super) session_id: String,
    pub(super) epoch: i64,
    pub(super) connect_timeout: Duration,
    pub(super) closed: CancellationToken,
    /// Closed after the client, whatever it was doing: see `transport.rs`.
    pub(super) sockets: transport::Sockets,
    pub(super) sim_control_url: Option<String>,
    pub(super) shown: phones::Shown,
}

impl WhatsAppConnection {
    fn client(&self) -> Result<Arc<whatsapp_rust::Client>, DriverError> {
        self.handle
            .as_ref()
            .map(BotHandle::client)
            .ok_or_else(|| DriverError::Connection("the connection is closed".into()))
    }
}

#[async_trait]
impl Connection for WhatsAppConnection {
    async fn request_pairing_code(&mut self, phone_number: &str) -> Result<String, DriverError> {
        let number = phone_number.trim_start_matches('+');
        let client = self.client()?;
        // The code can only be asked for over an open stream.
        let opened = async {
            while !client.is_connected() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(self.connect_timeout, opened)
            .await
            .is_err()
        {
            return Err(DriverError::Connection(
                "could not reach WhatsApp to ask for a pairing code".into(),
            ));
        }
        client
            .pair_with_code(PairCodeOptions {
                phone_number: number.to_owned(),
                ..PairCodeOptions::default()
            })
            .await
            .map(|code| {
                let code = format_code(&code);
                self.shown.code(number, &code);
                code
            })
            .map_err(|e| DriverError::Refused(format!("WhatsApp refused a pairing code: {e}")))
    }

    async fn simulate(&mut self, action: SimAction) -> Result<(), DriverError> {
        let Some(url) = &self.sim_control_url else {
            return Err(DriverError::Unsupported);
        };
        let device = self
            .client()?
            .persistence_manager()
            .get_device_snapshot()
            .pn
            .clone();
        phones::Phones {
            url,
            shown: &self.shown,
            device,
        }
        .act(action)
        .await
    }

    async fn logout(&mut self) -> Result<(), DriverError> {
        let client = self.client()?;
        // Unlinking needs the stream up; a device that cannot connect is still wiped here
        // (WhatsApp drops a linked device that never comes back).
        if client
            .wait_for_connected(self.connect_timeout)
            .await
            .is_err()
        {
            tracing::warn!(session_id = %self.session_id, "logging out without reaching WhatsApp; wiping the keys only");
        }
        client.logout().await;
        self.close().await;
        // The client's own tasks may still be writing (app-state sync, pre-keys): none may
        // bring keys back once they are wiped.
        if let Some(store) = &self.store {
            store.retire();
        }
        match store::wipe(&self.db, &self.session_id, self.epoch).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(DriverError::Refused(
                "this worker no longer holds the session".into(),
            )),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn send(&mut self, message: Outgoing) -> Result<Option<String>, DriverError> {
        let client = self.client()?;
        let jid = parse_jid(&message.to)?;
        if !client.is_logged_in() {
            return Err(DriverError::Connection(
                "the session is not connected to WhatsApp".into(),
            ));
        }
        let own = client
            .pn()
            .map(|j| j.to_non_ad_string())
            .unwrap_or_default();
        let target = || {
            message.refers_to.as_ref().ok_or_else(|| {
                DriverError::Refused(format!(
                    "a {} needs the message it is on",
                    message.content.kind()
                ))
            })
        };
        if message.content.media().is_some() {
            // A file: see `files.rs`.
            return files::send(&client, jid, message, &own).await;
        }
        match &message.content {
            Content::Reaction { reaction } => {
                let target = target()?;
                let key = wa::MessageKey {
                    remote_jid: Some(target.chat.clone()),
                    from_me: Some(target.from_me),
                    id: Some(target.wa_id.clone()),
                    ..Default::default()
                };
                let sent = client.send_reaction(jid, key, &reaction.emoji).await;
                sent.map(|s| Some(s.message_id))
                    .map_err(|e| send_failed(&e))
            }
            // The crate keeps the secret it makes in the key store: votes are opened with it.
            Content::Poll { poll } => {
                let sent = client
                    .polls()
                    .create(jid, &poll.name, &poll.options, poll.selectable_count)
                    .await;
                sent.map(|(s, _secret)| Some(s.message_id))
                    .map_err(|e| send_failed(&e))
            }
            // WhatsApp's client answers the original's id for an edit, and nothing for a
            // revoke: the stanza's own id is not told, and no receipt names it here.
            Content::Edit { edit } => {
                let text = Content::Text {
                    text: edit.text.clone(),
                };
                let new = content::to_wa(&text, None, &own);
                let sent = client.edit_message(jid, target()?.wa_id.clone(), new).await;
                sent.map(|_| None).map_err(|e| send_failed(&e))
            }
            Content::Revoke { .. } => {
                let sent = client
                    .revoke_message(jid, target()?.wa_id.clone(), RevokeType::Sender)
                    .await;
                sent.map(|_| None).map_err(|e| send_failed(&e))
            }
            content => {
                let wa_message = content::to_wa(content, message.reply_to.as_ref(), &own);
                let sent = client.send_message(jid, wa_message).await;
                sent.map(|s| Some(s.message_id))
                    .map_err(|e| send_failed(&e))
            }
        }
    }

    async fn check_numbers(&mut self, numbers: &[String]) -> Result<Vec<NumberCheck>, DriverError> {
        let client = self.client()?;
        if !client.is_logged_in() {
            return Err(DriverError::Connection(
                "the session is not connected to WhatsApp".into(),
            ));
        }
        let jids: Vec<whatsapp_rust::Jid> = numbers
            .iter()
            .map(|n| parse_jid(&format!("{n}@s.whatsapp.net")))
            .collect::<Result<_, _>>()?;
        let answers = client
            .contacts()
            .is_on_whatsapp(&jids)
            .await
            .map_err(|e| DriverError::Connection(format!("WhatsApp did not answer: {e}")))?;
        // One answer per number asked, in the order asked; one WhatsApp left out is not on it.
        Ok(numbers
            .iter()
            .map(|n| {
                let answer = answers
                    .iter()
                    .find(|a| a.jid.user == *n || a.pn_jid.as_ref().is_some_and(|p| p.user == *n))
                    .filter(|a| a.is_registered);
                NumberCheck {
                    number: n.clone(),
                    on_whatsapp: answer.is_some(),
                    jid: answer.map(|_| format!("{n}@s.whatsapp.net")),
                    lid: answer
                        .and_then(|a| a.lid.as_ref())
                        .map(|l| l.to_non_ad_string()),
                }
            })
            .collect())
    }

    async fn typing(&mut self, to: &str) -> Result<(), DriverError> {
        let client = self.client()?;
        let jid = parse_jid(to)?;
        client
            .chatstate()
            .send_composing(&jid)
            .await
            .map_err(|e| DriverError::Connection(format!("cannot show typing: {e}")))
    }

    async fn mark_read(&mut self, message: &Inbound) -> Result<(), DriverError> {
        let client = self.client()?;
        let chat = parse_jid(&message.chat)?;
        let sender = parse_jid(&message.from)?;
        let sender = (message.chat != message.from).then_some(&sender);
        client
            .mark_as_read(&chat, sender, &[message.id.as_str()])
            .await
            .map_err(|e| DriverError::Connection(format!("cannot mark read: {e}")))
    }

    fn download(&self, file: RemoteFile) -> Download {
        let client = self.client();
        Box::pin(async move { files::download(&client?, &file).await })
    }

    async fn open_ballot(
        &mut self,
        poll: &MessageRef,
        voter: &str,
        ballot: Ballot,
    ) -> Result<Vec<[u8; 32]>, DriverError> {
        match ballot {
            Ballot::Open(chosen) => Ok(chosen),
            Ballot::Sealed { payload, iv } => {
                let store = self
                    .store
                    .clone()
                    .ok_or_else(|| DriverError::Connection("the connection is closed".into()))?;
                votes::open(&*self.client()?, &store, poll, voter, &payload, &iv).await
            }
        }
    }

    async fn close(&mut self) {
        self.closed.cancel();
        // The client may be connecting again as the stop comes (its stream dropped): that
        // socket is not opened at all.
        self.sockets.refuse_new();
        if let Some(handle) = self.handle.take() {
            // Flushes the device's state to the store, then ends the client's tasks.
            if tokio::time::timeout(Duration::from_secs(10), handle.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(session_id = %self.session_id, "the WhatsApp client did not stop in time");
            }
        }
        // The client closes the socket it is connected on, but not one it is still
        // connecting on when the stop comes: close that too, before the worker connects again.
        let open = self.sockets.open();
        if open > 0 {
            tracing::info!(session_id = %self.session_id, open, "closing the sockets the client left open");
        }
        self.sockets.close_all(SOCKET_CLOSE).await;
    }
}

/// How long a socket may take to send its WebSocket close.
const SOCKET_CLOSE: Duration = Duration::from_secs(5);

impl Drop for WhatsAppConnection {
    fn drop(&mut self) {
        // Dropping the handle aborts the client; the deadline goes with it, and the sockets
        // are closed behind it.
        self.closed.cancel();
        let sockets = self.sockets.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { sockets.close_all(SOCKET_CLOSE).await });
        }
    }
}

/// `ABCD1234` → `ABCD-1234`, the form the API promises.
fn format_code(code: &str) -> String {
    let code: String = code.chars().filter(|c| *c != '-').collect();
    match code.len() {
        8 => format!("{}-{}", &code[..4], &code[4..]),
        _ => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_codes_read_as_two_halves() {
        assert_eq!(format_code("ABCD1234"), "ABCD-1234");
        assert_eq!(format_code("ABCD-1234"), "ABCD-1234");
    }
}
