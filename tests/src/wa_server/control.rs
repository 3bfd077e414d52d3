//! The server's control API: what a person does with the simulated phones, over HTTP, for
//! the processes that cannot call [`super::Phone`] in-process — the `wa-server` binary's
//! users, and through them `gatewayctl sim …` (a worker built for this server turns each
//! `sim` command of a session into one call here; see the worker's
//! `driver/whatsapp/phones.rs`).
//!
//! Every route names an account by its phone number (digits); a device is the number a
//! linked device has in the account (the `:12` of `6281234567890:12@s.whatsapp.net`).
//!
//! - `POST /phones/{number}/scan` `{"qr"}` → `{"jid"}`: the phone scans a device's QR code;
//! - `POST /phones/{number}/code` `{"code"}` → `{"jid"}`: the phone enters a pairing code;
//! - `POST /phones/{number}/devices/{device}/unlink`: the phone removes the linked device;
//! - `POST /phones/{number}/devices/{device}/replace`: the device connects again from
//!   elsewhere, replacing its stream;
//! - `POST /phones/{number}/devices/{device}/drop`: the network drops the device's stream;
//! - `POST /phones/{number}/messages` `{"to", "text"}` → `{"id"}`: the phone, as a contact,
//!   sends a text to another number;
//! - `POST /phones/{number}/read` `{"from"}`: the phone reads what `from` sent it;
//! - `PUT /phones/{number}/ban` `{"code", "seconds"}`, `DELETE /phones/{number}/ban`;
//! - `GET /phones/{number}`: its linked devices, and what it received, as a contact.
//!
//! Errors answer `{"error": "…"}` with 404 (no such device) or 422 (the phone cannot do it).

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Phone, Shared};

type Answer = Result<Json<Value>, Refused>;

struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn unprocessable(e: String) -> Refused {
    Refused(StatusCode::UNPROCESSABLE_ENTITY, e)
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/phones/{number}", get(phone))
        .route("/phones/{number}/scan", post(scan))
        .route("/phones/{number}/code", post(code))
        .route("/phones/{number}/devices/{device}/{action}", post(device))
        .route("/phones/{number}/messages", post(message))
        .route("/phones/{number}/read", post(read))
        .route("/phones/{number}/ban", put(ban).delete(lift_ban))
        .with_state(shared)
}

async fn phone(State(shared): State<Arc<Shared>>, Path(number): Path<String>) -> Json<Value> {
    let phone = Phone::of(shared, &number);
    let received: Vec<Value> = phone
        .received()
        .into_iter()
        .map(|r| json!({ "id": r.id, "from": r.from, "text": r.text, "atMs": r.at_ms }))
        .collect();
    let receipts: Vec<Value> = phone
        .receipts()
        .into_iter()
        .map(|r| json!({ "id": r.id, "from": r.from, "kind": r.kind }))
        .collect();
    let chat_states: Vec<Value> = phone
        .chat_states()
        .into_iter()
        .map(|(from, state, at_ms)| json!({ "from": from, "state": state, "atMs": at_ms }))
        .collect();
    Json(json!({
        "number": phone.number(),
        "lid": phone.lid(),
        "devices": phone.linked_devices(),
        "received": received,
        "receipts": receipts,
        "chatStates": chat_states,
    }))
}

#[derive(Deserialize)]
struct Qr {
    qr: String,
}

async fn scan(
    State(shared): State<Arc<Shared>>,
    Path(number): Path<String>,
    Json(body): Json<Qr>,
) -> Answer {
    let jid = Phone::of(shared, &number)
        .scan(&body.qr)
        .await
        .map_err(unprocessable)?;
    Ok(Json(json!({ "jid": jid })))
}

#[derive(Deserialize)]
struct Code {
    code: String,
}

async fn code(
    State(shared): State<Arc<Shared>>,
    Path(number): Path<String>,
    Json(body): Json<Code>,
) -> Answer {
    let jid = Phone::of(shared, &number)
        .enter_code(&body.code)
        .await
        .map_err(unprocessable)?;
    Ok(Json(json!({ "jid": jid })))
}

async fn device(
    State(shared): State<Arc<Shared>>,
    Path((number, device, action)): Path<(String, u16, String)>,
) -> Answer {
    let phone = Phone::of(shared, &number);
    let not_linked = || {
        Refused(
            StatusCode::NOT_FOUND,
            format!("{number} has no device {device} linked and connected"),
        )
    };
    match action.as_str() {
        "unlink" if phone.linked_devices().contains(&device) => phone.unlink(device),
        "replace" if phone.replace_stream(device) => {}
        "drop" if phone.drop_stream(device) => {}
        "unlink" | "replace" | "drop" => return Err(not_linked()),
        _ => {
            return Err(Refused(
                StatusCode::NOT_FOUND,
                format!("no action `{action}`: unlink, replace or drop"),
            ));
        }
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Text {
    to: String,
    text: String,
}

async fn message(
    State(shared): State<Arc<Shared>>,
    Path(number): Path<String>,
    Json(body): Json<Text>,
) -> Answer {
    let id = Phone::of(shared, &number)
        .send_text(&super::digits(&body.to), &body.text)
        .map_err(unprocessable)?;
    Ok(Json(json!({ "id": id })))
}

#[derive(Deserialize)]
struct Read {
    from: String,
}

async fn read(
    State(shared): State<Arc<Shared>>,
    Path(number): Path<String>,
    Json(body): Json<Read>,
) -> Json<Value> {
    Phone::of(shared, &number).read(&super::digits(&body.from));
    Json(json!({}))
}

#[derive(Deserialize)]
struct Ban {
    code: u32,
    seconds: u64,
}

async fn ban(
    State(shared): State<Arc<Shared>>,
    Path(number): Path<String>,
    Json(body): Json<Ban>,
) -> Json<Value> {
    Phone::of(shared, &number).ban(body.code, Duration::from_secs(body.seconds));
    Json(json!({}))
}

async fn lift_ban(State(shared): State<Arc<Shared>>, Path(number): Path<String>) -> Json<Value> {
    Phone::of(shared, &number).lift_ban();
    Json(json!({}))
}
