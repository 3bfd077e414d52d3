//! Sending a session's messages: in order, one at a time, never more than `ratePerMin` in any
//! minute nor `ratePerHour` in any hour.
//!
//! The queue is the session's `queued` rows in Postgres; the actor is woken to look at it
//! ([`Actor::pump`]) when messages are queued (`SendMessages`), when the session's settings
//! change, when its connection comes up, and when the rate windows let the next one go. The
//! windows count send *attempts* as recorded in Postgres, so they hold across a restart, a
//! drain and a failover. An attempt is recorded before the send: a message whose worker died
//! mid-send is found `sending` by the next owner and ends `failed` (`unknown`), never sent
//! twice. A send the driver says sent nothing (the device's key store away) keeps its place
//! and goes again after a pause ([`SendAgain`]); the next message waits behind it.

use std::{collections::VecDeque, time::Duration};

use shared::{
    db::now_ms,
    message::{Content, Message, MessageStatus},
    session::SessionStatus,
};

use super::{Actor, Flow, retrying};
use crate::{
    ctx::Ctx,
    driver::{DriverError, Outgoing},
    store::messages::{self, Change, Which, Written},
};

/// What a message left `sending` by a worker that stopped says.
pub(super) const UNKNOWN: &str =
    "unknown: the worker sending it stopped before recording the outcome; not sent again";

/// A message the driver sent nothing of, for a passing fault of its own: it stays
/// `sending` in the actor's hands and goes again, first in line.
pub(super) struct SendAgain {
    message: Message,
    /// Tries after the first so far.
    tries: u32,
}

/// How often a message that sent nothing goes again, after pauses of 1, 2, 4, 8 and 16 s
/// (31 s in all, past a PostgreSQL restart), before it fails with why.
const SEND_AGAIN_TRIES: u32 = 5;

/// When the next attempt may start, given the earlier attempts (oldest first, all within the
/// last hour): `None` when it may start now.
pub(super) fn next_allowed(
    attempts: &VecDeque<i64>,
    now: i64,
    per_min: i64,
    per_hour: i64,
    minute_ms: i64,
) -> Option<i64> {
    // With `n` allowed per window `w`, the next may go once the n-th latest attempt has left it.
    let free_at = |n: i64, w: i64| {
        let n = usize::try_from(n.max(1)).unwrap_or(usize::MAX);
        match attempts.len().checked_sub(n) {
            Some(i) => attempts[i] + w,
            None => i64::MIN,
        }
    };
    let at = free_at(per_min, minute_ms).max(free_at(per_hour, minute_ms * 60));
    (at > now).then_some(at)
}

impl Actor {
    /// Wakes the sender as soon as the actor is free.
    pub(super) fn pump_soon(&mut self) {
        self.send_at = Some(tokio::time::Instant::now());
    }

    fn pump_in(&mut self, ms: i64) {
        let wait = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        self.send_at = Some(tokio::time::Instant::now() + wait);
    }

    /// Sends the session's next queued message if it is connected and its limits allow, then
    /// plans the next look.
    pub(super) async fn pump(&mut self) -> Flow {
        self.send_at = None;
        if self.row.status != SessionStatus::Working || self.conn.is_none() {
            return Flow::Continue;
        }
        let now = now_ms();
        let minute = self.ctx.rate_minute_ms;
        let hour = minute * 60;
        let mut attempts = match self.attempts.take() {
            Some(a) => a,
            None => match messages::attempts_since(&self.ctx.db, &self.row.id, now - hour).await {
                Ok(a) => VecDeque::from(a),
                Err(e) => {
                    tracing::warn!(session_id = %self.row.id, error = %e, "cannot read the send window; retrying");
                    self.pump_in(1_000);
                    return Flow::Continue;
                }
            },
        };
        while attempts.front().is_some_and(|t| *t <= now - hour) {
            attempts.pop_front();
        }
        let limits = (
            i64::from(self.row.rate_per_min),
            i64::from(self.row.rate_per_hour),
        );
        let wait = next_allowed(&attempts, now, limits.0, limits.1, minute);
        self.attempts = Some(attempts);
        if let Some(at) = wait {
            metrics::counter!("worker_message_rate_waits_total").increment(1);
            self.pump_in(at - now);
            return Flow::Continue;
        }
        let (message, outgoing, tries) = match self.again.take() {
            Some(again) => match self.send_again(again).await {
                Ok(next) => next,
                Err(flow) => return flow,
            },
            None => match self.next_to_send(now).await {
                Ok((message, outgoing)) => (message, outgoing, 0),
                Err(flow) => return flow,
            },
        };
        if self.row.presence_typing {
            // "typing…" for as long as a person would take to type it, within bounds.
            let chars = u64::try_from(message.content.text().chars().count()).unwrap_or(u64::MAX);
            let wait = self
                .ctx
                .typing_per_char
                .saturating_mul(chars.min(u64::from(u32::MAX)) as u32);
            let wait = wait.min(self.ctx.typing_max);
            if let Some(conn) = self.conn.as_mut()
                && let Err(e) = conn.typing(&message.to).await
            {
                tracing::debug!(session_id = %self.row.id, error = %e, "cannot show typing");
            }
            let lost = self.lease.lost.clone();
            let cut = tokio::select! {
                _ = lost.cancelled() => true,
                _ = tokio::time::sleep(wait) => false,
            };
            if cut {
                return self.lost();
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Flow::Continue;
        };
        let outcome = match conn.send(outgoing).await {
            Ok(wa_id) => Change {
                from: &[MessageStatus::Sending],
                to: MessageStatus::Sent,
                error: None,
                wa_message_id: wa_id,
            },
            Err(DriverError::NotSent(why)) if tries < SEND_AGAIN_TRIES => {
                let wait = 1_000 << tries;
                tracing::warn!(session_id = %self.row.id, message_id = %message.id, error = %why, retry_in_ms = wait, "nothing of the message went out; sending it again");
                metrics::counter!("worker_messages_sent_again_total").increment(1);
                self.again = Some(SendAgain {
                    message,
                    tries: tries + 1,
                });
                self.pump_in(wait);
                return Flow::Continue;
            }
            Err(e) => Change {
                from: &[MessageStatus::Sending],
                to: MessageStatus::Failed,
                error: Some(e.to_string()),
                wa_message_id: None,
            },
        };
        metrics::counter!("worker_messages_total", "gateway" => self.ctx.gateway_id.clone(), "outcome" => outcome.to.as_str())
            .increment(1);
        let flow = self.set_messages(Which::Id(message.id), outcome).await;
        self.pump_soon();
        flow
    }

    /// A message that sent nothing, as the driver sends it again (what it refers to read
    /// anew); `Err(flow)` when it does not go now.
    async fn send_again(&mut self, again: SendAgain) -> Result<(Message, Outgoing, u32), Flow> {
        match outgoing(&self.ctx, &self.row.id, &again.message).await {
            Ok(Ok(outgoing)) => Ok((again.message, outgoing, again.tries)),
            Ok(Err(why)) => Err(self.refuse(again.message.id, Some(why), true).await),
            Err(e) => {
                tracing::warn!(session_id = %self.row.id, error = %e, "cannot read the messages a message refers to; retrying");
                self.again = Some(again);
                self.pump_in(1_000);
                Err(Flow::Continue)
            }
        }
    }

    /// The message waiting to go again, back in the queue (the actor ends, or hands the
    /// session over): nothing of it went out, so the next owner sends it.
    pub(super) async fn queue_again(&mut self) -> Flow {
        self.let_go_again(MessageStatus::Queued, None).await
    }

    /// The message waiting to go again, if there is one, from `sending` to `to`.
    async fn let_go_again(&mut self, to: MessageStatus, error: Option<String>) -> Flow {
        let Some(again) = self.again.take() else {
            return Flow::Continue;
        };
        let change = Change {
            from: &[MessageStatus::Sending],
            to,
            error,
            wa_message_id: None,
        };
        self.set_messages(Which::Id(again.message.id), change).await
    }

    /// The session's next message, claimed (`sending`: the attempt is on record before
    /// anything goes out), as the driver sends it; `Err(flow)` when none goes now.
    async fn next_to_send(&mut self, now: i64) -> Result<(Message, Outgoing), Flow> {
        let claim = Change {
            from: &[MessageStatus::Queued],
            to: MessageStatus::Sending,
            error: None,
            wa_message_id: None,
        };
        // One that needs nothing read (a text, a place, a card or a poll, quoting nothing)
        // is claimed in the status writer's batch without being read first.
        match self.write_status(Which::Next, claim.clone(), now).await {
            Ok(Some(written)) => {
                self.ctx.outbox.events(&written.events).await;
                if let Some(message) = written.claimed {
                    self.attempted(now);
                    return match outgoing(&self.ctx, &self.row.id, &message).await {
                        Ok(Ok(outgoing)) => Ok((message, outgoing)),
                        Ok(Err(why)) => Err(self.refuse(message.id, Some(why), true).await),
                        Err(e) => Err(self.refuse(message.id, Some(e.to_string()), true).await),
                    };
                }
            }
            Ok(None) => return Err(self.lost()),
            Err(e) => {
                tracing::warn!(session_id = %self.row.id, error = %e, "cannot claim the next message; retrying");
                self.pump_in(1_000);
                return Err(Flow::Continue);
            }
        }
        // The others are read first, with what they refer to and the file they carry (they
        // wait queued while those cannot be read), then claimed.
        let message = match messages::next_queued(&self.ctx.db, &self.row.id).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(kind))) => {
                // In order or not at all: the queue waits for a worker that knows the type
                // (the next process of this gateway, in a rolling update).
                tracing::warn!(session_id = %self.row.id, kind, "the next message is of a type this worker does not know; leaving it to a newer worker");
                metrics::counter!("worker_message_unknown_type_waits_total").increment(1);
                self.pump_in(5_000);
                return Err(Flow::Continue);
            }
            Ok(None) => return Err(Flow::Continue),
            Err(e) => {
                tracing::warn!(session_id = %self.row.id, error = %e, "cannot read the message queue; retrying");
                self.pump_in(1_000);
                return Err(Flow::Continue);
            }
        };
        let outgoing = match outgoing(&self.ctx, &self.row.id, &message).await {
            Ok(Ok(outgoing)) => outgoing,
            Ok(Err(why)) => return Err(self.refuse(message.id, Some(why), false).await),
            Err(e) => {
                tracing::warn!(session_id = %self.row.id, error = %e, "cannot read the messages a message refers to; retrying");
                self.pump_in(1_000);
                return Err(Flow::Continue);
            }
        };
        match self
            .write_status(Which::Id(message.id.clone()), claim, now)
            .await
        {
            Ok(Some(written)) if written.events.is_empty() => {
                // Failed or moved meanwhile: on to the next.
                self.pump_soon();
                Err(Flow::Continue)
            }
            Ok(Some(written)) => {
                self.ctx.outbox.events(&written.events).await;
                self.attempted(now);
                Ok((message, outgoing))
            }
            Ok(None) => Err(self.lost()),
            Err(e) => {
                tracing::warn!(session_id = %self.row.id, error = %e, "cannot record a send attempt; retrying");
                self.pump_in(1_000);
                Err(Flow::Continue)
            }
        }
    }

    /// A send attempt began at `now`: the rate windows count it.
    fn attempted(&mut self, now: i64) {
        if let Some(a) = self.attempts.as_mut() {
            a.push_back(now);
        }
    }

    /// A message that cannot go out (`claimed`: from `sending`, else from `queued`) fails
    /// with why; on to the next.
    async fn refuse(&mut self, id: String, why: Option<String>, claimed: bool) -> Flow {
        let refused = Change {
            from: if claimed {
                &[MessageStatus::Sending]
            } else {
                &[MessageStatus::Queued]
            },
            to: MessageStatus::Failed,
            error: why,
            wa_message_id: None,
        };
        let flow = self.set_messages(Which::Id(id), refused).await;
        self.pump_soon();
        flow
    }

    /// The recipient's phone got or read a message.
    pub(super) async fn on_receipt(&mut self, wa_message_id: &str, read: bool) -> Flow {
        let change = if read {
            Change {
                from: &[MessageStatus::Sent, MessageStatus::Delivered],
                to: MessageStatus::Read,
                error: None,
                wa_message_id: None,
            }
        } else {
            Change {
                from: &[MessageStatus::Sent],
                to: MessageStatus::Delivered,
                error: None,
                wa_message_id: None,
            }
        };
        self.set_messages(Which::WaId(wa_message_id.to_owned()), change)
            .await
    }

    /// Fails every queued message of the session, and one waiting to go again (it was stopped
    /// or logged out).
    pub(super) async fn fail_queued(&mut self, why: &str) -> Flow {
        self.send_at = None;
        let why_failed = Some(why.to_owned());
        if let Flow::Stop = self.let_go_again(MessageStatus::Failed, why_failed).await {
            return Flow::Stop;
        }
        let change = Change {
            from: &[MessageStatus::Queued],
            to: MessageStatus::Failed,
            error: Some(why.to_owned()),
            wa_message_id: None,
        };
        self.set_messages(Which::All, change).await
    }

    /// A message a previous owner was sending when it stopped may or may not have gone out:
    /// it ends `failed` rather than risk sending it twice.
    pub(super) async fn forget_unknown_sends(&mut self) -> Flow {
        let change = Change {
            from: &[MessageStatus::Sending],
            to: MessageStatus::Failed,
            error: Some(UNKNOWN.to_owned()),
            wa_message_id: None,
        };
        self.set_messages(Which::All, change).await
    }

    /// Writes a status change of the session's messages with its events, under this
    /// actor's lease: what it wrote, or `None` when the lease is lost.
    async fn write_status(
        &mut self,
        which: Which,
        change: Change,
        now: i64,
    ) -> shared::Result<Option<Written>> {
        self.ctx
            .statuses
            .set_status(&self.row, self.epoch, which, change, now)
            .await
    }

    /// Writes a status change of messages with its events and publishes them, retrying a
    /// failed write until it lands or the lease is lost.
    async fn set_messages(&mut self, which: Which, change: Change) -> Flow {
        let (statuses, row, epoch) = (&self.ctx.statuses, &self.row, self.epoch);
        let written = retrying(&self.lease, &row.id, "record a message's status", || {
            statuses.set_status(row, epoch, which.clone(), change.clone(), now_ms())
        });
        match written.await {
            Some(Some(written)) => {
                self.ctx.outbox.events(&written.events).await;
                Flow::Continue
            }
            Some(None) | None => self.lost(),
        }
    }
}

/// A claimed message as the driver sends it: the messages it quotes, reacts to, edits or
/// revokes looked up by WhatsApp's ids. `Err(why)` inside when one of them has none (it
/// failed, or was never sent): the message cannot go out.
async fn outgoing(
    ctx: &Ctx,
    session_id: &str,
    m: &Message,
) -> shared::Result<Result<Outgoing, String>> {
    let db = &ctx.db;
    let mut resolved = [None, None];
    let verb = match m.content {
        Content::Edit { .. } => "edits",
        Content::Revoke { .. } => "deletes",
        _ => "reacts to",
    };
    for (slot, (id, what)) in resolved.iter_mut().zip([
        (m.reply_to.as_deref(), "quotes"),
        (m.content.refers_to(), verb),
    ]) {
        let Some(id) = id else { continue };
        match messages::reference(db, session_id, id).await? {
            Some(r) => *slot = Some(r),
            None => {
                return Ok(Err(format!(
                    "the message it {what} ({id}) was never sent or received"
                )));
            }
        }
    }
    let [reply_to, refers_to] = resolved;
    let media = match m.content.media() {
        None => None,
        Some((_, file)) => {
            let Some(bytes) = ctx.media.open(db, &file.media_id).await? else {
                return Ok(Err(format!(
                    "the file it carries ({}) is gone: it expired before its turn",
                    file.media_id
                )));
            };
            Some(bytes)
        }
    };
    Ok(Ok(Outgoing {
        to: m.to.clone(),
        content: m.content.clone(),
        reply_to,
        refers_to,
        media,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn the_minute_window_lets_the_next_go_when_the_oldest_leaves_it() {
        let a: VecDeque<i64> = [1_000, 2_000, 3_000].into();
        assert_eq!(next_allowed(&a, 3_500, 5, 600, MIN), None);
        assert_eq!(next_allowed(&a, 3_500, 3, 600, MIN), Some(1_000 + MIN));
        assert_eq!(next_allowed(&a, 3_500, 2, 600, MIN), Some(2_000 + MIN));
        assert_eq!(next_allowed(&a, 1_000 + MIN, 3, 600, MIN), None);
    }

    #[test]
    fn the_hour_window_binds_when_it_is_tighter() {
        let a: VecDeque<i64> = (0..10).map(|i| i * MIN).collect();
        let now = 9 * MIN + 1;
        assert_eq!(next_allowed(&a, now, 5, 10, MIN), Some(60 * MIN));
        assert_eq!(next_allowed(&a, now, 5, 11, MIN), None);
    }

    #[test]
    fn nothing_sent_means_free_to_send() {
        assert_eq!(next_allowed(&VecDeque::new(), 0, 1, 1, MIN), None);
    }
}
