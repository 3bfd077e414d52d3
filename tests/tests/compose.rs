//! The compose fleet (`deploy/compose`), built from this run's binaries and started for real
//! with the README's command: a simulated number paired and logged out through the api's
//! published port, then the RabbitMQ node that leads the gateway's command queue stopped while
//! commands go on, and started again; a worker cut off from the network; and in region `lab`,
//! a number on the real driver against the local WhatsApp protocol server, restarted in place
//! and drained to its peer, talking both ways before and after; and region `sg` at scale:
//! a rolling restart of 1,000 numbers, a scale-up to a third worker and its scale-down.
//!
//! The only test of its binary, so cargo runs it on its own (test binaries run one after the
//! other): it starts a dozen containers, which would starve the e2e tests of the two cores.
//! Without a Docker engine it says so and passes; CI has one.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The fleet of this test: its own compose project, ports and settings; torn down on drop.
struct Fleet {
    repo: PathBuf,
    state: PathBuf,
    api: String,
    /// The protocol server's simulated phones (region lab).
    phones: String,
    project: String,
}

impl Fleet {
    fn up() -> Fleet {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace")
            .to_path_buf();
        let state = std::env::temp_dir().join(format!("gw-compose-{}", std::process::id()));
        let (api_port, phones_port) = (free_port(), free_port());
        let fleet = Fleet {
            api: format!("http://127.0.0.1:{api_port}"),
            phones: format!("http://127.0.0.1:{phones_port}"),
            repo,
            state,
            project: format!("gwtest{}", std::process::id()),
        };
        let started = Instant::now();
        let out = Command::new(fleet.repo.join("deploy/compose/up"))
            .env("STATE_DIR", &fleet.state)
            .env("COMPOSE_PROJECT_NAME", &fleet.project)
            .env("API_PORT", api_port.to_string())
            .env("PROMETHEUS_PORT", free_port().to_string())
            .env("WA_CONTROL_PORT", phones_port.to_string())
            // The binaries this run built (the suite's build), not a second, release build.
            .env("PROFILE", "debug")
            .env("CARGO_BUILD", "0")
            .env("TAG", "test")
            .output()
            .expect("deploy/compose/up runs");
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "deploy/compose/up failed:\n{log}");
        eprintln!(
            "[compose] images built and fleet up in {:.0} s\n{log}",
            started.elapsed().as_secs_f64()
        );
        fleet
    }

    /// Runs `deploy/compose/<name> args…` for this fleet: its stdout, or what it said.
    fn script(&self, name: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(self.repo.join("deploy/compose").join(name))
            .args(args)
            .env("STATE_DIR", &self.state)
            .output()
            .expect("the compose script runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "deploy/compose/{name} {args:?}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `deploy/compose/compose args…` started, not waited for.
    fn compose_in_background(&self, args: &[&str]) -> std::process::Child {
        Command::new(self.repo.join("deploy/compose/compose"))
            .args(args)
            .env("STATE_DIR", &self.state)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the compose script runs")
    }

    fn compose(&self, args: &[&str]) -> String {
        self.script("compose", args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        self.script("ctl", args)
    }

    /// The texts the simulated phone of `number` received from `from` (region lab).
    async fn phone_received(&self, number: &str, from: &str) -> Vec<String> {
        let phone: Value = reqwest::get(format!("{}/phones/{number}", self.phones))
            .await
            .expect("the simulated phones answer")
            .json()
            .await
            .expect("json");
        phone["received"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["from"] == from)
            .filter_map(|r| r["text"].as_str().map(str::to_owned))
            .collect()
    }

    /// `docker network disconnect|connect` of a service's container and the fleet's network.
    fn network(&self, verb: &str, service: &str) {
        let container = format!("{}_{service}_1", self.project);
        let network = format!("{}_fleet", self.project);
        let ok = Command::new("docker")
            .args(["network", verb, &network, &container])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "docker network {verb} {network} {container}");
    }

    /// `migrate` (`gatewayctl migrate`) ended before any api or worker container started:
    /// compose's `service_completed_successfully` is how a new version's processes meet a
    /// schema they need (and they refuse an older one).
    fn migrated_before_the_fleet_started(&self) {
        let state = |service: &str, field: &str| {
            let id = self.compose(&["ps", "-a", "-q", service]);
            let out = Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    &format!("{{{{.State.{field}}}}}"),
                    id.trim(),
                ])
                .output()
                .expect("docker inspect");
            // RFC 3339 in UTC, its fraction's trailing zeros cut: padded back to 9 digits,
            // so the pair orders as the times do.
            let at = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let (seconds, fraction) = at.split_once('.').unwrap_or((&at, "0Z"));
            let fraction = fraction.trim_end_matches('Z');
            (seconds.to_owned(), format!("{fraction:0<9}"))
        };
        let migrated = state("migrate", "FinishedAt");
        assert!(
            migrated.0.starts_with("20"),
            "migrate finished: {migrated:?}"
        );
        for service in [
            "api-1",
            "api-2",
            "worker-sg-1",
            "worker-sg-2",
            "worker-eu-1",
        ] {
            let started = state(service, "StartedAt");
            assert!(
                started > migrated,
                "{service} started {started:?}, before migrate finished {migrated:?}"
            );
        }
    }

    /// No password or cookie ships with the repository: the broker and the database refuse
    /// `gateway:gateway`, and take the fleet's own passwords, which `up` made.
    fn refuses_shared_defaults(&self) {
        let rabbit = |password: &str| {
            self.script(
                "compose",
                &[
                    "exec",
                    "-T",
                    "rabbitmq-1",
                    "rabbitmqctl",
                    "-q",
                    "authenticate_user",
                    "gateway",
                    password,
                ],
            )
        };
        let psql = |user: &str, password: &str, sql: &str| {
            self.script(
                "compose",
                &[
                    "exec",
                    "-T",
                    "postgres",
                    "psql",
                    &format!("postgresql://{user}:{password}@127.0.0.1:5432/gateway"),
                    "-tAc",
                    sql,
                ],
            )
        };
        let postgres = |password: &str| psql("gateway", password, "SELECT 1");
        assert!(
            rabbit("gateway").is_err(),
            "the broker takes gateway:gateway"
        );
        assert!(
            postgres("gateway").is_err(),
            "Postgres takes gateway:gateway"
        );
        let (rabbit_password, pg_password) = (
            self.setting("RABBITMQ_PASSWORD"),
            self.setting("POSTGRES_PASSWORD"),
        );
        assert!(
            rabbit_password.len() >= 24 && pg_password.len() >= 24,
            "the fleet's passwords are its own and long"
        );
        rabbit(&rabbit_password).expect("the broker takes the fleet's password");
        postgres(&pg_password).expect("Postgres takes the fleet's password");
        assert_ne!(self.setting("ERLANG_COOKIE"), "gateway-fleet-cookie");
        // The api's role reads sessions, not the WhatsApp key store.
        let api_password = self.setting("POSTGRES_API_PASSWORD");
        psql(
            "gateway_api",
            &api_password,
            "SELECT count(*) FROM sessions",
        )
        .expect("the api's role reads sessions");
        let denied = psql(
            "gateway_api",
            &api_password,
            "SELECT count(*) FROM wa_devices",
        )
        .expect_err("the api's role reads the device keys");
        assert!(denied.contains("permission denied"), "{denied}");
        eprintln!(
            "[compose] gateway:gateway refused by the broker and Postgres; the fleet's own \
             passwords taken; the api's role cannot read wa_devices"
        );
    }

    /// One of the settings `up` wrote for the fleet (`NAME=value` in its env file).
    fn setting(&self, name: &str) -> String {
        let env = std::fs::read_to_string(self.state.join("env")).expect("the fleet's settings");
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {env}"))
            .to_string()
    }

    /// TLS on every hop: Postgres refuses a connection without it, the broker has no plain
    /// listener, and every network connection the fleet's processes hold is encrypted.
    fn encrypted_on_every_hop(&self) {
        let password = self.setting("POSTGRES_PASSWORD");
        let plain = self
            .script(
                "compose",
                &[
                    "exec",
                    "-T",
                    "postgres",
                    "psql",
                    &format!(
                        "postgresql://gateway:{password}@127.0.0.1:5432/gateway?sslmode=disable"
                    ),
                    "-tAc",
                    "SELECT 1",
                ],
            )
            .expect_err("Postgres takes a connection without TLS");
        assert!(plain.contains("no encryption"), "{plain}");
        // Connections over the network (the test's own psql comes over the local socket).
        let over_network = "FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.client_addr IS NOT NULL AND a.backend_type = 'client backend'";
        let encrypted = self.count(&format!("SELECT count(*) {over_network} AND s.ssl"));
        let plain = self.count(&format!("SELECT count(*) {over_network} AND NOT s.ssl"));
        assert!(
            encrypted >= 5 && plain == 0,
            "{encrypted} encrypted, {plain} plain"
        );

        let listeners = self.compose(&[
            "exec",
            "-T",
            "rabbitmq-1",
            "rabbitmq-diagnostics",
            "-q",
            "listeners",
        ]);
        assert!(
            listeners.contains("amqp/ssl") && !listeners.contains("protocol: amqp,"),
            "{listeners}"
        );
        let connections = self.compose(&[
            "exec",
            "-T",
            "rabbitmq-1",
            "rabbitmqctl",
            "-q",
            "list_connections",
            "ssl",
            "name",
        ]);
        // Below the header (`ssl name`), one line a connection: `true|false <peer> -> <node>`.
        let all: Vec<&str> = connections
            .lines()
            .filter(|l| l.starts_with("true") || l.starts_with("false"))
            .collect();
        assert!(
            all.len() >= 5 && all.iter().all(|l| l.starts_with("true")),
            "{connections}"
        );
        eprintln!(
            "[compose] TLS: Postgres refuses plain connections; {encrypted} database and {} \
             broker connections, all encrypted; the broker listens for AMQPS only",
            all.len()
        );
    }

    /// One number from the fleet's Postgres.
    fn count(&self, sql: &str) -> i64 {
        let out = self.sql(sql);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql}: {out}"))
    }

    /// No number was ever connected from two workers at once (the simulated WhatsApp's
    /// `sim_conflicts`). Otherwise the failure shows each conflict and what every worker
    /// logged about its number and about its simulated server's process.
    fn no_conflicts(&self, when: &str) {
        let rows = self.sql(
            "SELECT device, replaced_process, replaced_connection, by_process, by_connection, \
             at FROM sim_conflicts ORDER BY id",
        );
        if rows.trim().is_empty() {
            return;
        }
        let mut needles: Vec<&str> = vec!["the simulated server knows this worker"];
        needles.extend(rows.lines().filter_map(|r| r.split('|').next()));
        let mut logs = String::new();
        for worker in ["worker-sg-1", "worker-sg-2", "worker-sg-3", "worker-eu-1"] {
            let out = self
                .script("compose", &["logs", "--no-color", worker])
                .unwrap_or_else(|e| e);
            for line in out
                .lines()
                .filter(|l| needles.iter().any(|n| l.contains(n)))
            {
                logs.push_str(line);
                logs.push('\n');
            }
        }
        panic!(
            "{when}: a number was connected from two workers at once \
             (device|replaced process|connection|by process|connection|at):\n{rows}\n{logs}"
        );
    }

    /// A statement on the fleet's Postgres (over its local socket): what psql printed.
    fn sql(&self, sql: &str) -> String {
        self.compose(&[
            "exec", "-T", "postgres", "psql", "-U", "gateway", "-d", "gateway", "-tAc", sql,
        ])
    }

    /// Each session of `org`: its gateway.
    fn placement(&self, org: &str) -> BTreeMap<String, String> {
        self.sql(&format!(
            "SELECT id || '|' || gateway_id FROM sessions WHERE organization_id = '{org}'"
        ))
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(id, gw)| (id.to_string(), gw.to_string()))
        .collect()
    }

    /// Sessions `from..to` of `org`, paired (simulated driver) and running, alternately on
    /// gw-sg-1 and gw-sg-2, as their workers left them; their workers adopt them. Their ids
    /// are ULIDs (the API reads no other), of a time no real one has.
    fn add_paired(&self, org: &str, from: u32, to: u32) {
        self.sql(&format!(
            "INSERT INTO sessions (id, organization_id, label, gateway_id, phone_number, wa_jid, \
               wa_lid, status, desired_state, created_by_user_id, created_at, updated_at, \
               device_credentials) \
             SELECT '7ZZZZZZZZZ' || lpad(i::text, 16, '0'), '{org}', 'paired', \
               CASE WHEN i % 2 = 0 THEN 'gw-sg-1' ELSE 'gw-sg-2' END, p, p || '@s.whatsapp.net', \
               '1' || p || '@lid', 'working', 'running', 'test', t, t, \
               jsonb_build_object('driver', 'sim', 'phoneNumber', p) \
             FROM generate_series({from}, {to} - 1) AS i, \
               LATERAL (SELECT '6287' || lpad(i::text, 7, '0') AS p, \
                 (extract(epoch FROM now()) * 1000)::bigint AS t) x"
        ));
    }

    /// The database's clock, in epoch ms (what `last_connected_at` is written in).
    fn now_ms(&self) -> i64 {
        self.count("SELECT (extract(epoch FROM now()) * 1000)::bigint")
    }

    /// This gateway's command queue as broker node `node` lists it (members, leader).
    fn command_queue(&self, node: &str, gateway: &str) -> Value {
        let listed = self.compose(&[
            "exec",
            "-T",
            node,
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "members",
            "leader",
            "--formatter",
            "json",
        ]);
        let queues: Vec<Value> = serde_json::from_str(&listed).expect("list_queues is JSON");
        queues
            .into_iter()
            .find(|q| q["name"] == format!("gw.commands.{gateway}"))
            .unwrap_or_else(|| panic!("the definitions declare gw.commands.{gateway}: {listed}"))
    }
}

/// A queue's leader as its compose service name (`rabbit@rabbitmq-2` → `rabbitmq-2`).
fn leader(queue: &Value) -> String {
    let leader = queue["leader"].as_str().unwrap_or_default();
    leader.trim_start_matches("rabbit@").to_string()
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new(self.repo.join("deploy/compose/compose"))
                .args(["logs", "--tail", "30"])
                .env("STATE_DIR", &self.state)
                .status();
        }
        let _ = Command::new(self.repo.join("deploy/compose/down"))
            .arg("--wipe")
            .env("STATE_DIR", &self.state)
            .status();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn docker_available() -> bool {
    Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("docker-compose")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// The api through the fleet's one address, counting every answer by status.
struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    answers: BTreeMap<u16, u32>,
}

impl Client {
    /// A client with a new API key of `org` (read, manage).
    fn new(fleet: &Fleet, org: &str) -> Client {
        let key = fleet
            .ctl(&[
                "apikey",
                "create",
                "--org",
                org,
                "--capabilities",
                "read,manage",
            ])
            .lines()
            .last()
            .expect("the key")
            .trim()
            .to_string();
        Client {
            http: reqwest::Client::new(),
            base: fleet.api.clone(),
            key,
            answers: BTreeMap::new(),
        }
    }

    /// One request, retried while the fleet answers 503/504 (a fault that lasts), for at most
    /// 60 s; any 5xx but those fails the test.
    async fn call(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&self.key);
            if let Some(body) = &body {
                req = req.json(body);
            }
            let (status, value) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    (status, resp.json::<Value>().await.unwrap_or(Value::Null))
                }
                // The load balancer itself is never stopped: a failed request is a failure.
                Err(e) => panic!("{method} {path}: {e}"),
            };
            *self.answers.entry(status).or_default() += 1;
            assert!(
                status < 500 || status == 503 || status == 504,
                "{method} {path} answered {status}: {value}"
            );
            if (status == 503 || status == 504) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            return (status, value);
        }
    }

    /// Create a session on `gateway`, show its QR code, scan it with the simulated phone, see it
    /// working, log it out and delete it: the README's walk-through.
    async fn pair_and_logout(&mut self, fleet: &Fleet, gateway: &str, phone: &str) {
        let id = self.pair(fleet, gateway, phone).await;
        self.logout_and_delete(&id).await;
    }

    /// A new session on `gateway`, paired with `phone` and working: its id.
    async fn pair(&mut self, fleet: &Fleet, gateway: &str, phone: &str) -> String {
        let (status, session) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/sessions",
                Some(json!({"label": "compose", "gatewayId": gateway})),
            )
            .await;
        assert_eq!(status, 201, "{session}");
        let id = session["id"].as_str().expect("an id").to_string();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, qr) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/sessions/{id}/qr"),
                    None,
                )
                .await;
            if status == 200 {
                assert!(qr["qr"].as_str().is_some_and(|q| !q.is_empty()), "{qr}");
                break;
            }
            assert_eq!(status, 404, "{qr}");
            assert!(Instant::now() < until, "no QR code for {id} within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // gatewayctl sends it over the bus too: while a broker node is lost it may fail.
        let until = Instant::now() + Duration::from_secs(60);
        while let Err(e) = fleet.try_ctl(&["sim", "scan", "--session", &id, "--phone", phone]) {
            assert!(Instant::now() < until, "sim scan kept failing: {e}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let s = self
            .session_when(&id, Duration::from_secs(60), |s| s["status"] == "working")
            .await;
        assert_eq!(s["waJid"], format!("{phone}@s.whatsapp.net"));
        id
    }

    /// The session, once `pred` holds for it (within `limit`).
    async fn session_when(
        &mut self,
        id: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let until = Instant::now() + limit;
        loop {
            let (_, s) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/sessions/{id}"),
                    None,
                )
                .await;
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < until,
                "{id} not as expected within {limit:?}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Sends `text` to `to` from the session: 202.
    async fn send(&mut self, id: &str, to: &str, text: &str) {
        let (status, out) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/sessions/{id}/messages"),
                Some(json!({"to": to, "text": text})),
            )
            .await;
        assert_eq!(status, 202, "{out}");
    }

    async fn logout_and_delete(&mut self, id: &str) {
        let (status, out) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/sessions/{id}:logout"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["status"], "logged_out", "{out}");
        let (status, out) = self
            .call(
                reqwest::Method::DELETE,
                &format!("/api/v1/sessions/{id}"),
                None,
            )
            .await;
        assert_eq!(status, 204, "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_fleet_pairs_a_number_and_survives_a_broker_node_stopping() {
    if !docker_available() {
        eprintln!(
            "SKIPPED: no Docker engine or docker-compose here (`docker info` failed); CI has one"
        );
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fleet = Fleet::up();
    fleet.migrated_before_the_fleet_started();
    fleet.refuses_shared_defaults();
    fleet.encrypted_on_every_hop();
    let mut api = Client::new(&fleet, "org_compose");

    // Through the load balancer to both replicas, to a worker of each region.
    api.pair_and_logout(&fleet, "gw-sg-1", "6281200000001")
        .await;
    api.pair_and_logout(&fleet, "gw-eu-1", "6281200000002")
        .await;
    eprintln!("[compose] healthy fleet: answers {:?}", api.answers);
    // A file through the load balancer, larger than nginx's default body (1 MB): streamed
    // to the api, which answers in its own envelope.
    let mut file = b"%PDF-1.7\n".to_vec();
    file.resize(3 << 20, b'x');
    let uploaded = api
        .http
        .post(format!("{}/api/v1/media", api.base))
        .bearer_auth(&api.key)
        .header("content-type", "application/pdf")
        .body(file)
        .send()
        .await
        .expect("the upload");
    assert_eq!(uploaded.status(), 201, "{:?}", uploaded.text().await);
    let uploaded: Value = uploaded.json().await.expect("the file's record");
    let file = uploaded["id"].as_str().expect("an id");
    // Into the fleet's S3 store (Garage), and out of it to a contact by a worker.
    assert_eq!(
        fleet
            .sql(&format!("SELECT store FROM media WHERE id = '{file}'"))
            .trim(),
        "s3",
        "the compose fleet keeps files in its S3-compatible store"
    );
    let sender = api.pair(&fleet, "gw-sg-1", "6281200000003").await;
    let (status, sent) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sessions/{sender}/messages"),
            Some(json!({"to": "+62 811 0000 0001", "type": "document",
                "document": {"mediaId": file, "fileName": "invoice.pdf"}})),
        )
        .await;
    assert_eq!(status, 202, "{sent}");
    let message = sent["id"].as_str().expect("an id").to_owned();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, m) = api
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/sessions/{sender}/messages/{message}"),
                None,
            )
            .await;
        if ["sent", "delivered", "read"].contains(&m["status"].as_str().unwrap_or("")) {
            break;
        }
        assert_ne!(m["status"], "failed", "{m}");
        assert!(Instant::now() < until, "the document was not sent: {m}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    api.logout_and_delete(&sender).await;
    fleet.no_conflicts("the healthy fleet");

    // Stop the node leading gw-sg-1's command queue: a new leader is elected among the other
    // two, and the api and the worker connected to the stopped node go on with another.
    let queue = fleet.command_queue("rabbitmq-1", "gw-sg-1");
    assert_eq!(
        queue["members"].as_array().map(Vec::len),
        Some(3),
        "the command queue is replicated on the three nodes: {queue}"
    );
    let node = leader(&queue);
    api.answers.clear();
    let stopped = Instant::now();
    fleet.compose(&["stop", "--timeout", "10", &node]);
    eprintln!(
        "[compose] stopped {node} in {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    let mut first_success = None;
    for i in 0..3 {
        api.pair_and_logout(&fleet, "gw-sg-1", &format!("628130000000{i}"))
            .await;
        first_success.get_or_insert(stopped.elapsed());
    }
    let running = if node == "rabbitmq-1" {
        "rabbitmq-2"
    } else {
        "rabbitmq-1"
    };
    let new_leader = leader(&fleet.command_queue(running, "gw-sg-1"));
    assert_ne!(new_leader, node, "a new leader was elected");
    eprintln!(
        "[compose] with {node} down: 3 pair/logout cycles, the first done {:.1} s after the stop; \
         answers {:?}; the queue's leader is now {new_leader}",
        first_success.expect("a cycle").as_secs_f64(),
        api.answers
    );

    fleet.no_conflicts("a broker node stopped");

    // The node comes back and rejoins; commands go on.
    fleet.compose(&["start", &node]);
    api.answers.clear();
    api.pair_and_logout(&fleet, "gw-sg-1", "6281400000001")
        .await;
    eprintln!(
        "[compose] after {node} came back: answers {:?}",
        api.answers
    );
    fleet.no_conflicts("the broker node back");

    // gw-sg-1's worker cut off from the network (the broker and Postgres) while it drives a
    // number: the process lives on, stops driving before its lease could expire, the region's
    // reaper moves the number to gw-sg-2, and when the worker is back it drives nothing twice.
    let id = api.pair(&fleet, "gw-sg-1", "6281500000001").await;
    api.answers.clear();
    let cut = Instant::now();
    fleet.network("disconnect", "worker-sg-1");
    let moved = api
        .session_when(&id, Duration::from_secs(90), |s| {
            s["gatewayId"] == "gw-sg-2" && s["status"] == "working"
        })
        .await;
    let failed_over = cut.elapsed();
    assert_eq!(
        moved["waJid"], "6281500000001@s.whatsapp.net",
        "moved without re-pairing"
    );
    fleet.network("connect", "worker-sg-1");
    let back = Instant::now();
    // gw-sg-1 heartbeating again.
    tests::eventually(Duration::from_secs(60), || async {
        fleet.count(
            "SELECT count(*) FROM gateways WHERE id = 'gw-sg-1' \
             AND heartbeat_at > (extract(epoch from now()) * 1000)::bigint - 3000",
        ) > 0
    })
    .await;
    let reconnected = back.elapsed();
    let (status, out) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sessions/{id}:restart"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["gatewayId"], "gw-sg-2", "{out}");
    fleet.no_conflicts("gw-sg-1 cut off and back");
    eprintln!(
        "[compose] gw-sg-1 cut off: its number working on gw-sg-2 {:.1} s after the cut; \
         gw-sg-1 heartbeating again {:.1} s after it was reconnected; answers {:?}; \
         0 numbers connected twice",
        failed_over.as_secs_f64(),
        reconnected.as_secs_f64(),
        api.answers
    );
    api.logout_and_delete(&id).await;

    // Region lab: a number on the real driver (the local WhatsApp protocol server), linked by
    // the server's simulated phone through `ctl sim scan`. Its worker restarts: the number
    // stays on its gateway and logs in again from its keys (a restart moves nothing). Then
    // an SRE drains the gateway: it moves to the region's other worker. It talks both ways
    // before and after each, without re-pairing.
    let (number, contact) = ("6281600000001", "6281600000002");
    let id = api.pair(&fleet, "gw-lab-1", number).await;
    api.send(&id, contact, "before the restart").await;
    tests::eventually(Duration::from_secs(30), || async {
        fleet.phone_received(contact, number).await == ["before the restart"]
    })
    .await;
    api.answers.clear();
    let restarted = Instant::now();
    let restarted_ms = shared::db::now_ms();
    fleet.compose(&["restart", "worker-lab-1"]);
    let back = api
        .session_when(&id, Duration::from_secs(90), |s| {
            s["gatewayId"] == "gw-lab-1"
                && s["status"] == "working"
                && s["lastConnectedAt"].as_i64() > Some(restarted_ms)
        })
        .await;
    let restart_took = restarted.elapsed();
    assert_eq!(back["waJid"], format!("{number}@s.whatsapp.net"), "{back}");
    assert_eq!(
        fleet.count("SELECT count(*) FROM sessions WHERE gateway_id = 'gw-lab-2'"),
        0,
        "nothing moved to the peer"
    );
    api.send(&id, contact, "after the restart").await;
    tests::eventually(Duration::from_secs(30), || async {
        fleet.phone_received(contact, number).await == ["before the restart", "after the restart"]
    })
    .await;

    let drained = Instant::now();
    let out = fleet.ctl(&["gateways", "drain", "gw-lab-1"]);
    assert!(out.contains("gw-lab-1 is drained"), "{out}");
    let moved = api
        .session_when(&id, Duration::from_secs(90), |s| {
            s["gatewayId"] == "gw-lab-2" && s["status"] == "working"
        })
        .await;
    let move_took = drained.elapsed();
    fleet.ctl(&["gateways", "uncordon", "gw-lab-1"]);
    assert_eq!(
        moved["waJid"],
        format!("{number}@s.whatsapp.net"),
        "{moved}"
    );
    api.send(&id, contact, "after the move").await;
    tests::eventually(Duration::from_secs(30), || async {
        fleet.phone_received(contact, number).await
            == ["before the restart", "after the restart", "after the move"]
    })
    .await;
    fleet.ctl(&[
        "sim",
        "message",
        "--session",
        &id,
        "--from",
        contact,
        "--text",
        "and back",
    ]);
    tests::eventually(Duration::from_secs(30), || async {
        fleet.count(&format!(
            "SELECT count(*) FROM events WHERE session_id = '{id}' \
             AND type = 'message.received' AND payload->>'text' = 'and back'"
        )) == 1
    })
    .await;
    eprintln!(
        "[compose] region lab: a real-protocol number working again on gw-lab-1 {:.1} s after \
         `restart worker-lab-1` (nothing moved), on gw-lab-2 {:.1} s after `gateways drain`; \
         every message decrypted by the contact, its answer received; answers {:?}",
        restart_took.as_secs_f64(),
        move_took.as_secs_f64(),
        api.answers
    );
    api.logout_and_delete(&id).await;

    roll_and_scale_region_sg(&fleet).await;
}

/// Region sg at scale, as an SRE runs it: 1,000 paired numbers, its two workers restarted in
/// turn (a rolling update: nothing moves); 1,200 numbers and a third worker (scale-up: the
/// region rebalances, without re-pairing); the third decommissioned and stopped (scale-down:
/// only its numbers move, spread by load; its row and queue are removed).
async fn roll_and_scale_region_sg(fleet: &Fleet) {
    const ORG: &str = "org_scale";
    let connected = |since: i64| {
        fleet.count(&format!(
            "SELECT count(*) FROM sessions WHERE organization_id = '{ORG}' \
             AND status = 'working' AND move_to IS NULL AND last_connected_at >= {since}"
        ))
    };
    fleet.add_paired(ORG, 0, 1000);
    let since = fleet.now_ms() - 60_000;
    tests::eventually(Duration::from_secs(120), || async {
        connected(since) == 1000
    })
    .await;

    // The rolling update: each worker restarted in turn, while 20 of its numbers send.
    let mut api = Client::new(fleet, ORG);
    let before = fleet.placement(ORG);
    let mut gaps = Vec::new();
    let mut sent = 0;
    for (service, gateway) in [("worker-sg-1", "gw-sg-1"), ("worker-sg-2", "gw-sg-2")] {
        let senders: Vec<&String> = before
            .iter()
            .filter(|(_, gw)| *gw == gateway)
            .map(|(id, _)| id)
            .take(20)
            .collect();
        let stopped = fleet.now_ms();
        let mut restart = fleet.compose_in_background(&["restart", service]);
        loop {
            let done = restart.try_wait().expect("the restart runs").is_some();
            let id = senders[sent % senders.len()];
            api.send(id, "6281999000001", &format!("roll {sent}")).await;
            sent += 1;
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            restart.wait().is_ok_and(|s| s.success()),
            "{service} restarted"
        );
        let mine = format!(
            "organization_id = '{ORG}' AND gateway_id = '{gateway}' AND status = 'working' \
             AND last_connected_at >= {stopped}"
        );
        tests::eventually(Duration::from_secs(120), || async {
            fleet.count(&format!("SELECT count(*) FROM sessions WHERE {mine}")) == 500
        })
        .await;
        gaps.push((
            gateway,
            fleet.count(&format!(
                "SELECT (percentile_disc(0.5) WITHIN GROUP (ORDER BY last_connected_at)) \
                 - {stopped} FROM sessions WHERE {mine}"
            )),
            fleet.count(&format!(
                "SELECT max(last_connected_at) - {stopped} FROM sessions WHERE {mine}"
            )),
        ));
    }
    assert_eq!(fleet.placement(ORG), before, "a restart moves nothing");
    fleet.no_conflicts("the rolling restart of region sg");
    // Every message accepted during the roll reached its contact, and only once.
    tests::eventually(Duration::from_secs(120), || async {
        fleet.count(&format!(
            "SELECT count(*) FROM messages WHERE organization_id = '{ORG}' \
             AND status IN ('sent', 'delivered', 'read')"
        )) == sent as i64
    })
    .await;
    assert_eq!(
        fleet.count(
            "SELECT count(*) FROM sim_messages WHERE recipient = '6281999000001@s.whatsapp.net' \
             AND text LIKE 'roll %'"
        ),
        sent as i64,
        "each message of the roll reached the contact once"
    );
    assert_eq!(
        fleet.count(
            "SELECT count(DISTINCT text) FROM sim_messages WHERE recipient = '6281999000001@s.whatsapp.net' \
             AND text LIKE 'roll %'"
        ),
        sent as i64,
        "each message of the roll reached the contact once"
    );
    eprintln!(
        "[compose] rolling restart of region sg (2 × 500 numbers): 0 moved; gap from the \
         restart to working again (p50, longest, ms): {gaps:?}; {sent} messages sent during \
         the restarts, each delivered once; answers {:?}",
        api.answers
    );

    // Scale-up to three workers with 1,200 numbers.
    fleet.add_paired(ORG, 1000, 1200);
    tests::eventually(Duration::from_secs(60), || async {
        connected(since) == 1200
    })
    .await;
    let before = fleet.placement(ORG);
    let scaled_up = Instant::now();
    fleet.compose(&["--profile", "scale", "up", "-d", "--no-deps", "worker-sg-3"]);
    // Within REBALANCE_TOLERANCE (0.1) of the capacity (1,000): loads at most 100 apart.
    let spread = || {
        fleet.count(
            "SELECT max(n) - min(n) FROM (SELECT g.id, count(s.id) AS n FROM gateways g \
             LEFT JOIN sessions s ON s.gateway_id = g.id WHERE g.region = 'sg' GROUP BY g.id) l",
        )
    };
    tests::eventually(Duration::from_secs(180), || async {
        fleet.count("SELECT count(*) FROM gateways WHERE region = 'sg'") == 3 && spread() <= 100
    })
    .await;
    let within = scaled_up.elapsed();
    tests::eventually(Duration::from_secs(60), || async {
        connected(since) == 1200
    })
    .await;
    let after = fleet.placement(ORG);
    let moves = before
        .iter()
        .filter(|(id, g)| after.get(*id) != Some(g))
        .count();
    // The fewest moves to the tolerance: a third gateway at ⌈(1,200 − 2 × 100) / 3⌉ = 334.
    assert!((334..=400).contains(&moves), "{moves} moves");
    assert!(
        after.iter().filter(|(_, g)| *g == "gw-sg-3").count() >= 334,
        "{after:?}"
    );
    assert_eq!(
        fleet.count(&format!(
            "SELECT count(*) FROM sessions WHERE organization_id = '{ORG}' \
             AND wa_jid <> phone_number || '@s.whatsapp.net'"
        )),
        0,
        "no number re-paired"
    );
    eprintln!(
        "[compose] scale-up of region sg to 3 workers (1,200 numbers): within the tolerance \
         in {:.1} s, all working; {moves} moves (the fewest: 334)",
        within.as_secs_f64()
    );

    // Scale-down: the third gateway decommissioned, then its worker stopped.
    let before = fleet.placement(ORG);
    let leaving: Vec<&String> = before
        .iter()
        .filter(|(_, g)| *g == "gw-sg-3")
        .map(|(id, _)| id)
        .collect();
    let scaled_down = Instant::now();
    let out = fleet.ctl(&["gateways", "decommission", "gw-sg-3"]);
    fleet.compose(&["stop", "worker-sg-3"]);
    tests::eventually(Duration::from_secs(60), || async {
        fleet.count("SELECT count(*) FROM gateways WHERE id = 'gw-sg-3'") == 0
    })
    .await;
    let took = scaled_down.elapsed();
    tests::eventually(Duration::from_secs(60), || async {
        connected(since) == 1200
    })
    .await;
    let after = fleet.placement(ORG);
    for (id, gateway) in &before {
        if gateway != "gw-sg-3" {
            assert_eq!(
                after.get(id),
                Some(gateway),
                "only the leaving gateway's moved: {out}"
            );
        }
    }
    let to = |gw: &str| {
        leaving
            .iter()
            .filter(|id| after.get(**id).map(String::as_str) == Some(gw))
            .count()
    };
    let (to_1, to_2) = (to("gw-sg-1"), to("gw-sg-2"));
    assert_eq!(to_1 + to_2, leaving.len(), "none stranded");
    assert!(to_1 > 0 && to_2 > 0, "spread by load: {to_1} and {to_2}");
    let queues = fleet.compose(&[
        "exec",
        "-T",
        "rabbitmq-1",
        "rabbitmqctl",
        "-q",
        "list_queues",
        "name",
    ]);
    assert!(!queues.contains("gw-sg-3"), "its queue is gone: {queues}");
    fleet.no_conflicts("the scale-up and scale-down of region sg");
    fleet.compose(&["--profile", "scale", "rm", "-fs", "worker-sg-3"]);
    eprintln!(
        "[compose] scale-down of gw-sg-3: its {} numbers moved ({to_1} to gw-sg-1, {to_2} to \
         gw-sg-2), no other; its row and queue removed {:.1} s after `decommission`",
        leaving.len(),
        took.as_secs_f64()
    );
}
