//! Every command, in one place: [`Actor::execute`] has one match arm per [`Command`]. A
//! command arrives through [`Actor::on_job`], which first answers a redelivery from the
//! command's record and refuses one past its deadline.

use std::time::Instant;

use serde_json::Value;
use shared::{
    ErrorCode,
    db::now_ms,
    message::Content,
    protocol::{Command, CommandOutput, EventKind, Outcome},
    session::{SessionStatus, StatusReason},
};

use super::{
    Actor, Answer, Effects, Flow, Job, body, commit::finish_without_session, driver_error,
};
use crate::{
    driver::SimAction,
    store::{self, Change, Pairing, messages},
};

impl Actor {
    pub(super) async fn on_job(&mut self, job: Job) -> Flow {
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
                    job.requeue_after_fault().await;
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
                if let Flow::Stop = self.fail_queued("the session was stopped").await {
                    return Effects::error(ErrorCode::GatewayUnavailable, "the lease was lost");
                }
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
                if let Flow::Stop = self.fail_queued("the session was logged out").await {
                    return Effects::error(ErrorCode::GatewayUnavailable, "the lease was lost");
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
            // Settings are read from the row on every use; re-reading it is all there is to do,
            // and new rate limits apply to the queue at once.
            Command::ApplySettings | Command::SendMessages => {
                self.pump_soon();
                Effects::row()
            }
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
            Command::CheckNumbers { numbers } => {
                let working = self.row.status == SessionStatus::Working;
                let Some(conn) = self.conn.as_mut().filter(|_| working) else {
                    return Effects::error(
                        ErrorCode::Conflict,
                        "the session is not connected to WhatsApp; numbers are checked \
                         through a working session",
                    );
                };
                match conn.check_numbers(numbers).await {
                    Ok(numbers) => Effects {
                        answer: Answer::Output(CommandOutput::Numbers { numbers }),
                        ..Effects::row()
                    },
                    Err(e) => Effects {
                        answer: Answer::Error(driver_error(e)),
                        ..Effects::row()
                    },
                }
            }
            Command::SimUnlink => self.simulate(SimAction::Unlink).await,
            Command::SimConflict => self.simulate(SimAction::Conflict).await,
            Command::SimDrop => self.simulate(SimAction::Drop).await,
            Command::SimMessage {
                from,
                text,
                content,
            } => {
                let content = content
                    .clone()
                    .unwrap_or_else(|| Content::Text { text: text.clone() });
                let refers_to = match content.refers_to() {
                    None => None,
                    Some(id) => match messages::reference(&self.ctx.db, &self.row.id, id).await {
                        Ok(Some(r))
                            if matches!(content, Content::PollVote { .. })
                                && !matches!(r.content, Content::Poll { .. }) =>
                        {
                            return Effects::error(
                                ErrorCode::InvalidArgument,
                                format!("message {id} is not a poll: there is nothing to vote on"),
                            );
                        }
                        Ok(Some(r)) => Some(r),
                        Ok(None) => {
                            return Effects::error(
                                ErrorCode::InvalidArgument,
                                format!("the session has no message {id} that WhatsApp knows"),
                            );
                        }
                        Err(e) => return Effects::error(e.code(), e.body.message),
                    },
                };
                self.simulate(SimAction::Message {
                    from: from.clone(),
                    content: Box::new(content),
                    refers_to: refers_to.map(Box::new),
                })
                .await
            }
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
}
