//! The session actors of this worker, by session id.
//!
//! A delivery goes to its session's actor, started on first use. An actor that ended (it lost
//! its session, or could not claim it) has closed its inbox; the next delivery starts a fresh
//! one. Shutdown drops every inbox and waits, up to a grace period, for the actors to finish
//! the commands they already hold.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    Ctx,
    session_actor::{self, Job},
};

/// Commands queued per session before the consumer waits (prefetch bounds the total).
const INBOX: usize = 64;

#[derive(Clone)]
pub struct Registry {
    ctx: Arc<Ctx>,
    actors: Arc<Mutex<HashMap<String, mpsc::Sender<Job>>>>,
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

    /// The inbox of the session's actor, starting one when there is none (or it ended).
    async fn inbox(&self, session_id: &str) -> mpsc::Sender<Job> {
        let started = {
            let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
            match actors.get(session_id) {
                Some(tx) if !tx.is_closed() => return tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(INBOX);
                    actors.insert(session_id.to_owned(), tx.clone());
                    (tx, rx)
                }
            }
        };
        let (tx, rx) = started;
        let mut tasks = self.tasks.lock().await;
        // Reap actors that ended, so the set does not grow with them.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(session_actor::run(
            self.ctx.clone(),
            session_id.to_owned(),
            rx,
        ));
        tx
    }

    /// Starts the session's actor if it is not running (used to resume sessions at boot).
    pub async fn ensure(&self, session_id: &str) {
        self.inbox(session_id).await;
    }

    pub async fn dispatch(&self, job: Job) {
        let mut job = job;
        // At most twice: the first inbox may belong to an actor that has just ended.
        for _ in 0..2 {
            let tx = self.inbox(&job.env.session_id).await;
            match tx.send(job).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => job = back,
            }
        }
        tracing::warn!(session_id = %job.env.session_id, "no actor took the command; it will be redelivered");
    }

    pub async fn shutdown(&self, grace: Duration) {
        self.actors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
