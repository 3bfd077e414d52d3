//! The command path: api → RabbitMQ → the gateway's worker → Postgres → reply.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, BasicPublishOptions},
    types::FieldTable,
};
use serde_json::json;
use shared::protocol::{Command, CommandEnvelope, CommandOutput, Outcome};
use tests::{Stage, TestEnv, eventually};

const PHONE: &str = "6281234567890";

fn path(id: &str, action: &str) -> String {
    format!("/api/v1/sessions/{id}{action}")
}

async fn scan(env: &TestEnv, id: &str, phone: &str) {
    env.sim(
        id,
        Command::SimScan {
            phone_number: phone.into(),
        },
    )
    .await
    .expect("the simulated phone scans");
}

/// Publishes a `start` of the staged session straight to its gateway's queue, as no api would
/// address it, and checks that the worker refused it: recorded with `error_code`, not run.
async fn refused_behind_the_apis_back(
    env: &TestEnv,
    stage: &Stage,
    organization_id: &str,
    deadline_ms: i64,
    error_code: &str,
) {
    let Stage(gw, _, api, key, id) = stage;
    let command = CommandEnvelope {
        id: ulid::Ulid::new(),
        organization_id: organization_id.into(),
        session_id: id.clone(),
        gateway_id: gw.clone(),
        requested_by: "test".into(),
        deadline_ms,
        command: Command::Start,
    };
    let (_conn, ch, topology) = env.amqp().await;
    ch.basic_publish(
        topology.command_exchange().as_str().into(),
        gw.as_str().into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&command).expect("json"),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish");
    let status = if error_code == "gateway_timeout" {
        "expired"
    } else {
        "failed"
    };
    eventually(Duration::from_secs(5), || async {
        env.commands_of(id).await == vec![("start".into(), status.into(), Some(error_code.into()))]
    })
    .await;
    let after = api.get(&format!("/api/v1/sessions/{id}"), key).await;
    assert_eq!(
        after.assert_status(200)["status"],
        "stopped",
        "it did not run"
    );
}

#[tokio::test]
async fn the_seed_flow_pair_restart_stop_logout_pair_again_delete() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let _worker = env.start_worker(&gw, |_| {}).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let s = api
        .create_session(&key, json!({"label": "Support line", "gatewayId": gw}))
        .await;
    let id = s["id"].as_str().expect("id").to_owned();

    // QR: 404 while pairing starts, then the code.
    api.get(&path(&id, "/qr"), &key)
        .await
        .assert_error(404, "not_found");
    eventually(Duration::from_secs(5), || async {
        api.get(&path(&id, "/qr"), &key).await.status == 200
    })
    .await;
    let qr = api
        .get(&path(&id, "/qr"), &key)
        .await
        .assert_status(200)
        .clone();
    assert!(
        qr["qr"].as_str().is_some_and(|q| q.starts_with("2@")),
        "{qr}"
    );
    assert!(
        qr["expiresAt"]
            .as_i64()
            .is_some_and(|t| t > shared::db::now_ms())
    );
    let scanning = api
        .wait_session(&key, &id, "scan_qr_code", |s| s["status"] == "scan_qr_code")
        .await;
    assert!(scanning["phoneNumber"].is_null());

    // The phone scans: paired and working.
    scan(&env, &id, PHONE).await;
    let working = api
        .wait_session(&key, &id, "working", |s| s["status"] == "working")
        .await;
    assert_eq!(working["phoneNumber"], PHONE);
    assert_eq!(working["waJid"], format!("{PHONE}@s.whatsapp.net"));
    assert!(
        working["waLid"]
            .as_str()
            .is_some_and(|l| l.ends_with("@lid"))
    );
    assert!(working["lastConnectedAt"].as_i64().is_some());
    // A paired session has no QR to give.
    api.get(&path(&id, "/qr"), &key)
        .await
        .assert_error(409, "conflict");

    // Restart is async: the refreshed row at once, working again later, still paired.
    let r = api.post(&path(&id, ":restart"), &key, None).await;
    let r = r.assert_status(200);
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["phoneNumber"], PHONE);
    let again = api
        .wait_session(&key, &id, "working", |s| s["status"] == "working")
        .await;
    assert_eq!(again["waJid"], working["waJid"], "no re-pairing");

    // Stop keeps the pairing; start reconnects without a QR.
    let stopped = api.post(&path(&id, ":stop"), &key, None).await;
    let stopped = stopped.assert_status(200);
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(stopped["phoneNumber"], PHONE);
    api.post(&path(&id, ":start"), &key, None)
        .await
        .assert_status(200);
    api.wait_session(&key, &id, "working", |s| {
        s["status"] == "working" && s["phoneNumber"] == PHONE
    })
    .await;

    // Logout unpairs, keeps the row, and is idempotent.
    let out = api.post(&path(&id, ":logout"), &key, None).await;
    let out = out.assert_status(200).clone();
    assert_eq!(out["status"], "logged_out");
    for unpaired in ["phoneNumber", "waJid", "waLid"] {
        assert!(out[unpaired].is_null(), "{unpaired} cleared: {out}");
    }
    let twice = api.post(&path(&id, ":logout"), &key, None).await;
    assert_eq!(twice.assert_status(200)["status"], "logged_out");
    api.get(&format!("/api/v1/sessions/{id}"), &key)
        .await
        .assert_status(200);

    // QR works again after logout.
    api.get(&path(&id, "/qr"), &key)
        .await
        .assert_error(404, "not_found");
    eventually(Duration::from_secs(5), || async {
        api.get(&path(&id, "/qr"), &key).await.status == 200
    })
    .await;

    // Delete goes through the worker, then the session is gone.
    assert_eq!(
        api.delete(&format!("/api/v1/sessions/{id}"), &key)
            .await
            .status,
        204
    );
    api.get(&format!("/api/v1/sessions/{id}"), &key)
        .await
        .assert_error(404, "not_found");
    api.delete(&format!("/api/v1/sessions/{id}"), &key)
        .await
        .assert_error(404, "not_found");
    // Commands too.
    api.post(&path(&id, ":logout"), &key, None)
        .await
        .assert_error(404, "not_found");

    // Every command is in the audit log with its outcome.
    let log = env.commands_of(&id).await;
    let mut kinds: Vec<&str> = log.iter().map(|(k, _, _)| k.as_str()).collect();
    kinds.dedup(); // the polling above repeats `qr` a varying number of times
    assert_eq!(
        kinds,
        [
            "qr", "sim_scan", "qr", "restart", "stop", "start", "logout", "qr", "delete"
        ]
    );
    assert!(
        log.iter().all(|(_, status, _)| status != "pending"),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|(k, s, c)| k == "qr" && s == "failed" && c.as_deref() == Some("not_found"))
    );
    assert!(
        log.iter()
            .any(|(k, s, _)| k == "delete" && s == "succeeded")
    );
}

#[tokio::test]
async fn pairing_code_pairs_the_number_that_asked_for_it() {
    let env = TestEnv::new().await;
    let Stage(_, _worker, api, key, id) = env.stage(|_| {}, |_| {}).await;

    let body = json!({"phoneNumber": "+62 812-3456-7890"});
    let code = api
        .post(&path(&id, ":requestPairingCode"), &key, Some(&body))
        .await;
    let code = code.assert_status(200)["code"]
        .as_str()
        .expect("code")
        .to_owned();
    assert_eq!(code.len(), 9);
    assert_eq!(&code[4..5], "-");
    assert!(
        code.chars()
            .filter(|c| *c != '-')
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    );

    let wrong = env
        .sim(
            &id,
            Command::SimScan {
                phone_number: "6599998888".into(),
            },
        )
        .await;
    assert_eq!(
        wrong.err().map(|e| e.code()),
        Some(shared::ErrorCode::Conflict)
    );
    scan(&env, &id, PHONE).await;
    api.wait_session(&key, &id, "working", |s| {
        s["status"] == "working" && s["phoneNumber"] == PHONE
    })
    .await;

    let bad = json!({"phoneNumber": "12"});
    api.post(&path(&id, ":requestPairingCode"), &key, Some(&bad))
        .await
        .assert_error(400, "invalid_argument");
    api.post(&path(&id, ":requestPairingCode"), &key, Some(&body))
        .await
        .assert_error(409, "conflict");
}

#[tokio::test]
async fn the_phone_and_the_network_move_the_status_as_whatsapp_would() {
    let env = TestEnv::new().await;
    let Stage(_, _worker, api, key, id) = env
        .stage(|c| c.sim_reconnect_backoff_ms = 400, |_| {})
        .await;
    let pair = || async {
        api.post(&path(&id, ":start"), &key, None)
            .await
            .assert_status(200);
        api.wait_session(&key, &id, "scanning", |s| s["status"] == "scan_qr_code")
            .await;
        scan(&env, &id, PHONE).await;
        api.wait_session(&key, &id, "working", |s| s["status"] == "working")
            .await;
    };
    pair().await;

    // The network drops: reconnecting, then working again by itself.
    env.sim(&id, Command::SimDrop).await.expect("drop");
    let lost = api
        .wait_session(&key, &id, "reconnecting", |s| s["status"] == "starting")
        .await;
    assert_eq!(lost["statusReason"], "connection_lost");
    api.wait_session(&key, &id, "working again", |s| {
        s["status"] == "working" && s["statusReason"].is_null()
    })
    .await;

    // The same device connects elsewhere: failed with conflict, and no reconnect loop.
    env.sim(&id, Command::SimConflict).await.expect("conflict");
    let failed = api
        .wait_session(&key, &id, "failed", |s| s["status"] == "failed")
        .await;
    assert_eq!(failed["statusReason"], "conflict");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(
        still.assert_status(200)["status"],
        "failed",
        "no blind reconnect"
    );
    assert_eq!(still.body["phoneNumber"], PHONE, "still paired");

    // Restart recovers it, keeping the pairing.
    api.post(&path(&id, ":restart"), &key, None)
        .await
        .assert_status(200);
    api.wait_session(&key, &id, "working", |s| s["status"] == "working")
        .await;

    // The phone removes the device: logged out, unpaired.
    env.sim(&id, Command::SimUnlink).await.expect("unlink");
    let out = api
        .wait_session(&key, &id, "logged_out", |s| s["status"] == "logged_out")
        .await;
    assert_eq!(out["statusReason"], "device_removed");
    assert!(out["phoneNumber"].is_null());
}

#[tokio::test]
async fn unscanned_qr_codes_rotate_then_the_session_stops_with_qr_timeout() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let _worker = env
        .start_worker(&gw, |c| {
            c.sim_qr_first_ttl_ms = 300;
            c.sim_qr_next_ttl_ms = 150;
            c.sim_qr_count = 3;
        })
        .await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &gw).await;
    api.get(&path(&id, "/qr"), &key)
        .await
        .assert_error(404, "not_found");
    let stopped = api
        .wait_session(&key, &id, "stopped", |s| {
            s["status"] == "stopped" && !s["statusReason"].is_null()
        })
        .await;
    assert_eq!(stopped["statusReason"], "qr_timeout");
    let client = env.db.get().await.expect("db");
    let qrs: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE session_id = $1 AND type = 'auth.qr'",
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(qrs, 3, "three codes, each replacing the last");
}

#[tokio::test]
async fn a_gateway_without_a_live_worker_answers_503_at_once() {
    let env = TestEnv::new().await;
    // A long command timeout: answering 503 must not wait for it.
    let api = env.start_api(|c| c.command_timeout_ms = 60_000).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;

    // Never registered.
    let dead = env.gateway_id("sg");
    let s = api
        .create_session(&key, json!({"label": "x", "gatewayId": dead}))
        .await;
    let id = s["id"].as_str().expect("id").to_owned();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        api.post(&path(&id, ":logout"), &key, None),
    )
    .await
    .expect("answered without waiting for the command timeout");
    r.assert_error(503, "gateway_unavailable");
    assert_eq!(r.body["error"]["details"]["gatewayId"], dead.as_str());
    assert_eq!(
        env.commands_of(&id).await,
        vec![(
            "logout".into(),
            "failed".into(),
            Some("gateway_unavailable".into())
        )]
    );

    // Registered and heartbeating, but its queue does not exist: the broker returns it.
    let ghost = env.gateway_id("sg");
    env.fake_live_gateway(&ghost).await;
    let s = api
        .create_session(&key, json!({"label": "y", "gatewayId": ghost}))
        .await;
    let id = s["id"].as_str().expect("id").to_owned();
    let r = tokio::time::timeout(Duration::from_secs(5), api.get(&path(&id, "/qr"), &key))
        .await
        .expect("answered without waiting for the command timeout");
    r.assert_error(503, "gateway_unavailable");

    // A stopped worker is seen as gone at once.
    let gw = env.gateway_id("sg");
    let worker = env.start_worker(&gw, |_| {}).await;
    let s = api
        .create_session(&key, json!({"label": "z", "gatewayId": gw}))
        .await;
    let id = s["id"].as_str().expect("id").to_owned();
    api.post(&path(&id, ":stop"), &key, None)
        .await
        .assert_status(200);
    worker.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        api.post(&path(&id, ":start"), &key, None),
    )
    .await
    .expect("answered at once");
    r.assert_error(503, "gateway_unavailable");
}

#[tokio::test]
async fn a_worker_slower_than_the_timeout_gets_504_and_the_outcome_is_recorded() {
    let env = TestEnv::new().await;
    let Stage(_, _worker, api, key, id) = env
        .stage(
            |c| c.sim_op_delay_ms = 1_500,
            |c| c.command_timeout_ms = 700,
        )
        .await;

    let r = api.post(&path(&id, ":start"), &key, None).await;
    r.assert_error(504, "gateway_timeout");
    let command_id = r.body["error"]["details"]["commandId"]
        .as_str()
        .expect("commandId")
        .to_owned();
    // The caller can look the command up at once: still pending, the worker is on it.
    let lookup = format!("/api/v1/commands/{command_id}");
    let pending = api.get(&lookup, &key).await;
    let pending = pending.assert_status(200);
    assert_eq!(
        (&pending["status"], &pending["kind"], &pending["sessionId"]),
        (&json!("pending"), &json!("start"), &json!(id))
    );
    assert_eq!(pending["completedAt"], json!(null));
    // The worker took it before its deadline and finished it: the lookup says so.
    eventually(Duration::from_secs(5), || async {
        let r = api.get(&lookup, &key).await;
        r.status == 200 && r.body["status"] == "succeeded" && r.body["error"].is_null()
    })
    .await;
    api.wait_session(&key, &id, "started", |s| s["status"] != "stopped")
        .await;
}

#[tokio::test]
async fn a_command_that_expires_in_the_queue_never_runs() {
    let env = TestEnv::new().await;
    // The gateway looks live and its queue exists, but nothing consumes it yet.
    let (gw, _conn, _ch, _topology) = env.gateway_without_consumer().await;
    let api = env.start_api(|c| c.command_timeout_ms = 400).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let id = api.session_on(&key, &gw).await;

    api.post(&path(&id, ":start"), &key, None)
        .await
        .assert_error(504, "gateway_timeout");
    // The broker dead-letters it at its expiration; the api records that.
    eventually(Duration::from_secs(5), || async {
        env.commands_of(&id).await
            == vec![(
                "start".into(),
                "expired".into(),
                Some("gateway_timeout".into()),
            )]
    })
    .await;
    // A worker that arrives later finds nothing to run.
    let _worker = env.start_worker(&gw, |_| {}).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(after.assert_status(200)["status"], "stopped");
}

#[tokio::test]
async fn a_worker_does_not_run_a_command_delivered_after_its_deadline() {
    let env = TestEnv::new().await;
    let stage = env.stage(|_| {}, |_| {}).await;
    // Its deadline has passed, and it is delivered without a broker expiration.
    let deadline = shared::db::now_ms() - 5_000;
    refused_behind_the_apis_back(&env, &stage, "org_a", deadline, "gateway_timeout").await;
}

#[tokio::test]
async fn a_command_redelivered_after_its_worker_died_mid_way_runs_once() {
    let env = TestEnv::new().await;
    let Stage(gw, slow, api, key, id) = env
        .stage(
            |c| c.sim_op_delay_ms = 1_500,
            |c| c.command_timeout_ms = 15_000,
        )
        .await;

    let request = api.post_in_background(&format!("/api/v1/sessions/{id}:start"), &key);
    tokio::time::sleep(Duration::from_millis(500)).await;
    slow.kill().await; // mid-way through connecting
    let _worker = env.start_worker(&gw, |_| {}).await;
    request.await.expect("request").assert_status(200);
    assert_eq!(
        env.commands_of(&id).await,
        vec![("start".into(), "succeeded".into(), None)]
    );
    let client = env.db.get().await.expect("db");
    let starts: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE session_id = $1 AND type = 'session.status' \
             AND payload->>'status' = 'starting'",
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(starts, 1, "the start took effect once");
}

#[tokio::test]
async fn a_redelivered_command_that_already_ran_is_answered_from_its_record() {
    let env = TestEnv::new().await;
    let (gw, conn, ch, topology) = env.gateway_without_consumer().await;
    let api = env.start_api(|c| c.command_timeout_ms = 15_000).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let s = api
        .create_session(&key, json!({"label": "real", "gatewayId": gw}))
        .await;
    let id = s["id"].as_str().expect("id").to_owned();

    let request = api.post_in_background(&format!("/api/v1/sessions/{id}:start"), &key);
    // A worker takes the command, runs it and records the outcome, then dies before the ack.
    let mut consumer = ch
        .basic_consume(
            topology.command_queue(&gw).as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = consumer.next().await.expect("a delivery").expect("ok");
    let envelope: CommandEnvelope = serde_json::from_slice(&delivery.data).expect("envelope");
    let mut recorded: shared::session::Session =
        serde_json::from_value(s.clone()).expect("session");
    recorded.label = "from the record".into();
    let outcome = serde_json::to_value(Outcome::Ok(CommandOutput::Session(Box::new(recorded))))
        .expect("json");
    shared::store::commands::record_end(
        &env.db.get().await.expect("db"),
        &shared::store::commands::Done {
            env: &envelope,
            error: None,
            outcome: &outcome,
        },
        shared::db::now_ms(),
    )
    .await
    .expect("record");
    drop(consumer);
    conn.close(200, "crash".into()).await.expect("close");

    let _worker = env.start_worker(&gw, |_| {}).await;
    let answer = request.await.expect("request");
    assert_eq!(
        answer.assert_status(200)["label"],
        "from the record",
        "answered from the record, not run again"
    );
    let row = api.get(&format!("/api/v1/sessions/{id}"), &key).await;
    assert_eq!(
        row.assert_status(200)["status"],
        "stopped",
        "the start did not run twice"
    );
}

#[tokio::test]
async fn updating_settings_tells_the_owning_worker() {
    let env = TestEnv::new().await;
    let Stage(_, _worker, api, key, id) = env.stage(|_| {}, |_| {}).await;
    api.patch(
        &format!("/api/v1/sessions/{id}"),
        &key,
        &json!({"presenceTyping": false}),
    )
    .await
    .assert_status(200);
    eventually(Duration::from_secs(5), || async {
        env.commands_of(&id).await == vec![("apply_settings".into(), "succeeded".into(), None)]
    })
    .await;
}

#[tokio::test]
async fn the_worker_records_who_asked_what_when_and_how_it_ended() {
    let env = TestEnv::new().await;
    let Stage(gw, _worker, api, key, id) = env.stage(|_| {}, |_| {}).await;

    let before = shared::db::now_ms();
    api.post(&path(&id, ":start"), &key, None)
        .await
        .assert_status(200);
    let row = env
        .db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT kind, status, requested_by, organization_id, gateway_id, payload, \
             created_at, deadline_at, completed_at FROM commands WHERE session_id = $1",
            &[&id],
        )
        .await
        .expect("the command's row");
    let (kind, status, by, org, gateway): (String, String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        (
            kind.as_str(),
            status.as_str(),
            org.as_str(),
            gateway.as_str()
        ),
        ("start", "succeeded", "org_a", gw.as_str())
    );
    assert_eq!(Some(by.as_str()), shared::auth::api_key_id(&key));
    assert_eq!(row.get::<_, serde_json::Value>(5), json!({"type": "start"}));
    let (created, deadline, completed): (i64, i64, Option<i64>) =
        (row.get(6), row.get(7), row.get(8));
    assert!(
        created >= before && deadline > created,
        "{created} {deadline}"
    );
    assert!(completed.is_some_and(|c| c >= created), "{completed:?}");
}

#[tokio::test]
async fn a_session_deleted_through_another_replica_is_404_not_a_stale_route() {
    let env = TestEnv::new().await;
    let Stage(_, _worker, one, key, id) = env.stage(|_| {}, |_| {}).await;
    let two = env.start_api(|c| c.session_cache_ttl_ms = 60_000).await;
    // Replica two remembers the session's gateway...
    two.post(&path(&id, ":stop"), &key, None)
        .await
        .assert_status(200);
    // ...and replica one deletes the session.
    one.delete(&format!("/api/v1/sessions/{id}"), &key)
        .await
        .assert_status(204);
    two.post(&path(&id, ":logout"), &key, None)
        .await
        .assert_error(404, "not_found");
    two.get(&path(&id, "/qr"), &key)
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn a_command_for_another_organizations_session_does_not_run() {
    let env = TestEnv::new().await;
    let stage = env.stage(|_| {}, |_| {}).await;
    // It claims org B: the session is org A's.
    let deadline = shared::db::now_ms() + 10_000;
    refused_behind_the_apis_back(&env, &stage, "org_b", deadline, "not_found").await;
}
