//! A simulated phone's Signal state (device 0 of its account): the keys its bundles are made
//! of, and a session per device it talks to, all in memory. The phone decrypts what a linked
//! device sends it with its own state, and encrypts what it sends, as WhatsApp's phones do:
//! the server in between never sees a plaintext it did not make itself.
//!
//! The stores are `wacore-libsignal`'s traits over maps (as in that crate's own tests); they
//! never wait, so the protocol's async functions are driven to completion in place.

use std::collections::HashMap;

use async_trait::async_trait;
use wacore::libsignal::protocol::{
    CiphertextMessage, CiphertextMessageType, DeviceId, Direction, GenericSignedPreKey,
    IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, KeyPair, PreKeyBundle,
    PreKeyId, PreKeyRecord, PreKeySignalMessage, PreKeyStore, ProtocolAddress, PublicKey,
    SessionRecord, SessionStore, SignalMessage, SignalProtocolError, SignedPreKeyId,
    SignedPreKeyRecord, SignedPreKeyStore, Timestamp, UsePQRatchet, error::Result, message_decrypt,
    message_encrypt, process_prekey_bundle,
};
use wacore_binary::{Node, builder::NodeBuilder};

use super::Registration;

struct Identities {
    own: IdentityKeyPair,
    registration_id: u32,
    known: HashMap<ProtocolAddress, IdentityKey>,
}

#[async_trait]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> Result<IdentityKeyPair> {
        Ok(self.own.clone())
    }
    async fn get_local_registration_id(&self) -> Result<u32> {
        Ok(self.registration_id)
    }
    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> Result<IdentityChange> {
        let changed = self.known.get(address).is_some_and(|k| k != identity);
        self.known.insert(address.clone(), *identity);
        Ok(IdentityChange::from_changed(changed))
    }
    async fn is_trusted_identity(
        &self,
        _: &ProtocolAddress,
        _: &IdentityKey,
        _: Direction,
    ) -> Result<bool> {
        Ok(true)
    }
    async fn get_identity(&self, address: &ProtocolAddress) -> Result<Option<IdentityKey>> {
        Ok(self.known.get(address).cloned())
    }
}

#[derive(Default)]
struct PreKeys(HashMap<PreKeyId, PreKeyRecord>);

#[async_trait]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> Result<PreKeyRecord> {
        self.0
            .get(&id)
            .cloned()
            .ok_or(SignalProtocolError::InvalidPreKeyId)
    }
    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> Result<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }
    async fn remove_pre_key(&mut self, id: PreKeyId) -> Result<()> {
        self.0.remove(&id);
        Ok(())
    }
}

#[derive(Default)]
struct SignedPreKeys(HashMap<SignedPreKeyId, SignedPreKeyRecord>);

#[async_trait]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> Result<SignedPreKeyRecord> {
        self.0
            .get(&id)
            .cloned()
            .ok_or(SignalProtocolError::InvalidSignedPreKeyId)
    }
    async fn save_signed_pre_key(
        &mut self,
        id: SignedPreKeyId,
        record: &SignedPreKeyRecord,
    ) -> Result<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }
}

#[derive(Default)]
struct Sessions(HashMap<ProtocolAddress, SessionRecord>);

#[async_trait]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> Result<Option<SessionRecord>> {
        Ok(self.0.get(address).cloned())
    }
    async fn has_session(&self, address: &ProtocolAddress) -> Result<bool> {
        Ok(self.0.contains_key(address))
    }
    async fn store_session(
        &mut self,
        address: &ProtocolAddress,
        record: SessionRecord,
    ) -> Result<()> {
        self.0.insert(address.clone(), record);
        Ok(())
    }
}

/// Device 0 of an account: its identity is the account's key (the one that signs the
/// devices it links).
pub struct Peer {
    identities: Identities,
    pre_keys: PreKeys,
    signed: SignedPreKeys,
    sessions: Sessions,
    signed_pre_key: (u32, KeyPair, Vec<u8>),
    next_pre_key: u32,
}

/// The address of `user`'s device `device` in a phone's session store.
pub fn address(user: &str, device: u16) -> ProtocolAddress {
    ProtocolAddress::new(user, DeviceId::from(u32::from(device)))
}

fn done<T>(f: impl Future<Output = T>) -> T {
    futures::executor::block_on(f)
}

impl Peer {
    pub fn new(account: &KeyPair) -> Peer {
        let mut rng = rand010::rng();
        let own = IdentityKeyPair::new(
            IdentityKey::new(account.public_key),
            account.private_key.clone(),
        );
        let signed = KeyPair::generate(&mut rng);
        let signature = account
            .private_key
            .calculate_signature(&signed.public_key.serialize(), &mut rng)
            .expect("a signature")
            .to_vec();
        let mut store = SignedPreKeys::default();
        done(store.save_signed_pre_key(
            1.into(),
            &SignedPreKeyRecord::new(
                1.into(),
                Timestamp::from_epoch_millis(0),
                &signed,
                &signature,
            ),
        ))
        .expect("in memory");
        Peer {
            identities: Identities {
                own,
                registration_id: rand010::random::<u32>() & 0x3fff,
                known: HashMap::new(),
            },
            pre_keys: PreKeys::default(),
            signed: store,
            sessions: Sessions::default(),
            signed_pre_key: (1, signed, signature),
            next_pre_key: 1,
        }
    }

    /// This device's bundle as a `<key>` answer's `<user>`, with a fresh one-time pre-key.
    pub fn bundle_node(&mut self, jid: &str) -> Node {
        let id = self.next_pre_key;
        self.next_pre_key += 1;
        let pre_key = KeyPair::generate(&mut rand010::rng());
        done(
            self.pre_keys
                .save_pre_key(id.into(), &PreKeyRecord::new(id.into(), &pre_key)),
        )
        .expect("in memory");
        let (skey_id, skey, signature) = &self.signed_pre_key;
        let bytes = |tag: &'static str, b: &[u8]| NodeBuilder::new(tag).bytes(b.to_vec()).build();
        let id3 = |id: u32| id.to_be_bytes()[1..].to_vec();
        NodeBuilder::new("user")
            .attr("jid", jid.to_owned())
            .attr("type", "result")
            .children([
                bytes(
                    "registration",
                    &self.identities.registration_id.to_be_bytes(),
                ),
                bytes("type", &[5]),
                bytes(
                    "identity",
                    self.identities.own.public_key().public_key_bytes(),
                ),
                NodeBuilder::new("skey")
                    .children([
                        bytes("id", &id3(*skey_id)),
                        bytes("value", skey.public_key.public_key_bytes()),
                        bytes("signature", signature),
                    ])
                    .build(),
                NodeBuilder::new("key")
                    .children([
                        bytes("id", &id3(id)),
                        bytes("value", pre_key.public_key.public_key_bytes()),
                    ])
                    .build(),
            ])
            .build()
    }

    /// Decrypts what `from` sent this device (`pkmsg` or `msg`).
    pub fn decrypt(
        &mut self,
        from: &ProtocolAddress,
        kind: &str,
        ciphertext: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        let message = match kind {
            "pkmsg" => PreKeySignalMessage::try_from(ciphertext)
                .map(CiphertextMessage::PreKeySignalMessage),
            "msg" => SignalMessage::try_from(ciphertext).map(CiphertextMessage::SignalMessage),
            other => return Err(format!("an `{other}` message is not for a device")),
        }
        .map_err(|e| e.to_string())?;
        let result = done(message_decrypt(
            &message,
            from,
            &mut self.sessions,
            &mut self.identities,
            &mut self.pre_keys,
            &self.signed,
            &mut rand010::rng(),
            UsePQRatchet::No,
        ))
        .map_err(|e| e.to_string())?;
        if let Some(used) = result.consumed_prekey_id {
            let _ = done(self.pre_keys.remove_pre_key(used));
        }
        Ok(result.plaintext)
    }

    /// Encrypts `plaintext` for `to`, starting a session from `bundle` when there is none:
    /// `(enc type, bytes)`.
    pub fn encrypt(
        &mut self,
        to: &ProtocolAddress,
        bundle: impl FnOnce() -> Option<PreKeyBundle>,
        plaintext: &[u8],
    ) -> std::result::Result<(&'static str, Vec<u8>), String> {
        if !done(self.sessions.has_session(to)).unwrap_or(false) {
            let bundle = bundle().ok_or("the device has no keys to start a session with")?;
            done(process_prekey_bundle(
                to,
                &mut self.sessions,
                &mut self.identities,
                &bundle,
                &mut rand010::rng(),
                UsePQRatchet::No,
            ))
            .map_err(|e| e.to_string())?;
        }
        let sealed = done(message_encrypt(
            plaintext,
            to,
            &mut self.sessions,
            &mut self.identities,
        ))
        .map_err(|e| e.to_string())?;
        let kind = match sealed.message_type() {
            CiphertextMessageType::PreKey => "pkmsg",
            _ => "msg",
        };
        Ok((kind, sealed.serialize().to_vec()))
    }
}

/// A linked device's bundle, from what it registered and one of the pre-keys it uploaded.
pub fn companion_bundle(
    device: u16,
    registration: &Registration,
    pre_key: Option<&Node>,
) -> Option<PreKeyBundle> {
    let be = |b: &[u8]| b.iter().fold(0u32, |n, byte| (n << 8) | u32::from(*byte));
    let key = |b: &[u8]| PublicKey::from_djb_public_key_bytes(b).ok();
    let child_bytes = |n: &Node, tag: &str| match &n.get_optional_child(tag)?.content {
        Some(wacore_binary::NodeContent::Bytes(b)) => Some(b.clone()),
        _ => None,
    };
    let pre_key = match pre_key {
        Some(n) => Some((
            PreKeyId::from(be(&child_bytes(n, "id")?)),
            key(&child_bytes(n, "value")?)?,
        )),
        None => None,
    };
    PreKeyBundle::new(
        be(&registration.registration_id),
        DeviceId::from(u32::from(device)),
        pre_key,
        SignedPreKeyId::from(be(&registration.signed_pre_key_id)),
        key(&registration.signed_pre_key)?,
        registration.signed_pre_key_signature.clone(),
        IdentityKey::new(key(&registration.identity)?),
    )
    .ok()
}
