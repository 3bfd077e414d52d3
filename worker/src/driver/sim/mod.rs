//! The simulated WhatsApp: an in-process phone and pairing protocol that behaves like the real
//! multi-device one, so the whole product can be run and tested without WhatsApp's servers.
//!
//! - Unpaired, a connection shows QR codes that rotate: the first lives `qr_first_ttl`
//!   (~60 s in WhatsApp), later ones `qr_next_ttl` (~20 s), `qr_count` (six) in all; then it
//!   gives up with [`DriverEvent::QrTimeout`].
//! - Instead of scanning, a pairing code (`XXXX-XXXX`) can be requested for a phone number.
//! - The simulated phone "scans" on [`SimAction::Scan`] (this also completes a pending pairing
//!   code for the same number): the device is paired (`<number>@s.whatsapp.net`, a `@lid`) and
//!   connects.
//! - Paired: [`SimAction::Unlink`] is the phone removing the device (logged out,
//!   `device_removed`); [`SimAction::Conflict`] is the same device connecting elsewhere (the
//!   stream is replaced and the driver does *not* reconnect, as a real client must not);
//!   [`SimAction::Drop`] is the network dropping (reconnect after a backoff that doubles on
//!   repeated drops).
//!
//! Codes and ids derive from `seed`, the session id and a per-connection counter, so a run is
//! reproducible; every duration is configurable, which is the controllable clock tests use.
//! `op_delay` makes every operation slow, to exercise timeouts.
//!
//! WhatsApp's server side — one connection per device, a second one replacing the first —
//! is shared by every worker process through Postgres ([`server`]), so a device connected
//! from two workers shows up as `conflict` exactly as it would in production.

pub mod server;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};
use shared::{contacts::NumberCheck, db::now_ms, message::Content, session::StatusReason};
use tokio::sync::{mpsc, oneshot};

use self::server::SimServer;
use super::{Connection, Credentials, Driver, DriverError, DriverEvent, Paired, SimAction};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub qr_first_ttl: Duration,
    pub qr_next_ttl: Duration,
    pub qr_count: u32,
    pub connect_delay: Duration,
    pub reconnect_backoff: Duration,
    pub op_delay: Duration,
    /// How long the simulated server keeps the streams of a process it no longer hears from.
    pub keepalive: Duration,
    /// After a send, when the recipient's phone acknowledges it delivered, then read.
    pub deliver_delay: Duration,
    pub read_delay: Duration,
}

/// This process's connections by device, to tell one it was replaced.
type Phones = Arc<Mutex<HashMap<String, (u64, mpsc::WeakUnboundedSender<Control>)>>>;

pub struct SimDriver {
    cfg: SimConfig,
    connections: AtomicU64,
    server: Arc<SimServer>,
    phones: Phones,
}

impl SimDriver {
    pub async fn start(cfg: SimConfig, database_url: &str) -> shared::Result<Self> {
        let phones: Phones = Arc::default();
        let known = phones.clone();
        let on_replaced: server::OnReplaced = Arc::new(move |device, connection| {
            let phone = known
                .lock()
                .ok()
                .and_then(|p| p.get(device).cloned())
                .filter(|(c, _)| *c == connection)
                .and_then(|(_, control)| control.upgrade());
            if let Some(control) = phone {
                let _ = control.send(Control::Replaced);
            }
        });
        let server = SimServer::start(database_url, cfg.keepalive, on_replaced).await?;
        Ok(SimDriver {
            cfg,
            connections: AtomicU64::new(0),
            server,
            phones,
        })
    }
}

type Answer<T> = oneshot::Sender<Result<T, DriverError>>;

enum Control {
    Scan(String, Answer<()>),
    PairCode(String, Answer<String>),
    Unlink(Answer<()>),
    Conflict(Answer<()>),
    Drop(Answer<()>),
    Logout(Answer<()>),
    /// Send a message; answers its id.
    Send(Box<super::Outgoing>, Answer<String>),
    /// Show "typing…", or mark a message read: the simulated contact takes note.
    Typing(Answer<()>),
    MarkRead(Answer<()>),
    /// A contact sends the number a message.
    Inbound(Box<super::Inbound>, Answer<()>),
    /// Which numbers are on WhatsApp.
    Check(Vec<String>, Answer<Vec<NumberCheck>>),
    /// The server says another connection of the device replaced this one.
    Replaced,
}

struct SimConnection {
    control: mpsc::UnboundedSender<Control>,
    op_delay: Duration,
    server: Arc<SimServer>,
    phones: Phones,
    device: String,
    nonce: u64,
    /// The phone's task: [`Connection::close`] waits for it, so a login still in flight when
    /// the connection closes lands before the server is told to forget the connection.
    phone: tokio::task::JoinHandle<()>,
}

/// How long closing waits for the phone's task (a login stuck on an unreachable database).
const CLOSE_WAIT: Duration = Duration::from_secs(10);

impl Drop for SimConnection {
    /// Forgets this connection in the driver's map (a newer one of the device stays).
    fn drop(&mut self) {
        if let Ok(mut phones) = self.phones.lock()
            && phones
                .get(&self.device)
                .is_some_and(|(n, _)| *n == self.nonce)
        {
            phones.remove(&self.device);
        }
    }
}

#[async_trait]
impl Driver for SimDriver {
    async fn connect(
        &self,
        session_id: &str,
        _epoch: i64,
        credentials: Option<Credentials>,
        events: mpsc::UnboundedSender<DriverEvent>,
    ) -> Result<Box<dyn Connection>, DriverError> {
        tokio::time::sleep(self.cfg.op_delay).await;
        let nonce = self.connections.fetch_add(1, Ordering::Relaxed);
        let (control, rx) = mpsc::unbounded_channel();
        if let Ok(mut phones) = self.phones.lock() {
            phones.insert(session_id.to_owned(), (nonce, control.downgrade()));
        }
        let phone = Phone {
            cfg: self.cfg.clone(),
            session_id: session_id.to_owned(),
            nonce,
            events,
            control: rx,
            server: self.server.clone(),
        };
        let phone = tokio::spawn(phone.run(credentials));
        Ok(Box::new(SimConnection {
            phone,
            control,
            op_delay: self.cfg.op_delay,
            server: self.server.clone(),
            phones: self.phones.clone(),
            device: session_id.to_owned(),
            nonce,
        }))
    }
}

impl SimConnection {
    async fn ask<T>(&self, make: impl FnOnce(Answer<T>) -> Control) -> Result<T, DriverError> {
        tokio::time::sleep(self.op_delay).await;
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .map_err(|_| DriverError::Refused("the session is not connected".into()))?;
        rx.await
            .map_err(|_| DriverError::Refused("the session is not connected".into()))?
    }
}

#[async_trait]
impl Connection for SimConnection {
    async fn request_pairing_code(&mut self, phone_number: &str) -> Result<String, DriverError> {
        let phone = phone_number.to_owned();
        self.ask(|tx| Control::PairCode(phone, tx)).await
    }

    async fn logout(&mut self) -> Result<(), DriverError> {
        let done = self.ask(Control::Logout).await;
        self.server.logoff(&self.device, self.nonce).await;
        done
    }

    async fn close(&mut self) {
        tokio::time::sleep(self.op_delay).await;
        // Dropping the control channel ends the simulated stream. Once the phone's task is
        // over (a login it had in flight has landed), the server forgets the connection
        // before this returns, so whoever connects the device next meets no live stream.
        // Without the wait, a login racing the log-off left a stale live connection, which
        // the next connection of the device, from this very process, met as a conflict.
        let (tx, _) = mpsc::unbounded_channel();
        self.control = tx;
        if tokio::time::timeout(CLOSE_WAIT, &mut self.phone)
            .await
            .is_err()
        {
            tracing::warn!(session_id = %self.device, "the simulated phone did not stop in time");
        }
        self.server.logoff(&self.device, self.nonce).await;
    }

    async fn simulate(&mut self, action: SimAction) -> Result<(), DriverError> {
        match action {
            SimAction::Scan { phone_number } => {
                self.ask(|tx| Control::Scan(phone_number, tx)).await
            }
            SimAction::Unlink => self.ask(Control::Unlink).await,
            SimAction::Conflict => self.ask(Control::Conflict).await,
            SimAction::Drop => self.ask(Control::Drop).await,
            SimAction::Message {
                from,
                content,
                refers_to,
            } => {
                // A simulated contact votes in the clear, naming its options as a vote does.
                let ballot = match &*content {
                    Content::PollVote { poll_vote } => Some(super::Ballot::Open(
                        poll_vote
                            .options
                            .iter()
                            .map(|o| Sha256::digest(o.as_bytes()).into())
                            .collect(),
                    )),
                    _ => None,
                };
                let inbound = Box::new(super::Inbound {
                    id: format!("SIMIN{}", ulid::Ulid::new()),
                    chat: from.clone(),
                    from,
                    content: *content,
                    refers_to: refers_to.map(|r| r.wa_id),
                    // The simulated contact's files are in the media store already.
                    file: None,
                    ballot,
                    timestamp: now_ms(),
                });
                self.ask(|tx| Control::Inbound(inbound, tx)).await
            }
        }
    }

    async fn send(&mut self, message: super::Outgoing) -> Result<Option<String>, DriverError> {
        let message = Box::new(message);
        self.ask(|tx| Control::Send(message, tx)).await.map(Some)
    }

    async fn check_numbers(&mut self, numbers: &[String]) -> Result<Vec<NumberCheck>, DriverError> {
        let numbers = numbers.to_vec();
        self.ask(|tx| Control::Check(numbers, tx)).await
    }

    async fn typing(&mut self, _to: &str) -> Result<(), DriverError> {
        self.ask(Control::Typing).await
    }

    async fn mark_read(&mut self, _message: &super::Inbound) -> Result<(), DriverError> {
        self.ask(Control::MarkRead).await
    }
}

/// One simulated connection: the phone on one side, WhatsApp's servers on the other.
struct Phone {
    cfg: SimConfig,
    session_id: String,
    nonce: u64,
    events: mpsc::UnboundedSender<DriverEvent>,
    control: mpsc::UnboundedReceiver<Control>,
    server: Arc<SimServer>,
}

/// What the simulated WhatsApp says of a number: like the sends, numbers starting with 999
/// are not on WhatsApp; the others are, with a LID of `1<number>`.
fn number_check(number: &str) -> NumberCheck {
    let on = !number.starts_with("999");
    NumberCheck {
        number: number.to_owned(),
        on_whatsapp: on,
        jid: on.then(|| format!("{number}@s.whatsapp.net")),
        lid: on.then(|| format!("1{number}@lid")),
    }
}

fn refuse<T>(tx: Answer<T>, why: &str) {
    let _ = tx.send(Err(DriverError::Refused(why.to_owned())));
}

impl Phone {
    fn digest(&self, what: &str, n: u64) -> [u8; 32] {
        Sha256::digest(format!(
            "{}:{}:{}:{what}:{n}",
            self.cfg.seed, self.session_id, self.nonce
        ))
        .into()
    }

    fn emit(&self, e: DriverEvent) {
        let _ = self.events.send(e);
    }

    async fn run(mut self, credentials: Option<Credentials>) {
        if credentials.is_none() {
            // Boxed, like the connected phase: an idle phone keeps only what it waits on.
            match Box::pin(self.pair()).await {
                Some(paired) => self.emit(paired),
                None => return,
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.connect_delay) => {}
                c = self.control.recv() => if !self.before_connected(c) { return },
            }
        }
        if !self.log_in().await {
            return;
        }
        self.emit(DriverEvent::Connected);
        Box::pin(self.connected()).await;
    }

    /// Logs the device in at the server, retrying while it is unreachable; `false` when the
    /// connection was closed meanwhile.
    async fn log_in(&mut self) -> bool {
        let mut backoff = self.cfg.reconnect_backoff;
        loop {
            match self.server.login(&self.session_id, self.nonce).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::debug!(session_id = %self.session_id, error = %e, "simulated login failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        c = self.control.recv() => if !self.before_connected(c) { return false },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Handles a control message that arrives while logging in; `false` ends the connection.
    fn before_connected(&self, c: Option<Control>) -> bool {
        match c {
            None => false,
            Some(Control::Logout(tx)) => {
                let _ = tx.send(Ok(()));
                false
            }
            Some(Control::Replaced) => {
                self.replaced();
                false
            }
            Some(other) => {
                self.answer_not_now(other);
                true
            }
        }
    }

    fn answer_not_now(&self, c: Control) {
        match c {
            Control::Scan(_, tx)
            | Control::Unlink(tx)
            | Control::Conflict(tx)
            | Control::Drop(tx)
            | Control::Logout(tx) => refuse(tx, "the session is still connecting"),
            Control::PairCode(_, tx) => refuse(tx, "the session is already paired"),
            Control::Send(_, tx) => refuse(tx, "the session is not connected"),
            Control::Check(_, tx) => refuse(tx, "the session is not connected"),
            Control::Typing(tx) | Control::MarkRead(tx) | Control::Inbound(_, tx) => {
                refuse(tx, "the session is not connected")
            }
            Control::Replaced => self.replaced(),
        }
    }

    /// Another connection of this device logged in: WhatsApp replaces this stream.
    fn replaced(&self) {
        tracing::warn!(session_id = %self.session_id, "simulated stream replaced by another connection of the device");
        self.emit(DriverEvent::Disconnected {
            reason: StatusReason::Conflict,
            reconnecting: false,
        });
    }

    /// Rotates QR codes until the phone scans one (or enters a pairing code); `None` when it
    /// never does or the connection is closed.
    async fn pair(&mut self) -> Option<DriverEvent> {
        let mut pending_code: Option<String> = None;
        for i in 0..self.cfg.qr_count {
            let ttl = if i == 0 {
                self.cfg.qr_first_ttl
            } else {
                self.cfg.qr_next_ttl
            };
            let b64 = |d: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(d);
            let code = format!(
                "2@{},{},{},{}",
                b64(self.digest("ref", u64::from(i))),
                b64(self.digest("noise", 0)),
                b64(self.digest("identity", 0)),
                b64(self.digest("adv", 0)),
            );
            self.emit(DriverEvent::Qr {
                code,
                expires_at: now_ms() + ttl.as_millis() as i64,
            });
            let expiry = tokio::time::sleep(ttl);
            tokio::pin!(expiry);
            loop {
                let control = tokio::select! {
                    _ = &mut expiry => break,
                    c = self.control.recv() => c,
                };
                match control {
                    None => return None,
                    Some(Control::Logout(tx)) => {
                        let _ = tx.send(Ok(()));
                        return None;
                    }
                    Some(Control::PairCode(phone, tx)) => {
                        let code = self.pair_code(&phone);
                        pending_code = Some(phone);
                        let _ = tx.send(Ok(code));
                    }
                    Some(Control::Scan(phone, tx)) => {
                        if pending_code.as_ref().is_some_and(|p| *p != phone) {
                            refuse(tx, "this number did not request the pairing code");
                            continue;
                        }
                        let _ = tx.send(Ok(()));
                        return Some(self.paired(phone));
                    }
                    Some(Control::Unlink(tx) | Control::Conflict(tx) | Control::Drop(tx)) => {
                        refuse(tx, "the session is not paired")
                    }
                    Some(Control::Send(_, tx)) => refuse(tx, "the session is not paired"),
                    Some(Control::Check(_, tx)) => refuse(tx, "the session is not paired"),
                    Some(Control::Typing(tx) | Control::MarkRead(tx) | Control::Inbound(_, tx)) => {
                        refuse(tx, "the session is not paired")
                    }
                    Some(Control::Replaced) => {}
                }
            }
        }
        self.emit(DriverEvent::QrTimeout);
        None
    }

    fn pair_code(&self, phone: &str) -> String {
        const ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTVWXYZ";
        let d = self.digest(&format!("pair:{phone}"), 0);
        let c: String = d[..8]
            .iter()
            .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
            .collect();
        format!("{}-{}", &c[..4], &c[4..])
    }

    fn paired(&self, phone: String) -> DriverEvent {
        let d = self.digest("lid", 0);
        let lid_number = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
            % 900_000_000_000_000
            + 100_000_000_000_000;
        DriverEvent::Paired(Box::new(Paired {
            jid: format!("{phone}@s.whatsapp.net"),
            lid: format!("{lid_number}@lid"),
            credentials: json!({
                "driver": "sim",
                "phoneNumber": phone,
                "deviceKey": base64::engine::general_purpose::STANDARD.encode(self.digest("device", 0)),
            }),
            phone_number: phone,
        }))
    }

    /// Connected: serve until the phone, WhatsApp or the worker ends the stream.
    async fn connected(&mut self) {
        let mut backoff = self.cfg.reconnect_backoff;
        while let Some(control) = self.control.recv().await {
            match control {
                Control::Logout(tx) => {
                    let _ = tx.send(Ok(()));
                    return;
                }
                Control::Unlink(tx) => {
                    let _ = tx.send(Ok(()));
                    self.server.logoff(&self.session_id, self.nonce).await;
                    self.emit(DriverEvent::LoggedOut {
                        reason: StatusReason::DeviceRemoved,
                    });
                    return;
                }
                Control::Conflict(tx) => {
                    let _ = tx.send(Ok(()));
                    self.server.logoff(&self.session_id, self.nonce).await;
                    self.emit(DriverEvent::Disconnected {
                        reason: StatusReason::Conflict,
                        reconnecting: false,
                    });
                    return;
                }
                Control::Replaced => {
                    self.replaced();
                    return;
                }
                Control::Drop(tx) => {
                    let _ = tx.send(Ok(()));
                    self.emit(DriverEvent::Disconnected {
                        reason: StatusReason::ConnectionLost,
                        reconnecting: true,
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        c = self.control.recv() => if !self.before_connected(c) { return },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    if !self.log_in().await {
                        return;
                    }
                    self.emit(DriverEvent::Connected);
                }
                Control::Typing(tx) | Control::MarkRead(tx) => {
                    let _ = tx.send(Ok(()));
                }
                Control::Check(numbers, tx) => {
                    let _ = tx.send(Ok(numbers.iter().map(|n| number_check(n)).collect()));
                }
                Control::Inbound(inbound, tx) => {
                    let _ = tx.send(Ok(()));
                    self.emit(DriverEvent::Message(inbound));
                }
                Control::Send(mut message, tx) => {
                    let sent = self
                        .server
                        .accept_message(&self.session_id, &mut message)
                        .await;
                    if let Ok(id) = &sent {
                        self.recipient_reads(message.to, id.clone());
                    }
                    let _ = tx.send(sent);
                }
                Control::Scan(_, tx) => refuse(tx, "the session is already paired"),
                Control::PairCode(_, tx) => refuse(tx, "the session is already paired"),
            }
        }
    }

    /// The recipient's phone: it acknowledges a message delivered, then read.
    fn recipient_reads(&self, to: String, message_id: String) {
        let (events, deliver, read) = (
            self.events.clone(),
            self.cfg.deliver_delay,
            self.cfg.read_delay,
        );
        tokio::spawn(async move {
            tracing::debug!(%to, %message_id, "simulated recipient got a message");
            tokio::time::sleep(deliver).await;
            let receipt = |read| DriverEvent::Receipt {
                message_id: message_id.clone(),
                read,
            };
            if events.send(receipt(false)).is_err() {
                return;
            }
            tokio::time::sleep(read.saturating_sub(deliver)).await;
            let _ = events.send(receipt(true));
        });
    }
}
