//! The file a message carries ([`MediaContent`]): named by an upload's id or by a URL, what
//! a caller may say of it, and what the gateway fills in from its bytes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::content::validate_message_id;
use crate::error::{Error, Result};

/// The file a message carries: one uploaded with `POST /api/v1/media`, by its id, or one at a
/// `url`, fetched once when the message is accepted (the message then names it by its
/// `mediaId`). What the file is, its size and SHA-256 are filled in from its bytes (what a
/// caller says of them is not taken).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MediaContent {
    /// The `id` that `POST /api/v1/media` answered. Either this or `url`.
    #[serde(default)]
    pub media_id: String,
    /// Where to fetch the file: `https://`, a public address, at most 5 redirects, within the
    /// time the api allows (30 s by default). Either this or `mediaId`; not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 2048, write_only)]
    pub url: Option<String>,
    /// Image, video and document only: up to 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub caption: Option<String>,
    /// Document only: the name the recipient sees, up to 255 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 255)]
    pub file_name: Option<String>,
    /// What the file is (from its bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub mime_type: Option<String>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub size: Option<i64>,
    /// Lowercase hex SHA-256 of the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub sha256: Option<String>,
    /// A received file that could not be fetched from WhatsApp: `failed`, and `error` says
    /// why. The message is kept, without its file (no `mediaId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub status: Option<MediaStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub error: Option<String>,
}

/// What became of a received file that is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MediaStatus {
    Failed,
}

/// The longest caption, in characters.
pub const CAPTION_MAX_CHARS: usize = 1_024;
/// The longest file name, in characters.
pub const FILE_NAME_MAX_CHARS: usize = 255;

impl MediaContent {
    pub(super) fn validate(&self, kind: crate::media::Kind) -> Result<()> {
        use crate::media::Kind;
        let field = |f: &str| format!("{}.{f}", kind.as_str());
        if self.status.is_some() || self.error.is_some() {
            return Err(Error::invalid_field(
                &field("status"),
                "status and error say what became of a received file; a message to send has neither",
            ));
        }
        match (&self.url, self.media_id.is_empty()) {
            (None, false) => validate_message_id(&field("mediaId"), &self.media_id)?,
            (Some(_), true) => {}
            (None, true) | (Some(_), false) => {
                return Err(Error::invalid_field(
                    &field("mediaId"),
                    format!(
                        "a {} names its file by mediaId (an upload's id) or by url, one of them",
                        kind.as_str()
                    ),
                ));
            }
        }
        if let Some(caption) = &self.caption {
            if !matches!(kind, Kind::Image | Kind::Video | Kind::Document) {
                return Err(Error::invalid_field(
                    &field("caption"),
                    format!("a {} has no caption", kind.as_str()),
                ));
            }
            if caption.chars().count() > CAPTION_MAX_CHARS || caption.contains('\0') {
                return Err(Error::invalid_field(
                    &field("caption"),
                    format!("a caption is at most {CAPTION_MAX_CHARS} characters, without NUL"),
                ));
            }
        }
        if let Some(name) = &self.file_name {
            if kind != Kind::Document {
                return Err(Error::invalid_field(
                    &field("fileName"),
                    "only a document has a file name",
                ));
            }
            if name.trim().is_empty()
                || name.chars().count() > FILE_NAME_MAX_CHARS
                || name
                    .chars()
                    .any(|c| c.is_control() || c == '/' || c == '\\')
            {
                return Err(Error::invalid_field(
                    &field("fileName"),
                    format!(
                        "a file name is 1 to {FILE_NAME_MAX_CHARS} characters, without / \\ or control characters"
                    ),
                ));
            }
        }
        Ok(())
    }
}
