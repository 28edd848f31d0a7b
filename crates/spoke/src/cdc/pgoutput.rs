//! A decoder for PostgreSQL's `pgoutput` logical replication messages
//! (protocol version 1, text-format tuples).
//!
//! ```text
//!  XLogData payload ─▶ decode() ─▶ Message::{Begin, Commit, Relation, Insert,
//!                                            Update, Delete, Truncate, Type,
//!                                            Origin, LogicalMessage}
//! ```
//!
//! # Contract
//! - [`decode`] never panics on any input: truncated or malformed bytes are a
//!   [`DecodeError`] naming the message and what was missing.
//! - Column values are kept as the server sent them ([`Value`]); turning them
//!   into dataset fields is `convert`'s job. An unchanged TOASTed column is
//!   [`Value::Unchanged`], not a value: the caller must take it from an older
//!   image or report it.
//! - pgwire-replication already turns `Begin`/`Commit`/`Message` into their own
//!   events; the decoder still understands them so it can be tested (and used)
//!   on raw payloads.
//!
//! Format reference: PostgreSQL "Logical Replication Message Formats".

use std::fmt;

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value: the server did not send it.
    Unchanged,
    /// Text format (the output function's text).
    Text(String),
    /// Binary format (only with `binary 'true'`, which Spoke does not ask for).
    Binary(Vec<u8>),
}

/// A row image: one value per column of the relation, in column order.
pub type Tuple = Vec<Value>;

/// A column of a relation, as the Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the "key" flag).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_mod: i32,
}

/// A Relation message: the table's current shape, sent before the first
/// change to it in a session and again after its definition changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.table` (the namespace is empty for `pg_catalog`).
    pub fn qualified(&self) -> String {
        let ns = if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            &self.namespace
        };
        format!("{ns}.{}", self.name)
    }
}

/// Which old image an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: only the replica identity's columns (others null).
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        commit_time_micros: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_micros: i64,
    },
    Origin {
        lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        rel: u32,
        new: Tuple,
    },
    Update {
        rel: u32,
        old: Option<(OldKind, Tuple)>,
        new: Tuple,
    },
    Delete {
        rel: u32,
        old: (OldKind, Tuple),
    },
    Truncate {
        options: u8,
        rels: Vec<u32>,
    },
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

/// Malformed pgoutput bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DecodeError {
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.message)
    }
}

fn err(message: impl Into<String>) -> DecodeError {
    DecodeError {
        message: message.into(),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(err(format!(
                "{}: truncated at {field} (need {n} bytes, {} left)",
                self.what,
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    fn i16(&mut self, field: &str) -> Result<i16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self, field: &str) -> Result<i32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        Ok(self.i32(field)? as u32)
    }
    fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn i64(&mut self, field: &str) -> Result<i64, DecodeError> {
        Ok(self.u64(field)? as i64)
    }
    fn cstr(&mut self, field: &str) -> Result<String, DecodeError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or_else(|| {
            err(format!(
                "{}: {field} is not a NUL-terminated string",
                self.what
            ))
        })?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| err(format!("{}: {field} is not UTF-8", self.what)))?
            .to_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    fn len(&mut self, field: &str) -> Result<usize, DecodeError> {
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| err(format!("{}: negative {field} {n}", self.what)))
    }
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("column count")?;
        let n = usize::try_from(n)
            .map_err(|_| err(format!("{}: negative column count {n}", self.what)))?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let kind = self.u8("column kind")?;
            out.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.len("value length")?;
                    let bytes = self.take(len, "value")?;
                    Value::Text(
                        String::from_utf8(bytes.to_vec()).map_err(|_| {
                            err(format!("{}: column {i} text is not UTF-8", self.what))
                        })?,
                    )
                }
                b'b' => {
                    let len = self.len("value length")?;
                    Value::Binary(self.take(len, "value")?.to_vec())
                }
                other => {
                    return Err(err(format!(
                        "{}: column {i} has unknown kind {:?}",
                        self.what, other as char
                    )))
                }
            });
        }
        Ok(out)
    }
    fn old_kind(&self, b: u8) -> Option<OldKind> {
        match b {
            b'K' => Some(OldKind::Key),
            b'O' => Some(OldKind::Full),
            _ => None,
        }
    }
    fn done(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(err(format!(
                "{}: {} trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

/// Decodes one pgoutput message (an XLogData payload).
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let (&tag, rest) = data
        .split_first()
        .ok_or_else(|| err("empty XLogData payload"))?;
    let what = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        other => {
            return Err(err(format!(
                "unknown message type {:?} (0x{other:02x}); streamed or two-phase transactions are not requested by Spoke",
                other as char
            )))
        }
    };
    let mut r = Reader { buf: rest, what };
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time_micros: r.i64("commit time")?,
            xid: r.u32("xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_time_micros: r.i64("commit time")?,
        },
        b'O' => Message::Origin {
            lsn: r.u64("LSN")?,
            name: r.cstr("name")?,
        },
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let n = usize::try_from(n).map_err(|_| err("Relation: negative column count"))?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_mod: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let rel = r.u32("relation oid")?;
            match r.u8("tuple marker")? {
                b'N' => {}
                other => {
                    return Err(err(format!(
                        "Insert: expected 'N', got {:?}",
                        other as char
                    )))
                }
            }
            Message::Insert {
                rel,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let rel = r.u32("relation oid")?;
            let mut marker = r.u8("tuple marker")?;
            let mut old = None;
            if let Some(kind) = r.old_kind(marker) {
                old = Some((kind, r.tuple()?));
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(err(format!(
                    "Update: expected 'K', 'O' or 'N', got {:?}",
                    marker as char
                )));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32("relation oid")?;
            let marker = r.u8("tuple marker")?;
            let kind = r.old_kind(marker).ok_or_else(|| {
                err(format!(
                    "Delete: expected 'K' or 'O', got {:?}",
                    marker as char
                ))
            })?;
            Message::Delete {
                rel,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.len("relation count")?;
            let options = r.u8("options")?;
            let mut rels = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                rels.push(r.u32("relation oid")?);
            }
            Message::Truncate { options, rels }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.u64("LSN")?;
            let prefix = r.cstr("prefix")?;
            let len = r.len("content length")?;
            Message::LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.take(len, "content")?.to_vec(),
            }
        }
        _ => unreachable!("tag checked above"),
    };
    r.done()?;
    Ok(msg)
}

/// Encoders for tests: build pgoutput payloads the way the server does.
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    pub fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    pub fn tuple(out: &mut Vec<u8>, t: &[Value]) {
        out.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for v in t {
            match v {
                Value::Null => out.push(b'n'),
                Value::Unchanged => out.push(b'u'),
                Value::Text(s) => {
                    out.push(b't');
                    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                Value::Binary(b) => {
                    out.push(b'b');
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    pub fn relation(r: &Relation) -> Vec<u8> {
        let mut out = vec![b'R'];
        out.extend_from_slice(&r.oid.to_be_bytes());
        cstr(&mut out, &r.namespace);
        cstr(&mut out, &r.name);
        out.push(r.replica_identity);
        out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
        for c in &r.columns {
            out.push(u8::from(c.key));
            cstr(&mut out, &c.name);
            out.extend_from_slice(&c.type_oid.to_be_bytes());
            out.extend_from_slice(&c.type_mod.to_be_bytes());
        }
        out
    }

    pub fn insert(rel: u32, new: &[Value]) -> Vec<u8> {
        let mut out = vec![b'I'];
        out.extend_from_slice(&rel.to_be_bytes());
        out.push(b'N');
        tuple(&mut out, new);
        out
    }

    pub fn update(rel: u32, old: Option<(OldKind, &[Value])>, new: &[Value]) -> Vec<u8> {
        let mut out = vec![b'U'];
        out.extend_from_slice(&rel.to_be_bytes());
        if let Some((kind, t)) = old {
            out.push(if kind == OldKind::Key { b'K' } else { b'O' });
            tuple(&mut out, t);
        }
        out.push(b'N');
        tuple(&mut out, new);
        out
    }

    pub fn delete(rel: u32, kind: OldKind, old: &[Value]) -> Vec<u8> {
        let mut out = vec![b'D'];
        out.extend_from_slice(&rel.to_be_bytes());
        out.push(if kind == OldKind::Key { b'K' } else { b'O' });
        tuple(&mut out, old);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn rel() -> Relation {
        Relation {
            oid: 16384,
            namespace: "public".into(),
            name: "items".into(),
            replica_identity: b'd',
            columns: vec![
                Column {
                    key: true,
                    name: "id".into(),
                    type_oid: 25,
                    type_mod: -1,
                },
                Column {
                    key: false,
                    name: "n".into(),
                    type_oid: 23,
                    type_mod: -1,
                },
            ],
        }
    }

    #[test]
    fn decodes_begin_and_commit() {
        let mut b = vec![b'B'];
        b.extend_from_slice(&0x0000_0001_0000_0010u64.to_be_bytes());
        b.extend_from_slice(&77i64.to_be_bytes());
        b.extend_from_slice(&42u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x0000_0001_0000_0010,
                commit_time_micros: 77,
                xid: 42
            }
        );
        let mut c = vec![b'C', 0];
        c.extend_from_slice(&10u64.to_be_bytes());
        c.extend_from_slice(&20u64.to_be_bytes());
        c.extend_from_slice(&30i64.to_be_bytes());
        assert_eq!(
            decode(&c).unwrap(),
            Message::Commit {
                flags: 0,
                commit_lsn: 10,
                end_lsn: 20,
                commit_time_micros: 30
            }
        );
    }

    #[test]
    fn decodes_relation_and_row_changes() {
        let r = rel();
        assert_eq!(decode(&relation(&r)).unwrap(), Message::Relation(r));
        assert_eq!(
            decode(&insert(16384, &[t("a"), Value::Null])).unwrap(),
            Message::Insert {
                rel: 16384,
                new: vec![t("a"), Value::Null]
            }
        );
        assert_eq!(
            decode(&update(16384, None, &[t("a"), Value::Unchanged])).unwrap(),
            Message::Update {
                rel: 16384,
                old: None,
                new: vec![t("a"), Value::Unchanged]
            }
        );
        assert_eq!(
            decode(&update(
                16384,
                Some((OldKind::Key, &[t("a"), Value::Null])),
                &[t("b"), t("1")]
            ))
            .unwrap(),
            Message::Update {
                rel: 16384,
                old: Some((OldKind::Key, vec![t("a"), Value::Null])),
                new: vec![t("b"), t("1")]
            }
        );
        assert_eq!(
            decode(&delete(16384, OldKind::Full, &[t("a"), t("5")])).unwrap(),
            Message::Delete {
                rel: 16384,
                old: (OldKind::Full, vec![t("a"), t("5")])
            }
        );
    }

    #[test]
    fn decodes_truncate_type_origin_and_message() {
        let mut tr = vec![b'T'];
        tr.extend_from_slice(&2i32.to_be_bytes());
        tr.push(1);
        tr.extend_from_slice(&5u32.to_be_bytes());
        tr.extend_from_slice(&6u32.to_be_bytes());
        assert_eq!(
            decode(&tr).unwrap(),
            Message::Truncate {
                options: 1,
                rels: vec![5, 6]
            }
        );
        let mut y = vec![b'Y'];
        y.extend_from_slice(&99u32.to_be_bytes());
        cstr(&mut y, "public");
        cstr(&mut y, "mood");
        assert!(matches!(decode(&y).unwrap(), Message::Type { oid: 99, .. }));
        let mut o = vec![b'O'];
        o.extend_from_slice(&1u64.to_be_bytes());
        cstr(&mut o, "node");
        assert!(matches!(
            decode(&o).unwrap(),
            Message::Origin { lsn: 1, .. }
        ));
        let mut m = vec![b'M', 0];
        m.extend_from_slice(&9u64.to_be_bytes());
        cstr(&mut m, "spoke");
        m.extend_from_slice(&2i32.to_be_bytes());
        m.extend_from_slice(b"hi");
        assert_eq!(
            decode(&m).unwrap(),
            Message::LogicalMessage {
                transactional: false,
                lsn: 9,
                prefix: "spoke".into(),
                content: b"hi".to_vec()
            }
        );
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        assert!(decode(&[]).is_err());
        let e = decode(b"S\0\0\0\x01").unwrap_err().to_string();
        assert!(e.contains("unknown message type"), "{e}");
        let full = insert(1, &[t("abc")]);
        for cut in 1..full.len() {
            let e = decode(&full[..cut]).unwrap_err().to_string();
            assert!(e.contains("Insert"), "{e}");
        }
        let mut extra = full.clone();
        extra.push(0);
        assert!(decode(&extra).unwrap_err().to_string().contains("trailing"));
        let mut bad_kind = insert(1, &[t("x")]);
        bad_kind[8] = b'z';
        assert!(decode(&bad_kind)
            .unwrap_err()
            .to_string()
            .contains("unknown kind"));
        let mut neg = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        neg.extend_from_slice(&(-5i32).to_be_bytes());
        assert!(decode(&neg).unwrap_err().to_string().contains("negative"));
        // Arbitrary bytes never panic.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..40);
            let mut b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(first) = b.first_mut() {
                *first = *rng.choice(b"BCORYIUDTM").unwrap();
            }
            let _ = decode(&b);
        }
    }
}
