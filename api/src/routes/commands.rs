//! The session commands: `:start`, `:stop`, `:restart`, `:logout`, `:requestPairingCode` and
//! `GET /qr`. Each follows the command path of ARCHITECTURE.md: record the command (org-scoped;
//! an unknown session is 404), make sure a live worker serves the session's gateway (else 503
//! at once), publish, and wait for the reply until the deadline (else 504 with the command id).
//!
//! The pending row is committed asynchronously (`synchronous_commit = off`): waiting for its
//! WAL flush doubled the flushes per command, and Postgres's WAL flush was what limited
//! command throughput. Nothing depends on that row surviving a database crash: the worker
//! writes the command's outcome as an upsert, synchronously, before it replies, so every
//! answered command has a durable record. Only a command that a database crash catches
//! before any worker ran it can vanish from the audit log, and then it never ran.
//!
//! The insert stays *before* the publish (it is also the organization-scoped lookup of the
//! session's gateway): run beside it, it raced the worker's upsert of the same row, and two
//! group-commit batches taking those row locks in opposite orders deadlocked.

use axum::{
    Json,
    extract::{FromRequest, Path, Request, State},
};
use serde::{Deserialize, Serialize};
use shared::{
    Error, Result,
    auth::Principal,
    db::now_ms,
    protocol::{Command, CommandEnvelope, CommandOutput, Outcome},
    session::{self, Session},
    store::{self, commands::NewCommand},
};
use ulid::Ulid;
use utoipa::ToSchema;

use crate::{
    AppState,
    auth::Manager,
    error::{ApiJson, ApiResult},
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PairingCodeRequest {
    /// The number to pair, international form (`6281234567890`).
    pub phone_number: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PairingCode {
    /// Eight characters, `XXXX-XXXX`: type it on the phone under Linked devices.
    #[schema(example = "ABCD-EFGH")]
    pub code: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QrCode {
    /// The raw QR string; render it as a QR code.
    pub qr: String,
    /// Epoch ms when this code stops working (codes rotate).
    pub expires_at: i64,
}

/// Records the command for the caller's session and returns it ready to publish; 404 when the
/// organization has no such session.
pub async fn record_command(
    state: &AppState,
    caller: &Principal,
    session_id: &str,
    command: Command,
) -> Result<CommandEnvelope> {
    session::parse_session_id(session_id)?;
    let id = Ulid::new();
    let now = now_ms();
    let deadline = now + state.cfg.command_timeout_ms as i64;
    let payload = serde_json::to_value(&command).map_err(Error::internal)?;
    let new = NewCommand {
        id: &id.to_string(),
        organization_id: &caller.organization_id,
        session_id,
        kind: command.kind(),
        payload: &payload,
        requested_by: &caller.subject,
        now,
        deadline,
    };
    let gateway_id: String = state
        .command_writer
        .query_opt(
            store::commands::INSERT_FOR_SESSION.into(),
            store::commands::insert_params(&new),
        )
        .await?
        .ok_or_else(Error::session_not_found)?
        .get(0);
    Ok(CommandEnvelope {
        id,
        organization_id: caller.organization_id.clone(),
        session_id: session_id.to_owned(),
        gateway_id,
        requested_by: caller.subject.clone(),
        deadline_ms: deadline,
        command,
    })
}

/// Runs a command through the owning worker and returns what it answered.
pub async fn run(
    state: &AppState,
    caller: &Principal,
    session_id: &str,
    command: Command,
) -> Result<CommandOutput> {
    let kind = command.kind();
    let started = std::time::Instant::now();
    let env = record_command(state, caller, session_id, command).await?;
    let result = match state.fleet.require_live(&env.gateway_id).await {
        Ok(()) => state.bus.call(&env).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result
        && e.code() == shared::ErrorCode::GatewayUnavailable
    {
        // Never reached a worker: the audit log says so.
        if let Ok(client) = state.commands_db.get().await {
            let _ = store::commands::end_pending(
                &client,
                &env.id.to_string(),
                "failed",
                e.code().as_str(),
                &e.body.message,
                now_ms(),
            )
            .await;
        }
    }
    let outcome = result.and_then(|o| match o {
        Outcome::Ok(output) => Ok(output),
        Outcome::Error(body) => Err(Error::from(body)),
    });
    let label = match &outcome {
        Ok(_) => "ok",
        Err(e) => e.code().as_str(),
    };
    metrics::counter!("api_commands_total", "kind" => kind, "outcome" => label).increment(1);
    metrics::histogram!("api_command_duration_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    outcome
}

async fn run_for_session(
    state: &AppState,
    caller: &Principal,
    id: &str,
    command: Command,
) -> ApiResult<Json<Session>> {
    match run(state, caller, id, command).await? {
        CommandOutput::Session(s) => Ok(Json(*s)),
        _ => Err(Error::internal("unexpected reply").into()),
    }
}

/// `POST /sessions/{session}:{action}`: the path segment carries both, so one route serves
/// every action and each action has its own handler below.
pub async fn action(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(segment): Path<String>,
    request: Request,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let Some((id, action)) = segment.split_once(':') else {
        return Err(Error::not_found("no such route").into());
    };
    let id = id.to_owned();
    Ok(match action {
        "start" => start(State(state), Manager(caller), Path(id))
            .await
            .into_response(),
        "stop" => stop(State(state), Manager(caller), Path(id))
            .await
            .into_response(),
        "restart" => restart(State(state), Manager(caller), Path(id))
            .await
            .into_response(),
        "logout" => logout(State(state), Manager(caller), Path(id))
            .await
            .into_response(),
        "requestPairingCode" => {
            let body = ApiJson::<PairingCodeRequest>::from_request(request, &state).await?;
            request_pairing_code(State(state), Manager(caller), Path(id), body)
                .await
                .into_response()
        }
        _ => return Err(Error::not_found(format!("unknown session action '{action}'")).into()),
    })
}

#[utoipa::path(post, path = "/api/v1/sessions/{session}:start", tag = "commands",
    params(("session" = String, Path, description = "The session id")),
    responses((status = 200, body = Session), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn start(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Json<Session>> {
    run_for_session(&state, &caller, &id, Command::Start).await
}

#[utoipa::path(post, path = "/api/v1/sessions/{session}:stop", tag = "commands",
    params(("session" = String, Path, description = "The session id")),
    responses((status = 200, body = Session), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn stop(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Json<Session>> {
    run_for_session(&state, &caller, &id, Command::Stop).await
}

/// Async: answers as soon as the worker accepted the restart, with the refreshed row; the
/// reconnect goes on in the background (watch `session.status` events).
#[utoipa::path(post, path = "/api/v1/sessions/{session}:restart", tag = "commands",
    params(("session" = String, Path, description = "The session id")),
    responses((status = 200, body = Session), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn restart(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Json<Session>> {
    run_for_session(&state, &caller, &id, Command::Restart).await
}

/// Unlinks the device. Idempotent: logging out a logged-out session is a harmless no-op.
#[utoipa::path(post, path = "/api/v1/sessions/{session}:logout", tag = "commands",
    params(("session" = String, Path, description = "The session id")),
    responses((status = 200, body = Session), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn logout(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Json<Session>> {
    run_for_session(&state, &caller, &id, Command::Logout).await
}

#[utoipa::path(post, path = "/api/v1/sessions/{session}:requestPairingCode", tag = "commands",
    params(("session" = String, Path, description = "The session id")),
    request_body = PairingCodeRequest,
    responses((status = 200, body = PairingCode), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn request_pairing_code(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PairingCodeRequest>,
) -> ApiResult<Json<PairingCode>> {
    let phone_number = session::normalize_phone_number(&body.phone_number)?;
    match run(
        &state,
        &caller,
        &id,
        Command::RequestPairingCode { phone_number },
    )
    .await?
    {
        CommandOutput::PairingCode { code } => Ok(Json(PairingCode { code })),
        _ => Err(Error::internal("unexpected reply").into()),
    }
}

/// The current QR code. When none is ready this starts pairing and answers 404 until one
/// exists; a paired session answers 409.
#[utoipa::path(get, path = "/api/v1/sessions/{session}/qr", tag = "commands",
    params(("session" = String, Path, description = "The session id")),
    responses((status = 200, body = QrCode), (status = 404, body = shared::error::ErrorEnvelope),
        (status = 409, body = shared::error::ErrorEnvelope), (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn qr(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
) -> ApiResult<Json<QrCode>> {
    match run(&state, &caller, &id, Command::Qr).await? {
        CommandOutput::Qr { qr, expires_at } => Ok(Json(QrCode { qr, expires_at })),
        _ => Err(Error::internal("unexpected reply").into()),
    }
}
