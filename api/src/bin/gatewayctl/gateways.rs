//! `gatewayctl gateways …`: the fleet as an SRE runs it — list, drain, decommission (and the
//! preStop of a Kubernetes scale-down), rebalance, cordon.

use std::{collections::HashMap, time::Duration};

use clap::Subcommand;
use shared::{Error, Result, fleet::GatewayState, store};

use crate::kubernetes;

#[derive(Subcommand)]
pub enum GatewayCmd {
    /// Every gateway: state, region, capacity, load, live sessions, version, heartbeat age,
    /// and sessions a rebalance marked to move away.
    List,
    /// Move every session of the gateway to the least-loaded active peers of its region (its
    /// worker does it: each number is disconnected before its new owner connects it, with no
    /// re-pairing). Shows progress; returns when the gateway is empty, or says which sessions
    /// could not move and why. The gateway stays `draining` (no new sessions) until uncordoned.
    Drain {
        id: String,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Remove the gateway for good (a scale-down): drain it like `drain`, then, once it owns
    /// no session, remove its row and its command queue — at once when no worker runs it,
    /// else when its worker stops. A restart of its worker meanwhile keeps it decommissioning.
    Decommission {
        id: String,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// What a gateway pod's preStop hook runs on Kubernetes: when the StatefulSet no longer
    /// counts the pod's ordinal (a scale-down removes the highest), decommission the gateway
    /// and wait for it to drain; any other stop (a rollout, a node's drain) is a restart,
    /// which moves nothing. Reads the StatefulSet with the pod's service account.
    PreStop {
        id: String,
        /// The StatefulSet whose pod this is (by default the pod's name without its ordinal:
        /// `gw-sg` for `gw-sg-3`).
        #[arg(long)]
        statefulset: Option<String>,
        /// Give up waiting after this many seconds (keep it under the pod's grace period).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Show (`--dry-run`) or start now the moves that even out the region's active
    /// gateways: idle sessions of the fullest, to the emptiest, until their loads are within
    /// the tolerance. Their owners hand them over (no re-pairing); the region's reaper does
    /// the same by itself, at REBALANCE_MOVES_PER_SEC.
    Rebalance {
        #[arg(long)]
        region: String,
        /// Show the plan; mark nothing.
        #[arg(long)]
        dry_run: bool,
        /// How far apart the loads may be, as a fraction of capacity.
        #[arg(long, default_value_t = 0.1)]
        tolerance: f64,
        /// Sessions moved within this many seconds are left where they are.
        #[arg(long, default_value_t = 3600)]
        window_secs: i64,
    },
    /// Keep the gateway's sessions, but place no new ones on it.
    Cordon { id: String },
    /// Make the gateway active again (ends a drain or a cordon).
    Uncordon { id: String },
}

pub async fn run(cfg: &api::Config, cmd: GatewayCmd) -> Result<()> {
    let db = shared::db::pool(&cfg.db.database_url, 1)?;
    let set = |id: String, state: GatewayState| {
        let db = db.clone();
        async move {
            if !store::gateways::set_state(&db.get().await?, &id, state).await? {
                return Err(Error::not_found(format!("no gateway {id}")));
            }
            say!("{id} is now {}", state.as_str());
            Ok(())
        }
    };
    match cmd {
        GatewayCmd::List => print_gateways(&db, cfg).await,
        GatewayCmd::Cordon { id } => set(id, GatewayState::Cordoned).await,
        GatewayCmd::Uncordon { id } => set(id, GatewayState::Active).await,
        GatewayCmd::Drain { id, timeout_secs } => {
            set(id.clone(), GatewayState::Draining).await?;
            drain_progress(&db, cfg, &id, Duration::from_secs(timeout_secs)).await
        }
        GatewayCmd::Decommission { id, timeout_secs } => {
            set(id.clone(), GatewayState::Decommissioning).await?;
            drain_progress(&db, cfg, &id, Duration::from_secs(timeout_secs)).await?;
            remove_if_unserved(&db, cfg, &id).await
        }
        GatewayCmd::Rebalance {
            region,
            dry_run,
            tolerance,
            window_secs,
        } => {
            let settings = store::rebalance::Settings {
                tolerance,
                window_ms: window_secs * 1000,
            };
            let liveness = cfg.gateway_liveness_ms as i64;
            let client = db.get().await?;
            let moves =
                store::rebalance::run(&client, &region, liveness, settings, i64::MAX, dry_run)
                    .await?;
            if moves.is_empty() {
                say!("region {region} is balanced (within {tolerance} of capacity)");
            }
            for m in moves {
                if dry_run {
                    say!("{} -> {}: {} session(s)", m.from, m.to, m.planned);
                } else {
                    say!(
                        "{} -> {}: {} session(s) marked to move (of {} planned; busy or recently \
                         moved ones stay)",
                        m.from,
                        m.to,
                        m.marked,
                        m.planned
                    );
                }
            }
            Ok(())
        }
        GatewayCmd::PreStop {
            id,
            statefulset,
            timeout_secs,
        } => {
            let statefulset = statefulset
                .or_else(|| id.rsplit_once('-').map(|(name, _)| name.to_owned()))
                .ok_or_else(|| Error::invalid(format!("{id} is not a StatefulSet pod's name")))?;
            let (start, replicas) = kubernetes::desired_ordinals(&statefulset).await?;
            if kubernetes::kept(&id, start, replicas)? {
                say!("{id} stays in {statefulset} ({replicas} replicas): a restart");
                return Ok(());
            }
            say!("{id} is beyond {statefulset}'s {replicas} replicas: decommissioning");
            set(id.clone(), GatewayState::Decommissioning).await?;
            drain_progress(&db, cfg, &id, Duration::from_secs(timeout_secs)).await
        }
    }
}

/// Removes a drained, decommissioned gateway with its queue when no worker runs it; a live
/// worker removes its own gateway when it stops.
async fn remove_if_unserved(
    db: &deadpool_postgres::Pool,
    cfg: &api::Config,
    id: &str,
) -> Result<()> {
    let client = db.get().await?;
    let (gateways, now) = store::gateways::list(&client).await?;
    if gateways
        .iter()
        .any(|g| g.id == id && g.is_live(now, cfg.gateway_liveness_ms as i64))
    {
        say!("{id} is empty; its worker removes it when it stops");
        return Ok(());
    }
    if !store::gateways::remove_decommissioned(&client, id, None).await? {
        return Err(Error::conflict(format!(
            "{id} was not removed: it owns sessions again or is not decommissioning any more"
        )));
    }
    let dropped = cfg
        .amqp
        .delete_gateway_queue(id)
        .await
        .map_err(|e| Error::unavailable(format!("{id} removed, but not its queue: {e}")))?;
    say!("{id} is removed, with its command queue ({dropped} command(s) dropped)");
    Ok(())
}

async fn print_gateways(db: &deadpool_postgres::Pool, cfg: &api::Config) -> Result<()> {
    let client = db.get().await?;
    let (gateways, now) = store::gateways::list(&client).await?;
    let load: HashMap<String, store::gateways::Load> =
        store::gateways::load(&client).await?.into_iter().collect();
    say!(
        "{:<20} {:<8} {:<15} {:>8} {:>8} {:>8} {:<10} {:>10} {:>7}",
        "ID",
        "REGION",
        "STATE",
        "CAPACITY",
        "SESSIONS",
        "LIVE",
        "VERSION",
        "HEARTBEAT",
        "MOVING"
    );
    for g in gateways {
        let l = load.get(&g.id).copied().unwrap_or_default();
        let ago = if g.heartbeat_at == 0 {
            "never".to_owned()
        } else {
            format!("{:.1}s ago", (now - g.heartbeat_at) as f64 / 1000.0)
        };
        say!(
            "{:<20} {:<8} {:<15} {:>8} {:>8} {:>8} {:<10} {:>10} {:>7}",
            g.id,
            g.region,
            g.effective_state(now, cfg.gateway_liveness_ms as i64)
                .as_str(),
            g.capacity,
            l.sessions,
            l.leased,
            g.version,
            ago,
            l.moving
        );
        if let Some(note) = g.note {
            say!("  note: {note}");
        }
    }
    Ok(())
}

/// Follows a drain until the gateway owns no session, printing progress.
async fn drain_progress(
    db: &deadpool_postgres::Pool,
    cfg: &api::Config,
    id: &str,
    timeout: Duration,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        let client = db.get().await?;
        let (gateways, now) = store::gateways::list(&client).await?;
        let g = gateways
            .into_iter()
            .find(|g| g.id == id)
            .ok_or_else(|| Error::not_found(format!("no gateway {id}")))?;
        let left = store::gateways::load(&client)
            .await?
            .into_iter()
            .find(|(gw, _)| gw == id)
            .map_or(0, |(_, l)| l.sessions);
        if left == 0 {
            say!("{id} is drained ({:.1} s)", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if last != Some(left) {
            say!("{id}: {left} session(s) to move");
            last = Some(left);
        }
        if !g.is_live(now, cfg.gateway_liveness_ms as i64) {
            return Err(Error::unavailable(format!(
                "{id} has no live worker to drain it; its {left} session(s) move by failover \
                 once their leases expire"
            )));
        }
        if started.elapsed() > timeout {
            let why = g
                .note
                .unwrap_or_else(|| "the drain is still under way".into());
            return Err(Error::unavailable(format!(
                "{left} session(s) still on {id} after {} s: {why}",
                timeout.as_secs()
            )));
        }
        if let Some(note) = &g.note {
            say!("  {note}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
