//! The server's end of a WhatsApp stream: WhatsApp's framing over WebSocket binary messages,
//! the Noise handshakes (XX on first contact, IK from the client's cached server key, and the
//! XX fallback when that key is not ours), then every stanza as one AES-GCM frame.
//!
//! Read against `wacore-noise` (the client's half) and the crate's own in-process responder in
//! `whatsapp-rust/tests/handshake_integration.rs`; `NOTES.md` §1–2 says
//! which file and line each step answers.

use bytes::BytesMut;
use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::net::TcpStream;
use tokio_websockets::{Message, WebSocketStream};
use wacore::{
    handshake::NoiseHandshake,
    libsignal::protocol::{KeyPair, PrivateKey},
    noise::{NoiseCipher, framing::FrameDecoder},
};
use wacore_binary::{
    Node,
    consts::{NOISE_PATTERN_IK, NOISE_PATTERN_XX, NOISE_PATTERN_XXFALLBACK, WA_CONN_HEADER},
};
use waproto::{
    buffa::{Message as _, MessageField},
    whatsapp as wa,
};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

type Ws = WebSocketStream<TcpStream>;

/// The server's long-lived Noise key and the certificate chain that names it. The chain is
/// the crate's test chain (zero signatures): only a client built with
/// `danger-skip-cert-chain-verify` accepts it, which is the point.
pub struct ServerIdentity {
    static_key: KeyPair,
    static_pub: [u8; 32],
    cert_chain: Vec<u8>,
}

impl ServerIdentity {
    /// The same key on every start (from a fixed seed): a device that cached it keeps
    /// connecting with IK across restarts of the server, as with WhatsApp's own.
    pub fn fixed() -> ServerIdentity {
        use sha2::Digest;
        let seed: [u8; 32] = sha2::Sha256::digest(b"gateway wa-server static key").into();
        let private = PrivateKey::deserialize(&seed).expect("a 32-byte private key");
        let static_key = KeyPair::try_from(private).expect("its public key");
        let static_pub: [u8; 32] = static_key
            .public_key
            .public_key_bytes()
            .try_into()
            .expect("X25519 keys are 32 bytes");
        ServerIdentity {
            cert_chain: wacore::noise::test_util::build_cert_chain_bytes(&static_pub),
            static_key,
            static_pub,
        }
    }
}

/// A stream whose handshake is done: who the client is and what it asked for.
pub struct Accepted {
    /// The client's static Noise key: a device's identity on the wire (and field 2 of its
    /// pairing QR code).
    pub client_static: [u8; 32],
    pub payload: wa::ClientPayload,
    pub reader: Reader,
    pub writer: Writer,
    /// Which handshake it was: `XX`, `IK` or `XXfallback`.
    pub pattern: &'static str,
}

pub struct Reader {
    ws: SplitStream<Ws>,
    frames: FrameDecoder,
    first: bool,
    cipher: Option<NoiseCipher>,
    counter: u32,
}

pub struct Writer {
    ws: SplitSink<Ws, Message>,
    cipher: Option<NoiseCipher>,
    counter: u32,
}

impl Reader {
    /// The next frame's payload; `None` once the client closed the stream.
    async fn frame(&mut self) -> Result<Option<BytesMut>> {
        loop {
            if let Some(frame) = self.frames.decode_frame() {
                return Ok(Some(frame));
            }
            let Some(msg) = self.ws.next().await else {
                return Ok(None);
            };
            let msg = msg?;
            if msg.is_close() {
                return Ok(None);
            }
            if !msg.is_binary() {
                continue;
            }
            let mut data: &[u8] = msg.as_payload();
            if self.first {
                // Only the client's first message carries the intro header.
                self.first = false;
                data = data
                    .strip_prefix(&WA_CONN_HEADER[..])
                    .ok_or("the stream does not start with WhatsApp's header")?;
            }
            self.frames.feed(data);
        }
    }

    /// The next stanza; `None` once the client closed the stream.
    pub async fn node(&mut self) -> Result<Option<Node>> {
        let Some(mut frame) = self.frame().await? else {
            return Ok(None);
        };
        let cipher = self.cipher.as_ref().ok_or("the handshake is not done")?;
        cipher.decrypt_in_place_with_counter(self.counter, &mut frame)?;
        self.counter += 1;
        let plain = wacore_binary::util::unpack(&frame)?;
        Ok(Some(
            wacore_binary::marshal::unmarshal_ref(&plain)?.to_owned(),
        ))
    }
}

impl Writer {
    async fn frame(&mut self, payload: &[u8]) -> Result<()> {
        let framed = wacore::framing::encode_frame(payload, None)?;
        self.ws.send(Message::binary(framed)).await?;
        Ok(())
    }

    pub async fn node(&mut self, node: &Node) -> Result<()> {
        let plain = wacore_binary::marshal::marshal(node)?;
        let cipher = self.cipher.as_ref().ok_or("the handshake is not done")?;
        let sealed = cipher.encrypt_with_counter(self.counter, &plain)?;
        self.counter += 1;
        self.frame(&sealed).await
    }

    /// Closes the WebSocket, as WhatsApp does after a stream error.
    pub async fn close(&mut self) {
        let _ = self.ws.send(Message::close(None, "")).await;
        let _ = self.ws.close().await;
    }
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| format!("{what} is {} bytes, not 32", bytes.len()).into())
}

fn public(key: &KeyPair) -> [u8; 32] {
    key.public_key
        .public_key_bytes()
        .try_into()
        .expect("X25519 keys are 32 bytes")
}

/// Runs the server's side of the handshake the client chose.
pub async fn accept(ws: Ws, server: &ServerIdentity) -> Result<Accepted> {
    let (sink, stream) = ws.split();
    let mut reader = Reader {
        ws: stream,
        frames: FrameDecoder::new(),
        first: true,
        cipher: None,
        counter: 0,
    };
    let mut writer = Writer {
        ws: sink,
        cipher: None,
        counter: 0,
    };
    let hello = reader.frame().await?.ok_or("closed before its hello")?;
    let hello = wa::HandshakeMessage::decode_from_slice(&hello)?
        .client_hello
        .into_option()
        .ok_or("no ClientHello")?;
    let ephemeral = key32(
        &hello.ephemeral.unwrap_or_default(),
        "the client's ephemeral key",
    )?;

    let (noise, client_static, payload, pattern) = match (hello.r#static, hello.payload) {
        (Some(sealed_static), Some(sealed_payload)) => {
            // IK: the client already knows our static key and sends its own at once.
            let mut n = NoiseHandshake::new(NOISE_PATTERN_IK, &WA_CONN_HEADER)?;
            n.authenticate(&server.static_pub);
            n.authenticate(&ephemeral);
            n.mix_shared_secret(server.static_key.private_key.serialize(), &ephemeral)?;
            match n.decrypt(&sealed_static) {
                Ok(client_static) => {
                    let client_static = key32(&client_static, "the client's static key")?;
                    n.mix_shared_secret(server.static_key.private_key.serialize(), &client_static)?;
                    let payload = n.decrypt(&sealed_payload)?;
                    let e = KeyPair::generate(&mut rand010::rng());
                    n.authenticate(&public(&e));
                    n.mix_shared_secret(e.private_key.serialize(), &ephemeral)?;
                    n.mix_shared_secret(e.private_key.serialize(), &client_static)?;
                    let cert = n.encrypt(&server.cert_chain)?;
                    writer
                        .frame(&server_hello(&e, None, cert).encode_to_vec())
                        .await?;
                    (n, client_static, payload, "IK")
                }
                Err(_) => {
                    // Sealed to a key that is not ours: start over from its ephemeral.
                    let mut n = NoiseHandshake::new(NOISE_PATTERN_XXFALLBACK, &WA_CONN_HEADER)?;
                    n.authenticate(&ephemeral);
                    let (client_static, payload) =
                        xx(&mut n, &ephemeral, server, &mut reader, &mut writer).await?;
                    (n, client_static, payload, "XXfallback")
                }
            }
        }
        _ => {
            let mut n = NoiseHandshake::new(NOISE_PATTERN_XX, &WA_CONN_HEADER)?;
            n.authenticate(&ephemeral);
            let (client_static, payload) =
                xx(&mut n, &ephemeral, server, &mut reader, &mut writer).await?;
            (n, client_static, payload, "XX")
        }
    };
    // Both ends split the same way: the client's write key is our read key.
    let (client_write, client_read) = noise.finish()?;
    reader.cipher = Some(client_write);
    writer.cipher = Some(client_read);
    Ok(Accepted {
        client_static,
        payload: wa::ClientPayload::decode_from_slice(&payload)?,
        reader,
        writer,
        pattern,
    })
}

fn server_hello(
    e: &KeyPair,
    sealed_static: Option<Vec<u8>>,
    payload: Vec<u8>,
) -> wa::HandshakeMessage {
    wa::HandshakeMessage {
        server_hello: MessageField::some(wa::handshake_message::ServerHello {
            ephemeral: Some(public(e).to_vec()),
            r#static: sealed_static,
            payload: Some(payload),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// XX's last two messages (and the fallback's): our ephemeral, static and certificate chain,
/// then the client's static key and payload.
async fn xx(
    n: &mut NoiseHandshake,
    client_ephemeral: &[u8; 32],
    server: &ServerIdentity,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<([u8; 32], Vec<u8>)> {
    let e = KeyPair::generate(&mut rand010::rng());
    n.authenticate(&public(&e));
    n.mix_shared_secret(e.private_key.serialize(), client_ephemeral)?;
    let sealed_static = n.encrypt(&server.static_pub)?;
    n.mix_shared_secret(server.static_key.private_key.serialize(), client_ephemeral)?;
    let cert = n.encrypt(&server.cert_chain)?;
    writer
        .frame(&server_hello(&e, Some(sealed_static), cert).encode_to_vec())
        .await?;
    let finish = reader
        .frame()
        .await?
        .ok_or("closed before its ClientFinish (a client that rejected our certificate)")?;
    let finish = wa::HandshakeMessage::decode_from_slice(&finish)?
        .client_finish
        .into_option()
        .ok_or("no ClientFinish")?;
    let client_static = n.decrypt(&finish.r#static.unwrap_or_default())?;
    let client_static = key32(&client_static, "the client's static key")?;
    n.mix_shared_secret(e.private_key.serialize(), &client_static)?;
    let payload = n.decrypt(&finish.payload.unwrap_or_default())?;
    Ok((client_static, payload))
}
