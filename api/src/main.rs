use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = api::Config::parse();
    shared::telemetry::init_logging(&cfg.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %cfg.listen, error = %e, "cannot listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    match api::run(cfg, listener, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, cause = ?e.source, "api failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_on_signal(token: CancellationToken) {
    shared::telemetry::wait_for_signal().await;
    tracing::info!("shutting down");
    token.cancel();
}
