//! The worker's side of the command bus.
//!
//! A supervised loop owns the broker connection: it declares this gateway's quorum queue,
//! sets the prefetch (on every new channel: lapin does not replay `basic_qos` after a
//! recovery, and this loop does not rely on lapin's recovery at all; it rebuilds the
//! connection and channels itself), consumes, and hands each delivery to its session's actor.
//! Deliveries of a lost channel cannot be acked any more (acks fail or answer `false`); the
//! broker redelivers them with `redelivered` set and the actors answer those from the
//! command record when they already ran.
//!
//! The [`Outbox`] publishes replies, events and forwarded notices on a second channel. Neither is confirmed: a
//! reply is only the fast path (the outcome is already in Postgres) and an event is only a
//! signal (it is already in the `events` table). The broker closes a channel on a soft error
//! (a refused permission, a missing exchange) while the connection lives on: a publish that
//! finds its channel closed ends the connection, so the loop rebuilds both channels instead
//! of consuming on with every reply lost.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel,
    options::{
        BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        BasicRejectOptions,
    },
    types::{AMQPValue, FieldTable},
};
use shared::{
    Error, Result,
    protocol::{CommandEnvelope, Event, Outcome, Reply},
    topology::{self, Topology},
};
use tokio_util::sync::CancellationToken;

use crate::{registry::Registry, session_actor::Job};

#[derive(Clone)]
pub struct Outbox {
    topology: Topology,
    channel: Arc<RwLock<Option<(Channel, CancellationToken)>>>,
}

impl Outbox {
    pub fn new(topology: Topology) -> Self {
        Outbox {
            topology,
            channel: Arc::default(),
        }
    }

    /// Publishes on `channel` from now on; the token is cancelled when it is found closed.
    fn set(&self, channel: Option<Channel>) -> CancellationToken {
        let lost = CancellationToken::new();
        if let Ok(mut c) = self.channel.write() {
            *c = channel.map(|ch| (ch, lost.clone()));
        }
        lost
    }

    /// Whether this worker is connected to the broker now (consuming, and able to publish).
    pub fn is_connected(&self) -> bool {
        self.channel().is_some_and(|ch| ch.status().connected())
    }

    fn channel(&self) -> Option<Channel> {
        self.channel
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(ch, _)| ch.clone()))
    }

    /// After a failed publish: a channel the broker closed is reported to the consumer loop.
    fn check(&self, channel: &Channel) {
        if channel.status().connected() {
            return;
        }
        if let Ok(c) = self.channel.read()
            && let Some((current, lost)) = c.as_ref()
            && current.id() == channel.id()
        {
            lost.cancel();
        }
    }

    pub async fn reply(&self, job: &Job, outcome: Outcome) {
        let (Some(reply_to), Some(channel)) = (&job.reply_to, self.channel()) else {
            return;
        };
        let reply = Reply {
            command_id: job.env.id,
            outcome,
        };
        let Ok(payload) = serde_json::to_vec(&reply) else {
            return;
        };
        let sent = channel
            .basic_publish(
                "".into(),
                reply_to.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default()
                    .with_correlation_id(job.env.id.to_string().into())
                    .with_content_type("application/json".into()),
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "reply not sent (the outcome is recorded)");
            self.check(&channel);
        }
    }

    /// Sends a command on to `gateway_id`'s queue, as the api would have had it known the
    /// owner: for a notice that reached a gateway the session just left. Unconfirmed, like
    /// the rest: a notice only says "look at Postgres", and the owner looks again when it
    /// (re)connects.
    pub async fn forward(&self, env: &CommandEnvelope, gateway_id: &str) {
        let Some(channel) = self.channel() else {
            return;
        };
        let env = CommandEnvelope {
            gateway_id: gateway_id.to_owned(),
            ..env.clone()
        };
        let Ok(payload) = serde_json::to_vec(&env) else {
            return;
        };
        let ttl = (env.deadline_ms - shared::db::now_ms()).max(1);
        let sent = channel
            .basic_publish(
                self.topology.command_exchange().as_str().into(),
                gateway_id.into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_correlation_id(env.id.to_string().into())
                    .with_message_id(env.id.to_string().into())
                    .with_expiration(ttl.to_string().into()),
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "notice not forwarded (the owner reads Postgres when it connects)");
            self.check(&channel);
        }
    }

    pub async fn events(&self, events: &[Event]) {
        let Some(channel) = self.channel() else {
            return;
        };
        for event in events {
            let Ok(payload) = serde_json::to_vec(event) else {
                continue;
            };
            let sent = channel
                .basic_publish(
                    self.topology.event_exchange().as_str().into(),
                    event.routing_key().as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_content_type("application/json".into()),
                )
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "event not published live (it is in the event log)");
                self.check(&channel);
                return;
            }
        }
    }
}

pub struct Consumer {
    pub url: String,
    pub topology: Topology,
    pub gateway_id: String,
    pub prefetch: u16,
    pub outbox: Outbox,
}

impl Consumer {
    /// Consumes until `stop` is cancelled, reconnecting with backoff; then stops consuming and
    /// lets the actors finish what they hold (their acks need the channel) before closing.
    pub async fn run(self, registry: Registry, stop: CancellationToken, grace: Duration) {
        let mut reconnects = topology::Reconnects::new();
        loop {
            let wait = match self
                .connection(&registry, &stop, grace, &mut reconnects)
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    self.outbox.set(None);
                    let wait = reconnects.wait();
                    metrics::counter!("amqp_reconnects_total", "tier" => "worker").increment(1);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                    wait
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {
                    registry.shutdown(grace).await;
                    return;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn connection(
        &self,
        registry: &Registry,
        stop: &CancellationToken,
        grace: Duration,
        reconnects: &mut topology::Reconnects,
    ) -> Result<()> {
        let conn = topology::connect(&self.url, &format!("worker-{}", self.gateway_id)).await?;
        let consume_ch = conn.create_channel().await?;
        self.topology
            .declare_gateway_queue(&consume_ch, &self.gateway_id)
            .await?;
        consume_ch
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let publish_ch = conn.create_channel().await?;
        self.topology.declare_event_exchange(&publish_ch).await?;
        let outbox_lost = self.outbox.set(Some(publish_ch));
        let tag = format!("worker-{}", self.gateway_id);
        let mut deliveries = consume_ch
            .basic_consume(
                self.topology
                    .command_queue(&self.gateway_id)
                    .as_str()
                    .into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        reconnects.connected();
        tracing::info!(gateway_id = %self.gateway_id, "consuming commands");
        loop {
            let delivery = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = consume_ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    registry.shutdown(grace).await;
                    self.outbox.set(None);
                    let _ = conn.close(200, "worker shutting down".into()).await;
                    return Ok(());
                }
                d = deliveries.next() => d.ok_or_else(|| Error::unavailable("the broker ended the consumer"))??,
                _ = outbox_lost.cancelled() => {
                    // Closing the connection returns the unacked deliveries to the queue.
                    let _ = conn.close(320, "rebuilding a closed publishing channel".into()).await;
                    return Err(Error::unavailable("the broker closed the publishing channel"));
                }
            };
            let env = match serde_json::from_slice::<CommandEnvelope>(&delivery.data) {
                Ok(env) if env.gateway_id == self.gateway_id => env,
                _ => {
                    // Malformed or misrouted: straight to the dead-letter queue.
                    tracing::warn!("rejecting an unreadable or misrouted command");
                    let _ = delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await;
                    continue;
                }
            };
            let job = Job {
                reply_to: delivery
                    .properties
                    .reply_to()
                    .as_ref()
                    .map(|r| r.to_string()),
                redelivered: delivery.redelivered,
                earlier_deliveries: delivery_count(&delivery),
                acker: delivery.acker,
                env,
            };
            registry.dispatch(job).await;
        }
    }
}

/// How many times the queue delivered this message before (`x-delivery-count`, set by quorum
/// queues on redelivery).
fn delivery_count(d: &lapin::message::Delivery) -> u32 {
    let count = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    let n = match count {
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => i64::from(n),
        Some(AMQPValue::ShortInt(n)) => i64::from(n),
        Some(AMQPValue::LongUInt(n)) => i64::from(n),
        _ => 0,
    };
    u32::try_from(n).unwrap_or(0)
}
