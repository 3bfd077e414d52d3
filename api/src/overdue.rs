//! Commands whose end never came. Every command ends `succeeded`, `failed` or `expired`: the
//! worker records its outcome, or the api records the dead letter of one no worker took. Both
//! can be skipped by a fault (a dead letter lost in a broker restart: quorum queues
//! dead-letter at most once; a worker killed after taking a command it never finished), so
//! every replica also sweeps Postgres for commands still pending past their deadline plus
//! `COMMAND_SWEEP_GRACE_MS`, and ends them `expired`. The grace outlasts any run a worker
//! started before the deadline (a worker does not start a command past it), so a sweep never
//! races a command that is still running.

use std::time::Duration;

use deadpool_postgres::Pool;
use shared::{ErrorCode, db::now_ms, error::ErrorBody, store};
use tokio_util::sync::CancellationToken;

/// Commands ended per statement; a backlog takes several sweeps of one tick each.
const BATCH: i64 = 1_000;

pub fn start(db: Pool, every: Duration, grace: Duration, shutdown: CancellationToken) {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let error = ErrorBody {
        code: ErrorCode::GatewayTimeout,
        message: "the command expired: no gateway recorded its outcome by its deadline".into(),
        details: Default::default(),
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            loop {
                let now = now_ms();
                let swept = match db.get().await {
                    Ok(client) => {
                        store::commands::expire_overdue(&client, now - grace_ms, &error, now, BATCH)
                            .await
                    }
                    Err(e) => Err(e.into()),
                };
                match swept {
                    Ok(n) => {
                        if n > 0 {
                            tracing::warn!(commands = n, "ended overdue commands as expired");
                            metrics::counter!("api_commands_expired_by_sweep_total").increment(n);
                        }
                        if n < BATCH as u64 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot sweep overdue commands now");
                        break;
                    }
                }
            }
        }
    });
}
