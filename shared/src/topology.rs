//! The AMQP topology: every exchange and queue name and argument, in this one place.
//!
//! RabbitMQ refuses (406 PRECONDITION_FAILED) a declare whose arguments differ from the
//! existing entity's, so both tiers declare through these functions and never spell a name or
//! an argument themselves. All names carry a prefix (`AMQP_PREFIX`, empty in production) so
//! that tests and parallel environments share one broker without seeing each other's messages.
//!
//! - `gw.commands` (direct, durable): commands, routing key = gateway id.
//! - `gw.commands.<gatewayId>` (quorum, durable): one per gateway; rejected and expired
//!   messages, and those delivered more than [`DELIVERY_LIMIT`] times, go to `gw.dlx`.
//!   Quorum queues replicate across a cluster and count deliveries, which is what makes a
//!   poison command end in the dead-letter queue instead of looping forever.
//! - `gw.dlx` (fanout) → `gw.commands.dead` (quorum): the api tier consumes it and marks the
//!   command failed (or expired), answering any caller still waiting.
//! - `gw.replies.<instance>` (exclusive, auto-delete): one per api process, client-named.
//! - `gw.events` (topic, durable): `<org>.<session>.<type>`; each api process binds its own
//!   exclusive `gw.events.<instance>` queue to fan events out to its SSE clients.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};

/// Deliveries of one command before it is dead-lettered (a crash loop on a poison message).
pub const DELIVERY_LIMIT: i32 = 5;

#[derive(Debug, Clone, Default)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
        }
    }

    pub fn command_exchange(&self) -> String {
        format!("{}gw.commands", self.prefix)
    }

    pub fn command_queue(&self, gateway_id: &str) -> String {
        format!("{}gw.commands.{gateway_id}", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}gw.dlx", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}gw.commands.dead", self.prefix)
    }

    pub fn reply_queue(&self, instance: &str) -> String {
        format!("{}gw.replies.{instance}", self.prefix)
    }

    pub fn event_exchange(&self) -> String {
        format!("{}gw.events", self.prefix)
    }

    pub fn event_queue(&self, instance: &str) -> String {
        format!("{}gw.events.{instance}", self.prefix)
    }

    /// The command exchange and the dead-letter path; declared by both tiers.
    pub async fn declare_command_path(&self, ch: &Channel) -> lapin::Result<()> {
        durable_exchange(ch, &self.command_exchange(), ExchangeKind::Direct).await?;
        durable_exchange(ch, &self.dead_letter_exchange(), ExchangeKind::Fanout).await?;
        ch.queue_declare(
            self.dead_letter_queue().as_str().into(),
            QueueDeclareOptions::durable(),
            quorum_args(),
        )
        .await?;
        ch.queue_bind(
            self.dead_letter_queue().as_str().into(),
            self.dead_letter_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// One gateway's command queue, bound to the command exchange by its id.
    pub async fn declare_gateway_queue(&self, ch: &Channel, gateway_id: &str) -> lapin::Result<()> {
        self.declare_command_path(ch).await?;
        let mut args = quorum_args();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange().as_str().into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DELIVERY_LIMIT),
        );
        let queue = self.command_queue(gateway_id);
        ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await?;
        ch.queue_bind(
            queue.as_str().into(),
            self.command_exchange().as_str().into(),
            gateway_id.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// Deletes a removed gateway's command queue (what it still held was for sessions that
    /// moved away: their commands are swept as overdue). Answers how many it dropped.
    pub async fn delete_gateway_queue(&self, ch: &Channel, gateway_id: &str) -> lapin::Result<u32> {
        ch.queue_delete(
            self.command_queue(gateway_id).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
    }

    /// This api process's reply queue: exclusive, so it vanishes with the connection.
    pub async fn declare_reply_queue(&self, ch: &Channel, instance: &str) -> lapin::Result<String> {
        let name = self.reply_queue(instance);
        ch.queue_declare(name.as_str().into(), exclusive(), FieldTable::default())
            .await?;
        Ok(name)
    }

    pub async fn declare_event_exchange(&self, ch: &Channel) -> lapin::Result<()> {
        durable_exchange(ch, &self.event_exchange(), ExchangeKind::Topic).await
    }

    /// This api process's event queue, bound to every event.
    pub async fn declare_event_queue(&self, ch: &Channel, instance: &str) -> lapin::Result<String> {
        self.declare_event_exchange(ch).await?;
        let name = self.event_queue(instance);
        ch.queue_declare(name.as_str().into(), exclusive(), FieldTable::default())
            .await?;
        ch.queue_bind(
            name.as_str().into(),
            self.event_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(name)
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    }
}

async fn durable_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> lapin::Result<()> {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
}

/// How long one node of the list may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The waits between a process's attempts to reach the broker: 100 ms, doubling up to 1 s,
/// and from 100 ms again once a connection came up. A broker restart takes seconds: a wait
/// grown past that (or kept from an earlier outage) leaves the process answering 503, or
/// not taking commands, for seconds after the broker is back; one attempt a second per
/// process is nothing to a broker.
#[derive(Debug)]
pub struct Reconnects {
    next: Duration,
}

impl Reconnects {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Reconnects { next: Self::FIRST }
    }

    /// A connection is up: the next outage starts from the first wait.
    pub fn connected(&mut self) {
        self.next = Self::FIRST;
    }

    /// The wait before the next attempt.
    pub fn wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(Self::MAX);
        wait
    }
}

impl Default for Reconnects {
    fn default() -> Self {
        Self::new()
    }
}

/// The node of the list that answered last (shared by the process's connections), so a
/// reconnect tries it first and a process does not keep knocking on a node that is down.
static PREFERRED_NODE: AtomicUsize = AtomicUsize::new(0);

/// Connects to the broker, naming the connection so operators can tell processes apart in
/// the management UI. `urls` is one AMQP URL or a comma-separated list of the cluster's nodes:
/// they are tried in turn, starting with the one that answered last, and the first that
/// accepts wins; the error is the last node's when none does.
pub async fn connect(urls: &str, name: &str) -> lapin::Result<lapin::Connection> {
    let nodes: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if nodes.is_empty() {
        return Err(
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "AMQP_URL is empty").into(),
        );
    }
    let first = PREFERRED_NODE.load(Ordering::Relaxed) % nodes.len();
    let mut last_error = None;
    for i in 0..nodes.len() {
        let at = (first + i) % nodes.len();
        let props = lapin::ConnectionProperties::default().with_connection_name(name.into());
        let (uri, tls) = crate::tls::amqp(nodes[at])
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            lapin::Connect::connect_with_config(
                uri.as_str(),
                props,
                tls,
                lapin::runtime::default_runtime()?,
            ),
        )
        .await
        {
            Ok(Ok(conn)) => {
                PREFERRED_NODE.store(at, Ordering::Relaxed);
                return Ok(conn);
            }
            Ok(Err(e)) => {
                tracing::warn!(node = at, error = %e, "broker node refused the connection; trying the next");
                last_error = Some(e);
            }
            Err(_) => {
                tracing::warn!(
                    node = at,
                    "broker node did not answer in time; trying the next"
                );
                last_error = Some(
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out").into(),
                );
            }
        }
    }
    Err(last_error.expect("at least one node was tried"))
}

/// At start, before a process claims anything: a broker whose TLS certificate does not verify
/// (the wrong `cacertfile`, a plain listener behind an `amqps://` URL) stops the process with
/// the reason, where a broker that is merely down is met later as any outage. Plain `amqp://`
/// URLs are not probed.
pub async fn check_tls(urls: &str, name: &str) -> crate::Result<()> {
    if !urls.split(',').any(|u| u.trim().starts_with("amqps://")) {
        return Ok(());
    }
    match connect(urls, name).await {
        Ok(conn) => {
            let _ = conn.close(200, "TLS checked".into()).await;
            Ok(())
        }
        Err(e) if crate::tls::rejected(&e) => {
            let trusted: Vec<String> = urls
                .split(',')
                .filter_map(crate::tls::amqp_ca)
                .map(|ca| format!("cacertfile={ca}"))
                .collect();
            Err(crate::Error::invalid(format!(
                "cannot connect to RabbitMQ over TLS: {} (trusting {})",
                crate::tls::explain(&e),
                if trusted.is_empty() {
                    "the system's CAs".to_string()
                } else {
                    trusted.join(", ")
                }
            )))
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not reach the broker to check its TLS; going on");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_double_to_a_second_and_start_over_once_connected() {
        let mut r = Reconnects::new();
        let waits: Vec<u64> = (0..6).map(|_| r.wait().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        r.connected();
        assert_eq!(r.wait(), Duration::from_millis(100));
    }
}
