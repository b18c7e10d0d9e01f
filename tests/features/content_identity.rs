//! Feature rows belong to image content (issue 18), through the real binary.

use crate::support;

use std::path::{Path, PathBuf};

use lazarus::features::catalog::{self, FeatureRequest};
use support::{json, lazarus, ok};

const SAMPLES: [&str; 3] = ["chelsea.png", "coffee.png", "rocket.jpg"];

fn sample(name: &str) -> PathBuf {
    let path = lazarus::weights::cache_root().join("samples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch_assets.sh",
        path.display()
    );
    path
}

/// Registers a dataset of one unlabeled photo and enqueues it for Lite0
/// with its installed ImageNet weights.
fn add_photo_dataset(root: &Path, name: &str, photo: &str) {
    let folder = root.join("sources").join(name);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(sample(photo), folder.join(photo)).unwrap();
    ok(lazarus(
        root,
        &["dataset", "add", name, folder.to_str().unwrap()],
    ));
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            name,
            "--encoder",
            "efficientnet-lite0",
        ],
    ));
}

/// The pooled features of the one image of dataset `name`, found as every
/// reader finds them (`features::catalog`).
fn pooled_of(root: &Path, name: &str) -> Vec<f32> {
    let layout = lazarus::layout::Layout::new(root);
    let opened = catalog::open(
        &layout,
        &FeatureRequest {
            dataset: name,
            ..FeatureRequest::default()
        },
    )
    .unwrap();
    assert!(opened.lacking.is_empty(), "{name}: every image has a row");
    assert_eq!(opened.features.len(), 1, "{name}: one row");
    opened
        .features
        .pooled(0)
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The bug of issue 18: one worker, several datasets on one encoder
/// fingerprint. Each dataset's row must be its own photo's features, as
/// computed by lazarus for that dataset alone (reference: the same binary,
/// one dataset per root; the encoder itself is checked against PyTorch in
/// tests/encoders/encoder_parity.rs).
#[test]
fn one_worker_extracts_each_dataset_from_its_own_images() {
    let shared = tempfile::tempdir().unwrap();
    let names = ["cat", "cup", "rocket"];
    for (name, photo) in names.iter().zip(SAMPLES) {
        add_photo_dataset(shared.path(), name, photo);
    }
    ok(lazarus(shared.path(), &["run-worker", "--until-empty"]));

    let mut alone = Vec::new();
    for (name, photo) in names.iter().zip(SAMPLES) {
        let root = tempfile::tempdir().unwrap();
        add_photo_dataset(root.path(), name, photo);
        ok(lazarus(root.path(), &["run-worker", "--until-empty"]));
        alone.push(pooled_of(root.path(), name));
    }
    // The three photos are far apart, so a row of the wrong photo shows.
    for i in 0..3 {
        for j in i + 1..3 {
            assert!(max_abs_difference(&alone[i], &alone[j]) > 0.1);
        }
    }
    for (name, expected) in names.iter().zip(&alone) {
        let together = pooled_of(shared.path(), name);
        let difference = max_abs_difference(&together, expected);
        assert!(
            difference < 1e-3,
            "{name}: features differ from its photo's by up to {difference}"
        );
    }
}

/// Writes `count` distinct PNGs (seeds from `first_seed`) into class folders
/// of `tree`, alternating between class0 and class1.
fn add_images(tree: &Path, first_seed: u32, count: u32) {
    for seed in first_seed..first_seed + count {
        let class = seed % 2;
        support::write_image(
            &tree.join(format!("class{class}/img{seed:04}.png")),
            seed,
            image::ImageFormat::Png,
        );
    }
}

/// `dataset show --images --csv` as (index, id, path, split), by index.
fn listed(root: &Path, name: &str) -> Vec<(usize, String, String, String)> {
    support::image_rows(root, name)
        .into_iter()
        .map(|row| {
            (
                row[0].parse().unwrap(),
                row[1].clone(),
                row[2].clone(),
                row[4].clone(),
            )
        })
        .collect()
}

fn enqueue_json(root: &Path, name: &str) -> serde_json::Value {
    json(&ok(lazarus(
        root,
        &[
            "enqueue",
            "--json",
            "--dataset",
            name,
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:3",
            "--chunk-size",
            "16",
        ],
    )))
}

fn train_json(root: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "train",
        "--json",
        "--dataset",
        name,
        "--encoder",
        "efficientnet-lite0",
        "--head",
        "linear",
        "--epochs",
        "1",
    ];
    args.extend_from_slice(extra);
    json(&ok(lazarus(root, &args)))
}

fn model_card(report: &serde_json::Value) -> serde_json::Value {
    let dir = std::path::PathBuf::from(report["run_dir"].as_str().unwrap());
    json(&std::fs::read_to_string(dir.join("model_card.json")).unwrap())
}

#[test]
fn a_dataset_grows_twice_and_enqueue_schedules_only_its_new_images() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = root.join("source");
    add_images(&tree, 1, 100);
    ok(lazarus(
        root,
        &["dataset", "add", "cells", tree.to_str().unwrap()],
    ));
    let first = enqueue_json(root, "cells");
    assert_eq!(first["images_enqueued"], 100, "{first}");
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let v1 = listed(root, "cells");
    assert_eq!(v1.len(), 100);
    assert!(
        v1.iter().all(|(_, id, _, _)| id.len() == 64),
        "full sha256 ids"
    );

    // Version 2: 50 new images in the same folder.
    add_images(&tree, 101, 50);
    let update = json(&ok(lazarus(
        root,
        &["dataset", "update", "cells", "--json"],
    )));
    assert_eq!(update["version"], 2, "{update}");
    assert_eq!(update["previous_version"], 1);
    assert_eq!(update["added"], 50);
    assert_eq!(update["removed"], 0);
    assert_eq!(update["kept"], 100);
    assert_eq!(update["images"], 150);
    let second = enqueue_json(root, "cells");
    assert_eq!(second["images"], 150, "{second}");
    assert_eq!(second["already_covered"], 100, "{second}");
    assert_eq!(
        second["images_enqueued"], 50,
        "only the new images: {second}"
    );
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let v2 = listed(root, "cells");
    assert_eq!(v2.len(), 150);
    // The first 100 keep their index, id and split; new images append.
    assert_eq!(&v2[..100], &v1[..]);
    assert_eq!(v2[100].0, 100);
    let new_splits: std::collections::BTreeSet<&str> =
        v2[100..].iter().map(|row| row.3.as_str()).collect();
    assert!(new_splits.contains("train"), "{new_splits:?}");

    let report = train_json(root, "cells", &[]);
    let card = model_card(&report);
    let sizes = &card["split_sizes"];
    let total: u64 = ["train", "val", "test"]
        .iter()
        .map(|s| sizes[s].as_u64().unwrap())
        .sum();
    assert_eq!(total, 150, "train sees every image: {card}");
    assert_eq!(card["dataset_version"], 2);
    let counted = |split: &str| v2.iter().filter(|row| row.3 == split).count() as u64;
    for split in ["train", "val", "test"] {
        assert_eq!(sizes[split].as_u64().unwrap(), counted(split), "{split}");
    }

    // Version 3: ten of the first images go. Nothing to extract; their rows
    // stay cached, but training on version 3 sees 140 images.
    for (_, _, path, _) in &v1[..10] {
        std::fs::remove_file(path).unwrap();
    }
    let update = json(&ok(lazarus(
        root,
        &["dataset", "update", "cells", "--json"],
    )));
    assert_eq!(update["version"], 3);
    assert_eq!(update["removed"], 10);
    let third = enqueue_json(root, "cells");
    assert_eq!(third["images_enqueued"], 0, "{third}");
    let report = train_json(root, "cells", &[]);
    let card = model_card(&report);
    let total: u64 = ["train", "val", "test"]
        .iter()
        .map(|s| card["split_sizes"][s].as_u64().unwrap())
        .sum();
    assert_eq!(total, 140);
    assert_eq!(card["dataset_version"], 3);
    let v3 = listed(root, "cells");
    assert_eq!(&v3[..90], &v1[10..]);

    // Runs record their version, and experiments filter by it.
    let runs = json(&ok(lazarus(
        root,
        &[
            "experiments",
            "list",
            "--json",
            "--where",
            "dataset_version=2",
        ],
    )));
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let all = json(&ok(lazarus(root, &["experiments", "list", "--json"])));
    assert_eq!(all.as_array().unwrap().len(), 2);
    // An update that finds nothing new writes no version.
    let same = json(&ok(lazarus(
        root,
        &["dataset", "update", "cells", "--json"],
    )));
    assert_eq!(same["changed"], false);
    assert_eq!(same["version"], 3);
}

#[test]
fn a_second_dataset_sharing_80_percent_of_the_images_schedules_only_the_rest() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let first = root.join("first");
    add_images(&first, 1, 50);
    ok(lazarus(
        root,
        &["dataset", "add", "first", first.to_str().unwrap()],
    ));
    assert_eq!(enqueue_json(root, "first")["images_enqueued"], 50);
    ok(lazarus(root, &["run-worker", "--until-empty"]));

    // 40 of the first dataset's images under other names, and 10 new ones.
    let second = root.join("second");
    let mut copied = 0;
    for class in ["class0", "class1"] {
        for entry in std::fs::read_dir(first.join(class)).unwrap() {
            let path = entry.unwrap().path();
            if copied < 40 {
                let target = second.join(class).join(format!("copy-{copied}.png"));
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(&path, target).unwrap();
                copied += 1;
            }
        }
    }
    add_images(&second, 1001, 10);
    ok(lazarus(
        root,
        &["dataset", "add", "second", second.to_str().unwrap()],
    ));
    let enqueued = enqueue_json(root, "second");
    assert_eq!(enqueued["images"], 50, "{enqueued}");
    assert_eq!(enqueued["already_covered"], 40, "{enqueued}");
    assert_eq!(enqueued["images_enqueued"], 10, "only the 20%: {enqueued}");
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let verified = json(&ok(lazarus(root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");

    // Both datasets read the one row of each shared image.
    let layout = lazarus::layout::Layout::new(root);
    let open = |name: &str| {
        catalog::open(
            &layout,
            &FeatureRequest {
                dataset: name,
                ..FeatureRequest::default()
            },
        )
        .unwrap()
    };
    let (a, b) = (open("first"), open("second"));
    assert_eq!(a.fingerprint, b.fingerprint, "one folder per fingerprint");
    assert!(a.lacking.is_empty() && b.lacking.is_empty());
    assert_eq!(b.features.len(), 50);
    let mut shared = 0;
    for row in 0..b.features.len() {
        let id = b.features.content_id(row);
        if let Some(other) = (0..a.features.len()).find(|&r| a.features.content_id(r) == id) {
            assert_eq!(a.features.pooled(other), b.features.pooled(row));
            shared += 1;
        }
    }
    assert_eq!(shared, 40);
}

/// The published shards of the one fingerprint folder under ROOT/features.
fn shard_files(root: &Path) -> Vec<std::path::PathBuf> {
    let folders: Vec<_> = std::fs::read_dir(root.join("features"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    let mut shards: Vec<_> = std::fs::read_dir(&folders[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    shards
}

/// Where the `content_sha256` tensor's bytes start in a shard file.
fn content_ids_offset(bytes: &[u8]) -> usize {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["content_sha256"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    8 + header_len + start
}

#[test]
fn a_flipped_id_byte_makes_verify_report_the_shard_corrupt_and_train_refuse_it() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = root.join("source");
    add_images(&tree, 1, 40);
    ok(lazarus(
        root,
        &["dataset", "add", "cells", tree.to_str().unwrap()],
    ));
    enqueue_json(root, "cells");
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    train_json(root, "cells", &[]);

    // One byte of a row's content id, flipped in place.
    let shard = shard_files(root)[1].clone();
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = content_ids_offset(&bytes) + 5;
    bytes[at] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let verified = lazarus(root, &["verify", "--json"]);
    assert_eq!(verified.status.code(), Some(1));
    let verified = json(&support::stdout(&verified));
    assert_eq!(verified["ok"], false);
    assert_eq!(verified["corrupt"], 1, "{verified}");
    let corrupt = &verified["groups"][0]["corrupt"][0];
    assert!(corrupt[1].as_str().unwrap().contains("sha256"), "{corrupt}");
    let refused = support::fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "cells",
            "--encoder",
            "efficientnet-lite0",
        ],
    ));
    assert!(
        refused.contains(shard.to_str().unwrap()) && refused.contains("lazarus verify --repair"),
        "{refused}"
    );

    // The same flip with the marker rewritten to match (a consistent but
    // wrong shard): verify finds a row its job never asked for, and train
    // finds an image without its row.
    let marker_path = shard.with_extension("done");
    let mut marker: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&marker_path).unwrap()).unwrap();
    marker["sha256"] = lazarus::digest::sha256_hex(&bytes).into();
    std::fs::write(&marker_path, marker.to_string()).unwrap();
    let verified = json(&support::stdout(&lazarus(root, &["verify", "--json"])));
    let reason = verified["groups"][0]["corrupt"][0][1]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("did not ask for"), "{verified}");
    let refused = support::fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "cells",
            "--encoder",
            "efficientnet-lite0",
        ],
    ));
    assert!(refused.contains("lack 1 of the 40 images"), "{refused}");

    // Repaired: the shard goes, its job runs again, and all is well.
    lazarus(root, &["verify", "--repair"]);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let verified = json(&ok(lazarus(root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");
    train_json(root, "cells", &[]);
}

#[test]
fn an_image_changed_after_dataset_add_fails_by_name_and_an_update_registers_it() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = root.join("source");
    add_images(&tree, 1, 4);
    ok(lazarus(
        root,
        &["dataset", "add", "cells", tree.to_str().unwrap()],
    ));
    let before = listed(root, "cells");
    let (changed_index, old_id, changed_path, _) = before[2].clone();
    support::write_image(Path::new(&changed_path), 999, image::ImageFormat::Png);
    let new_id = lazarus::digest::sha256_hex(&std::fs::read(&changed_path).unwrap());
    enqueue_json(root, "cells");
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let status = json(&ok(lazarus(root, &["status", "--json"])));
    let failed = status["failed_images"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{status}");
    assert_eq!(failed[0]["image"], changed_index.to_string());
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&changed_path) && reason.contains(&old_id) && reason.contains(&new_id),
        "{reason}"
    );
    // No row under the old id, nor under the new one.
    let layout = lazarus::layout::Layout::new(root);
    let opened = catalog::open(
        &layout,
        &FeatureRequest {
            dataset: "cells",
            ..FeatureRequest::default()
        },
    )
    .unwrap();
    assert_eq!(opened.features.len(), 3);
    assert_eq!(opened.lacking.len(), 1);
    assert_eq!(opened.lacking[0].index, changed_index);
    // verify counts the failed image as expected-absent.
    assert_eq!(json(&ok(lazarus(root, &["verify", "--json"])))["ok"], true);

    let update = json(&ok(lazarus(
        root,
        &["dataset", "update", "cells", "--json"],
    )));
    assert_eq!(
        (update["added"].as_u64(), update["removed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(enqueue_json(root, "cells")["images_enqueued"], 1);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let after = listed(root, "cells");
    assert_eq!(after.len(), 4);
    let (index, id, _, _) = after.last().unwrap();
    assert_eq!((*index, id.as_str()), (4, new_id.as_str()));
    let opened = catalog::open(
        &layout,
        &FeatureRequest {
            dataset: "cells",
            ..FeatureRequest::default()
        },
    )
    .unwrap();
    assert!(opened.lacking.is_empty());
}

#[test]
fn manifests_name_images_anywhere_and_label_maps_rename_classes_everywhere() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    // Images in one folder, the manifest in another; relative paths that
    // leave the manifest's folder, and absolute ones.
    let images = root.join("images");
    let mut lines = vec!["path,label".to_string()];
    for seed in 1..=24u32 {
        let path = images.join(format!("img{seed}.png"));
        support::write_image(&path, seed, image::ImageFormat::Png);
        let grade = if seed % 2 == 0 { "0.0" } else { "1.0" };
        let cell = if seed % 3 == 0 {
            path.display().to_string()
        } else {
            format!("../images/img{seed}.png")
        };
        lines.push(format!("{cell},{grade}"));
    }
    let lists = root.join("lists");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(lists.join("cells.csv"), lines.join("\n") + "\n").unwrap();
    let added = json(&ok(lazarus(
        root,
        &[
            "dataset",
            "add",
            "cells",
            lists.join("cells.csv").to_str().unwrap(),
            "--label-map",
            "0.0=functional,1.0=defective",
            "--json",
        ],
    )));
    assert_eq!(added["images"], 24, "{added}");
    assert_eq!(
        added["class_order"],
        serde_json::json!(["functional", "defective"])
    );
    assert_eq!(added["classes"]["defective"], 12);
    // The same manifest against --base-dir (relative cells resolve there).
    let moved = root.join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    let relative: Vec<String> = (1..=4)
        .map(|seed| format!("img{seed}.png,{}", seed % 2))
        .collect();
    std::fs::write(moved.join("list.csv"), relative.join("\n") + "\n").unwrap();
    let based = json(&ok(lazarus(
        root,
        &[
            "dataset",
            "add",
            "based",
            moved.join("list.csv").to_str().unwrap(),
            "--base-dir",
            images.to_str().unwrap(),
            "--json",
        ],
    )));
    assert_eq!(based["images"], 4, "{based}");
    // A label map naming a class the source lacks is refused by name.
    let refused = support::fails(lazarus(
        root,
        &[
            "dataset",
            "add",
            "typo",
            lists.join("cells.csv").to_str().unwrap(),
            "--label-map",
            "0.5=mild",
        ],
    ));
    assert!(
        refused.contains("\"0.5\"") && refused.contains("0.0, 1.0"),
        "{refused}"
    );

    // The names are the classes of training, predictions and bundles.
    enqueue_json(root, "cells");
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let report = train_json(root, "cells", &[]);
    assert_eq!(
        model_card(&report)["classes"],
        serde_json::json!(["functional", "defective"])
    );
    let run = report["run_id"].as_str().unwrap();
    let predicted = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--run",
            run,
            images.join("img1.png").to_str().unwrap(),
            "--json",
        ],
    )));
    let text = predicted.to_string();
    assert!(
        text.contains("functional") && text.contains("defective"),
        "{text}"
    );
    assert!(!text.contains("\"0.0\""), "{text}");
}

/// Writes a shard and marker as lazarus before issue 18 did: rows named by
/// `image_index` into one dataset's manifest, a marker without a format.
fn write_old_shard(dir: &Path, shard_index: u64, image_index: &[i64], dim: usize) {
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;
    std::fs::create_dir_all(dir).unwrap();
    let pooled: Vec<half::f16> = image_index
        .iter()
        .flat_map(|&i| (0..dim).map(move |d| half::f16::from_f32(i as f32 + d as f32 / 8.0)))
        .collect();
    let index_bytes: Vec<u8> = image_index.iter().flat_map(|i| i.to_le_bytes()).collect();
    let pooled_bytes: Vec<u8> = pooled.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensors = vec![
        (
            "image_index",
            TensorView::new(Dtype::I64, vec![image_index.len()], &index_bytes).unwrap(),
        ),
        (
            "pooled",
            TensorView::new(Dtype::F16, vec![image_index.len(), dim], &pooled_bytes).unwrap(),
        ),
    ];
    let metadata = std::collections::HashMap::from([
        ("encoder".to_string(), "toy-encoder".to_string()),
        ("dataset".to_string(), "old".to_string()),
    ]);
    let bytes = safetensors::serialize(tensors, Some(metadata)).unwrap();
    let name = format!("shard-{shard_index:06}");
    std::fs::write(dir.join(format!("{name}.safetensors")), &bytes).unwrap();
    let marker = serde_json::json!({
        "shard": format!("{name}.safetensors"),
        "rows": image_index.len(),
        "bytes": bytes.len(),
        "sha256": lazarus::digest::sha256_hex(&bytes),
        "job_id": shard_index,
        "attempt": 1,
        "lazarus_version": "0.1.0",
    });
    std::fs::write(dir.join(format!("{name}.done")), marker.to_string()).unwrap();
}

/// Rewrites a dataset's manifest as lazarus before issue 18 wrote it: ids of
/// 16 hex digits, no version columns.
fn make_manifest_old(root: &Path, name: &str) {
    let path = root.join("jobs/datasets").join(name).join("images.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record([
            "index", "id", "path", "label", "split", "mask", "width", "height",
        ])
        .unwrap();
    for record in reader.records() {
        let record = record.unwrap();
        let mut cells: Vec<String> = record.iter().take(8).map(str::to_string).collect();
        cells[1].truncate(16);
        writer.write_record(&cells).unwrap();
    }
    std::fs::write(&path, writer.into_inner().unwrap()).unwrap();
}

#[test]
fn an_old_layout_cache_is_refused_until_migrated_and_migrated_by_content() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = root.join("source");
    add_images(&tree, 1, 20);
    ok(lazarus(
        root,
        &["dataset", "add", "old", tree.to_str().unwrap()],
    ));
    make_manifest_old(root, "old");
    let manifest = listed(root, "old");
    assert!(manifest.iter().all(|row| row.1.len() == 16));
    let old_dir = root.join("features/old/fp-old");
    write_old_shard(&old_dir, 11, &(0..10).collect::<Vec<_>>(), 8);
    write_old_shard(&old_dir, 12, &(10..20).collect::<Vec<_>>(), 8);
    // Their done jobs, as the queue of that lazarus recorded them.
    ok(lazarus(root, &["enqueue", "--noop-jobs", "1"]));
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let db = rusqlite::Connection::open(root.join("jobs/queue.db")).unwrap();
    for (id, first) in [(11i64, 0i64), (12, 10)] {
        let payload = serde_json::json!({
            "dataset": "old",
            "encoder": "toy-encoder",
            "fingerprint": "fp-old",
            "weights": {"id": "random:1", "path": null},
            "image_indices": (first..first + 10).collect::<Vec<_>>(),
            "spatial": false,
        });
        db.execute(
            "INSERT INTO jobs (id, kind, grp, variant, fingerprint, dedup_key, items, payload,
                 state, attempt, tries, result, enqueued_at_ms, finished_at_ms)
             VALUES (?1, 'extract', 'old', 'toy-encoder', 'fp-old', ?2, 10, ?3, 'done', 1, 1,
                 '{\"failures\":[],\"detail\":{\"rows\":10}}', 0, 1)",
            rusqlite::params![id, format!("extract:old-{id}"), payload.to_string()],
        )
        .unwrap();
    }
    drop(db);
    // A worker leaves their jobs done (their shards await migration) and says so.
    let out = lazarus(root, &["run-worker", "--until-empty"]);
    let said = support::stderr(&out);
    ok(out);
    assert!(said.contains("lazarus features migrate"), "{said}");
    let status = json(&ok(lazarus(
        root,
        &["status", "--json", "--dataset", "old"],
    )));
    assert_eq!(status["jobs"]["done"], 2, "{status}");
    assert_eq!(status["jobs"]["pending"], 0, "{status}");
    // Image 3 changed after `dataset add`: its old row cannot be trusted.
    support::write_image(Path::new(&manifest[3].2), 777, image::ImageFormat::Png);

    let train = [
        "train",
        "--dataset",
        "old",
        "--encoder",
        "toy-encoder",
        "--epochs",
        "1",
    ];
    let refused = support::fails(lazarus(root, &train));
    assert!(
        refused.contains("features/old/fp-old") && refused.contains("lazarus features migrate"),
        "{refused}"
    );

    let migrated = json(&ok(lazarus(root, &["features", "migrate", "--json"])));
    let folder = &migrated["migrated"][0];
    assert_eq!(folder["shards"], 2, "{migrated}");
    assert_eq!(folder["rows"], 19, "{migrated}");
    let dropped = folder["dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0]["image_index"], 3);
    assert!(
        dropped[0]["reason"].as_str().unwrap().contains("changed"),
        "{dropped:?}"
    );
    assert!(!old_dir.exists(), "the old folder is gone");
    assert!(root.join("features/fp-old/shard-000012.done").is_file());
    // The old jobs' payloads name manifest rows: verify reads them through
    // the manifest and finds the one image whose row was dropped.
    let verified = lazarus(root, &["verify", "--json"]);
    let verified = json(&support::stdout(&verified));
    assert_eq!(verified["missing"], 1, "{verified}");
    assert_eq!(verified["groups"][0]["missing"], serde_json::json!([3]));
    assert_eq!(verified["corrupt"], 0, "{verified}");
    // Migrating again finds nothing to do.
    let again = json(&ok(lazarus(root, &["features", "migrate", "--json"])));
    assert_eq!(again["migrated"].as_array().unwrap().len(), 0);

    // The rows are the old ones, found by content; image 3 lacks its row.
    let layout = lazarus::layout::Layout::new(root);
    let opened = catalog::open(
        &layout,
        &FeatureRequest {
            dataset: "old",
            ..FeatureRequest::default()
        },
    )
    .unwrap();
    assert_eq!(opened.lacking.len(), 1);
    assert_eq!(opened.lacking[0].index, 3);
    let row = opened
        .features
        .image_indices()
        .iter()
        .position(|&i| i == 7)
        .unwrap();
    assert_eq!(opened.features.pooled(row)[1], half::f16::from_f32(7.125));
    let refused = support::fails(lazarus(root, &train));
    assert!(refused.contains("lack 1 of the 20 images"), "{refused}");
    let mut partial = train.to_vec();
    partial.extend(["--allow-partial", "--json"]);
    let report = json(&ok(lazarus(root, &partial)));
    let card = model_card(&report);
    assert_eq!(card["images_lacking"], 1);
    let runs = json(&ok(lazarus(
        root,
        &[
            "experiments",
            "list",
            "--json",
            "--where",
            "images_lacking=1",
        ],
    )));
    assert_eq!(runs.as_array().unwrap().len(), 1);
}

#[test]
fn old_layout_folders_of_one_fingerprint_under_two_datasets_are_not_migrated() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    for (name, seed) in [("a", 1), ("b", 101)] {
        let tree = root.join(name);
        add_images(&tree, seed, 4);
        ok(lazarus(
            root,
            &["dataset", "add", name, tree.to_str().unwrap()],
        ));
        make_manifest_old(root, name);
        write_old_shard(
            &root.join("features").join(name).join("fp-shared"),
            seed as u64,
            &[0, 1, 2, 3],
            8,
        );
    }
    let out = lazarus(root, &["features", "migrate", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&support::stdout(&out));
    let refused = report["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2, "{report}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("datasets a, b"),
        "{report}"
    );
    assert!(root.join("features/a/fp-shared").is_dir(), "left in place");
    let refused = support::fails(lazarus(
        root,
        &["train", "--dataset", "a", "--encoder", "toy-encoder"],
    ));
    assert!(refused.contains("features migrate"), "{refused}");
}

/// A run resumed after its dataset grew trains on the manifest version it
/// started on: same images, same splits.
#[test]
fn a_resumed_run_keeps_the_dataset_version_it_started_on() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let spec = support::Synthetic {
        name: "growing",
        counts: &[600, 600, 600],
        dim: 32,
        separation: 1.0,
    };
    support::synthetic_features(root, &spec);
    let args = [
        "train",
        "--dataset",
        "growing",
        "--encoder",
        "toy-encoder",
        "--head",
        "mlp",
        "--hidden",
        "128",
        "--epochs",
        "40",
        "--batch-size",
        "32",
        "--json",
    ];
    let run_dir = support::kill_after_checkpoint(root, &args, 2);
    let run_id = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    // Version 2 adds ten images that have no features yet.
    add_images(&root.join("growing/tree"), 5_000_000, 10);
    let update = json(&ok(lazarus(
        root,
        &["dataset", "update", "growing", "--json"],
    )));
    assert_eq!(update["version"], 2, "{update}");
    let refused = support::fails(lazarus(root, &args));
    assert!(refused.contains("lack 10 of the 1810 images"), "{refused}");

    let resumed = json(&ok(lazarus(
        root,
        &["train", "--resume", &run_id, "--json"],
    )));
    assert!(
        resumed["resumed_from_epoch"].as_u64().unwrap() >= 2,
        "{resumed}"
    );
    let card = model_card(&resumed);
    assert_eq!(card["dataset_version"], 1, "{card}");
    let total: u64 = ["train", "val", "test"]
        .iter()
        .map(|s| card["split_sizes"][s].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1800);
}
