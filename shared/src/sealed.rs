//! Secrets at rest: AES-256-GCM under keys from configuration, the key's id stored beside each
//! value so keys can rotate.
//!
//! `CREDENTIALS_KEYS` is one or more `id:base64key` (32-byte keys), comma-separated. The first
//! seals; every one opens, so a new key goes first and the old ones stay listed until
//! `gatewayctl credentials rotate` has re-sealed everything under the new one.
//!
//! A sealed value is the 12-byte random nonce followed by the ciphertext and its tag. The
//! associated data names where the value lives (its table and session), so a value copied
//! into another session's row does not open.

use std::fmt;

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, AeadCore, OsRng, Payload},
};
use base64::Engine;

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("CREDENTIALS_KEYS: {0}")]
    Config(String),
    #[error("sealed with key `{0}`, which CREDENTIALS_KEYS does not list")]
    UnknownKey(String),
    #[error("a sealed value does not open (wrong key, or the value was altered or moved)")]
    Corrupt,
}

/// The keys that seal and open secrets at rest; the first seals.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<(String, Aes256Gcm)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys themselves.
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keyring").field("ids", &ids).finish()
    }
}

impl Keyring {
    /// Parses `id:base64key[,id:base64key…]`.
    pub fn parse(spec: &str) -> Result<Self, SealError> {
        let mut keys: Vec<(String, Aes256Gcm)> = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, b64) = item.split_once(':').ok_or_else(|| {
                SealError::Config(format!("`{}…` is not `id:base64key`", head(item)))
            })?;
            let id = id.trim();
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(SealError::Config(format!(
                    "key id `{id}`: use letters, digits, `-`, `_` or `.`"
                )));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(SealError::Config(format!("key id `{id}` is listed twice")));
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| SealError::Config(format!("key `{id}` is not base64")))?;
            if raw.len() != 32 {
                return Err(SealError::Config(format!(
                    "key `{id}` is {} bytes; AES-256 needs 32 (`openssl rand -base64 32`)",
                    raw.len()
                )));
            }
            let cipher = Aes256Gcm::new_from_slice(&raw)
                .map_err(|_| SealError::Config(format!("key `{id}` is not a 32-byte key")))?;
            keys.push((id.to_owned(), cipher));
        }
        if keys.is_empty() {
            return Err(SealError::Config("no key given".into()));
        }
        Ok(Keyring { keys })
    }

    /// A keyring of one fresh random key (tests, and the local cluster's default).
    pub fn generate(id: &str) -> Self {
        let key = Aes256Gcm::generate_key(OsRng);
        Keyring {
            keys: vec![(id.to_owned(), Aes256Gcm::new(&key))],
        }
    }

    /// The id of the key that seals.
    pub fn current(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plain` under the current key; answers the key id and the sealed bytes.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> (&str, Vec<u8>) {
        let (id, cipher) = &self.keys[0];
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let ciphertext = cipher
            .encrypt(&nonce, Payload { msg: plain, aad })
            // Only fails for inputs of many GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        (id, out)
    }

    /// Opens a value sealed under `key_id`.
    pub fn open(&self, key_id: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or_else(|| SealError::UnknownKey(key_id.to_owned()))?;
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Corrupt);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Corrupt)?;
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| SealError::Corrupt)
    }
}

fn head(s: &str) -> &str {
    // Never echo a whole key back into a log.
    let end = s.char_indices().nth(6).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2:HxcbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAE=";

    #[test]
    fn seals_with_the_first_key_and_opens_with_any_listed() {
        let old = Keyring::parse(K1).expect("keys");
        let (id, sealed) = old.seal(b"t/s1", b"secret");
        assert_eq!(id, "k1");
        let both = Keyring::parse(&format!("{K2},{K1}")).expect("keys");
        assert_eq!(both.current(), "k2");
        assert_eq!(both.open("k1", b"t/s1", &sealed).expect("opens"), b"secret");
        let (id2, resealed) = both.seal(b"t/s1", b"secret");
        assert_eq!(id2, "k2");
        assert_eq!(
            old.open("k2", b"t/s1", &resealed),
            Err(SealError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn a_moved_or_altered_value_does_not_open() {
        let ring = Keyring::parse(K1).expect("keys");
        let (_, mut sealed) = ring.seal(b"t/s1", b"secret");
        assert_eq!(ring.open("k1", b"t/s2", &sealed), Err(SealError::Corrupt));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(ring.open("k1", b"t/s1", &sealed), Err(SealError::Corrupt));
        assert_eq!(ring.open("k1", b"t/s1", b"short"), Err(SealError::Corrupt));
    }

    #[test]
    fn bad_configuration_is_explained_without_echoing_keys() {
        for (spec, says) in [
            ("", "no key given"),
            ("nokey", "is not `id:base64key`"),
            ("k1:!!!", "is not base64"),
            ("k1:AAAA", "is 3 bytes"),
            (&format!("{K1},{K1}"), "listed twice"),
            ("bad id:AAAA", "key id"),
        ] {
            let e = Keyring::parse(spec).expect_err("refused").to_string();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(!e.contains("AAECAwQF"), "{e}");
        }
    }
}
