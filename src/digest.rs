//! Content digests: every sha256 lazarus records (weights, shards, fingerprints).

use sha2::{Digest, Sha256};

/// sha256 of some bytes, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
