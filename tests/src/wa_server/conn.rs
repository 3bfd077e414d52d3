//! One stream, from its handshake to its end: an unregistered device is shown pairing refs
//! until a phone scans its QR code; a registered one logs in (or is refused as WhatsApp
//! refuses: unlinked, banned, outdated) and gets its post-login queries answered.
//!
//! The stanzas follow `NOTES.md` §3 (pairing, login, what the client waits for before it
//! counts as connected) and §6 (failures and stream errors).

use std::sync::Arc;

use tokio::{net::TcpStream, sync::mpsc};
use wacore_binary::{Node, builder::NodeBuilder};
use waproto::whatsapp as wa;

use super::{
    Account, Outbound, Registration, Seen, Shared, Stream,
    noise::{self, Reader, Writer},
};

pub const SERVER: &str = "s.whatsapp.net";

pub(super) async fn serve(socket: TcpStream, shared: Arc<Shared>) {
    // The same socket (a duplicate descriptor, non-blocking as the original), for peeking.
    let peek = socket2::SockRef::from(&socket)
        .try_clone()
        .ok()
        .map(|s| Arc::new(std::net::TcpStream::from(s)));
    let Ok((_, ws)) = tokio_websockets::ServerBuilder::new().accept(socket).await else {
        return;
    };
    let accepted = match noise::accept(ws, &shared.identity).await {
        Ok(accepted) => accepted,
        Err(e) => {
            shared.saw(Seen::HandshakeFailed(e.to_string()));
            return;
        }
    };
    shared.saw(Seen::Handshake {
        pattern: accepted.pattern,
    });
    let (out, rx) = mpsc::unbounded_channel();
    let stream = Stream {
        id: shared.next_id(),
        out,
        opened: std::time::Instant::now(),
        socket: peek,
    };
    let noise::Accepted {
        client_static,
        payload,
        reader,
        mut writer,
        ..
    } = accepted;
    match payload.username {
        None => {
            let registration = registration(&payload);
            shared
                .state()
                .pairing
                .insert(client_static, (stream.clone(), registration));
            if writer.node(&pair_device(stream.id)).await.is_ok() {
                pump(reader, writer, rx, &shared, None).await;
            }
            let mut state = shared.state();
            if state
                .pairing
                .get(&client_static)
                .is_some_and(|(s, _)| s.id == stream.id)
            {
                state.pairing.remove(&client_static);
            }
        }
        Some(user) => {
            let phone = user.to_string();
            let device = payload.device.unwrap_or(0) as u16;
            let lid = match admit(&shared, &phone, device, &client_static, &payload) {
                Ok(lid) => lid,
                Err(failure) => {
                    let _ = writer.node(&failure).await;
                    writer.close().await;
                    return;
                }
            };
            let success = NodeBuilder::new("success")
                .attr("t", unix_now().to_string())
                .attr("lid", format!("{lid}:{device}@lid"))
                .attr("props", "1")
                .build();
            if writer.node(&success).await.is_err() {
                return;
            }
            let replaced = shared
                .state()
                .live
                .insert((phone.clone(), device), stream.clone());
            if let Some(old) = replaced {
                let let_go = old.let_go();
                // On stderr, for the run that shows it: which streams, how old.
                eprintln!(
                    "wa test server: {phone}:{device} logged in on stream {} while its stream {} \
                     (opened {} ms before) was {}: the old one is replaced",
                    stream.id,
                    old.id,
                    stream.opened.duration_since(old.opened).as_millis(),
                    if let_go {
                        "closed by its client, its close not read yet"
                    } else {
                        "open"
                    }
                );
                if let_go {
                    end_replaced(&old);
                    shared.saw(Seen::Superseded(format!("{phone}:{device}")));
                } else {
                    replace(&shared, &old, &phone, device);
                }
            }
            shared.saw(Seen::LoggedIn(format!("{phone}:{device}")));
            pump(reader, writer, rx, &shared, Some((&phone, device))).await;
            let mut state = shared.state();
            let key = (phone, device);
            if state.live.get(&key).is_some_and(|s| s.id == stream.id) {
                state.live.remove(&key);
            }
        }
    }
}

/// Ends `old`, a stream of `phone:device`, as replaced by a newer connection of the device.
pub(super) fn replace(shared: &Shared, old: &Stream, phone: &str, device: u16) {
    end_replaced(old);
    shared.saw(Seen::Replaced(format!("{phone}:{device}")));
}

fn end_replaced(old: &Stream) {
    let conflict = NodeBuilder::new("stream:error")
        .children([NodeBuilder::new("conflict")
            .attr("type", "replaced")
            .build()])
        .build();
    let _ = old.out.send(Outbound::End(conflict));
}

fn unix_now() -> i64 {
    shared::db::now_ms() / 1000
}

/// What a device registers with in its first handshake: its Signal identity and signed
/// pre-key, the start of its bundle.
fn registration(payload: &wa::ClientPayload) -> Registration {
    let Some(data) = payload.device_pairing_data.as_option() else {
        return Registration::default();
    };
    Registration {
        registration_id: data.e_regid.clone().unwrap_or_default(),
        identity: data
            .e_ident
            .as_deref()
            .and_then(|k| k.try_into().ok())
            .unwrap_or_default(),
        signed_pre_key_id: data.e_skey_id.clone().unwrap_or_default(),
        signed_pre_key: data.e_skey_val.clone().unwrap_or_default(),
        signed_pre_key_signature: data.e_skey_sig.clone().unwrap_or_default(),
    }
}

/// Six refs, as WhatsApp sends: the client shows one after the other (60 s, then 20 s each).
fn pair_device(stream_id: u64) -> Node {
    let refs = (1..=6).map(|i| {
        NodeBuilder::new("ref")
            .bytes(format!("2@test-server-ref-{stream_id}-{i}").into_bytes())
            .build()
    });
    NodeBuilder::new("iq")
        .attr("from", SERVER)
        .attr("type", "set")
        .attr("id", format!("pair-device-{stream_id}"))
        .attr("xmlns", "md")
        .children([NodeBuilder::new("pair-device").children(refs).build()])
        .build()
}

fn failure(reason: u32) -> NodeBuilder {
    NodeBuilder::new("failure")
        .attr("reason", reason.to_string())
        .attr("location", "test")
}

/// Whether this device may log in: its account's LID, or the `<failure>` WhatsApp would send.
fn admit(
    shared: &Shared,
    phone: &str,
    device: u16,
    noise_key: &[u8; 32],
    payload: &wa::ClientPayload,
) -> std::result::Result<String, Box<Node>> {
    let state = shared.state();
    if let Some(min) = state.min_version {
        let version = payload
            .user_agent
            .as_option()
            .and_then(|ua| ua.app_version.as_option())
            .map(|v| {
                (
                    v.primary.unwrap_or(0),
                    v.secondary.unwrap_or(0),
                    v.tertiary.unwrap_or(0),
                )
            })
            .unwrap_or_default();
        if version < min {
            return Err(Box::new(failure(405).build()));
        }
    }
    let Some(account) = state.accounts.get(phone) else {
        return Err(Box::new(failure(401).build()));
    };
    // The device must be linked, and be the one that was: its Noise key is its identity.
    if account
        .companions
        .get(&device)
        .is_none_or(|c| &c.noise != noise_key)
    {
        return Err(Box::new(failure(401).build()));
    }
    if let Some((code, expire)) = account.ban {
        return Err(Box::new(
            failure(402)
                .attr("code", code.to_string())
                .attr("expire", expire.to_string())
                .build(),
        ));
    }
    Ok(account.lid.clone())
}

/// Runs a stream until either end closes it: the client's stanzas answered, the server's
/// own sent as they come.
async fn pump(
    mut reader: Reader,
    mut writer: Writer,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    shared: &Shared,
    device: Option<(&str, u16)>,
) {
    loop {
        tokio::select! {
            node = reader.node() => {
                let Ok(Some(node)) = node else { return };
                for answer in answer(&node, shared, device) {
                    if writer.node(&answer).await.is_err() {
                        return;
                    }
                }
            }
            out = rx.recv() => match out {
                Some(Outbound::Send(node)) => {
                    if writer.node(&node).await.is_err() {
                        return;
                    }
                }
                Some(Outbound::End(node)) => {
                    let _ = writer.node(&node).await;
                    writer.close().await;
                    return;
                }
                Some(Outbound::Drop) | None => return,
            }
        }
    }
}

fn attr(node: &Node, key: &str) -> Option<String> {
    node.attrs.get(key).map(|v| v.as_str().into_owned())
}

fn result(id: &str) -> NodeBuilder {
    NodeBuilder::new("iq")
        .attr("type", "result")
        .attr("id", id.to_owned())
        .attr("from", SERVER)
}

fn child_bytes(node: &Node, tag: &str) -> Option<Vec<u8>> {
    node.get_optional_child(tag)
        .and_then(super::phone::node_bytes)
}

/// Linking by code, the device's two steps: its hello (its ephemeral key sealed under the
/// code; answered with a ref while the phone's owner types the code) and its finish (its key
/// bundle, for the phone that waits for it).
fn link_code(shared: &Shared, id: &str, reg: Option<&Node>) -> Vec<Node> {
    let Some(reg) = reg else {
        return vec![result(id).build()];
    };
    let mut state = shared.state();
    match attr(reg, "stage").as_deref() {
        Some("companion_hello") => {
            let phone = attr(reg, "jid").unwrap_or_default();
            let noise = child_bytes(reg, "companion_server_auth_key_pub")
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .unwrap_or_default();
            let pairing_ref = format!("test-link-code-{}", shared.next_id());
            state.link_codes.insert(
                split_jid(&phone).0.to_owned(),
                super::LinkCode {
                    noise,
                    wrapped_ephemeral: child_bytes(
                        reg,
                        "link_code_pairing_wrapped_companion_ephemeral_pub",
                    )
                    .unwrap_or_default(),
                    pairing_ref: pairing_ref.clone(),
                    finish: None,
                },
            );
            vec![
                result(id)
                    .children([NodeBuilder::new("link_code_companion_reg")
                        .children([NodeBuilder::new("link_code_pairing_ref")
                            .bytes(pairing_ref.into_bytes())
                            .build()])
                        .build()])
                    .build(),
            ]
        }
        Some("companion_finish") => {
            let pairing_ref = child_bytes(reg, "link_code_pairing_ref").unwrap_or_default();
            let bundle = child_bytes(reg, "link_code_pairing_wrapped_key_bundle");
            let identity = child_bytes(reg, "companion_identity_public");
            let waiting = state
                .link_codes
                .values_mut()
                .find(|l| l.pairing_ref.as_bytes() == pairing_ref.as_slice())
                .and_then(|l| l.finish.take());
            if let (Some(waiting), Some(bundle), Some(identity)) = (waiting, bundle, identity) {
                let _ = waiting.send((bundle, identity));
            }
            vec![result(id).build()]
        }
        _ => vec![result(id).build()],
    }
}

/// What the server says to one stanza of the client (often nothing).
fn answer(node: &Node, shared: &Shared, device: Option<(&str, u16)>) -> Vec<Node> {
    match (node.tag.as_ref(), device) {
        ("iq", _) => {}
        ("message", Some(sender)) => return message(node, shared, sender),
        // A file's link is dead: the sender's phone is asked to upload it again.
        ("receipt", Some(_)) if attr(node, "type").as_deref() == Some("server-error") => {
            return shared.media.upload_again(node).into_iter().collect();
        }
        ("receipt", Some(device)) => {
            receipt(node, shared, device);
            return vec![];
        }
        ("chatstate", Some((phone, _))) => {
            chat_state(node, shared, phone);
            return vec![];
        }
        _ => return vec![],
    }
    let id = attr(node, "id").unwrap_or_default();
    match attr(node, "type").as_deref() {
        Some("result" | "error") => {
            // An answer to one of ours (the pairing's signature, …).
            if let Some(waiter) = shared.state().replies.remove(&id) {
                let _ = waiter.send(node.clone());
            }
            return vec![];
        }
        Some("get" | "set") => {}
        _ => return vec![],
    }
    let xmlns = attr(node, "xmlns").unwrap_or_default();
    let child = node.children().and_then(|c| c.first());
    let child_tag = child.map(|c| c.tag.as_ref()).unwrap_or_default();
    match (xmlns.as_str(), child_tag) {
        // The client waits for the end of the offline queue before it counts as connected.
        // What waited for the device while it was away, then the end of that queue.
        ("passive", _) => {
            let mut out = vec![result(&id).build()];
            let queued = device.map(|d| inbox(shared, d)).unwrap_or_default();
            let count = queued.len();
            out.extend(queued);
            out.push(
                NodeBuilder::new("ib")
                    .attr("from", SERVER)
                    .children([NodeBuilder::new("offline")
                        .attr("count", count.to_string())
                        .build()])
                    .build(),
            );
            out
        }
        ("encrypt", "key") => vec![bundles(shared, &id, child)],
        ("encrypt", "registration" | "list") => {
            if let (Some((phone, dev)), Some(upload)) = (device, node.children()) {
                store_pre_keys(shared, phone, dev, upload);
            }
            vec![result(&id).build()]
        }
        // No digest to compare: the client skips the check (404 would force a re-upload).
        ("encrypt", "digest") => vec![
            NodeBuilder::new("iq")
                .attr("type", "error")
                .attr("id", id)
                .attr("from", SERVER)
                .children([NodeBuilder::new("error")
                    .attr("code", "503")
                    .attr("text", "service-unavailable")
                    .build()])
                .build(),
        ],
        ("abt", _) => vec![
            result(&id)
                .children([NodeBuilder::new("props").attr("protocol", "1").build()])
                .build(),
        ],
        ("blocklist", _) => vec![
            result(&id)
                .children([NodeBuilder::new("list").build()])
                .build(),
        ],
        ("privacy", "privacy") => vec![
            result(&id)
                .children([NodeBuilder::new("privacy").build()])
                .build(),
        ],
        // Where files go (`media.rs`): this server's media host, when it serves one.
        ("w:m", "media_conn") => {
            let hosts = shared.media.hostname.get().map(|hostname| {
                NodeBuilder::new("host")
                    .attr("hostname", hostname.clone())
                    .attr("type", "primary")
                    .build()
            });
            vec![
                result(&id)
                    .children([NodeBuilder::new("media_conn")
                        .attr("auth", super::media::AUTH)
                        .attr("ttl", "3600")
                        .children(hosts)
                        .build()])
                    .build(),
            ]
        }
        ("w:sync:app:state", _) => vec![app_state(&id, child)],
        ("usync", _) => vec![usync(shared, &id, child)],
        ("md", "link_code_companion_reg") => link_code(shared, &id, child),
        ("md", "remove-companion-device") => {
            if let Some((phone, dev)) = device {
                unlink(shared, phone, dev);
                shared.saw(Seen::CompanionRemoved(format!("{phone}:{dev}")));
            }
            vec![result(&id).build()]
        }
        // Keep-alives (`w:p`), `<active/>` and anything else: an empty result.
        _ => vec![result(&id).build()],
    }
}

fn store_pre_keys(shared: &Shared, phone: &str, device: u16, upload: &[Node]) {
    let keys: Vec<Node> = upload
        .iter()
        .filter(|n| n.tag == "list")
        .flat_map(|l| l.children().unwrap_or_default().to_vec())
        .collect();
    let mut state = shared.state();
    if let Some(c) = state
        .accounts
        .get_mut(phone)
        .and_then(|a| a.companions.get_mut(&device))
    {
        c.pre_keys.extend(keys);
    }
}

/// The Signal bundles of the linked devices asked for (a client writing to its account's
/// other devices), each with one of its pre-keys, used up; a device not linked is refused.
fn bundles(shared: &Shared, id: &str, key: Option<&Node>) -> Node {
    let mut state = shared.state();
    let users = key
        .and_then(Node::children)
        .unwrap_or_default()
        .iter()
        .filter(|u| u.tag == "user")
        .filter_map(|u| attr(u, "jid"))
        .map(|jid| {
            let (user, device) = split_jid(&jid);
            let user_node = NodeBuilder::new("user").attr("jid", jid.clone());
            let account = state.accounts.get_mut(user);
            if device == 0
                && let Some(account) = account
            {
                return account.peer.bundle_node(&jid);
            }
            let Some(c) = account.and_then(|a| a.companions.get_mut(&device)) else {
                return user_node
                    .children([NodeBuilder::new("error")
                        .attr("code", "406")
                        .attr("text", "not-acceptable")
                        .build()])
                    .build();
            };
            let r = &c.registration;
            let bytes =
                |tag: &'static str, b: &[u8]| NodeBuilder::new(tag).bytes(b.to_vec()).build();
            let mut children = vec![
                bytes("registration", &r.registration_id),
                bytes("type", &[5]),
                bytes("identity", &r.identity),
                NodeBuilder::new("skey")
                    .children([
                        bytes("id", &r.signed_pre_key_id),
                        bytes("value", &r.signed_pre_key),
                        bytes("signature", &r.signed_pre_key_signature),
                    ])
                    .build(),
            ];
            if !c.pre_keys.is_empty() {
                children.push(c.pre_keys.remove(0));
            }
            children.push(bytes("device-identity", &c.device_identity));
            user_node.attr("type", "result").children(children).build()
        })
        .collect::<Vec<_>>();
    result(id)
        .children([NodeBuilder::new("list").children(users).build()])
        .build()
}

/// `user[:device]@server` → (user, device).
fn split_jid(jid: &str) -> (&str, u16) {
    let address = jid.split_once('@').map_or(jid, |(a, _)| a);
    match address.split_once(':') {
        Some((user, device)) => (user, device.parse().unwrap_or(0)),
        None => (address, 0),
    }
}

pub(super) fn unlink(shared: &Shared, phone: &str, device: u16) {
    if let Some(account) = shared.state().accounts.get_mut(phone) {
        account.companions.remove(&device);
    }
}

/// Every collection asked for, empty: nothing to decode, so each counts as synced.
fn app_state(id: &str, sync: Option<&Node>) -> Node {
    let collections = sync
        .and_then(Node::children)
        .unwrap_or_default()
        .iter()
        .filter(|c| c.tag == "collection")
        .filter_map(|c| attr(c, "name"))
        .map(|name| {
            NodeBuilder::new("collection")
                .attr("name", name)
                .attr("version", "0")
                .build()
        })
        .collect::<Vec<_>>();
    result(id)
        .children([NodeBuilder::new("sync").children(collections).build()])
        .build()
}

/// Each user asked about, with its devices (the phone, and the devices linked to it with the
/// account's signed list of them) and no LID: PN addressing. A user asked by phone number
/// (`<contact>+…</contact>`: is it on WhatsApp?) is answered [`contact`]'s way.
fn usync(shared: &Shared, id: &str, usync: Option<&Node>) -> Node {
    let devices_asked = usync
        .and_then(|u| u.get_optional_child("query"))
        .and_then(|q| q.get_optional_child("devices"))
        .is_some();
    let mut state = shared.state();
    let listed = usync
        .and_then(|u| u.get_optional_child("list"))
        .and_then(Node::children)
        .unwrap_or_default();
    let by_number = listed
        .iter()
        .filter_map(|u| match &u.get_optional_child("contact")?.content {
            Some(wacore_binary::NodeContent::String(n)) => Some(super::digits(n)),
            Some(wacore_binary::NodeContent::Bytes(n)) => {
                Some(super::digits(&String::from_utf8_lossy(n)))
            }
            _ => None,
        })
        .map(|number| contact(&mut state, &number))
        .collect::<Vec<_>>();
    let users = listed
        .iter()
        .filter_map(|u| attr(u, "jid"))
        .map(|jid| {
            let user = NodeBuilder::new("user").attr("jid", jid.clone());
            if !devices_asked {
                return user.build();
            }
            let number = split_jid(&jid).0;
            if jid.ends_with("@s.whatsapp.net") {
                // Every phone number is on WhatsApp here: asking for one makes its account.
                state
                    .accounts
                    .entry(number.to_owned())
                    .or_insert_with(|| Account::new(number));
            }
            let account = state.accounts.get(number);
            let mut devices = vec![NodeBuilder::new("device").attr("id", "0").build()];
            let mut indexes = vec![0];
            for (device, c) in account.map(|a| &a.companions).into_iter().flatten() {
                devices.push(
                    NodeBuilder::new("device")
                        .attr("id", device.to_string())
                        .attr("key-index", c.key_index.to_string())
                        .build(),
                );
                indexes.push(c.key_index);
            }
            let mut lists = vec![
                NodeBuilder::new("device-list")
                    .attr("hash", format!("2:{}", indexes.len()))
                    .children(devices)
                    .build(),
            ];
            if let Some(account) = account.filter(|a| !a.companions.is_empty()) {
                lists.push(key_index_list(account, indexes));
            }
            user.children([NodeBuilder::new("devices").children(lists).build()])
                .build()
        })
        .collect::<Vec<_>>();
    let users = by_number.into_iter().chain(users).collect::<Vec<_>>();
    result(id)
        .children([NodeBuilder::new("usync")
            .children([NodeBuilder::new("list").children(users).build()])
            .build()])
        .build()
}

/// Whether a number is on WhatsApp, with its LID: every number is here (asking makes its
/// account) except, as in the simulator, those starting with 999.
fn contact(state: &mut super::State, number: &str) -> Node {
    let user = NodeBuilder::new("user").attr("jid", format!("{number}@s.whatsapp.net"));
    if number.starts_with("999") {
        return user
            .children([NodeBuilder::new("contact").attr("type", "out").build()])
            .build();
    }
    let account = state
        .accounts
        .entry(number.to_owned())
        .or_insert_with(|| Account::new(number));
    user.children([
        NodeBuilder::new("contact").attr("type", "in").build(),
        NodeBuilder::new("lid")
            .attr("val", format!("{}@lid", account.lid))
            .build(),
    ])
    .build()
}

/// The account's list of linked devices' key indexes, signed by its account key.
fn key_index_list(account: &super::Account, valid_indexes: Vec<u32>) -> Node {
    use waproto::buffa::Message as _;
    let ts = unix_now();
    let details = wa::ADVKeyIndexList {
        raw_id: Some(1),
        timestamp: Some(ts as u64),
        current_index: valid_indexes.iter().copied().max(),
        valid_indexes,
        ..Default::default()
    }
    .encode_to_vec();
    let signature = account
        .identity
        .calculate_signature(&[&[6u8, 2][..], &details].concat(), &mut rand010::rng())
        .map(|s| s.to_vec())
        .ok();
    let signed = wa::ADVSignedKeyIndexList {
        details: Some(details),
        account_signature: signature,
        account_signature_key: None,
    }
    .encode_to_vec();
    NodeBuilder::new("key-index-list")
        .attr("ts", ts.to_string())
        .bytes(signed)
        .build()
}

/// The messages a device has not acknowledged yet.
fn inbox(shared: &Shared, (phone, device): (&str, u16)) -> Vec<Node> {
    shared
        .state()
        .accounts
        .get(phone)
        .and_then(|a| a.companions.get(&device))
        .map(|c| c.inbox.iter().map(|(_, m)| m.clone()).collect())
        .unwrap_or_default()
}

/// A device's message: each phone it is for decrypts its copy with its own Signal state and
/// keeps it; the server acks it, and the recipient's phone says it was delivered.
fn message(node: &Node, shared: &Shared, (phone, device): (&str, u16)) -> Vec<Node> {
    let id = attr(node, "id").unwrap_or_default();
    let to = attr(node, "to").unwrap_or_default();
    let copies: Vec<(String, &Node)> = match node.get_optional_child("participants") {
        Some(participants) => participants
            .children()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| Some((attr(p, "jid")?, p.get_optional_child("enc")?)))
            .collect(),
        None => node
            .get_children_by_tag("enc")
            .map(|enc| (to.clone(), enc))
            .collect(),
    };
    let sender = super::signal::address(phone, device);
    let (recipient, _) = split_jid(&to);
    let mut delivered = false;
    let mut state = shared.state();
    for (copy_for, enc) in copies {
        let (user, copy_device) = split_jid(&copy_for);
        // Other linked devices are not simulated: only phones read their copies.
        if copy_device != 0 {
            continue;
        }
        let Some(account) = state.accounts.get_mut(user) else {
            continue;
        };
        let kind = attr(enc, "type").unwrap_or_default();
        let bytes = super::phone::node_bytes(enc).unwrap_or_default();
        let plain = account
            .peer
            .decrypt(&sender, &kind, &bytes)
            .and_then(|p| wacore::messages::decode_plaintext(&p, 2).map_err(|e| e.to_string()));
        match plain {
            // The sender's own phone gets a copy to show in its chat too.
            Ok(_) if user == phone => {}
            Ok(message) => {
                use wacore::proto_helpers::MessageExt;
                account.received.push(super::Received {
                    id: id.clone(),
                    from: phone.to_owned(),
                    text: message.text_content().map(str::to_owned),
                    message,
                    at_ms: shared::db::now_ms(),
                });
                delivered |= user == recipient;
            }
            Err(e) => state
                .seen
                .push(Seen::Undecryptable(format!("{user} from {phone}: {e}"))),
        }
    }
    let t = unix_now().to_string();
    let mut out = vec![
        NodeBuilder::new("ack")
            .attr("class", "message")
            .attr("id", id.clone())
            .attr("from", to.clone())
            .attr("t", t.clone())
            .build(),
    ];
    if delivered && let Some(after) = state.read_after {
        // The contact reads it a moment later: a read receipt to the sender's devices.
        let read = NodeBuilder::new("receipt")
            .attr("from", to.clone())
            .attr("id", id.clone())
            .attr("type", "read")
            .attr("t", t.clone())
            .build();
        let streams: Vec<Stream> = state
            .live
            .iter()
            .filter(|((p, _), _)| p == phone)
            .map(|(_, s)| s.clone())
            .collect();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            for stream in streams {
                let _ = stream.out.send(Outbound::Send(read.clone()));
            }
        });
    }
    if delivered {
        out.push(
            NodeBuilder::new("receipt")
                .attr("from", to)
                .attr("id", id)
                .attr("t", t)
                .build(),
        );
    }
    out
}

/// A device's receipt for what a phone sent it: the message leaves the device's queue, and
/// the phone keeps the receipt.
fn receipt(node: &Node, shared: &Shared, (phone, device): (&str, u16)) {
    let Some(to) = attr(node, "to") else { return };
    let kind = attr(node, "type").unwrap_or_else(|| "delivered".into());
    let mut ids = vec![attr(node, "id").unwrap_or_default()];
    if let Some(list) = node.get_optional_child("list") {
        ids.extend(
            list.children()
                .unwrap_or_default()
                .iter()
                .filter_map(|i| attr(i, "id")),
        );
    }
    let mut state = shared.state();
    if let Some(c) = state
        .accounts
        .get_mut(phone)
        .and_then(|a| a.companions.get_mut(&device))
    {
        c.inbox.retain(|(id, _)| !ids.contains(id));
    }
    if let Some(account) = state.accounts.get_mut(split_jid(&to).0) {
        for id in ids {
            account.receipts.push(super::ReceiptSeen {
                id,
                from: phone.to_owned(),
                kind: kind.clone(),
            });
        }
    }
}

/// "typing…" and its end, as the phone it is shown to sees them.
fn chat_state(node: &Node, shared: &Shared, phone: &str) {
    let Some(to) = attr(node, "to") else { return };
    let Some(state) = node.children().and_then(|c| c.first()) else {
        return;
    };
    if let Some(account) = shared.state().accounts.get_mut(split_jid(&to).0) {
        account.chat_states.push((
            phone.to_owned(),
            state.tag.to_string(),
            shared::db::now_ms(),
        ));
    }
}
