//! Locations of the real assets that scripts/fetch_assets.sh installs.

use std::path::PathBuf;

/// `$LAZARUS_CACHE`, else `~/.cache/lazarus` (as `lazarus::weights::cache_root`).
pub fn cache_root() -> PathBuf {
    lazarus::weights::cache_root()
}

/// The elpv-dataset's labels.csv; panics with the fix when it is missing.
pub fn elpv_labels() -> PathBuf {
    let path = cache_root().join("data/elpv/labels.csv");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch_assets.sh (the README's test command does)",
        path.display()
    );
    path
}

/// The real nuclei tiles' manifest.csv (scripts/fetch_data.sh cuts them from
/// the stardist wheel); panics with the fix when it is missing.
pub fn nuclei_manifest() -> PathBuf {
    let path = cache_root().join("data/nuclei/manifest.csv");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch_assets.sh (the README's test command does)",
        path.display()
    );
    path
}
