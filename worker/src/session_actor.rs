//! One task per session: its commands run in order, sessions run in parallel.
//!
//! The actor owns the session's driver connection and its lease. Every command is handled in
//! [`Actor::execute`], one match arm per [`Command`] variant; every driver event in
//! [`Actor::on_driver_event`]. Both end the same way ([`Actor::commit`]): the session change,
//! its events and the command's outcome are written to Postgres (fenced by the lease), then the
//! events are published, the reply sent and the delivery acked — in that order, so a crash
//! anywhere before the ack leaves a command that is either not done (redelivered, runs) or
//! done and recorded (redelivered, answered from the record without running again).

use std::{sync::Arc, time::Instant};

use lapin::{
    Acker,
    options::{BasicAckOptions, BasicNackOptions},
};
use serde_json::Value;
use shared::{
    ErrorCode,
    db::now_ms,
    error::ErrorBody,
    protocol::{Command, CommandEnvelope, CommandOutput, EventKind, Outcome},
    session::{Session, SessionStatus, StatusReason},
};
use tokio::sync::mpsc;

use crate::{
    Ctx,
    driver::{Connection, Credentials, DriverError, DriverEvent, SimAction},
    store::{self, Change, Done, Pairing},
};

/// A delivered command, waiting for its session's actor.
pub struct Job {
    pub env: CommandEnvelope,
    pub acker: Acker,
    pub reply_to: Option<String>,
    pub redelivered: bool,
}

impl Job {
    async fn ack(&self) {
        // After a broker reconnect this delivery's channel is gone and the ack fails (or
        // answers false): the message is redelivered and answered from its record.
        let _ = self.acker.ack(BasicAckOptions::default()).await;
    }

    async fn requeue(&self) {
        let _ = self
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }
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
        DriverError::Connection(why) => body(ErrorCode::GatewayUnavailable, why),
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
    credentials: Option<Credentials>,
    conn: Option<Box<dyn Connection>>,
    conn_events: Option<mpsc::UnboundedReceiver<DriverEvent>>,
    qr: Option<(String, i64)>,
}

/// Serves one session until its job channel closes (shutdown) or it loses the session.
pub async fn run(ctx: Arc<Ctx>, session_id: String, mut jobs: mpsc::Receiver<Job>) {
    let claimed = match store::claim(&ctx.db, &session_id, &ctx.gateway_id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            // Deleted, or placed on another gateway since the command was sent.
            let error = match store::gateway_of(&ctx.db, &session_id).await {
                Ok(None) => body(ErrorCode::NotFound, "session not found"),
                _ => body(
                    ErrorCode::GatewayUnavailable,
                    "the session moved to another gateway; try again",
                ),
            };
            jobs.close();
            while let Some(job) = jobs.recv().await {
                finish_without_session(&ctx, &job, error.clone()).await;
            }
            return;
        }
        Err(e) => {
            tracing::warn!(session_id, error = %e, "cannot claim the session; requeueing");
            jobs.close();
            while let Some(job) = jobs.recv().await {
                job.requeue().await;
            }
            return;
        }
    };
    let mut actor = Actor {
        ctx,
        row: claimed.session,
        epoch: claimed.epoch,
        credentials: claimed.credentials,
        conn: None,
        conn_events: None,
        qr: None,
    };
    let mut flow = actor.resume().await;
    while let Flow::Continue = flow {
        flow = tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => actor.on_job(job).await,
                None => Flow::Stop,
            },
            event = next_event(&mut actor.conn_events) => match event {
                Some(event) => actor.on_driver_event(event).await,
                None => {
                    actor.conn_events = None;
                    Flow::Continue
                }
            },
        };
    }
    if let Some(mut conn) = actor.conn.take() {
        conn.close().await;
    }
    jobs.close();
    while let Some(job) = jobs.recv().await {
        job.requeue().await;
    }
}

async fn next_event(rx: &mut Option<mpsc::UnboundedReceiver<DriverEvent>>) -> Option<DriverEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Answers a command whose session this worker does not hold.
async fn finish_without_session(ctx: &Ctx, job: &Job, error: ErrorBody) {
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
        }
    }

    async fn connect(&mut self) -> Result<(), ErrorBody> {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = self
            .ctx
            .driver
            .connect(&self.row.id, self.credentials.clone(), tx)
            .await
            .map_err(driver_error)?;
        self.conn = Some(conn);
        self.conn_events = Some(rx);
        self.qr = None;
        Ok(())
    }

    async fn disconnect(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close().await;
        }
        self.conn_events = None;
        self.qr = None;
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
        self.qr = None;
        self.credentials = None;
        Ok(())
    }

    /// After a claim: reconnect a session that was running, stop one that was pairing.
    async fn resume(&mut self) -> Flow {
        let change = match self.row.status {
            SessionStatus::Working | SessionStatus::Starting if self.paired() => {
                match self.connect().await {
                    Ok(()) => self.change(SessionStatus::Starting, None),
                    Err(e) => {
                        tracing::warn!(session_id = %self.row.id, error = %e.message, "cannot reconnect at start-up");
                        self.change(SessionStatus::Failed, None)
                    }
                }
            }
            SessionStatus::Working | SessionStatus::Starting | SessionStatus::ScanQrCode => {
                self.change(SessionStatus::Stopped, None)
            }
            _ => return Flow::Continue,
        };
        self.apply(Some(change), vec![]).await
    }

    async fn on_job(&mut self, job: Job) -> Flow {
        let started = Instant::now();
        let kind = job.env.command.kind();
        let id = job.env.id.to_string();
        if job.env.organization_id != self.row.organization_id {
            // The api routes by an organization-scoped lookup, so this is a bug or a forged
            // command: the session does not exist for that organization.
            tracing::warn!(command_id = %id, kind, "command for another organization's session");
            finish_without_session(
                &self.ctx,
                &job,
                body(ErrorCode::NotFound, "session not found"),
            )
            .await;
            return Flow::Continue;
        }
        if job.redelivered {
            match store::recorded_outcome(&self.ctx.db, &id).await {
                Ok(Some(recorded)) => {
                    // Null: the answer was the session itself, as it is now.
                    let outcome = match recorded {
                        Value::Null => Ok(Outcome::Ok(CommandOutput::Session(Box::new(
                            self.row.clone(),
                        )))),
                        v => serde_json::from_value::<Outcome>(v),
                    };
                    if let Ok(outcome) = outcome {
                        tracing::info!(command_id = %id, kind, "redelivered command already ran; answering from its record");
                        self.ctx.outbox.reply(&job, outcome).await;
                        job.ack().await;
                        metrics::counter!("worker_commands_total", "kind" => kind, "outcome" => "replayed")
                            .increment(1);
                        return Flow::Continue;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check a redelivered command; requeueing");
                    job.requeue().await;
                    return Flow::Continue;
                }
            }
        }
        if now_ms() > job.env.deadline_ms {
            tracing::info!(command_id = %id, kind, "command past its deadline; not running it");
            finish_without_session(
                &self.ctx,
                &job,
                body(
                    ErrorCode::GatewayTimeout,
                    "the command expired before it ran",
                ),
            )
            .await;
            return Flow::Continue;
        }
        let effects = self.execute(&job.env.command).await;
        let flow = self.commit(&job, effects).await;
        metrics::histogram!("worker_command_duration_seconds", "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        flow
    }

    /// Each command, in one place.
    async fn execute(&mut self, command: &Command) -> Effects {
        match command {
            Command::Start => {
                if self.conn.is_some() {
                    // Already connected or connecting: never connect twice.
                    return Effects::row();
                }
                self.connect_then(SessionStatus::Starting).await
            }
            Command::Stop => {
                self.disconnect().await;
                Effects {
                    change: Some(
                        self.change(SessionStatus::Stopped, Some(StatusReason::Requested)),
                    ),
                    ..Effects::row()
                }
            }
            Command::Restart => {
                self.disconnect().await;
                self.connect_then(SessionStatus::Starting).await
            }
            Command::Logout => {
                if !self.paired() && self.row.phone_number.is_none() {
                    // Already unpaired: a harmless no-op.
                    return Effects::row();
                }
                if let Err(e) = self.unlink().await {
                    return Effects {
                        answer: Answer::Error(e),
                        ..Effects::row()
                    };
                }
                Effects {
                    change: Some(Change {
                        pairing: Pairing::Clear,
                        ..self.change(SessionStatus::LoggedOut, Some(StatusReason::Requested))
                    }),
                    ..Effects::row()
                }
            }
            Command::Qr => {
                if self.paired() {
                    return Effects::error(
                        ErrorCode::Conflict,
                        "the session is already paired; log it out to pair again",
                    );
                }
                if let Some((qr, expires_at)) = &self.qr
                    && *expires_at > now_ms()
                {
                    return Effects {
                        answer: Answer::Output(CommandOutput::Qr {
                            qr: qr.clone(),
                            expires_at: *expires_at,
                        }),
                        ..Effects::row()
                    };
                }
                let mut effects = if self.conn.is_none() {
                    self.connect_then(SessionStatus::Starting).await
                } else {
                    Effects::row()
                };
                if matches!(effects.answer, Answer::Row) {
                    effects.answer = Answer::Error(body(
                        ErrorCode::NotFound,
                        "no QR code is ready yet; pairing has started, try again shortly",
                    ));
                }
                effects
            }
            Command::RequestPairingCode { phone_number } => {
                if self.paired() {
                    return Effects::error(
                        ErrorCode::Conflict,
                        "the session is already paired; log it out to pair again",
                    );
                }
                let mut effects = if self.conn.is_none() {
                    self.connect_then(SessionStatus::Starting).await
                } else {
                    Effects::row()
                };
                if !matches!(effects.answer, Answer::Row) {
                    return effects;
                }
                let Some(conn) = self.conn.as_mut() else {
                    return Effects::error(ErrorCode::GatewayUnavailable, "not connected");
                };
                match conn.request_pairing_code(phone_number).await {
                    Ok(code) => {
                        effects
                            .events
                            .push(EventKind::PairCode { code: code.clone() });
                        effects.answer = Answer::Output(CommandOutput::PairingCode { code });
                    }
                    Err(e) => effects.answer = Answer::Error(driver_error(e)),
                }
                effects
            }
            // Settings are read from the row on every use; re-reading it is all there is to do.
            Command::ApplySettings => Effects::row(),
            Command::Delete => {
                let result = if self.paired() {
                    self.unlink().await
                } else {
                    self.disconnect().await;
                    Ok(())
                };
                match result {
                    Ok(()) => Effects {
                        answer: Answer::Deleted,
                        ..Effects::row()
                    },
                    Err(e) => Effects {
                        answer: Answer::Error(e),
                        ..Effects::row()
                    },
                }
            }
            Command::SimScan { phone_number } => {
                self.simulate(SimAction::Scan {
                    phone_number: phone_number.clone(),
                })
                .await
            }
            Command::SimUnlink => self.simulate(SimAction::Unlink).await,
            Command::SimConflict => self.simulate(SimAction::Conflict).await,
            Command::SimDrop => self.simulate(SimAction::Drop).await,
        }
    }

    async fn connect_then(&mut self, status: SessionStatus) -> Effects {
        match self.connect().await {
            Ok(()) => Effects {
                change: Some(self.change(status, None)),
                ..Effects::row()
            },
            Err(e) => Effects {
                answer: Answer::Error(e),
                ..Effects::row()
            },
        }
    }

    async fn simulate(&mut self, action: SimAction) -> Effects {
        let Some(conn) = self.conn.as_mut() else {
            return Effects::error(ErrorCode::Conflict, "the session is not connected");
        };
        match conn.simulate(action).await {
            Ok(()) => Effects::row(),
            Err(e) => Effects {
                answer: Answer::Error(driver_error(e)),
                ..Effects::row()
            },
        }
    }

    async fn on_driver_event(&mut self, event: DriverEvent) -> Flow {
        let (change, events) = match event {
            DriverEvent::Qr { code, expires_at } => {
                self.qr = Some((code.clone(), expires_at));
                (
                    Some(self.change(SessionStatus::ScanQrCode, None)),
                    vec![EventKind::Qr {
                        qr: code,
                        expires_at,
                    }],
                )
            }
            DriverEvent::QrTimeout => {
                self.disconnect().await;
                (
                    Some(self.change(SessionStatus::Stopped, Some(StatusReason::QrTimeout))),
                    vec![],
                )
            }
            DriverEvent::Paired {
                phone_number,
                jid,
                lid,
                credentials,
            } => {
                self.qr = None;
                self.credentials = Some(credentials.clone());
                (
                    Some(Change {
                        pairing: Pairing::Set {
                            phone_number,
                            jid,
                            lid,
                            credentials,
                        },
                        ..self.change(SessionStatus::Starting, None)
                    }),
                    vec![],
                )
            }
            DriverEvent::Connected => (
                Some(Change {
                    connected_now: true,
                    ..self.change(SessionStatus::Working, None)
                }),
                vec![],
            ),
            DriverEvent::Disconnected {
                reason,
                reconnecting: true,
            } => (
                Some(self.change(SessionStatus::Starting, Some(reason))),
                vec![],
            ),
            DriverEvent::Disconnected { reason, .. } => {
                // Replaced elsewhere (conflict) or failed for good: do not reconnect.
                self.disconnect().await;
                (
                    Some(self.change(SessionStatus::Failed, Some(reason))),
                    vec![],
                )
            }
            DriverEvent::LoggedOut { reason } => {
                self.disconnect().await;
                self.credentials = None;
                (
                    Some(Change {
                        pairing: Pairing::Clear,
                        ..self.change(SessionStatus::LoggedOut, Some(reason))
                    }),
                    vec![],
                )
            }
        };
        self.apply(change, events).await
    }

    /// Writes a change that no command asked for (a driver event, a resume).
    async fn apply(&mut self, change: Option<Change>, events: Vec<EventKind>) -> Flow {
        let events = self.with_status_event(change.as_ref(), events);
        match store::write(
            &self.ctx.db,
            &self.ctx.writer,
            &self.row,
            self.epoch,
            change.as_ref(),
            events,
            None,
            now_ms(),
        )
        .await
        {
            Ok((Some(row), events)) => {
                self.row = row;
                self.ctx.outbox.events(&events).await;
                Flow::Continue
            }
            Ok((None, _)) => self.lost(),
            Err(e) => {
                tracing::warn!(session_id = %self.row.id, error = %e, "could not record a session change");
                Flow::Continue
            }
        }
    }

    fn lost(&self) -> Flow {
        tracing::info!(session_id = %self.row.id, "session deleted or taken over by another worker; letting go");
        Flow::Stop
    }

    /// Adds `session.status` when the change moves the status or its reason.
    fn with_status_event(
        &self,
        change: Option<&Change>,
        mut events: Vec<EventKind>,
    ) -> Vec<EventKind> {
        if let Some(c) = change
            && (c.status != self.row.status || c.reason != self.row.status_reason)
        {
            events.insert(
                0,
                EventKind::Status {
                    status: c.status,
                    status_reason: c.reason,
                },
            );
        }
        events
    }

    /// Writes a command's effects and outcome, then publishes, replies and acks.
    async fn commit(&mut self, job: &Job, effects: Effects) -> Flow {
        let kind = job.env.command.kind();
        let now = now_ms();
        let Effects {
            change,
            events,
            answer,
        } = effects;
        if let Answer::Deleted = answer {
            let outcome = Outcome::Ok(CommandOutput::Deleted);
            let value = serde_json::to_value(&outcome).unwrap_or(Value::Null);
            let done = Done {
                env: &job.env,
                error: None,
                outcome: &value,
            };
            return match store::delete(&self.ctx.db, &self.row, self.epoch, &done, now).await {
                Ok(Some(event)) => {
                    self.ctx.outbox.events(std::slice::from_ref(&event)).await;
                    self.ctx.outbox.reply(job, outcome).await;
                    job.ack().await;
                    metrics::counter!("worker_commands_total", "kind" => kind, "outcome" => "ok")
                        .increment(1);
                    Flow::Stop
                }
                Ok(None) => {
                    finish_without_session(
                        &self.ctx,
                        job,
                        body(ErrorCode::NotFound, "session not found"),
                    )
                    .await;
                    self.lost()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not record a delete; requeueing");
                    job.requeue().await;
                    Flow::Continue
                }
            };
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
                };
                self.ctx.outbox.reply(job, outcome).await;
                job.ack().await;
                metrics::counter!("worker_commands_total", "kind" => kind, "outcome" => label)
                    .increment(1);
                Flow::Continue
            }
            Ok((None, _)) => {
                finish_without_session(
                    &self.ctx,
                    job,
                    body(
                        ErrorCode::GatewayUnavailable,
                        "the session moved to another gateway; try again",
                    ),
                )
                .await;
                self.lost()
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record a command's outcome; requeueing");
                job.requeue().await;
                Flow::Continue
            }
        }
    }
}
