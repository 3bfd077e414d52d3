//! Trait-level scenarios of the WhatsApp key store, run unchanged on any `Backend`: each
//! calls the store and writes down every answer (`Debug`), so two backends that behave alike
//! write the same transcript. Answers the trait leaves unordered are sorted first.

use std::sync::Arc;

use bytes::Bytes;
use wacore::appstate::{hash::HashState, processor::AppStateMutationMAC};
use wacore::store::{
    Device,
    device::DEVICE_PROPS,
    traits::{
        AppStateSyncKey, Backend, DeviceInfo, DeviceListRecord, LidPnMappingEntry, MsgSecretEntry,
        PendingInboundKey, PendingInboundRow, TcTokenEntry,
    },
};
use whatsapp_rust::{Jid, waproto::whatsapp as wa};

/// What a scenario saw: one line per call.
#[derive(Default)]
pub struct Transcript(pub Vec<String>);

impl Transcript {
    pub fn note(&mut self, call: &str, answer: impl std::fmt::Debug) {
        self.0.push(format!("{call} => {answer:?}"));
    }
}

/// Calls the store and notes the call and its answer (mapped by `map` when given, for
/// answers the trait leaves unordered or that have no `Debug`).
macro_rules! call {
    ($t:expr, $call:expr) => {
        $t.note(stringify!($call), $call.await)
    };
    ($t:expr, $call:expr, $map:expr) => {
        $t.note(stringify!($call), $call.await.map($map))
    };
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn by_lid(mut v: Vec<LidPnMappingEntry>) -> Vec<String> {
    v.sort_by(|a, b| a.lid.cmp(&b.lid));
    v.iter().map(|e| format!("{e:?}")).collect()
}

/// A `HashState` with its map in order.
fn hash_state(s: HashState) -> String {
    let mut map: Vec<_> = s.index_value_map.into_iter().collect();
    map.sort();
    format!(
        "v{} hash={:?} fatal={} map={map:?}",
        s.version,
        &s.hash[..],
        s.mac_mismatch_fatal
    )
}

/// A device as JSON (it has no `Debug`), and whether its props are the announced ones.
fn device_json(d: Option<Device>) -> Option<(String, bool)> {
    d.map(|d| {
        let json = serde_json::to_string(&d).expect("a device serializes");
        (json, *d.device_props == *DEVICE_PROPS)
    })
}

fn same_device(loaded: Option<Device>, saved: &Device) -> bool {
    device_json(loaded).map(|(json, _)| json)
        == device_json(Some(saved.clone())).map(|(json, _)| json)
}

fn mac(index: u8, value: u8) -> AppStateMutationMAC {
    AppStateMutationMAC {
        index_mac: vec![index; 32],
        value_mac: vec![value; 32],
    }
}

fn secret(chat: &str, msg: &str, fill: u8, expires_at: i64, message_ts: i64) -> MsgSecretEntry {
    MsgSecretEntry {
        chat: Arc::from(chat),
        sender: Arc::from("9999@lid"),
        msg_id: Arc::from(msg),
        secret: [fill; 32],
        expires_at,
        message_ts,
    }
}

fn lid(lid: &str, phone: &str, at: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: phone.into(),
        created_at: at,
        updated_at: at + 1,
        learning_source: "usync".into(),
    }
}

fn devices(user: &str, ids: &[u32], timestamp: i64) -> DeviceListRecord {
    DeviceListRecord {
        user: user.into(),
        devices: ids
            .iter()
            .map(|&id| DeviceInfo::new(id, id.checked_sub(1)).with_hosting(id == 99))
            .collect(),
        timestamp,
        phash: Some(format!("2:{timestamp}")),
        raw_id: ids.first().copied(),
    }
}

fn tc(token: &[u8], token_timestamp: i64, sender_timestamp: Option<i64>) -> TcTokenEntry {
    TcTokenEntry {
        token: token.to_vec(),
        token_timestamp,
        sender_timestamp,
    }
}

/// Contacts' identity keys, Signal sessions, and which users we have Signal state with.
pub async fn identities_and_sessions(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    let (a, c): (Arc<str>, Arc<str>) = ("15550001@s.whatsapp.net".into(), "15550002:4@lid".into());
    call!(t, b.load_identity(&a));
    call!(t, b.put_identity(&a, [1; 32]));
    call!(t, b.load_identity(&a));
    call!(t, b.put_identity(&a, [2; 32]));
    call!(t, b.load_identity(&a));
    call!(
        t,
        b.put_identities_batch(&[
            (a.clone(), [3; 32]),
            (c.clone(), [4; 32]),
            (a.clone(), [5; 32])
        ])
    );
    call!(t, b.put_identities_batch(&[]));
    call!(t, b.load_identity(&a));
    call!(t, b.load_identity(&c));
    call!(t, b.delete_identity(&c));
    call!(t, b.delete_identity("nobody@s.whatsapp.net"));
    call!(t, b.load_identity(&c));

    call!(t, b.get_session(&a));
    call!(t, b.has_session(&a));
    call!(t, b.put_session(&a, b"ratchet-1"));
    call!(t, b.get_session(&a));
    call!(t, b.has_session(&a));
    call!(t, b.put_session(&a, b"ratchet-2"));
    call!(t, b.get_session(&a));
    call!(
        t,
        b.put_sessions_batch(&[
            (a.clone(), Bytes::from_static(b"ratchet-3")),
            (c.clone(), Bytes::from_static(b"ratchet-c")),
            (a.clone(), Bytes::from_static(b"ratchet-4")),
        ])
    );
    call!(t, b.put_sessions_batch(&[]));
    call!(t, b.get_session(&a));
    call!(t, b.get_session(&c));
    call!(t, b.delete_session(&c));
    call!(t, b.delete_session("nobody@s.whatsapp.net"));
    call!(t, b.get_session(&c));
    call!(t, b.has_session(&c));

    // `user@…` (device 0) and `user:dev@…` count; a longer user, or another character
    // after the user, does not.
    call!(t, b.has_signal_state_for_user("777"));
    call!(t, b.put_session("7770@s.whatsapp.net", b"s"));
    call!(t, b.put_session("777A@s.whatsapp.net", b"s"));
    call!(t, b.put_session("777;1@s.whatsapp.net", b"s"));
    call!(t, b.put_identity("777?@lid", [9; 32]));
    call!(t, b.has_signal_state_for_user("777"));
    call!(t, b.has_signal_state_for_user("7770"));
    call!(t, b.has_signal_state_for_user("777A"));
    call!(t, b.put_identity("888:5@lid", [8; 32]));
    call!(t, b.has_signal_state_for_user("888"));
    call!(t, b.has_signal_state_for_user("88"));
    call!(t, b.has_signal_state_for_user("888:5"));
    call!(t, b.has_signal_state_for_user(""));
    call!(t, b.put_session("777:12@s.whatsapp.net", b"s"));
    call!(t, b.has_signal_state_for_user("777"));
    call!(t, b.delete_session("7770@s.whatsapp.net"));
    call!(t, b.has_signal_state_for_user("7770"));
    call!(t, b.has_signal_state_for_user("15550001"));
    call!(t, b.has_signal_state_for_user("15550002"));
    t
}

/// One-time and signed pre-keys, and sender keys.
pub async fn prekeys_and_sender_keys(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    call!(t, b.get_max_prekey_id());
    call!(t, b.load_prekey(1));
    call!(t, b.store_prekey(1, b"pk-1", false));
    call!(t, b.store_prekey(2, b"pk-2", true));
    call!(t, b.load_prekey(1));
    call!(t, b.store_prekey(1, b"pk-1b", true));
    call!(t, b.load_prekey(1));
    call!(
        t,
        b.store_prekeys_batch(
            &[
                (3, Bytes::from_static(b"pk-3")),
                (4, Bytes::from_static(b"pk-4")),
                (3, Bytes::from_static(b"pk-3b")),
            ],
            false
        )
    );
    call!(t, b.store_prekeys_batch(&[], true));
    // In the order asked, missing ones left out, repeated ones repeated.
    call!(t, b.load_prekeys_batch(&[4, 99, 1, 3, 4]));
    call!(t, b.load_prekeys_batch(&[]));
    call!(t, b.get_max_prekey_id());
    call!(t, b.remove_prekey(4));
    call!(t, b.remove_prekey(1000));
    // Marking never brings back a key consumed meanwhile.
    call!(t, b.mark_prekeys_uploaded(&[3, 4, 1000]));
    call!(t, b.mark_prekeys_uploaded(&[]));
    call!(t, b.load_prekey(4));
    call!(t, b.load_prekey(3));
    call!(t, b.get_max_prekey_id());
    call!(t, b.store_prekey(u32::MAX, b"pk-max", false));
    call!(t, b.get_max_prekey_id());
    call!(t, b.load_prekey(u32::MAX));

    call!(t, b.load_signed_prekey(1));
    call!(t, b.load_all_signed_prekeys());
    call!(t, b.store_signed_prekey(2, b"spk-2"));
    call!(t, b.store_signed_prekey(1, b"spk-1"));
    call!(t, b.store_signed_prekey(2, b"spk-2b"));
    call!(t, b.load_signed_prekey(2));
    call!(t, b.load_all_signed_prekeys(), sorted);
    call!(t, b.remove_signed_prekey(1));
    call!(t, b.remove_signed_prekey(77));
    call!(t, b.load_all_signed_prekeys(), sorted);
    call!(t, b.load_signed_prekey(1));

    let (a, c): (Arc<str>, Arc<str>) = ("120363@g.us::1555:0".into(), "120363@g.us::1666:2".into());
    call!(t, b.get_sender_key(&a));
    call!(t, b.put_sender_key(&a, b"sk-1"));
    call!(t, b.get_sender_key(&a));
    call!(
        t,
        b.put_sender_keys_batch(&[
            (a.clone(), Bytes::from_static(b"sk-2")),
            (c.clone(), Bytes::from_static(b"sk-c")),
            (c.clone(), Bytes::from_static(b"sk-c2")),
        ])
    );
    call!(t, b.put_sender_keys_batch(&[]));
    call!(t, b.get_sender_key(&a));
    call!(t, b.get_sender_key(&c));
    call!(t, b.delete_sender_key(&a));
    call!(t, b.delete_sender_key("nobody"));
    call!(t, b.get_sender_key(&a));
    t
}

/// App-state sync keys, collection versions and mutation MACs.
pub async fn app_state(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    let key = |data: u8, ts: i64| AppStateSyncKey {
        key_data: vec![data; 32],
        fingerprint: vec![data, 0, 1],
        timestamp: ts,
    };
    call!(t, b.get_sync_key(b"k1"));
    call!(t, b.get_latest_sync_key_id());
    call!(t, b.set_sync_key(b"k1", key(1, 100)));
    call!(t, b.set_sync_key(b"k2", key(2, 200)));
    call!(t, b.get_latest_sync_key_id());
    call!(t, b.get_sync_key(b"k1"));
    // Setting an older key again makes it the latest.
    call!(t, b.set_sync_key(b"k1", key(3, 300)));
    call!(t, b.get_latest_sync_key_id());
    call!(t, b.get_sync_key(b"k1"));
    call!(t, b.get_sync_key(b"k2"));

    call!(t, b.get_version("regular"), hash_state);
    let state = HashState {
        version: 7,
        hash: [9; 128],
        index_value_map: [("a".to_owned(), vec![1]), ("b".to_owned(), vec![2, 3])].into(),
        mac_mismatch_fatal: true,
    };
    call!(t, b.set_version("regular", state));
    call!(t, b.get_version("regular"), hash_state);
    let huge = HashState {
        version: u64::MAX,
        ..HashState::default()
    };
    call!(t, b.set_version("regular", huge));
    call!(t, b.get_version("regular"), hash_state);
    call!(t, b.get_version("critical_block"), hash_state);

    call!(
        t,
        b.put_mutation_macs("regular", 1, &[mac(1, 10), mac(2, 20), mac(1, 11)])
    );
    call!(t, b.put_mutation_macs("regular", 2, &[]));
    call!(t, b.put_mutation_macs("critical_block", 1, &[mac(1, 90)]));
    call!(t, b.get_mutation_mac("regular", &[1; 32]));
    call!(t, b.get_mutation_mac("regular", &[2; 32]));
    call!(t, b.get_mutation_mac("regular", &[3; 32]));
    call!(t, b.get_mutation_mac("critical_unblock_low", &[1; 32]));
    call!(
        t,
        b.get_mutation_macs("regular", &[[1; 32], [2; 32], [3; 32]]),
        |m| sorted(m.into_iter().collect())
    );
    call!(t, b.get_mutation_macs("regular", &[]), |m| sorted(
        m.into_iter().collect()
    ));
    call!(
        t,
        b.delete_mutation_macs("regular", &[vec![2; 32], vec![4; 32]])
    );
    call!(t, b.delete_mutation_macs("regular", &[]));
    call!(t, b.get_mutation_mac("regular", &[2; 32]));
    call!(t, b.get_mutation_mac("regular", &[1; 32]));
    // A snapshot clears its own collection only.
    call!(t, b.clear_mutation_macs("regular"));
    call!(t, b.get_mutation_mac("regular", &[1; 32]));
    call!(t, b.get_mutation_mac("critical_block", &[1; 32]));
    t
}

/// Group sender-key distribution, LID ↔ phone mappings, base keys, device lists and group
/// metadata.
pub async fn protocol(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    let (g1, g2) = ("1203631@g.us", "1203632@g.us");
    call!(t, b.get_sender_key_devices(g1));
    call!(
        t,
        b.set_sender_key_status(
            g1,
            &[("d1@lid", true), ("d2@lid", false), ("d1@lid", false)]
        )
    );
    call!(
        t,
        b.set_sender_key_status(g2, &[("d1@lid", true), ("d3@lid", true)])
    );
    call!(t, b.set_sender_key_status("1203633@g.us", &[]));
    call!(t, b.get_sender_key_devices(g1), sorted);
    call!(t, b.get_sender_key_devices(g2), sorted);
    call!(t, b.delete_sender_key_device_rows(&["d1@lid"]));
    call!(t, b.delete_sender_key_device_rows(&[]));
    call!(t, b.get_sender_key_devices(g1), sorted);
    call!(t, b.get_sender_key_devices(g2), sorted);
    call!(t, b.clear_sender_key_devices(g1));
    call!(t, b.get_sender_key_devices(g1), sorted);
    call!(t, b.get_sender_key_devices(g2), sorted);
    call!(t, b.clear_all_sender_key_devices());
    call!(t, b.get_sender_key_devices(g2), sorted);

    // A phone number resolves to the LID stored for it last, until that LID, or a LID that
    // leaves the number, moves elsewhere.
    call!(t, b.get_lid_mapping("100"));
    call!(t, b.get_pn_mapping("5511"));
    call!(t, b.put_lid_mapping(&lid("100", "5511", 1)));
    call!(t, b.get_lid_mapping("100"));
    call!(t, b.get_pn_mapping("5511"));
    call!(t, b.put_lid_mapping(&lid("200", "5511", 2)));
    call!(t, b.get_pn_mapping("5511"));
    call!(t, b.get_lid_mapping("100"));
    call!(t, b.put_lid_mapping(&lid("100", "5522", 3)));
    call!(t, b.get_pn_mapping("5511"));
    call!(t, b.get_pn_mapping("5522"));
    call!(t, b.get_lid_mapping("200"));
    call!(t, b.put_lid_mapping(&lid("200", "5511", 4)));
    call!(t, b.put_lid_mapping(&lid("100", "5522", 5)));
    call!(t, b.get_pn_mapping("5511"));
    call!(t, b.get_pn_mapping("5522"));
    call!(
        t,
        b.put_lid_mappings(&[
            lid("300", "5533", 6),
            lid("300", "5544", 7),
            lid("400", "5533", 8)
        ])
    );
    call!(t, b.put_lid_mappings(&[]));
    call!(t, b.get_pn_mapping("5533"));
    call!(t, b.get_pn_mapping("5544"));
    call!(t, b.get_lid_mapping("300"));
    call!(
        t,
        b.put_lid_mappings(&[lid("200", "5566", 9), lid("500", "5511", 10)])
    );
    call!(t, b.get_pn_mapping("5511"));
    call!(t, b.get_pn_mapping("5566"));
    call!(t, b.get_all_lid_mappings(), by_lid);

    call!(
        t,
        b.has_same_base_key("1555:1@s.whatsapp.net", "M1", b"base-1")
    );
    call!(t, b.save_base_key("1555:1@s.whatsapp.net", "M1", b"base-1"));
    call!(
        t,
        b.has_same_base_key("1555:1@s.whatsapp.net", "M1", b"base-1")
    );
    call!(
        t,
        b.has_same_base_key("1555:1@s.whatsapp.net", "M1", b"base-2")
    );
    call!(
        t,
        b.has_same_base_key("1555:1@s.whatsapp.net", "M2", b"base-1")
    );
    call!(t, b.save_base_key("1555:1@s.whatsapp.net", "M1", b"base-2"));
    call!(
        t,
        b.has_same_base_key("1555:1@s.whatsapp.net", "M1", b"base-2")
    );
    call!(t, b.delete_base_key("1555:1@s.whatsapp.net", "M1"));
    call!(t, b.delete_base_key("1555:1@s.whatsapp.net", "M404"));
    call!(
        t,
        b.has_same_base_key("1555:1@s.whatsapp.net", "M1", b"base-2")
    );

    call!(t, b.get_devices("1555"));
    call!(t, b.update_device_list(devices("1555", &[0, 3, 99], 10)));
    call!(t, b.get_devices("1555"));
    call!(
        t,
        b.update_device_lists(vec![
            devices("1666", &[0], 11),
            devices("1555", &[0, 5], 12),
            devices("1666", &[], 13),
        ])
    );
    call!(t, b.update_device_lists(vec![]));
    call!(t, b.get_devices("1555"));
    call!(t, b.get_devices("1666"));
    let bare = DeviceListRecord {
        phash: None,
        raw_id: None,
        ..devices("1777", &[1], 14)
    };
    call!(t, b.update_device_list(bare));
    call!(t, b.get_devices("1777"));
    call!(t, b.delete_devices("1555"));
    call!(t, b.delete_devices("1888"));
    call!(t, b.get_devices("1555"));

    call!(t, b.get_group_metadata(g1));
    call!(t, b.put_group_metadata(g1, b"meta-1"));
    call!(t, b.get_group_metadata(g1));
    call!(t, b.put_group_metadata(g1, b"meta-2"));
    call!(t, b.get_group_metadata(g1));
    call!(t, b.delete_group_metadata(g1));
    call!(t, b.delete_group_metadata(g2));
    call!(t, b.get_group_metadata(g1));
    t
}

/// Trusted-contact tokens: the two writers' merges, newer-wins, and the expiry sweep.
pub async fn tc_tokens(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    call!(t, b.get_tc_token("c@lid"));
    call!(t, b.get_all_tc_token_jids());
    // The issuing side writes a placeholder, then only advances its timestamp.
    call!(t, b.touch_tc_token_sender_timestamp("c@lid", 1000));
    call!(t, b.get_tc_token("c@lid"));
    call!(t, b.put_tc_token("c@lid", &tc(&[7, 8, 9], 2000, None)));
    call!(t, b.get_tc_token("c@lid"));
    call!(t, b.touch_tc_token_sender_timestamp("c@lid", 3000));
    call!(t, b.touch_tc_token_sender_timestamp("c@lid", 2500));
    call!(t, b.get_tc_token("c@lid"));
    // The receiving side: a stale token loses, an equally new one wins, the bucket stays.
    call!(t, b.store_received_tc_token("c@lid", &[2, 2], 1500));
    call!(t, b.get_tc_token("c@lid"));
    call!(t, b.store_received_tc_token("c@lid", &[3, 3], 2000));
    call!(t, b.get_tc_token("c@lid"));
    call!(t, b.store_received_tc_token("p@lid", &[4], 6000));
    call!(t, b.get_tc_token("p@lid"));
    // A placeholder never blocks the first real token, even an older one.
    call!(t, b.touch_tc_token_sender_timestamp("q@lid", 9000));
    call!(t, b.store_received_tc_token("q@lid", &[5], 100));
    call!(t, b.store_received_tc_token("q@lid", &[6], 50));
    call!(t, b.get_tc_token("q@lid"));
    call!(t, b.store_received_tc_token("r@lid", &[], 10));
    call!(t, b.store_received_tc_token("r@lid", &[6], 5));
    call!(t, b.get_tc_token("r@lid"));
    call!(t, b.get_all_tc_token_jids(), sorted);

    // Swept only when neither the token (at or after 1000) nor the bucket (at or after
    // 2000) is live.
    call!(t, b.put_tc_token("e1@lid", &tc(&[1], 1000, None)));
    call!(t, b.put_tc_token("e2@lid", &tc(&[1], 999, None)));
    call!(t, b.put_tc_token("e3@lid", &tc(&[], 5000, Some(1999))));
    call!(t, b.put_tc_token("e4@lid", &tc(&[], 5000, Some(2000))));
    call!(t, b.put_tc_token("e5@lid", &tc(&[1], 1, Some(1))));
    call!(t, b.put_tc_token("e6@lid", &tc(&[1], 1, Some(2001))));
    call!(t, b.delete_expired_tc_tokens(1000, 2000));
    call!(t, b.get_all_tc_token_jids(), sorted);
    call!(t, b.delete_expired_tc_tokens(1000, 2000));
    call!(t, b.delete_tc_token("c@lid"));
    call!(t, b.delete_tc_token("nobody@lid"));
    call!(t, b.get_tc_token("c@lid"));
    t
}

/// Sent messages kept for retries (taken once), and the pending inbound buffer.
pub async fn sent_and_pending_messages(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    let now = wacore::time::now_secs();
    let chat = "1555@s.whatsapp.net";
    call!(t, b.take_sent_message(chat, "M1"));
    call!(t, b.store_sent_message(chat, "M1", b"payload-1"));
    call!(t, b.store_sent_message(chat, "M2", b"payload-2"));
    call!(t, b.store_sent_message(chat, "M1", b"payload-1b"));
    call!(t, b.take_sent_message(chat, "M1"));
    call!(t, b.take_sent_message(chat, "M1"));
    call!(t, b.take_sent_message("other@s.whatsapp.net", "M2"));
    call!(t, b.delete_expired_sent_messages(now - 3600));
    call!(t, b.delete_expired_sent_messages(now + 3600));
    call!(t, b.take_sent_message(chat, "M2"));

    let (c, s, s2) = ("1203631@g.us", "1555@lid", "1666@lid");
    call!(t, b.get_pending_inbound(c, s, "I1"));
    call!(t, b.store_pending_inbound(c, s, "I1", b"inbound-1"));
    call!(t, b.get_pending_inbound(c, s, "I1"));
    call!(t, b.store_pending_inbound(c, s, "I1", b"inbound-1b"));
    call!(t, b.get_pending_inbound(c, s, "I1"));
    let row = |sender, id, message| PendingInboundRow {
        chat: c,
        sender,
        id,
        message,
    };
    call!(
        t,
        b.store_pending_inbound_batch(&[
            row(s, "I2", b"inbound-2"),
            row(s2, "I1", b"inbound-3"),
            row(s, "I2", b"inbound-2b"),
        ])
    );
    call!(t, b.store_pending_inbound_batch(&[]));
    call!(t, b.get_pending_inbound(c, s, "I2"));
    call!(t, b.get_pending_inbound(c, s2, "I1"));
    call!(t, b.get_pending_inbound(c, s2, "I2"));
    call!(t, b.delete_pending_inbound(c, s, "I1"));
    call!(t, b.delete_pending_inbound(c, s, "I404"));
    call!(t, b.get_pending_inbound(c, s, "I1"));
    let key = |sender, id| PendingInboundKey {
        chat: c,
        sender,
        id,
    };
    call!(
        t,
        b.delete_pending_inbound_batch(&[key(s, "I2"), key(s, "I404")])
    );
    call!(t, b.delete_pending_inbound_batch(&[]));
    call!(t, b.get_pending_inbound(c, s, "I2"));
    call!(t, b.delete_expired_pending_inbound(now - 3600));
    call!(t, b.get_pending_inbound(c, s2, "I1"));
    call!(t, b.delete_expired_pending_inbound(now + 3600));
    call!(t, b.get_pending_inbound(c, s2, "I1"));
    t
}

/// Message secrets: keyed by chat, sender and id; merged deadlines and parent times.
pub async fn msg_secrets(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    let (c, c2, s) = ("1555@s.whatsapp.net", "1203631@g.us", "9999@lid");
    call!(t, b.get_msg_secret(c, s, "M1"));
    call!(t, b.get_msg_secret_with_ts(c, s, "M1"));
    call!(t, b.put_msg_secret(c, s, "M1", &[1; 32]));
    call!(t, b.get_msg_secret(c, s, "M1"));
    call!(t, b.get_msg_secret_with_ts(c, s, "M1"));
    call!(t, b.get_msg_secret_with_ts(c, "other@lid", "M1"));
    call!(
        t,
        b.put_msg_secrets(vec![
            secret(c, "M2", 2, 100, 50),
            secret(c, "M2", 3, 200, 0),
            secret(c, "M3", 4, 0, 10),
            secret(c2, "M2", 5, 300, 30),
        ])
    );
    call!(t, b.put_msg_secrets(vec![]));
    call!(t, b.get_msg_secret_with_ts(c, s, "M2"));
    call!(t, b.get_msg_secret_with_ts(c2, s, "M2"));
    // A shorter deadline or an unknown parent time never replaces what is known.
    call!(t, b.put_msg_secrets(vec![secret(c, "M2", 6, 150, 40)]));
    call!(t, b.put_msg_secrets(vec![secret(c, "M3", 7, 500, 0)]));
    call!(t, b.put_msg_secrets(vec![secret(c, "M1", 8, 0, 99)]));
    call!(t, b.put_msg_secrets(vec![secret(c, "M4", 9, 400, 1)]));
    call!(t, b.put_msg_secrets(vec![secret(c, "M4", 10, 0, 0)]));
    call!(t, b.get_msg_secret_with_ts(c, s, "M2"));
    call!(t, b.get_msg_secret_with_ts(c, s, "M3"));
    call!(t, b.get_msg_secret_with_ts(c, s, "M4"));
    // Expired when the deadline is at or before the cutoff; 0 never.
    call!(t, b.delete_expired_msg_secrets(199));
    call!(t, b.delete_expired_msg_secrets(200));
    call!(t, b.get_msg_secret(c, s, "M2"));
    call!(t, b.delete_expired_msg_secrets(1_000_000));
    call!(t, b.get_msg_secret(c2, s, "M2"));
    call!(t, b.get_msg_secret_with_ts(c, s, "M1"));
    call!(t, b.get_msg_secret_with_ts(c, s, "M3"));
    call!(t, b.get_msg_secret_with_ts(c, s, "M4"));
    t
}

/// A linked device with everything a paired one has that survives serialization.
pub fn paired_device(push_name: &str) -> Device {
    let mut d = Device::new();
    d.pn = Some("15551234567:3@s.whatsapp.net".parse::<Jid>().expect("jid"));
    d.lid = Some("100000012345678:3@lid".parse::<Jid>().expect("jid"));
    d.push_name = push_name.to_owned();
    d.account = Some(Arc::new(wa::ADVSignedDeviceIdentity {
        details: Some(vec![1, 2, 3]),
        account_signature_key: Some(vec![4; 32]),
        account_signature: Some(vec![5; 64]),
        device_signature: Some(vec![6; 64]),
    }));
    d.edge_routing_info = Some(vec![7, 8]);
    d.props_hash = Some("props".into());
    d.next_pre_key_id = 813;
    d.nct_salt = Some(vec![9; 16]);
    d.login_counter = 4;
    d.lid_migrated = true;
    d
}

/// The linked device: none, created, saved, loaded. (`create` once: the reference numbers
/// its devices 1, 2, …; ours is always the session's one device, 1.)
pub async fn device(b: &dyn Backend, saved: &Device) -> Transcript {
    let mut t = Transcript::default();
    call!(t, b.exists());
    call!(t, b.load(), device_json);
    call!(t, b.create());
    call!(t, b.exists());
    // A fresh device's keys are random: only its shape can agree.
    call!(t, b.load(), |d| d.map(|d| (
        d.pn,
        d.push_name,
        d.next_pre_key_id
    )));
    call!(t, b.save(saved));
    call!(t, b.load(), device_json);
    call!(t, b.load(), |d| same_device(d, saved));
    let mut renamed = saved.clone();
    renamed.push_name = "renamed".into();
    renamed.pn = None;
    call!(t, b.save(&renamed));
    call!(t, b.load(), device_json);
    call!(t, b.exists());
    call!(t, b.snapshot_db("before-crash", Some(b"the message")));
    t
}

/// Something in every table, with `marker` in every sealed value (the device's in its push
/// name, inside its sealed JSON).
pub async fn populate(
    b: &dyn Backend,
    marker: &[u8],
    device: &Device,
) -> wacore::store::error::Result<()> {
    let m = |tag: &str| [marker, tag.as_bytes()].concat();
    let mut secret_bytes = [0u8; 32];
    for (i, byte) in marker.iter().take(32).enumerate() {
        secret_bytes[i] = *byte;
    }
    b.save(device).await?;
    b.put_identity("1555@s.whatsapp.net", [1; 32]).await?;
    b.put_session("1555@s.whatsapp.net", &m("session")).await?;
    b.put_session("1555:2@s.whatsapp.net", &m("session-2"))
        .await?;
    b.store_prekeys_batch(
        &[(1, Bytes::from(m("pk-1"))), (2, Bytes::from(m("pk-2")))],
        false,
    )
    .await?;
    b.store_signed_prekey(1, &m("spk")).await?;
    b.put_sender_key("1203631@g.us::1555:0", &m("sender-key"))
        .await?;
    b.set_sync_key(
        b"sync-1",
        AppStateSyncKey {
            key_data: m("sync"),
            fingerprint: vec![1],
            timestamp: 5,
        },
    )
    .await?;
    b.set_version(
        "regular",
        HashState {
            version: 3,
            ..HashState::default()
        },
    )
    .await?;
    b.put_mutation_macs("regular", 3, &[mac(1, 2)]).await?;
    b.set_sender_key_status("1203631@g.us", &[("1555:2@s.whatsapp.net", true)])
        .await?;
    b.put_lid_mapping(&lid("100", "1555", 1)).await?;
    b.save_base_key("1555:2@s.whatsapp.net", "M1", b"base")
        .await?;
    b.update_device_list(devices("1555", &[0, 2], 7)).await?;
    b.put_group_metadata("1203631@g.us", b"meta").await?;
    b.store_received_tc_token("100@lid", &m("tc"), 8).await?;
    b.store_sent_message("1555@s.whatsapp.net", "S1", &m("sent"))
        .await?;
    b.store_pending_inbound("1203631@g.us", "1555@lid", "I1", &m("inbound"))
        .await?;
    b.put_msg_secret(
        "1555@s.whatsapp.net",
        "1555@s.whatsapp.net",
        "S1",
        &secret_bytes,
    )
    .await?;
    Ok(())
}

/// Reads back what [`populate`] wrote, without consuming anything.
pub async fn read_back(b: &dyn Backend) -> Transcript {
    let mut t = Transcript::default();
    call!(t, b.load(), device_json);
    call!(t, b.load_identity("1555@s.whatsapp.net"));
    call!(t, b.get_session("1555@s.whatsapp.net"));
    call!(t, b.get_session("1555:2@s.whatsapp.net"));
    call!(t, b.load_prekeys_batch(&[1, 2]));
    call!(t, b.load_signed_prekey(1));
    call!(t, b.get_sender_key("1203631@g.us::1555:0"));
    call!(t, b.get_sync_key(b"sync-1"));
    call!(t, b.get_latest_sync_key_id());
    call!(t, b.get_version("regular"), hash_state);
    call!(t, b.get_mutation_mac("regular", &[1; 32]));
    call!(t, b.get_sender_key_devices("1203631@g.us"), sorted);
    call!(t, b.get_pn_mapping("1555"));
    call!(
        t,
        b.has_same_base_key("1555:2@s.whatsapp.net", "M1", b"base")
    );
    call!(t, b.get_devices("1555"));
    call!(t, b.get_group_metadata("1203631@g.us"));
    call!(t, b.get_tc_token("100@lid"));
    call!(t, b.get_pending_inbound("1203631@g.us", "1555@lid", "I1"));
    call!(
        t,
        b.get_msg_secret_with_ts("1555@s.whatsapp.net", "1555@s.whatsapp.net", "S1")
    );
    t
}
