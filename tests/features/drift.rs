//! `lazarus drift` on generated features: a second sample of the reference's
//! distribution is not drift, the same distribution shifted by one standard
//! deviation in four of sixteen dimensions is; features of another encoder
//! or dimension, and datasets without features, are refused by name.

use crate::support;

use std::path::Path;

use support::{
    fails, gaussian_noise, image_folder_from, json, lazarus, ok, write_features, write_features_as,
};

/// Distinct images for each dataset of a test (rows belong to content).
fn seeds(name: &str) -> u32 {
    let names = ["reference", "same", "shifted", "other", "narrow", "bare"];
    10_000 * names.iter().position(|n| *n == name).unwrap() as u32
}

const DIM: usize = 16;

/// Registers `name` (two classes of `per_class` tiny images) and writes
/// features: class c centred at 2 in dimension c, unit noise drawn with
/// `salt`, plus `shift` in dimensions 0 to 3.
fn dataset(root: &Path, name: &str, per_class: usize, salt: u64, shift: f32) {
    let tree = image_folder_from(&root.join(name), &[per_class, per_class], seeds(name));
    ok(lazarus(
        root,
        &["dataset", "add", name, tree.to_str().unwrap()],
    ));
    write_features(root, name, DIM, |record, d| {
        let class = usize::from(record.label.as_deref() == Some("class1"));
        let centre = if d == class { 2.0 } else { 0.0 };
        let shifted = if d < 4 { shift } else { 0.0 };
        centre + shifted + gaussian_noise(salt + (record.index * 1_000 + d) as u64 * 4)
    });
}

fn drift(root: &Path, candidate: &str) -> serde_json::Value {
    json(&ok(lazarus(
        root,
        &[
            "drift",
            "--reference",
            "reference",
            "--candidate",
            candidate,
            "--json",
        ],
    )))
}

#[test]
fn drift_tells_a_second_sample_from_a_shifted_one() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    dataset(root, "reference", 150, 0, 0.0);
    dataset(root, "same", 150, 1 << 40, 0.0);
    dataset(root, "shifted", 150, 2 << 40, 1.0);

    let same = drift(root, "same");
    assert_eq!(same["drift"], false, "{same:#}");
    assert!(same["p_value"].as_f64().unwrap() >= 0.05);
    assert!(
        same["verdict"]
            .as_str()
            .unwrap()
            .starts_with("no drift: candidate same looks like reference reference")
    );
    assert_eq!(same["reference"]["rows"], 300);
    assert_eq!(same["components"].as_array().unwrap().len(), 5);
    // With 300 rows a side, |SMD| of pure noise stays well below 0.3.
    assert!(same["top_dimensions"][0]["smd"].as_f64().unwrap().abs() < 0.3);

    let shifted = drift(root, "shifted");
    assert_eq!(shifted["drift"], true, "{shifted:#}");
    assert!(shifted["p_value"].as_f64().unwrap() < 1e-6);
    assert!(
        shifted["verdict"]
            .as_str()
            .unwrap()
            .starts_with("drift: candidate shifted does not look like")
    );
    // The four shifted dimensions lead, each near SMD 1.
    let mut top: Vec<u64> = shifted["top_dimensions"].as_array().unwrap()[..4]
        .iter()
        .map(|s| s["dimension"].as_u64().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, [0, 1, 2, 3]);
    for s in &shifted["top_dimensions"].as_array().unwrap()[..4] {
        let smd = s["smd"].as_f64().unwrap();
        assert!((0.7..1.3).contains(&smd), "{s}");
    }
    assert_eq!(shifted["shifted_dimensions"], 4);

    // Text output: exit 0 either way, the verdict in plain words.
    let text = ok(lazarus(
        root,
        &[
            "drift",
            "--reference",
            "reference",
            "--candidate",
            "shifted",
        ],
    ));
    assert!(
        text.contains("drift: candidate shifted does not look like reference reference"),
        "{text}"
    );

    // Another encoder, another dimension, no features at all.
    let tree = image_folder_from(&root.join("other"), &[20, 20], seeds("other"));
    ok(lazarus(
        root,
        &["dataset", "add", "other", tree.to_str().unwrap()],
    ));
    write_features_as(root, "other", ("fp2", "other-encoder"), DIM, |_, d| {
        d as f32
    });
    let message = fails(lazarus(
        root,
        &["drift", "--reference", "reference", "--candidate", "other"],
    ));
    assert!(
        message.contains("come from different encoders")
            && message.contains("encoder other-encoder"),
        "{message}"
    );
    let message = fails(lazarus(
        root,
        &[
            "drift",
            "--reference",
            "reference",
            "--candidate",
            "other",
            "--encoder",
            "toy-encoder",
        ],
    ));
    assert!(
        message.contains("no pooled features of dataset other made by toy-encoder"),
        "{message}"
    );
    // Four dimensions: another configuration, so another fingerprint.
    let tree = image_folder_from(&root.join("narrow"), &[20, 20], seeds("narrow"));
    ok(lazarus(
        root,
        &["dataset", "add", "narrow", tree.to_str().unwrap()],
    ));
    write_features_as(root, "narrow", ("fp3", "toy-encoder"), 4, |_, d| d as f32);
    let message = fails(lazarus(
        root,
        &["drift", "--reference", "reference", "--candidate", "narrow"],
    ));
    assert!(
        message.contains("reference reference has 16-dimensional features, candidate narrow has 4"),
        "{message}"
    );
    let tree = image_folder_from(&root.join("bare"), &[5, 5], seeds("bare"));
    ok(lazarus(
        root,
        &["dataset", "add", "bare", tree.to_str().unwrap()],
    ));
    let message = fails(lazarus(
        root,
        &["drift", "--reference", "bare", "--candidate", "reference"],
    ));
    assert!(
        message.contains("dataset bare: no finished features"),
        "{message}"
    );
}
