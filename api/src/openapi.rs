//! The OpenAPI 3.1 document, generated from the handlers' annotations and the types they
//! exchange, so it cannot drift from the code. Served at `GET /api/v1/openapi.json`.

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::routes::{commands, events, gateways, messages, sessions, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "WhatsApp gateway fleet",
        description = "Manage WhatsApp sessions (linked devices) across a fleet of gateway workers."
    ),
    paths(
        sessions::create, sessions::list, sessions::get, sessions::update, sessions::delete,
        commands::start, commands::stop, commands::restart, commands::logout,
        commands::request_pairing_code, commands::qr, commands::get,
        messages::send, messages::list, messages::get,
        events::stream, gateways::list,
        webhooks::create, webhooks::list, webhooks::get, webhooks::update, webhooks::delete,
        webhooks::rotate_secret, webhooks::test, webhooks::replay, webhooks::deliveries,
    ),
    components(schemas(
        shared::session::Session, shared::session::SessionStatus, shared::session::StatusReason,
        shared::error::ErrorEnvelope, shared::error::ErrorBody, shared::error::ErrorCode,
        shared::store::commands::CommandRecord,
        shared::message::Message, shared::message::MessageStatus,
        shared::webhook::Webhook, shared::webhook::WebhookWithSecret, shared::webhook::Delivery,
        shared::webhook::DeliveryStatus, shared::webhook::Attempt,
    )),
    modifiers(&BearerAuth),
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
