//! What every request goes through around its handler: request metrics by route template, a
//! debug line, the body size limit, and a guard that turns a handler's panic into the
//! documented 500 envelope.
//!
//! One layer with one concrete future, rather than `middleware::from_fn`, tower-http's
//! `CatchPanicLayer` and `DefaultBodyLimit` stacked: axum applies a router's layers route by
//! route and boxes each one's service and future again, `from_fn` boxes once more, and
//! `CatchPanic` boxes the response body. With the metrics macros building and hashing their
//! keys on every call, that stack cost `GET /sessions/{id}` a measurable share of its CPU (the
//! README's "Tests and benchmarks" section has the figures). Here the metric handles are looked
//! up once per (route, method, status) and thread, then kept.

use std::{
    any::Any,
    cell::RefCell,
    collections::HashMap,
    convert::Infallible,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use futures::{
    FutureExt,
    future::{CatchUnwind, Either, Ready, ready},
};
use metrics::{Counter, Histogram};
use shared::Error;
use tower::{Layer, Service};

use crate::error::ApiError;

/// Wraps each route in [`Observe`]; `body_limit` is the largest request body, in bytes.
#[derive(Clone, Copy)]
pub struct ObserveLayer {
    body_limit: usize,
}

impl ObserveLayer {
    pub fn new(body_limit: usize) -> Self {
        ObserveLayer { body_limit }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<<DefaultBodyLimit as Layer<S>>::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner: DefaultBodyLimit::max(self.body_limit).layer(inner),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

type Caught<T> = Result<T, Box<dyn Any + Send>>;

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let method = method_label(req.method());
        let route = req.extensions().get::<MatchedPath>().cloned();
        // A handler may panic while its future is built as well as while it runs.
        let inner = match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(future) => Either::Left(AssertUnwindSafe(future).catch_unwind()),
            Err(panic) => Either::Right(ready(Err(panic))),
        };
        ObserveFuture {
            inner,
            started,
            method,
            route,
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future, caught and timed.
    pub struct ObserveFuture<F: Future> {
        #[pin]
        inner: Either<CatchUnwind<AssertUnwindSafe<F>>, Ready<Caught<F::Output>>>,
        started: Instant,
        method: &'static str,
        route: Option<MatchedPath>,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match ready!(this.inner.poll(cx)) {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => {
                tracing::error!("a request handler panicked");
                ApiError(Error::internal("handler panicked")).into_response()
            }
        };
        let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        record(
            this.method,
            route,
            response.status(),
            this.started.elapsed(),
        );
        Poll::Ready(Ok(response))
    }
}

/// One (route, method, status)'s metric handles.
struct Handles {
    /// The route template the key's address was taken from, to tell a reused address.
    route: &'static str,
    requests: Counter,
    duration: Histogram,
}

/// (route template's address and length, method label's address, status).
type HandleKey = (usize, usize, usize, u16);

thread_local! {
    /// Per thread, so finding a request's handles takes no lock and shares no cache line.
    static HANDLES: RefCell<HashMap<HandleKey, Handles>> = RefCell::new(HashMap::new());
}

/// Counts a request and its duration, by route template (never by raw path), method and
/// status, and logs it at debug level.
fn record(method: &'static str, route: &str, status: StatusCode, elapsed: Duration) {
    // The template's address is the router's one copy of it, the same for every request of a
    // route; its contents are compared too, in case a router was dropped and another one's
    // template took its place.
    let key = (
        route.as_ptr() as usize,
        route.len(),
        method.as_ptr() as usize,
        status.as_u16(),
    );
    HANDLES.with_borrow_mut(|cache| {
        let handles = match cache.get(&key) {
            Some(found) if found.route == route => found,
            _ => {
                let route = intern(route);
                let status_label = intern(status.as_str());
                cache.insert(
                    key,
                    Handles {
                        route,
                        requests: metrics::counter!("http_requests_total", "method" => method,
                            "route" => route, "status" => status_label),
                        duration: metrics::histogram!("http_request_duration_seconds",
                            "method" => method, "route" => route),
                    },
                );
                &cache[&key]
            }
        };
        handles.requests.increment(1);
        handles.duration.record(elapsed.as_secs_f64());
    });
    tracing::debug!(
        method,
        route,
        status = status.as_u16(),
        elapsed_us = elapsed.as_micros() as u64,
        "request"
    );
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A `'static` copy of a label value from a small, fixed set (route templates, status codes).
fn intern(s: &str) -> &'static str {
    use std::{collections::HashSet, sync::RwLock};
    static SEEN: RwLock<Option<HashSet<&'static str>>> = RwLock::new(None);
    if let Some(found) = SEEN
        .read()
        .ok()
        .and_then(|set| set.as_ref()?.get(s).copied())
    {
        return found;
    }
    let mut set = SEEN.write().unwrap_or_else(|p| p.into_inner());
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(found) = set.get(s) {
        return found;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, routing::get};
    use tower::ServiceExt;

    use super::*;

    async fn call(app: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let response = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_the_500_envelope_and_the_server_goes_on() {
        async fn boom() -> &'static str {
            panic!("a bug in a handler")
        }
        let app = Router::new()
            .route("/boom", get(boom))
            .route(
                "/fine",
                get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
            )
            .layer(ObserveLayer::new(1024));
        let (status, body) = call(&app, "/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["code"], "internal", "{body}");
        let (status, body) = call(&app, "/fine").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["ok"], true);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let app = Router::new()
            .route(
                "/echo",
                axum::routing::post(|body: String| async move { body }),
            )
            .layer(ObserveLayer::new(8));
        let response = app
            .oneshot(
                Request::post("/echo")
                    .body(Body::from("more than eight bytes"))
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
