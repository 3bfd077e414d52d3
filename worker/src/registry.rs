//! The session actors of this worker, by session id, and the leases they hold.
//!
//! A delivery goes to its session's actor, started on first use (it claims the session's
//! lease itself); sessions claimed in bulk (at start-up, or moved here) are *adopted*: their
//! actor starts with the lease already taken. An actor that ended (it lost its lease, handed
//! the session to a peer, or could not claim it) has closed its inbox; the next delivery
//! starts a fresh one.
//!
//! Each actor's [`Lease`] (the epoch it claimed) is shared with the lease keeper
//! (`fleet/leases.rs`), which checks them all in one read each tick and cancels the ones it finds
//! lost: the actor then closes its connection at once and writes nothing more. Shutdown drops every inbox and waits (up to a
//! grace period) for the actors to finish what they hold.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    ctx::Ctx,
    session_actor::{self, Job, Msg},
    store::leases::Claimed,
};

/// Messages queued per session before the consumer waits (prefetch bounds the total).
const INBOX: usize = 64;

/// One actor's hold on its session.
#[derive(Default)]
pub struct Lease {
    /// The epoch it claimed; 0 until it has.
    epoch: AtomicI64,
    /// Cancelled when the lease is found lost: stop driving the session now.
    pub lost: CancellationToken,
}

impl Lease {
    pub fn set_epoch(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct Handle {
    inbox: mpsc::Sender<Msg>,
    lease: Arc<Lease>,
}

impl Handle {
    fn is_live(&self) -> bool {
        !self.inbox.is_closed()
    }
}

#[derive(Clone)]
pub struct Registry {
    ctx: Arc<Ctx>,
    actors: Arc<Mutex<HashMap<String, Handle>>>,
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
}

impl Registry {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Registry {
            ctx,
            actors: Arc::default(),
            tasks: Arc::default(),
        }
    }

    fn actors(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.actors.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn spawn(
        &self,
        session_id: &str,
        lease: Arc<Lease>,
        inbox: mpsc::Receiver<Msg>,
        claimed: Option<Claimed>,
    ) {
        let mut tasks = self.tasks.lock().await;
        // Reap actors that ended, so the set does not grow with them.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(session_actor::run(
            self.ctx.clone(),
            session_id.to_owned(),
            lease,
            inbox,
            claimed,
        ));
    }

    /// The inbox of the session's actor, starting one when there is none (or it ended).
    async fn inbox(&self, session_id: &str) -> mpsc::Sender<Msg> {
        let (handle, rx) = {
            let mut actors = self.actors();
            match actors.get(session_id) {
                Some(h) if h.is_live() => return h.inbox.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(INBOX);
                    let handle = Handle {
                        inbox: tx,
                        lease: Arc::default(),
                    };
                    actors.insert(session_id.to_owned(), handle.clone());
                    (handle, rx)
                }
            }
        };
        self.spawn(session_id, handle.lease, rx, None).await;
        handle.inbox
    }

    /// Starts the actor of a session this worker has just claimed in bulk. A session whose
    /// actor a command started meanwhile keeps that actor (it claimed the lease after us, so
    /// ours is void); answers whether an actor was started.
    pub async fn adopt(&self, claimed: Claimed) -> bool {
        let id = claimed.session.id.clone();
        let (lease, rx) = {
            let mut actors = self.actors();
            if actors.get(&id).is_some_and(Handle::is_live) {
                return false;
            }
            let (tx, rx) = mpsc::channel(INBOX);
            let lease = Arc::new(Lease::default());
            lease.set_epoch(claimed.epoch);
            actors.insert(
                id.clone(),
                Handle {
                    inbox: tx,
                    lease: lease.clone(),
                },
            );
            (lease, rx)
        };
        self.spawn(&id, lease, rx, Some(claimed)).await;
        true
    }

    pub async fn dispatch(&self, job: Job) {
        let mut msg = Msg::Job(Box::new(job));
        // At most twice: the first inbox may belong to an actor that has just ended.
        for _ in 0..2 {
            let Msg::Job(job) = &msg else { return };
            let tx = self.inbox(&job.env.session_id).await;
            match tx.send(msg).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => msg = back,
            }
        }
        if let Msg::Job(job) = msg {
            tracing::warn!(session_id = %job.env.session_id, "no actor took the command; it will be redelivered");
            job.requeue().await;
        }
    }

    /// Wakes the senders of these sessions' actors, those this worker runs (none is started):
    /// how many were woken.
    pub fn wake_senders(&self, sessions: &[String]) -> usize {
        let actors = self.actors();
        sessions
            .iter()
            .filter_map(|id| actors.get(id))
            .filter(|h| h.inbox.try_send(Msg::WakeSender).is_ok())
            .count()
    }

    /// The leases held now: (session id, epoch) of every live actor that has claimed one.
    /// Forgets actors that ended.
    pub fn held(&self) -> Vec<(String, i64)> {
        let mut actors = self.actors();
        actors.retain(|_, h| h.is_live());
        actors
            .iter()
            .map(|(id, h)| (id.clone(), h.lease.epoch()))
            .filter(|(_, epoch)| *epoch > 0)
            .collect()
    }

    /// The sessions of every live actor, claimed or still claiming.
    pub fn running(&self) -> Vec<String> {
        let actors = self.actors();
        actors
            .iter()
            .filter(|(_, h)| h.is_live())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether an actor told its lease was lost is still running (it ends shortly).
    pub fn letting_go(&self) -> bool {
        self.actors()
            .values()
            .any(|h| h.is_live() && h.lease.lost.is_cancelled())
    }

    pub fn holds(&self, session_id: &str) -> bool {
        self.actors().get(session_id).is_some_and(Handle::is_live)
    }

    /// Tells the actors of these leases (id, epoch) that they lost them.
    pub fn lose(&self, lost: &[(String, i64)]) {
        let actors = self.actors();
        for (id, epoch) in lost {
            if let Some(h) = actors.get(id)
                && h.lease.epoch() == *epoch
            {
                h.lease.lost.cancel();
            }
        }
    }

    /// Every lease is in doubt (they could not be renewed in time): stop driving them all.
    pub fn lose_all(&self) {
        for h in self.actors().values() {
            h.lease.lost.cancel();
        }
    }

    /// Asks the session's actor to disconnect and hand the session to `to`. `Ok(false)` when
    /// no actor holds it (it may be moved without one).
    pub async fn hand_off(&self, session_id: &str, to: &str) -> Result<bool, String> {
        let Some(inbox) = self
            .actors()
            .get(session_id)
            .filter(|h| h.is_live())
            .map(|h| h.inbox.clone())
        else {
            return Ok(false);
        };
        let (done, answer) = oneshot::channel();
        let msg = Msg::HandOff {
            to: to.to_owned(),
            done,
        };
        if inbox.send(msg).await.is_err() {
            return Ok(false);
        }
        match answer.await {
            Ok(result) => result.map(|()| true),
            // The actor ended without answering (it lost its lease meanwhile).
            Err(_) => Err("the session's actor ended before handing it over".into()),
        }
    }

    /// Drops every inbox and waits up to `grace` for the actors to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.actors().clear();
        let mut tasks = self.tasks.lock().await;
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                "shutdown grace period over; abandoning unfinished commands to redelivery"
            );
            tasks.abort_all();
        }
    }
}
