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
