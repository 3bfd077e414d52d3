//! The command client: how any part of the api has a session's worker run a command. It
//! finds the session's gateway (org-scoped; an unknown session is 404), makes sure a live
//! worker serves it (else 503 at once), publishes through the bus (`bus.rs`) and waits for
//! the reply until the deadline (else 504 with the command id). Every route that has a
//! worker act (`routes/commands.rs` and the others) and `gatewayctl` (`operator.rs`) go
//! through [`run`] or, for a notice nobody waits on, [`notify`].
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

use shared::{
    Error, Result,
    auth::Principal,
    db::now_ms,
    protocol::{Command, CommandEnvelope, CommandOutput, Outcome},
    session,
    store::{self, commands::Done},
};
use ulid::Ulid;

use crate::AppState;

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
        let route = follow(state, env).await?;
        if env.gateway_id == before || !state.fleet.is_live(&env.gateway_id).await {
            return Err(dead_gateway(env, &route));
        }
    }
    state.bus.call(env).await
}

/// Re-reads the session's owner and readdresses the command to it; answers the route read.
async fn follow(state: &AppState, env: &mut CommandEnvelope) -> Result<store::sessions::Route> {
    let client = state.db.get().await?;
    let route = store::sessions::route(&client, &env.organization_id, &env.session_id)
        .await?
        .ok_or_else(Error::session_not_found)?;
    state.session_gateways.insert(
        env.session_id.clone(),
        (env.organization_id.clone(), route.gateway_id.clone()),
    );
    env.gateway_id.clone_from(&route.gateway_id);
    Ok(route)
}

/// 503 for a session whose gateway has no live worker, with `Retry-After`: the lease's time
/// left (failover moves the session only after it; a restarting gateway's next process takes
/// it back before) plus a moment for the move itself.
fn dead_gateway(env: &CommandEnvelope, route: &store::sessions::Route) -> Error {
    let retry_after = (route.lease_left_ms + 999) / 1000 + 2;
    let message = if route.restarting {
        format!(
            "gateway {} is restarting; its sessions are back when its next process starts, or \
             move to a live gateway of its region if it does not come back within {retry_after} s",
            env.gateway_id
        )
    } else {
        format!(
            "gateway {} has no live worker; its sessions move to a live gateway of its region \
             once their leases expire",
            env.gateway_id
        )
    };
    Error::unavailable(message)
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
