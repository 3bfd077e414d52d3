//! `gatewayctl sim …` with the real driver: the simulated phones and contacts of the local
//! WhatsApp protocol server (`tests/src/wa_server/control.rs`), reached over its control API
//! (`WA_SIM_CONTROL_URL`). Only the test build (`worker-wa-test-server`) is given that URL;
//! without it a `sim` command is unsupported, as it is against WhatsApp.
//!
//! A connection knows what the phone needs: the QR code it shows now, the pairing code it was
//! given, and its own device (`<number>:<device>@s.whatsapp.net`) once linked.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use wacore::net::{HttpClient, HttpRequest};
use whatsapp_rust::http::UreqHttpClient;

use super::super::{DriverError, SimAction};

/// What a connection shows a phone that would link it, shared with its event handler.
#[derive(Clone, Default)]
pub struct Shown(Arc<Mutex<Showing>>);

#[derive(Clone, Default)]
struct Showing {
    /// The QR code on screen.
    qr: Option<String>,
    /// A pairing code asked for: (phone number, code).
    code: Option<(String, String)>,
}

impl Shown {
    fn lock(&self) -> std::sync::MutexGuard<'_, Showing> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn qr(&self, qr: &str) {
        self.lock().qr = Some(qr.to_owned());
    }

    pub fn code(&self, phone_number: &str, code: &str) {
        self.lock().code = Some((phone_number.to_owned(), code.to_owned()));
    }
}

/// The phone behind `device`, this connection's own JID when linked (`None` before).
pub struct Phones<'a> {
    pub url: &'a str,
    pub shown: &'a Shown,
    pub device: Option<whatsapp_rust::Jid>,
}

impl Phones<'_> {
    pub async fn act(&self, action: SimAction) -> Result<(), DriverError> {
        match action {
            SimAction::Scan { phone_number } => {
                let number = digits(&phone_number);
                let Showing { qr, code } = self.shown.lock().clone();
                match (code, qr) {
                    (Some((for_number, code)), _) if for_number == number => {
                        self.post(&format!("phones/{number}/code"), json!({ "code": code }))
                            .await
                    }
                    (_, Some(qr)) => {
                        self.post(&format!("phones/{number}/scan"), json!({ "qr": qr }))
                            .await
                    }
                    _ => Err(DriverError::Refused(
                        "the device shows no QR code or pairing code to scan".into(),
                    )),
                }
            }
            SimAction::Unlink => self.device_action("unlink").await,
            SimAction::Conflict => self.device_action("replace").await,
            SimAction::Drop => self.device_action("drop").await,
            SimAction::Message { from, content, .. } => {
                let shared::message::Content::Text { text } = *content else {
                    return Err(DriverError::Refused(
                        "the protocol server's contacts send texts through this; other types \
                         are sent by the tests' simulated phones"
                            .into(),
                    ));
                };
                let device = self.linked()?;
                self.post(
                    &format!("phones/{}/messages", digits(&from)),
                    json!({ "to": device.user.as_str(), "text": text }),
                )
                .await
            }
        }
    }

    fn linked(&self) -> Result<&whatsapp_rust::Jid, DriverError> {
        self.device
            .as_ref()
            .ok_or_else(|| DriverError::Refused("the device is not linked to a phone".into()))
    }

    async fn device_action(&self, action: &str) -> Result<(), DriverError> {
        let device = self.linked()?;
        self.post(
            &format!("phones/{}/devices/{}/{action}", device.user, device.device),
            json!({}),
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Result<(), DriverError> {
        let url = format!("{}/{path}", self.url.trim_end_matches('/'));
        let request = HttpRequest::post(&url)
            .with_header("content-type", "application/json")
            .with_body(body.to_string().into_bytes());
        let response = UreqHttpClient::new()
            .execute(request)
            .await
            .map_err(|e| DriverError::Connection(format!("the simulated phones at {url}: {e}")))?;
        if (200..300).contains(&response.status_code) {
            return Ok(());
        }
        let why = serde_json::from_slice::<Value>(&response.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("status {}", response.status_code));
        Err(DriverError::Refused(format!("the simulated phone: {why}")))
    }
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}
