//! Memory and tasks per idle real-driver client: many `whatsapp-rust` clients of the worker's
//! `whatsapp` driver, each on our Postgres store (sealed, fenced), connected to a local
//! endpoint that accepts the WebSocket and holds it (WhatsApp itself cannot be reached from
//! here, so a client idles mid-handshake, its socket open, rather than logged in).
//!
//! Baseline, measured in the same run: the same clients built by the same driver code on the
//! crate's own `InMemoryBackend`. Each variant runs in a fresh child process (so one's freed
//! memory cannot flatter the other), rounds interleaved; the report gives resident memory and
//! live tokio tasks per client for both, and their ratio. The crate's own figure for an idle
//! client on its in-memory store is 32–44 KiB.
//!
//! Run with the services up: `cargo run --release -p tests --bin bench-wa-idle`.
//! `BENCH_CLIENTS` (default 500) and `BENCH_ROUNDS` (default 2) change the load.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::Engine;
use sha1::{Digest, Sha1};
use shared::sealed::Keyring;
use tests::{TestEnv, process::rss_bytes_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use worker::driver::{
    Driver,
    whatsapp::{WhatsAppConfig, WhatsAppDriver},
};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A local WebSocket endpoint that completes the upgrade, then holds the socket (reading and
/// dropping what the client sends). Counts the sockets it holds.
async fn holding_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let held = Arc::new(AtomicUsize::new(0));
    let count = held.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let Some(key) = text.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| value.trim().to_owned())
                }) else {
                    return;
                };
                let accept = base64::engine::general_purpose::STANDARD
                    .encode(Sha1::digest(format!("{key}{GUID}").as_bytes()));
                let response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                if socket.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::Relaxed);
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                count.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    (format!("ws://127.0.0.1:{port}/ws/chat"), held)
}

/// One variant in this process: `n` clients up and idle; prints `kib_per_client
/// tasks_per_client`.
async fn child(variant: &str, n: usize) {
    let env = TestEnv::new().await;
    let (url, held) = holding_endpoint().await;
    let gw = env.gateway_id("sg");
    env.paired_sessions("org_bench", &gw, n, 0).await;
    let ids: Vec<(String, i64)> = env
        .db
        .get()
        .await
        .expect("db")
        .query("SELECT id, lease_epoch FROM sessions ORDER BY id", &[])
        .await
        .expect("sessions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let keyring = Arc::new(Keyring::generate("bench"));
    let driver = WhatsAppDriver::new(
        env.db.clone(),
        keyring,
        WhatsAppConfig {
            ws_url: Some(url),
            version: (2, 3000, 1042742319),
            // Longer than the handshake's own 20 s: the clients stay up while measured.
            connect_timeout: Duration::from_secs(120),
            media_transfer_timeout: Duration::from_secs(600),
            sim_control_url: None,
        },
    );
    let metrics = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = || rss_bytes_of(std::process::id()).unwrap_or(0);
    let (rss0, tasks0) = (rss(), metrics.num_alive_tasks());

    let mut conns = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    for (id, epoch) in &ids {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let conn = match variant {
            "postgres" => driver.connect(id, *epoch, None, tx).await,
            _ => {
                let memory = Arc::new(wacore::store::InMemoryBackend::new());
                driver.open(memory, id, *epoch, tx).await
            }
        };
        conns.push(conn.expect("client"));
        events.push(rx);
    }
    while held.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss1, tasks1) = (rss(), metrics.num_alive_tasks());
    let kib = (rss1.saturating_sub(rss0)) as f64 / 1024.0 / n as f64;
    let tasks = tasks1.saturating_sub(tasks0) as f64 / n as f64;
    println!("{kib:.1} {tasks:.2}");
    for mut c in conns {
        c.close().await;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if args.get(1).map(String::as_str) == Some("child") {
        let n = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(500);
        rt.block_on(child(&args[2], n));
        return;
    }
    let n = env_or("BENCH_CLIENTS", 500);
    let rounds = env_or("BENCH_ROUNDS", 2);
    let exe = std::env::current_exe().expect("exe");
    let mut results: std::collections::BTreeMap<&str, (Vec<f64>, Vec<f64>)> = Default::default();
    for round in 0..rounds {
        for variant in ["memory", "postgres"] {
            let out = std::process::Command::new(&exe)
                .args(["child", variant, &n.to_string()])
                .env("RUST_LOG", "off")
                .output()
                .expect("child runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut parts = text.split_whitespace().map(|p| p.parse::<f64>());
            let (Some(Ok(kib)), Some(Ok(tasks))) = (parts.next(), parts.next()) else {
                panic!(
                    "{variant} round {round} failed: {text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            eprintln!("round {round} {variant}: {kib:.1} KiB, {tasks:.2} tasks per client");
            let e = results.entry(variant).or_default();
            e.0.push(kib);
            e.1.push(tasks);
        }
    }
    let (mk, mt) = results.remove("memory").expect("memory");
    let (pk, pt) = results.remove("postgres").expect("postgres");
    let (mk, mt, pk, pt) = (median(mk), median(mt), median(pk), median(pt));
    println!("idle real-driver clients: {n}, rounds: {rounds}");
    println!("  crate's in-memory store (baseline): {mk:.1} KiB, {mt:.2} tasks per client");
    println!("  our Postgres store:                 {pk:.1} KiB, {pt:.2} tasks per client");
    println!(
        "  ratio (ours / baseline): memory {:.2}, tasks {:.2}",
        pk / mk,
        pt / mt
    );
}
