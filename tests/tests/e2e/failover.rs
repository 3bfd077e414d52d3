//! Failover: workers that die (`kill -9`), freeze (SIGSTOP, then SIGCONT), are told to stop
//! (SIGTERM: a rollout's restart, which moves nothing) or are decommissioned, as real processes, and what the fleet does about it —
//! with the simulated WhatsApp's record to show no number was ever connected twice.

use std::time::Duration;

use tests::{TestEnv, fast_fleet, free_port, process::WorkerProcess};

use crate::fleet::{PAIRED, pairings, resumed_worker, working_on};

const NEVER: Vec<String> = Vec::new();

/// Starts a worker process for `gateway_id` and waits until its sessions work again.
async fn resumed_process(
    env: &TestEnv,
    gateway_id: &str,
    extra: &[(&str, String)],
) -> WorkerProcess {
    let started = shared::db::now_ms();
    let worker = WorkerProcess::spawn(env, gateway_id, extra);
    env.all_sessions(Duration::from_secs(30), "back on their gateway", |p| {
        working_on(p, &[gateway_id], started)
    })
    .await;
    worker
}

/// A counter from a worker's `/metrics` (0 when absent).
async fn counter(port: u16, name: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return -1.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_kill_9d_workers_running_sessions_work_on_a_peer_within_the_lease_and_10_s() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.paired_sessions("org_a", &a, PAIRED, 5).await;
    let before = pairings(&env.placed().await);
    let mut wa = resumed_process(&env, &a, &[]).await;
    let _wb = env.start_worker(&b, fast_fleet).await;

    let killed_at = shared::db::now_ms();
    wa.kill_9();
    // Its leases (2 s) still hold: nothing moves yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        env.placed().await.iter().all(|p| p.gateway_id == a),
        "no session moves while its lease holds"
    );
    // Within the lease TTL (2 s) + 10 s; stopped ones stay stopped.
    env.all_sessions(Duration::from_millis(11_500), "failed over", |p| {
        working_on(p, &[&b], killed_at)
    })
    .await;
    assert_eq!(pairings(&env.placed().await), before, "no re-pairing");
    assert_eq!(env.sim_conflicts().await, NEVER, "never two connections");
}

#[tokio::test]
async fn a_frozen_worker_whose_sessions_moved_writes_nothing_when_it_wakes_and_drops_them() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    let running = 50;
    env.paired_sessions("org_a", &a, running, 0).await;
    let port = free_port();
    let metrics = [("WORKER_METRICS_LISTEN", format!("127.0.0.1:{port}"))];
    let wa = resumed_process(&env, &a, &metrics).await;
    let _wb = env.start_worker(&b, fast_fleet).await;

    let frozen_at = shared::db::now_ms();
    wa.freeze();
    env.all_sessions(
        Duration::from_secs(15),
        "moved off the frozen worker",
        |p| working_on(p, &[&b], frozen_at),
    )
    .await;
    let snapshot = rows_and_events(&env).await;

    wa.thaw();
    tests::eventually(Duration::from_secs(10), || async {
        counter(port, "worker_leases_lost_total").await >= running as f64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rows_and_events(&env).await,
        snapshot,
        "the woken worker wrote nothing: no session row changed, no event was added"
    );
    assert_eq!(counter(port, "worker_lease_fences_total").await, 1.0);
    env.all_sessions(Duration::from_secs(1), "still working on the peer", |p| {
        working_on(p, &[&b], frozen_at)
    })
    .await;
    assert_eq!(env.sim_conflicts().await, NEVER, "never two connections");
}

/// Every session's status and last write, and the newest event id.
async fn rows_and_events(env: &TestEnv) -> (Vec<(String, String, String, i64)>, i64) {
    let client = env.db.get().await.expect("db");
    let rows = client
        .query(
            "SELECT id, gateway_id, status, updated_at FROM sessions ORDER BY id",
            &[],
        )
        .await
        .expect("sessions")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let last_event: i64 = client
        .query_one("SELECT COALESCE(max(id), 0) FROM events", &[])
        .await
        .expect("events")
        .get(0);
    (rows, last_event)
}

/// The gateway as the fleet sees it now.
async fn fleet_state(env: &TestEnv, gateway_id: &str) -> Option<shared::fleet::GatewayState> {
    let (gateways, now) = shared::store::gateways::list(&env.db.get().await.expect("db"))
        .await
        .expect("list");
    gateways
        .iter()
        .find(|g| g.id == gateway_id)
        .map(|g| g.effective_state(now, 1_000))
}

/// A gateway `a` of 20 paired sessions (4 stopped) whose worker process, held `hold_ms` on a
/// restart, is told to stop while a live peer `b` has room; answers `a`, `b`, the sessions'
/// pairings before and the peer.
type Pairings = Vec<(String, Option<String>, Option<String>)>;

async fn restart_with_a_peer(
    env: &TestEnv,
    hold_ms: u64,
) -> (String, String, Pairings, tests::Worker) {
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.paired_sessions("org_a", &a, 20, 4).await;
    let before = pairings(&env.placed().await);
    let wa = resumed_process(env, &a, &[("RESTART_HOLD_MS", hold_ms.to_string())]).await;
    let wb = env.start_worker(&b, fast_fleet).await;
    let log = wa.log.clone();
    assert!(wa.terminate(), "exits cleanly; log in {}", log.display());
    (a, b, before, wb)
}

/// Every number kept its pairing and was never connected twice.
async fn nothing_repaired_nor_connected_twice(env: &TestEnv, before: &Pairings) {
    assert_eq!(pairings(&env.placed().await), *before, "no re-pairing");
    assert_eq!(env.sim_conflicts().await, NEVER, "never two connections");
}

#[tokio::test]
async fn a_restarted_worker_keeps_its_sessions_no_peer_takes_them_and_its_next_process_does() {
    let env = TestEnv::new().await;
    let (a, _b, before, _wb) = restart_with_a_peer(&env, 20_000).await;
    assert_eq!(
        fleet_state(&env, &a).await,
        Some(shared::fleet::GatewayState::Restarting)
    );
    // Longer than a killed worker's lease (2 s) and the reaper's round: a failover would
    // have moved them by now. A restart moves nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let placed = env.placed().await;
    assert!(
        placed.iter().all(|p| p.gateway_id == a),
        "no peer took a session during the hold: {placed:?}"
    );
    // A command meanwhile is told the gateway restarts, and when to try again.
    let api = env.start_api(|c| c.gateway_liveness_ms = 1_000).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    let r = api
        .post(
            &format!("/api/v1/sessions/{}:stop", placed[0].id),
            &key,
            None,
        )
        .await;
    r.assert_error(503, "gateway_unavailable");
    let message = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("is restarting"), "{}", r.body);
    let retry_after = r.retry_after();
    assert!(
        (10..=22).contains(&retry_after),
        "about the hold's 16 s left: {retry_after}"
    );

    let restarted_at = shared::db::now_ms();
    let _next = WorkerProcess::spawn(&env, &a, &[]);
    env.all_sessions(Duration::from_secs(20), "back on their own gateway", |p| {
        working_on(p, &[&a], restarted_at)
    })
    .await;
    nothing_repaired_nor_connected_twice(&env, &before).await;
    assert_eq!(
        fleet_state(&env, &a).await,
        Some(shared::fleet::GatewayState::Active)
    );
}

#[tokio::test]
async fn a_worker_that_does_not_come_back_within_its_hold_is_failed_over() {
    let env = TestEnv::new().await;
    let stopped_at = shared::db::now_ms();
    let (a, b, before, _wb) = restart_with_a_peer(&env, 1_500).await;
    env.all_sessions(Duration::from_secs(15), "failed over to the peer", |p| {
        working_on(p, &[&b], stopped_at)
    })
    .await;
    nothing_repaired_nor_connected_twice(&env, &before).await;
    assert_eq!(
        fleet_state(&env, &a).await,
        Some(shared::fleet::GatewayState::Dead)
    );
}

#[tokio::test]
async fn a_device_connected_from_two_workers_is_a_conflict_and_the_older_stream_loses() {
    // What the fleet must never do, done on purpose: a session moved without waiting for its
    // owner's lease, so the simulated WhatsApp sees its device connect twice.
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    let ids = env.paired_sessions("org_a", &a, 1, 0).await;
    // a renews its lease rarely, so it cannot notice the theft before b connects.
    let _wa = resumed_worker(&env, &a, Duration::from_secs(10), |c| {
        c.lease_ttl_ms = 30_000
    })
    .await;
    let _wb = env.start_worker(&b, fast_fleet).await;
    env.db
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE sessions SET gateway_id = $1, lease_holder = NULL",
            &[&b],
        )
        .await
        .expect("move by force");
    tests::eventually(Duration::from_secs(10), || async {
        env.sim_conflicts().await == ids
    })
    .await;
    // The newer connection (b's) stands; a's stream was replaced and a let go without
    // writing: its lease was taken.
    env.all_sessions(Duration::from_secs(10), "working on b", |p| {
        p.gateway_id == b && p.status == "working"
    })
    .await;
}

#[tokio::test]
async fn a_dead_gateways_sessions_wait_for_a_live_peer_and_move_when_one_comes() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.paired_sessions("org_a", &a, 20, 4).await;
    let before = pairings(&env.placed().await);
    let wa = resumed_worker(&env, &a, Duration::from_secs(10), |_| {}).await;
    wa.kill().await;
    // Well past its 2 s lease, with nowhere to go: every session stays, nothing is lost.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let waiting = env.placed().await;
    assert_eq!(waiting.len(), 20);
    assert!(waiting.iter().all(|p| p.gateway_id == a), "{waiting:?}");

    let revived_at = shared::db::now_ms();
    let _wb = env.start_worker(&b, fast_fleet).await;
    env.all_sessions(Duration::from_secs(10), "moved to the newcomer", |p| {
        working_on(p, &[&b], revived_at)
    })
    .await;
    assert_eq!(pairings(&env.placed().await), before, "no re-pairing");
    assert_eq!(env.sim_conflicts().await, NEVER, "never two connections");
}

/// The gateway's row as the lease sees it: its process and its state.
async fn gateway_row(env: &TestEnv, gateway_id: &str) -> (Option<String>, String) {
    let row = env
        .db
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT instance, state FROM gateways WHERE id = $1",
            &[&gateway_id],
        )
        .await
        .expect("gateway row");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_worker_whose_gateway_another_process_takes_over_exits_non_zero_and_leaves_it_be() {
    let env = TestEnv::new().await;
    let a = env.gateway_id("sg");
    env.paired_sessions("org_a", &a, 20, 0).await;
    let mut first = resumed_process(&env, &a, &[]).await;
    let started = shared::db::now_ms();
    let second = WorkerProcess::spawn(&env, &a, &[]);
    let status = first
        .exited_within(Duration::from_secs(10))
        .await
        .expect("the process taken over exits (it used to stay, spinning)");
    assert!(!status.success(), "taken over is a failure: {status}");
    assert!(
        first.logged().contains("took gateway"),
        "it says why: {}",
        first.logged()
    );
    // The new process keeps the gateway and every session; the old one's exit signed off
    // nothing of it.
    env.all_sessions(Duration::from_secs(15), "working on the new process", |p| {
        working_on(p, &[&a], started)
    })
    .await;
    let (_, state) = gateway_row(&env, &a).await;
    assert_eq!(state, "active");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        env.placed().await.iter().all(|p| p.status == "working"),
        "the exit let none of the new process's sessions go"
    );
    drop(second);
}

/// Who holds the sessions of `gateway_id`.
async fn lease_holders(env: &TestEnv, gateway_id: &str) -> Vec<Option<String>> {
    env.db
        .get()
        .await
        .expect("db")
        .query(
            "SELECT DISTINCT lease_holder FROM sessions WHERE gateway_id = $1",
            &[&gateway_id],
        )
        .await
        .expect("holders")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_worker_that_cannot_start_fails_before_it_claims_the_gateway() {
    let env = TestEnv::new().await;
    let a = env.gateway_id("sg");
    env.paired_sessions("org_a", &a, 20, 0).await;
    let live = resumed_process(&env, &a, &[]).await;
    let (instance, _) = gateway_row(&env, &a).await;
    let held_before = lease_holders(&env, &a).await;
    assert_eq!(held_before, vec![instance.clone()]);

    // Its metrics port is taken: it must exit without touching the gateway.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut failing = WorkerProcess::spawn(
        &env,
        &a,
        &[("WORKER_METRICS_LISTEN", format!("127.0.0.1:{port}"))],
    );
    let status = failing
        .exited_within(Duration::from_secs(20))
        .await
        .expect("it exits");
    assert!(!status.success());
    assert!(
        failing.logged().contains("WORKER_METRICS_LISTEN"),
        "{}",
        failing.logged()
    );
    assert_eq!(
        gateway_row(&env, &a).await.0,
        instance,
        "the lease stayed the live process's"
    );
    assert_eq!(
        lease_holders(&env, &a).await,
        held_before,
        "no session was claimed"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        env.placed().await.iter().all(|p| p.status == "working"),
        "the live worker kept every session"
    );
    drop(live);
}

/// A worker process of a new gateway holding 10 sessions, reaching Postgres through a proxy
/// that is then cut: answered once the worker has fenced itself (its lease, 2 s, could
/// lapse).
async fn fenced_worker(env: &TestEnv) -> (String, Vec<String>, tests::proxy::Proxy, WorkerProcess) {
    let a = env.gateway_id("sg");
    let ids = env.paired_sessions("org_a", &a, 10, 0).await;
    let proxy = tests::proxy::Proxy::to_url(&env.database_url).await;
    let worker = resumed_process(
        env,
        &a,
        &[("DATABASE_URL", proxy.url_through(&env.database_url))],
    )
    .await;
    proxy.cut();
    tests::eventually(Duration::from_secs(10), || async {
        worker.logged().contains("could not be renewed in time")
    })
    .await;
    (a, ids, proxy, worker)
}

#[tokio::test]
async fn a_worker_fenced_by_a_postgres_outage_waits_without_spinning_and_comes_back() {
    let env = TestEnv::new().await;
    let (a, _, proxy, worker) = fenced_worker(&env).await;
    let before = worker.cpu_time().expect("cpu");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = worker.cpu_time().expect("cpu") - before;
    println!("fenced for 3 s: {used:?} of CPU");
    // Waiting costs next to nothing; the loop that spun burned over a core (3 s of CPU here).
    assert!(
        used < Duration::from_millis(600),
        "a fenced worker used {used:?} of CPU in 3 s"
    );
    let back = shared::db::now_ms();
    proxy.restore();
    env.all_sessions(
        Duration::from_secs(20),
        "working again after the outage",
        |p| working_on(p, &[&a], back),
    )
    .await;
}

/// A worker's probe: its status and JSON body.
async fn probe(port: u16, path: &str) -> (u16, serde_json::Value) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
        Err(_) => (0, serde_json::Value::Null),
    }
}

#[tokio::test]
async fn a_workers_readiness_follows_its_lease_and_postgres_while_its_liveness_stays_up() {
    let env = TestEnv::new().await;
    let a = env.gateway_id("sg");
    env.paired_sessions("org_a", &a, 3, 0).await;
    let proxy = tests::proxy::Proxy::to_url(&env.database_url).await;
    let port = free_port();
    let _worker = resumed_process(
        &env,
        &a,
        &[
            ("DATABASE_URL", proxy.url_through(&env.database_url)),
            ("WORKER_METRICS_LISTEN", format!("127.0.0.1:{port}")),
        ],
    )
    .await;
    // Its sessions may work before its command consumer is up (a TLS broker takes longer).
    tests::eventually(Duration::from_secs(10), || async {
        probe(port, "/readyz").await.0 == 200
    })
    .await;
    let (status, body) = probe(port, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["lease"], &body["broker"], &body["database"]),
        (&"held".into(), &"consuming".into(), &"ok".into())
    );

    proxy.cut();
    tests::eventually(Duration::from_secs(10), || async {
        let (status, body) = probe(port, "/readyz").await;
        status == 503 && body["lease"] == "fenced" && body["database"] == "unreachable"
    })
    .await;
    // An outage is no reason to restart: a new process would not bring Postgres back.
    assert_eq!(probe(port, "/healthz").await.0, 200);

    proxy.restore();
    tests::eventually(Duration::from_secs(20), || async {
        probe(port, "/readyz").await.0 == 200
    })
    .await;
}

/// A fenced worker reclaims its sessions once Postgres is back, even while commands keep
/// starting actors of their own: those used to keep it from ever reclaiming the rest.
#[tokio::test]
async fn a_fenced_worker_reclaims_its_sessions_while_commands_keep_arriving() {
    let env = TestEnv::new().await;
    let (a, ids, proxy, _worker) = fenced_worker(&env).await;
    let api = env.start_api(|_| {}).await;
    let key = env.api_key("org_a", &["read", "manage"]).await;
    // `:restart` of one session, again and again, through the outage and after it: each
    // starts (or reaches) an actor of its own, which claims its session when it can.
    let restart = format!("/api/v1/sessions/{}:restart", ids[0]);
    let keep_restarting = async {
        loop {
            drop(api.post_in_background(&restart, &key)); // answered or not, it goes on
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let back = shared::db::now_ms() + 1_000;
    let outage_ends = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.restore();
        env.all_sessions(
            Duration::from_secs(20),
            "the others working again after the outage, commands or not",
            |p| p.id == ids[0] || working_on(p, &[&a], back),
        )
        .await;
    };
    tokio::select! {
        () = keep_restarting => {}
        () = outage_ends => {}
    }
    env.all_sessions(Duration::from_secs(10), "all working", |p| {
        working_on(p, &[&a], back)
    })
    .await;
}

/// Whether the broker has the gateway's command queue (a passive declare).
async fn has_queue(env: &TestEnv, gateway_id: &str) -> bool {
    let (_conn, ch, topology) = env.amqp().await;
    ch.queue_declare(
        topology.command_queue(gateway_id).as_str().into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn a_decommissioned_gateway_drains_to_its_peers_and_is_removed_with_its_queue() {
    let env = TestEnv::new().await;
    let (a, b) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.paired_sessions("org_a", &a, 20, 4).await;
    let before = pairings(&env.placed().await);
    let wa = resumed_process(&env, &a, &[]).await;
    let _wb = env.start_worker(&b, fast_fleet).await;

    let marked_at = shared::db::now_ms();
    let (ok, out) = crate::fleet::gatewayctl(&env, &["gateways", "decommission", &a]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{a} is drained"))
            && out.contains("its worker removes it when it stops"),
        "{out}"
    );
    env.all_sessions(Duration::from_secs(10), "on the peer", |p| {
        working_on(p, &[&b], marked_at)
    })
    .await;
    assert!(has_queue(&env, &a).await, "kept while its worker runs");

    assert!(wa.terminate(), "exits cleanly");
    assert_eq!(fleet_state(&env, &a).await, None, "its row is gone");
    assert!(!has_queue(&env, &a).await, "its command queue is gone");
    nothing_repaired_nor_connected_twice(&env, &before).await;

    // A gateway no worker runs any more (stopped, empty) is removed by the command itself.
    let c = env.gateway_id("sg");
    env.fake_gateway(&c, 3).await;
    {
        let (_conn, ch, topology) = env.amqp().await;
        topology
            .declare_gateway_queue(&ch, &c)
            .await
            .expect("queue");
    }
    let db = env.db.get().await.expect("db");
    shared::store::gateways::signed_off(&db, &c, "fake", 0)
        .await
        .expect("sign off");
    let (ok, out) = crate::fleet::gatewayctl(&env, &["gateways", "decommission", &c]).await;
    assert!(ok && out.contains(&format!("{c} is removed")), "{out}");
    assert_eq!(fleet_state(&env, &c).await, None);
    assert!(!has_queue(&env, &c).await);
}
