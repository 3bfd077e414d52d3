//! WhatsApp's media hosts, as the crate reaches them: a `media_conn` query (answered in
//! [`conn`](super::conn)) names this host and an auth token; a file is uploaded encrypted,
//! `POST /mms/<type>/<token>?auth=…&token=…` (the token is its encrypted SHA-256), answered
//! with its `url` and `direct_path`; a device or a phone downloads it by that path. Files are
//! kept as they came, encrypted: only a message's key opens them, as on WhatsApp.
//!
//! HTTPS, as the crate insists, with a certificate made at start and signed by nobody: only
//! the crate's HTTP client built with `danger-skip-tls-verify` (the `worker-wa-test-server`
//! binary) accepts it.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use wacore::{
    download::{DownloadUtils, Downloadable},
    proto_helpers::MessageExt,
};
use wacore_binary::{Node, builder::NodeBuilder};
use waproto::{buffa::Message as _, whatsapp as wa};

use super::Shared;

/// The auth token `media_conn` hands out; an upload without it is refused (401), as an
/// expired one is by WhatsApp.
pub const AUTH: &str = "test-media-auth";

/// Where the hosts are, once served: what `media_conn` names, and the files.
#[derive(Default)]
pub(super) struct Hosts {
    /// `host:port` as devices reach it.
    pub hostname: OnceLock<String>,
    files: Mutex<HashMap<String, Bytes>>,
    /// Paths that answer 404, as links do once they expired.
    dead: Mutex<HashSet<String>>,
    /// Files phones sent, by message id: what they need to upload one again.
    sent: Mutex<HashMap<String, Sent>>,
    /// A file a phone sends from now on has a dead link from the start (its upload again is
    /// live).
    pub links_die: AtomicBool,
    /// Phones no longer have the files they sent: they cannot upload one again.
    pub phones_lost_files: AtomicBool,
    /// Downloads get no answer, ever, as from a host that stopped mid-way.
    pub downloads_stall: AtomicBool,
    /// Files uploaded again at a device's request.
    pub uploaded_again: AtomicUsize,
}

/// A file a phone sent: the key its message carries, where it was kept.
struct Sent {
    media_key: [u8; 32],
    kind: String,
    token: String,
}

impl Hosts {
    /// The encrypted bytes at `direct_path` (its query, if any, ignored).
    pub fn file(&self, direct_path: &str) -> Option<Bytes> {
        let path = direct_path.split('?').next().unwrap_or_default();
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
    }

    /// A phone sent message `id` with the file kept as `kind`/`token` under `media_key`.
    pub fn sent(&self, id: &str, media_key: &[u8; 32], kind: &str, token: &str) {
        if self.links_die.load(Ordering::SeqCst) {
            lock(&self.dead).insert(format!("/v/t62.{kind}/{token}"));
        }
        let sent = Sent {
            media_key: *media_key,
            kind: kind.to_owned(),
            token: token.to_owned(),
        };
        lock(&self.sent).insert(id.to_owned(), sent);
    }

    /// A device's `<receipt type="server-error">` for message `id` (its file's link is dead):
    /// the sender's phone uploads it again under a new path and answers with the
    /// `mediaretry` notification that names it, sealed under the file's key, as WhatsApp
    /// relays it; or says it no longer has the file (`<error code="2">`).
    pub fn upload_again(&self, receipt: &Node) -> Option<Node> {
        let id = receipt.attrs.get("id")?.as_str().into_owned();
        let rmr = receipt.get_optional_child("rmr")?.clone();
        let sent = lock(&self.sent)
            .get(&id)
            .map(|s| (s.media_key, s.kind.clone(), s.token.clone()));
        let notification = NodeBuilder::new("notification")
            .attr("type", "mediaretry")
            .attr("id", id.clone())
            .attr("from", super::conn::SERVER)
            .attr("t", (shared::db::now_ms() / 1000).to_string());
        let again = match sent {
            Some((key, kind, token)) if !self.phones_lost_files.load(Ordering::SeqCst) => {
                let bytes = self.file(&format!("/v/t62.{kind}/{token}"))?;
                let n = self.uploaded_again.fetch_add(1, Ordering::SeqCst) + 1;
                Some((key, self.keep(&kind, &format!("{token}-again{n}"), bytes)))
            }
            _ => None,
        };
        let Some((key, path)) = again else {
            let error = NodeBuilder::new("error").attr("code", "2").build();
            return Some(notification.children([rmr, error]).build());
        };
        let answer = wa::MediaRetryNotification {
            stanza_id: Some(id.clone()),
            direct_path: Some(path),
            result: Some(wa::media_retry_notification::ResultType::SUCCESS),
            ..Default::default()
        };
        let (sealed, iv) = seal_retry(&key, &id, &answer.encode_to_vec());
        let encrypt = NodeBuilder::new("encrypt")
            .children([
                NodeBuilder::new("enc_p").bytes(sealed).build(),
                NodeBuilder::new("enc_iv").bytes(iv.to_vec()).build(),
            ])
            .build();
        Some(notification.children([encrypt, rmr]).build())
    }

    /// Keeps `encrypted` as the file whose encrypted SHA-256 is `token`: its direct path.
    pub fn keep(&self, kind: &str, token: &str, encrypted: Bytes) -> String {
        let path = format!("/v/t62.{kind}/{token}");
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone(), encrypted);
        path
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A media-retry answer sealed as the client opens it: AES-256-GCM under the key HKDF makes of
/// the file's media key ("WhatsApp Media Retry Notification"), the message id as associated
/// data, a random 12-byte IV.
fn seal_retry(media_key: &[u8; 32], id: &str, plain: &[u8]) -> (Vec<u8>, [u8; 12]) {
    let mut key = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, media_key)
        .expand(b"WhatsApp Media Retry Notification", &mut key)
        .expect("32 bytes");
    let iv: [u8; 12] = rand010::random();
    let mut sealed = Vec::new();
    wacore::libsignal::crypto::aes_256_gcm_encrypt(&key, &iv, id.as_bytes(), plain, &mut sealed)
        .expect("AES-GCM");
    (sealed, iv)
}

/// Serves the media hosts on `listener` (HTTPS); devices are told `hostname`.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config()));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        loop {
            let Ok((socket, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(socket).await {
                    let _ = tx.send((tls, peer)).await;
                }
            });
        }
    });
    let router = Router::new()
        .route("/mms/{kind}/{token}", post(upload))
        .route("/v/{kind}/{token}", get(download))
        // WhatsApp's hosts take a document of 100 MB and more (axum's default is 2 MB).
        .layer(axum::extract::DefaultBodyLimit::max(200 << 20))
        .with_state(shared);
    let _ = axum::serve(TlsListener { rx, addr }, router).await;
}

async fn upload(
    State(shared): State<Arc<Shared>>,
    Path((kind, token)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> axum::response::Response {
    if query.get("auth").map(String::as_str) != Some(AUTH) {
        return (StatusCode::UNAUTHORIZED, "bad media auth").into_response();
    }
    // Nothing is ever half-uploaded here: nothing to resume.
    if query.contains_key("resume") {
        return (StatusCode::NOT_FOUND, "no such upload").into_response();
    }
    let path = shared.media.keep(&kind, &token, body);
    let host = shared.media.hostname.get().cloned().unwrap_or_default();
    Json(json!({"url": format!("https://{host}{path}"), "direct_path": path})).into_response()
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path((kind, token)): Path<(String, String)>,
) -> axum::response::Response {
    let path = format!("/v/{kind}/{token}");
    if shared.media.downloads_stall.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if lock(&shared.media.dead).contains(&path) {
        return (StatusCode::NOT_FOUND, "expired").into_response();
    }
    match shared.media.file(&path) {
        Some(bytes) => bytes.into_response(),
        None => (StatusCode::NOT_FOUND, "gone").into_response(),
    }
}

/// A certificate for this run, signed by itself.
fn tls_config() -> rustls::ServerConfig {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let made = rcgen::generate_simple_self_signed(names).expect("a certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .expect("the certificate")
}

/// Accepted TLS streams, handshakes done, for `axum::serve`.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// The plain bytes of the file `message` carries: fetched from `hosts` by its direct path and
/// opened with its key, as the recipient's phone does; the encrypted and the plain SHA-256
/// the message names are checked.
pub(super) fn open(hosts: &Hosts, message: &wa::Message) -> Result<Vec<u8>, String> {
    use sha2::{Digest, Sha256};
    let base = message.get_base_message();
    let file: &dyn Downloadable = if let Some(m) = base.image_message.as_option() {
        m
    } else if let Some(m) = base.video_message.as_option() {
        m
    } else if let Some(m) = base.audio_message.as_option() {
        m
    } else if let Some(m) = base.document_message.as_option() {
        m
    } else if let Some(m) = base.sticker_message.as_option() {
        m
    } else {
        return Err("the message carries no file".into());
    };
    let path = file
        .direct_path()
        .ok_or("the message names no direct path")?;
    let encrypted = hosts
        .file(path)
        .ok_or_else(|| format!("no file at {path} (never uploaded, or forgotten)"))?;
    if file.file_enc_sha256() != Some(&Sha256::digest(&encrypted)[..]) {
        return Err("the encrypted file is not the one the message names".into());
    }
    let key = file.media_key().ok_or("the message carries no media key")?;
    let plain = DownloadUtils::verify_and_decrypt(&encrypted, key, file.app_info())
        .map_err(|e| format!("cannot open the file with the message's key: {e}"))?;
    if file.file_sha256() != Some(&Sha256::digest(&plain)[..]) {
        return Err("the opened file is not the one the message names".into());
    }
    Ok(plain)
}
