//! Secrets at rest: sealed under keys from configuration, the key's id stored beside each
//! value so keys can rotate.
//!
//! A keyring is one or more `id:base64key` (32-byte keys), comma-separated: the workers'
//! `CREDENTIALS_KEYS` seal the device keys, the api's `WEBHOOK_SECRET_KEYS` the webhooks'
//! signing secrets, and neither process holds the other's. The first key seals; every one
//! opens, so a new key goes first and the old ones stay listed until
//! `gatewayctl credentials rotate` has re-sealed everything under the new one.
//!
//! A sealed value (format 2) is [`FORMAT_2`], a 24-byte random nonce, then the
//! XChaCha20-Poly1305 ciphertext and its tag, under a key derived from the configured one
//! with HKDF-SHA256. 192-bit random nonces never collide in practice, however many values one
//! key seals; the associated data ([`Binding::aad`]) names the value's table and row, so a
//! value copied into another row (of the same session, or another's) does not open.
//!
//! Format 1, written before, is a 12-byte random nonce and an AES-256-GCM ciphertext under the
//! configured key itself, bound only to table and session ([`Binding::v1_aad`]). It still
//! opens; every write seals format 2, and `gatewayctl credentials rotate` re-seals what is
//! left ([`is_current`] tells them apart).

use std::fmt;

use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, OsRng, Payload},
};

/// The first bytes of a format-2 value. A format-1 value starts with a random nonce, which
/// may begin so too (one in 2³²): such a value is tried as format 2, then as format 1.
pub const FORMAT_2: [u8; 4] = *b"GWs2";
const V1_NONCE_LEN: usize = 12;
const V2_NONCE_LEN: usize = 24;
/// What HKDF derives the format-2 key for (its `info`).
const V2_KEY_INFO: &[u8] = b"whatsapp-gateway sealed values, format 2: XChaCha20-Poly1305";

/// Where a sealed value lives: the associated data it is sealed with, and the one a
/// format-1 value of the same place was sealed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub aad: Vec<u8>,
    pub v1_aad: Vec<u8>,
}

impl Binding {
    /// A binding whose place had the same associated data in both formats.
    pub fn same(aad: Vec<u8>) -> Binding {
        Binding {
            v1_aad: aad.clone(),
            aad,
        }
    }
}

/// Whether `sealed` is in the format [`Keyring::seal`] writes (rotation re-seals the rest).
pub fn is_current(sealed: &[u8]) -> bool {
    sealed.starts_with(&FORMAT_2)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{0}")]
    Config(String),
    #[error("sealed with key `{0}`, which the configured keys do not list")]
    UnknownKey(String),
    #[error("a sealed value does not open (wrong key, or the value was altered or moved)")]
    Corrupt,
}

/// One configured key: its id, the format-2 cipher (derived key) and the format-1 one.
#[derive(Clone)]
struct Key {
    id: String,
    v2: XChaCha20Poly1305,
    v1: Aes256Gcm,
}

impl Key {
    fn new(id: &str, raw: &[u8; 32]) -> Key {
        let mut derived = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, raw)
            .expand(V2_KEY_INFO, &mut derived)
            // 32 bytes is far below HKDF-SHA256's limit of 8160.
            .unwrap_or_default();
        Key {
            id: id.to_owned(),
            v2: XChaCha20Poly1305::new(&derived.into()),
            v1: Aes256Gcm::new(raw.into()),
        }
    }

    fn open_v2(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, msg) = sealed
            .strip_prefix(&FORMAT_2)?
            .split_first_chunk::<V2_NONCE_LEN>()?;
        self.v2
            .decrypt(&XNonce::from(*nonce), Payload { msg, aad })
            .ok()
    }

    fn open_v1(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, msg) = sealed.split_first_chunk::<V1_NONCE_LEN>()?;
        self.v1
            .decrypt(&Nonce::from(*nonce), Payload { msg, aad })
            .ok()
    }
}

/// The keys that seal and open secrets at rest; the first seals.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys themselves.
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring").field("ids", &ids).finish()
    }
}

impl Keyring {
    /// Parses `id:base64key[,id:base64key…]`.
    pub fn parse(spec: &str) -> Result<Self, SealError> {
        let mut keys: Vec<Key> = Vec::new();
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
            if keys.iter().any(|k| k.id == id) {
                return Err(SealError::Config(format!("key id `{id}` is listed twice")));
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| SealError::Config(format!("key `{id}` is not base64")))?;
            let raw: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
                SealError::Config(format!(
                    "key `{id}` is {} bytes; it must be 32 (`openssl rand -base64 32`)",
                    raw.len()
                ))
            })?;
            keys.push(Key::new(id, &raw));
        }
        if keys.is_empty() {
            return Err(SealError::Config("no key given".into()));
        }
        Ok(Keyring { keys })
    }

    /// A keyring of one fresh random key (tests, and the local cluster's default).
    pub fn generate(id: &str) -> Self {
        let raw: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
        Keyring {
            keys: vec![Key::new(id, &raw)],
        }
    }

    /// The id of the key that seals.
    pub fn current(&self) -> &str {
        &self.keys[0].id
    }

    /// Seals `plain` for `binding` under the current key, in format 2; answers the key id and
    /// the sealed bytes.
    pub fn seal(&self, binding: &Binding, plain: &[u8]) -> (&str, Vec<u8>) {
        let key = &self.keys[0];
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = key
            .v2
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: &binding.aad,
                },
            )
            // Only fails for inputs of many GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(FORMAT_2.len() + V2_NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&FORMAT_2);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        (&key.id, out)
    }

    /// Opens a value sealed under `key_id` for `binding`, in either format.
    pub fn open(
        &self,
        key_id: &str,
        binding: &Binding,
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| SealError::UnknownKey(key_id.to_owned()))?;
        key.open_v2(&binding.aad, sealed)
            .or_else(|| key.open_v1(&binding.v1_aad, sealed))
            .ok_or(SealError::Corrupt)
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

    fn at(place: &str) -> Binding {
        Binding {
            aad: format!("{place}/row").into_bytes(),
            v1_aad: place.as_bytes().to_vec(),
        }
    }

    #[test]
    fn seals_with_the_first_key_and_opens_with_any_listed() {
        let old = Keyring::parse(K1).expect("keys");
        let (id, sealed) = old.seal(&at("t/s1"), b"secret");
        assert_eq!(id, "k1");
        assert!(is_current(&sealed));
        let both = Keyring::parse(&format!("{K2},{K1}")).expect("keys");
        assert_eq!(both.current(), "k2");
        assert_eq!(
            both.open("k1", &at("t/s1"), &sealed).expect("opens"),
            b"secret"
        );
        let (id2, resealed) = both.seal(&at("t/s1"), b"secret");
        assert_eq!(id2, "k2");
        assert_eq!(
            old.open("k2", &at("t/s1"), &resealed),
            Err(SealError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn a_moved_or_altered_value_does_not_open() {
        let ring = Keyring::parse(K1).expect("keys");
        let (_, mut sealed) = ring.seal(&at("t/s1"), b"secret");
        assert_eq!(
            ring.open("k1", &at("t/s2"), &sealed),
            Err(SealError::Corrupt)
        );
        // Same table and session, another row.
        let other_row = Binding {
            aad: b"t/s1/other".to_vec(),
            v1_aad: b"t/s1".to_vec(),
        };
        assert_eq!(
            ring.open("k1", &other_row, &sealed),
            Err(SealError::Corrupt)
        );
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(
            ring.open("k1", &at("t/s1"), &sealed),
            Err(SealError::Corrupt)
        );
        assert_eq!(
            ring.open("k1", &at("t/s1"), b"short"),
            Err(SealError::Corrupt)
        );
        assert_eq!(
            ring.open("k1", &at("t/s1"), b"GWs2short"),
            Err(SealError::Corrupt)
        );
    }

    /// A value sealed before format 2 (AES-256-GCM under the configured key, 12-byte nonce,
    /// bound to table and session) still opens, with its own associated data only.
    #[test]
    fn format_1_values_still_open() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(K1.split_once(':').expect("id:key").1)
            .expect("base64");
        let v1 = Aes256Gcm::new_from_slice(&raw).expect("a key");
        for first in [0u8, b'G'] {
            let mut nonce = [7u8; V1_NONCE_LEN];
            nonce[..4].copy_from_slice(if first == b'G' { &FORMAT_2 } else { &[0; 4] });
            let mut sealed = nonce.to_vec();
            sealed.extend(
                v1.encrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: b"old secret",
                        aad: b"t/s1",
                    },
                )
                .expect("sealed"),
            );
            let ring = Keyring::parse(K1).expect("keys");
            assert_eq!(
                ring.open("k1", &at("t/s1"), &sealed).expect("opens"),
                b"old secret"
            );
            assert_eq!(is_current(&sealed), first == b'G');
            assert_eq!(
                ring.open("k1", &at("t/s2"), &sealed),
                Err(SealError::Corrupt)
            );
        }
    }

    #[test]
    fn nonces_are_192_bits_and_fresh() {
        let ring = Keyring::generate("g");
        let (_, a) = ring.seal(&at("t/s1"), b"same");
        let (_, b) = ring.seal(&at("t/s1"), b"same");
        assert_eq!(a.len(), FORMAT_2.len() + V2_NONCE_LEN + 4 + 16);
        assert_ne!(a[4..28], b[4..28]);
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
