//! The fault suite: a steady load of commands through two api replicas to one worker, while
//! faults are injected one at a time, each then checked from Postgres and the simulator's
//! server-side record. One table row per fault: requests, answers by status, commands lost
//! (still `pending` past their deadline plus the sweep's grace), numbers connected twice, and
//! the time from the fault's end to the first answered command.
//!
//! Faults: `kill -9` of the worker (restarted after 1 s), `kill -9` of an api replica
//! (restarted after 2 s), a restart of PostgreSQL, a restart of RabbitMQ's node. The last two
//! restart the machine's shared servers: run it alone, with the services up and as root:
//! `cargo build -p api -p worker --bins && cargo run -p tests --bin fault-suite`.
//! `FAULT_LOAD_SECS` (4) is the load before and after each fault. It exits 1 when a fault
//! broke a promise: a command lost, a number connected twice, an answer 5xx other than
//! 503/504, or service not back within 10 s; `deploy/local/test` runs it after the tests, when
//! nothing else uses the servers it restarts.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    TestEnv,
    process::{ApiProcess, WorkerProcess},
};

const SESSIONS: usize = 32;
const CONCURRENCY: usize = 16;
/// The api replicas' sweep grace: a command still pending this long past its deadline is lost.
const GRACE_MS: i64 = 15_000;
/// Service must be back this soon after a fault ends.
const RECOVERY: Duration = Duration::from_secs(10);

/// What the load saw: answers by status (0: no answer, the connection failed), and when the
/// last command was answered 200.
#[derive(Default)]
struct Seen {
    by_status: BTreeMap<u16, usize>,
    last_ok: Option<Instant>,
}

struct Load {
    bases: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(bases: Vec<String>, key: String, ids: Arc<Vec<String>>) -> Load {
        let load = Load {
            bases: Arc::new(Mutex::new(bases)),
            seen: Arc::default(),
            stop: Arc::default(),
        };
        let next = Arc::new(AtomicUsize::new(0));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        for _ in 0..CONCURRENCY {
            let (bases, seen, stop, next, http, key, ids) = (
                load.bases.clone(),
                load.seen.clone(),
                load.stop.clone(),
                next.clone(),
                http.clone(),
                key.clone(),
                ids.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let base = {
                        let bases = bases.lock().expect("bases");
                        bases[n % bases.len()].clone()
                    };
                    let id = &ids[n % ids.len()];
                    let status = match http
                        .post(format!("{base}/api/v1/sessions/{id}:restart"))
                        .bearer_auth(&key)
                        .send()
                        .await
                    {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    {
                        let mut seen = seen.lock().expect("seen");
                        *seen.by_status.entry(status).or_default() += 1;
                        if status == 200 {
                            seen.last_ok = Some(Instant::now());
                        }
                    }
                    if status == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
        }
        load
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

/// Commands created since `since` by status, once none is pending short of its deadline plus
/// the grace (or the wait ran out): those still pending then are lost.
async fn settle(env: &TestEnv, since: i64) -> BTreeMap<String, i64> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let client = env.db.get().await.expect("db");
        let rows = client
            .query(
                "SELECT status, count(*), count(*) FILTER (WHERE status = 'pending' \
                 AND deadline_at + $2 > $3) FROM commands WHERE created_at >= $1 GROUP BY status",
                &[&since, &GRACE_MS, &shared::db::now_ms()],
            )
            .await
            .expect("commands");
        let waiting: i64 = rows.iter().map(|r| r.get::<_, i64>(2)).sum();
        if waiting == 0 || Instant::now() > deadline {
            return rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() {
    let steady = Duration::from_secs(
        std::env::var("FAULT_LOAD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4),
    );
    let env = TestEnv::new().await;
    let gw = env.gateway_id("fault");
    let ids = Arc::new(env.paired_sessions("org_fault", &gw, SESSIONS, 0).await);
    let worker_env = [("SIM_CONNECT_DELAY_MS", "20".to_owned())];
    let api_env = [
        ("COMMAND_SWEEP_GRACE_MS", GRACE_MS.to_string()),
        ("COMMAND_SWEEP_INTERVAL_MS", "1000".to_owned()),
    ];
    let mut worker = WorkerProcess::spawn(&env, &gw, &worker_env);
    let mut apis = [
        ApiProcess::spawn(&env, &api_env).await,
        ApiProcess::spawn(&env, &api_env).await,
    ];
    let key = env.api_key("org_fault", &["read", "manage"]).await;
    let load = Load::start(
        apis.iter().map(|a| a.base.clone()).collect(),
        key,
        ids.clone(),
    );
    tokio::time::sleep(steady).await;

    println!(
        "| fault | requests | answers by status | lost | connected twice | recovery |\n\
         |---|---|---|---|---|---|"
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
        let _ = load.take();
        let conflicts_before = env.sim_conflicts().await.len();
        let since = shared::db::now_ms();
        tokio::time::sleep(steady).await;
        match fault {
            "worker kill -9" => {
                worker.kill_9();
                tokio::time::sleep(Duration::from_secs(1)).await;
                worker = WorkerProcess::spawn(&env, &gw, &worker_env);
            }
            "api kill -9" => {
                apis[0].kill_9();
                tokio::time::sleep(Duration::from_secs(2)).await;
                apis[0] = ApiProcess::spawn(&env, &api_env).await;
                load.bases.lock().expect("bases")[0] = apis[0].base.clone();
            }
            "postgres restart" => {
                shell("pg_ctlcluster $(ls /etc/postgresql | sort -n | tail -1) main restart")
            }
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
        let commands = settle(&env, since).await;
        let lost = commands.get("pending").copied().unwrap_or(0);
        let twice = env.sim_conflicts().await.len() - conflicts_before;
        let requests: usize = seen.by_status.values().sum();
        let answers: Vec<String> = seen
            .by_status
            .iter()
            .map(|(s, n)| match s {
                0 => format!("no answer {n}"),
                s => format!("{s}: {n}"),
            })
            .collect();
        println!(
            "| {fault} | {requests} | {} | {lost} | {twice} | {recovery} |",
            answers.join(", ")
        );
        let server_errors: usize = seen
            .by_status
            .iter()
            .filter(|(s, _)| **s >= 500 && **s != 503 && **s != 504)
            .map(|(_, n)| n)
            .sum();
        for (broken, what) in [
            (lost > 0, format!("{lost} commands lost")),
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
    if !broken_promises.is_empty() {
        eprintln!("broken promises:\n  {}", broken_promises.join("\n  "));
        std::process::exit(1);
    }
}
