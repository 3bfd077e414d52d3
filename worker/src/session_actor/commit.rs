//! How a command or a driver event ends: its session change, events and outcome written to
//! Postgres under the lease's epoch, then the events published, the reply sent and the
//! delivery acked.
//!
//! A write the database refuses for a passing fault is retried: a driver event's write with
//! backoff until it lands or the lease is lost (a session is never left `starting` because
//! the pool was saturated for a moment), a command's by the broker (the delivery is
//! requeued). A write that matches no row means another worker holds the session now: the
//! actor lets go, and a command it held is answered "moved" so the api sends it to the new
//! owner.

use std::time::Duration;

use serde_json::Value;
use shared::{
    db::now_ms,
    error::ErrorBody,
    protocol::{CommandOutput, EventKind, Outcome},
};

use super::{Actor, Answer, Effects, Flow, Job, back_off};
use crate::{
    ctx::Ctx,
    store::{self, Change, Done},
};

/// Answers a command whose session this worker does not hold, and records its end.
pub(super) async fn finish_without_session(ctx: &Ctx, job: &Job, error: ErrorBody) {
    let outcome = Outcome::Error(error.clone());
    let value = serde_json::to_value(&outcome).unwrap_or(Value::Null);
    let done = Done {
        env: &job.env,
        error: Some(&error),
        outcome: &value,
    };
    if let Ok(client) = ctx.db.get().await {
        let _ = shared::store::commands::record_end(&client, &done, now_ms()).await;
    }
    ctx.outbox.reply(job, outcome).await;
    job.ack().await;
    metrics::counter!("worker_commands_total", "kind" => job.env.command.kind(), "outcome" => error.code.as_str())
        .increment(1);
}

/// Answers "moved" to a command for a session another gateway owns now. It did not run and
/// gets no record here: the api sends it on to the owner, who records it. A notice nobody
/// waits for (messages queued, settings changed) goes on to the owner from here: published
/// while the session was moving, it would otherwise wait for the owner's next reason to look
/// (a message accepted mid-drain stayed queued on a working session).
pub(super) async fn moved(ctx: &Ctx, job: &Job) {
    tracing::info!(command_id = %job.env.id, session_id = %job.env.session_id, "session moved; answering so");
    ctx.outbox.reply(job, Outcome::Moved).await;
    if job.reply_to.is_none()
        && let Ok(Some(owner)) = store::gateway_of(&ctx.db, &job.env.session_id).await
        && owner != ctx.gateway_id
    {
        ctx.outbox.forward(&job.env, &owner).await;
    }
    job.ack().await;
    metrics::counter!("worker_commands_total", "kind" => job.env.command.kind(), "outcome" => "moved")
        .increment(1);
}

impl Actor {
    /// Writes a change that no command asked for (a driver event, a resume), retrying a
    /// failed write until it lands or the lease is lost.
    pub(super) async fn apply(&mut self, change: Option<Change>, events: Vec<EventKind>) -> Flow {
        let events = self.with_status_event(change.as_ref(), events);
        let mut backoff = Duration::from_millis(100);
        loop {
            let written = store::write(
                &self.ctx.db,
                &self.ctx.writer,
                &self.row,
                self.epoch,
                change.as_ref(),
                events.clone(),
                None,
                now_ms(),
            )
            .await;
            match written {
                Ok((Some(row), events)) => {
                    self.row = row;
                    self.ctx.outbox.events(&events).await;
                    return Flow::Continue;
                }
                Ok((None, _)) => return self.lost(),
                Err(e) => {
                    tracing::warn!(session_id = %self.row.id, error = %e, "could not record a session change; retrying");
                    metrics::counter!("worker_write_retries_total").increment(1);
                    if !back_off(&self.lease.clone(), &mut backoff).await {
                        return self.lost();
                    }
                }
            }
        }
    }

    /// Adds `session.status` when the change moves the status or its reason.
    fn with_status_event(
        &self,
        change: Option<&Change>,
        mut events: Vec<EventKind>,
    ) -> Vec<EventKind> {
        if let Some(c) = change
            && (c.status != self.row.status
                || c.reason != self.row.status_reason
                || c.details != self.row.status_details)
        {
            events.insert(
                0,
                EventKind::Status {
                    status: c.status,
                    status_reason: c.reason,
                    status_details: c.details.clone(),
                },
            );
        }
        events
    }

    /// Writes a command's effects and outcome, then publishes, replies and acks.
    pub(super) async fn commit(&mut self, job: &Job, effects: Effects) -> Flow {
        let kind = job.env.command.kind();
        let now = now_ms();
        let Effects {
            mut change,
            events,
            answer,
        } = effects;
        if let Answer::Deleted = answer {
            return self.commit_delete(job, now).await;
        }
        // What the owner asked for is remembered when the command did something.
        if let Some(desired) = job.env.command.desired_state()
            && desired != self.row.desired_state
            && (change.is_some() || !matches!(answer, Answer::Error(_)))
        {
            change
                .get_or_insert_with(|| Change {
                    details: self.row.status_details.clone(),
                    ..self.change(self.row.status, self.row.status_reason)
                })
                .desired = Some(desired);
        }
        // The record a redelivery answers from. An answer that is the session itself is
        // recorded as null and answered with the session as it is then: keeping a copy of the
        // whole row in every command row would double what each command writes.
        let recorded = match &answer {
            Answer::Row => None,
            Answer::Output(o) => Some(Outcome::Ok(o.clone())),
            Answer::Error(e) => Some(Outcome::Error(e.clone())),
            Answer::Deleted => Some(Outcome::Ok(CommandOutput::Deleted)),
        };
        let value = recorded
            .as_ref()
            .and_then(|o| serde_json::to_value(o).ok())
            .unwrap_or(Value::Null);
        let error = match &recorded {
            Some(Outcome::Error(e)) => Some(e),
            _ => None,
        };
        let done = Done {
            env: &job.env,
            error,
            outcome: &value,
        };
        let events = self.with_status_event(change.as_ref(), events);
        match store::write(
            &self.ctx.db,
            &self.ctx.writer,
            &self.row,
            self.epoch,
            change.as_ref(),
            events,
            Some(&done),
            now,
        )
        .await
        {
            Ok((Some(row), events)) => {
                self.row = row;
                self.ctx.outbox.events(&events).await;
                let outcome = recorded.unwrap_or_else(|| {
                    Outcome::Ok(CommandOutput::Session(Box::new(self.row.clone())))
                });
                let label = match &outcome {
                    Outcome::Ok(_) => "ok",
                    Outcome::Error(e) => e.code.as_str(),
                    Outcome::Moved => "moved",
                };
                self.ctx.outbox.reply(job, outcome).await;
                job.ack().await;
                metrics::counter!("worker_commands_total", "kind" => kind, "outcome" => label)
                    .increment(1);
                Flow::Continue
            }
            Ok((None, _)) => {
                // Fenced: another worker holds the session now (or it was deleted); the
                // command is for the new owner to run.
                moved(&self.ctx, job).await;
                self.lost()
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record a command's outcome; requeueing");
                job.requeue_after_fault().await;
                Flow::Continue
            }
        }
    }

    async fn commit_delete(&mut self, job: &Job, now: i64) -> Flow {
        let outcome = Outcome::Ok(CommandOutput::Deleted);
        let value = serde_json::to_value(&outcome).unwrap_or(Value::Null);
        let done = Done {
            env: &job.env,
            error: None,
            outcome: &value,
        };
        match store::delete(&self.ctx.db, &self.row, self.epoch, &done, now).await {
            Ok(Some(event)) => {
                self.ctx.outbox.events(std::slice::from_ref(&event)).await;
                self.ctx.outbox.reply(job, outcome).await;
                job.ack().await;
                metrics::counter!("worker_commands_total", "kind" => job.env.command.kind(), "outcome" => "ok")
                    .increment(1);
                Flow::Stop
            }
            Ok(None) => {
                moved(&self.ctx, job).await;
                self.lost()
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record a delete; requeueing");
                job.requeue_after_fault().await;
                Flow::Continue
            }
        }
    }
}
