//! Scale-up rebalancing of a region, as Postgres sees it: its active, live gateways' loads
//! (counting sessions already marked to move where they are going), the plan
//! ([`crate::fleet::rebalance`]) and the marks. The region's reaper runs it every round within
//! its rate (`REBALANCE_MOVES_PER_SEC`); `gatewayctl gateways rebalance` shows or forces it.
//! The owners hand the marked sessions over (`worker/src/fleet/drain.rs`).

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;

use crate::{
    db::DB_NOW_MS,
    error::Result,
    fleet::{self, Candidate},
    store::sessions,
};

/// How a region is rebalanced.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How far apart (a fraction of capacity) the fullest and emptiest gateways' loads may be.
    pub tolerance: f64,
    /// A session moved (by anything) is not moved by a rebalance again within this.
    pub window_ms: i64,
}

/// Sessions to move from one gateway to another: as planned, and as marked (only idle
/// sessions not moved within the window are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: String,
    pub to: String,
    pub planned: i64,
    pub marked: u64,
}

/// The region's active, live gateways, each loaded with what it owns less what is marked to
/// leave it plus what is marked to come to it, and how many marks are pending in all.
async fn loads(
    db: &impl GenericClient,
    region: &str,
    liveness_ms: i64,
) -> Result<(Vec<Candidate>, i64)> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT g.id, g.capacity, \
               (SELECT count(*) FROM sessions s WHERE s.gateway_id = g.id), \
               (SELECT count(*) FROM sessions s WHERE s.gateway_id = g.id \
                  AND s.move_to IS NOT NULL), \
               (SELECT count(*) FROM sessions s WHERE s.move_to = g.id) \
             FROM gateways g WHERE g.region = $1 AND g.state = 'active' \
             AND g.heartbeat_at >= {DB_NOW_MS} - $2 ORDER BY g.id"
        ))
        .await?;
    let mut pending = 0;
    let candidates = db
        .query(&stmt, &[&region, &liveness_ms])
        .await?
        .iter()
        .map(|r| {
            let (owned, leaving, coming): (i64, i64, i64) = (r.get(2), r.get(3), r.get(4));
            pending += leaving;
            Candidate {
                id: r.get(0),
                capacity: i64::from(r.get::<_, i32>(1)),
                load: owned - leaving + coming,
            }
        })
        .collect();
    Ok((candidates, pending))
}

/// Plans up to `budget` moves in `region` (less the marks still pending) and, unless
/// `dry_run`, marks the sessions to move.
pub async fn run(
    db: &impl GenericClient,
    region: &str,
    liveness_ms: i64,
    settings: Settings,
    budget: i64,
    dry_run: bool,
) -> Result<Vec<Move>> {
    let (mut candidates, pending) = loads(db, region, liveness_ms).await?;
    let budget = usize::try_from(budget.saturating_sub(pending)).unwrap_or(0);
    let mut pairs: BTreeMap<(usize, usize), i64> = BTreeMap::new();
    for pair in fleet::rebalance(&mut candidates, settings.tolerance, budget) {
        *pairs.entry(pair).or_default() += 1;
    }
    let mut moves = Vec::with_capacity(pairs.len());
    for ((from, to), planned) in pairs {
        let (from, to) = (candidates[from].id.clone(), candidates[to].id.clone());
        let marked = if dry_run {
            0
        } else {
            sessions::mark_moves(db, &from, &to, planned, settings.window_ms).await?
        };
        moves.push(Move {
            from,
            to,
            planned,
            marked,
        });
    }
    Ok(moves)
}
