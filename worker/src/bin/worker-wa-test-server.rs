//! The worker for the local WhatsApp protocol server of the tests (`tests/src/wa_server/`)
//! and nothing else: its real driver accepts a server certificate chain that WhatsApp did not
//! sign (worker feature `wa-test-server`), and it refuses to start without `WA_WS_URL`.
//! Production runs `worker`, which is never built with that feature.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    worker::process::main(worker::process::Build::WaTestServer).await
}
