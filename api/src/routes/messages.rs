//! `POST/GET /sessions/{session}/messages`, `GET /sessions/{session}/messages/{message}`.
//!
//! Sending is asynchronous. The api validates a message, queues it in Postgres (the
//! `messages` table is each session's queue) and answers 202; the session's worker sends it
//! within the session's rate limits and moves it through `sending`, `sent`, `delivered`, `read`
//! (or `failed`), announcing each step as a `message.status` event. When the session's gateway
//! is live and the message found its session's queue empty, its worker gets a `send_messages`
//! notice (behind a queued message it needs none: the worker goes through the queue until it
//! is empty); that is only a nudge, so a notice that cannot be sent is logged and the request
//! still succeeds: Postgres is the truth, and a worker reads the queue whenever it (re)starts
//! the session. Messages the session received are
//! resources too (`direction: in`), stored by its worker; they are read here, never sent.
//!
//! Back-pressure: a session whose queue already holds an hour of sending (`ratePerHour`)
//! refuses more with 429 and `Retry-After`, rather than accept messages that would go out hours
//! late. The insert counts the queue in its own statement, but concurrent requests each count
//! before the others commit, so they can overshoot the bound by their number: it bounds the
//! queue, it is not a quota. With an `idempotencyKey` a
//! retry is safe: it is answered the message first accepted under the key (202), and never
//! counts against the queue.

use axum::{
    Json,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::{
    Error, ErrorCode,
    auth::Capability,
    db::now_ms,
    message::{self, Message, MessageStatus},
    protocol::Command,
    session,
    store::{
        self,
        messages::{NewMessage, Queued},
    },
};
use ulid::Ulid;
use utoipa::{
    IntoParams, ToSchema,
    openapi::{
        Ref, RefOr,
        schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type},
    },
};

use super::pagination::Page;
use crate::{
    AppState,
    auth::{Caller, Manager},
    error::{ApiJson, ApiQuery, ApiResult},
    media_in,
};

/// Body of `POST /sessions/{session}/messages`: the recipient, the content (a `type`, `text`
/// when absent, and the field of the same name: `{"to", "text"}` is a text as it always
/// was), the message it quotes and an idempotency key. Unknown fields are refused (400), and
/// so is the field of another type than `type`. Its schema is written by hand below: a
/// `oneOf` by type, in which only a text may leave out `type`.
#[derive(Debug)]
pub struct SendMessage {
    /// A phone number with its country code (`+62 812-3456-7890`) or a WhatsApp JID
    /// (`6281234567890@s.whatsapp.net`, a group's `…@g.us`).
    pub to: String,
    pub content: message::Content,
    /// Our id of a message of the session (sent or received) that this one quotes.
    pub reply_to: Option<String>,
    /// 1–128 printable characters. A retry with a key already used for this session answers
    /// the message first accepted under it instead of sending again.
    pub idempotency_key: Option<String>,
}

impl<'de> Deserialize<'de> for SendMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Envelope {
            to: String,
            reply_to: Option<String>,
            idempotency_key: Option<String>,
        }
        let mut body = serde_json::Map::<String, Value>::deserialize(d)?;
        let envelope: serde_json::Map<String, Value> = ["to", "replyTo", "idempotencyKey"]
            .into_iter()
            .filter_map(|k| Some((k.to_owned(), body.remove(k)?)))
            .collect();
        let envelope = Envelope::deserialize(Value::Object(envelope)).map_err(D::Error::custom)?;
        let kind = match body.entry("type").or_insert_with(|| "text".into()) {
            Value::String(kind) => kind.clone(),
            _ => return Err(D::Error::custom("`type` must be a string")),
        };
        if let Some(other) = body.keys().find(|k| *k != "type" && **k != kind) {
            return Err(D::Error::custom(format!(
                "unknown field `{other}`: a message of type `{kind}` has its content in `{kind}`"
            )));
        }
        let content =
            message::Content::deserialize(Value::Object(body)).map_err(D::Error::custom)?;
        Ok(SendMessage {
            to: envelope.to,
            content,
            reply_to: envelope.reply_to,
            idempotency_key: envelope.idempotency_key,
        })
    }
}

impl utoipa::PartialSchema for SendMessage {
    fn schema() -> RefOr<Schema> {
        // `null` is as good as absent for the optional fields, as serde reads them.
        let nullable_string = || SchemaType::from_iter([Type::String, Type::Null]);
        let string = |min: usize, max: usize| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(min))
                .max_length(Some(max))
        };
        let of_type = |kind: &str, content: RefOr<Schema>| {
            let object = ObjectBuilder::new()
                .property(
                    "to",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some("A phone number with its country code or a JID"))
                        .examples(["+6281234567890"]),
                )
                .property(
                    "type",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some([kind])),
                )
                .property(kind, content)
                .property(
                    "replyTo",
                    ObjectBuilder::new()
                        .schema_type(nullable_string())
                        .description(Some("Our id of the message this one quotes")),
                )
                .property(
                    "idempotencyKey",
                    string(1, message::IDEMPOTENCY_KEY_MAX_CHARS)
                        .schema_type(nullable_string())
                        .description(Some(
                            "A retry with a key already used for this session answers the \
                             message first accepted under it",
                        )),
                )
                .required("to")
                .required(kind)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)));
            // Only a text may leave its type out.
            let object = if kind == "text" {
                object
            } else {
                object.required("type")
            };
            Schema::Object(object.build())
        };
        let schema_ref = |name: &str| RefOr::Ref(Ref::from_schema_name(name));
        OneOfBuilder::new()
            .item(of_type("text", string(1, message::TEXT_MAX_CHARS).into()))
            .item(of_type("location", schema_ref("Location")))
            .item(of_type("contact", schema_ref("ContactCard")))
            .item(of_type("reaction", schema_ref("Reaction")))
            .item(of_type("poll", schema_ref("Poll")))
            .item(of_type("image", schema_ref("MediaContent")))
            .item(of_type("video", schema_ref("MediaContent")))
            .item(of_type("audio", schema_ref("MediaContent")))
            .item(of_type("voice", schema_ref("MediaContent")))
            .item(of_type("document", schema_ref("MediaContent")))
            .item(of_type("sticker", schema_ref("MediaContent")))
            .into()
    }
}

impl ToSchema for SendMessage {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        use utoipa::PartialSchema as _;
        schemas.push(("Location".into(), message::Location::schema()));
        schemas.push(("ContactCard".into(), message::ContactCard::schema()));
        schemas.push(("Reaction".into(), message::Reaction::schema()));
        schemas.push(("Poll".into(), message::Poll::schema()));
        schemas.push(("MediaContent".into(), message::MediaContent::schema()));
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1–100, default 50.
    pub page_size: Option<i64>,
    /// `nextPageToken` of the previous page.
    pub page_token: Option<String>,
    /// Only messages in this status (`queued`, `sending`, `sent`, `delivered`, `read`,
    /// `failed`; `received` for those that reached the session).
    pub status: Option<String>,
    /// `out` (the default): the messages the session sends; `in`: those it received.
    pub direction: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    /// Oldest first.
    pub messages: Vec<Message>,
    /// Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Queues a message (a text, a location, a contact card, a reaction, a poll, a file); the session's worker
/// sends it within the session's rate limits.
#[utoipa::path(post, path = "/api/v1/sessions/{session}/messages", tag = "messages",
    params(("session" = String, Path, description = "The session id (ULID)")),
    request_body = SendMessage,
    responses(
        (status = 202, description = "Queued (or, for a known idempotency key, the first message)",
            body = Message,
            headers(("Location" = String, description = "Where to read the message"))),
        (status = 429, description = "The session's queue already holds an hour of sending",
            body = shared::error::ErrorEnvelope,
            headers(("Retry-After" = u64, description = "Seconds until the queue has room"))),
        (status = "4XX", body = shared::error::ErrorEnvelope),
        (status = "5XX", body = shared::error::ErrorEnvelope)))]
pub async fn send(
    State(state): State<AppState>,
    Manager(caller): Manager,
    Path(session_id): Path<String>,
    ApiJson(body): ApiJson<SendMessage>,
) -> ApiResult<Response> {
    session::parse_session_id(&session_id)?;
    let to = message::normalize_recipient(&body.to)?;
    if body.content.is_action() {
        return Err(Error::invalid_field(
            "type",
            "a message is edited with PATCH /api/v1/sessions/{session}/messages/{message} and \
             deleted for everyone with POST …/messages/{message}:revoke",
        )
        .into());
    }
    if matches!(body.content, message::Content::PollVote { .. }) {
        return Err(Error::invalid_field(
            "type",
            "a poll_vote is what a contact sends on a poll: it is received, not sent",
        )
        .into());
    }
    body.content.validate()?;
    if let Some(id) = &body.reply_to {
        Ulid::from_string(id).map_err(|_| {
            Error::invalid_field(
                "replyTo",
                "replyTo must be the id of a message of this session",
            )
        })?;
    }
    let key = body.idempotency_key.as_deref();
    if let Some(key) = key {
        message::validate_idempotency_key(key)?;
    }
    let mut client = state.db.get().await?;
    let session = store::sessions::get(&client, &caller.organization_id, &session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    check_references(&client, &session_id, &to, &body).await?;
    if let Some(key) = key {
        let first = store::messages::by_idempotency_key(&client, &session_id, key).await?;
        if let Some(first) = first {
            return Ok(accepted(first));
        }
    }
    let mut content = body.content.clone();
    attach_media(&state, &mut client, &caller.organization_id, &mut content).await?;
    let new = NewMessage {
        id: &message::new_id(),
        organization_id: &caller.organization_id,
        session_id: &session_id,
        to: &to,
        content: &content,
        reply_to: body.reply_to.as_deref(),
        idempotency_key: key,
        now: now_ms(),
    };
    queue(&state, &caller, client, &session, &new).await
}

/// Queues a message (or an edit, or a revoke) of the session behind the others, unless
/// its queue already holds an hour of sending, and nudges the session's worker: 202 with
/// the message.
pub(super) async fn queue(
    state: &AppState,
    caller: &shared::auth::Principal,
    client: deadpool_postgres::Object,
    session: &session::Session,
    new: &NewMessage<'_>,
) -> ApiResult<Response> {
    let message = match store::messages::insert(&client, new, session.rate_per_hour.into()).await? {
        Queued::New(message) => message,
        // A concurrent request with the same key got there first; answer its message.
        Queued::Earlier(message) => return Ok(accepted(message)),
        Queued::Full => {
            let backlog = store::messages::backlog(&client, new.session_id).await?;
            return Err(queue_full(backlog, session.rate_per_hour).into());
        }
    };
    // The worker sends a session's queue in order until it is empty (or the session stops,
    // and then reads it again when it starts). So a message that, once committed, is behind
    // one still queued will be sent without a word: only one that found the queue empty
    // needs its worker told. Asked after the commit, never before: a worker that emptied
    // the queue in between would not have seen this one. If the question fails, the worker
    // is told.
    let behind = store::messages::queued_before(&client, new.session_id, new.id).await;
    drop(client);
    if matches!(behind, Ok(true)) {
        metrics::counter!("api_message_notices_spared_total").increment(1);
        return Ok(accepted(message));
    }
    if state.fleet.is_live(&session.gateway_id).await {
        let sent = crate::command_client::notify(
            state,
            caller,
            new.session_id,
            &session.gateway_id,
            Command::SendMessages,
        );
        if let Err(e) = sent.await {
            // The worker sends it anyway, when it next starts the session.
            tracing::warn!(error = %e, session_id = %new.session_id,
                "could not tell the worker about a queued message");
        }
    }
    Ok(accepted(message))
}

/// The messages a new one refers to are the session's: the one it quotes, and the one a
/// reaction is on, in the chat the reaction goes to.
async fn check_references(
    client: &impl deadpool_postgres::GenericClient,
    session_id: &str,
    to: &str,
    body: &SendMessage,
) -> shared::Result<()> {
    if let Some(id) = &body.reply_to
        && store::messages::peer(client, session_id, id)
            .await?
            .is_none()
    {
        return Err(Error::invalid_field(
            "replyTo",
            format!("the session has no message {id} to quote"),
        ));
    }
    if let Some(id) = body.content.refers_to() {
        match store::messages::peer(client, session_id, id).await? {
            None => Err(Error::invalid_field(
                "reaction.messageId",
                format!("the session has no message {id} to react to"),
            )),
            Some(peer) if peer != to => Err(Error::invalid_field(
                "reaction.messageId",
                format!("message {id} is in the chat with {peer}, not {to}"),
            )),
            Some(_) => Ok(()),
        }?;
    }
    Ok(())
}

/// The file a message carries is one the organization uploaded and still has, or the one its
/// `url` answers (fetched now, stored as the organization's), of a type and size its kind of
/// message takes; its id, type, size and SHA-256 go into the content.
async fn attach_media(
    state: &AppState,
    client: &mut deadpool_postgres::Object,
    org: &str,
    content: &mut message::Content,
) -> shared::Result<()> {
    let Some((kind, m)) = content.media() else {
        return Ok(());
    };
    if let Some(url) = m.url.clone() {
        let field = format!("{}.url", kind.as_str());
        let too_large = || kind.too_large(&field, None);
        let file = state
            .media_fetcher
            .fetch(
                client,
                org,
                state.cfg.media.retention_ms(),
                &field,
                &url,
                media_in::Limits {
                    max_bytes: kind.max_bytes(),
                    too_large: &too_large,
                    accepts: &|mime_type, size| kind.accepts(&field, mime_type, size),
                },
            )
            .await?;
        if let Some(m) = content.media_mut() {
            m.url = None;
            m.media_id = file.id;
            m.mime_type = Some(file.mime_type);
            m.size = Some(file.size);
            m.sha256 = Some(file.sha256);
        }
        return Ok(());
    }
    let field = format!("{}.mediaId", kind.as_str());
    let (file, _) = store::media::get(&*client, org, &m.media_id, now_ms())
        .await?
        .ok_or_else(|| {
            Error::invalid_field(
                &field,
                format!(
                    "no file {} was uploaded by this organization (or it expired): upload \
                     it with POST /api/v1/media",
                    m.media_id
                ),
            )
        })?;
    kind.accepts(&field, &file.mime_type, file.size as u64)?;
    if let Some(m) = content.media_mut() {
        m.mime_type = Some(file.mime_type);
        m.size = Some(file.size);
        m.sha256 = Some(file.sha256);
    }
    Ok(())
}

/// 202 with the message and where to read it.
fn accepted(message: Message) -> Response {
    let location = format!(
        "/api/v1/sessions/{}/messages/{}",
        message.session_id, message.id
    );
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(message),
    )
        .into_response()
}

/// 429 for a session whose queue holds an hour of sending. `Retry-After` (from
/// `retryAfterSeconds`) is when, at `ratePerHour`, enough of the queue will have gone for one
/// more message to fit.
fn queue_full(backlog: i64, rate_per_hour: i32) -> Error {
    let rate = i64::from(rate_per_hour.max(1));
    let excess = backlog - rate + 1;
    let retry_after = ((3_600 * excess + rate - 1) / rate).max(1);
    Error::new(
        ErrorCode::RateLimited,
        format!(
            "the session already has {backlog} messages queued, an hour of sending at its \
             ratePerHour of {rate}; try again later"
        ),
    )
    .with_detail("backlog", backlog)
    .with_detail("ratePerHour", rate)
    .with_detail("retryAfterSeconds", retry_after)
}

/// The session's messages, oldest first: those it sends, or (`direction=in`) those it
/// received.
#[utoipa::path(get, path = "/api/v1/sessions/{session}/messages", tag = "messages",
    params(("session" = String, Path, description = "The session id (ULID)"), ListQuery),
    responses((status = 200, body = MessagePage), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(session_id): Path<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<MessagePage>> {
    caller.require(Capability::Read)?;
    session::parse_session_id(&session_id)?;
    let page = Page::parse(q.page_size, q.page_token.as_deref())?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            MessageStatus::parse(s)
                .ok_or_else(|| Error::invalid_field("status", format!("unknown status '{s}'")))
        })
        .transpose()?;
    let direction = match q.direction.as_deref() {
        None => message::Direction::Out,
        Some(d) => message::Direction::parse(d).ok_or_else(|| {
            Error::invalid_field(
                "direction",
                format!("direction must be out or in, not '{d}'"),
            )
        })?,
    };
    let client = state.db.get().await?;
    // Another organization's session is not found, rather than an empty list.
    store::sessions::gateway(&client, &caller.organization_id, &session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    let mut messages = store::messages::list(
        &client,
        &caller.organization_id,
        &session_id,
        &store::messages::ListFilter {
            direction,
            status,
            after_id: page.after.as_deref(),
            limit: page.limit(),
        },
    )
    .await?;
    let next_page_token = page.finish(&mut messages, |m| &m.id);
    Ok(Json(MessagePage {
        messages,
        next_page_token,
    }))
}

#[utoipa::path(get, path = "/api/v1/sessions/{session}/messages/{message}", tag = "messages",
    params(("session" = String, Path, description = "The session id (ULID)"),
        ("message" = String, Path, description = "The message id (ULID)")),
    responses((status = 200, body = Message), (status = "4XX", body = shared::error::ErrorEnvelope)))]
pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((session_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Message>> {
    caller.require(Capability::Read)?;
    let not_found = || Error::not_found("message not found");
    session::parse_session_id(&session_id).map_err(|_| not_found())?;
    Ulid::from_string(&id).map_err(|_| not_found())?;
    let client = state.db.get().await?;
    store::messages::get(&client, &caller.organization_id, &session_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found().into())
}
