//! The api's accept loop: HTTP/1.1 connections served by hyper, with a header read timeout.
//!
//! `axum::serve` gives hyper no timer, and without one hyper cannot time anything out: a
//! client that opens a connection and trickles its header a byte at a time (or never ends
//! it) holds a connection and its task forever, and a few thousand such clients exhaust the
//! replica. So the loop is ours, a dozen lines on hyper-util's building blocks: each
//! connection gets `API_HEADER_READ_TIMEOUT_MS` to send a whole request header (hyper starts
//! the clock when it waits for a header, so it is also the longest a kept-alive connection may
//! sit idle), and shutdown stops accepting, lets every
//! connection finish its request in flight (event streams end with the same token), then
//! returns, as `axum::serve`'s graceful shutdown did.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long to back off when `accept` fails (out of file descriptors, usually).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown`, then waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Each request knows its connection's peer (`ConnectInfo`), as with `axum::serve`.
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        ));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
