use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = worker::Config::parse();
    shared::telemetry::init_logging(&cfg.log);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        shared::telemetry::wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight commands");
        token.cancel();
    });
    match worker::run(cfg, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, cause = ?e.source, "worker failed");
            std::process::ExitCode::FAILURE
        }
    }
}
