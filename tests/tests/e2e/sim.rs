//! The simulated WhatsApp's server side: its record of live connections is what the fleet
//! tests (and the fault suite) read to prove a number is never connected twice, so it must not
//! see a connection that is gone.

use std::time::Duration;

use serde_json::json;
use tests::TestEnv;
use tokio::sync::mpsc;
use worker::driver::{Driver, DriverEvent, sim::SimDriver};

/// A connection closed while its login is still on its way to the server (a `:restart` in the
/// moment a worker resumes its sessions) is forgotten by the time `close` returns, so the
/// device's next connection, from the same process, replaces nothing live.
#[tokio::test]
async fn a_connection_closed_mid_login_leaves_no_live_stream_behind() {
    let env = TestEnv::new().await;
    let mut cfg = env.worker_config(&env.gateway_id("sim"));
    cfg.sim_connect_delay_ms = 0;
    let driver = SimDriver::start(cfg.sim(), &cfg.db.database_url)
        .await
        .expect("the simulated driver");
    let credentials = json!({"phone": "6281200000000"});
    for i in 0..100 {
        let device = format!("ses_closed_mid_login_{i}");
        let (events, _) = mpsc::unbounded_channel();
        let mut first = driver
            .connect(&device, 1, Some(credentials.clone()), events)
            .await
            .expect("connect");
        // Give the phone's login time to be queued (not to land).
        tokio::task::yield_now().await;
        first.close().await;

        let (events, mut seen) = mpsc::unbounded_channel();
        let mut second = driver
            .connect(&device, 1, Some(credentials.clone()), events)
            .await
            .expect("connect again");
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = seen.recv().await {
                if matches!(e, DriverEvent::Connected) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(connected, Ok(true), "the second connection logs in");
        second.close().await;
    }
    assert_eq!(
        env.sim_conflicts().await,
        Vec::<String>::new(),
        "no connection met a stale one of its device"
    );
}
