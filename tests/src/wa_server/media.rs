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
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
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
use waproto::whatsapp as wa;

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
    /// Downloads answer 404, as for links that expired.
    pub expired: std::sync::atomic::AtomicBool,
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
    if shared
        .media
        .expired
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return (StatusCode::NOT_FOUND, "expired").into_response();
    }
    match shared.media.file(&format!("/v/{kind}/{token}")) {
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
