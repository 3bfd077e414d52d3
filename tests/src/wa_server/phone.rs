//! The simulated phone of an account: what its owner does with it. It links a device by
//! scanning the QR code the device shows (signing the device into the account as a phone
//! does: ADV signatures and the HMAC under the QR code's secret), unlinks devices, and stands
//! for what WhatsApp does to the account (a temporary ban, a dropped network).

use std::{sync::Arc, time::Duration};

use shared::message::Content;

use base64::Engine;
use hmac::{Hmac, Mac};
use wacore::{
    adv::{AdvValidation, validate_adv_with_identity_key},
    libsignal::protocol::KeyPair,
};
use wacore_binary::{Node, builder::NodeBuilder};
use waproto::{
    buffa::{Message as _, MessageField},
    whatsapp as wa,
};

use super::{Account, Companion, Outbound, ReceiptSeen, Received, Shared, conn::SERVER, signal};

/// The prefix of what the account key signs for a device (WhatsApp's ADV, E2EE accounts).
const ACCOUNT_SIGNATURE_PREFIX: [u8; 2] = [6, 0];

#[derive(Clone)]
pub struct Phone {
    shared: Arc<Shared>,
    number: String,
}

impl Phone {
    pub(super) fn of(shared: Arc<Shared>, number: &str) -> Phone {
        let number = super::digits(number);
        shared
            .state()
            .accounts
            .entry(number.clone())
            .or_insert_with(|| Account::new(&number));
        Phone { shared, number }
    }

    pub fn number(&self) -> &str {
        &self.number
    }

    /// The account's LID user.
    pub fn lid(&self) -> String {
        self.shared.state().accounts[&self.number].lid.clone()
    }

    /// Links the device showing `qr` (the string a QR code encodes:
    /// `ref,noise key,identity key,ADV secret,platform`) to this account, as a phone's
    /// "Link a device" does. Answers the device's JID once the device signed its identity
    /// and was told to restart its stream.
    pub async fn scan(&self, qr: &str) -> Result<String, String> {
        let fields: Vec<&str> = qr.split(',').collect();
        let [_ref, noise, identity, adv_secret, ..] = fields[..] else {
            return Err(format!("`{qr}` is not a WhatsApp pairing QR code"));
        };
        let b64 = |s: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("`{s}` is not a base64 32-byte key"))
        };
        let (noise, identity, adv_secret) = (b64(noise)?, b64(identity)?, b64(adv_secret)?);
        self.link(noise, identity, adv_secret).await
    }

    /// Links session `id` as its operator does with this phone in hand: reads the QR code
    /// off `GET …/qr` (which starts pairing: 404 until the first code is ready), scans it,
    /// and waits until the session is `working`; each step within `limit` (or panics).
    /// Answers the device's JID.
    pub async fn link_session(
        &self,
        api: &crate::Api,
        key: &str,
        id: &str,
        limit: Duration,
    ) -> String {
        let qr = api.qr_code(key, id, limit).await;
        let device = self.scan(&qr).await.expect("the phone links the device");
        api.wait_session_within(key, id, "working", limit, |s| s["status"] == "working")
            .await;
        device
    }

    /// Types `code` (`ABCD-1234`), the code a device asking to be linked to this number
    /// shows, into the phone, as "Link with phone number instead" does: the phone and the
    /// device agree on the device's ADV secret through the code, then the phone links it.
    /// Answers the device's JID.
    pub async fn enter_code(&self, code: &str) -> Result<String, String> {
        use wacore::pair_code::PairCodeUtils;
        let code: String = code.chars().filter(|c| *c != '-').collect();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (noise, wrapped, pairing_ref, stream) = {
            let mut state = self.shared.state();
            let request = state
                .link_codes
                .get_mut(&self.number)
                .ok_or("no device asked to be linked to this number by code")?;
            request.finish = Some(tx);
            let (noise, wrapped, pairing_ref) = (
                request.noise,
                request.wrapped_ephemeral.clone(),
                request.pairing_ref.clone(),
            );
            let stream = state
                .pairing
                .get(&noise)
                .map(|(s, _)| s.clone())
                .ok_or("the device asking for a code is not connected")?;
            (noise, wrapped, pairing_ref, stream)
        };
        let device_ephemeral = PairCodeUtils::decrypt_primary_ephemeral_pub(&wrapped, &code)
            .map_err(|e| e.to_string())?;
        let ephemeral = KeyPair::generate(&mut rand010::rng());
        let ephemeral_pub: [u8; 32] = ephemeral
            .public_key
            .public_key_bytes()
            .try_into()
            .expect("32 bytes");
        let (account_key, account_pub) = {
            let state = self.shared.state();
            let identity = &state.accounts[&self.number].identity;
            (
                identity.clone(),
                identity.public_key.public_key_bytes().to_vec(),
            )
        };
        let hello = NodeBuilder::new("notification")
            .attr("type", "link_code_companion_reg")
            .attr("from", SERVER)
            .attr("id", format!("link-code-{}", self.shared.next_id()))
            .children([NodeBuilder::new("link_code_companion_reg")
                .attr("stage", "primary_hello")
                .children([
                    NodeBuilder::new("link_code_pairing_wrapped_primary_ephemeral_pub")
                        .bytes(PairCodeUtils::encrypt_ephemeral_pub(&ephemeral_pub, &code).to_vec())
                        .build(),
                    NodeBuilder::new("primary_identity_pub")
                        .bytes(account_pub.clone())
                        .build(),
                    NodeBuilder::new("link_code_pairing_ref")
                        .bytes(pairing_ref.into_bytes())
                        .build(),
                ])
                .build()])
            .build();
        stream
            .out
            .send(Outbound::Send(hello))
            .map_err(|_| "the device's stream is gone".to_string())?;
        let (bundle, identity) = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| "the device did not finish linking".to_string())?
            .map_err(|_| "the device did not finish linking".to_string())?;

        // Its bundle, sealed under a key from the two ephemeral keys: its identity, ours,
        // and randomness that goes into the ADV secret.
        let agree = |private: &KeyPair, public: &[u8]| {
            let public = wacore::libsignal::protocol::PublicKey::from_djb_public_key_bytes(public)
                .map_err(|e| e.to_string())?;
            private
                .private_key
                .calculate_agreement(&public)
                .map_err(|e| e.to_string())
        };
        let shared_ephemeral = agree(&ephemeral, &device_ephemeral)?;
        if bundle.len() < 44 + 16 {
            return Err("the device's key bundle is too short".into());
        }
        let hkdf = |ikm: &[u8], salt: Option<&[u8]>, info: &[u8]| {
            let mut out = [0u8; 32];
            hkdf::Hkdf::<sha2::Sha256>::new(salt, ikm)
                .expand(info, &mut out)
                .map(|()| out)
                .map_err(|e| e.to_string())
        };
        let key = hkdf(
            &shared_ephemeral,
            Some(&bundle[..32]),
            b"link_code_pairing_key_bundle_encryption_key",
        )?;
        let plain = {
            use aes_gcm::{Aes256Gcm, KeyInit, aead::Aead};
            Aes256Gcm::new((&key).into())
                .decrypt(bundle[32..44].into(), &bundle[44..])
                .map_err(|_| "the device's key bundle does not open: a wrong code".to_string())?
        };
        if plain.len() != 96 || plain[..32] != identity[..] || plain[32..64] != account_pub[..] {
            return Err("the device's key bundle names other keys".into());
        }
        let identity: [u8; 32] = identity
            .try_into()
            .map_err(|_| "the device's identity key is not 32 bytes".to_string())?;
        let shared_identity = agree(&account_key, &identity)?;
        let adv_secret = hkdf(
            &[&shared_ephemeral[..], &shared_identity[..], &plain[64..]].concat(),
            None,
            b"adv_secret",
        )?;
        self.shared.state().link_codes.remove(&self.number);
        self.link(noise, identity, adv_secret).await
    }

    /// Links the device on the pairing stream of `noise` to this account: the phone signs
    /// it in (the account signature, and the HMAC under the device's ADV secret), the
    /// device signs back, and its stream is told to restart and log in.
    async fn link(
        &self,
        noise: [u8; 32],
        identity: [u8; 32],
        adv_secret: [u8; 32],
    ) -> Result<String, String> {
        let (stream, registration) = self
            .shared
            .state()
            .pairing
            .remove(&noise)
            .ok_or("no device showing this QR code is connected")?;
        if registration.identity != identity {
            return Err("the QR code's identity key is not the one the device registered".into());
        }

        let (device, key_index, lid, name, details, account_signature, account_key) = {
            let mut state = self.shared.state();
            let account = state.accounts.get_mut(&self.number).expect("the account");
            let device = account.next_device;
            let key_index = account.next_key_index;
            account.next_device += 1;
            account.next_key_index += 1;
            let details = wa::ADVDeviceIdentity {
                raw_id: Some(rand010::random()),
                timestamp: Some(shared::db::now_ms() as u64 / 1000),
                key_index: Some(key_index),
                account_type: Some(wa::ADVEncryptionType::E2EE),
                device_type: Some(wa::ADVEncryptionType::E2EE),
            }
            .encode_to_vec();
            let signed = [&ACCOUNT_SIGNATURE_PREFIX[..], &details, &identity].concat();
            let signature = account
                .identity
                .calculate_signature(&signed, &mut rand010::rng())
                .map_err(|e| e.to_string())?;
            let account_key = account.identity.public_key.public_key_bytes().to_vec();
            (
                device,
                key_index,
                account.lid.clone(),
                account.name.clone(),
                details,
                signature,
                account_key,
            )
        };
        let signed = wa::ADVSignedDeviceIdentity {
            details: Some(details),
            account_signature_key: Some(account_key),
            account_signature: Some(account_signature.to_vec()),
            device_signature: None,
        }
        .encode_to_vec();
        let mut mac =
            Hmac::<sha2::Sha256>::new_from_slice(&adv_secret).expect("HMAC takes any key");
        mac.update(&signed);
        let container = wa::ADVSignedDeviceIdentityHMAC {
            details: Some(signed),
            hmac: Some(mac.finalize().into_bytes().to_vec()),
            account_type: Some(wa::ADVEncryptionType::E2EE),
        }
        .encode_to_vec();

        let iq_id = format!("pair-success-{}", self.shared.next_id());
        let success = NodeBuilder::new("iq")
            .attr("from", SERVER)
            .attr("type", "set")
            .attr("id", iq_id.clone())
            .attr("xmlns", "md")
            .children([NodeBuilder::new("pair-success")
                .children([
                    NodeBuilder::new("device-identity").bytes(container).build(),
                    NodeBuilder::new("device")
                        .attr("jid", format!("{}:{device}@s.whatsapp.net", self.number))
                        .attr("lid", format!("{lid}:{device}@lid"))
                        .build(),
                    NodeBuilder::new("biz").attr("name", name).build(),
                    NodeBuilder::new("platform").attr("name", "android").build(),
                ])
                .build()])
            .build();
        let answer = self.ask(&stream.out, &iq_id, success).await?;

        // The device signs its identity back; it must verify under both keys.
        let signed_back = answer
            .get_optional_child("pair-device-sign")
            .and_then(|s| s.get_optional_child("device-identity"))
            .and_then(node_bytes)
            .ok_or_else(|| format!("the device refused the pairing: {answer:?}"))?;
        if validate_adv_with_identity_key(&signed_back, &identity, None) != AdvValidation::Valid {
            return Err("the device's signed identity does not verify".into());
        }
        self.shared
            .state()
            .accounts
            .get_mut(&self.number)
            .expect("the account")
            .companions
            .insert(
                device,
                Companion {
                    noise,
                    registration,
                    key_index,
                    device_identity: signed_back,
                    pre_keys: vec![],
                    inbox: vec![],
                },
            );
        // What it gets when it logs in, before anything else.
        self.share_app_state_keys(device)?;
        // Paired: the device restarts its stream and logs in.
        let restart = NodeBuilder::new("stream:error").attr("code", "515").build();
        let _ = stream.out.send(Outbound::End(restart));
        Ok(format!("{}:{device}@s.whatsapp.net", self.number))
    }

    /// Sends `iq` on a stream and waits for the client's answer to it.
    async fn ask(
        &self,
        out: &tokio::sync::mpsc::UnboundedSender<Outbound>,
        id: &str,
        iq: Node,
    ) -> Result<Node, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.state().replies.insert(id.to_owned(), tx);
        out.send(Outbound::Send(iq))
            .map_err(|_| "the device's stream is gone".to_string())?;
        match tokio::time::timeout(Duration::from_secs(15), rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                self.shared.state().replies.remove(id);
                Err("the device did not answer".into())
            }
        }
    }

    /// The devices linked to this account.
    pub fn linked_devices(&self) -> Vec<u16> {
        self.shared.state().accounts[&self.number]
            .companions
            .keys()
            .copied()
            .collect()
    }

    /// Unlinks `device` from the phone's "Linked devices": its stream, if up, is told so.
    pub fn unlink(&self, device: u16) {
        super::conn::unlink(&self.shared, &self.number, device);
        if let Some(stream) = self.live_stream(device) {
            let removed = NodeBuilder::new("stream:error")
                .attr("code", "401")
                .children([NodeBuilder::new("conflict")
                    .attr("type", "device_removed")
                    .build()])
                .build();
            let _ = stream.out.send(Outbound::End(removed));
        }
    }

    /// Bans the account for `expire` with WhatsApp's reason `code` (101–106): its devices are
    /// refused at login until [`Phone::lift_ban`]; streams up now are dropped.
    pub fn ban(&self, code: u32, expire: Duration) {
        if let Some(a) = self.shared.state().accounts.get_mut(&self.number) {
            a.ban = Some((code, expire.as_secs()));
        }
        self.drop_streams();
    }

    pub fn lift_ban(&self) {
        if let Some(a) = self.shared.state().accounts.get_mut(&self.number) {
            a.ban = None;
        }
    }

    /// What linked devices sent this phone, decrypted by it, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.shared.state().accounts[&self.number].received.clone()
    }

    /// Receipts this phone got for what it sent, oldest first.
    pub fn receipts(&self) -> Vec<ReceiptSeen> {
        self.shared.state().accounts[&self.number].receipts.clone()
    }

    /// Chat states devices showed this phone ("composing", "paused"): (from, state, at ms).
    pub fn chat_states(&self) -> Vec<(String, String, i64)> {
        self.shared.state().accounts[&self.number]
            .chat_states
            .clone()
    }

    /// Sends `text` to every device linked to the number `to` ([`Phone::send`]).
    pub fn send_text(&self, to: &str, text: &str) -> Result<String, String> {
        use wacore::proto_helpers::MessageBuilderExt;
        self.send(to, &wa::Message::text(text))
    }

    /// Sends `to` a file, as WhatsApp's apps do: encrypted under a fresh key, uploaded to the
    /// media hosts, its message carrying the key (and `content`'s caption, name and type).
    /// `content` is the file's message as our API shows it. Answers the message id.
    pub fn send_file(&self, to: &str, content: &Content, bytes: &[u8]) -> Result<String, String> {
        use worker::driver::whatsapp::files::{media_to_wa, media_type};
        let (kind, _) = content.media().ok_or("not a file")?;
        let media_type = media_type(kind);
        let sealed = wacore::upload::encrypt_media(bytes, media_type).map_err(|e| e.to_string())?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed.file_enc_sha256);
        let path =
            self.shared
                .media
                .keep(media_type.mms_type(), &token, sealed.data_to_upload.into());
        let host = self
            .shared
            .media
            .hostname
            .get()
            .cloned()
            .unwrap_or_default();
        let upload = worker::driver::whatsapp::files::Uploaded {
            url: format!("https://{host}{path}"),
            direct_path: path,
            media_key: sealed.media_key,
            file_enc_sha256: sealed.file_enc_sha256,
            file_sha256: sealed.file_sha256,
            file_length: bytes.len() as u64,
            media_key_timestamp: shared::db::now_ms() / 1000,
            streaming_sidecar: sealed.streaming_sidecar,
        };
        let message = media_to_wa(content, upload, None, "").ok_or("not a file")?;
        // The phone keeps its copy, to upload it again when a device asks.
        let id = message_id();
        self.shared
            .media
            .sent(&id, &sealed.media_key, media_type.mms_type(), &token);
        self.send_as(to, &message, id)
    }

    /// Sends a message to every device linked to the number `to`, encrypted by this phone
    /// (a device that does not acknowledge it gets it again when it logs in). Answers the
    /// message id.
    pub fn send(&self, to: &str, message: &wa::Message) -> Result<String, String> {
        self.send_as(to, message, message_id())
    }

    /// [`Phone::send`], the message's id chosen.
    fn send_as(&self, to: &str, message: &wa::Message, id: String) -> Result<String, String> {
        if to == self.number {
            return Err("a phone does not message itself".into());
        }
        let mut guard = self.shared.state();
        let state = &mut *guard;
        let mut me = state
            .accounts
            .remove(&self.number)
            .expect("the phone's account");
        let sent = match state.accounts.get_mut(to) {
            None => Err(format!("{to} is not on WhatsApp here")),
            Some(target) if target.companions.is_empty() => {
                Err(format!("{to} has no linked device"))
            }
            Some(target) => target
                .companions
                .iter_mut()
                .try_for_each(|(device, companion)| {
                    let stanza = seal(
                        &mut me.peer,
                        &self.number,
                        &me.name,
                        to,
                        *device,
                        companion,
                        &id,
                        message,
                    )?;
                    deliver(&state.live, to, *device, companion, &id, stanza);
                    Ok(())
                }),
        };
        state.accounts.insert(self.number.clone(), me);
        sent.map(|()| id)
    }

    /// What a phone sends a device it just linked, as WhatsApp's phones do: the keys of the
    /// account's app state (contacts, chats' settings), which the device waits for before it
    /// counts itself connected. Sent from the phone's own number, so the device trusts it.
    fn share_app_state_keys(&self, device: u16) -> Result<(), String> {
        let key_id: [u8; 6] = rand010::random();
        let share = wa::Message {
            protocol_message: MessageField::some(wa::message::ProtocolMessage {
                r#type: Some(wa::message::protocol_message::Type::AppStateSyncKeyShare),
                app_state_sync_key_share: MessageField::some(wa::message::AppStateSyncKeyShare {
                    keys: vec![wa::message::AppStateSyncKey {
                        key_id: MessageField::some(wa::message::AppStateSyncKeyId {
                            key_id: Some(key_id.to_vec()),
                        }),
                        key_data: MessageField::some(wa::message::AppStateSyncKeyData {
                            key_data: Some(rand010::random::<[u8; 32]>().to_vec()),
                            fingerprint: MessageField::some(
                                wa::message::AppStateSyncKeyFingerprint {
                                    raw_id: Some(rand010::random()),
                                    current_index: Some(0),
                                    device_indexes: vec![0],
                                },
                            ),
                            timestamp: Some(shared::db::now_ms()),
                        }),
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = message_id();
        let mut guard = self.shared.state();
        let state = &mut *guard;
        let me = state
            .accounts
            .get_mut(&self.number)
            .expect("the phone's account");
        let companion = me
            .companions
            .get_mut(&device)
            .ok_or("the device is not linked")?;
        let stanza = seal(
            &mut me.peer,
            &self.number,
            &me.name,
            &self.number,
            device,
            companion,
            &id,
            &share,
        )?;
        deliver(&state.live, &self.number, device, companion, &id, stanza);
        Ok(())
    }

    /// Reads what `from` sent: a read receipt for each message, to `from`'s devices.
    pub fn read(&self, from: &str) {
        let state = self.shared.state();
        let ids: Vec<String> = state.accounts[&self.number]
            .received
            .iter()
            .filter(|r| r.from == from)
            .map(|r| r.id.clone())
            .collect();
        for ((phone, _), stream) in &state.live {
            if phone != from {
                continue;
            }
            for id in &ids {
                let read = NodeBuilder::new("receipt")
                    .attr("from", format!("{}@s.whatsapp.net", self.number))
                    .attr("id", id.clone())
                    .attr("type", "read")
                    .attr("t", (shared::db::now_ms() / 1000).to_string())
                    .build();
                let _ = stream.out.send(Outbound::Send(read));
            }
        }
    }

    /// Drops every stream of the account's devices without a word, as a network does.
    pub fn drop_streams(&self) {
        let state = self.shared.state();
        for ((phone, _), stream) in &state.live {
            if phone == &self.number {
                let _ = stream.out.send(Outbound::Drop);
            }
        }
    }

    /// Drops `device`'s stream without a word; false when it has none up.
    pub fn drop_stream(&self, device: u16) -> bool {
        self.live_stream(device)
            .is_some_and(|stream| stream.out.send(Outbound::Drop).is_ok())
    }

    /// Ends `device`'s stream as WhatsApp does when the same device connects again from
    /// elsewhere (`conflict` `replaced`); false when it has none up.
    pub fn replace_stream(&self, device: u16) -> bool {
        let Some(stream) = self.live_stream(device) else {
            return false;
        };
        super::conn::replace(&self.shared, &stream, &self.number, device);
        true
    }

    fn live_stream(&self, device: u16) -> Option<super::Stream> {
        self.shared
            .state()
            .live
            .get(&(self.number.clone(), device))
            .cloned()
    }
}

/// An id in the shape WhatsApp's phones use.
/// `message`, encrypted by the phone of `from` for `device` of the number `to`, as the
/// `<message>` stanza that device gets.
#[allow(clippy::too_many_arguments)]
fn seal(
    peer: &mut signal::Peer,
    from: &str,
    name: &str,
    to: &str,
    device: u16,
    companion: &mut Companion,
    id: &str,
    message: &wa::Message,
) -> Result<Node, String> {
    use wacore::messages::MessageUtils;
    let plaintext = MessageUtils::encode_and_pad(message);
    let (kind, sealed) = peer.encrypt(
        &signal::address(to, device),
        || {
            let pre_key = (!companion.pre_keys.is_empty()).then(|| companion.pre_keys.remove(0));
            signal::companion_bundle(device, &companion.registration, pre_key.as_ref())
        },
        &plaintext,
    )?;
    Ok(NodeBuilder::new("message")
        .attr("from", format!("{from}@s.whatsapp.net"))
        .attr("id", id.to_owned())
        .attr("t", (shared::db::now_ms() / 1000).to_string())
        .attr("type", "text")
        .attr("notify", name.to_owned())
        .children([NodeBuilder::new("enc")
            .attr("v", "2")
            .attr("type", kind)
            .bytes(sealed)
            .build()])
        .build())
}

/// Sends a stanza to `to`'s `device` if it is connected, and keeps it in the device's inbox
/// until the device acknowledges it.
fn deliver(
    live: &std::collections::HashMap<(String, u16), super::Stream>,
    to: &str,
    device: u16,
    companion: &mut Companion,
    id: &str,
    stanza: Node,
) {
    if let Some(stream) = live.get(&(to.to_owned(), device)) {
        let _ = stream.out.send(Outbound::Send(stanza.clone()));
    }
    companion.inbox.push((id.to_owned(), stanza));
}

fn message_id() -> String {
    let n: u128 = rand010::random();
    format!("3EB0{:020X}", n >> 48)
}

pub(super) fn node_bytes(node: &Node) -> Option<Vec<u8>> {
    match &node.content {
        Some(wacore_binary::NodeContent::Bytes(b)) => Some(b.clone()),
        _ => None,
    }
}
