//! Media: what a file is (sniffed from its bytes, never taken from the caller's word) and
//! what WhatsApp takes of each kind of message. Files are kept by `media_store/` (their rows:
//! `store/media.rs`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, ErrorCode};

/// The largest upload: WhatsApp's limit for a document, the largest kind.
pub const UPLOAD_MAX_BYTES: u64 = 100 * MB;
/// The size of a stored chunk (`media_chunks`).
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// How many bytes sniffing looks at.
pub const SNIFF_BYTES: usize = 8 * 1024;

const MB: u64 = 1024 * 1024;

/// An uploaded file, as `POST /api/v1/media` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Media {
    /// ULID: the `mediaId` a message names.
    pub id: String,
    /// What the bytes are, sniffed from them.
    pub mime_type: String,
    /// Bytes.
    pub size: i64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// When it is deleted (epoch milliseconds): a message must be sent before.
    pub expires_at: i64,
}

impl Media {
    /// The record of file `id` of `mime_type`, `size` bytes whose SHA-256 is `sha256`,
    /// stored now and kept `keep_ms`.
    pub fn new(id: String, mime_type: String, size: u64, sha256: &[u8], keep_ms: i64) -> Media {
        let now = crate::db::now_ms();
        Media {
            id,
            mime_type,
            size: i64::try_from(size).unwrap_or(i64::MAX),
            sha256: crate::hex(sha256),
            created_at: now,
            expires_at: now + keep_ms,
        }
    }

    /// The record of `bytes`, a file of `mime_type` made now and kept `keep_ms`: a new id,
    /// their size and SHA-256.
    pub fn of(bytes: &[u8], mime_type: String, keep_ms: i64) -> Media {
        use sha2::{Digest, Sha256};
        let id = ulid::Ulid::new().to_string();
        Media::new(
            id,
            mime_type,
            bytes.len() as u64,
            &Sha256::digest(bytes),
            keep_ms,
        )
    }
}

/// The kinds of message that carry a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Image,
    Video,
    Audio,
    /// A push-to-talk voice note.
    Voice,
    Document,
    Sticker,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Video => "video",
            Kind::Audio => "audio",
            Kind::Voice => "voice",
            Kind::Document => "document",
            Kind::Sticker => "sticker",
        }
    }

    /// The kind a file of `mime_type` goes as when nobody says (a file a contact sends).
    pub fn for_mime(mime_type: &str) -> Kind {
        match mime_type {
            "image/jpeg" | "image/png" => Kind::Image,
            "image/webp" => Kind::Sticker,
            "video/mp4" | "video/3gpp" => Kind::Video,
            "audio/ogg; codecs=opus" => Kind::Voice,
            "audio/aac" | "audio/mp4" | "audio/mpeg" | "audio/amr" | "audio/ogg" => Kind::Audio,
            _ => Kind::Document,
        }
    }

    /// A message of this kind carrying `file`.
    pub fn content(self, file: crate::message::MediaContent) -> crate::message::Content {
        use crate::message::Content;
        match self {
            Kind::Image => Content::Image {
                image: Box::new(file),
            },
            Kind::Video => Content::Video {
                video: Box::new(file),
            },
            Kind::Audio => Content::Audio {
                audio: Box::new(file),
            },
            Kind::Voice => Content::Voice {
                voice: Box::new(file),
            },
            Kind::Document => Content::Document {
                document: Box::new(file),
            },
            Kind::Sticker => Content::Sticker {
                sticker: Box::new(file),
            },
        }
    }

    /// WhatsApp's limit for the kind, in bytes.
    pub fn max_bytes(self) -> u64 {
        match self {
            Kind::Image => 5 * MB,
            Kind::Video | Kind::Audio | Kind::Voice => 16 * MB,
            Kind::Document => UPLOAD_MAX_BYTES,
            Kind::Sticker => 500 * 1024,
        }
    }

    /// Whether a file of `mime_type`, `size` bytes, goes out as this kind; the error says
    /// why not (400 for the type, 413 for the size).
    pub fn accepts(self, field: &str, mime_type: &str, size: u64) -> Result<(), Error> {
        let ok = match self {
            Kind::Image => matches!(mime_type, "image/jpeg" | "image/png"),
            Kind::Video => matches!(mime_type, "video/mp4" | "video/3gpp"),
            Kind::Audio => matches!(
                mime_type,
                "audio/aac" | "audio/mp4" | "audio/mpeg" | "audio/amr" | "audio/ogg"
            ),
            Kind::Voice => mime_type == "audio/ogg; codecs=opus",
            Kind::Sticker => mime_type == "image/webp",
            Kind::Document => true,
        };
        if !ok {
            let wanted = match self {
                Kind::Image => "JPEG or PNG",
                Kind::Video => "MP4 or 3GPP",
                Kind::Audio => "AAC, MP4, MP3, AMR or OGG audio",
                Kind::Voice => "OGG with Opus inside (a voice note WhatsApp can play)",
                Kind::Sticker => "WebP",
                Kind::Document => "any file",
            };
            return Err(Error::invalid_field(
                field,
                format!(
                    "a {} must be {wanted}; this file is {mime_type}",
                    self.as_str()
                ),
            ));
        }
        if size > self.max_bytes() {
            return Err(self.too_large(field, Some(size)));
        }
        Ok(())
    }

    /// 413: a file over the kind's limit (its size, when known).
    pub fn too_large(self, field: &str, size: Option<u64>) -> Error {
        let this = size.map_or("this file is larger".to_owned(), |size| {
            format!("this file is {}", human(size))
        });
        let e = Error::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "WhatsApp takes a {} of at most {}; {this}",
                self.as_str(),
                human(self.max_bytes()),
            ),
        )
        .with_detail("field", field)
        .with_detail("maxBytes", self.max_bytes());
        match size {
            Some(size) => e.with_detail("size", size),
            None => e,
        }
    }
}

/// `bytes` for people: "5 MB", "512 KB", "7.2 MB".
pub fn human(bytes: u64) -> String {
    if bytes >= MB {
        let mb = bytes as f64 / MB as f64;
        if mb.fract() == 0.0 {
            format!("{mb:.0} MB")
        } else {
            format!("{mb:.1} MB")
        }
    } else {
        format!("{} KB", bytes.div_ceil(1024))
    }
}

/// What a file is, from its first bytes and (only where bytes cannot tell: plain text) the
/// type its sender declared. `Err` says why it is refused: the bytes contradict the
/// declared type (a mislabelled file), or nothing says what they are.
pub fn sniff(head: &[u8], declared: Option<&str>) -> Result<String, String> {
    let declared = declared
        .map(|d| {
            d.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|d| !d.is_empty());
    let sniffed = infer::get(head).map(|t| t.mime_type().to_owned());
    let sniffed = match sniffed.as_deref() {
        // An OGG file with an Opus stream is what WhatsApp plays as a voice note.
        Some("audio/ogg") if head.windows(8).any(|w| w == b"OpusHead") => {
            Some("audio/ogg; codecs=opus".to_owned())
        }
        _ => sniffed,
    };
    let generic = |d: &str| matches!(d, "application/octet-stream" | "binary/octet-stream");
    match (sniffed, declared) {
        (Some(s), Some(d)) if !generic(&d) && !same_type(&s, &d) => Err(format!(
            "the file is {s}, not the {d} its Content-Type says"
        )),
        (Some(s), _) => Ok(s),
        // Text has no magic number: a declared text type is taken, if the bytes are text.
        (None, Some(d)) if is_textual(&d) && looks_textual(head) => Ok(d),
        (None, Some(d)) if generic(&d) => Ok("application/octet-stream".into()),
        (None, Some(d)) => Err(format!("the bytes are not {d}")),
        (None, None) => Ok("application/octet-stream".into()),
    }
}

/// Whether a sniffed and a declared type name the same thing (aliases included).
fn same_type(sniffed: &str, declared: &str) -> bool {
    let base = sniffed.split(';').next().unwrap_or(sniffed);
    fn alias(t: &str) -> &str {
        match t {
            "image/jpg" => "image/jpeg",
            "audio/mp3" => "audio/mpeg",
            "audio/x-m4a" | "audio/m4a" => "audio/mp4",
            "application/ogg" | "audio/opus" => "audio/ogg",
            "video/quicktime" => "video/mp4",
            "application/x-zip-compressed" => "application/zip",
            other => other,
        }
    }
    alias(base) == alias(declared)
        // Office documents are zip files underneath.
        || (base == "application/zip" && declared.starts_with("application/vnd.openxmlformats"))
}

fn is_textual(mime: &str) -> bool {
    mime.starts_with("text/")
        || matches!(
            mime,
            "application/json" | "application/xml" | "application/csv" | "application/x-ndjson"
        )
}

/// UTF-8 without NUL (a UTF-8 sequence cut by the end of `head` is fine: sniffing reads a
/// fixed number of bytes).
fn looks_textual(head: &[u8]) -> bool {
    let whole = match std::str::from_utf8(head) {
        Ok(_) => head,
        Err(e) if e.error_len().is_none() => &head[..e.valid_up_to()],
        Err(_) => return false,
    };
    !whole.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    const PDF: &[u8] = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n";

    #[test]
    fn the_bytes_say_what_a_file_is() {
        assert_eq!(sniff(PNG, Some("image/png")).as_deref(), Ok("image/png"));
        assert_eq!(sniff(PNG, None).as_deref(), Ok("image/png"));
        assert_eq!(
            sniff(PNG, Some("application/octet-stream")).as_deref(),
            Ok("image/png")
        );
        assert_eq!(
            sniff(PDF, Some("application/pdf; charset=binary")).as_deref(),
            Ok("application/pdf")
        );
        assert!(sniff(PDF, Some("image/png")).is_err(), "mislabelled");
        assert_eq!(
            sniff(b"name,phone\nAna,62811\n", Some("text/csv")).as_deref(),
            Ok("text/csv")
        );
        assert!(sniff(b"\0\x01\x02 not text", Some("text/plain")).is_err());
        assert!(sniff(b"just words", Some("image/png")).is_err());
    }

    #[test]
    fn each_kind_takes_its_types_within_whatsapps_limits() {
        assert!(Kind::Image.accepts("image", "image/png", 1_000).is_ok());
        let e = Kind::Image
            .accepts("image", "application/pdf", 1_000)
            .expect_err("a PDF is no image");
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        let e = Kind::Image
            .accepts("image", "image/jpeg", 6 * MB)
            .expect_err("6 MB is too large an image");
        assert_eq!(e.code(), ErrorCode::PayloadTooLarge);
        assert!(e.body.message.contains("5 MB"), "{}", e.body.message);
        assert!(Kind::Voice.accepts("voice", "audio/mpeg", 1_000).is_err());
        assert!(
            Kind::Voice
                .accepts("voice", "audio/ogg; codecs=opus", 1_000)
                .is_ok()
        );
        assert!(
            Kind::Document
                .accepts("document", "text/csv", 99 * MB)
                .is_ok()
        );
        assert_eq!(human(7_549_747), "7.2 MB");
    }
}
