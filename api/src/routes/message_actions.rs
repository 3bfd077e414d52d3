//! `PATCH /sessions/{session}/messages/{message}` (edit) and
//! `POST /sessions/{session}/messages/{message}:revoke` (delete for everyone): actions on a
//! message the session sent. Each is queued as a message of its own (`type: edit|revoke`)
//! through the same queue as sending (`messages::queue`), so it goes out after the message it
//! changes, within the session's rates, at most once; the worker applies it to the message once
//! WhatsApp took it.

use axum::{
    extract::{Path, State},
    response::Response,
};
use serde::Deserialize;
use shared::{
    Error,
    db::now_ms,
    message::{self, Message, MessageStatus},
    session,
    store::{self, messages::NewMessage},
};
use ulid::Ulid;
use utoipa::ToSchema;

use super::messages::queue;
use crate::{
    AppState,
    auth::Manager,
    error::{ApiJson, ApiResult},
};

/// Body of `PATCH /sessions/{session}/messages/{message}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EditMessage {
    /// The new text, 1–4096 characters.
    #[schema(min_length = 1, max_length = 4096)]
    pub text: String,
}

/// Edits a text message the session sent, within WhatsApp's 15 minutes: the edit is queued
/// behind the session's other messages (a message of type `edit`) and, once WhatsApp took it,
/// the message shows the new text and `editedAt`.
#[utoipa::path(patch, path = "/api/v1/sessions/{session}/messages/{message}", tag = "messages",
    params(("session" = String, Path, description = "The session id (ULID)"),
        ("message" = String, Path, description = "The id of the message to edit (ULID)")),
    request_body = EditMessage,
    responses(
        (status = 202, description = "The edit, queued (a message of type `edit`)", body = Message,
            headers(("Location" = String, description = "Where to read the edit"))),
        (status = 409, description = "The message cannot be edited (not a text the session \
            sent, deleted, failed, or sent more than 15 minutes ago)",
            body = shared::error::ErrorEnvelope),
        (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn edit(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path((session_id, message_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<EditMessage>,
) -> ApiResult<Response> {
    let edit = message::Content::Edit {
        edit: message::Edit {
            message_id,
            text: body.text,
        },
    };
    act(&state, &caller, &session_id, edit).await
}

/// `POST /sessions/{session}/messages/{message}:action`.
pub async fn action(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path((session_id, segment)): Path<(String, String)>,
) -> ApiResult<Response> {
    match segment.split_once(':') {
        Some((id, "revoke")) => {
            revoke(
                State(state),
                Manager(caller),
                Path((session_id, id.to_owned())),
            )
            .await
        }
        _ => Err(Error::not_found("no such route").into()),
    }
}

/// Deletes a message the session sent for everyone, within WhatsApp's 60 hours: the revoke
/// is queued behind the session's other messages (a message of type `revoke`) and, once
/// WhatsApp took it, the message shows `revokedAt`.
#[utoipa::path(post, path = "/api/v1/sessions/{session}/messages/{message}:revoke", tag = "messages",
    params(("session" = String, Path, description = "The session id (ULID)"),
        ("message" = String, Path, description = "The id of the message to delete (ULID)")),
    responses(
        (status = 202, description = "The revoke, queued (a message of type `revoke`)", body = Message,
            headers(("Location" = String, description = "Where to read the revoke"))),
        (status = 409, description = "The message cannot be deleted (not one the session sent, \
            already deleted, failed, or sent more than 60 hours ago)",
            body = shared::error::ErrorEnvelope),
        (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn revoke(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path((session_id, message_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let revoke = message::Content::Revoke {
        revoke: message::Revoke { message_id },
    };
    act(&state, &caller, &session_id, revoke).await
}

/// Queues an edit or a revoke of one of the session's messages, after checking that the
/// message is one the session sent and may still take it.
async fn act(
    state: &AppState,
    caller: &shared::auth::Principal,
    session_id: &str,
    action: message::Content,
) -> ApiResult<Response> {
    let target_id = action.refers_to().unwrap_or_default().to_owned();
    let not_found = || Error::not_found("message not found");
    session::parse_session_id(session_id).map_err(|_| Error::session_not_found())?;
    Ulid::from_string(&target_id).map_err(|_| not_found())?;
    action.validate()?;
    let client = state.db.get().await?;
    let session = store::sessions::get(&client, &caller.organization_id, session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    let target = store::messages::get(&client, &caller.organization_id, session_id, &target_id)
        .await?
        .ok_or_else(not_found)?;
    let refuse = |why: String| Error::conflict(format!("message {target_id}: {why}"));
    if target.direction != message::Direction::Out {
        return Err(refuse("only its sender can edit or delete a message received".into()).into());
    }
    if target.revoked_at.is_some() {
        return Err(refuse("it was deleted for everyone".into()).into());
    }
    if target.status == MessageStatus::Failed {
        return Err(refuse("it was never sent".into()).into());
    }
    target
        .content
        .check_action(&action, target.sent_at, now_ms())
        .map_err(refuse)?;
    let new = NewMessage {
        id: &message::new_id(),
        organization_id: &caller.organization_id,
        session_id,
        to: &target.to,
        content: &action,
        reply_to: None,
        idempotency_key: None,
        now: now_ms(),
    };
    queue(state, caller, client, &session, &new).await
}
