//! Standard Webhooks signatures (standardwebhooks.com), made with the specification's own
//! Rust library (`standardwebhooks`, by its authors), so any of its libraries verifies them:
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`, one such
//! value per valid secret separated by spaces (two during a rotation's overlap).
//!
//! A secret is 32 random bytes, shown as `whsec_<base64>`; at rest it is sealed under
//! `WEBHOOK_SECRET_KEYS`, bound to its endpoint (the AAD), so a sealed secret copied to another
//! endpoint's row does not open.

use base64::{Engine, engine::general_purpose::STANDARD};
use rand::RngCore;
use shared::{
    Error, Result,
    sealed::Keyring,
    store::webhooks::{SealedSecret, secret_binding},
};

pub const SECRET_PREFIX: &str = "whsec_";
const SECRET_BYTES: usize = 32;

/// A new secret: its bytes, and how the user sees it.
pub fn new_secret() -> (Vec<u8>, String) {
    let mut key = vec![0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut key);
    let shown = format!("{SECRET_PREFIX}{}", STANDARD.encode(&key));
    (key, shown)
}

pub fn seal(keys: &Keyring, webhook_id: &str, key: &[u8]) -> SealedSecret {
    let (key_id, sealed) = keys.seal(&secret_binding(webhook_id), key);
    SealedSecret {
        key_id: key_id.to_owned(),
        sealed,
    }
}

pub fn open(keys: &Keyring, webhook_id: &str, s: &SealedSecret) -> Result<Vec<u8>> {
    keys.open(&s.key_id, &secret_binding(webhook_id), &s.sealed)
        .map_err(Error::internal)
}

/// The `webhook-signature` header for `body` sent as message `msg_id` at `timestamp`
/// (seconds), signed with every key in `keys`.
pub fn signature(keys: &[Vec<u8>], msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String> {
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let signer = standardwebhooks::Webhook::from_bytes(key.clone()).map_err(Error::internal)?;
        out.push(
            signer
                .sign(msg_id, timestamp, body)
                .map_err(Error::internal)?,
        );
    }
    Ok(out.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_specifications_test_vector() {
        // From the specification's reference tests.
        let key = STANDARD
            .decode("C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
            .expect("base64");
        let sig = signature(
            &[key],
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .expect("signs");
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn two_secrets_give_two_signatures_and_secrets_open_only_where_sealed() {
        let (a, shown) = new_secret();
        assert!(shown.starts_with("whsec_"));
        let (b, _) = new_secret();
        let sig = signature(&[a.clone(), b], "m", 1, b"{}").expect("signs");
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
        let keys = Keyring::generate("k");
        let sealed = seal(&keys, "w1", &a);
        assert_eq!(open(&keys, "w1", &sealed).ok(), Some(a));
        assert!(open(&keys, "w2", &sealed).is_err());
    }
}
