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

#[cfg(test)]
mod tests {
    use super::*;

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
