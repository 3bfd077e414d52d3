//! Logs and metrics set-up, the same for every process.
//!
//! Logs go to stdout through `tracing` (JSON by default). Metrics go through the `metrics`
//! facade to a Prometheus recorder; the facade's recorder is process-global by design, so it is
//! installed once and its handle shared (tests start many servers in one process).

use std::{net::SocketAddr, sync::OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::{
    config::{LogConfig, LogFormat},
    error::{Error, Result},
};

pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_new(&cfg.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match cfg.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Binds the metrics listener a process is configured with (`setting` names the variable,
/// for the error), before the process claims or serves anything: a port in use fails the
/// start with that setting named. `None` when none is configured.
pub async fn bind_metrics_listener(
    addr: Option<SocketAddr>,
    setting: &str,
) -> Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    tokio::net::TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|e| Error::invalid(format!("{setting} {addr}: {e}")))
}

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        // Histograms keep raw samples until upkeep folds them into buckets; without it they
        // grow for as long as nobody scrapes.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        handle
    })
}

/// Resolves on SIGINT or SIGTERM (what container orchestrators send).
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
