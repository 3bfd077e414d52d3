//! What reaches the session's number: each message stored with its event (and marked read
//! with `autoRead`), in the order it arrived. A reaction, a vote, an edit or a revoke names
//! our id of the message it is on (one on a message the session never stored is dropped); a
//! vote is opened and its options named from the poll.
//!
//! A file a contact sent is downloaded beside the actor, which goes on sending and receiving
//! meanwhile: within `MEDIA_TRANSFER_TIMEOUT_MS`, into a temporary file, then kept in the
//! media store a chunk at a time; its message is stored once the file is kept, or with the
//! file `failed` and why. Files still downloading when the connection closes get a moment to
//! finish; the messages of the others are stored with their file failed, never lost.

use std::{collections::HashMap, sync::Arc, time::Duration};

use sha2::{Digest, Sha256};
use shared::{
    db::now_ms,
    media::{self, Media},
    message::{Content, MediaStatus},
    protocol::EventKind,
};
use tokio::task::{Id, JoinError, JoinSet};

use super::{Actor, Flow, retrying};
use crate::{
    ctx::Ctx,
    driver::{Ballot, Download, Inbound, Received, RemoteFile},
    registry::Lease,
    store::messages,
};

/// How long files still downloading may take to finish once the connection closes.
const FETCH_GRACE: Duration = Duration::from_secs(5);

/// A file kept, or why not; `None` when the lease was lost while keeping it.
type Kept = Option<Result<Media, String>>;

/// The files being downloaded beside the actor, and the messages they came in (our id for
/// each, given when it arrived, so messages list in the order they came).
#[derive(Default)]
pub(super) struct Fetching {
    tasks: JoinSet<Kept>,
    messages: HashMap<Id, (String, Inbound)>,
}

impl Fetching {
    /// The next download to end (pending while there is none).
    pub(super) async fn next(&mut self) -> Result<(Id, Kept), JoinError> {
        match self.tasks.join_next_with_id().await {
            Some(done) => done,
            None => std::future::pending().await,
        }
    }
}

impl Actor {
    /// A message reached the number: stored, streamed, and marked read with `autoRead`.
    pub(super) async fn on_inbound(&mut self, mut m: Inbound) -> Flow {
        if let Some(wa_id) = m.refers_to.clone() {
            let (db, session) = (&self.ctx.db, &self.row.id);
            let found = retrying(
                &self.lease,
                session,
                "look up the message a received one refers to",
                || messages::by_wa_id(db, session, &wa_id),
            );
            let Some(target) = found.await else {
                return self.lost();
            };
            let Some(target) = target else {
                tracing::debug!(session_id = %self.row.id, wa_id, kind = m.content.kind(), "a contact acted on a message the session never stored");
                return Flow::Continue;
            };
            m.content.set_refers_to(target);
        }
        if let Some(ballot) = m.ballot.take() {
            let Some(named) = self.name_choices(&m, ballot).await else {
                return self.lost();
            };
            match (named, &mut m.content) {
                (Ok(options), Content::PollVote { poll_vote }) => poll_vote.options = options,
                (Ok(_), _) => {}
                (Err(why), _) => {
                    tracing::warn!(session_id = %self.row.id, error = %why, "a contact's vote is dropped");
                    metrics::counter!("worker_poll_votes_dropped_total").increment(1);
                    return Flow::Continue;
                }
            }
        }
        let id = shared::message::new_id();
        let Some(file) = m.file.take() else {
            return self.store_inbound(id, m).await;
        };
        let Some(conn) = self.conn.as_ref() else {
            let why = "the session was not connected to WhatsApp".to_owned();
            return self.store_fetched(id, m, Err(why)).await;
        };
        let download = conn.download(file.clone());
        let task = fetch(
            self.ctx.clone(),
            self.lease.clone(),
            self.row.id.clone(),
            self.row.organization_id.clone(),
            m.content.clone(),
            file,
            download,
        );
        let task = self.fetching.tasks.spawn(task);
        self.fetching.messages.insert(task.id(), (id, m));
        Flow::Continue
    }

    /// A file a contact sent was downloaded and kept, or not: its message is stored.
    pub(super) async fn on_fetched(&mut self, done: Result<(Id, Kept), JoinError>) -> Flow {
        let (task, kept) = match done {
            Ok(done) => done,
            Err(e) => (e.id(), Some(Err(format!("its download stopped: {e}")))),
        };
        let Some((id, m)) = self.fetching.messages.remove(&task) else {
            return Flow::Continue;
        };
        match kept {
            Some(kept) => self.store_fetched(id, m, kept).await,
            None => self.lost(),
        }
    }

    /// Lets the files still downloading finish, for a moment; stores the messages of the
    /// others with their file failed. Before the connection closes.
    pub(super) async fn finish_fetching(&mut self) {
        let until = tokio::time::Instant::now() + FETCH_GRACE;
        while !self.fetching.messages.is_empty() {
            let Ok(done) = tokio::time::timeout_at(until, self.fetching.next()).await else {
                break;
            };
            if let Flow::Stop = self.on_fetched(done).await {
                break;
            }
        }
        self.fetching.tasks.abort_all();
        let cut = std::mem::take(&mut self.fetching.messages);
        for (id, m) in cut.into_values() {
            let why = "the session disconnected before its file was downloaded".to_owned();
            if let Flow::Stop = self.store_fetched(id, m, Err(why)).await {
                break;
            }
        }
        self.fetching = Fetching::default();
    }

    /// Stores a message whose file was kept (its id, type, size and SHA-256 filled in), or
    /// not (`media.status: failed`, and why).
    async fn store_fetched(
        &mut self,
        id: String,
        mut m: Inbound,
        kept: Result<Media, String>,
    ) -> Flow {
        if let Some(shown) = m.content.media_mut() {
            match kept {
                Ok(media) => {
                    shown.media_id = media.id;
                    shown.mime_type = Some(media.mime_type);
                    shown.size = Some(media.size);
                    shown.sha256 = Some(media.sha256);
                }
                Err(why) => {
                    tracing::warn!(session_id = %self.row.id, error = %why, "a received file could not be fetched");
                    metrics::counter!("worker_received_files_failed_total").increment(1);
                    shown.status = Some(MediaStatus::Failed);
                    shown.error = Some(why);
                }
            }
        }
        self.store_inbound(id, m).await
    }

    /// Stores a message received as `id`, publishes its event, and marks it read with
    /// `autoRead`.
    async fn store_inbound(&mut self, id: String, m: Inbound) -> Flow {
        let (ctx, row, epoch) = (&self.ctx, &self.row, self.epoch);
        let keep = ctx.message_retention_ms;
        let stored = retrying(&self.lease, &row.id, "store a received message", || {
            messages::insert_inbound(&ctx.db, row, epoch, &id, &m, now_ms(), keep)
        });
        let event = match stored.await {
            Some(Some(event)) => event,
            Some(None) | None => return self.lost(),
        };
        let Some(event) = event else {
            return Flow::Continue; // delivered twice
        };
        metrics::counter!("worker_messages_received_total").increment(1);
        self.ctx.outbox.events(std::slice::from_ref(&event)).await;
        if self.row.auto_read
            && m.refers_to.is_none()
            && let Some(conn) = self.conn.as_mut()
        {
            match conn.mark_read(&m).await {
                Ok(()) => {
                    if let EventKind::MessageReceived { message_id, .. } = &event.kind
                        && let Err(e) =
                            messages::mark_inbound_read(&self.ctx.db, message_id, now_ms()).await
                    {
                        tracing::warn!(session_id = %self.row.id, error = %e, "could not record a read receipt");
                    }
                }
                Err(e) => {
                    tracing::debug!(session_id = %self.row.id, error = %e, "cannot mark a message read")
                }
            }
        }
        Flow::Continue
    }

    /// The options of the poll a contact's vote is on that it chose, in the poll's order:
    /// `Err(why)` when it is not on a poll of the session or cannot be opened (the vote is
    /// dropped); `None` when the lease was lost.
    async fn name_choices(
        &mut self,
        vote: &Inbound,
        ballot: Ballot,
    ) -> Option<Result<Vec<String>, String>> {
        let Some(poll_id) = vote.content.refers_to().filter(|id| !id.is_empty()) else {
            return Some(Err("it names no poll".into()));
        };
        let (db, session) = (&self.ctx.db, &self.row.id);
        let poll = retrying(
            &self.lease,
            session,
            "look up the poll a vote is on",
            || messages::reference(db, session, poll_id),
        );
        let Some(poll) = poll.await? else {
            return Some(Err(format!(
                "the session has no poll {poll_id} that WhatsApp knows"
            )));
        };
        let Content::Poll { poll: question } = &poll.content else {
            return Some(Err(format!("message {poll_id} is not a poll")));
        };
        let Some(conn) = self.conn.as_mut() else {
            return Some(Err("the session is not connected".into()));
        };
        let mut chosen = match conn.open_ballot(&poll, &vote.from, ballot).await {
            Ok(chosen) => chosen,
            Err(e) => return Some(Err(e.to_string())),
        };
        chosen.sort_unstable();
        chosen.dedup();
        let named: Vec<String> = question
            .options
            .iter()
            .filter(|o| chosen.contains(&Sha256::digest(o.as_bytes()).into()))
            .cloned()
            .collect();
        if named.len() < chosen.len() {
            return Some(Err(format!(
                "it chose {} option(s) poll {poll_id} does not have",
                chosen.len() - named.len()
            )));
        }
        Some(Ok(named))
    }
}

/// Downloads a file a contact sent, within `MEDIA_TRANSFER_TIMEOUT_MS`, and keeps it in the
/// media store (retrying while the store is away).
async fn fetch(
    ctx: Arc<Ctx>,
    lease: Arc<Lease>,
    session_id: String,
    org: String,
    content: Content,
    file: RemoteFile,
    download: Download,
) -> Kept {
    let limit = ctx.media_transfer_timeout;
    let received = match tokio::time::timeout(limit, download).await {
        Ok(Ok(received)) => received,
        Ok(Err(e)) => return Some(Err(e.to_string())),
        Err(_) => {
            return Some(Err(format!(
                "its download took longer than {} s",
                limit.as_secs_f64()
            )));
        }
    };
    let keep = ctx.message_retention_ms;
    retrying(&lease, &session_id, "store a received file", || {
        keep_file(&ctx, &org, keep, &content, &file, &received)
    })
    .await
}

/// Stores a file a contact sent (`file`, downloaded into `received`) as a file of `org`, kept
/// `keep_ms` (its message, stored next, keeps it as long as itself), a chunk at a time.
/// `Ok(Err(why))`: its bytes are not those its message names (their SHA-256), and nothing
/// is stored.
async fn keep_file(
    ctx: &Ctx,
    org: &str,
    keep_ms: i64,
    content: &Content,
    file: &RemoteFile,
    received: &Received,
) -> shared::Result<Result<Media, String>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let local = |e: std::io::Error| {
        shared::Error::internal(format!("the downloaded file could not be read: {e}"))
    };
    let declared = content.media().and_then(|(_, f)| f.mime_type.clone());
    let mut reader = tokio::fs::File::from_std(received.file.try_clone().map_err(local)?);
    reader.rewind().await.map_err(local)?;
    let id = ulid::Ulid::new().to_string();
    let mut client = ctx.db.get().await?;
    let tx = client.transaction().await?;
    let mut writer = ctx.media.writer(&id);
    let mut piece = vec![0u8; media::CHUNK_BYTES];
    loop {
        match reader.read(&mut piece).await.map_err(local)? {
            0 => break,
            n => writer.write(&tx, &piece[..n]).await?,
        }
    }
    if writer.size() == 0 {
        return Ok(Err("the file is empty".into()));
    }
    if !file.file_sha256.is_empty() && file.file_sha256[..] != writer.sha256()[..] {
        return Ok(Err(
            "its bytes are not the file its message names (SHA-256 differs)".into(),
        ));
    }
    let mime_type = media::sniff(writer.head(), declared.as_deref())
        .ok()
        .or(declared)
        .unwrap_or_else(|| "application/octet-stream".into());
    let stored = writer.media(mime_type, keep_ms);
    writer.finish(&tx, org, &stored).await?;
    tx.commit().await?;
    Ok(Ok(stored))
}
