//! The worker process around [`crate::run`]: settings from the environment, logging, the
//! signals that stop it, its exit code. Shared by the `worker` binary and the test-only
//! `worker-wa-test-server` (`src/bin/`), which differ only in the [`Build`].

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Which binary this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Production,
    /// Built with the `wa-test-server` feature: the real driver accepts a server certificate
    /// chain that WhatsApp did not sign. It runs only against an endpoint named in
    /// `WA_WS_URL` (the local protocol server of the tests), never WhatsApp's.
    WaTestServer,
}

pub async fn main(build: Build) -> ExitCode {
    let cfg = crate::Config::parse();
    shared::telemetry::init_logging(&cfg.log);
    if build == Build::WaTestServer {
        let Some(url) = &cfg.wa_ws_url else {
            tracing::error!(
                "this worker is built for the local WhatsApp protocol server of the tests only \
                 (it does not verify WhatsApp's certificate): set WA_WS_URL to that server, or \
                 run the `worker` binary"
            );
            return ExitCode::from(2);
        };
        tracing::warn!(%url, "test build: server certificates are not verified; never point this at WhatsApp");
    } else if cfg.wa_sim_control_url.is_some() {
        tracing::error!(
            "WA_SIM_CONTROL_URL names the simulated phones of the local WhatsApp protocol \
             server, which only the test build `worker-wa-test-server` talks to"
        );
        return ExitCode::from(2);
    }
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        shared::telemetry::wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight commands");
        token.cancel();
    });
    match crate::run(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, cause = ?e.source, "worker failed");
            ExitCode::FAILURE
        }
    }
}
