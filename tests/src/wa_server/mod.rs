//! A WhatsApp protocol server for tests: what the `whatsapp` driver's crate needs from
//! WhatsApp's servers, spoken for real (WebSocket, Noise, binary stanzas), with a simulated
//! phone per account that links devices as a phone does.
//!
//! Read it by file:
//! - here, the server: its accounts and linked devices, and the accept loop;
//! - [`noise`]: framing and the Noise handshakes;
//! - [`conn`]: one stream's stanzas, from pairing or login to the end;
//! - [`media`]: the media hosts files are uploaded to and downloaded from (HTTPS);
//! - [`phone`]: the simulated phone of an account — what its owner does with it; every
//!   account's phone is also a contact the others write to and hear from;
//! - [`control`]: the phones over HTTP, for other processes (the `wa-server` binary);
//! - [`signal`]: a phone's Signal state, so it decrypts what devices send it and encrypts what
//!   it sends them.
//!
//! Only a worker built with `danger-skip-cert-chain-verify` (the `worker-wa-test-server`
//! binary, worker feature `wa-test-server`) connects: the certificate chain here is not
//! signed by WhatsApp. `NOTES.md` in this folder records what each stanza answers, read
//! off the crate's sources.

mod conn;
mod control;
mod media;
pub mod noise;
mod phone;
mod signal;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use wacore::libsignal::protocol::KeyPair;
use wacore_binary::Node;

pub use phone::Phone;

/// What a stream's task is told to do from outside it.
enum Outbound {
    Send(Node),
    /// Sends the node, then closes the stream.
    End(Node),
    /// Closes the socket without a word, as a network drop does.
    Drop,
}

/// A stream, as the rest of the server reaches it.
#[derive(Clone)]
struct Stream {
    id: u64,
    out: mpsc::UnboundedSender<Outbound>,
    /// When its handshake ended (for the report of a replaced stream).
    opened: std::time::Instant,
    /// Its TCP socket, to peek at from outside the stream's task.
    socket: Option<Arc<std::net::TcpStream>>,
}

impl Stream {
    /// Whether its client has let it go already: the socket's end, or a WebSocket close
    /// frame, waits in the socket, not yet read by the stream's task (busy, or not scheduled
    /// yet). A device that closed its stream and then logged in again is not connected twice,
    /// however late the stream's task reads the close.
    fn let_go(&self) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        let mut pending = vec![0; 1 << 18];
        match socket.peek(&mut pending) {
            Ok(0) => true,
            Ok(n) => holds_close(&pending[..n]),
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// Whether these bytes, read from a client, hold a WebSocket close frame (RFC 6455 §5.2:
/// every frame says its length, so the frames are walked header to header).
fn holds_close(mut data: &[u8]) -> bool {
    while let [first, second, rest @ ..] = data {
        if first & 0x0f == 0x8 {
            return true;
        }
        let (len, rest) = match second & 0x7f {
            126 => match rest.split_first_chunk::<2>() {
                Some((len, rest)) => (u64::from(u16::from_be_bytes(*len)), rest),
                None => return false,
            },
            127 => match rest.split_first_chunk::<8>() {
                Some((len, rest)) => (u64::from_be_bytes(*len), rest),
                None => return false,
            },
            len => (u64::from(len), rest),
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        let Some(next) = usize::try_from(len)
            .ok()
            .and_then(|len| rest.get(mask + len..))
        else {
            return false;
        };
        data = next;
    }
    false
}

/// What a device sent when it registered: the keys its Signal bundle is made of.
#[derive(Clone, Debug, Default)]
struct Registration {
    registration_id: Vec<u8>,
    identity: [u8; 32],
    signed_pre_key_id: Vec<u8>,
    signed_pre_key: Vec<u8>,
    signed_pre_key_signature: Vec<u8>,
}

/// A device linked to an account (a companion: the worker's client).
struct Companion {
    noise: [u8; 32],
    registration: Registration,
    /// Its place in the account's signed list of devices.
    key_index: u32,
    /// The `ADVSignedDeviceIdentity` the device signed when it paired.
    device_identity: Vec<u8>,
    /// Pre-keys it uploaded (`<key>` nodes), for contacts' bundles.
    pre_keys: Vec<Node>,
    /// Messages for it not yet acknowledged with a receipt, by id: WhatsApp's offline queue,
    /// sent again at each login until the device says it got them.
    inbox: Vec<(String, Node)>,
}

/// A message a phone received from a linked device, decrypted by the phone.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    pub id: String,
    /// The sender's phone number.
    pub from: String,
    /// Its text (`None` for what is not text).
    pub text: Option<String>,
    /// The whole message, as the phone decoded it.
    pub message: waproto::whatsapp::Message,
    pub at_ms: i64,
}

impl Received {
    /// What it says, as the driver reads a message of that type (`None`: another type).
    pub fn content(&self) -> Option<shared::message::Content> {
        worker::driver::whatsapp::content::from_wa(&self.message)
    }

    /// WhatsApp's id of the message it quotes.
    pub fn quotes(&self) -> Option<String> {
        worker::driver::whatsapp::content::quoted_id(&self.message)
    }

    /// The reaction it is: WhatsApp's id of the message it is on, and the emoji.
    pub fn reaction(&self) -> Option<(String, String)> {
        let r = self.message.reaction_message.as_option()?;
        Some((r.key.id.clone()?, r.text.clone().unwrap_or_default()))
    }

    /// Of an edit: WhatsApp's id of the message edited, and its new text.
    pub fn edit(&self) -> Option<(String, String)> {
        use waproto::whatsapp::message::protocol_message::Type;
        let p = self.message.protocol_message.as_option()?;
        (p.r#type == Some(Type::MessageEdit)).then_some(())?;
        let text = worker::driver::whatsapp::content::from_wa(p.edited_message.as_option()?)?;
        Some((p.key.id.clone()?, text.text().to_owned()))
    }

    /// A vote on this poll by `voter` (a JID), sealed with the poll's secret as WhatsApp's
    /// apps seal one: each option by the SHA-256 of its name; `creator` is the JID that sent
    /// the poll. `None` when it is not a poll with a secret.
    pub fn vote(
        &self,
        creator: &str,
        voter: &str,
        options: &[&str],
    ) -> Option<waproto::whatsapp::Message> {
        use waproto::{buffa::MessageField, whatsapp as wa};
        let context = self.message.message_context_info.as_option()?;
        let secret = context.message_secret.clone()?;
        let chosen: Vec<Vec<u8>> = options
            .iter()
            .map(|o| wacore::poll::compute_option_hash(o).to_vec())
            .collect();
        let (payload, iv) =
            wacore::poll::encrypt_poll_vote_with_secret(&chosen, &secret, &self.id, creator, voter)
                .ok()?;
        Some(wa::Message {
            poll_update_message: MessageField::some(wa::message::PollUpdateMessage {
                poll_creation_message_key: MessageField::some(wa::MessageKey {
                    remote_jid: Some(creator.to_owned()),
                    from_me: Some(false),
                    id: Some(self.id.clone()),
                    participant: None,
                }),
                vote: MessageField::some(wa::message::PollEncValue {
                    enc_payload: Some(payload),
                    enc_iv: Some(iv.to_vec()),
                }),
                sender_timestamp_ms: Some(shared::db::now_ms()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Of a delete for everyone: WhatsApp's id of the message deleted.
    pub fn revoke(&self) -> Option<String> {
        use waproto::whatsapp::message::protocol_message::Type;
        let p = self.message.protocol_message.as_option()?;
        (p.r#type == Some(Type::Revoke)).then_some(())?;
        p.key.id.clone()
    }
}

/// A receipt a phone got for a message it sent: `kind` is `delivered`, `read`, ….
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptSeen {
    pub id: String,
    pub from: String,
    pub kind: String,
}

/// A WhatsApp account: a phone number with its phone and linked devices.
struct Account {
    lid: String,
    name: String,
    /// The account's identity key: it signs every device the phone links.
    identity: KeyPair,
    companions: BTreeMap<u16, Companion>,
    next_device: u16,
    next_key_index: u32,
    /// A temporary ban: WhatsApp's code and how long it lasts, in seconds.
    ban: Option<(u32, u64)>,
    /// The phone's own Signal state (device 0).
    peer: signal::Peer,
    received: Vec<Received>,
    receipts: Vec<ReceiptSeen>,
    /// Chat states ("composing", "paused") devices showed this phone: (from, state, at ms).
    chat_states: Vec<(String, String, i64)>,
}

impl Account {
    /// A number's account as it comes to exist here: on first mention (every number is on
    /// WhatsApp on this server), with a phone and no linked device.
    fn new(number: &str) -> Account {
        let identity = KeyPair::generate(&mut rand010::rng());
        Account {
            // A LID is another number of the same account; any stable one will do.
            lid: format!(
                "{}",
                100_000_000_000_000u64 + number.parse::<u64>().unwrap_or(0)
            ),
            name: format!("Phone {number}"),
            peer: signal::Peer::new(&identity),
            identity,
            companions: Default::default(),
            next_device: 10,
            next_key_index: 1,
            ban: None,
            received: vec![],
            receipts: vec![],
            chat_states: vec![],
        }
    }
}

/// The digits of a phone number as typed (`+62 811…`): how accounts are named.
fn digits(number: &str) -> String {
    number.chars().filter(char::is_ascii_digit).collect()
}

/// An observation for tests: what the server saw happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A device connected and completed a handshake of this pattern.
    Handshake { pattern: &'static str },
    /// A handshake that did not complete, and why.
    HandshakeFailed(String),
    /// A device logged in: `phone:device`.
    LoggedIn(String),
    /// A device asked to be unlinked (logout): `phone:device`.
    CompanionRemoved(String),
    /// A stream was replaced by a newer one of the same device: `phone:device`.
    Replaced(String),
    /// A device logged in again while the close of its previous stream was still on its way
    /// (sent, not yet read here): `phone:device`. Not a second connection.
    Superseded(String),
    /// A phone could not decrypt what a device sent it, and why.
    Undecryptable(String),
}

/// A device that asked to be linked by a code typed on the phone, as far as it got.
struct LinkCode {
    /// The device's Noise key: which pairing stream it is.
    noise: [u8; 32],
    /// Its ephemeral key, sealed under the code.
    wrapped_ephemeral: Vec<u8>,
    pairing_ref: String,
    /// Where the device's last step (its key bundle and identity) goes, once the phone
    /// waits for it.
    finish: Option<tokio::sync::oneshot::Sender<(Vec<u8>, Vec<u8>)>>,
}

#[derive(Default)]
struct State {
    accounts: HashMap<String, Account>,
    /// Streams of unregistered devices waiting for a phone to scan their QR code, by the
    /// device's Noise key, with what they registered.
    pairing: HashMap<[u8; 32], (Stream, Registration)>,
    /// Link-code requests by the phone number they name.
    link_codes: HashMap<String, LinkCode>,
    /// Logged-in streams by `(phone, device)`.
    live: HashMap<(String, u16), Stream>,
    /// Answers the server waits for, by iq id.
    replies: HashMap<String, tokio::sync::oneshot::Sender<Node>>,
    /// The oldest client version served; older ones get a 405.
    min_version: Option<(u32, u32, u32)>,
    /// Phones read what devices send them this long after it arrives (never when `None`:
    /// tests read with [`Phone::read`]).
    read_after: Option<std::time::Duration>,
    seen: Vec<Seen>,
}

struct Shared {
    identity: noise::ServerIdentity,
    state: Mutex<State>,
    ids: AtomicU64,
    media: media::Hosts,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    fn saw(&self, seen: Seen) {
        self.state().seen.push(seen);
    }
}

/// The server, listening; stops (with every stream) when dropped.
pub struct WaServer {
    /// `ws://127.0.0.1:<port>/ws/chat`: the workers' `WA_WS_URL`.
    pub url: String,
    shared: Arc<Shared>,
    /// The accept loop, and the control API's once served.
    tasks: Vec<JoinHandle<()>>,
}

impl WaServer {
    /// Listens on a free local port, its media hosts on another.
    pub async fn start() -> WaServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut server = WaServer::serve(listener);
        let media = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hostname = media.local_addr().expect("address").to_string();
        server.serve_media(media, hostname);
        server
    }

    /// Serves the media hosts (HTTPS, [`media`]) on `listener`, named `hostname` (`host:port`
    /// as the workers reach it) in `media_conn` answers.
    pub fn serve_media(&mut self, listener: TcpListener, hostname: String) {
        let _ = self.shared.media.hostname.set(hostname);
        self.tasks
            .push(tokio::spawn(media::serve(listener, self.shared.clone())));
    }

    /// The plain bytes of the file a received message carries, as its recipient's phone gets
    /// them: downloaded from the media hosts and decrypted with the message's key (the
    /// encrypted and the plain SHA-256 checked).
    pub fn file_of(&self, received: &Received) -> Result<Vec<u8>, String> {
        media::open(&self.shared.media, &received.message)
    }

    /// Files phones send from now on have dead links from the start (`true`), as links are
    /// once WhatsApp's hosts dropped the file: a device must ask the sender's phone to upload
    /// it again (media re-upload).
    pub fn links_die(&self, die: bool) {
        let media = &self.shared.media;
        media
            .links_die
            .store(die, std::sync::atomic::Ordering::SeqCst);
    }

    /// Downloads from the media hosts get no answer (`true`), ever.
    pub fn downloads_stall(&self, stall: bool) {
        let media = &self.shared.media;
        media
            .downloads_stall
            .store(stall, std::sync::atomic::Ordering::SeqCst);
    }

    /// Phones no longer have the files they sent (`true`): asked to upload one again, they
    /// answer that they cannot.
    pub fn phones_lose_files(&self, lost: bool) {
        let media = &self.shared.media;
        media
            .phones_lost_files
            .store(lost, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many files phones uploaded again at a device's request.
    pub fn uploaded_again(&self) -> usize {
        let media = &self.shared.media;
        media
            .uploaded_again
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Serves on `listener`.
    pub fn serve(listener: TcpListener) -> WaServer {
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(Shared {
            identity: noise::ServerIdentity::fixed(),
            state: Mutex::default(),
            ids: AtomicU64::new(1),
            media: media::Hosts::default(),
        });
        let accepting = shared.clone();
        let accept = tokio::spawn(async move {
            let mut streams = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        streams.spawn(conn::serve(socket, accepting.clone()));
                    }
                    Some(_) = streams.join_next() => {}
                }
            }
        });
        WaServer {
            url: format!("ws://{addr}/ws/chat"),
            shared,
            tasks: vec![accept],
        }
    }

    /// Serves the control API (the phones over HTTP, [`control`]) on `listener`; answers
    /// its base URL, `http://<address>`.
    pub fn serve_control(&mut self, listener: TcpListener) -> String {
        let addr = listener.local_addr().expect("address");
        let router = control::router(self.shared.clone());
        self.tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        }));
        format!("http://{addr}")
    }

    /// The phone of account `number` (digits, as in a JID), created on first use.
    pub fn phone(&self, number: &str) -> Phone {
        Phone::of(self.shared.clone(), number)
    }

    /// Refuses clients older than `version` with WhatsApp's 405 ("client outdated").
    pub fn require_version(&self, version: (u32, u32, u32)) {
        self.shared.state().min_version = Some(version);
    }

    /// Every phone reads each message a device sends it `after` it arrived, as a contact
    /// with the chat open does.
    pub fn read_after(&self, after: std::time::Duration) {
        self.shared.state().read_after = Some(after);
    }

    /// What every phone received from linked devices, decrypted: each copy it decrypted.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .state()
            .accounts
            .values()
            .flat_map(|a| a.received.iter().cloned())
            .collect()
    }

    /// Links every session of `ids`, the `i`-th by the phone of `number(i)`, as its operator
    /// would ([`Phone::link_session`], each step within `limit`), `at_once` at a time.
    pub async fn link_sessions(
        &self,
        api: &crate::Api,
        key: &str,
        ids: &[String],
        at_once: usize,
        limit: std::time::Duration,
        number: impl Fn(usize) -> String,
    ) {
        use futures::StreamExt;
        futures::stream::iter(ids.iter().enumerate())
            .for_each_concurrent(at_once, |(i, id)| {
                let phone = self.phone(&number(i));
                async move {
                    phone.link_session(api, key, id, limit).await;
                }
            })
            .await;
    }

    /// What the server saw so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.state().seen.clone()
    }
}

impl Drop for WaServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;

    use super::{Stream, holds_close};

    /// A client's frame: FIN, `opcode`, masked, with a payload of `len` bytes.
    fn frame(opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend((len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend((len as u64).to_be_bytes());
            }
        }
        f.extend([1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(7, len));
        f
    }

    #[test]
    fn a_close_is_found_behind_frames_of_every_length() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let mut data = frame(0x2, len);
            assert!(!holds_close(&data), "a binary frame of {len} bytes");
            data.extend(frame(0x8, 2));
            assert!(holds_close(&data), "a close behind {len} bytes");
        }
    }

    #[test]
    fn a_frame_cut_short_hides_what_follows_it() {
        let mut data = frame(0x2, 300);
        data.truncate(100);
        assert!(!holds_close(&data));
        assert!(!holds_close(&[0x82]));
        assert!(!holds_close(&[]));
    }

    /// A fresh connection: the server's end as a stream peeked the way `conn.rs` does (and
    /// the end itself, held open as the stream's task holds it), and the client's end.
    async fn connected() -> (Stream, tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let peek = socket2::SockRef::from(&server)
            .try_clone()
            .expect("duplicate");
        let stream = Stream {
            id: 0,
            out: tokio::sync::mpsc::unbounded_channel().0,
            opened: std::time::Instant::now(),
            socket: Some(Arc::new(std::net::TcpStream::from(peek))),
        };
        (stream, server, client)
    }

    #[tokio::test]
    async fn a_stream_is_let_go_once_its_close_or_its_end_waits_unread() {
        let (open, _server, mut client) = connected().await;
        assert!(!open.let_go(), "nothing sent: open");
        client.write_all(&frame(0x2, 40)).await.expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!open.let_go(), "a stanza waiting: still open");
        client.write_all(&frame(0x8, 2)).await.expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(open.let_go(), "its close waits behind the stanza");

        let (ended, _server, client) = connected().await;
        drop(client);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(ended.let_go(), "the socket's end");
    }
}
