//! Typed blake3 digests. A file's digest, a tensor's and a build node's key are different things
//! and cannot be swapped by mistake; all three print and serialise as lowercase hex.
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a digest is of.
pub trait Kind {
    const NAME: &'static str;
}

#[derive(Debug)]
pub enum FileKind {}
#[derive(Debug)]
pub enum TensorKind {}
#[derive(Debug)]
pub enum NodeKind {}

impl Kind for FileKind {
    const NAME: &'static str = "file";
}
impl Kind for TensorKind {
    const NAME: &'static str = "tensor";
}
impl Kind for NodeKind {
    const NAME: &'static str = "node";
}

/// Feeds `bytes` to `hasher`, on all cores when there are enough of them to be worth it.
pub fn hash_into(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    if bytes.len() >= 1 << 20 {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
}

pub struct Digest<K> {
    hash: blake3::Hash,
    kind: PhantomData<fn() -> K>,
}

/// The blake3 of a whole file's bytes.
pub type FileDigest = Digest<FileKind>;
/// The blake3 of a tensor's raw bytes (its dtype and shape are kept beside it).
pub type TensorDigest = Digest<TensorKind>;
/// A build node's key: the blake3 of the canonical encoding of everything its result depends on.
pub type NodeKey = Digest<NodeKind>;

impl<K> Digest<K> {
    pub fn new(hash: blake3::Hash) -> Self {
        Digest {
            hash,
            kind: PhantomData,
        }
    }

    pub fn of(bytes: &[u8]) -> Self {
        Digest::new(blake3::hash(bytes))
    }

    pub fn hex(&self) -> String {
        self.hash.to_hex().to_string()
    }
}

impl NodeKey {
    /// The key of a serialisable description of a node: its canonical JSON (struct fields in
    /// declaration order, maps sorted), hashed.
    pub fn of_value<T: Serialize>(value: &T) -> NodeKey {
        NodeKey::of(&serde_json::to_vec(value).expect("a node description serialises"))
    }
}

impl<K> Clone for Digest<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for Digest<K> {}
impl<K> PartialEq for Digest<K> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
    }
}
impl<K> Eq for Digest<K> {}
impl<K> std::hash::Hash for Digest<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.hash.as_bytes().hash(state)
    }
}
impl<K> PartialOrd for Digest<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Digest<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.hash.as_bytes().cmp(other.hash.as_bytes())
    }
}

impl<K> fmt::Display for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl<K: Kind> fmt::Debug for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", K::NAME, &self.hex()[..12])
    }
}

impl<K> FromStr for Digest<K> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        blake3::Hash::from_hex(s)
            .map(Digest::new)
            .map_err(|_| format!("`{s}` is not a blake3 digest"))
    }
}

impl<K> Serialize for Digest<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de, K> Deserialize<'de> for Digest<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
