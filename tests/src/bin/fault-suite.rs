//! The fault suite: a steady load of commands and of messages through two api replicas to one
//! worker, while faults are injected one at a time, each then checked from Postgres and the
//! simulator's server-side record. One table row per fault: requests, answers by status,
//! commands lost (still `pending` past their deadline plus the sweep's grace), messages lost
//! (accepted, then never ending `sent` or `failed`), messages the phones received twice,
//! numbers connected twice, and the time from the fault's end to the first answered command.
//!
//! Commands (`:restart`, 16 clients) go to 24 of the sessions; messages (2 clients, each a
//! message every 100 ms) to the other 8, so a message waits for the faults, not for the load's
//! own restarts. The sessions' rate limits are raised and "typing…" before a message is off
//! (it would hold each session to about one message a second). A message client does what a
//! careful client does: it sends each message with an idempotency key and, when the answer is
//! not final (no answer, 429, 503, 504), sends it again with the same key until it is accepted.
//!
//! Faults: `kill -9` of the worker (restarted after 1 s), `kill -9` of an api replica
//! (restarted after 2 s), a restart of PostgreSQL, a restart of RabbitMQ's node. The last two
//! restart the machine's shared servers: run it alone, with the services up and as root:
//! `cargo build -p api -p worker --bins && cargo run -p tests --bin fault-suite`.
//! `FAULT_LOAD_SECS` (4) is the load before and after each fault.
//!
//! `FAULT_DRIVER=whatsapp` runs the same load and faults through the real driver: the worker
//! is the test build (`worker-wa-test-server`) against the local WhatsApp protocol server
//! (`tests/src/wa_server/`, in this process); the numbers are paired for real by the server's
//! phones, every message is encrypted to its recipient's phone, which decrypts it. "Sent
//! twice" is then a text the phones received under more than one message id, and "connected
//! twice" a device's stream replaced by a second connection of it. It exits 1 when a fault
//! broke a promise: a command or message lost, a message sent twice, a number connected twice,
//! an answer 5xx other than 503/504, or service not back within 10 s; `deploy/local/test` runs
//! it after the tests, when nothing else uses the servers it restarts.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    TestEnv,
    process::{ApiProcess, WorkerProcess, wa_test_worker_binary},
    wa_server::{Seen as ServerSaw, WaServer},
};

const SESSIONS: usize = 32;
/// Of the sessions, these take the messages; the others the commands.
const MESSAGE_SESSIONS: usize = 8;
const CONCURRENCY: usize = 16;
const MESSAGE_CLIENTS: usize = 2;
const MESSAGE_EVERY: Duration = Duration::from_millis(100);
/// A message accepted before the load's end must have left `queued`/`sending` this soon after.
const MESSAGE_SETTLE: Duration = Duration::from_secs(30);
/// The api replicas' sweep grace: a command still pending this long past its deadline is lost.
const GRACE_MS: i64 = 15_000;
/// How often each api replica sweeps for such commands.
const SWEEP_INTERVAL_MS: i64 = 1_000;
/// Service must be back this soon after a fault ends.
const RECOVERY: Duration = Duration::from_secs(10);

/// What the load saw: answers by status (0: no answer, the connection failed), and when the
/// last command was answered 200.
#[derive(Default)]
struct Seen {
    by_status: BTreeMap<u16, usize>,
    last_ok: Option<Instant>,
}

#[derive(Clone)]
struct Load {
    bases: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

impl Seen {
    fn requests(&self) -> usize {
        self.by_status.values().sum()
    }

    fn answers(&self) -> String {
        let answers: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| match s {
                0 => format!("no answer {n}"),
                s => format!("{s}: {n}"),
            })
            .collect();
        answers.join(", ")
    }

    /// Answers 5xx other than 503 and 504.
    fn server_errors(&self) -> usize {
        self.by_status
            .iter()
            .filter(|(s, _)| **s >= 500 && **s != 503 && **s != 504)
            .map(|(_, n)| n)
            .sum()
    }
}

impl Load {
    /// `clients` tasks, each running `client(its load, the task's number)` until the load
    /// stops.
    fn start<F, Fut>(bases: Arc<Mutex<Vec<String>>>, clients: usize, client: F) -> Load
    where
        F: Fn(Load, usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let load = Load {
            bases,
            seen: Arc::default(),
            stop: Arc::default(),
        };
        for i in 0..clients {
            tokio::spawn(client(load.clone(), i));
        }
        load
    }

    fn base(&self, n: usize) -> String {
        let bases = self.bases.lock().expect("bases");
        bases[n % bases.len()].clone()
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// One answer; `ok` is the status that counts as served (for the recovery time).
    fn record(&self, status: u16, ok: u16) {
        let mut seen = self.seen.lock().expect("seen");
        *seen.by_status.entry(status).or_default() += 1;
        if status == ok {
            seen.last_ok = Some(Instant::now());
        }
    }

    /// 16 clients sending `:restart` to the sessions in turn, as fast as they are answered.
    fn commands(
        bases: Arc<Mutex<Vec<String>>>,
        http: reqwest::Client,
        key: String,
        ids: Vec<String>,
    ) -> Load {
        let next = Arc::new(AtomicUsize::new(0));
        let ids = Arc::new(ids);
        Load::start(bases, CONCURRENCY, move |load, _| {
            let (next, http, key, ids) = (next.clone(), http.clone(), key.clone(), ids.clone());
            async move {
                while load.running() {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let id = &ids[n % ids.len()];
                    let status = http
                        .post(format!("{}/api/v1/sessions/{id}:restart", load.base(n)))
                        .bearer_auth(&key)
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16());
                    load.record(status, 200);
                    if status == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }

    /// Message clients: each sends a message every [`MESSAGE_EVERY`] to the sessions in
    /// turn, each with its own idempotency key, sent again (to either replica) until an answer
    /// is final. The keys of accepted messages go to `accepted`.
    fn messages(
        bases: Arc<Mutex<Vec<String>>>,
        http: reqwest::Client,
        key: String,
        ids: Vec<String>,
        accepted: Arc<Mutex<Vec<String>>>,
    ) -> Load {
        let next = Arc::new(AtomicUsize::new(0));
        let ids = Arc::new(ids);
        Load::start(bases, MESSAGE_CLIENTS, move |load, _| {
            let (next, http, key, ids, accepted) = (
                next.clone(),
                http.clone(),
                key.clone(),
                ids.clone(),
                accepted.clone(),
            );
            async move {
                while load.running() {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let id = &ids[n % ids.len()];
                    let body = serde_json::json!({
                        "to": format!("+6281300{n:06}"),
                        "text": format!("fault message {n}"),
                        "idempotencyKey": format!("m{n}"),
                    });
                    for attempt in 0.. {
                        if !load.running() {
                            break;
                        }
                        let status = http
                            .post(format!(
                                "{}/api/v1/sessions/{id}/messages",
                                load.base(n + attempt)
                            ))
                            .bearer_auth(&key)
                            .json(&body)
                            .send()
                            .await
                            .map_or(0, |r| r.status().as_u16());
                        load.record(status, 202);
                        match status {
                            202 => {
                                accepted.lock().expect("accepted").push(format!("m{n}"));
                                break;
                            }
                            0 | 429 | 503 | 504 => {
                                tokio::time::sleep(Duration::from_millis(100)).await
                            }
                            _ => break,
                        }
                    }
                    tokio::time::sleep(MESSAGE_EVERY).await;
                }
            }
        })
    }

    fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().expect("seen"))
    }
}

fn shell(script: &str) {
    let ok = std::process::Command::new("sh")
        .args(["-c", script])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`{script}` failed");
}

/// Commands created in [`since`, now) by status, once none of them is pending short of its
/// deadline plus the grace plus two sweeps: those still pending then are lost, and are
/// printed. (Without the two sweeps, a command just past its grace would count as lost in the
/// moment before the next sweep ends it.) The load goes on meanwhile: the commands it makes
/// after this call are not counted, or a broker slow to come back would have commands in
/// flight, short of their deadline, at any moment, and they would be counted lost.
async fn settle(env: &TestEnv, since: i64) -> BTreeMap<String, i64> {
    let until = shared::db::now_ms();
    // Enough for every counted command to end or pass its grace.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let client = env.db.get().await.expect("db");
        let rows = client
            .query(
                "SELECT status, count(*), count(*) FILTER (WHERE status = 'pending' \
                 AND deadline_at + $3 > $4) FROM commands \
                 WHERE created_at >= $1 AND created_at < $2 GROUP BY status",
                &[
                    &since,
                    &until,
                    &(GRACE_MS + 2 * SWEEP_INTERVAL_MS),
                    &shared::db::now_ms(),
                ],
            )
            .await
            .expect("commands");
        let waiting: i64 = rows.iter().map(|r| r.get::<_, i64>(2)).sum();
        if waiting == 0 || Instant::now() > deadline {
            let lost = client
                .query(
                    "SELECT id, kind, created_at, deadline_at FROM commands \
                     WHERE created_at >= $1 AND created_at < $2 AND status = 'pending'",
                    &[&since, &until],
                )
                .await
                .expect("commands");
            for c in lost {
                let (id, kind, created, deadline): (String, String, i64, i64) =
                    (c.get(0), c.get(1), c.get(2), c.get(3));
                eprintln!(
                    "lost: command {id} ({kind}), created {created}, deadline {deadline}, \
                     now {}",
                    shared::db::now_ms()
                );
            }
            return rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The accepted messages of `keys` by status, once none is `queued` or `sending` (or
/// [`MESSAGE_SETTLE`] ran out), with `missing` for keys that have no message at all.
async fn settle_messages(env: &TestEnv, keys: &[String]) -> BTreeMap<String, i64> {
    let deadline = Instant::now() + MESSAGE_SETTLE;
    loop {
        let client = env.db.get().await.expect("db");
        let mut by_status: BTreeMap<String, i64> = client
            .query(
                "SELECT status, count(*) FROM messages WHERE idempotency_key = ANY($1) \
                 GROUP BY status",
                &[&keys],
            )
            .await
            .expect("messages")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let found: i64 = by_status.values().sum();
        if found < keys.len() as i64 {
            by_status.insert("missing".into(), keys.len() as i64 - found);
        }
        let waiting = ["queued", "sending"]
            .iter()
            .any(|s| by_status.contains_key(*s));
        if !waiting || Instant::now() > deadline {
            return by_status;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Which WhatsApp the worker talks to.
enum WhatsApp {
    /// The simulated driver, its server side in Postgres.
    Sim,
    /// The real driver against the local protocol server.
    Real(WaServer),
}

const KEYS: &str = "fault:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

impl WhatsApp {
    fn worker(&self, env: &TestEnv, gw: &str) -> WorkerProcess {
        match self {
            WhatsApp::Sim => {
                WorkerProcess::spawn(env, gw, &[("SIM_CONNECT_DELAY_MS", "20".to_owned())])
            }
            WhatsApp::Real(server) => WorkerProcess::spawn_binary(
                &wa_test_worker_binary(),
                env,
                gw,
                &[
                    ("WA_DRIVER", "whatsapp".to_owned()),
                    ("CREDENTIALS_KEYS", KEYS.to_owned()),
                    ("WA_WS_URL", server.url.clone()),
                    ("WA_CONNECT_TIMEOUT_MS", "10000".to_owned()),
                ],
            ),
        }
    }

    /// `n` numbers paired on `gw`, the `settings` statement run on their rows, and the
    /// worker of `gw` started on them: the worker and their session ids.
    async fn start(
        &self,
        env: &TestEnv,
        gw: &str,
        n: usize,
        settings: &str,
    ) -> (WorkerProcess, Vec<String>) {
        let ids = match self {
            WhatsApp::Sim => env.paired_sessions("org_fault", gw, n, 0).await,
            WhatsApp::Real(server) => {
                // Paired by a worker of their own, which then goes: the load's worker reads
                // the settings when it takes the numbers over.
                let _pairing = self.worker(env, gw);
                env.wait_gateway_live(gw).await;
                Self::pair(server, env, gw, n).await
            }
        };
        env.db
            .get()
            .await
            .expect("db")
            .execute(settings, &[])
            .await
            .expect("settings");
        (self.worker(env, gw), ids)
    }

    async fn pair(server: &WaServer, env: &TestEnv, gw: &str, n: usize) -> Vec<String> {
        let api = env.start_api(|_| {}).await;
        let key = env.api_key("org_fault", &["read", "manage"]).await;
        let ids = tests::bench::new_sessions(&api, &key, gw, n).await;
        server
            .link_sessions(&api, &key, &ids, n, Duration::from_secs(120), |i| {
                format!("6281200{i:06}")
            })
            .await;
        ids
    }

    /// Messages delivered more than once (the load's texts are unique): by the simulated
    /// WhatsApp; or texts the protocol server's phones decrypted under more than one id.
    async fn sent_twice(&self, env: &TestEnv) -> i64 {
        let WhatsApp::Real(server) = self else {
            let client = env.db.get().await.expect("db");
            return client
                .query_one(
                    "SELECT count(*) FROM (SELECT text FROM sim_messages GROUP BY text \
                     HAVING count(*) > 1) AS doubled",
                    &[],
                )
                .await
                .expect("sim_messages")
                .get(0);
        };
        let mut ids_by_text: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for r in server.received() {
            ids_by_text
                .entry(r.text.unwrap_or_default())
                .or_default()
                .insert(r.id);
        }
        ids_by_text.values().filter(|ids| ids.len() > 1).count() as i64
    }

    /// Numbers connected from two places at once so far.
    async fn connected_twice(&self, env: &TestEnv) -> usize {
        match self {
            WhatsApp::Sim => env.sim_conflicts().await.len(),
            WhatsApp::Real(server) => server
                .seen()
                .iter()
                .filter(|s| matches!(s, ServerSaw::Replaced(_)))
                .count(),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let steady = Duration::from_secs(
        std::env::var("FAULT_LOAD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4),
    );
    let env = TestEnv::new().await;
    let gw = env.gateway_id("fault");
    let whatsapp = match std::env::var("FAULT_DRIVER").as_deref() {
        Ok("whatsapp") => WhatsApp::Real(WaServer::start().await),
        _ => WhatsApp::Sim,
    };
    // Limits high enough for the message load (20 a second over 8 sessions), and no "typing…"
    // (see above).
    let (mut worker, mut ids) = whatsapp
        .start(
            &env,
            &gw,
            SESSIONS,
            "UPDATE sessions SET rate_per_min = 1000, rate_per_hour = 60000, \
             presence_typing = false",
        )
        .await;
    let message_ids = ids.split_off(SESSIONS - MESSAGE_SESSIONS);
    let api_env = [
        ("COMMAND_SWEEP_GRACE_MS", GRACE_MS.to_string()),
        ("COMMAND_SWEEP_INTERVAL_MS", SWEEP_INTERVAL_MS.to_string()),
    ];
    let mut apis = [
        ApiProcess::spawn(&env, &api_env).await,
        ApiProcess::spawn(&env, &api_env).await,
    ];
    let key = env.api_key("org_fault", &["read", "manage"]).await;
    let bases = Arc::new(Mutex::new(apis.iter().map(|a| a.base.clone()).collect()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let load = Load::commands(bases.clone(), http.clone(), key.clone(), ids);
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let messages = Load::messages(bases.clone(), http, key, message_ids, accepted.clone());
    tokio::time::sleep(steady).await;

    println!(
        "| fault | requests | answers by status | lost | messages: requests | answers | \
         accepted, by outcome | lost | sent twice | connected twice | recovery |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    // FAULTS=worker,api picks some (by the fault's first word): those two leave the
    // machine's shared servers alone, so they can run beside other work.
    let only = std::env::var("FAULTS").ok();
    let faults = [
        "worker kill -9",
        "api kill -9",
        "postgres restart",
        "rabbitmq restart",
    ]
    .into_iter()
    .filter(|f| {
        only.as_deref().is_none_or(|only| {
            only.split(',')
                .any(|o| f.split(' ').next() == Some(o.trim()))
        })
    });
    let mut broken_promises = Vec::new();
    for fault in faults {
        if fault == "postgres restart" {
            // A restart first finishes the checkpoint under way, which after a whole test run
            // can take minutes; taken now, before the fault's window, the restart is the
            // restart alone.
            shell("runuser -u postgres -- psql -qXc CHECKPOINT");
        }
        let _ = load.take();
        let _ = messages.take();
        accepted.lock().expect("accepted").clear();
        let conflicts_before = whatsapp.connected_twice(&env).await;
        let doubled_before = whatsapp.sent_twice(&env).await;
        let since = shared::db::now_ms();
        tokio::time::sleep(steady).await;
        match fault {
            "worker kill -9" => {
                worker.kill_9();
                tokio::time::sleep(Duration::from_secs(1)).await;
                worker = whatsapp.worker(&env, &gw);
            }
            "api kill -9" => {
                apis[0].kill_9();
                tokio::time::sleep(Duration::from_secs(2)).await;
                apis[0] = ApiProcess::spawn(&env, &api_env).await;
                bases.lock().expect("bases")[0] = apis[0].base.clone();
            }
            // Should the restart fail, the server is started again before the suite stops.
            "postgres restart" => shell(
                "v=$(ls /etc/postgresql | sort -n | tail -1); \
                 pg_ctlcluster $v main restart -- -t 300 || { pg_ctlcluster $v main start; false; }",
            ),
            _ => shell("rabbitmqctl -q stop_app && sleep 1 && rabbitmqctl -q start_app"),
        }
        let ended = Instant::now();
        // Recovered at the first command answered 200 after the fault ended.
        let recovered = loop {
            let last_ok = load.seen.lock().expect("seen").last_ok;
            if let Some(t) = last_ok
                && t > ended
            {
                break Some(t - ended);
            }
            if ended.elapsed() > Duration::from_secs(60) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let recovery = recovered.map_or("not within 60 s".to_owned(), |d| {
            format!("{:.1} s", d.as_secs_f64())
        });
        tokio::time::sleep(steady).await;
        let seen = load.take();
        let seen_messages = messages.take();
        let keys = std::mem::take(&mut *accepted.lock().expect("accepted"));
        let commands = settle(&env, since).await;
        let outcomes = settle_messages(&env, &keys).await;
        let lost = commands.get("pending").copied().unwrap_or(0);
        let messages_lost: i64 = ["queued", "sending", "missing"]
            .iter()
            .filter_map(|s| outcomes.get(*s))
            .sum();
        let doubled = whatsapp.sent_twice(&env).await - doubled_before;
        let twice = whatsapp.connected_twice(&env).await - conflicts_before;
        let outcomes: Vec<String> = outcomes.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        println!(
            "| {fault} | {} | {} | {lost} | {} | {} | {} {} | {messages_lost} | {doubled} | \
             {twice} | {recovery} |",
            seen.requests(),
            seen.answers(),
            seen_messages.requests(),
            seen_messages.answers(),
            keys.len(),
            outcomes.join(", "),
        );
        let server_errors = seen.server_errors() + seen_messages.server_errors();
        for (broken, what) in [
            (lost > 0, format!("{lost} commands lost")),
            (messages_lost > 0, format!("{messages_lost} messages lost")),
            (doubled > 0, format!("{doubled} messages sent twice")),
            (twice > 0, format!("{twice} numbers connected twice")),
            (
                server_errors > 0,
                format!("{server_errors} server errors (not 503/504)"),
            ),
            (
                recovered.is_none_or(|d| d > RECOVERY),
                format!("recovery {recovery}, over {} s", RECOVERY.as_secs()),
            ),
        ] {
            if broken {
                broken_promises.push(format!("{fault}: {what}"));
            }
        }
    }
    load.stop.store(true, Ordering::Relaxed);
    messages.stop.store(true, Ordering::Relaxed);
    // The worker and api processes end here, when dropped; `process::exit` would leave them
    // running, holding the test database.
    drop((worker, apis));
    if broken_promises.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("broken promises:\n  {}", broken_promises.join("\n  "));
        ExitCode::FAILURE
    }
}
