//! The bulk `… LIMIT n FOR UPDATE SKIP LOCKED` statements, run under the plan that fresh rows
//! without statistics can lead the planner to: a nested loop that runs the picking sub-select
//! again for every outer row. As `IN (sub-select)`, each run skipped the rows the statement
//! had already updated and picked the next ones, so a claim of 20 took every row. Each
//! statement must take at most its limit whatever the plan.

use deadpool_postgres::Object;
use serde_json::json;
use shared::{db::now_ms, error::ErrorBody};
use tests::TestEnv;
use worker::store::leases::{self, Mover, Whose};

const ROWS: usize = 300;
const LIMIT: i64 = 20;

/// A connection whose planner may use nothing but nested loops, unsorted and unhashed: the
/// plan that runs an `IN (…)` sub-select once per outer row.
async fn nested_loops_only(env: &TestEnv) -> Object {
    let client = env.db.get().await.expect("db");
    client
        .batch_execute(
            "SET enable_hashjoin = off; SET enable_mergejoin = off; SET enable_hashagg = off; \
             SET enable_material = off; SET enable_sort = off",
        )
        .await
        .expect("planner settings");
    client
}

#[tokio::test]
async fn a_bulk_claim_takes_at_most_its_page_under_any_plan() {
    let env = TestEnv::new().await;
    let gw = env.gateway_id("sg");
    env.paired_sessions("org_a", &gw, ROWS, 0).await;
    let client = nested_loops_only(&env).await;
    for whose in [Whose::Any, Whose::Unheld] {
        let instance = format!("{whose:?}");
        let page = leases::claim_running(&client, &gw, &instance, whose, "", LIMIT, &[])
            .await
            .expect("claim");
        assert_eq!(page.len() as i64, LIMIT, "{whose:?}");
        let held: i64 = client
            .query_one(
                "SELECT count(*) FROM sessions WHERE lease_holder = $1",
                &[&instance],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(held, LIMIT, "{whose:?}: rows claimed beyond the page");
    }
}

#[tokio::test]
async fn a_reassignment_moves_only_the_sessions_it_names_under_any_plan() {
    let env = TestEnv::new().await;
    let (from, to) = (env.gateway_id("sg"), env.gateway_id("sg"));
    let ids = env.paired_sessions("org_a", &from, ROWS, 0).await;
    let client = nested_loops_only(&env).await;
    let moves: Vec<(String, String)> = ids[..LIMIT as usize]
        .iter()
        .map(|id| (id.clone(), to.clone()))
        .collect();
    let moved = leases::reassign(&client, &from, &moves, Mover::Owner { instance: "other" })
        .await
        .expect("reassign");
    assert_eq!(moved.len() as i64, LIMIT);
    assert_eq!(
        leases::count_owned(&client, &to).await.expect("count"),
        LIMIT
    );
}

#[tokio::test]
async fn the_command_sweep_ends_at_most_its_limit_under_any_plan() {
    let env = TestEnv::new().await;
    let client = nested_loops_only(&env).await;
    let now = now_ms();
    let ids: Vec<String> = (0..ROWS).map(|_| ulid::Ulid::new().to_string()).collect();
    client
        .execute(
            "INSERT INTO commands (id, organization_id, session_id, gateway_id, kind, payload, \
             requested_by, created_at, deadline_at) \
             SELECT id, 'org_a', 's', 'gw', 'restart', '{}', 'test', $2::bigint, $2::bigint - 1000 \
             FROM unnest($1::text[]) AS t(id)",
            &[&ids, &now],
        )
        .await
        .expect("insert commands");
    let error = ErrorBody {
        code: shared::error::ErrorCode::GatewayTimeout,
        message: "overdue".into(),
        details: Default::default(),
    };
    let ended = shared::store::commands::expire_overdue(&client, now, &error, now, LIMIT)
        .await
        .expect("sweep");
    assert_eq!(ended as i64, LIMIT);
    let expired: i64 = client
        .query_one(
            "SELECT count(*) FROM commands WHERE status = 'expired'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(expired, LIMIT, "commands ended beyond the limit");
}

#[tokio::test]
async fn a_delivery_claim_leases_at_most_its_limit_under_any_plan() {
    let env = TestEnv::new().await;
    let client = nested_loops_only(&env).await;
    let now = now_ms();
    client
        .execute(
            "INSERT INTO webhooks (id, organization_id, url, events, secret_key_id, \
             secret_sealed, created_at, updated_at) \
             VALUES ('wh_1', 'org_a', 'https://example.test/hook', '{*}', 'k', '\\x00', $1, $1)",
            &[&now],
        )
        .await
        .expect("insert webhook");
    // One delivery for each of ROWS sessions: ROWS queues, each with its head due.
    let sessions: Vec<String> = (0..ROWS).map(|i| format!("s{i:04}")).collect();
    client
        .execute(
            "INSERT INTO webhook_deliveries (webhook_id, organization_id, session_id, \
             event_type, payload, next_attempt_at, created_at) \
             SELECT 'wh_1', 'org_a', s, 'webhook.test', $2, $1, $1 FROM unnest($3::text[]) AS t(s)",
            &[&now, &json!({}), &sessions],
        )
        .await
        .expect("insert deliveries");
    let limits = shared::store::deliveries::ClaimLimits {
        limit: LIMIT,
        per_endpoint: 1_000,
        per_org: 1_000,
    };
    let claimed = shared::store::deliveries::claim(&client, now, limits, 60_000, "t")
        .await
        .expect("claim");
    assert_eq!(claimed.len() as i64, LIMIT);
    let leased: i64 = client
        .query_one(
            "SELECT count(*) FROM webhook_deliveries WHERE claim_token = 't'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(leased, LIMIT, "deliveries leased beyond the limit");
}

#[tokio::test]
async fn a_rebalance_marks_at_most_what_it_asks_under_any_plan() {
    let env = TestEnv::new().await;
    let (from, to) = (env.gateway_id("sg"), env.gateway_id("sg"));
    env.paired_sessions("org_a", &from, ROWS, 0).await;
    let client = nested_loops_only(&env).await;
    let marked = shared::store::sessions::mark_moves(&client, &from, &to, LIMIT, 60_000)
        .await
        .expect("mark");
    assert_eq!(marked as i64, LIMIT);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM sessions WHERE move_to = $1", &[&to])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, LIMIT, "rows marked beyond the limit");
}
