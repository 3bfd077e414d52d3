//! Workers (and api replicas) as real processes, for what a thread cannot show: `kill -9`,
//! and a process frozen with SIGSTOP and resumed with SIGCONT.
//!
//! The binary is the workspace's `worker`, built beside the test binary by `cargo build
//! --workspace --bins` (`deploy/local/test` does that before the tests). It gets the same settings the
//! in-process workers get, as environment variables, and logs to a file under the system's
//! temporary directory.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
};

use crate::{FAST_FLEET, TestEnv, amqp_url};

/// The `worker` binary of this build's profile (`target/<profile>/worker`).
pub fn worker_binary() -> PathBuf {
    binary("worker")
}

/// The worker built for the local WhatsApp protocol server (`tests/src/wa_server/`): the real
/// driver without WhatsApp's certificate check. Built apart from the workspace, by
/// `cargo build -p worker --features wa-test-server --bin worker-wa-test-server`
/// (`deploy/local/test` does), so no other binary of the build gets that feature.
pub fn wa_test_worker_binary() -> PathBuf {
    binary("worker-wa-test-server")
}

/// A binary of the workspace built in this build's profile (`target/<profile>/<name>`),
/// found from the running binary: a test in `target/<profile>/deps/`, or a benchmark in
/// `target/<profile>/`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("binary path");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|bin| bin.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no {name} binary at {}: tests need `cargo build --workspace --bins` first \
                 (deploy/local/test does), benchmarks `cargo build --release --bin worker`",
                candidates[0].display()
            )
        })
}

pub struct WorkerProcess {
    child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// Starts a worker process for `gateway_id` with the test's database and broker, the
    /// fast fleet timings of [`FAST_FLEET`], and `extra` settings on top.
    pub fn spawn(env: &TestEnv, gateway_id: &str, extra: &[(&str, String)]) -> WorkerProcess {
        WorkerProcess::spawn_binary(&worker_binary(), env, gateway_id, extra)
    }

    /// [`WorkerProcess::spawn`] with another worker binary.
    pub fn spawn_binary(
        binary: &std::path::Path,
        env: &TestEnv,
        gateway_id: &str,
        extra: &[(&str, String)],
    ) -> WorkerProcess {
        let log = std::env::temp_dir().join(format!("gw-test-{gateway_id}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &env.database_url)
            .env("DATABASE_POOL_SIZE", "8")
            .env("AMQP_URL", amqp_url())
            .env("AMQP_PREFIX", &env.amqp_prefix)
            .env("GATEWAY_ID", gateway_id)
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .env("SIM_CONNECT_DELAY_MS", "20")
            .env("SHUTDOWN_GRACE_MS", "3000")
            .envs(FAST_FLEET.iter().copied());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start the worker binary");
        WorkerProcess { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in bytes, from `/proc`.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes_of(self.pid())
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {signal} {}", self.pid());
    }

    /// SIGTERM, without waiting: a rolling deploy's stop, or the start of one that a
    /// `kill -9` then cuts short.
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// The exit status once the process has exited, waiting up to `limit`; `None` while it
    /// still runs.
    pub async fn exited_within(&mut self, limit: std::time::Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// CPU time the process has used so far (user and system), from `/proc`.
    pub fn cpu_time(&self) -> Option<std::time::Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // After the command name (which may hold spaces): utime and stime, the 14th and 15th
        // fields of the line, in clock ticks.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // USER_HZ, which `/proc` counts in: 100 on every Linux architecture we run on.
        Some(std::time::Duration::from_millis(ticks * 10))
    }

    /// SIGKILL: the process dies at once, its sockets closed by the kernel.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process is frozen, its sockets left open.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: the frozen process runs again.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM, then waits for the process to exit; answers whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        self.signal("-TERM");
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// What the process logged so far.
    pub fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` in bytes, from `/proc`.
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// An api replica as a real process, for `kill -9` with webhook deliveries in flight.
pub struct ApiProcess {
    child: Child,
    pub log: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl ApiProcess {
    /// Starts the `api` binary with the test's database, broker and `WEBHOOK_SECRET_KEYS`, the
    /// test webhook settings, and `extra` on top; waits until it answers `/healthz`.
    pub async fn spawn(env: &TestEnv, extra: &[(&str, String)]) -> ApiProcess {
        let port = crate::free_port();
        let log = std::env::temp_dir().join(format!("gw-test-api-{}.log", crate::unique()));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(binary("api"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &env.api_database_url)
            .env("DATABASE_POOL_SIZE", "8")
            .env("AMQP_URL", amqp_url())
            .env("AMQP_PREFIX", &env.amqp_prefix)
            .env("API_LISTEN", format!("127.0.0.1:{port}"))
            .env("WEBHOOK_SECRET_KEYS", &env.webhook_secret_keys)
            .env("WEBHOOK_ALLOW_HTTP", "true")
            .env("WEBHOOK_ALLOW_PRIVATE", "true")
            .env("WEBHOOK_POLL_MS", "100")
            .env("WEBHOOK_RETRY_SCHEDULE_MS", "200,400")
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "info");
        for limit in [
            "API_RATE_PER_CREDENTIAL",
            "API_RATE_BURST_PER_CREDENTIAL",
            "API_RATE_PER_ORG",
            "API_RATE_BURST_PER_ORG",
        ] {
            cmd.env(limit, crate::UNLIMITED_RATE.to_string());
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start the api binary");
        let api = ApiProcess {
            child,
            log,
            base: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let url = format!("{}/healthz", api.base);
        crate::eventually(std::time::Duration::from_secs(15), || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(url).send().await.is_ok() }
        })
        .await;
        api
    }

    /// SIGKILL: the replica dies at once, mid-attempt.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What the process logged so far.
    pub fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `wa-server` binary (the local WhatsApp protocol server as a service, as the local
/// cluster and the compose fleet run it), on free ports.
pub struct WaServerProcess {
    child: Child,
    /// `ws://127.0.0.1:<port>/ws/chat`: the workers' `WA_WS_URL`.
    pub url: String,
    /// `http://127.0.0.1:<port>`: the simulated phones, the workers' `WA_SIM_CONTROL_URL`.
    pub control: String,
}

impl WaServerProcess {
    /// Starts it and waits until its control API answers.
    pub async fn spawn() -> WaServerProcess {
        let (chat, control, media) = (crate::free_port(), crate::free_port(), crate::free_port());
        let child = Command::new(binary("wa-server"))
            .args(["--listen", &format!("127.0.0.1:{chat}")])
            .args(["--control", &format!("127.0.0.1:{control}")])
            .args(["--media", &format!("127.0.0.1:{media}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the wa-server binary");
        let server = WaServerProcess {
            child,
            url: format!("ws://127.0.0.1:{chat}/ws/chat"),
            control: format!("http://127.0.0.1:{control}"),
        };
        let http = reqwest::Client::new();
        let probe = format!("{}/phones/0", server.control);
        crate::eventually(std::time::Duration::from_secs(15), || {
            let (http, probe) = (http.clone(), probe.clone());
            async move { http.get(probe).send().await.is_ok() }
        })
        .await;
        server
    }
}

impl Drop for WaServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
