//! The fleet, as one worker takes part in it, by file: `leases.rs` (claim in bulk at start-up,
//! renew in bulk, adopt sessions moved here), `heartbeat.rs` (the gateway's heartbeat, and
//! the drain an SRE asks for), `drain.rs` (move this gateway's sessions to its peers),
//! `exit.rs` (a restart keeps the sessions, a decommission removes the gateway),
//! `reaper.rs` (the region's elected failover) and `health.rs` (what the liveness and
//! readiness probes answer).

pub mod drain;
pub mod exit;
pub mod health;
pub mod heartbeat;
pub mod leases;
pub mod queue_look;
pub mod reaper;
