//! Faults the fleet must ride out by itself: the broker or the database dropping connections,
//! and a worker told to stop while it holds commands.

use std::time::Duration;

use tests::{Stage, TestEnv, close_broker_connection, eventually};

#[tokio::test]
async fn a_worker_reconnects_by_itself_when_the_broker_drops_its_connection() {
    let env = TestEnv::new().await;
    let Stage(gw, _worker, api, key, id) =
        env.stage(|_| {}, |c| c.command_timeout_ms = 1_000).await;
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);

    assert_eq!(close_broker_connection(&format!("worker-{gw}")).await, 1);
    eventually(Duration::from_secs(15), || async {
        api.post(&format!("/api/v1/sessions/{id}:start"), &key, None)
            .await
            .status
            == 200
    })
    .await;
    api.wait_session(&key, &id, "pairing", |s| s["status"] == "scan_qr_code")
        .await;
}

/// The broker closes a channel, not the connection, on a soft error: here the event exchange
/// vanishes under the worker's publishing channel. The worker rebuilds its channels instead of
/// consuming on with every reply lost (every command would end in 504).
#[tokio::test]
async fn a_worker_whose_publishing_channel_the_broker_closed_answers_again() {
    let env = TestEnv::new().await;
    let Stage(_, _worker, api, key, id) = env.stage(|_| {}, |c| c.command_timeout_ms = 1_000).await;
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);

    let (_conn, ch, topology) = env.amqp().await;
    ch.exchange_delete(
        topology.event_exchange().as_str().into(),
        lapin::options::ExchangeDeleteOptions::default(),
    )
    .await
    .expect("delete the event exchange");
    // The next command's events meet the missing exchange (404 closes the channel); its
    // reply may be lost with it. Then the worker answers again.
    let _ = api
        .post(&format!("/api/v1/sessions/{id}:start"), &key, None)
        .await;
    eventually(Duration::from_secs(15), || async {
        let stopped = api
            .post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
            .await;
        let started = api
            .post(&format!("/api/v1/sessions/{id}:start"), &key, None)
            .await;
        stopped.status == 200 && started.status == 200
    })
    .await;
}

#[tokio::test]
async fn commands_keep_working_after_postgres_drops_every_connection() {
    let env = TestEnv::new().await;
    let Stage(_, _worker, api, key, id) = env.stage(|_| {}, |c| c.command_timeout_ms = 2_000).await;
    api.post(&format!("/api/v1/sessions/{id}:stop"), &key, None)
        .await
        .assert_status(200);

    env.drop_database_connections().await;
    // The first attempts may meet a dead pooled connection (503, never a 500); then it heals.
    eventually(Duration::from_secs(15), || async {
        let r = api
            .post(&format!("/api/v1/sessions/{id}:start"), &key, None)
            .await;
        assert_ne!(r.status, 500, "{}", r.body);
        r.status == 200
    })
    .await;
    api.wait_session(&key, &id, "pairing", |s| s["status"] == "scan_qr_code")
        .await;
}

#[tokio::test]
async fn a_worker_told_to_stop_finishes_the_command_it_holds() {
    let env = TestEnv::new().await;
    let Stage(_, worker, api, key, id) = env.stage(|c| c.sim_op_delay_ms = 800, |_| {}).await;

    let request = api.post_in_background(&format!("/api/v1/sessions/{id}:start"), &key);
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.stop().await;
    request.await.expect("request").assert_status(200);
    assert_eq!(
        env.commands_of(&id).await,
        vec![("start".into(), "succeeded".into(), None)]
    );
}

#[tokio::test]
async fn a_command_a_faulty_gateway_keeps_putting_back_is_answered_503_never_500() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};

    let env = TestEnv::new().await;
    let (gw, _conn, ch, topology) = env.gateway_without_consumer().await;
    let api = env.start_api(|c| c.command_timeout_ms = 20_000).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let s = api
        .create_session(&key, serde_json::json!({"label": "x", "gatewayId": gw}))
        .await;
    let id = s["id"].as_str().expect("id").to_owned();
    let request = api.post_in_background(&format!("/api/v1/sessions/{id}:restart"), &key);
    // A gateway that cannot record any outcome (its database is down): it puts every delivery
    // back, until the queue gives up on the command.
    let mut consumer = ch
        .basic_consume(
            topology.command_queue(&gw).as_str().into(),
            "faulty".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    let faulty = tokio::spawn(async move {
        let mut deliveries = 0;
        while let Some(Ok(d)) = consumer.next().await {
            deliveries += 1;
            let again = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            d.nack(again).await.expect("nack");
        }
        deliveries
    });
    let answer = request.await.expect("request");
    let body = answer.assert_status(503);
    assert_eq!(body["error"]["code"], "gateway_unavailable", "{body}");
    // Its record says the same to a caller who asks later.
    let row = env
        .db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT status, error_code FROM commands WHERE session_id = $1",
            &[&id],
        )
        .await
        .expect("command row");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("failed".to_owned(), "gateway_unavailable".to_owned())
    );
    ch.close(200, "done".into()).await.expect("close");
    assert_eq!(
        faulty.await.expect("consumer"),
        shared::topology::DELIVERY_LIMIT + 1,
        "put back as often as the queue's limit allows, then dead-lettered"
    );
}

#[tokio::test]
async fn a_command_whose_end_never_came_is_ended_expired_by_the_sweep() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    let id = env.paired_sessions("org_a", &gw, 1, 0).await.remove(0);
    // A command a worker took and died with, long ago; its dead letter never came.
    let envelope = shared::protocol::CommandEnvelope {
        id: ulid::Ulid::new(),
        organization_id: "org_a".into(),
        session_id: id.clone(),
        gateway_id: gw.clone(),
        command: shared::protocol::Command::Restart,
        requested_by: "user_a".into(),
        deadline_ms: shared::db::now_ms() - 120_000,
    };
    shared::store::commands::record_pending(&env.db.get().await.expect("db"), &envelope)
        .await
        .expect("pending");
    let api = env
        .start_api(|c| {
            c.command_sweep_interval_ms = 100;
            c.command_sweep_grace_ms = 60_000;
        })
        .await;
    let key = env.api_key("org_a", &["read"]).await;
    let path = format!("/api/v1/commands/{}", envelope.id);
    eventually(Duration::from_secs(10), || async {
        api.get(&path, &key).await.body["status"] == "expired"
    })
    .await;
    let record = api.get(&path, &key).await.body;
    assert_eq!(record["error"]["code"], "gateway_timeout", "{record}");
    assert!(record["completedAt"].is_i64(), "{record}");
}
