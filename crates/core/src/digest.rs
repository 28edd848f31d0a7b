//! Digests of a dataset's state, for reconciliation (DESIGN.md, "Reconciliation").
//!
//! Both sides of a copy — the feed's compacted state and the copy — keep a
//! digest of every key's `(key, version, deleted)`, tombstones included, so
//! a compare finds missing, stale, extra and tombstone-mismatched records
//! alike. Field values are not hashed: versions are what the apply rule
//! compares, and a version names one state of a record.
//!
//! ```text
//!   key ──FNV-1a+fmix64──▶ bucket (12 bits)   (key, version, deleted) ──keyed BLAKE3──▶ 128-bit entry hash
//!
//!   level 2: 4096 buckets   leaf = XOR of the entry hashes of the bucket's keys
//!   level 1:   64 nodes     node = XOR of its 64 leaves
//!   level 0:    1 root      root = XOR of the 64 nodes
//! ```
//!
//! XOR makes the digest independent of order and updatable in O(1) per
//! change: a key moving from state A to state B XORs out `hash(A)` and XORs
//! in `hash(B)` in the key's bucket. A compare reads the roots, then only
//! the level-1 nodes that differ, then only their leaves, and finally
//! exchanges the `(key, version, deleted)` lists of the differing buckets —
//! so its cost follows the number of differences, not the dataset's size.
//!
//! The bucket depends on the key only (so every state of a key lands in the
//! same bucket); the entry hash on the whole triple, through a nonlinear
//! hash, so no set of different states XORs to the same value except by a
//! 2⁻¹²⁸ accident. Both hashes are part of the stored format: changing them
//! means recomputing every stored digest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::change::Version;

/// Number of buckets (leaves) of the key space.
pub const BUCKETS: usize = 4096;
/// Children per inner node; also leaves per stored chunk.
pub const FANOUT: usize = 64;
/// The level of the leaves (0 = root, 1 = 64 nodes, 2 = 4096 buckets).
pub const LEAF_LEVEL: u8 = 2;
/// Bytes of one stored chunk: the 64 leaves under one level-1 node.
pub const CHUNK_BYTES: usize = FANOUT * 16;

/// A 128-bit digest value.
pub type Hash = u128;

/// Key of the keyed BLAKE3 used for entry hashes: separates them from the
/// plain BLAKE3 of the key that picks its bucket ("spoke digest entry v1").
const ENTRY_KEY: [u8; 32] = *b"spoke digest entry v1 (k,v,d)..!";

/// A key's bucket: FNV-1a (64 bits) over the key, mixed by the MurmurHash3
/// finalizer, top 12 bits. The bucket only has to spread keys evenly and
/// never change (it is stored), so it uses a hash ten times cheaper than
/// BLAKE3; the entry hashes, which are XORed together, use BLAKE3.
pub fn bucket_of(key: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> (64 - 12)) as u16
}

/// The hash of one key's state. The version and flag are fixed-size and
/// come last, so the input is unambiguous without a length prefix.
pub fn entry_hash(key: &str, version: Version, deleted: bool) -> Hash {
    let mut h = blake3::Hasher::new_keyed(&ENTRY_KEY);
    h.update(key.as_bytes());
    h.update(&version.to_le_bytes());
    h.update(&[u8::from(deleted)]);
    let out = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out.as_bytes()[..16]);
    u128::from_le_bytes(first)
}

/// One key's state as digests see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "(String, Version, bool)", into = "(String, Version, bool)")]
pub struct DigestEntry {
    pub key: String,
    pub version: Version,
    pub deleted: bool,
}

impl From<(String, Version, bool)> for DigestEntry {
    fn from((key, version, deleted): (String, Version, bool)) -> Self {
        DigestEntry {
            key,
            version,
            deleted,
        }
    }
}

impl From<DigestEntry> for (String, Version, bool) {
    fn from(e: DigestEntry) -> Self {
        (e.key, e.version, e.deleted)
    }
}

impl DigestEntry {
    pub fn new(key: impl Into<String>, version: Version, deleted: bool) -> Self {
        DigestEntry {
            key: key.into(),
            version,
            deleted,
        }
    }
    pub fn hash(&self) -> Hash {
        entry_hash(&self.key, self.version, self.deleted)
    }
    pub fn bucket(&self) -> u16 {
        bucket_of(&self.key)
    }
}

/// A bad digest request (level or node out of range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DigestError(pub String);

/// A whole digest: the 4096 leaves; inner nodes are computed on demand
/// (64 XORs per node, 4096 for the root — nothing worth storing).
#[derive(Clone, PartialEq, Eq)]
pub struct Digest {
    leaves: Box<[Hash]>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            leaves: vec![0; BUCKETS].into_boxed_slice(),
        }
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest(root {:032x})", self.root())
    }
}

impl Digest {
    pub fn new() -> Self {
        Self::default()
    }

    /// A digest computed from scratch over every state of a dataset.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = (&'a str, Version, bool)>) -> Self {
        let mut d = Digest::new();
        for (key, version, deleted) in entries {
            d.toggle(key, version, deleted);
        }
        d
    }

    /// XORs one state in (or, applied again, out).
    pub fn toggle(&mut self, key: &str, version: Version, deleted: bool) {
        self.leaves[bucket_of(key) as usize] ^= entry_hash(key, version, deleted);
    }

    /// XORs `hash` into `bucket`'s leaf.
    pub fn xor(&mut self, bucket: u16, hash: Hash) {
        self.leaves[bucket as usize % BUCKETS] ^= hash;
    }

    /// Adds a batch's deltas.
    pub fn apply_delta(&mut self, delta: &DigestDelta) {
        for (b, h) in delta.buckets() {
            self.xor(b, h);
        }
    }

    pub fn leaves(&self) -> &[Hash] {
        &self.leaves
    }

    pub fn leaf(&self, bucket: u16) -> Hash {
        self.leaves[bucket as usize % BUCKETS]
    }

    /// The node `index` at `level` (0 root, 1 inner, 2 leaf).
    pub fn node(&self, level: u8, index: usize) -> Hash {
        match level {
            0 => self.leaves.iter().fold(0, |a, h| a ^ h),
            1 => self.leaves[index * FANOUT..(index + 1) * FANOUT]
                .iter()
                .fold(0, |a, h| a ^ h),
            _ => self.leaves[index],
        }
    }

    pub fn root(&self) -> Hash {
        self.node(0, 0)
    }

    /// The nodes a [`DigestQuery`] asks for, in index order.
    pub fn nodes(&self, query: &DigestQuery) -> Result<DigestNodes, DigestError> {
        let indices = query.indices()?;
        Ok(DigestNodes {
            buckets: BUCKETS as u32,
            fanout: FANOUT as u32,
            level: query.level,
            nodes: indices
                .into_iter()
                .map(|i| DigestNode(i, HashHex(self.node(query.level, i as usize))))
                .collect(),
        })
    }

    /// Buckets whose leaves differ between two digests.
    pub fn differing_buckets(&self, other: &Digest) -> Vec<u16> {
        (0..BUCKETS)
            .filter(|&b| self.leaves[b] != other.leaves[b])
            .map(|b| b as u16)
            .collect()
    }

    /// The 64 leaves of one chunk (one level-1 node) as stored bytes
    /// (16 bytes per leaf, little endian).
    pub fn chunk_bytes(&self, chunk: usize) -> Vec<u8> {
        leaves_to_bytes(&self.leaves[chunk * FANOUT..(chunk + 1) * FANOUT])
    }

    /// Sets one chunk from stored bytes; a chunk of the wrong size is an error.
    pub fn set_chunk_bytes(&mut self, chunk: usize, bytes: &[u8]) -> Result<(), DigestError> {
        if chunk >= BUCKETS / FANOUT || bytes.len() != CHUNK_BYTES {
            return Err(DigestError(format!(
                "stored digest chunk {chunk} has {} bytes, expected {CHUNK_BYTES}",
                bytes.len()
            )));
        }
        for (i, b) in bytes.chunks_exact(16).enumerate() {
            self.leaves[chunk * FANOUT + i] = hash_from_bytes(b);
        }
        Ok(())
    }
}

/// Leaves as stored bytes (16 bytes each, little endian).
pub fn leaves_to_bytes(leaves: &[Hash]) -> Vec<u8> {
    leaves.iter().flat_map(|h| h.to_le_bytes()).collect()
}

fn hash_from_bytes(b: &[u8]) -> Hash {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    u128::from_le_bytes(a)
}

/// XORs one stored chunk with deltas, in place (`offsets` index the 64 leaves).
pub fn xor_chunk(bytes: &mut [u8], deltas: &[(usize, Hash)]) {
    for &(i, h) in deltas {
        let slot = &mut bytes[i * 16..(i + 1) * 16];
        let v = hash_from_bytes(slot) ^ h;
        slot.copy_from_slice(&v.to_le_bytes());
    }
}

/// A batch's effect on a digest, per bucket: what a store XORs into its
/// stored digest in the same transaction as the records.
///
/// A few buckets (a small batch) are kept as a list; past [`FEW`] a table
/// of every bucket replaces it, so a fold of many thousand keys XORs in
/// O(1) per key.
#[derive(Debug, Clone, Default)]
pub struct DigestDelta {
    few: Vec<(u16, Hash)>,
    all: Option<Box<[Hash]>>,
}

/// Most buckets a [`DigestDelta`] keeps as a list.
const FEW: usize = 32;

impl PartialEq for DigestDelta {
    fn eq(&self, other: &Self) -> bool {
        self.buckets().eq(other.buckets())
    }
}

impl Eq for DigestDelta {}

impl DigestDelta {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn xor(&mut self, bucket: u16, hash: Hash) {
        if let Some(all) = &mut self.all {
            all[bucket as usize] ^= hash;
            return;
        }
        if let Some((_, h)) = self.few.iter_mut().find(|(b, _)| *b == bucket) {
            *h ^= hash;
            return;
        }
        self.few.push((bucket, hash));
        if self.few.len() > FEW {
            let mut all = vec![0; BUCKETS].into_boxed_slice();
            for (b, h) in self.few.drain(..) {
                all[b as usize] ^= h;
            }
            self.all = Some(all);
        }
    }

    /// Records a key moving from `old` to `new` (each `(version, deleted)`,
    /// `None` for absent).
    pub fn replace(
        &mut self,
        key: &str,
        old: Option<(Version, bool)>,
        new: Option<(Version, bool)>,
    ) {
        let mut h = 0;
        if let Some((v, d)) = old {
            h ^= entry_hash(key, v, d);
        }
        if let Some((v, d)) = new {
            h ^= entry_hash(key, v, d);
        }
        if h != 0 {
            self.xor(bucket_of(key), h);
        }
    }

    pub fn is_empty(&self) -> bool {
        match &self.all {
            Some(all) => all.iter().all(|&h| h == 0),
            None => self.few.iter().all(|&(_, h)| h == 0),
        }
    }

    /// Non-zero deltas by bucket, in bucket order.
    pub fn buckets(&self) -> std::vec::IntoIter<(u16, Hash)> {
        let mut out: Vec<(u16, Hash)> = match &self.all {
            Some(all) => all
                .iter()
                .enumerate()
                .map(|(b, &h)| (b as u16, h))
                .collect(),
            None => {
                let mut few = self.few.clone();
                few.sort_unstable_by_key(|(b, _)| *b);
                few
            }
        };
        out.retain(|(_, h)| *h != 0);
        out.into_iter()
    }

    /// Non-zero deltas grouped by stored chunk: chunk → [(leaf offset, delta)].
    pub fn chunks(&self) -> BTreeMap<usize, Vec<(usize, Hash)>> {
        let mut out: BTreeMap<usize, Vec<(usize, Hash)>> = BTreeMap::new();
        for (b, h) in self.buckets() {
            let b = b as usize;
            out.entry(b / FANOUT).or_default().push((b % FANOUT, h));
        }
        out
    }
}

/// Which nodes to read: all of `level`, or only the children of the given
/// nodes of `level - 1` (`under`), so a compare descends only where the
/// parents differed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestQuery {
    pub level: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under: Option<Vec<u32>>,
}

impl DigestQuery {
    pub fn root() -> Self {
        DigestQuery {
            level: 0,
            under: None,
        }
    }

    pub fn level(level: u8) -> Self {
        DigestQuery { level, under: None }
    }

    pub fn under(level: u8, parents: Vec<u32>) -> Self {
        DigestQuery {
            level,
            under: Some(parents),
        }
    }

    /// Nodes at `level`.
    pub fn width(level: u8) -> usize {
        match level {
            0 => 1,
            1 => BUCKETS / FANOUT,
            _ => BUCKETS,
        }
    }

    /// The node indices this query names, sorted and unique, or why it is invalid.
    pub fn indices(&self) -> Result<Vec<u32>, DigestError> {
        if self.level > LEAF_LEVEL {
            return Err(DigestError(format!(
                "level must be 0 (root), 1 ({} nodes) or 2 ({BUCKETS} buckets), got {}",
                BUCKETS / FANOUT,
                self.level
            )));
        }
        let Some(under) = &self.under else {
            return Ok((0..Self::width(self.level) as u32).collect());
        };
        if self.level == 0 {
            return Err(DigestError(
                "the root has no parent: 'under' needs level 1 or 2".into(),
            ));
        }
        let parents = Self::width(self.level - 1) as u32;
        let mut out = Vec::with_capacity(under.len() * FANOUT);
        let mut sorted = under.clone();
        sorted.sort_unstable();
        sorted.dedup();
        for p in sorted {
            if p >= parents {
                return Err(DigestError(format!(
                    "node {p} does not exist at level {} (it has {parents} nodes)",
                    self.level - 1
                )));
            }
            let first = p * FANOUT as u32;
            out.extend(first..first + FANOUT as u32);
        }
        Ok(out)
    }
}

/// A 128-bit hash written as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashHex(pub Hash);

impl Serialize for HashHex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for HashHex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.len() != 32 {
            return Err(serde::de::Error::custom(format!(
                "a digest hash has 32 hex digits, got {}",
                s.len()
            )));
        }
        u128::from_str_radix(&s, 16)
            .map(HashHex)
            .map_err(|e| serde::de::Error::custom(format!("digest hash: {e}")))
    }
}

/// One node of an answer: `[index, "hex hash"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestNode(pub u32, pub HashHex);

/// An answer to a [`DigestQuery`], as the hub and agent serve it:
/// `{"buckets": 4096, "fanout": 64, "level": 1, "nodes": [[0, "…"], …]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestNodes {
    /// The layout, so a client never compares digests of different shapes.
    pub buckets: u32,
    pub fanout: u32,
    pub level: u8,
    pub nodes: Vec<DigestNode>,
}

impl DigestNodes {
    /// Checks the layout matches this build's.
    pub fn check_layout(&self) -> Result<(), DigestError> {
        if self.buckets as usize != BUCKETS || self.fanout as usize != FANOUT {
            return Err(DigestError(format!(
                "digest layout {}x{} differs from this build's {BUCKETS}x{FANOUT}",
                self.buckets, self.fanout
            )));
        }
        Ok(())
    }

    pub fn map(&self) -> BTreeMap<u32, Hash> {
        self.nodes.iter().map(|n| (n.0, n.1 .0)).collect()
    }

    /// Indices whose hashes differ between two answers for the same query
    /// (a node present in only one of them differs).
    pub fn differing(&self, other: &DigestNodes) -> Vec<u32> {
        let a = self.map();
        let b = other.map();
        let mut out: Vec<u32> = a
            .iter()
            .filter(|(i, h)| b.get(i) != Some(h))
            .map(|(i, _)| *i)
            .collect();
        out.extend(b.keys().filter(|i| !a.contains_key(i)));
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Parses a comma-separated list of node or bucket numbers below `limit`.
pub fn parse_indices(s: &str, limit: usize, what: &str) -> Result<Vec<u32>, DigestError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: u32 = part
            .parse()
            .map_err(|_| DigestError(format!("{what}: '{part}' is not a number")))?;
        if n as usize >= limit {
            return Err(DigestError(format!(
                "{what}: {n} is out of range (0..{limit})"
            )));
        }
        out.push(n);
    }
    Ok(out)
}

/// How one key differs between a copy and its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// The source has the key; the copy has nothing for it.
    Missing { source: DigestEntry },
    /// The source holds a newer version than the copy.
    Stale {
        copy: DigestEntry,
        source: DigestEntry,
    },
    /// Same version, but one side is a tombstone and the other is not: one
    /// of them was corrupted (an owner's version names one state).
    Conflict {
        copy: DigestEntry,
        source: DigestEntry,
    },
    /// The copy has a key the source has never held (not even as a tombstone).
    Extra { copy: DigestEntry },
    /// The copy holds a newer version than the source. Never rolled back.
    Ahead {
        copy: DigestEntry,
        source: DigestEntry,
    },
}

impl Difference {
    pub fn key(&self) -> &str {
        match self {
            Difference::Missing { source } => &source.key,
            Difference::Stale { copy, .. }
            | Difference::Conflict { copy, .. }
            | Difference::Extra { copy }
            | Difference::Ahead { copy, .. } => &copy.key,
        }
    }
}

/// Compares the entries of the same buckets on both sides; returns every
/// difference in key order.
pub fn compare_entries(copy: Vec<DigestEntry>, source: Vec<DigestEntry>) -> Vec<Difference> {
    let mut copy: BTreeMap<String, DigestEntry> =
        copy.into_iter().map(|e| (e.key.clone(), e)).collect();
    let mut out = Vec::new();
    let mut source: Vec<DigestEntry> = source;
    source.sort();
    for s in source {
        match copy.remove(&s.key) {
            None => out.push(Difference::Missing { source: s }),
            Some(c) if c.version < s.version => out.push(Difference::Stale { copy: c, source: s }),
            Some(c) if c.version > s.version => out.push(Difference::Ahead { copy: c, source: s }),
            Some(c) if c.deleted != s.deleted => {
                out.push(Difference::Conflict { copy: c, source: s })
            }
            Some(_) => {}
        }
    }
    out.extend(copy.into_values().map(|c| Difference::Extra { copy: c }));
    out.sort_by(|a, b| a.key().cmp(b.key()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_and_hashes_are_stable() {
        // Part of the stored format: a change here invalidates stored digests.
        assert_eq!(bucket_of("a"), bucket_of("a"));
        assert!(bucket_of("customer-42") < BUCKETS as u16);
        assert_ne!(entry_hash("a", 1, false), entry_hash("a", 1, true));
        assert_ne!(entry_hash("a", 1, false), entry_hash("a", 2, false));
        assert_ne!(entry_hash("a1", 1, false), entry_hash("a", 11, false));
        assert_eq!(bucket_of("a"), PINNED_BUCKET_OF_A);
        assert_eq!(
            format!("{:032x}", entry_hash("a", 1, false)),
            "3cc371e60c229390741019877d036950"
        );
    }

    const PINNED_BUCKET_OF_A: u16 = 2090;

    #[test]
    fn buckets_spread_keys_evenly() {
        let mut counts = vec![0u32; BUCKETS];
        for i in 0..409_600u32 {
            counts[bucket_of(&format!("c{i}")) as usize] += 1;
        }
        // 100 expected per bucket; a fair hash stays well within ±50%.
        assert!(
            counts.iter().all(|&c| (50..150).contains(&c)),
            "{:?}",
            (counts.iter().min(), counts.iter().max())
        );
    }

    #[test]
    fn swapping_versions_between_keys_changes_the_digest() {
        let a = Digest::from_entries([("k1", 1, false), ("k2", 2, false)]);
        let b = Digest::from_entries([("k1", 2, false), ("k2", 1, false)]);
        assert_ne!(a.root(), b.root());
    }

    #[test]
    fn queries_descend_under_parents_and_reject_bad_input() {
        let mut d = Digest::new();
        d.toggle("x", 3, false);
        let b = bucket_of("x") as u32;
        let root = d.nodes(&DigestQuery::root()).unwrap();
        assert_eq!(root.nodes.len(), 1);
        assert_eq!(root.nodes[0].1 .0, entry_hash("x", 3, false));
        let l1 = d.nodes(&DigestQuery::level(1)).unwrap();
        assert_eq!(l1.nodes.len(), 64);
        let zero = Digest::new().nodes(&DigestQuery::level(1)).unwrap();
        assert_eq!(l1.differing(&zero), vec![b / 64]);
        let leaves = d.nodes(&DigestQuery::under(2, vec![b / 64])).unwrap();
        assert_eq!(leaves.nodes.len(), 64);
        let zero = Digest::new()
            .nodes(&DigestQuery::under(2, vec![b / 64]))
            .unwrap();
        assert_eq!(leaves.differing(&zero), vec![b]);
        assert!(d.nodes(&DigestQuery::level(3)).is_err());
        assert!(d.nodes(&DigestQuery::under(0, vec![0])).is_err());
        assert!(d.nodes(&DigestQuery::under(1, vec![1])).is_err());
        assert!(d.nodes(&DigestQuery::under(2, vec![64])).is_err());
        assert_eq!(parse_indices("1, 2,3", 4, "under").unwrap(), vec![1, 2, 3]);
        assert!(parse_indices("4", 4, "under").is_err());
        assert!(parse_indices("x", 4, "under").is_err());
    }

    #[test]
    fn wire_format_round_trips() {
        let mut d = Digest::new();
        d.toggle("x", 3, false);
        let n = d.nodes(&DigestQuery::level(1)).unwrap();
        let json = serde_json::to_string(&n).unwrap();
        assert!(json.starts_with(r#"{"buckets":4096,"fanout":64,"level":1,"nodes":[[0,""#));
        let back: DigestNodes = serde_json::from_str(&json).unwrap();
        assert_eq!(back, n);
        let e = DigestEntry::new("k", 7, true);
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"["k",7,true]"#);
        assert!(serde_json::from_str::<DigestNodes>(
            r#"{"buckets":4096,"fanout":64,"level":0,"nodes":[[0,"zz"]]}"#
        )
        .is_err());
    }

    #[test]
    fn chunks_round_trip_through_bytes() {
        let mut d = Digest::new();
        for i in 0..500u64 {
            d.toggle(&format!("k{i}"), i, i % 3 == 0);
        }
        let mut e = Digest::new();
        for c in 0..BUCKETS / FANOUT {
            e.set_chunk_bytes(c, &d.chunk_bytes(c)).unwrap();
        }
        assert_eq!(d, e);
        assert!(e.set_chunk_bytes(0, &[0; 10]).is_err());
    }

    #[test]
    fn compare_classifies_every_kind() {
        let copy = vec![
            DigestEntry::new("same", 1, false),
            DigestEntry::new("stale", 1, false),
            DigestEntry::new("ahead", 5, false),
            DigestEntry::new("conflict", 2, true),
            DigestEntry::new("extra", 1, false),
        ];
        let source = vec![
            DigestEntry::new("same", 1, false),
            DigestEntry::new("stale", 2, true),
            DigestEntry::new("ahead", 4, false),
            DigestEntry::new("conflict", 2, false),
            DigestEntry::new("missing", 3, true),
        ];
        let kinds: Vec<(String, &str)> = compare_entries(copy, source)
            .iter()
            .map(|d| {
                (
                    d.key().to_owned(),
                    match d {
                        Difference::Missing { .. } => "missing",
                        Difference::Stale { .. } => "stale",
                        Difference::Conflict { .. } => "conflict",
                        Difference::Extra { .. } => "extra",
                        Difference::Ahead { .. } => "ahead",
                    },
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("ahead".to_owned(), "ahead"),
                ("conflict".to_owned(), "conflict"),
                ("extra".to_owned(), "extra"),
                ("missing".to_owned(), "missing"),
                ("stale".to_owned(), "stale"),
            ]
        );
    }

    #[test]
    fn a_delta_is_the_same_whether_kept_as_a_list_or_a_table() {
        let mut list = DigestDelta::new();
        let mut table = DigestDelta::new();
        for b in 0..100u16 {
            table.xor(b * 7, u128::from(b) + 1);
        }
        // Undo all but three: the table keeps zeros, the list never had them.
        for b in 3..100u16 {
            table.xor(b * 7, u128::from(b) + 1);
        }
        for b in [14u16, 0, 7] {
            list.xor(b, u128::from(b / 7) + 1);
        }
        assert_eq!(list, table);
        assert_eq!(
            table.buckets().collect::<Vec<_>>(),
            vec![(0, 1), (7, 2), (14, 3)]
        );
        for b in [0u16, 7, 14] {
            table.xor(b, u128::from(b / 7) + 1);
        }
        assert!(table.is_empty());
        assert_ne!(list, table);
    }

    proptest! {
        /// The incremental digest (XOR out the old state, XOR in the new)
        /// equals the digest computed from scratch over the final states.
        #[test]
        fn incremental_equals_from_scratch(
            ops in prop::collection::vec((0u8..120, 1u64..6, any::<bool>(), any::<bool>()), 0..300)
        ) {
            let mut states: BTreeMap<String, (Version, bool)> = BTreeMap::new();
            let mut inc = Digest::new();
            let mut delta = DigestDelta::new();
            for (k, v, deleted, remove) in ops {
                let key = format!("k{k}");
                let old = states.get(&key).copied();
                let new = if remove { None } else { Some((v, deleted)) };
                match new {
                    Some(s) => { states.insert(key.clone(), s); }
                    None => { states.remove(&key); }
                }
                delta.replace(&key, old, new);
            }
            inc.apply_delta(&delta);
            let scratch = Digest::from_entries(states.iter().map(|(k, &(v, d))| (k.as_str(), v, d)));
            prop_assert_eq!(inc.root(), scratch.root());
            prop_assert_eq!(inc, scratch);
        }
    }
}
