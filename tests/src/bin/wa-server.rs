//! The local WhatsApp protocol server of the tests (`tests/src/wa_server/`) as a service, for
//! the local cluster (`WA_DRIVER=whatsapp deploy/local/up`) and the compose fleet: workers
//! built for it (`worker-wa-test-server`, `WA_WS_URL`) pair, log in, send and receive
//! against it; its control API (`WA_SIM_CONTROL_URL` for those workers) is the simulated
//! phones and contacts that `gatewayctl sim …` acts through.
//!
//! Accounts, linked devices and what the phones received live in memory: a restart of this
//! server is a WhatsApp that forgot every linked device (they are refused at login and end
//! `logged_out`). Its own keys are fixed, so a device's stored server key stays valid.
//!
//! `cargo run -p tests --bin wa-server -- --listen 127.0.0.1:9300 --control 127.0.0.1:9301
//! --media 127.0.0.1:9302`

use std::process::ExitCode;

use clap::Parser;
use tests::wa_server::WaServer;

#[derive(Parser)]
#[command(about = "A WhatsApp protocol server for tests, with simulated phones")]
struct Args {
    /// Where workers connect (WebSocket, `ws://<address>/ws/chat`).
    #[arg(long, env = "WA_SERVER_LISTEN", default_value = "127.0.0.1:9300")]
    listen: String,
    /// Where the control API listens (HTTP): the simulated phones.
    #[arg(
        long,
        env = "WA_SERVER_CONTROL_LISTEN",
        default_value = "127.0.0.1:9301"
    )]
    control: String,
    /// Where WhatsApp's media hosts listen (HTTPS, a certificate made at start): files are
    /// uploaded and downloaded there.
    #[arg(long, env = "WA_SERVER_MEDIA_LISTEN", default_value = "127.0.0.1:9302")]
    media: String,
    /// The media hosts' `host:port` as workers reach them (what `media_conn` names); the
    /// media address by default.
    #[arg(long, env = "WA_SERVER_MEDIA_HOST")]
    media_host: Option<String>,
    /// Every phone reads each message a device sends it this long after it arrived (0:
    /// never), as a contact with the chat open does.
    #[arg(long, env = "WA_SERVER_READ_AFTER_MS", default_value_t = 1000)]
    read_after_ms: u64,
    /// Refuse clients older than this version (`2.3000.1`) as outdated.
    #[arg(long, env = "WA_SERVER_MIN_VERSION")]
    min_version: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let bind = |addr: String| async move {
        tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let media_host = args.media_host.unwrap_or_else(|| args.media.clone());
    let bound = (
        bind(args.listen).await,
        bind(args.control).await,
        bind(args.media).await,
    );
    let (chat, control, media) = match bound {
        (Ok(chat), Ok(control), Ok(media)) => (chat, control, media),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("wa-server: {e}");
            return ExitCode::from(2);
        }
    };
    let mut server = WaServer::serve(chat);
    server.serve_media(media, media_host.clone());
    if args.read_after_ms > 0 {
        server.read_after(std::time::Duration::from_millis(args.read_after_ms));
    }
    if let Some(version) = &args.min_version {
        let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
        let [a, b, c] = parts[..] else {
            eprintln!("wa-server: `{version}` is not a version like 2.3000.1");
            return ExitCode::from(2);
        };
        server.require_version((a, b, c));
    }
    let control = server.serve_control(control);
    println!(
        "wa-server: WhatsApp on {}, its media hosts on https://{media_host}, phones on {control}",
        server.url
    );
    shared::telemetry::wait_for_signal().await;
    ExitCode::SUCCESS
}
