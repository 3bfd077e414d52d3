//! The session resource: one WhatsApp number linked as a device, owned by one organization.
//!
//! Field names and types are the seed's, word for word (camelCase, epoch milliseconds, nulls
//! until paired). `statusReason` is the one extra field: it says why a session is `failed`,
//! `logged_out` or `stopped` where that matters. Validation of what callers may set lives here
//! too, so the api and the CLI refuse the same inputs with the same words.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Stopped,
    Starting,
    /// Running, unpaired, waiting for a QR scan or a pairing code.
    ScanQrCode,
    /// Connected and paired.
    Working,
    Failed,
    /// Unpaired after a logout or after the phone removed the device.
    LoggedOut,
}

impl SessionStatus {
    pub const ALL: [SessionStatus; 6] = [
        SessionStatus::Stopped,
        SessionStatus::Starting,
        SessionStatus::ScanQrCode,
        SessionStatus::Working,
        SessionStatus::Failed,
        SessionStatus::LoggedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Stopped => "stopped",
            SessionStatus::Starting => "starting",
            SessionStatus::ScanQrCode => "scan_qr_code",
            SessionStatus::Working => "working",
            SessionStatus::Failed => "failed",
            SessionStatus::LoggedOut => "logged_out",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// What the session's owner asked for, kept apart from what it is (`status`): after a move
/// (drain, failover) or a worker restart, the new owner connects `running` sessions and
/// leaves `stopped` ones alone. Start, restart, QR and pairing code set `running`; stop and
/// logout set `stopped`, and so do the ends a session cannot come back from by itself (QR
/// codes exhausted, the device removed, the stream replaced elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Running,
    Stopped,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(DesiredState::Running),
            "stopped" => Some(DesiredState::Stopped),
            _ => None,
        }
    }
}

/// Why a session is in its status, where that matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusReason {
    /// The same device connected elsewhere; WhatsApp replaced this stream.
    Conflict,
    /// The phone removed the linked device.
    DeviceRemoved,
    /// No QR code was scanned before the last one expired.
    QrTimeout,
    Banned,
    TemporaryBan,
    ConnectionLost,
    /// A caller asked for it (stop, logout).
    Requested,
    /// No connection could be made within the deadline; the worker tries again with backoff
    /// while the session should run. `statusDetails.message` says what failed.
    ConnectFailed,
    /// WhatsApp refuses this client version: the operator must update the pinned one.
    ClientOutdated,
}

impl StatusReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusReason::Conflict => "conflict",
            StatusReason::DeviceRemoved => "device_removed",
            StatusReason::QrTimeout => "qr_timeout",
            StatusReason::Banned => "banned",
            StatusReason::TemporaryBan => "temporary_ban",
            StatusReason::ConnectionLost => "connection_lost",
            StatusReason::Requested => "requested",
            StatusReason::ConnectFailed => "connect_failed",
            StatusReason::ClientOutdated => "client_outdated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            StatusReason::Conflict,
            StatusReason::DeviceRemoved,
            StatusReason::QrTimeout,
            StatusReason::Banned,
            StatusReason::TemporaryBan,
            StatusReason::ConnectionLost,
            StatusReason::Requested,
            StatusReason::ConnectFailed,
            StatusReason::ClientOutdated,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// The session as the API shows it (the seed's JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// ULID.
    #[schema(example = "01J9ZX8K2QHV0M3T6R7P4N5W8C")]
    pub id: String,
    pub organization_id: String,
    pub label: String,
    #[schema(example = "gw-sg-1")]
    pub gateway_id: String,
    /// Null until paired.
    pub phone_number: Option<String>,
    pub wa_jid: Option<String>,
    pub wa_lid: Option<String>,
    pub status: SessionStatus,
    /// Why the session is in its status, where that matters.
    pub status_reason: Option<StatusReason>,
    pub auto_read: bool,
    pub presence_typing: bool,
    pub rate_per_min: i32,
    pub rate_per_hour: i32,
    pub is_admin_session: bool,
    pub created_by_user_id: String,
    /// Epoch milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// Epoch milliseconds; null where never connected.
    pub last_connected_at: Option<i64>,
    /// What the owner asked for (`running` or `stopped`): what the fleet brings back after
    /// the session moves to another gateway. An extra field; the seed's are as they were.
    pub desired_state: DesiredState,
    /// More about the status where there is more to say, e.g. `{"expiresAt": ms}` of a
    /// `temporary_ban`, or `{"message": "…"}` of a connection that could not be made. An
    /// extra field, absent when there is nothing to add.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub status_details: Option<serde_json::Value>,
}

/// Limits on what callers may set; one place, used by validation and the OpenAPI text.
pub mod limits {
    pub const LABEL_MAX_CHARS: usize = 100;
    pub const RATE_PER_MIN: std::ops::RangeInclusive<i32> = 1..=1_000;
    pub const RATE_PER_HOUR: std::ops::RangeInclusive<i32> = 1..=60_000;
    pub const DEFAULT_RATE_PER_MIN: i32 = 20;
    pub const DEFAULT_RATE_PER_HOUR: i32 = 600;
}

pub fn validate_label(label: &str) -> Result<String> {
    let trimmed = label.trim();
    if trimmed.is_empty() {
        return Err(Error::invalid_field("label", "label must not be empty"));
    }
    if trimmed.chars().count() > limits::LABEL_MAX_CHARS {
        return Err(Error::invalid_field(
            "label",
            format!(
                "label must be at most {} characters",
                limits::LABEL_MAX_CHARS
            ),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(Error::invalid_field(
            "label",
            "label must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

pub fn validate_rate(field: &str, value: i32, range: std::ops::RangeInclusive<i32>) -> Result<i32> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(Error::invalid_field(
            field,
            format!(
                "{field} must be between {} and {}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// Gateway ids look like `gw-sg-1`: lower-case letters, digits and dashes.
pub fn validate_gateway_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_field(
            "gatewayId",
            "gatewayId must be 1-64 lower-case letters, digits or dashes",
        ))
    }
}

pub fn validate_region(region: &str) -> Result<()> {
    validate_gateway_id(region).map_err(|_| {
        Error::invalid_field(
            "region",
            "region must be 1-64 lower-case letters, digits or dashes",
        )
    })
}

/// The region a gateway id names by convention: `gw-<region>-<n>` → `<region>`.
pub fn region_of_gateway(gateway_id: &str) -> &str {
    let mut parts = gateway_id.split('-');
    match (parts.next(), parts.next()) {
        (Some("gw"), Some(region)) if !region.is_empty() => region,
        _ => "default",
    }
}

/// A phone number in international form, digits only (`6281234567890`); `+`, spaces and
/// dashes are accepted on input and dropped.
pub fn normalize_phone_number(input: &str) -> Result<String> {
    let digits: String = input
        .chars()
        .filter(|c| !matches!(c, '+' | ' ' | '-' | '(' | ')'))
        .collect();
    if (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(digits)
    } else {
        Err(Error::invalid_field(
            "phoneNumber",
            "phoneNumber must be an international number of 7 to 15 digits",
        ))
    }
}

/// Session ids are ULIDs; anything else cannot name a session (and is reported as not found).
pub fn parse_session_id(id: &str) -> Result<ulid::Ulid> {
    ulid::Ulid::from_string(id).map_err(|_| Error::session_not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_comes_from_the_gateway_id() {
        assert_eq!(region_of_gateway("gw-sg-1"), "sg");
        assert_eq!(region_of_gateway("gw-eu-west-2"), "eu");
        assert_eq!(region_of_gateway("local"), "default");
    }

    #[test]
    fn phone_numbers_are_normalized_to_digits() {
        assert_eq!(
            normalize_phone_number("+62 812-3456-7890").ok(),
            Some("6281234567890".into())
        );
        assert!(normalize_phone_number("12").is_err());
        assert!(normalize_phone_number("62812x4567890").is_err());
    }

    #[test]
    fn labels_are_trimmed_and_bounded() {
        assert_eq!(
            validate_label("  Support line ").ok(),
            Some("Support line".into())
        );
        assert!(validate_label("   ").is_err());
        assert!(validate_label(&"x".repeat(101)).is_err());
        assert!(validate_label("a\u{0}b").is_err());
    }

    #[test]
    fn status_strings_round_trip() {
        for s in SessionStatus::ALL {
            assert_eq!(SessionStatus::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::Value::String(s.as_str().into()))
            );
        }
    }
}
