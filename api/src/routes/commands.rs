//! The session commands: `:start`, `:stop`, `:restart`, `:logout`, `:requestPairingCode` and
//! `GET /qr`. Each follows the command path of ARCHITECTURE.md: find the session's gateway
//! (org-scoped; an unknown session is 404), make sure a live worker serves it (else 503 at
//! once), publish, and wait for the reply until the deadline (else 504 with the command id).
//!
//! Where the architecture has the api insert a `pending` command row before publishing, the
//! command's row is written by whoever learns how it ended (see `shared::store::commands`):
//! the worker, in the statement that writes the session change, before it replies. The api
//! writes one only for a command no worker got (503) or whose caller gets 504, and then before
//! it answers, so a command id a caller sees always has its row. That write on every command
//! (its own round trip, its own commit) was a third of the api's share of a command's
//! latency, and half of Postgres's write load.
//!
//! The gateway comes from the session's row, cached for a few seconds
//! ([`Config::session_cache_ttl_ms`](crate::Config)) per session and organization. A session
//! never changes organization, but it changes gateway when it moves (drain, failover): a
//! worker that no longer owns it answers "moved", and the api drops the cached route,
//! re-reads the owner and sends the command there once; a cached owner that is not live is
//! re-read before the answer is 503. The worker checks the organization against the row it
//! holds, so a stale entry of a deleted session is answered 404.

use axum::{
    Json,
    extract::{FromRequest, Path, Request, State},
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use shared::{
    Error, Result,
    auth::{Capability, Principal},
    db::now_ms,
    protocol::{Command, CommandEnvelope, CommandOutput, Outcome},
    session::{self, Session},
    store::{
        self,
        commands::{CommandRecord, Done},
    },
};
use ulid::Ulid;
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    auth::{Caller, Manager},
    error::{ApiJson, ApiQuery, ApiResult},
    qr_image::{self, QrFormat},
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PairingCodeRequest {
    /// The number to pair, international form (`6281234567890`): 7 to 15 digits once `+`,
    /// spaces, dashes and parentheses are dropped.
    #[schema(example = "6281234567890")]
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

/// The command, addressed to the gateway of the caller's session; 404 when the organization
/// has no such session. A cached gateway that is not live any more is asked of Postgres
/// again: a failover may have moved the session, and a notice sent to a dead gateway's queue
/// reaches nobody (a message accepted then stayed queued on a working session).
async fn address(
    state: &AppState,
    caller: &Principal,
    session_id: &str,
    command: Command,
) -> Result<CommandEnvelope> {
    session::parse_session_id(session_id)?;
    let org = &caller.organization_id;
    let cached = state
        .session_gateways
        .get(session_id)
        .filter(|(owner, _)| owner == org)
        .map(|(_, gateway)| gateway);
    let gateway_id = match cached {
        Some(gateway) if state.fleet.is_live(&gateway).await => gateway,
        _ => {
            let client = state.db.get().await?;
            let gateway = store::sessions::gateway(&client, org, session_id)
                .await?
                .ok_or_else(Error::session_not_found)?;
            state
                .session_gateways
                .insert(session_id.to_owned(), (org.clone(), gateway.clone()));
            gateway
        }
    };
    Ok(envelope(state, caller, session_id, gateway_id, command))
}

fn envelope(
    state: &AppState,
    caller: &Principal,
    session_id: &str,
    gateway_id: String,
    command: Command,
) -> CommandEnvelope {
    CommandEnvelope {
        id: Ulid::new(),
        organization_id: caller.organization_id.clone(),
        session_id: session_id.to_owned(),
        gateway_id,
        requested_by: caller.subject.clone(),
        deadline_ms: now_ms() + state.cfg.command_timeout_ms as i64,
        command,
    }
}

/// Runs a command through the owning worker and returns what it answered. A session that
/// moved to another gateway since its route was cached (a drain, a failover) is followed
/// there once, invisibly to the caller.
pub async fn run(
    state: &AppState,
    caller: &Principal,
    session_id: &str,
    command: Command,
) -> Result<CommandOutput> {
    let kind = command.kind();
    let started = std::time::Instant::now();
    let mut env = address(state, caller, session_id, command).await?;
    let mut result = send(state, &mut env).await;
    if matches!(result, Ok(Outcome::Moved)) {
        metrics::counter!("api_command_redirects_total", "kind" => kind).increment(1);
        state.session_gateways.remove(session_id);
        result = match follow(state, &mut env).await {
            Ok(_) => send(state, &mut env).await,
            Err(e) => Err(e),
        };
    }
    if let Err(e) = &result {
        record_unanswered(state, &env, e).await;
    }
    let outcome = result.and_then(|o| match o {
        Outcome::Ok(output) => Ok(output),
        Outcome::Error(body) => Err(Error::from(body)),
        // Moved again within one request: it is between owners right now.
        Outcome::Moved => Err(Error::unavailable(
            "the session is moving between gateways; try again in a moment",
        )
        .with_detail("retryAfterSeconds", 1)),
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

/// Publishes to the session's gateway when a live worker serves it. When none does, the
/// cached route may be stale (the session moved): it is read again and followed; a session
/// still on a dead gateway answers 503 with how long until failover can move it.
async fn send(state: &AppState, env: &mut CommandEnvelope) -> Result<Outcome> {
    if !state.fleet.is_live(&env.gateway_id).await {
        let before = env.gateway_id.clone();
        let lease_left_ms = follow(state, env).await?;
        if env.gateway_id == before || !state.fleet.is_live(&env.gateway_id).await {
            return Err(dead_gateway(env, lease_left_ms));
        }
    }
    state.bus.call(env).await
}

/// Re-reads the session's owner and readdresses the command to it; answers how long the
/// owner's lease on the session still holds (ms).
async fn follow(state: &AppState, env: &mut CommandEnvelope) -> Result<i64> {
    let client = state.db.get().await?;
    let route = store::sessions::route(&client, &env.organization_id, &env.session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    state.session_gateways.insert(
        env.session_id.clone(),
        (env.organization_id.clone(), route.gateway_id.clone()),
    );
    env.gateway_id = route.gateway_id;
    Ok(route.lease_left_ms)
}

/// 503 for a session whose gateway has no live worker, with `Retry-After`: the lease's time
/// left (failover moves the session only after it) plus a moment for the move itself.
fn dead_gateway(env: &CommandEnvelope, lease_left_ms: i64) -> Error {
    let retry_after = (lease_left_ms + 999) / 1000 + 2;
    Error::unavailable(format!(
        "gateway {} has no live worker; its sessions move to a live gateway of its region \
         once their leases expire",
        env.gateway_id
    ))
    .with_detail("gatewayId", env.gateway_id.as_str())
    .with_detail("retryAfterSeconds", retry_after)
}

/// Sends a notice without waiting for its reply; the worker records it when it runs it.
/// Addressed to `gateway_id`, the owner the caller just read from Postgres, not to the
/// cache's: nobody hears a "moved" answer to a notice, so one sent to a gateway the session
/// just left would announce nothing (a message accepted after a failover stayed queued).
pub async fn notify(
    state: &AppState,
    caller: &Principal,
    session_id: &str,
    gateway_id: &str,
    command: Command,
) -> Result<()> {
    state.session_gateways.insert(
        session_id.to_owned(),
        (caller.organization_id.clone(), gateway_id.to_owned()),
    );
    let env = envelope(state, caller, session_id, gateway_id.to_owned(), command);
    let sent = state.bus.notify(&env).await;
    if let Err(e) = &sent {
        record_unanswered(state, &env, e).await;
    }
    sent
}

/// The row of a command the api answers without the worker's reply. An error that names the
/// command (504, or a broker lost before it confirmed) leaves it `pending`: it may still run,
/// and the worker or the dead-letter consumer ends it. Any other error means no worker can get
/// it: `failed`. A row that already ended is left as it is.
async fn record_unanswered(state: &AppState, env: &CommandEnvelope, error: &Error) {
    let written = async {
        let client = state.db.get().await?;
        if error.body.details.contains_key("commandId") {
            return store::commands::record_pending(&client, env).await;
        }
        let outcome = Outcome::Error(error.body.clone());
        let value = serde_json::to_value(&outcome).map_err(Error::internal)?;
        let done = Done {
            env,
            error: Some(&error.body),
            outcome: &value,
        };
        store::commands::record_end(&client, &done, now_ms()).await
    }
    .await;
    if let Err(e) = written {
        tracing::warn!(command_id = %env.id, error = %e, "could not record an unanswered command");
    }
}

/// `GET /commands/{command}`: how a command ended, for a caller that got 504 (or 503 with a
/// `commandId`), and the audit trail.
#[utoipa::path(get, path = "/api/v1/commands/{command}", tag = "commands",
    params(("command" = String, Path, description = "The command id (ULID), as given in an error's `details.commandId`")),
    responses((status = 200, body = CommandRecord), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CommandRecord>> {
    caller.require(Capability::Read)?;
    let not_found = || Error::not_found("command not found");
    Ulid::from_string(&id).map_err(|_| not_found())?;
    let client = state.db.get().await?;
    store::commands::get(&client, &caller.organization_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found().into())
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
) -> ApiResult<Response> {
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

/// `?format=` of `GET /qr`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct QrQuery {
    /// The form of the answer: `json` (the default), `png` or `svg`. Without it, the
    /// `Accept` header chooses (`image/png`, `image/svg+xml`, else JSON).
    #[param(inline)]
    pub format: Option<QrFormat>,
}

/// The current QR code. When none is ready this starts pairing and answers 404 until one
/// exists; a paired session answers 409. As JSON (the raw string, to render yourself) or, by
/// `?format=png|svg` or `Accept: image/png|image/svg+xml`, as an image to scan; errors are
/// JSON whatever was asked.
#[utoipa::path(get, path = "/api/v1/sessions/{session}/qr", tag = "commands",
    params(("session" = String, Path, description = "The session id"), QrQuery),
    responses(
        (status = 200, description = "The code: JSON, a PNG or an SVG document", content(
            (QrCode = "application/json"),
            ("image/png"),
            (String = "image/svg+xml"))),
        (status = 400, description = "An unknown `format`", body = shared::error::ErrorEnvelope),
        (status = 404, body = shared::error::ErrorEnvelope),
        (status = 409, body = shared::error::ErrorEnvelope), (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn qr(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<QrQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let format = query.format.unwrap_or_else(|| {
        QrFormat::from_accept(
            headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
        )
    });
    let CommandOutput::Qr { qr, expires_at } = run(&state, &caller, &id, Command::Qr).await? else {
        return Err(Error::internal("unexpected reply").into());
    };
    Ok(match format {
        QrFormat::Json => {
            let mut response = Json(QrCode { qr, expires_at }).into_response();
            qr_image::no_store(&mut response);
            response
        }
        QrFormat::Png => qr_image::response(format, qr_image::png(&qr)?),
        QrFormat::Svg => qr_image::response(format, qr_image::svg(&qr)?),
    })
}

/// `?pageSize=` of a session's recent commands.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecentQuery {
    /// How many, newest first: 1 to 100 (default 20).
    pub page_size: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandList {
    /// Newest first.
    pub commands: Vec<CommandRecord>,
}

/// `GET /sessions/{session}/commands`: what was asked of the session lately, by whom, and how
/// it ended (the console's audit view).
#[utoipa::path(get, path = "/api/v1/sessions/{session}/commands", tag = "commands",
    params(("session" = String, Path, description = "The session id"), RecentQuery),
    responses((status = 200, body = CommandList), (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn recent(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<RecentQuery>,
) -> ApiResult<Json<CommandList>> {
    caller.require(Capability::Read)?;
    session::parse_session_id(&id)?;
    let limit = query.page_size.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(Error::invalid_field("pageSize", "pageSize must be between 1 and 100").into());
    }
    let org = &caller.organization_id;
    let client = state.db.get().await?;
    store::sessions::get(&client, org, &id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    let commands = store::commands::recent(&client, org, &id, limit).await?;
    Ok(Json(CommandList { commands }))
}
