//! Who a caller is and what they may do: capabilities, the role map, API-key secrets.
//!
//! Capabilities are `read` and `manage` (SPEC §2). The role → capability map is here and only
//! here. API keys are `gwk_<ULID>_<64 hex>_<8 hex>`: the `gwk_<ULID>` part is the public
//! prefix (the row's id, safe to log), then 32 random bytes and a check of what precedes it
//! ([`api_key_id`] refuses a key whose check fails). Only SHA-256 of the whole key is
//! stored; a fast hash is right here because the secret has 256 bits of entropy, so there is
//! nothing to brute-force and every request can afford it.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// List and get sessions, the event stream, the fleet view.
    Read,
    /// Everything that changes a session, and the QR and pairing code.
    Manage,
}

impl Capability {
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Manage => "manage",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "read" => Ok(Capability::Read),
            "manage" => Ok(Capability::Manage),
            other => Err(Error::invalid_field(
                "capabilities",
                format!("unknown capability '{other}' (expected read or manage)"),
            )),
        }
    }
}

/// A set of capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    read: bool,
    manage: bool,
}

impl Capabilities {
    pub fn of(caps: &[Capability]) -> Self {
        let mut set = Capabilities::default();
        for c in caps {
            match c {
                Capability::Read => set.read = true,
                Capability::Manage => set.manage = true,
            }
        }
        set
    }

    pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<Self> {
        let caps = items
            .iter()
            .map(|s| Capability::parse(s.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::of(&caps))
    }

    pub fn has(self, cap: Capability) -> bool {
        match cap {
            Capability::Read => self.read,
            Capability::Manage => self.manage,
        }
    }

    pub fn names(self) -> Vec<&'static str> {
        [Capability::Read, Capability::Manage]
            .into_iter()
            .filter(|c| self.has(*c))
            .map(Capability::as_str)
            .collect()
    }
}

/// The role → capability map: the only place it is written down.
pub fn capabilities_of_role(role: &str) -> Capabilities {
    match role {
        "owner" | "admin" => Capabilities::of(&[Capability::Read, Capability::Manage]),
        "member" | "viewer" => Capabilities::of(&[Capability::Read]),
        _ => Capabilities::default(),
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub organization_id: String,
    /// The person's user id (`sub`) or the API key's public prefix.
    pub subject: String,
    pub capabilities: Capabilities,
    /// When the credential stops being valid (a login JWT's `exp`, an API key's expiry),
    /// epoch milliseconds; what outlives a request (an event stream) ends there.
    pub expires_at_ms: Option<i64>,
}

impl Principal {
    /// 403 unless the caller holds `cap`.
    pub fn require(&self, cap: Capability) -> Result<()> {
        if self.capabilities.has(cap) {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "this credential lacks the '{}' capability",
                cap.as_str()
            )))
        }
    }
}

pub const API_KEY_PREFIX: &str = "gwk_";
const PUBLIC_LEN: usize = API_KEY_PREFIX.len() + 26;
/// A key minted before keys carried a check: `gwk_<ULID>_<64 hex>`.
const LEGACY_KEY_LEN: usize = PUBLIC_LEN + 1 + 64;
/// `gwk_<ULID>_<64 hex>_<8 hex>`: the last part is the first 4 bytes of SHA-256 of the rest.
const KEY_LEN: usize = LEGACY_KEY_LEN + 1 + 8;

/// A freshly minted key: shown once, then only its hash exists.
pub struct NewApiKey {
    pub id: String,
    pub secret: String,
    pub sha256: [u8; 32],
}

pub fn mint_api_key() -> NewApiKey {
    let id = format!("{API_KEY_PREFIX}{}", ulid::Ulid::new());
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let body = format!("{id}_{}", crate::hex(&bytes));
    let secret = format!("{body}_{}", key_check(&body));
    let sha256 = hash_api_key(&secret);
    NewApiKey { id, secret, sha256 }
}

/// The check a key carries at its end: made-up and mistyped keys are told apart from real ones
/// without the database. Not a secret: it stops garbage and typos, not a forger, whose
/// attempts the per-address limit on failed authentications bounds (`api/src/limits.rs`).
fn key_check(body: &str) -> String {
    crate::hex(&Sha256::digest(body.as_bytes())[..4])
}

/// The public prefix of an API key, or `None` for anything else: a token not shaped like a
/// key, or a key whose check does not match (no database lookup is worth making for it).
/// Keys minted before the check existed (`gwk_<ULID>_<64 hex>`) are still recognized.
pub fn api_key_id(token: &str) -> Option<&str> {
    let shaped = (token.len() == KEY_LEN || token.len() == LEGACY_KEY_LEN)
        && token.starts_with(API_KEY_PREFIX)
        && token.as_bytes()[PUBLIC_LEN] == b'_'
        && token[PUBLIC_LEN + 1..LEGACY_KEY_LEN]
            .bytes()
            .all(|b| b.is_ascii_hexdigit());
    if !shaped {
        return None;
    }
    if token.len() == KEY_LEN {
        let (body, check) = token.split_at(LEGACY_KEY_LEN);
        if check.as_bytes()[0] != b'_' || check[1..] != key_check(body) {
            return None;
        }
    }
    Some(&token[..PUBLIC_LEN])
}

pub fn hash_api_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_parse_back_to_their_id() {
        let key = mint_api_key();
        assert_eq!(api_key_id(&key.secret), Some(key.id.as_str()));
        assert_eq!(hash_api_key(&key.secret), key.sha256);
        assert_eq!(api_key_id("gwk_short"), None);
        assert_eq!(api_key_id("eyJhbGciOi.x.y"), None);
        // One character changed anywhere: the check no longer matches.
        for at in [5, 40, key.secret.len() - 1] {
            let mut typo = key.secret.clone().into_bytes();
            typo[at] = if typo[at] == b'0' { b'1' } else { b'0' };
            let typo = String::from_utf8(typo).expect("ascii");
            assert_eq!(api_key_id(&typo), None, "{typo}");
        }
        // A key of the old shape, without a check, is still a key.
        assert_eq!(
            api_key_id(&key.secret[..LEGACY_KEY_LEN]),
            Some(key.id.as_str())
        );
    }

    #[test]
    fn roles_map_to_capabilities() {
        assert!(capabilities_of_role("owner").has(Capability::Manage));
        assert!(capabilities_of_role("admin").has(Capability::Manage));
        assert!(capabilities_of_role("member").has(Capability::Read));
        assert!(!capabilities_of_role("member").has(Capability::Manage));
        assert_eq!(capabilities_of_role("stranger"), Capabilities::default());
    }
}
