//! The WhatsApp key store's sealed values: which tables hold them, the associated data that
//! binds each to its table and session, and their rotation to the current key.
//!
//! Every sealed value is two columns, `key_id` (the key of `CREDENTIALS_KEYS` that sealed it)
//! and `sealed`, opened with the [`binding`] of its table and row: a value copied into another
//! row (or another table) does not open. The worker writes them
//! (`worker::driver::whatsapp::store`); [`rotate`] re-seals what an older key sealed.
//!
//! Rotation is the operator's (`gatewayctl credentials rotate`) and, unlike the other
//! statements of `store`, spans every session of every organization. It walks each table in
//! primary-key order, a batch at a time, and rewrites a value only if its row still holds the
//! exact bytes it read (`key_id` and `sealed`): a worker may be writing the same rows, and its
//! newer value must win. A row changed meanwhile is left to another pass over the table,
//! which reads it afresh. Start rotating once every worker seals with the new key (it is first
//! in their `CREDENTIALS_KEYS`); until then they may write values under the old one again.

use deadpool_postgres::GenericClient;

use crate::error::{Error, ErrorCode, Result};
use crate::sealed::{self, Binding, Keyring, SealError};

/// A table with sealed values, and its primary key: each column with its SQL type. The first
/// column is always `session_id`: [`binding`] takes the key in this order.
#[derive(Debug, Clone, Copy)]
pub struct SealedTable {
    pub table: &'static str,
    pub key: &'static [(&'static str, &'static str)],
}

impl SealedTable {
    /// The primary key's columns as text, comma-separated, as [`binding`] takes them: a
    /// `bytea` in hex whatever `bytea_output` says (the text reads back as the same `bytea`).
    pub fn key_as_text(&self) -> String {
        self.key
            .iter()
            .map(|(column, ty)| match *ty {
                "bytea" => format!("'\\x' || encode({column}, 'hex')"),
                _ => format!("{column}::text"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

const SESSION: (&str, &str) = ("session_id", "text");

/// Every table of the key store with sealed values (`key_id`, `sealed`).
pub const SEALED: &[SealedTable] = &[
    SealedTable {
        table: "wa_devices",
        key: &[SESSION],
    },
    SealedTable {
        table: "wa_signal_sessions",
        key: &[SESSION, ("address", "text")],
    },
    SealedTable {
        table: "wa_prekeys",
        key: &[SESSION, ("id", "bigint")],
    },
    SealedTable {
        table: "wa_signed_prekeys",
        key: &[SESSION, ("id", "bigint")],
    },
    SealedTable {
        table: "wa_sender_keys",
        key: &[SESSION, ("address", "text")],
    },
    SealedTable {
        table: "wa_app_state_sync_keys",
        key: &[SESSION, ("id", "bytea")],
    },
    SealedTable {
        table: "wa_tc_tokens",
        key: &[SESSION, ("jid", "text")],
    },
    SealedTable {
        table: "wa_sent_messages",
        key: &[SESSION, ("chat_jid", "text"), ("message_id", "text")],
    },
    SealedTable {
        table: "wa_pending_inbound",
        key: &[
            SESSION,
            ("chat", "text"),
            ("sender", "text"),
            ("id", "text"),
        ],
    },
    SealedTable {
        table: "wa_msg_secrets",
        key: &[
            SESSION,
            ("chat", "text"),
            ("sender", "text"),
            ("msg_id", "text"),
        ],
    },
];

/// Where a value sealed in `table` lives: its row's primary key, `key[0]` the session id, each
/// column as Postgres writes it as text (a `bytea` as `\x` and lowercase hex: [`bytea_key`]).
/// Format-1 values were bound to table and session only.
pub fn binding(table: &str, key: &[&str]) -> Binding {
    // Parts joined by NUL, which no text column can hold: no two rows share a binding.
    let mut aad = table.as_bytes().to_vec();
    for part in key {
        aad.push(0);
        aad.extend_from_slice(part.as_bytes());
    }
    Binding {
        aad,
        v1_aad: format!("{table}/{}", key.first().copied().unwrap_or_default()).into_bytes(),
    }
}

/// A `bytea` key column as [`binding`] takes it.
pub fn bytea_key(bytes: &[u8]) -> String {
    format!("\\x{}", crate::hex(bytes))
}

/// Re-seals under `keyring.current()`, in the current format, every value sealed with another
/// key or in an older format, `batch` rows at a
/// time; answers how many it re-sealed. Fails, naming the key, on a value sealed with a key
/// the keyring does not list.
pub async fn rotate(client: &impl GenericClient, keyring: &Keyring, batch: i64) -> Result<u64> {
    if batch < 1 {
        return Err(Error::invalid("the batch size must be at least 1"));
    }
    let mut resealed = 0;
    for table in SEALED {
        // Passes until one finds no row changed under its feet.
        loop {
            let (done, skipped) = rotate_pass(client, keyring, table, batch).await?;
            resealed += done;
            if skipped == 0 {
                break;
            }
        }
    }
    Ok(resealed)
}

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// The statements of a pass over `t`: its first batch, a batch after a given key, and the
/// conditional update. Keys travel as text (`::text` out, `::text::<type>` back in), so one
/// shape serves every table.
fn pass_statements(t: &SealedTable) -> [String; 3] {
    let list = |each: &dyn Fn(usize, &str, &str) -> String, sep: &str| {
        t.key
            .iter()
            .enumerate()
            .map(|(i, (column, ty))| each(i, column, ty))
            .collect::<Vec<_>>()
            .join(sep)
    };
    let key = list(&|_, c, _| c.to_owned(), ", ");
    // Sealed by another key, or in an older format.
    let select = format!(
        "SELECT {}, key_id, sealed FROM {} \
         WHERE (key_id <> $1 OR substring(sealed FROM 1 FOR {}) <> '\\x{}'::bytea)",
        t.key_as_text(),
        t.table,
        sealed::FORMAT_2.len(),
        crate::hex(&sealed::FORMAT_2),
    );
    let order = format!("ORDER BY {key} LIMIT $2");
    let after = list(&|i, _, ty| format!("${}::text::{ty}", i + 3), ", ");
    let n = t.key.len();
    let update = format!(
        "UPDATE {} AS t SET key_id = $1, sealed = u.new_sealed \
         FROM unnest({}, ${}::text[], ${}::bytea[], ${}::bytea[]) \
           AS u({}, old_key, old_sealed, new_sealed) \
         WHERE {} AND t.key_id = u.old_key AND t.sealed = u.old_sealed",
        t.table,
        list(&|i, _, _| format!("${}::text[]", i + 2), ", "),
        n + 2,
        n + 3,
        n + 4,
        list(&|i, _, _| format!("k{i}"), ", "),
        list(&|i, c, ty| format!("t.{c} = u.k{i}::{ty}"), " AND "),
    );
    [
        format!("{select} {order}"),
        format!("{select} AND ({key}) > ({after}) {order}"),
        update,
    ]
}

/// One walk over `t`: (values re-sealed, values skipped because their row changed).
async fn rotate_pass(
    client: &impl GenericClient,
    keyring: &Keyring,
    t: &SealedTable,
    batch: i64,
) -> Result<(u64, u64)> {
    let cols = t.key.len();
    let [first, next, update] = pass_statements(t);
    let first = client.prepare_cached(&first).await?;
    let next = client.prepare_cached(&next).await?;
    let update = client.prepare_cached(&update).await?;
    let current = keyring.current();

    let (mut resealed, mut skipped) = (0u64, 0u64);
    let mut after: Option<Vec<String>> = None;
    loop {
        let rows = match &after {
            None => client.query(&first, &[&current, &batch]).await?,
            Some(last) => {
                let mut params: Vec<Param<'_>> = vec![&current, &batch];
                params.extend(last.iter().map(|k| k as Param<'_>));
                client.query(&next, &params).await?
            }
        };
        let Some(last) = rows.last() else {
            break;
        };
        after = Some((0..cols).map(|i| last.get(i)).collect());

        let mut keys: Vec<Vec<String>> = vec![Vec::with_capacity(rows.len()); cols];
        let (mut old_keys, mut old_sealed, mut new_sealed) = (vec![], vec![], vec![]);
        for row in &rows {
            let key: Vec<&str> = (0..cols).map(|i| row.get(i)).collect();
            let key_id: String = row.get(cols);
            let sealed: Vec<u8> = row.get(cols + 1);
            let binding = binding(t.table, &key);
            let plain = keyring
                .open(&key_id, &binding, &sealed)
                .map_err(|e| open_error(t.table, key[0], e))?;
            new_sealed.push(keyring.seal(&binding, &plain).1);
            for (i, column) in keys.iter_mut().enumerate() {
                column.push(row.get(i));
            }
            old_keys.push(key_id);
            old_sealed.push(sealed);
        }
        let mut params: Vec<Param<'_>> = vec![&current];
        params.extend(keys.iter().map(|k| k as Param<'_>));
        params.extend([&old_keys as Param<'_>, &old_sealed, &new_sealed]);
        let n = client.execute(&update, &params).await?;
        resealed += n;
        skipped += rows.len() as u64 - n;
        if (rows.len() as i64) < batch {
            break;
        }
    }
    Ok((resealed, skipped))
}

fn open_error(table: &str, session_id: &str, e: SealError) -> Error {
    match e {
        SealError::UnknownKey(_) => Error::invalid(format!(
            "{table}, session {session_id}: a value is {e}; list that key in \
             CREDENTIALS_KEYS (after the new one) to rotate away from it"
        )),
        _ => Error::new(
            ErrorCode::Internal,
            format!("{table}, session {session_id}: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sealed_table_is_keyed_by_its_session_first() {
        for t in SEALED {
            assert!(t.table.starts_with("wa_"), "{}", t.table);
            assert_eq!(t.key[0], SESSION, "{}", t.table);
        }
    }

    #[test]
    fn the_binding_names_table_session_and_row() {
        let b = binding("wa_prekeys", &["01J9", "17"]);
        assert_eq!(b.aad, b"wa_prekeys\x0001J9\x0017".to_vec());
        assert_eq!(b.v1_aad, b"wa_prekeys/01J9".to_vec());
        assert_eq!(bytea_key(&[0, 0xab]), "\\x00ab");
    }
}
