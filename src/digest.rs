//! Content digests: every sha256 lazarus records (weights, shards,
//! fingerprints, images), and the content id an image is known by.

use std::fmt;

use sha2::{Digest, Sha256};

/// sha256 of some bytes, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256 of some bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Digits of the ids manifests recorded before issue 18 (a sha256 prefix).
pub const SHORT_ID_HEX: usize = 16;

/// The id an image is known by: the sha256 of its file's bytes. Manifests
/// written before issue 18 recorded only its first 8 bytes (16 hex digits);
/// such an id matches every digest that starts with them. Feature shards
/// always store the full digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId {
    bytes: [u8; 32],
    /// How many leading bytes are known: 32, or 8 for a short (old) id.
    known: u8,
}

impl ContentId {
    /// The id of a full digest.
    pub fn full(sha256: [u8; 32]) -> Self {
        ContentId {
            bytes: sha256,
            known: 32,
        }
    }

    /// Parses 64 hex digits (a full sha256) or 16 (an old manifest's prefix).
    pub fn parse(text: &str) -> Option<Self> {
        let known = match text.len() {
            64 => 32,
            SHORT_ID_HEX => 8,
            _ => return None,
        };
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes[..known]).ok()?;
        Some(ContentId {
            bytes,
            known: known as u8,
        })
    }

    /// True when every byte of the digest is known.
    pub fn is_full(&self) -> bool {
        self.known == 32
    }

    /// The known leading bytes.
    pub fn known_bytes(&self) -> &[u8] {
        &self.bytes[..self.known as usize]
    }

    /// The full digest, when known.
    pub fn sha256(&self) -> Option<&[u8; 32]> {
        self.is_full().then_some(&self.bytes)
    }

    /// Whether the file whose bytes hash to `sha256` is this image.
    pub fn matches(&self, sha256: &[u8; 32]) -> bool {
        sha256.starts_with(self.known_bytes())
    }

    /// The first 16 hex digits: how predictions and old manifests name an image.
    pub fn short(&self) -> String {
        hex::encode(&self.bytes[..8])
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.known_bytes()))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_match_digests_by_prefix() {
        let digest = sha256(b"an image");
        let full = ContentId::full(digest);
        let text = full.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(ContentId::parse(&text), Some(full));
        let short = ContentId::parse(&text[..16]).unwrap();
        assert!(!short.is_full());
        assert!(short.matches(&digest) && full.matches(&digest));
        let other = sha256(b"another image");
        assert!(!short.matches(&other) && !full.matches(&other));
        assert_eq!(short.short(), full.short());
        assert!(ContentId::parse("abc").is_none());
        assert!(ContentId::parse(&"zz".repeat(32)).is_none());
    }
}
