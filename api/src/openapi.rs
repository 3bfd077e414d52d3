//! The OpenAPI 3.1 document, generated from the handlers' annotations and the types they
//! exchange, so it cannot drift from the code. Served at `GET /api/v1/openapi.json`.

use utoipa::{
    Modify, OpenApi,
    openapi::{
        Content, Ref, RefOr, ResponseBuilder,
        header::Header,
        schema::{ObjectBuilder, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use crate::routes::{
    commands, contacts, events, gateways, media, message_actions, messages, sessions, webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "WhatsApp gateway fleet",
        description = "Manage WhatsApp sessions (linked devices) across a fleet of gateway workers."
    ),
    paths(
        sessions::create, sessions::list, sessions::get, sessions::update, sessions::delete,
        commands::start, commands::stop, commands::restart, commands::logout,
        commands::request_pairing_code, commands::qr, commands::recent, commands::get,
        messages::send, messages::list, messages::get, message_actions::edit, message_actions::revoke,
        contacts::check, media::upload, media::download,
        events::stream, gateways::list,
        webhooks::create, webhooks::list, webhooks::get, webhooks::update, webhooks::delete,
        webhooks::rotate_secret, webhooks::test, webhooks::replay, webhooks::deliveries,
    ),
    components(schemas(
        shared::session::Session, shared::session::SessionStatus, shared::session::StatusReason,
        shared::error::ErrorEnvelope, shared::error::ErrorBody, shared::error::ErrorCode,
        shared::store::commands::CommandRecord,
        shared::message::Message, shared::message::MessageStatus, shared::media::Media,
        shared::webhook::Webhook, shared::webhook::WebhookWithSecret, shared::webhook::Delivery,
        shared::webhook::DeliveryStatus, shared::webhook::Attempt,
    )),
    modifiers(&BearerAuth, &Authenticated, &RateLimited, &UniqueOperationIds),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A frontend login JWT (verified against the frontend's JWKS) or an API \
                         key (gwk_...) with capabilities.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every operation is authenticated, so every one can answer 429 `rate_limited` when its
/// credential or organization is over its request rate (`crate::limits`). Stated here once
/// rather than on each handler; an operation with a 429 of its own keeps its description,
/// which is widened to say so, and gains the headers.
struct RateLimited;

const RATE_LIMITED: &str = "over a request limit: too many requests for this credential or \
                            organization (or, on the event stream, too many open streams); \
                            retry after `Retry-After` seconds";

impl Modify for RateLimited {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let seconds = |description: &str| {
            let mut h = Header::new(ObjectBuilder::new().schema_type(Type::Integer));
            h.description = Some(description.to_owned());
            h
        };
        let headers = [
            ("Retry-After", "Seconds until a retry can succeed"),
            ("RateLimit-Limit", "The limit's burst size"),
            ("RateLimit-Remaining", "Requests left now (0)"),
            (
                "RateLimit-Reset",
                "Seconds until one more request is allowed",
            ),
        ];
        for op in operations(openapi) {
            let RefOr::T(response) = error_response(op, "429", "") else {
                continue;
            };
            response.description = match response.description.as_str() {
                "" => format!("Rate limited: {RATE_LIMITED}"),
                own => format!("{own}; or {RATE_LIMITED}"),
            };
            for (name, description) in headers {
                response
                    .headers
                    .insert(name.to_owned(), RefOr::T(seconds(description)));
            }
        }
    }
}

/// Every operation is authenticated, so every one can answer 401 (no valid credential) and
/// 403 (a credential without the capability it needs), in the error envelope. Stated here once,
/// so no handler's annotation can leave them out (a fuzzer found `GET /qr` without its 401).
struct Authenticated;

impl Modify for Authenticated {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for op in operations(openapi) {
            error_response(
                op,
                "401",
                "Unauthorized: no credential, or one that is invalid, expired or revoked",
            );
            error_response(
                op,
                "403",
                "Forbidden: the credential lacks the capability this operation needs",
            );
        }
    }
}

/// Operation ids must be unique in a document, and utoipa names each operation after its
/// handler: `get` of sessions, messages, webhooks and commands alike. A tool that keys
/// operations by id mistakes one for another (a fuzzer followed a message's `Location` to
/// `GET /webhooks/{webhook}`). Each is prefixed with its tag, the handler's module:
/// `messages_get`.
struct UniqueOperationIds;

impl Modify for UniqueOperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for op in operations(openapi) {
            let tag = op.tags.as_ref().and_then(|t| t.first()).cloned();
            if let (Some(tag), Some(id)) = (tag, op.operation_id.as_mut()) {
                *id = format!("{tag}_{id}");
            }
        }
    }
}

/// Every operation of the document.
fn operations(
    openapi: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    openapi.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
    })
}

/// The operation's response for `status`, added in the error envelope with `description` if
/// it had none.
fn error_response<'a>(
    op: &'a mut utoipa::openapi::path::Operation,
    status: &str,
    description: &str,
) -> &'a mut RefOr<utoipa::openapi::Response> {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        Content::new(Some(Ref::from_schema_name("ErrorEnvelope"))),
                    )
                    .build(),
            )
        })
}
