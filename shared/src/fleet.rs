//! The fleet's vocabulary and its placement arithmetic, apart from any I/O so it can be read
//! and tested on its own.
//!
//! A gateway is `active` (takes new sessions), `draining` (its sessions are moving to peers),
//! `decommissioning` (draining, then removed with its queue once empty), `cordoned` (keeps its
//! sessions, takes no new ones), `restarting` (its worker stopped to restart and holds its
//! sessions for its next process; shown, not stored) or `dead` (its heartbeat lapsed; shown,
//! not stored). Placement — of a new session, of a drained one, of a dead gateway's — puts
//! each session on the least-loaded candidate by load ÷ capacity, never past capacity.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GatewayState {
    Active,
    Draining,
    Decommissioning,
    Cordoned,
    Restarting,
    Dead,
}

impl GatewayState {
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayState::Active => "active",
            GatewayState::Draining => "draining",
            GatewayState::Decommissioning => "decommissioning",
            GatewayState::Cordoned => "cordoned",
            GatewayState::Restarting => "restarting",
            GatewayState::Dead => "dead",
        }
    }

    /// Whether its sessions are to move to its peers.
    pub fn drains(self) -> bool {
        matches!(self, GatewayState::Draining | GatewayState::Decommissioning)
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            GatewayState::Active,
            GatewayState::Draining,
            GatewayState::Decommissioning,
            GatewayState::Cordoned,
            GatewayState::Restarting,
            GatewayState::Dead,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// A gateway that may take sessions, with what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub capacity: i64,
    pub load: i64,
}

impl Candidate {
    fn has_room(&self) -> bool {
        self.load < self.capacity
    }
}

/// The least-loaded candidate (load ÷ capacity) with room, if any. Ties go to the first.
pub fn least_loaded(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.has_room())
        // a/b < c/d  ⇔  a·d < c·b (capacities are positive when there is room).
        .min_by(|(_, a), (_, b)| (a.load * b.capacity).cmp(&(b.load * a.capacity)))
        .map(|(i, _)| i)
}

/// Places `n` sessions one by one on the least-loaded candidate, counting each placement in
/// its load. Returns the candidate index of each placed session; shorter than `n` when every
/// candidate is full.
pub fn spread(n: usize, candidates: &mut [Candidate]) -> Vec<usize> {
    let mut placed = Vec::with_capacity(n);
    for _ in 0..n {
        let Some(i) = least_loaded(candidates) else {
            break;
        };
        candidates[i].load += 1;
        placed.push(i);
    }
    placed
}

/// Scale-up's plan: while the fullest candidate's load (÷ capacity) exceeds the emptiest's
/// by more than `tolerance` (a fraction of capacity), one session moves from the one to the
/// other; at most `budget` moves. Answers (from, to) candidate indices, one per session;
/// the candidates' loads count the moves.
pub fn rebalance(
    candidates: &mut [Candidate],
    tolerance: f64,
    budget: usize,
) -> Vec<(usize, usize)> {
    let ratio = |c: &Candidate| c.load as f64 / c.capacity.max(1) as f64;
    let mut moves = Vec::new();
    while moves.len() < budget {
        let by_ratio = |a: &&Candidate, b: &&Candidate| ratio(a).total_cmp(&ratio(b));
        let (Some(full), Some(empty)) = (
            (0..candidates.len()).max_by(|&a, &b| by_ratio(&&candidates[a], &&candidates[b])),
            least_loaded(candidates),
        ) else {
            break;
        };
        let (f, e) = (&candidates[full], &candidates[empty]);
        // Moved, the pair must still differ by more than the tolerance the other way round
        // too, or the move would only swap which one is fuller.
        let after = (f.load - 1) as f64 / f.capacity.max(1) as f64
            - (e.load + 1) as f64 / e.capacity.max(1) as f64;
        if full == empty || ratio(f) - ratio(e) <= tolerance || after < -tolerance || f.load == 0 {
            break;
        }
        candidates[full].load -= 1;
        candidates[empty].load += 1;
        moves.push((full, empty));
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_gateway_takes_sessions_from_the_fullest_until_within_tolerance() {
        let mut cands = [c("a", 100, 80), c("b", 100, 60), c("c", 100, 0)];
        let moves = rebalance(&mut cands, 0.1, usize::MAX);
        let loads: Vec<i64> = cands.iter().map(|c| c.load).collect();
        assert_eq!(loads.iter().sum::<i64>(), 140, "nothing lost or made up");
        assert!(
            loads.iter().max().unwrap_or(&0) - loads.iter().min().unwrap_or(&0) <= 10,
            "{loads:?}"
        );
        assert!(
            moves.iter().all(|&(_, to)| to == 2),
            "only to the new one: {moves:?}"
        );
        assert_eq!(
            loads,
            [50, 50, 40],
            "the fullest first, until within 10 of 100"
        );
        assert_eq!(moves.len(), 40, "no more moves than needed");
        // A balanced region, one within the tolerance, and a budget: nothing more moves.
        assert!(rebalance(&mut cands, 0.1, usize::MAX).is_empty());
        let mut close = [c("a", 100, 55), c("b", 100, 50)];
        assert!(rebalance(&mut close, 0.1, usize::MAX).is_empty());
        let mut far = [c("a", 100, 90), c("b", 100, 0)];
        assert_eq!(rebalance(&mut far, 0.1, 7).len(), 7);
        // By capacity: 50 of 100 is as full as 5 of 10.
        let mut sizes = [c("big", 100, 50), c("small", 10, 5)];
        assert!(rebalance(&mut sizes, 0.1, usize::MAX).is_empty());
        // A full emptiest takes none.
        let mut full = [c("a", 10, 10), c("b", 1, 1)];
        assert!(rebalance(&mut full, 0.0, usize::MAX).is_empty());
    }

    fn c(id: &str, capacity: i64, load: i64) -> Candidate {
        Candidate {
            id: id.into(),
            capacity,
            load,
        }
    }

    #[test]
    fn the_least_loaded_by_capacity_wins() {
        let cands = [c("a", 100, 50), c("b", 1000, 100), c("c", 10, 10)];
        assert_eq!(least_loaded(&cands), Some(1));
        assert_eq!(least_loaded(&[c("full", 5, 5)]), None);
        assert_eq!(least_loaded(&[]), None);
    }

    #[test]
    fn spreading_fills_by_ratio_and_stops_at_capacity() {
        let mut cands = [c("a", 10, 0), c("b", 20, 0)];
        let placed = spread(40, &mut cands);
        assert_eq!(placed.len(), 30, "never past capacity");
        assert_eq!((cands[0].load, cands[1].load), (10, 20));
        let mut even = [c("a", 100, 0), c("b", 100, 0)];
        let placed = spread(10, &mut even);
        assert_eq!(placed.iter().filter(|&&i| i == 0).count(), 5);
    }

    #[test]
    fn states_round_trip() {
        for s in ["active", "draining", "cordoned", "dead"] {
            assert_eq!(GatewayState::parse(s).map(GatewayState::as_str), Some(s));
        }
        assert_eq!(GatewayState::parse("gone"), None);
    }
}
