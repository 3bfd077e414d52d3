//! Commands sent by an operator rather than an API caller (`gatewayctl sim …`): the session is
//! found in any organization, and the command then takes the ordinary command path, audited
//! as requested by `gatewayctl`.

use std::time::Duration;

use shared::{
    Error, Result,
    auth::{Capabilities, Capability, Principal},
    protocol::{Command, CommandOutput},
    store,
};
use tokio_util::sync::CancellationToken;

use crate::{Config, build_state, command_client};

pub async fn send(cfg: Config, session_id: &str, command: Command) -> Result<CommandOutput> {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let state = build_state(cfg, shutdown).await?;
    let session = store::sessions::get_for_operator(&state.db.get().await?, session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    let operator = Principal {
        organization_id: session.organization_id,
        subject: "gatewayctl".into(),
        capabilities: Capabilities::of(&[Capability::Read, Capability::Manage]),
        expires_at_ms: None,
    };
    for _ in 0..100 {
        if state.bus.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    command_client::run(&state, &operator, session_id, command).await
}
