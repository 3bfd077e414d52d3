//! The session commands' routes: `:start`, `:stop`, `:restart`, `:logout`,
//! `:requestPairingCode`, `GET /qr`, and the command log. Each runs its command through the
//! command client (`api/src/command_client.rs`), which follows the command path of ARCHITECTURE.md.

use axum::{
    Json,
    extract::{FromRequest, Path, Request, State},
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use shared::{
    Error,
    auth::{Capability, Principal},
    protocol::{Command, CommandOutput},
    session::{self, Session},
    store::{self, commands::CommandRecord},
};
use ulid::Ulid;
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    auth::{Caller, Manager},
    command_client::run,
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
