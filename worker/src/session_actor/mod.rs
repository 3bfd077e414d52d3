//! One task per session: its commands run in order, sessions run in parallel.
//!
//! The actor owns the session's driver connection and its lease. Read it by file:
//! - here, the actor itself: claiming the session, the loop that serves its inbox, its
//!   connection's events and its lease, resuming a session after a start-up or a move, and
//!   handing it to a peer (drain);
//! - [`commands`]: every command, one match arm per [`Command`](shared::protocol::Command);
//! - [`driver_events`]: what WhatsApp (or its simulation) says on its own;
//! - [`messages`]: sending the session's messages, and what becomes of them;
//! - [`inbound`]: what reaches the number, files downloaded beside the actor;
//! - [`commit`]: how both end — the session change, its events and the command's outcome
//!   written to Postgres fenced by the lease, then the events published, the reply sent and
//!   the delivery acked, in that order, so a crash anywhere before the ack leaves a command
//!   either not done (redelivered, runs) or done and recorded (redelivered, answered from the
//!   record without running again).
//!
//! A lost lease (another worker claimed the session, or this one could not renew in time)
//! closes the connection at once and ends the actor: it writes nothing more.

mod commands;
mod commit;
mod driver_events;
mod inbound;
mod messages;

use std::{sync::Arc, time::Duration};

use lapin::{
    Acker,
    options::{BasicAckOptions, BasicNackOptions},
};
use shared::{
    ErrorCode,
    error::ErrorBody,
    protocol::{CommandEnvelope, CommandOutput, EventKind},
    session::{DesiredState, Session, SessionStatus, StatusReason},
};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use crate::{
    ctx::Ctx,
    driver::{Connection, Credentials, DriverError, DriverEvent},
    registry::Lease,
    store::{
        self, Change, Pairing,
        leases::{self, Claimed},
    },
};

/// A delivered command, waiting for its session's actor.
pub struct Job {
    pub env: CommandEnvelope,
    pub acker: Acker,
    pub reply_to: Option<String>,
    pub redelivered: bool,
    /// Earlier deliveries of this command (the quorum queue's `x-delivery-count`).
    pub earlier_deliveries: u32,
}

impl Job {
    async fn ack(&self) {
        // After a broker reconnect this delivery's channel is gone and the ack fails (or
        // answers false): the message is redelivered and answered from its record.
        let _ = self.acker.ack(BasicAckOptions::default()).await;
    }

    /// Puts the command back after a fault kept its outcome from being recorded, after a
    /// pause that doubles with each delivery (1 s, 2 s, 4 s, … up to 8 s, never past the
    /// deadline): the queue dead-letters a command after a few deliveries, and at once they
    /// would all be spent within a database restart.
    pub(crate) async fn requeue_after_fault(&self) {
        let pause = Duration::from_secs(1 << self.earlier_deliveries.min(3));
        let left = u64::try_from(self.env.deadline_ms - shared::db::now_ms()).unwrap_or(0);
        tokio::time::sleep(pause.min(Duration::from_millis(left))).await;
        self.requeue().await;
    }

    pub(crate) async fn requeue(&self) {
        let _ = self
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }
}

/// What an actor's inbox carries.
pub enum Msg {
    /// A command (boxed: inboxes are many and small).
    Job(Box<Job>),
    /// Disconnect, then make `to` the session's owner (a drain); answered on `done`.
    HandOff {
        to: String,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Look at the session's queue (it has held a message a while).
    WakeSender,
}

/// What a command asks to answer once its effects are written.
enum Answer {
    /// The refreshed session row.
    Row,
    Output(CommandOutput),
    Error(ErrorBody),
    Deleted,
}

struct Effects {
    change: Option<Change>,
    events: Vec<EventKind>,
    answer: Answer,
}

impl Effects {
    fn row() -> Self {
        Effects {
            change: None,
            events: vec![],
            answer: Answer::Row,
        }
    }

    fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Effects {
            change: None,
            events: vec![],
            answer: Answer::Error(body(code, message)),
        }
    }
}

fn body(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code,
        message: message.into(),
        details: Default::default(),
    }
}

fn driver_error(e: DriverError) -> ErrorBody {
    match e {
        DriverError::Unsupported => body(
            ErrorCode::InvalidArgument,
            "this gateway's WhatsApp driver does not support that",
        ),
        DriverError::Refused(why) => body(ErrorCode::Conflict, why),
        DriverError::Connection(why) | DriverError::NotSent(why) => {
            body(ErrorCode::GatewayUnavailable, why)
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

struct Actor {
    ctx: Arc<Ctx>,
    row: Session,
    epoch: i64,
    lease: Arc<Lease>,
    credentials: Option<Credentials>,
    conn: Option<Box<dyn Connection>>,
    conn_events: Option<mpsc::UnboundedReceiver<DriverEvent>>,
    /// Held while a connection is being set up, so only so many are at once.
    connecting: Option<OwnedSemaphorePermit>,
    qr: Option<(String, i64)>,
    /// When to try connecting again after a connection could not be made, and the wait
    /// before the next try after that one.
    retry: Option<tokio::time::Instant>,
    retry_backoff: Duration,
    /// When to look at the message queue next ([`messages`]), and the send attempts of the
    /// last hour (read from Postgres on first use).
    send_at: Option<tokio::time::Instant>,
    attempts: Option<std::collections::VecDeque<i64>>,
    /// A message that sent nothing, to go again before any other ([`messages`]).
    again: Option<messages::SendAgain>,
    /// Files contacts sent, downloading beside the actor ([`inbound`]).
    fetching: inbound::Fetching,
}

/// The first wait before connecting again after a failed connect, and the longest.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Serves one session until its inbox closes (shutdown), it loses the lease, or it hands the
/// session over. `claimed`: the lease was already taken in bulk.
pub async fn run(
    ctx: Arc<Ctx>,
    session_id: String,
    lease: Arc<Lease>,
    mut inbox: mpsc::Receiver<Msg>,
    claimed: Option<Claimed>,
) {
    let claimed = match claimed {
        Some(c) => c,
        None => match claim(&ctx, &session_id).await {
            Ok(c) => c,
            Err(refusal) => {
                inbox.close();
                while let Some(msg) = inbox.recv().await {
                    refusal.answer(&ctx, msg).await;
                }
                return;
            }
        },
    };
    lease.set_epoch(claimed.epoch);
    let mut actor = Actor {
        ctx,
        row: claimed.session,
        epoch: claimed.epoch,
        lease,
        credentials: claimed.credentials,
        conn: None,
        conn_events: None,
        connecting: None,
        qr: None,
        retry: None,
        retry_backoff: RETRY_FIRST,
        send_at: None,
        attempts: None,
        again: None,
        fetching: inbound::Fetching::default(),
    };
    let lost = actor.lease.lost.clone();
    // The work of one message is boxed: an idle actor (most of a worker's tens of thousands)
    // then keeps only this loop's small state, not the largest path through a command.
    let mut flow = Box::pin(actor.resume()).await;
    while let Flow::Continue = flow {
        flow = tokio::select! {
            _ = lost.cancelled() => actor.lost(),
            msg = inbox.recv() => match msg {
                Some(Msg::Job(job)) => Box::pin(actor.on_job(*job)).await,
                Some(Msg::HandOff { to, done }) => Box::pin(actor.hand_off(&to, done)).await,
                Some(Msg::WakeSender) => {
                    if actor.send_at.is_none() {
                        actor.pump_soon();
                    }
                    Flow::Continue
                }
                None => Flow::Stop,
            },
            event = next_event(&mut actor.conn_events) => match event {
                Some(event) => Box::pin(actor.on_driver_event(event)).await,
                None => {
                    actor.conn_events = None;
                    Flow::Continue
                }
            },
            _ = retry_at(actor.retry) => Box::pin(actor.retry_connect()).await,
            _ = retry_at(actor.send_at) => Box::pin(actor.pump()).await,
            done = actor.fetching.next() => Box::pin(actor.on_fetched(done)).await,
        };
    }
    actor.disconnect().await;
    if !actor.lease.lost.is_cancelled() {
        actor.queue_again().await;
    }
    inbox.close();
    while let Some(msg) = inbox.recv().await {
        match msg {
            Msg::Job(job) => job.requeue().await,
            Msg::HandOff { done, .. } => {
                let _ = done.send(Err("the session's actor ended".into()));
            }
            Msg::WakeSender => {}
        }
    }
}

/// Why an actor could not claim its session, and how it answers what it was sent.
enum Refusal {
    /// Deleted, or never was.
    Gone,
    /// Another gateway owns it now.
    Moved,
    /// The database could not be asked: the broker will redeliver.
    Unknown,
}

impl Refusal {
    async fn answer(&self, ctx: &Ctx, msg: Msg) {
        let job = match msg {
            Msg::Job(job) => job,
            Msg::HandOff { done, .. } => {
                let _ = done.send(Err("this worker does not hold the session".into()));
                return;
            }
            Msg::WakeSender => return,
        };
        match self {
            Refusal::Gone => {
                commit::finish_without_session(
                    ctx,
                    &job,
                    body(ErrorCode::NotFound, "session not found"),
                )
                .await
            }
            Refusal::Moved => commit::moved(ctx, &job).await,
            Refusal::Unknown => job.requeue().await,
        }
    }
}

async fn claim(ctx: &Ctx, session_id: &str) -> Result<Claimed, Refusal> {
    match leases::claim(&ctx.writer, session_id, &ctx.gateway_id, &ctx.instance).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => match store::gateway_of(&ctx.db, session_id).await {
            Ok(None) => Err(Refusal::Gone),
            Ok(Some(_)) => Err(Refusal::Moved),
            Err(_) => Err(Refusal::Unknown),
        },
        Err(e) => {
            tracing::warn!(session_id, error = %e, "cannot claim the session; requeueing");
            Err(Refusal::Unknown)
        }
    }
}

async fn retry_at(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_event(rx: &mut Option<mpsc::UnboundedReceiver<DriverEvent>>) -> Option<DriverEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    fn paired(&self) -> bool {
        self.credentials.is_some()
    }

    fn change(&self, status: SessionStatus, reason: Option<StatusReason>) -> Change {
        Change {
            status,
            reason,
            pairing: Pairing::Keep,
            connected_now: false,
            desired: None,
            details: None,
        }
    }

    async fn connect(&mut self) -> Result<(), ErrorBody> {
        let permit = self
            .ctx
            .connects
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| body(ErrorCode::GatewayUnavailable, "the worker is shutting down"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = self
            .ctx
            .driver
            .connect(&self.row.id, self.epoch, self.credentials.clone(), tx)
            .await
            .map_err(driver_error)?;
        self.conn = Some(conn);
        self.conn_events = Some(rx);
        self.connecting = Some(permit);
        self.qr = None;
        self.retry = None;
        Ok(())
    }

    /// Closes the connection, and forgets a planned retry: whoever disconnects decides what
    /// comes next.
    async fn disconnect(&mut self) {
        self.finish_fetching().await;
        if let Some(mut conn) = self.conn.take() {
            conn.close().await;
        }
        self.conn_events = None;
        self.connecting = None;
        self.qr = None;
        self.retry = None;
    }

    /// Plans the next connect after a failed one, each wait twice the last (up to
    /// [`RETRY_MAX`]); a connection that comes up resets it.
    fn schedule_retry(&mut self) -> Duration {
        let wait = self.retry_backoff;
        self.retry_backoff = (wait * 2).min(RETRY_MAX);
        self.retry = Some(tokio::time::Instant::now() + wait);
        wait
    }

    /// A connection could not be made: `failed`, and a retry planned.
    fn connect_failed(&mut self, message: String) -> Change {
        metrics::counter!("worker_connect_failures_total").increment(1);
        let wait = self.schedule_retry();
        Change {
            details: Some(serde_json::json!({
                "message": message,
                "retryInMs": wait.as_millis() as u64,
            })),
            ..self.change(SessionStatus::Failed, Some(StatusReason::ConnectFailed))
        }
    }

    /// The planned retry is due: connect again if the owner still wants the session running.
    async fn retry_connect(&mut self) -> Flow {
        self.retry = None;
        if self.conn.is_some() || self.row.desired_state != DesiredState::Running {
            return Flow::Continue;
        }
        let change = match self.connect().await {
            Ok(()) => self.change(SessionStatus::Starting, None),
            Err(e) => self.connect_failed(e.message),
        };
        self.apply(Some(change), vec![]).await
    }

    /// Unlinks the device, connecting first if need be.
    async fn unlink(&mut self) -> Result<(), ErrorBody> {
        if self.conn.is_none() && self.paired() {
            self.connect().await?;
        }
        if let Some(mut conn) = self.conn.take() {
            // A device the phone already removed cannot be unlinked twice: that is fine.
            if let Err(e) = conn.logout().await {
                tracing::debug!(session_id = %self.row.id, error = %e, "logout on a closed stream");
            }
        }
        self.conn_events = None;
        self.connecting = None;
        self.qr = None;
        self.credentials = None;
        Ok(())
    }

    /// After a claim: bring back what the owner wants running. A paired session connects
    /// again from its stored credentials (a row that still says `working` is left so until
    /// the connection is up, which then writes it once); a pairing cannot survive its worker,
    /// so an unpaired one stops. A stale status of a stopped session is corrected.
    async fn resume(&mut self) -> Flow {
        if let Flow::Stop = self.forget_unknown_sends().await {
            return Flow::Stop;
        }
        let status = self.row.status;
        let stale = matches!(
            status,
            SessionStatus::Working | SessionStatus::Starting | SessionStatus::ScanQrCode
        );
        let change = match self.row.desired_state {
            DesiredState::Running if self.paired() => match self.connect().await {
                Ok(()) if status == SessionStatus::Working => return Flow::Continue,
                Ok(()) => self.change(SessionStatus::Starting, None),
                Err(e) => {
                    tracing::warn!(session_id = %self.row.id, error = %e.message, "cannot reconnect");
                    self.connect_failed(e.message)
                }
            },
            DesiredState::Running => Change {
                desired: Some(DesiredState::Stopped),
                ..self.change(SessionStatus::Stopped, None)
            },
            DesiredState::Stopped if stale => self.change(SessionStatus::Stopped, None),
            DesiredState::Stopped => return Flow::Continue,
        };
        self.apply(Some(change), vec![]).await
    }

    /// The lease is gone: stop driving the number at once, write nothing.
    fn lost(&self) -> Flow {
        tracing::info!(session_id = %self.row.id, "lease lost (taken over, moved or deleted); letting go");
        metrics::counter!("worker_leases_lost_total").increment(1);
        Flow::Stop
    }

    /// Drain: disconnect first, then make `to` the owner with no holder, so the new owner can
    /// only connect after this connection is closed. Never re-pairs: the
    /// credentials stay in the row.
    async fn hand_off(&mut self, to: &str, done: oneshot::Sender<Result<(), String>>) -> Flow {
        self.disconnect().await;
        if let Flow::Stop = self.queue_again().await {
            let _ = done.send(Err("the lease was lost before the hand-off".into()));
            return Flow::Stop;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let written = async {
                let client = self.ctx.db.get().await?;
                leases::hand_off(&client, &self.row.id, self.epoch, &self.ctx.gateway_id, to).await
            }
            .await;
            match written {
                Ok(true) => {
                    let _ = done.send(Ok(()));
                    metrics::counter!("worker_sessions_handed_off_total").increment(1);
                    return Flow::Stop;
                }
                Ok(false) => {
                    let _ = done.send(Err("the lease was lost before the hand-off".into()));
                    return self.lost();
                }
                Err(e) => {
                    tracing::warn!(session_id = %self.row.id, error = %e, "hand-off not recorded; retrying");
                    if !back_off(&self.lease.clone(), &mut backoff).await {
                        let _ = done.send(Err("the lease was lost before the hand-off".into()));
                        return self.lost();
                    }
                }
            }
        }
    }
}

/// Runs `op` until it answers, backing off between tries (the database away): `None` when
/// the lease was lost meanwhile.
async fn retrying<T, Fut>(
    lease: &Lease,
    session_id: &str,
    what: &str,
    mut op: impl FnMut() -> Fut,
) -> Option<T>
where
    Fut: Future<Output = shared::Result<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(answer) => return Some(answer),
            Err(e) => {
                tracing::warn!(session_id, error = %e, "could not {what}; retrying");
                if !back_off(lease, &mut backoff).await {
                    return None;
                }
            }
        }
    }
}

/// Waits before retrying a write; `false` when the lease was lost meanwhile.
async fn back_off(lease: &Lease, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    tokio::select! {
        _ = lease.lost.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}
