//! The fleet: sessions that move between the gateways of a region — drained by an SRE,
//! followed by the commands sent to them — and placement that respects region, state and
//! capacity. Workers that die or freeze are `failover.rs`.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use shared::{fleet::GatewayState, store};
use tests::{Placed, TestEnv, fast_fleet};

pub(crate) const PAIRED: usize = 200;

pub(crate) fn working_on(p: &Placed, gateways: &[&str], since: i64) -> bool {
    gateways.contains(&p.gateway_id.as_str())
        && if p.desired_state == "running" {
            p.status == "working" && p.last_connected_at.is_some_and(|t| t >= since)
        } else {
            p.status == "stopped"
        }
}

/// Starts an in-process worker for `gateway_id` (fast fleet timings, then `tweak`) and waits,
/// up to `limit`, until its sessions work again.
pub(crate) async fn resumed_worker(
    env: &TestEnv,
    gateway_id: &str,
    limit: Duration,
    tweak: impl FnOnce(&mut worker::Config),
) -> tests::Worker {
    let started = shared::db::now_ms();
    let worker = env
        .start_worker(gateway_id, |c| {
            fast_fleet(c);
            tweak(c);
        })
        .await;
    env.all_sessions(limit, "back on their gateway", |p| {
        working_on(p, &[gateway_id], started)
    })
    .await;
    worker
}

/// The pairing of each session (phone number, JID), by id: what must survive a move.
pub(crate) fn pairings(placed: &[Placed]) -> Vec<(String, Option<String>, Option<String>)> {
    placed
        .iter()
        .map(|p| (p.id.clone(), p.phone_number.clone(), p.wa_jid.clone()))
        .collect()
}

pub(crate) async fn set_state(env: &TestEnv, gateway_id: &str, state: GatewayState) {
    let client = env.db.get().await.expect("db");
    assert!(
        store::gateways::set_state(&client, gateway_id, state)
            .await
            .expect("set state")
    );
}

#[tokio::test]
async fn a_drained_gateways_sessions_end_working_on_its_region_peers_with_no_repairing() {
    let env = TestEnv::new().await;
    let (a, b, c) = (
        env.gateway_id("sg"),
        env.gateway_id("sg"),
        env.gateway_id("sg"),
    );
    let elsewhere = env.gateway_id("eu");
    env.paired_sessions("org_a", &a, PAIRED, 4).await;
    let before = pairings(&env.placed().await);
    let _wa = resumed_worker(&env, &a, Duration::from_secs(20), |_| {}).await;
    let _wb = env.start_worker(&b, fast_fleet).await;
    let _wc = env.start_worker(&c, fast_fleet).await;
    let _we = env.start_worker(&elsewhere, fast_fleet).await;

    let drained_at = shared::db::now_ms();
    set_state(&env, &a, GatewayState::Draining).await;
    env.all_sessions(Duration::from_secs(30), "moved to a peer", |p| {
        working_on(p, &[&b, &c], drained_at)
    })
    .await;

    let after = env.placed().await;
    assert_eq!(pairings(&after), before, "the same numbers, no re-pairing");
    let on_b = after.iter().filter(|p| p.gateway_id == b).count();
    assert!(
        on_b > PAIRED / 4 && on_b < PAIRED * 3 / 4,
        "spread over both peers by load: {on_b} of {PAIRED} on one"
    );
    // The drained gateway stays draining and empty: no new session is placed on it.
    let gateways = store::gateways::list(&env.db.get().await.expect("db"))
        .await
        .expect("list")
        .0;
    let ga = gateways.iter().find(|g| g.id == a).expect("gateway a");
    assert_eq!(ga.state, GatewayState::Draining);
    assert_eq!(ga.note, None, "nothing failed to move");
    assert_eq!(
        env.sim_conflicts().await,
        Vec::<String>::new(),
        "never two connections"
    );
}

#[tokio::test]
async fn a_command_sent_to_a_session_that_moved_is_followed_to_its_new_owner() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    let wa = env.start_worker(&a, fast_fleet).await;
    let _wb = env.start_worker(&b, fast_fleet).await;
    let api = env.start_api(|c| c.session_cache_ttl_ms = 60_000).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let (first, second) = (
        api.session_on(&key, &a).await,
        api.session_on(&key, &a).await,
    );
    // The api now remembers both routes to `a`.
    for id in [&first, &second] {
        api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
            .await
            .assert_status(200);
    }

    set_state(&env, &a, GatewayState::Draining).await;
    env.all_sessions(Duration::from_secs(10), "moved", |p| p.gateway_id == b)
        .await;
    // `a` is alive and answers "moved": the api follows to `b`, invisibly.
    let s = api
        .post(&format!("/api/v1/sessions/{first}:start"), &key, None)
        .await;
    assert_eq!(s.assert_status(200)["gatewayId"], b.as_str());
    assert_eq!(s.body["desiredState"], "running");

    // With `a` gone (and the api's fleet snapshot, refreshed every 200 ms here, knowing it),
    // its stale route is read again rather than answered 503.
    wa.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = api
        .post(&format!("/api/v1/sessions/{second}:start"), &key, None)
        .await;
    assert_eq!(s.assert_status(200)["gatewayId"], b.as_str());
    for id in [&first, &second] {
        let statuses: Vec<_> = env.commands_of(id).await;
        assert!(
            statuses.iter().all(|(_, status, _)| status == "succeeded") && statuses.len() == 2,
            "each command recorded once, as run by the owner: {statuses:?}"
        );
    }
}

/// The Kubernetes API as a gateway pod's preStop reads it: a StatefulSet of `replicas` pods
/// from ordinal `start`, over HTTPS with a CA of its own (`openssl s_server -WWW` serving the
/// object), and a service account directory (token, namespace, CA) as Kubernetes mounts it.
struct KubeApi {
    server: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl KubeApi {
    fn start(statefulset: &str, start: u64, replicas: u64) -> KubeApi {
        let dir = std::env::temp_dir().join(format!("gw-kube-{}", tests::unique()));
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let made = std::process::Command::new(repo.join("deploy/tls/make-ca"))
            .arg(dir.join("tls"))
            .arg("127.0.0.1")
            .output()
            .expect("make-ca runs");
        assert!(made.status.success(), "{made:?}");
        let account = dir.join("account");
        std::fs::create_dir_all(&account).expect("account");
        std::fs::write(account.join("token"), "the-pods-token").expect("token");
        std::fs::write(account.join("namespace"), "gateways\n").expect("namespace");
        std::fs::copy(dir.join("tls/ca.pem"), account.join("ca.crt")).expect("ca");
        let objects = dir.join("www/apis/apps/v1/namespaces/gateways/statefulsets");
        std::fs::create_dir_all(&objects).expect("www");
        std::fs::write(
            objects.join(statefulset),
            json!({"kind": "StatefulSet", "metadata": {"name": statefulset},
                "spec": {"replicas": replicas, "ordinals": {"start": start}}})
            .to_string(),
        )
        .expect("object");
        let port = tests::free_port();
        let server = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join("tls/server.pem"))
            .arg("-key")
            .arg(dir.join("tls/server.key"))
            .current_dir(dir.join("www"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server runs");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "the Kubernetes API never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        KubeApi { server, dir, port }
    }

    /// What a pod's environment says of the API and its service account.
    fn vars(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("KUBERNETES_SERVICE_HOST", Some("127.0.0.1".into())),
            ("KUBERNETES_SERVICE_PORT", Some(self.port.to_string())),
            (
                "SERVICE_ACCOUNT_DIR",
                Some(self.dir.join("account").display().to_string()),
            ),
        ]
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn the_pre_stop_hook_restarts_the_pods_a_statefulset_keeps_and_drains_those_it_drops() {
    let env = TestEnv::new().await;
    // gw-…-1 and gw-…-2 of a StatefulSet scaled from 2 to 1 (ordinals from 1).
    let [kept, dropped] = env.gateway_pods("sg", [1, 2]);
    let ids = env.paired_sessions("org_a", &dropped, 12, 0).await;
    let _wk = env.start_worker(&kept, fast_fleet).await;
    let _wd = resumed_worker(&env, &dropped, Duration::from_secs(15), |_| {}).await;
    let kube = KubeApi::start("gw-sg", 1, 1);
    let vars = kube.vars();
    let vars: Vec<(&str, Option<&str>)> = vars.iter().map(|(k, v)| (*k, v.as_deref())).collect();
    let pre_stop = |id: &str| {
        let (env, vars, id) = (&env, &vars, id.to_owned());
        async move {
            gatewayctl_with(
                env,
                vars,
                &[
                    "gateways",
                    "pre-stop",
                    &id,
                    "--statefulset",
                    "gw-sg",
                    "--timeout-secs",
                    "30",
                ],
            )
            .await
        }
    };

    // The pod the StatefulSet keeps: a restart, nothing changes.
    let (ok, out) = pre_stop(&kept).await;
    assert!(
        ok && out.contains("stays in gw-sg (1 replicas): a restart"),
        "{out}"
    );
    let (ok, out) = gatewayctl(&env, &["gateways", "list"]).await;
    assert!(ok, "{out}");
    // The pod it dropped: decommissioned, drained to the peer, before the hook returns.
    let (ok, out) = pre_stop(&dropped).await;
    assert!(
        ok && out.contains("beyond gw-sg's 1 replicas: decommissioning"),
        "{out}"
    );
    let client = env.db.get().await.expect("db");
    let on_kept: i64 = client
        .query_one(
            "SELECT count(*) FROM sessions WHERE id = ANY($1) AND gateway_id = $2",
            &[&ids, &kept],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        on_kept,
        ids.len() as i64,
        "every session moved to the pod kept"
    );
    // Decommissioning until its worker stops and removes it.
    let state: Option<String> = client
        .query_opt("SELECT state FROM gateways WHERE id = $1", &[&dropped])
        .await
        .expect("gateway")
        .map(|r| r.get(0));
    assert!(
        state.as_deref().is_none_or(|s| s == "decommissioning"),
        "{state:?}"
    );
    // A pod that cannot reach the API fails its hook, saying why (the stop goes on as a
    // restart: Kubernetes stops the pod anyway).
    drop(kube);
    let (ok, out) = pre_stop(&kept).await;
    assert!(
        !ok && out.contains("cannot read StatefulSet gw-sg"),
        "{out}"
    );
}

#[tokio::test]
async fn a_command_in_flight_during_a_drain_is_answered_never_404_or_500() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    let ids = env.paired_sessions("org_a", &a, 40, 0).await;
    let _wa = env.start_worker(&a, fast_fleet).await;
    let _wb = env.start_worker(&b, fast_fleet).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    // Restarts keep going to every session while the drain moves them.
    let requests: Vec<_> = ids
        .iter()
        .flat_map(|id| (0..3).map(move |_| id.clone()))
        .map(|id| api.post_in_background(&format!("/api/v1/sessions/{id}:restart"), &key))
        .collect();
    set_state(&env, &a, GatewayState::Draining).await;
    for r in requests {
        let r = r.await.expect("request");
        assert_eq!(
            r.status, 200,
            "a restart during the drain answered {}",
            r.body
        );
    }
    env.all_sessions(Duration::from_secs(20), "moved and working", |p| {
        p.gateway_id == b && p.status == "working"
    })
    .await;
    for id in &ids[..5] {
        let r = api
            .post(&format!("/api/v1/sessions/{id}:restart"), &key, None)
            .await;
        assert_eq!(r.assert_status(200)["gatewayId"], b.as_str());
    }
}

#[tokio::test]
async fn a_session_of_a_dead_gateway_answers_503_with_retry_after_while_its_lease_holds() {
    let env = TestEnv::new().await;
    let a = env.gateway_id("sg");
    let wa = env
        .start_worker(&a, |c| {
            fast_fleet(c);
            c.lease_ttl_ms = 30_000;
        })
        .await;
    let api = env.start_api(|c| c.gateway_liveness_ms = 1_000).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &a).await;
    api.post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await
        .assert_status(200);
    wa.kill().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let r = api
        .post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await;
    r.assert_error(503, "gateway_unavailable");
    let retry_after = r.retry_after();
    assert!(
        (20..=33).contains(&retry_after),
        "about the lease's 30 s left: {retry_after}"
    );
    assert_eq!(r.body["error"]["details"]["gatewayId"], a.as_str());
}

#[tokio::test]
async fn placement_respects_region_state_and_capacity() {
    let env = TestEnv::new().await;
    let roomy = env.gateway_id("sg");
    let full = env.gateway_id("sg");
    let cordoned = env.gateway_id("sg");
    let draining = env.gateway_id("sg");
    let other_region = env.gateway_id("eu");
    env.fake_gateway(&roomy, 100).await;
    env.fake_gateway(&full, 1).await;
    env.fake_gateway(&cordoned, 1_000).await;
    env.fake_gateway(&draining, 1_000).await;
    env.fake_gateway(&other_region, 1_000).await;
    set_state(&env, &cordoned, GatewayState::Cordoned).await;
    set_state(&env, &draining, GatewayState::Draining).await;
    env.paired_sessions("org_b", &full, 1, 0).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;

    for _ in 0..5 {
        let s = api
            .create_session(&key, json!({"label": "x", "region": "sg"}))
            .await;
        assert_eq!(s["gatewayId"], roomy.as_str());
    }
    for pinned in [&cordoned, &draining] {
        api.post(
            "/api/v1/sessions",
            &key,
            Some(&json!({"label": "x", "gatewayId": pinned})),
        )
        .await
        .assert_error(409, "conflict");
    }
    set_state(&env, &roomy, GatewayState::Cordoned).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.post(
        "/api/v1/sessions",
        &key,
        Some(&json!({"label": "x", "region": "sg"})),
    )
    .await
    .assert_error(503, "gateway_unavailable");

    let view = api.get("/api/v1/gateways", &key).await;
    let gateways = view.assert_status(200)["gateways"]
        .as_array()
        .expect("gateways")
        .clone();
    let g = gateways
        .iter()
        .find(|g| g["id"] == roomy.as_str())
        .expect("listed");
    assert_eq!(g["state"], "cordoned");
    assert_eq!(g["region"], "sg");
    assert_eq!(g["sessionCount"], 5);
    assert!(g["heartbeatAgeMs"].as_i64().is_some());
    // The fleet's internals are the operators'.
    for internal in ["capacity", "load", "liveSessions", "version", "note"] {
        assert!(
            g.get(internal).is_none(),
            "{internal} shown to a tenant: {g}"
        );
    }
    // Only the gateways of the caller's own sessions: `full` holds org_b's.
    let ids: Vec<&str> = gateways.iter().filter_map(|g| g["id"].as_str()).collect();
    assert_eq!(ids, vec![roomy.as_str()]);
}

#[tokio::test]
async fn a_tenant_sees_nothing_of_another_tenants_gateways_nor_a_drains_note() {
    let env = TestEnv::new().await;
    let (theirs, shared_gw) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.fake_gateway(&theirs, 100).await;
    env.fake_gateway(&shared_gw, 100).await;
    let secret = env.paired_sessions("org_b", &theirs, 3, 0).await;
    env.paired_sessions("org_b", &shared_gw, 1, 0).await;
    env.paired_sessions("org_a", &shared_gw, 2, 0).await;
    // A drain's note names sessions of every organization.
    store::gateways::set_note(
        &env.db.get().await.expect("db"),
        &shared_gw,
        Some(&format!("could not move {}", secret.join(", "))),
    )
    .await
    .expect("note");
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read"]).await;
    let view = api.get("/api/v1/gateways", &key).await;
    let text = view.assert_status(200).to_string();
    assert!(!text.contains(&theirs), "another tenant's gateway: {text}");
    for id in &secret {
        assert!(
            !text.contains(id.as_str()),
            "another tenant's session id: {text}"
        );
    }
    let gateways = view.body["gateways"].as_array().expect("gateways");
    assert_eq!(gateways.len(), 1);
    assert_eq!(gateways[0]["id"], shared_gw.as_str());
    assert_eq!(gateways[0]["sessionCount"], 2, "its own sessions only");
}

#[tokio::test]
async fn the_desired_state_follows_what_the_owner_asked_for() {
    let env = TestEnv::new().await;
    let tests::Stage(_, _worker, api, key, id) = env.stage(fast_fleet, |_| {}).await;
    let path = |action: &str| format!("/api/v1/sessions/{id}:{action}");
    let r = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(r.assert_status(200)["desiredState"], "stopped");
    let r = api.post(&path("start"), &key, None).await;
    assert_eq!(r.assert_status(200)["desiredState"], "running");
    let r = api.post(&path("stop"), &key, None).await;
    assert_eq!(r.assert_status(200)["desiredState"], "stopped");
    // Asking for a QR code starts pairing: the owner wants it running.
    api.request(
        Method::GET,
        &format!("/api/v1/sessions/{id}/qr"),
        Some(&key),
        None,
    )
    .await
    .assert_error(404, "not_found");
    let r = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(r.assert_status(200)["desiredState"], "running");
}

/// Runs `gatewayctl` as an SRE would, against the test's database; (success, output).
pub(crate) async fn gatewayctl(env: &TestEnv, args: &[&str]) -> (bool, String) {
    gatewayctl_with(env, &[], args).await
}

/// [`gatewayctl`] with `vars` set (`None`: removed) in its environment.
pub(crate) async fn gatewayctl_with(
    env: &TestEnv,
    vars: &[(&str, Option<&str>)],
    args: &[&str],
) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(tests::process::binary("gatewayctl"));
    cmd.args(args)
        .env("DATABASE_URL", &env.database_url)
        .env("AMQP_PREFIX", &env.amqp_prefix);
    for (k, v) in vars {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().await.expect("gatewayctl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn an_sre_drains_cordons_and_lists_gateways_with_gatewayctl() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.paired_sessions("org_a", &a, 30, 3).await;
    let _wa = resumed_worker(&env, &a, Duration::from_secs(10), |_| {}).await;

    // No peer yet: the drain says which sessions cannot move, and why.
    let (ok, out) = gatewayctl(&env, &["gateways", "drain", &a, "--timeout-secs", "2"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("30 session(s) still on")
            && out.contains("no active, live gateway in region sg"),
        "{out}"
    );

    // The gateway stays draining: once a peer comes, the sessions move, and the command
    // returns when the gateway is empty.
    let drained_at = shared::db::now_ms();
    let _wb = env.start_worker(&b, fast_fleet).await;
    let (ok, out) = gatewayctl(&env, &["gateways", "drain", &a]).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{a} is drained")), "{out}");
    env.all_sessions(Duration::from_secs(10), "on the peer", |p| {
        working_on(p, &[&b], drained_at)
    })
    .await;

    let (ok, out) = gatewayctl(&env, &["gateways", "cordon", &b]).await;
    assert!(ok && out.contains("cordoned"), "{out}");
    let (ok, out) = gatewayctl(&env, &["gateways", "list"]).await;
    assert!(ok, "{out}");
    let row = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // ID REGION STATE CAPACITY SESSIONS LIVE VERSION HEARTBEAT
    let (ra, rb) = (row(&a), row(&b));
    assert_eq!(&ra[1..5], ["sg", "draining", "1000", "0"], "{out}");
    assert_eq!(&rb[1..5], ["sg", "cordoned", "1000", "30"], "{out}");
    assert_eq!(
        rb[5], "20",
        "running sessions held under a live lease: {out}"
    );
    let (ok, out) = gatewayctl(&env, &["gateways", "uncordon", &a]).await;
    assert!(ok && out.contains("active"), "{out}");
    assert_eq!(env.sim_conflicts().await, Vec::<String>::new());
}

/// The value of the series `name` whose labels include every one of `labels`, from a
/// Prometheus text exposition.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn the_api_publishes_each_gateways_heartbeat_age_capacity_and_state_for_alerts() {
    let env = TestEnv::new().await;
    let (live, crashed, stopped) = (
        env.gateway_id("sg"),
        env.gateway_id("sg"),
        env.gateway_id("eu"),
    );
    env.fake_gateway(&live, 7).await;
    env.fake_gateway(&crashed, 5).await;
    env.fake_gateway(&stopped, 3).await;
    let db = env.db.get().await.expect("db");
    store::gateways::signed_off(&db, &stopped, "fake", 0)
        .await
        .expect("sign off");
    let api = env.start_api(|_| {}).await;

    // The crashed gateway heartbeated once; past the api's liveness (3 s in tests) it is dead
    // while `live` keeps beating.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        store::gateways::heartbeat(&db, &live).await.expect("beat");
        let text = api.metrics_text().await;
        let dead = [("gateway", crashed.as_str()), ("state", "dead")];
        if series(&text, "fleet_gateway_state", &dead) == Some(1.0) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{crashed} never shown dead:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let of = |gw: &str, name: &str| series(&text, name, &[("gateway", gw)]);
    assert_eq!(of(&live, "fleet_gateway_capacity"), Some(7.0), "{text}");
    assert_eq!(of(&crashed, "fleet_gateway_capacity"), Some(5.0));
    let state = |gw: &str, s: &str| {
        series(
            &text,
            "fleet_gateway_state",
            &[("gateway", gw), ("state", s)],
        )
    };
    assert_eq!(state(&live, "active"), Some(1.0));
    assert_eq!(state(&live, "dead"), Some(0.0));
    assert_eq!(state(&crashed, "active"), Some(0.0));
    assert_eq!(
        state(&stopped, "stopped"),
        Some(1.0),
        "a clean exit is no crash"
    );
    assert_eq!(state(&stopped, "dead"), Some(0.0));
    let age = |gw: &str| of(gw, "fleet_gateway_heartbeat_age_seconds").expect("age");
    assert!(age(&live) < 3.0, "{}", age(&live));
    assert!(age(&crashed) >= 3.0, "{}", age(&crashed));
    assert_eq!(age(&stopped), 0.0, "a stopped gateway is not late");
    assert_eq!(
        series(
            &text,
            "fleet_gateway_capacity",
            &[("gateway", &stopped), ("region", "eu")]
        ),
        Some(3.0),
        "labelled by region"
    );
}

/// Sessions on each of `gateways`, in that order.
fn counts_on(placed: &[Placed], gateways: &[&str]) -> Vec<usize> {
    gateways
        .iter()
        .map(|g| placed.iter().filter(|p| p.gateway_id == *g).count())
        .collect()
}

#[tokio::test]
async fn a_new_gateway_takes_its_share_of_the_region_with_no_repairing() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.paired_sessions("org_a", &a, 40, 4).await;
    let before = pairings(&env.placed().await);
    // Capacity 50 each: 40 on one and none on the other are 80 points of capacity apart.
    let rebalancing = |c: &mut worker::Config| {
        fast_fleet(c);
        c.capacity = 50;
        c.rebalance_tolerance = 0.1;
        c.rebalance_moves_per_sec = 20.0;
    };
    let _wa = resumed_worker(&env, &a, Duration::from_secs(10), rebalancing).await;
    let added_at = shared::db::now_ms();
    let _wb = env.start_worker(&b, rebalancing).await;

    // Within 10 % of capacity (5 sessions) of each other: 22 and 18, every running one
    // working where it is, the moved ones connected by their new owner.
    tests::eventually(Duration::from_secs(20), || async {
        counts_on(&env.placed().await, &[&a, &b]) == [22, 18]
    })
    .await;
    env.all_sessions(Duration::from_secs(20), "working where they are", |p| {
        working_on(p, &[&a], 0) || working_on(p, &[&b], added_at)
    })
    .await;
    let placed = env.placed().await;
    assert_eq!(pairings(&placed), before, "no re-pairing");
    assert_eq!(env.sim_conflicts().await, Vec::<String>::new());
    // Balanced: nothing more moves.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counts_on(&env.placed().await, &[&a, &b]), [22, 18]);
}

#[tokio::test]
async fn gatewayctl_shows_a_rebalance_and_moves_only_idle_sessions_not_moved_lately() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.fake_gateway(&a, 50).await;
    env.fake_gateway(&b, 50).await;
    let ids = env.paired_sessions("org_a", &a, 40, 0).await;
    let (ok, out) = gatewayctl(
        &env,
        &["gateways", "rebalance", "--region", "sg", "--dry-run"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{a} -> {b}: 18 session(s)")), "{out}");
    let marked = "SELECT count(*) FROM sessions WHERE move_to IS NOT NULL";
    let db = env.db.get().await.expect("db");
    let count = |n: tokio_postgres::Row| n.get::<_, i64>(0);
    assert_eq!(
        count(db.query_one(marked, &[]).await.expect("count")),
        0,
        "a dry run marks nothing"
    );

    // One session has a message waiting to go, one moved a minute ago: both stay.
    db.execute(
        "INSERT INTO messages (id, organization_id, session_id, peer, text, status, created_at) \
         VALUES ('01BUSY', 'org_a', $1, '1@s.whatsapp.net', 'x', 'queued', 0)",
        &[&ids[0]],
    )
    .await
    .expect("a queued message");
    db.execute(
        "UPDATE sessions SET moved_at = (extract(epoch from now()) * 1000)::bigint - 60000 \
         WHERE id = $1",
        &[&ids[1]],
    )
    .await
    .expect("moved lately");
    let (ok, out) = gatewayctl(&env, &["gateways", "rebalance", "--region", "sg"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("18 session(s) marked to move (of 18 planned"),
        "{out}"
    );
    let chosen: Vec<String> = db
        .query(
            "SELECT id FROM sessions WHERE move_to = $1 ORDER BY id",
            &[&b],
        )
        .await
        .expect("marked")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(chosen.len(), 18);
    assert!(
        !chosen.contains(&ids[0]) && !chosen.contains(&ids[1]),
        "{chosen:?}"
    );
    // Marked moves count where they go: the region is balanced as planned.
    let (ok, out) = gatewayctl(
        &env,
        &["gateways", "rebalance", "--region", "sg", "--dry-run"],
    )
    .await;
    assert!(ok && out.contains("is balanced"), "{out}");
    let (ok, out) = gatewayctl(&env, &["gateways", "list"]).await;
    assert!(ok, "{out}");
    let row = out.lines().find(|l| l.starts_with(&a)).unwrap_or_default();
    assert!(
        row.trim_end().ends_with(" 18"),
        "MOVING shows the marks: {out}"
    );
}
