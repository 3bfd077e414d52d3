//! The api's side of the command bus.
//!
//! One supervised connection per api process carries four channels:
//! - **publish** (confirm mode): commands go to `gw.commands` with the gateway id as routing
//!   key, `mandatory` (an unroutable command comes back and is answered 503), persistent,
//!   with the command id as `correlation_id`, this process's reply queue as `reply_to` and the
//!   time left before the deadline as AMQP `expiration`. Every publish awaits its own confirm,
//!   so a command is never lost silently; confirms are pipelined by the broker, so concurrent
//!   requests do not wait on each other.
//! - **replies**: this process's exclusive reply queue. A reply wakes the request waiting on
//!   its correlation id; a late reply (its waiter gone) is dropped, harmlessly.
//! - **dead letters**: commands that expired in a queue, were rejected, or hit the delivery
//!   limit. The command row is marked `expired`/`failed` and any caller still waiting is
//!   answered at once (every api replica competes for these; the reply goes to `reply_to`).
//! - **events**: this process's queue on `gw.events`, fanned out to SSE clients.
//!
//! When the broker goes away the loop reconnects with backoff and re-declares everything;
//! while it is away, commands answer 503 `gateway_unavailable` at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable},
};
use shared::{
    Error, ErrorCode, Result,
    db::now_ms,
    error::ErrorBody,
    protocol::{CommandEnvelope, Event, Outcome, Reply},
    store,
    topology::{self, Topology},
};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Topology,
    instance: String,
    reply_queue: String,
    publisher: RwLock<Option<Channel>>,
    waiters: Mutex<HashMap<Ulid, oneshot::Sender<Outcome>>>,
    events: broadcast::Sender<Arc<Event>>,
    db: deadpool_postgres::Pool,
}

/// Removes a waiter however its request ends (reply, timeout, or the client going away).
struct Waiter<'a> {
    inner: &'a Inner,
    id: Ulid,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.inner.waiters.lock() {
            w.remove(&self.id);
        }
    }
}

impl Bus {
    /// Starts the supervised connection; it runs until `shutdown`.
    pub fn start(
        amqp_url: String,
        topology: Topology,
        db: deadpool_postgres::Pool,
        shutdown: CancellationToken,
    ) -> Self {
        let instance = Ulid::new().to_string().to_lowercase();
        let inner = Arc::new(Inner {
            reply_queue: topology.reply_queue(&instance),
            topology,
            instance,
            publisher: RwLock::new(None),
            waiters: Mutex::new(HashMap::new()),
            events: broadcast::channel(4096).0,
            db,
        });
        tokio::spawn(supervise(inner.clone(), amqp_url, shutdown));
        Bus { inner }
    }

    pub fn is_connected(&self) -> bool {
        self.inner
            .publisher
            .read()
            .map(|p| p.is_some())
            .unwrap_or(false)
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.events.subscribe()
    }

    fn channel(&self) -> Result<Channel> {
        self.inner
            .publisher
            .read()
            .ok()
            .and_then(|p| p.clone())
            .ok_or_else(|| Error::unavailable("message broker unavailable, try again"))
    }

    /// Publishes a command and waits for its reply until the command's deadline.
    pub async fn call(&self, env: &CommandEnvelope) -> Result<Outcome> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.inner.waiters.lock() {
            w.insert(env.id, tx);
        }
        let _waiter = Waiter {
            inner: &self.inner,
            id: env.id,
        };
        self.publish(env, true).await?;
        let left = Duration::from_millis((env.deadline_ms - now_ms()).max(0) as u64);
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => {
                metrics::counter!("api_command_timeouts_total", "kind" => env.command.kind())
                    .increment(1);
                Err(Error::new(
                    ErrorCode::GatewayTimeout,
                    "the gateway did not answer in time; GET /api/v1/commands/{commandId} \
                     tells the command's outcome",
                )
                .with_detail("commandId", env.id.to_string()))
            }
        }
    }

    /// Publishes a command without waiting for a reply (the worker still records the outcome).
    pub async fn notify(&self, env: &CommandEnvelope) -> Result<()> {
        self.publish(env, false).await
    }

    async fn publish(&self, env: &CommandEnvelope, want_reply: bool) -> Result<()> {
        let channel = self.channel()?;
        let payload = serde_json::to_vec(env).map_err(Error::internal)?;
        let ttl = (env.deadline_ms - now_ms()).max(1);
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_correlation_id(env.id.to_string().into())
            .with_message_id(env.id.to_string().into())
            .with_expiration(ttl.to_string().into());
        if want_reply {
            props = props.with_reply_to(self.inner.reply_queue.as_str().into());
        }
        let confirm = channel
            .basic_publish(
                self.inner.topology.command_exchange().as_str().into(),
                env.gateway_id.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &payload,
                props,
            )
            .await?
            .await
            .map_err(|e| {
                // Sent, but the connection went before the broker confirmed: the command may
                // be queued and run. Naming it lets the caller look it up.
                Error::dependency_down("message broker", e)
                    .with_detail("commandId", env.id.to_string())
            })?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_returned)) => Err(Error::unavailable(format!(
                "gateway {} has no command queue",
                env.gateway_id
            ))
            .with_detail("gatewayId", env.gateway_id.clone())),
            Confirmation::Nack(_) => Err(Error::unavailable(
                "the message broker refused the command, try again",
            )),
        }
    }

    /// Publishes an event the api itself produced (a session removed without a worker).
    pub async fn publish_event(&self, event: &Event) -> Result<()> {
        let channel = self.channel()?;
        let payload = serde_json::to_vec(event).map_err(Error::internal)?;
        channel
            .basic_publish(
                self.inner.topology.event_exchange().as_str().into(),
                event.routing_key().as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await?
            .await?;
        Ok(())
    }
}

async fn supervise(inner: Arc<Inner>, url: String, shutdown: CancellationToken) {
    let mut reconnects = topology::Reconnects::new();
    loop {
        let result = connection(&inner, &url, &shutdown, &mut reconnects).await;
        if let Ok(mut p) = inner.publisher.write() {
            *p = None;
        }
        let wait = reconnects.wait();
        match result {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!("amqp_reconnects_total", "tier" => "api").increment(1);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn consume(
    ch: &Channel,
    queue: &str,
    tag: &str,
    no_ack: bool,
) -> lapin::Result<lapin::Consumer> {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions {
            no_ack,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    )
    .await
}

async fn connection(
    inner: &Arc<Inner>,
    url: &str,
    shutdown: &CancellationToken,
    reconnects: &mut topology::Reconnects,
) -> Result<()> {
    let t = &inner.topology;
    let conn = topology::connect(url, &format!("api-{}", inner.instance)).await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    t.declare_command_path(&publish).await?;
    t.declare_event_exchange(&publish).await?;

    let reply_ch = conn.create_channel().await?;
    t.declare_reply_queue(&reply_ch, &inner.instance).await?;
    let mut replies = consume(&reply_ch, &inner.reply_queue, "replies", true).await?;

    let dead_ch = conn.create_channel().await?;
    dead_ch.basic_qos(16, BasicQosOptions::default()).await?;
    let mut dead = consume(&dead_ch, &t.dead_letter_queue(), "dead-letters", false).await?;

    let event_ch = conn.create_channel().await?;
    let event_queue = t.declare_event_queue(&event_ch, &inner.instance).await?;
    let mut events = consume(&event_ch, &event_queue, "events", true).await?;

    if let Ok(mut p) = inner.publisher.write() {
        *p = Some(publish.clone());
    }
    reconnects.connected();
    tracing::info!(instance = %inner.instance, "connected to the message broker");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, "api shutting down".into()).await;
                return Ok(());
            }
            d = replies.next() => on_reply(inner, d.ok_or_else(|| Error::unavailable("reply consumer ended"))??),
            d = dead.next() => {
                let d = d.ok_or_else(|| Error::unavailable("dead-letter consumer ended"))??;
                let inner = inner.clone();
                let publish = publish.clone();
                tokio::spawn(async move { on_dead_letter(&inner, &publish, d).await });
            }
            d = events.next() => on_event(inner, d.ok_or_else(|| Error::unavailable("event consumer ended"))??),
        }
    }
}

fn on_reply(inner: &Inner, d: Delivery) {
    let Ok(reply) = serde_json::from_slice::<Reply>(&d.data) else {
        tracing::warn!("dropping a malformed reply");
        return;
    };
    let waiter = inner
        .waiters
        .lock()
        .ok()
        .and_then(|mut w| w.remove(&reply.command_id));
    if let Some(tx) = waiter {
        let _ = tx.send(reply.outcome);
    }
}

fn on_event(inner: &Inner, d: Delivery) {
    match serde_json::from_slice::<Event>(&d.data) {
        Ok(event) => {
            let _ = inner.events.send(Arc::new(event));
        }
        Err(e) => tracing::warn!(error = %e, "dropping a malformed event"),
    }
}

/// Why RabbitMQ dead-lettered a message, from the first `x-death` entry.
fn death_reason(d: &Delivery) -> String {
    let deaths = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned());
    if let Some(AMQPValue::FieldArray(arr)) = deaths
        && let Some(AMQPValue::FieldTable(first)) = arr.as_slice().first()
        && let Some(AMQPValue::LongString(reason)) = first.inner().get("reason")
    {
        return reason.to_string();
    }
    "rejected".to_owned()
}

/// What the caller of a dead-lettered command is answered, by why it died.
fn dead_letter_error(reason: &str) -> ErrorBody {
    let (code, message) = match reason {
        "expired" => (
            ErrorCode::GatewayTimeout,
            "the command expired before a gateway took it".to_owned(),
        ),
        // The worker put it back each time it could not record the outcome: a database or
        // broker fault, not a fault of the command. Commands are idempotent: run it again.
        "delivery_limit" => (
            ErrorCode::GatewayUnavailable,
            format!(
                "the gateway could not record the command's outcome in {} attempts (a passing \
                 fault); try again",
                shared::topology::DELIVERY_LIMIT + 1
            ),
        ),
        // Unreadable or misrouted: a defect, not a fault.
        _ => (
            ErrorCode::Internal,
            "the gateway could not process the command".to_owned(),
        ),
    };
    ErrorBody {
        code,
        message,
        details: Default::default(),
    }
}

async fn on_dead_letter(inner: &Inner, publish: &Channel, d: Delivery) {
    let reason = death_reason(&d);
    if let Ok(env) = serde_json::from_slice::<CommandEnvelope>(&d.data) {
        // Recorded `expired` (a gateway_timeout) or `failed`, unless a worker ended it first.
        let body = dead_letter_error(&reason);
        metrics::counter!("api_dead_letters_total", "reason" => reason.clone()).increment(1);
        tracing::warn!(command_id = %env.id, kind = env.command.kind(), %reason, "command dead-lettered");
        let outcome = serde_json::to_value(Outcome::Error(body.clone())).unwrap_or_default();
        let done = store::commands::Done {
            env: &env,
            error: Some(&body),
            outcome: &outcome,
        };
        let marked = match inner.db.get().await {
            Ok(client) => store::commands::record_end(&client, &done, now_ms()).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = marked {
            // Not recorded: leave it for redelivery to this or another replica.
            tracing::warn!(error = %e, "could not record a dead-lettered command");
            let _ = d
                .nack(lapin::options::BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            return;
        }
        if let Some(reply_to) = d.properties.reply_to() {
            let reply = Reply {
                command_id: env.id,
                outcome: Outcome::Error(body),
            };
            if let Ok(payload) = serde_json::to_vec(&reply) {
                let _ = publish
                    .basic_publish(
                        "".into(),
                        reply_to.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        BasicProperties::default(),
                    )
                    .await;
            }
        }
    }
    let _ = d.ack(BasicAckOptions::default()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_is_answered_by_why_it_died() {
        let status = |reason| dead_letter_error(reason).code.http_status();
        // A fault is 503 or 504, never 500.
        assert_eq!(status("expired"), 504);
        assert_eq!(status("delivery_limit"), 503);
        // A command no worker could read is a defect.
        assert_eq!(status("rejected"), 500);
    }
}
