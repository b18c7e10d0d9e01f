//! `lazarus export` and `lazarus predict --bundle` end to end on generated
//! images: extraction with a random-weight efficientnet-lite0, a linear head,
//! a bundle that predicts with experiments/ gone, and bundles that are
//! damaged or name other weights.

use crate::support;

use support::{copy_dir, fails, json, lazarus, ok, queue_command};

#[test]
fn a_bundle_predicts_like_its_run_without_experiments_and_refuses_damage() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let run = super::linear_run(root);
    let cached = root.join("tree/class1/img003.png");
    let fresh = root.join("fresh.png");
    support::reencoded_png(&cached, &fresh);
    let by_run = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--run",
            &run,
            cached.to_str().unwrap(),
            fresh.to_str().unwrap(),
            "--json",
        ],
    )));

    let bundle = root.join("out/bundle");
    let report = json(&ok(lazarus(
        root,
        &["export", &run, "--out", bundle.to_str().unwrap(), "--json"],
    )));
    assert_eq!(report["encoder"]["name"], "efficientnet-lite0");
    assert_eq!(report["encoder"]["weights"], "random:3");
    // The manifest holds the sha256 of every other file, and nothing is left staged.
    let manifest = json(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap());
    let mut listed: Vec<&String> = manifest["files"].as_object().unwrap().keys().collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "bundle.json",
            "classes.json",
            "encoder.json",
            "head.safetensors",
            "model_card.json"
        ]
    );
    for (name, entry) in manifest["files"].as_object().unwrap() {
        let bytes = std::fs::read(bundle.join(name)).unwrap();
        assert_eq!(
            entry["sha256"],
            lazarus::digest::sha256_hex(&bytes),
            "{name}"
        );
    }
    let names: Vec<String> = std::fs::read_dir(root.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["bundle"], "staging folder left behind");
    let card = json(&std::fs::read_to_string(bundle.join("model_card.json")).unwrap());
    assert_eq!(card["run_id"], run.as_str());
    assert!(card["split_sizes"]["test"].as_u64().unwrap() > 0);
    let interval = card["test_accuracy_95ci"].as_array().unwrap();
    assert!(interval[0].as_f64().unwrap() <= interval[1].as_f64().unwrap());
    assert_eq!(card["test_recall_95ci"].as_object().unwrap().len(), 2);
    assert!(card["intended_use"].is_string() && card["limitations"].is_string());
    let classes = json(&std::fs::read_to_string(bundle.join("classes.json")).unwrap());
    assert_eq!(classes["classes"]["0"], "class0");

    let again = fails(lazarus(
        root,
        &["export", &run, "--out", bundle.to_str().unwrap()],
    ));
    assert!(
        again.contains("was written by lazarus export already; --force replaces it"),
        "{again}"
    );
    let unknown = fails(lazarus(
        root,
        &[
            "export",
            "nope",
            "--out",
            root.join("other").to_str().unwrap(),
        ],
    ));
    assert!(unknown.contains("run nope not found"), "{unknown}");

    // Without experiments/ (no database, no run folder) the bundle alone predicts.
    std::fs::rename(root.join("experiments"), root.join("moved-away")).unwrap();
    let by_bundle = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            bundle.to_str().unwrap(),
            cached.to_str().unwrap(),
            fresh.to_str().unwrap(),
            "--json",
        ],
    )));
    // Outside a dataset both images are encoded: the fresh file exactly as the
    // run's encoder pass, the cached one within f16 rounding of its cached row.
    assert_eq!(by_bundle[0]["features_from"], "encoder");
    assert_eq!(by_bundle[1]["features_from"], "encoder");
    assert_eq!(by_bundle[1]["top"], by_run[1]["top"]);
    assert_eq!(by_bundle[0]["top"][0][0], by_run[0]["top"][0][0]);
    let difference = (by_bundle[0]["top"][0][1].as_f64().unwrap()
        - by_run[0]["top"][0][1].as_f64().unwrap())
    .abs();
    assert!(difference < 1e-2, "bundle vs run: {difference}");
    // With --dataset, the dataset's cached features of the same fingerprint are reused.
    let all = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            bundle.to_str().unwrap(),
            "--dataset",
            "toy",
            "--json",
        ],
    )));
    assert_eq!(all.as_array().unwrap().len(), 24);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .all(|p| p["features_from"] == "cache")
    );

    // A bundle written before issue 21 has no task in bundle.json: it is a
    // classifier, and still predicts.
    let older = root.join("older");
    copy_dir(&bundle, &older);
    let mut info = json(&std::fs::read_to_string(older.join("bundle.json")).unwrap());
    assert_eq!(info["task"], "classify");
    assert_eq!(info["format_version"], 1);
    info.as_object_mut().unwrap().remove("task");
    let info_bytes = serde_json::to_vec_pretty(&info).unwrap();
    std::fs::write(older.join("bundle.json"), &info_bytes).unwrap();
    let mut older_manifest = manifest.clone();
    older_manifest["files"]["bundle.json"]["sha256"] =
        lazarus::digest::sha256_hex(&info_bytes).into();
    std::fs::write(
        older.join("manifest.json"),
        serde_json::to_vec_pretty(&older_manifest).unwrap(),
    )
    .unwrap();
    let by_older = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            older.to_str().unwrap(),
            "--task",
            "classify",
            fresh.to_str().unwrap(),
            "--json",
        ],
    )));
    assert_eq!(by_older[0], by_bundle[1]);

    // A changed file: named, with both checksums.
    let damaged = root.join("damaged");
    copy_dir(&bundle, &damaged);
    std::fs::write(
        damaged.join("classes.json"),
        r#"{"classes": {"0": "class1", "1": "class0"}}"#,
    )
    .unwrap();
    let message = fails(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            damaged.to_str().unwrap(),
            fresh.to_str().unwrap(),
        ],
    ));
    assert!(
        message.contains("classes.json has sha256") && message.contains("manifest.json records"),
        "{message}"
    );
    // A missing file: named.
    let partial = root.join("partial");
    copy_dir(&bundle, &partial);
    std::fs::remove_file(partial.join("head.safetensors")).unwrap();
    let message = fails(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            partial.to_str().unwrap(),
            fresh.to_str().unwrap(),
        ],
    ));
    assert!(message.contains("head.safetensors is missing"), "{message}");

    // A bundle that names installed weights whose sha256 is not the one in
    // the cache: refused before the weights are read, both sums named.
    let other = root.join("other-weights");
    copy_dir(&bundle, &other);
    let wanted = "0".repeat(64);
    let mut encoder = json(&std::fs::read_to_string(other.join("encoder.json")).unwrap());
    encoder["weights"] = format!("sha256:{wanted}").into();
    let encoder_bytes = serde_json::to_vec_pretty(&encoder).unwrap();
    std::fs::write(other.join("encoder.json"), &encoder_bytes).unwrap();
    let mut manifest = manifest.clone();
    manifest["files"]["encoder.json"]["sha256"] =
        lazarus::digest::sha256_hex(&encoder_bytes).into();
    std::fs::write(
        other.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let cache = root.join("weights-cache");
    let weights = cache.join("weights/efficientnet-lite0");
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::write(weights.join("model.safetensors"), b"other weights").unwrap();
    let installed = lazarus::digest::sha256_hex(b"other weights");
    std::fs::write(weights.join("model.sha256"), &installed).unwrap();
    let output = queue_command(root, None)
        .env("LAZARUS_CACHE", &cache)
        .args([
            "predict",
            "--bundle",
            other.to_str().unwrap(),
            fresh.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let message = fails(output);
    assert!(
        message.contains(&format!(
            "installed weights have sha256 {installed}, not {wanted}"
        )),
        "{message}"
    );
}
