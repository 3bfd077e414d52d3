//! Authentication and authorization: login JWTs (verified against a JWKS the test serves),
//! API keys, capabilities, and organization isolation.
//!
//! Every failure is checked against the documented envelope
//! `{"error":{"code","message","details"}}`: 401 `unauthorized` for a credential that does not
//! authenticate, 403 `forbidden` for a missing capability, 404 `not_found` for another
//! organization's session (never 403, so ids do not leak across organizations).

use std::{num::NonZeroU32, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tests::{
    Api, Resp, TestEnv, eventually,
    jwks::{self, JwksServer, SigningKey, claims},
    unique,
};

const SESSIONS: &str = "/api/v1/sessions";

fn org() -> String {
    format!("org-{}", unique())
}

fn now_secs() -> i64 {
    shared::db::now_ms() / 1000
}

/// A JWKS serving `keys` and an api that trusts it (an unknown kid always refetches).
async fn jwt_api(env: &TestEnv, keys: &[&SigningKey]) -> (JwksServer, Api) {
    jwks::jwt_api(env, keys, unlimited_jwks_refreshes).await
}

fn unlimited_jwks_refreshes(c: &mut api::Config) {
    c.auth_jwks_refresh_burst = NonZeroU32::new(1_000_000).expect("nonzero");
    c.auth_jwks_refreshes_per_minute = NonZeroU32::new(1_000_000).expect("nonzero");
}

/// A JWKS refresh budget of `burst` fetches, refilled once an hour.
fn jwks_refresh_budget(c: &mut api::Config, burst: u32) {
    c.auth_jwks_refresh_burst = NonZeroU32::new(burst).expect("nonzero");
    c.auth_jwks_refreshes_per_minute = NonZeroU32::new(1).expect("nonzero");
}

/// Sends `GET path` with this exact `Authorization` header (or none).
async fn get_with_header(api: &Api, path: &str, authorization: Option<&str>) -> Resp {
    api.get_with_authorization(path, authorization).await
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

/// Creates a session and reads it back with `token`; both must succeed.
async fn create_and_read(api: &Api, token: &str, org: &str) {
    let created = api
        .create_session(token, json!({"label": "auth test"}))
        .await;
    assert_eq!(created["organizationId"], org, "{created}");
    let id = created["id"].as_str().expect("id");
    let got = api.get(&format!("{SESSIONS}/{id}"), token).await;
    assert_eq!(got.assert_status(200)["id"], id);
    let list = api.get(SESSIONS, token).await;
    let sessions = list.assert_status(200)["sessions"]
        .as_array()
        .expect("sessions")
        .clone();
    assert!(sessions.iter().any(|s| s["id"] == id), "{sessions:?}");
}

// ---------------------------------------------------------------------------------------------
// JWTs

#[tokio::test]
async fn valid_es256_jwt_can_create_and_read_a_session() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let org = org();
    let token = key.sign(&claims(&org, "user-1", "owner"));
    create_and_read(&api, &token, &org).await;
}

#[tokio::test]
async fn valid_rs256_jwt_can_create_and_read_a_session() {
    let env = TestEnv::new().await;
    let key = SigningKey::rs256("rs-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let org = org();
    let token = key.sign(&claims(&org, "user-1", "owner"));
    create_and_read(&api, &token, &org).await;
}

#[tokio::test]
async fn expired_jwt_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let mut c = claims(&org(), "user-1", "owner");
    let now = now_secs();
    c["iat"] = json!(now - 3_700);
    c["nbf"] = json!(now - 3_700);
    c["exp"] = json!(now - 120);
    api.get(SESSIONS, &key.sign(&c))
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn jwt_not_yet_valid_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let mut c = claims(&org(), "user-1", "owner");
    c["nbf"] = json!(now_secs() + 300);
    api.get(SESSIONS, &key.sign(&c))
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn jwt_for_another_audience_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let mut c = claims(&org(), "user-1", "owner");
    c["aud"] = json!("some-other-api");
    api.get(SESSIONS, &key.sign(&c))
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn jwt_from_another_issuer_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let mut c = claims(&org(), "user-1", "owner");
    c["iss"] = json!("someone-else");
    api.get(SESSIONS, &key.sign(&c))
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn jwt_with_unknown_kid_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let stranger = SigningKey::es256("not-in-the-jwks");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let token = stranger.sign(&claims(&org(), "user-1", "owner"));
    api.get(SESSIONS, &token)
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn unsigned_alg_none_jwt_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let header = json!({"alg": "none", "typ": "JWT", "kid": key.kid});
    let token = format!(
        "{}.{}.",
        b64(&header),
        b64(&claims(&org(), "user-1", "owner"))
    );
    api.get(SESSIONS, &token)
        .await
        .assert_error(401, "unauthorized");
    // Also refused when spelled differently, or with some bytes where the signature goes.
    let header = json!({"alg": "None", "typ": "JWT", "kid": key.kid});
    let token = format!(
        "{}.{}.AAAA",
        b64(&header),
        b64(&claims(&org(), "user-1", "owner"))
    );
    api.get(SESSIONS, &token)
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn hs256_jwt_with_a_known_kid_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let c = claims(&org(), "user-1", "owner");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    // A random secret, and the classic confusion: the public key's JSON as the HMAC secret.
    for secret in [
        b"some shared secret".to_vec(),
        serde_json::to_vec(&key.jwk).expect("json"),
    ] {
        let token =
            jsonwebtoken::encode(&header, &c, &EncodingKey::from_secret(&secret)).expect("sign");
        api.get(SESSIONS, &token)
            .await
            .assert_error(401, "unauthorized");
    }
}

#[tokio::test]
async fn tampered_jwt_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let token = key.sign(&claims(&org(), "user-1", "member"));
    // The untouched token works: the refusal below is the tampering's doing.
    api.get(SESSIONS, &token).await.assert_status(200);
    let mut parts = token.split('.');
    let (header, payload, signature) = (
        parts.next().expect("header"),
        parts.next().expect("payload"),
        parts.next().expect("signature"),
    );
    let mut c: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("claims");
    c["role"] = json!("owner");
    let forged = format!("{header}.{}.{signature}", b64(&c));
    api.get(SESSIONS, &forged)
        .await
        .assert_error(401, "unauthorized");
    api.post(SESSIONS, &forged, Some(&json!({"label": "forged"})))
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn jwt_without_organization_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let mut c = claims(&org(), "user-1", "owner");
    c.as_object_mut().expect("object").remove("org");
    api.get(SESSIONS, &key.sign(&c))
        .await
        .assert_error(401, "unauthorized");
    // An empty organization is no organization.
    c["org"] = json!("");
    api.get(SESSIONS, &key.sign(&c))
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn member_jwt_can_read_but_not_create_sessions() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let org = org();
    let owner = key.sign(&claims(&org, "owner-1", "owner"));
    let member = key.sign(&claims(&org, "member-1", "member"));
    let created = api.create_session(&owner, json!({"label": "shared"})).await;
    let id = created["id"].as_str().expect("id");
    api.get(SESSIONS, &member).await.assert_status(200);
    api.get(&format!("{SESSIONS}/{id}"), &member)
        .await
        .assert_status(200);
    api.post(SESSIONS, &member, Some(&json!({"label": "nope"})))
        .await
        .assert_error(403, "forbidden");
}

#[tokio::test]
async fn garbage_bearer_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    for garbage in ["garbage", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.e30.", "gwk_short"] {
        let r = api.get(SESSIONS, garbage).await;
        r.assert_error(401, "unauthorized");
    }
}

#[tokio::test]
async fn missing_authorization_is_401_with_www_authenticate() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let r = get_with_header(&api, SESSIONS, None).await;
    r.assert_error(401, "unauthorized");
    let challenge = r
        .headers
        .get(reqwest::header::WWW_AUTHENTICATE)
        .expect("WWW-Authenticate on a 401")
        .to_str()
        .expect("ascii");
    assert!(
        challenge.starts_with("Bearer"),
        "WWW-Authenticate: {challenge}"
    );
}

#[tokio::test]
async fn the_dev_jwks_is_routed_only_where_the_dev_key_is_set() {
    let env = TestEnv::new().await;
    let plain = env.start_api(|_| {}).await;
    get_with_header(&plain, "/dev/jwks.json", None)
        .await
        .assert_error(404, "not_found");

    let pem = std::env::temp_dir().join(format!("gw-dev-key-{}.pem", unique()));
    std::fs::write(&pem, shared::devtoken::generate_pem().expect("a key")).expect("written");
    let dev = env
        .start_api(|c| c.dev_jwt_key_file = Some(pem.display().to_string()))
        .await;
    let r = get_with_header(&dev, "/dev/jwks.json", None).await;
    let _ = std::fs::remove_file(&pem);
    assert_eq!(
        r.assert_status(200)["keys"][0]["kid"],
        shared::devtoken::DEV_KEY_ID
    );
}

#[tokio::test]
async fn basic_authorization_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwt_api(&env, &[&key]).await;
    let r = get_with_header(&api, SESSIONS, Some("Basic dXNlcjpwYXNzd29yZA==")).await;
    r.assert_error(401, "unauthorized");
    // A valid token behind the wrong scheme is no better.
    let token = key.sign(&claims(&org(), "user-1", "owner"));
    get_with_header(&api, SESSIONS, Some(&format!("Basic {token}")))
        .await
        .assert_error(401, "unauthorized");
    // An empty bearer.
    get_with_header(&api, SESSIONS, Some("Bearer "))
        .await
        .assert_error(401, "unauthorized");
}

// ---------------------------------------------------------------------------------------------
// JWKS rotation

#[tokio::test]
async fn jwt_from_a_rotated_in_key_is_accepted_after_the_jwks_changes() {
    let env = TestEnv::new().await;
    let old = SigningKey::es256("k-old");
    let new = SigningKey::es256("k-new");
    let (jwks, api) = jwt_api(&env, &[&old]).await;
    let org = org();
    api.get(SESSIONS, &old.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_status(200);
    let token = new.sign(&claims(&org, "user-1", "owner"));
    api.get(SESSIONS, &token)
        .await
        .assert_error(401, "unauthorized");
    jwks.set_keys(vec![old.jwk.clone(), new.jwk.clone()]);
    api.get(SESSIONS, &token).await.assert_status(200);
    // The old key still works alongside.
    api.get(SESSIONS, &old.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_status(200);
}

#[tokio::test]
async fn a_key_added_to_the_jwks_right_after_a_fetch_is_accepted_on_first_use() {
    let env = TestEnv::new().await;
    let old = SigningKey::es256("k-old");
    let new = SigningKey::es256("k-new");
    // The product's default refresh budget.
    let (jwks, api) = jwks::jwt_api(&env, &[&old], |_| {}).await;
    let org = org();
    api.get(SESSIONS, &old.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_status(200);
    // The api fetched the JWKS when it started (its timer), or for the first token.
    let fetched = jwks.fetches();
    assert!((1..=2).contains(&fetched), "{fetched}");
    // The frontend rotates a key in and a user signs in with it at once.
    jwks.set_keys(vec![old.jwk.clone(), new.jwk.clone()]);
    api.get(SESSIONS, &new.sign(&claims(&org, "user-2", "owner")))
        .await
        .assert_status(200);
    assert_eq!(jwks.fetches(), fetched + 1);
    // Known keys are served from the cache.
    for key in [&old, &new] {
        api.get(SESSIONS, &key.sign(&claims(&org, "user-1", "owner")))
            .await
            .assert_status(200);
    }
    assert_eq!(jwks.fetches(), fetched + 1);
}

/// A token signed by `key` but naming `kid`, which the JWKS does not serve.
fn forged_kid_token(key: &SigningKey, org: &str, kid: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims(org, "user-1", "owner"), &key.key).expect("sign")
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_at_most_the_refresh_burst_in_jwks_fetches() {
    const BURST: u32 = 3;
    let env = TestEnv::new().await;
    let key = SigningKey::es256("k-1");
    let (jwks, api) = jwks::jwt_api(&env, &[&key], |c| jwks_refresh_budget(c, BURST)).await;
    let org = org();
    // The api's own timer fetched once at start; count what the flood costs.
    api.get(SESSIONS, &key.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_status(200);
    let before = jwks.fetches();
    let forged: Vec<String> = (0..200)
        .map(|i| {
            // Each token names a kid the JWKS has never served (the signature does not matter).
            forged_kid_token(&key, &org, &format!("forged-{i}-{}", unique()))
        })
        .collect();
    // Half of them at once (misses coalesce onto one fetch), half one after another.
    let (at_once, in_turn) = forged.split_at(100);
    let answers = futures::future::join_all(at_once.iter().map(|t| api.get(SESSIONS, t))).await;
    for r in answers {
        r.assert_error(401, "unauthorized");
    }
    for t in in_turn {
        api.get(SESSIONS, t).await.assert_error(401, "unauthorized");
    }
    let fetches = jwks.fetches() - before;
    assert!(
        (1..=BURST as usize).contains(&fetches),
        "{fetches} JWKS fetches for 200 unknown kids with a burst of {BURST}"
    );
    // The known key keeps working throughout.
    api.get(SESSIONS, &key.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_status(200);
}

// ---------------------------------------------------------------------------------------------
// Claim names

#[tokio::test]
async fn organization_and_role_claim_names_are_configurable() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("es-1");
    let (_jwks, api) = jwks::jwt_api(&env, &[&key], |c| {
        unlimited_jwks_refreshes(c);
        c.auth_org_claim = "tenant".into();
        c.auth_role_claim = "r".into();
    })
    .await;
    let org = org();
    let now = now_secs();
    let custom = json!({"sub": "user-1", "tenant": org, "r": "admin", "iss": "gateway-dev",
        "aud": "gateway-api", "iat": now, "nbf": now, "exp": now + 3600});
    create_and_read(&api, &key.sign(&custom), &org).await;
    // The default claim names mean nothing under this configuration.
    api.get(SESSIONS, &key.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_error(401, "unauthorized");
    // And the role comes from "r": a viewer there cannot create, whatever "role" says.
    let mut viewer = custom.clone();
    viewer["r"] = json!("viewer");
    viewer["role"] = json!("owner");
    let viewer = key.sign(&viewer);
    api.get(SESSIONS, &viewer).await.assert_status(200);
    api.post(SESSIONS, &viewer, Some(&json!({"label": "nope"})))
        .await
        .assert_error(403, "forbidden");
}

// ---------------------------------------------------------------------------------------------
// API keys

#[tokio::test]
async fn valid_api_key_can_create_and_read_a_session() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let org = org();
    let key = env.api_key(&org, &["read", "manage"]).await;
    create_and_read(&api, &key, &org).await;
}

#[tokio::test]
async fn unknown_api_key_is_401() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = format!("gwk_{}_{}", ulid::Ulid::new(), "ab".repeat(32));
    assert!(
        shared::auth::api_key_id(&key).is_some(),
        "the key is well-formed"
    );
    api.get(SESSIONS, &key)
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn api_key_with_a_wrong_secret_is_401() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key(&org(), &["read", "manage"]).await;
    let id = shared::auth::api_key_id(&key)
        .expect("well-formed")
        .to_owned();
    let wrong = format!("{id}_{}", "0".repeat(64));
    assert_ne!(wrong, key);
    // Before the real key is cached, and after.
    api.get(SESSIONS, &wrong)
        .await
        .assert_error(401, "unauthorized");
    api.get(SESSIONS, &key).await.assert_status(200);
    api.get(SESSIONS, &wrong)
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn expired_api_key_is_401() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env
        .api_key_expiring(
            &org(),
            &["read", "manage"],
            Some(shared::db::now_ms() - 60_000),
        )
        .await;
    api.get(SESSIONS, &key)
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn revoked_api_key_stops_working_within_the_cache_ttl() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key(&org(), &["read", "manage"]).await;
    api.get(SESSIONS, &key).await.assert_status(200);
    let id = shared::auth::api_key_id(&key).expect("well-formed");
    let revoked =
        shared::store::api_keys::revoke(&env.db.get().await.expect("db"), id, shared::db::now_ms())
            .await
            .expect("revoke");
    assert!(revoked);
    eventually(Duration::from_secs(3), || async {
        api.get(SESSIONS, &key).await.status == 401
    })
    .await;
    api.get(SESSIONS, &key)
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn read_only_api_key_cannot_change_anything() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let org = org();
    let manage = env.api_key(&org, &["read", "manage"]).await;
    let read = env.api_key(&org, &["read"]).await;
    let created = api.create_session(&manage, json!({"label": "mine"})).await;
    let id = created["id"].as_str().expect("id");
    let one = format!("{SESSIONS}/{id}");

    api.get(SESSIONS, &read).await.assert_status(200);
    api.get(&one, &read).await.assert_status(200);
    api.post(SESSIONS, &read, Some(&json!({"label": "nope"})))
        .await
        .assert_error(403, "forbidden");
    api.patch(&one, &read, &json!({"label": "renamed"}))
        .await
        .assert_error(403, "forbidden");
    api.delete(&one, &read).await.assert_error(403, "forbidden");
    for action in ["logout", "start", "stop", "restart"] {
        api.post(&format!("{one}:{action}"), &read, None)
            .await
            .assert_error(403, "forbidden");
    }
    api.post(
        &format!("{one}:requestPairingCode"),
        &read,
        Some(&json!({"phoneNumber": "6281234567890"})),
    )
    .await
    .assert_error(403, "forbidden");
    api.get(&format!("{one}/qr"), &read)
        .await
        .assert_error(403, "forbidden");

    // Nothing changed.
    let after = api.get(&one, &manage).await;
    assert_eq!(after.assert_status(200)["label"], "mine");
}

// ---------------------------------------------------------------------------------------------
// Organizations

#[tokio::test]
async fn another_organizations_session_is_404_on_every_route() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let org_a = org();
    let org_b = org();
    let a = env.api_key(&org_a, &["read", "manage"]).await;
    let b = env.api_key(&org_b, &["read", "manage"]).await;
    let b_read = env.api_key(&org_b, &["read"]).await;
    let gw = env.gateway_id("sg");
    let _worker = env.start_worker(&gw, |_| {}).await;
    let created = api
        .create_session(&a, json!({"label": "org a's", "gatewayId": gw}))
        .await;
    let id = created["id"].as_str().expect("id");
    let one = format!("{SESSIONS}/{id}");
    // Org A's own command first: the api now remembers where the session lives.
    api.post(&format!("{one}:stop"), &a, None)
        .await
        .assert_status(200);

    api.get(&one, &b).await.assert_error(404, "not_found");
    api.patch(&one, &b, &json!({"label": "hijacked"}))
        .await
        .assert_error(404, "not_found");
    api.delete(&one, &b).await.assert_error(404, "not_found");
    for action in ["start", "stop", "restart", "logout"] {
        let r = api.post(&format!("{one}:{action}"), &b, None).await;
        assert_eq!(r.status, 404, ":{action} → {:?}", r.body);
        r.assert_error(404, "not_found");
    }
    api.post(
        &format!("{one}:requestPairingCode"),
        &b,
        Some(&json!({"phoneNumber": "6281234567890"})),
    )
    .await
    .assert_error(404, "not_found");
    api.get(&format!("{one}/qr"), &b)
        .await
        .assert_error(404, "not_found");
    api.get(&format!("/api/v1/events?session={id}"), &b)
        .await
        .assert_error(404, "not_found");

    let list = api.get(SESSIONS, &b).await;
    let sessions = list.assert_status(200)["sessions"]
        .as_array()
        .expect("sessions")
        .clone();
    assert!(
        sessions.iter().all(|s| s["id"] != id),
        "org B sees org A's session: {sessions:?}"
    );

    api.get(&one, &b_read).await.assert_error(404, "not_found");
    let (command_id,): (String,) = {
        let row = env
            .db
            .get()
            .await
            .expect("db")
            .query_one("SELECT id FROM commands WHERE session_id = $1", &[&id])
            .await
            .expect("org A's command");
        (row.get(0),)
    };
    let command = format!("/api/v1/commands/{command_id}");
    api.get(&command, &b).await.assert_error(404, "not_found");
    assert_eq!(
        api.get(&command, &a).await.assert_status(200)["kind"],
        "stop"
    );

    // Org A's session is untouched: not renamed, not deleted, only its own command recorded.
    let after = api.get(&one, &a).await;
    assert_eq!(after.assert_status(200)["label"], "org a's");
    assert_eq!(
        env.commands_of(id).await,
        vec![("stop".into(), "succeeded".into(), None)]
    );
}

/// A JWKS endpoint that can be taken down (it then answers 500), counting every request.
struct FlakyJwks {
    url: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FlakyJwks {
    async fn start(keys: Vec<Value>) -> FlakyJwks {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        };
        let up = Arc::new(AtomicBool::new(true));
        let requests = Arc::new(AtomicUsize::new(0));
        let (u, r) = (up.clone(), requests.clone());
        let body = json!({ "keys": keys });
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (u, r, body) = (u.clone(), r.clone(), body.clone());
                async move {
                    use axum::response::IntoResponse;
                    r.fetch_add(1, Ordering::SeqCst);
                    if u.load(Ordering::SeqCst) {
                        axum::Json(body).into_response()
                    } else {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        FlakyJwks {
            url: format!("http://{addr}/jwks.json"),
            up,
            requests,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_jwks_outage_neither_logs_users_out_nor_lifts_the_refresh_budget() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("k-1");
    let jwks = FlakyJwks::start(vec![key.jwk.clone()]).await;
    let url = jwks.url.clone();
    let api = env
        .start_api(move |c| {
            c.auth_jwks_url = Some(url);
            // The first token's fetch (if the timer's did not come first) leaves one in the
            // bucket.
            jwks_refresh_budget(c, 2);
            // The timer's next fetch is a minute away: every attempt below is a request's.
            c.auth_jwks_max_age_secs = 120;
        })
        .await;
    let org = org();
    let token = key.sign(&claims(&org, "user-1", "owner"));
    api.get(SESSIONS, &token).await.assert_status(200);
    jwks.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let before = jwks.requests();
    for i in 0..10 {
        // Cached keys keep serving while the JWKS is down...
        api.get(SESSIONS, &token).await.assert_status(200);
        // ...and unknown kids are still refused.
        let forged = SigningKey::es256(&format!("forged-{i}"));
        api.get(SESSIONS, &forged.sign(&claims(&org, "user-1", "owner")))
            .await
            .assert_error(401, "unauthorized");
    }
    // A failed fetch draws on the bucket too, so the one token left is all there is (the
    // bucket refills once a minute, so a slow run may see a second attempt).
    let attempts = jwks.requests() - before;
    assert!(
        attempts <= 2,
        "{attempts} JWKS requests for 20 api requests during an outage"
    );
}

#[tokio::test]
async fn the_bearer_scheme_name_is_case_insensitive() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key(&org(), &["read"]).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = get_with_header(&api, SESSIONS, Some(&format!("{scheme} {key}"))).await;
        assert_eq!(r.status, 200, "{scheme}: {}", r.body);
    }
}

#[tokio::test]
async fn a_read_only_key_gets_403_whatever_the_body_holds() {
    let env = TestEnv::new().await;
    let api = env.start_api(|_| {}).await;
    let org = org();
    let manager = env.api_key(&org, &["read", "manage"]).await;
    let reader = env.api_key(&org, &["read"]).await;
    let s = api
        .create_session(&manager, json!({"label": "x", "gatewayId": "gw-sg-1"}))
        .await;
    let id = s["id"].as_str().expect("id");
    let junk = json!({"no": "such field"});
    api.post(SESSIONS, &reader, Some(&junk))
        .await
        .assert_error(403, "forbidden");
    api.patch(&format!("{SESSIONS}/{id}"), &reader, &junk)
        .await
        .assert_error(403, "forbidden");
    api.post(
        &format!("{SESSIONS}/{id}:requestPairingCode"),
        &reader,
        Some(&junk),
    )
    .await
    .assert_error(403, "forbidden");
}

#[tokio::test]
async fn forged_kids_do_not_delay_the_refusal_of_a_key_the_jwks_removed() {
    let env = TestEnv::new().await;
    let removed = SigningKey::es256("k-removed");
    let kept = SigningKey::es256("k-kept");
    let (jwks, api) = jwks::jwt_api(&env, &[&removed, &kept], |c| {
        // One fetch a minute for unknown kids: the flood below empties it at once.
        jwks_refresh_budget(c, 1);
        c.auth_jwks_max_age_secs = 2;
    })
    .await;
    let org = org();
    let token = removed.sign(&claims(&org, "user-1", "owner"));
    api.get(SESSIONS, &token).await.assert_status(200);
    for i in 0..200 {
        let t = forged_kid_token(&kept, &org, &format!("forged-{i}-{}", unique()));
        api.get(SESSIONS, &t)
            .await
            .assert_error(401, "unauthorized");
    }
    // The identity provider removes the key: refused within AUTH_JWKS_MAX_AGE_SECS (2 s),
    // bucket empty or not.
    jwks.set_keys(vec![kept.jwk.clone()]);
    eventually(Duration::from_secs(5), || async {
        api.get(SESSIONS, &token).await.status == 401
    })
    .await;
    api.get(SESSIONS, &kept.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_status(200);
}

#[tokio::test]
async fn keys_the_jwks_could_not_refresh_past_the_hard_maximum_age_answer_503() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("k-1");
    let jwks = FlakyJwks::start(vec![key.jwk.clone()]).await;
    let url = jwks.url.clone();
    let api = env
        .start_api(move |c| {
            c.auth_jwks_url = Some(url);
            c.auth_jwks_max_age_secs = 1;
            c.auth_jwks_hard_max_age_secs = 2;
        })
        .await;
    let org = org();
    let token = key.sign(&claims(&org, "user-1", "owner"));
    api.get(SESSIONS, &token).await.assert_status(200);
    jwks.up.store(false, std::sync::atomic::Ordering::SeqCst);
    // Served from the cache for a while, then refused as a fault, not as a bad token.
    eventually(Duration::from_secs(6), || async {
        api.get(SESSIONS, &token).await.status == 503
    })
    .await;
    api.get(SESSIONS, &token)
        .await
        .assert_error(503, "gateway_unavailable");
    // Back once the JWKS answers again.
    jwks.up.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(Duration::from_secs(5), || async {
        api.get(SESSIONS, &token).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn a_forged_kid_is_remembered_as_a_miss_and_costs_one_fetch() {
    let env = TestEnv::new().await;
    let key = SigningKey::es256("k-1");
    // A large burst, refilled once a minute: a miss is remembered for that minute.
    let (jwks, api) = jwks::jwt_api(&env, &[&key], |c| jwks_refresh_budget(c, 1_000)).await;
    let org = org();
    api.get(SESSIONS, &key.sign(&claims(&org, "user-1", "owner")))
        .await
        .assert_status(200);
    let before = jwks.fetches();
    let forged = forged_kid_token(&key, &org, &format!("forged-{}", unique()));
    for _ in 0..20 {
        api.get(SESSIONS, &forged)
            .await
            .assert_error(401, "unauthorized");
    }
    // Tokens enough for all 20: only the memory of the miss spares the other 19.
    assert_eq!(jwks.fetches() - before, 1);
}
