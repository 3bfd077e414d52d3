//! Files over WhatsApp: what the driver sends and receives when a message carries one.
//! WhatsApp's media hosts keep the bytes, encrypted under a key of their own that only the
//! message carries: a file goes out encrypted as it streams out of the media store, into a
//! temporary file, then uploaded from there to the hosts a `media_conn` query names (the
//! crate's `upload_stream`; memory holds a piece of the file, whatever its size), and then
//! its message; a contact's file is downloaded by its
//! message's direct path and keys (the crate's `download`), and a dead link is recovered
//! with WhatsApp's media re-upload request to the sender's phone.

use std::{
    io::{Read, Seek},
    sync::Arc,
};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use shared::{
    media::Kind,
    media_store::FileStream,
    message::{Content, MediaContent},
};
use wacore::{
    download::{Downloadable, MediaType},
    proto_helpers::MessageExt,
};
use whatsapp_rust::{
    MediaRetryResult, MediaReuploadRequest,
    upload::UploadResponse,
    waproto::{buffa::MessageField, whatsapp as wa},
};

use super::{content, parse_jid, send_failed};
use crate::driver::{DriverError, MessageRef, Outgoing, Received, RemoteFile};

/// Uploads the file `message` carries, then sends the message that names it: WhatsApp's id
/// of it.
pub(super) async fn send(
    client: &Arc<whatsapp_rust::Client>,
    jid: whatsapp_rust::Jid,
    mut message: Outgoing,
    own: &str,
) -> Result<Option<String>, DriverError> {
    let content = &message.content;
    let (kind, _) = content
        .media()
        .ok_or_else(|| DriverError::Refused("not a file".into()))?;
    let file = message.media.take().ok_or_else(|| {
        DriverError::Refused(format!("the {} has no file to send", kind.as_str()))
    })?;
    let (info, ciphertext) = encrypt(file, media_type(kind)).await?;
    let upload = client
        .upload_stream(ciphertext, info, media_type(kind))
        .await
        .map_err(|e| {
            DriverError::Connection(format!(
                "could not upload the file to WhatsApp's media hosts: {e}"
            ))
        })?;
    let wa_message = media_to_wa(content, upload.into(), message.reply_to.as_ref(), own)
        .ok_or_else(|| DriverError::Refused("not a file".into()))?;
    client
        .send_message(jid, wa_message)
        .await
        .map(|s| Some(s.message_id))
        .map_err(|e| send_failed(&e))
}

/// A file encrypted for WhatsApp's media hosts, in a temporary file of its own (deleted
/// when the upload is done with it): what the upload reads, from any offset, as often as
/// it retries.
struct Ciphertext {
    path: tempfile::TempPath,
    len: u64,
}

impl wacore::upload::UploadSource for Ciphertext {
    fn len(&self) -> u64 {
        self.len
    }

    fn reader_from(&self, offset: u64) -> std::io::Result<Box<dyn Read + Send>> {
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(std::io::SeekFrom::Start(offset))?;
        Ok(Box::new(file))
    }
}

/// Encrypts `file` as it streams out of the media store (WhatsApp's AES-CBC and HMAC under
/// a fresh key, and the seek table of audio and video), into a temporary file.
async fn encrypt(
    file: FileStream,
    media_type: MediaType,
) -> Result<(wacore::upload::EncryptedMediaInfo, Ciphertext), DriverError> {
    let failed = |e: &dyn std::fmt::Display| {
        DriverError::Connection(format!("could not encrypt the file for WhatsApp: {e}"))
    };
    let sidecar = matches!(media_type, MediaType::Audio | MediaType::Video);
    let mut encryptor = wacore::upload::MediaEncryptor::new_with_sidecar(media_type, sidecar)
        .map_err(|e| failed(&e))?;
    let (std_file, path) = tempfile::NamedTempFile::new()
        .map_err(|e| failed(&e))?
        .into_parts();
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::from_std(std_file));
    let (mut pieces, mut buf, mut len) = (file.pieces, Vec::new(), 0u64);
    while let Some(piece) = pieces.next().await {
        let piece = piece.map_err(|e| {
            DriverError::Connection(format!(
                "the file could not be read from the media store: {e}"
            ))
        })?;
        buf.clear();
        encryptor.update(&piece, &mut buf);
        out.write_all(&buf).await.map_err(|e| failed(&e))?;
        len += buf.len() as u64;
    }
    buf.clear();
    let info = encryptor.finalize(&mut buf).map_err(|e| failed(&e))?;
    out.write_all(&buf).await.map_err(|e| failed(&e))?;
    out.flush().await.map_err(|e| failed(&e))?;
    len += buf.len() as u64;
    Ok((info, Ciphertext { path, len }))
}

/// A file a contact sent, decrypted as it streams in (its MAC checked) into a temporary
/// file; a dead link is asked for again.
pub(super) async fn download(
    client: &Arc<whatsapp_rust::Client>,
    file: &RemoteFile,
) -> Result<Received, DriverError> {
    let first = match fetch(client, file).await {
        Ok(received) => return Ok(received),
        Err(e) => e,
    };
    // A dead link (WhatsApp's hosts keep a file for a while): the sender's phone is asked
    // to upload it again (WhatsApp's media re-upload request), then the new path is read.
    let failed = |why: String| {
        DriverError::Connection(format!("could not download the file ({first}); {why}"))
    };
    let chat = parse_jid(&file.chat)?;
    let asked = client
        .media_reupload()
        .request(&MediaReuploadRequest {
            msg_id: &file.message_id,
            chat_jid: &chat,
            media_key: &file.media_key,
            is_from_me: false,
            participant: None,
        })
        .await;
    let direct_path = match asked {
        Ok(MediaRetryResult::Success { direct_path }) => direct_path,
        Ok(MediaRetryResult::NotFound) => {
            return Err(failed("the sender's phone no longer has it".into()));
        }
        Ok(other) => {
            return Err(failed(format!(
                "the sender's phone could not upload it again ({other:?})"
            )));
        }
        Err(e) => return Err(failed(format!("asking for it again failed: {e}"))),
    };
    let again = RemoteFile {
        direct_path,
        ..file.clone()
    };
    fetch(client, &again)
        .await
        .map_err(|e| failed(format!("uploaded again, it still could not be read: {e}")))
}

/// Downloads `file` from its direct path into a temporary file, rewound.
async fn fetch(client: &Arc<whatsapp_rust::Client>, file: &RemoteFile) -> anyhow::Result<Received> {
    let sink = tempfile::tempfile()?;
    let mut sink = client.download_to_writer(&Remote(file), sink).await?;
    let size = sink.seek(std::io::SeekFrom::End(0))?;
    sink.rewind()?;
    Ok(Received { file: sink, size })
}

/// How WhatsApp's media hosts file a kind of file (its keys are derived by it).
pub fn media_type(kind: Kind) -> MediaType {
    match kind {
        Kind::Image => MediaType::Image,
        Kind::Video => MediaType::Video,
        Kind::Audio | Kind::Voice => MediaType::Audio,
        Kind::Document => MediaType::Document,
        Kind::Sticker => MediaType::Sticker,
    }
}

/// A file on WhatsApp's media hosts, as a message names it: where it is and the key that
/// opens it (the crate's upload answers it; the test server's phones make their own).
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub url: String,
    pub direct_path: String,
    pub media_key: [u8; 32],
    pub file_sha256: [u8; 32],
    pub file_enc_sha256: [u8; 32],
    pub file_length: u64,
    /// When the key was made (Unix seconds).
    pub media_key_timestamp: i64,
    /// Audio and video: the HMAC table that lets a player seek before the whole file is in.
    pub streaming_sidecar: Option<Vec<u8>>,
}

impl From<UploadResponse> for Uploaded {
    fn from(u: UploadResponse) -> Uploaded {
        Uploaded {
            url: u.url,
            direct_path: u.direct_path,
            media_key: u.media_key,
            file_sha256: u.file_sha256,
            file_enc_sha256: u.file_enc_sha256,
            file_length: u.file_length,
            media_key_timestamp: u.media_key_timestamp,
            streaming_sidecar: u.streaming_sidecar,
        }
    }
}

/// One of WhatsApp's file messages: the fields every one has, from `$u`, then its own.
macro_rules! file_message {
    ($ty:ident, $u:expr, $mime:expr, $context:expr, { $($field:ident: $value:expr),* $(,)? }) => {
        MessageField::some(wa::message::$ty {
            url: Some($u.url),
            direct_path: Some($u.direct_path),
            media_key: Some($u.media_key.to_vec()),
            file_sha256: Some($u.file_sha256.to_vec()),
            file_enc_sha256: Some($u.file_enc_sha256.to_vec()),
            file_length: Some($u.file_length),
            media_key_timestamp: Some($u.media_key_timestamp),
            mimetype: Some($mime),
            context_info: $context,
            $($field: $value,)*
            ..Default::default()
        })
    };
}

/// The message for the file `content` carries, once uploaded, quoting `reply_to`. `None`
/// for content that carries no file.
pub fn media_to_wa(
    content: &Content,
    u: Uploaded,
    reply_to: Option<&MessageRef>,
    own_jid: &str,
) -> Option<wa::Message> {
    let (kind, file) = content.media()?;
    let context =
        content::quote(reply_to, own_jid).map_or_else(MessageField::none, MessageField::some);
    let mime = file
        .mime_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    let caption = file.caption.clone();
    let mut message = wa::Message::default();
    match kind {
        Kind::Image => {
            message.image_message =
                file_message!(ImageMessage, u, mime, context, { caption: caption })
        }
        Kind::Video => {
            let sidecar = u.streaming_sidecar.clone();
            message.video_message = file_message!(VideoMessage, u, mime, context,
                { caption: caption, streaming_sidecar: sidecar })
        }
        Kind::Audio | Kind::Voice => {
            let sidecar = u.streaming_sidecar.clone();
            message.audio_message = file_message!(AudioMessage, u, mime, context,
                { ptt: Some(kind == Kind::Voice), streaming_sidecar: sidecar })
        }
        Kind::Document => {
            message.document_message = file_message!(DocumentMessage, u, mime, context, {
                caption: caption,
                file_name: file.file_name.clone(),
                title: file.file_name.clone(),
            })
        }
        Kind::Sticker => {
            message.sticker_message = file_message!(StickerMessage, u, mime, context, {})
        }
    }
    Some(message)
}

/// A file message as our content: what WhatsApp says of the file (its type, size, SHA-256 of
/// the plain bytes, caption, name). `mediaId` is left empty: the bytes are not here (they
/// are on WhatsApp's media hosts, encrypted: [`remote_file`] says where).
pub(super) fn file_from_wa(base: &wa::Message) -> Option<Content> {
    let f = FileMessage::of(base)?;
    Some(f.kind.content(MediaContent {
        media_id: String::new(),
        url: None,
        caption: f.caption.map(str::to_owned),
        file_name: f.file_name.map(str::to_owned),
        mime_type: f.mime_type.map(str::to_owned),
        size: f.fetch.file_length().and_then(|n| i64::try_from(n).ok()),
        sha256: f.fetch.file_sha256().map(shared::hex),
        status: None,
        error: None,
    }))
}

/// Where the file a received message carries is: WhatsApp's direct path and what the message
/// says of it. `None` for a message without a file (or one without its keys).
pub fn remote_file(message: &wa::Message, id: &str, chat: &str) -> Option<RemoteFile> {
    let f = FileMessage::of(message.get_base_message())?;
    Some(RemoteFile {
        message_id: id.to_owned(),
        chat: chat.to_owned(),
        kind: f.kind,
        direct_path: f.fetch.direct_path()?.to_owned(),
        media_key: f.fetch.media_key()?.to_vec(),
        file_sha256: f.fetch.file_sha256()?.to_vec(),
        file_enc_sha256: f.fetch.file_enc_sha256()?.to_vec(),
        file_length: f.fetch.file_length().unwrap_or(0),
    })
}

/// One of WhatsApp's five file messages, read alike.
struct FileMessage<'a> {
    kind: Kind,
    /// Where it is and its keys.
    fetch: &'a dyn Downloadable,
    mime_type: Option<&'a str>,
    caption: Option<&'a str>,
    file_name: Option<&'a str>,
}

impl<'a> FileMessage<'a> {
    fn of(base: &'a wa::Message) -> Option<FileMessage<'a>> {
        let f = |kind, fetch, mime: &'a Option<String>, caption: Option<&'a String>| FileMessage {
            kind,
            fetch,
            mime_type: mime.as_deref(),
            caption: caption.map(String::as_str),
            file_name: None,
        };
        if let Some(m) = base.image_message.as_option() {
            return Some(f(Kind::Image, m, &m.mimetype, m.caption.as_ref()));
        }
        if let Some(m) = base.video_message.as_option() {
            return Some(f(Kind::Video, m, &m.mimetype, m.caption.as_ref()));
        }
        if let Some(m) = base.audio_message.as_option() {
            let kind = if m.ptt == Some(true) {
                Kind::Voice
            } else {
                Kind::Audio
            };
            return Some(f(kind, m, &m.mimetype, None));
        }
        if let Some(m) = base.document_message.as_option() {
            let document = f(Kind::Document, m, &m.mimetype, m.caption.as_ref());
            return Some(FileMessage {
                file_name: m.file_name.as_deref(),
                ..document
            });
        }
        let m = base.sticker_message.as_option()?;
        Some(f(Kind::Sticker, m, &m.mimetype, None))
    }
}

/// What the crate downloads by: our [`RemoteFile`] as WhatsApp's message fields.
pub struct Remote<'a>(pub &'a RemoteFile);

impl Downloadable for Remote<'_> {
    fn direct_path(&self) -> Option<&str> {
        Some(&self.0.direct_path)
    }
    fn media_key(&self) -> Option<&[u8]> {
        Some(&self.0.media_key)
    }
    fn file_enc_sha256(&self) -> Option<&[u8]> {
        Some(&self.0.file_enc_sha256)
    }
    fn file_sha256(&self) -> Option<&[u8]> {
        Some(&self.0.file_sha256)
    }
    fn file_length(&self) -> Option<u64> {
        Some(self.0.file_length)
    }
    fn app_info(&self) -> MediaType {
        media_type(self.0.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_message_reads_back_with_where_its_bytes_are() {
        let uploaded = Uploaded {
            url: "https://mmg.example/v/t62/abc".into(),
            direct_path: "/v/t62/abc".into(),
            media_key: [1; 32],
            file_sha256: [2; 32],
            file_enc_sha256: [3; 32],
            file_length: 1234,
            media_key_timestamp: 1_700_000_000,
            streaming_sidecar: None,
        };
        for (kind, caption, name) in [
            (Kind::Image, Some("parcel"), None),
            (Kind::Document, Some("invoice"), Some("invoice.pdf")),
            (Kind::Voice, None, None),
            (Kind::Audio, None, None),
            (Kind::Video, Some("clip"), None),
            (Kind::Sticker, None, None),
        ] {
            let content = kind.content(MediaContent {
                media_id: "01J0000000000000000000000A".into(),
                url: None,
                caption: caption.map(str::to_owned),
                file_name: name.map(str::to_owned),
                mime_type: Some("application/x-test".into()),
                size: Some(1234),
                sha256: None,
                status: None,
                error: None,
            });
            let wa = media_to_wa(&content, uploaded.clone(), None, "").expect("a file message");
            let (back_kind, back) = content::from_wa(&wa)
                .and_then(|c| {
                    let (k, f) = c.media()?;
                    Some((k, f.clone()))
                })
                .expect("read back");
            assert_eq!(back_kind, kind);
            assert_eq!(back.caption.as_deref(), caption, "{kind:?}");
            assert_eq!(back.file_name.as_deref(), name, "{kind:?}");
            assert_eq!(back.mime_type.as_deref(), Some("application/x-test"));
            assert_eq!(back.size, Some(1234));
            assert_eq!(back.sha256, Some(shared::hex(&[2; 32])));
            assert!(back.media_id.is_empty(), "the bytes are not here");
            let remote = remote_file(&wa, "3EB0", "6281100000002@s.whatsapp.net").expect("where");
            assert_eq!(
                (remote.kind, remote.direct_path.as_str(), remote.file_length),
                (kind, "/v/t62/abc", 1234)
            );
            assert_eq!(remote.media_key, vec![1; 32]);
        }
    }
}
