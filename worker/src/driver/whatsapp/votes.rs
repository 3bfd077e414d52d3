//! Poll votes over WhatsApp. A contact's vote names the options it chose by the SHA-256 of
//! their names, sealed (AES-GCM) under a key derived from the poll's secret, the poll's id
//! and both parties' JIDs. The crate kept the secret of a poll the session sent in the key
//! store (`store/msg_secrets.rs`), and that of a poll it received; the vote is opened here,
//! for the worker, which names the options from the poll.

use std::time::Duration;

use wacore::{proto_helpers::MessageExt, store::traits::MsgSecretStore};
use whatsapp_rust::{Client, Jid, features::PollVoteCiphertext, waproto::whatsapp as wa};

use super::{parse_jid, store::PgBackend};
use crate::driver::{Ballot, DriverError, MessageRef};

/// The sealed vote a received message is, when it is one.
pub fn sealed(message: &wa::Message) -> Option<Ballot> {
    let update = message.get_base_message().poll_update_message.as_option()?;
    let vote = update.vote.as_option()?;
    Some(Ballot::Sealed {
        payload: vote.enc_payload.clone()?,
        iv: vote.enc_iv.clone()?,
    })
}

/// How long a poll's secret may take to reach the store after the poll went out (the
/// crate writes it behind the send).
const SECRET_WAIT: Duration = Duration::from_secs(2);

/// Opens `voter`'s sealed vote on `poll`: the SHA-256 of each option chosen.
pub(super) async fn open(
    client: &Client,
    store: &PgBackend,
    poll: &MessageRef,
    voter: &str,
    payload: &[u8],
    iv: &[u8],
) -> Result<Vec<[u8; 32]>, DriverError> {
    let chat = parse_jid(&poll.chat)?.to_non_ad();
    let voter = parse_jid(voter)?.to_non_ad();
    // The poll's creator: the session for its own, else the contact of the chat.
    let creators: Vec<Jid> = if poll.from_me {
        [client.pn(), client.lid()]
            .into_iter()
            .flatten()
            .map(|j| j.to_non_ad())
            .collect()
    } else {
        vec![chat.clone()]
    };
    let until = tokio::time::Instant::now() + SECRET_WAIT;
    let (creator, secret) = loop {
        if let Some(found) = secret(store, &chat, &creators, &poll.wa_id).await? {
            break found;
        }
        if tokio::time::Instant::now() >= until {
            return Err(DriverError::Refused(format!(
                "the secret of poll {} is not known: its votes cannot be opened",
                poll.wa_id
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hashes = client
        .polls()
        .decrypt_vote(
            PollVoteCiphertext {
                enc_payload: payload,
                enc_iv: iv,
            },
            &secret,
            &poll.wa_id,
            &creator,
            &voter,
        )
        .await
        .map_err(|e| DriverError::Refused(format!("the vote could not be opened: {e}")))?;
    Ok(hashes
        .into_iter()
        .filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
        .collect())
}

/// The poll's secret, stored under whichever of its creator's JIDs it went out as.
async fn secret(
    store: &PgBackend,
    chat: &Jid,
    creators: &[Jid],
    poll_id: &str,
) -> Result<Option<(Jid, Vec<u8>)>, DriverError> {
    for creator in creators {
        let found = store
            .get_msg_secret(&chat.to_string(), &creator.to_string(), poll_id)
            .await
            .map_err(super::store_error)?;
        if let Some(secret) = found {
            return Ok(Some((creator.clone(), secret)));
        }
    }
    Ok(None)
}
