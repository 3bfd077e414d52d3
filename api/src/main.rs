use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = api::Config::parse();
    shared::telemetry::init_logging(&cfg.log);
    if std::env::var_os("CREDENTIALS_KEYS").is_some() {
        // The internet-facing process must not hold what opens every device's keys.
        tracing::error!(
            "CREDENTIALS_KEYS is set: those keys open the workers' device keys and stay \
             with the workers; the api seals webhook secrets with WEBHOOK_SECRET_KEYS"
        );
        return std::process::ExitCode::FAILURE;
    }
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
