//! Per-image failures during extraction: each bad image is recorded with its
//! reason (visible in `status`), and the chunk's other images are extracted.

use crate::support;

use std::fs;
use std::path::Path;

use image::ImageFormat;
use support::{json, lazarus, ok, write_image};

/// CRC-32 (IEEE), for patching a PNG header; checked against zlib's crc32 of "IHDR" (0xa8a1ae0a).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites a PNG's IHDR to claim `width` x `height` (the pixel data stays tiny).
fn claim_png_size(path: &Path, width: u32, height: u32) {
    let mut bytes = fs::read(path).unwrap();
    // Signature (8) + length (4) + "IHDR" (4), then width and height.
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    fs::write(path, bytes).unwrap();
}

#[test]
fn crc32_matches_zlib() {
    assert_eq!(crc32(b"IHDR"), 0xa8a1_ae0a);
}

#[test]
fn bad_images_fail_alone_with_reasons_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    for i in 0..6 {
        write_image(&tree.join(format!("ok/good{i}.png")), i, ImageFormat::Png);
    }
    let bad = [
        "truncated.png",
        "empty.png",
        "text.jpg",
        "huge.png",
        "deleted.png",
    ];
    for (i, name) in bad.iter().enumerate() {
        let format = if name.ends_with(".jpg") {
            ImageFormat::Jpeg
        } else {
            ImageFormat::Png
        };
        write_image(&tree.join("bad").join(name), 100 + i as u32, format);
    }
    // Files whose header reads but whose pixels do not: registered as they
    // are, they fail at extraction.
    let bad_dir = tree.join("bad");
    let png = fs::read(bad_dir.join("truncated.png")).unwrap();
    fs::write(bad_dir.join("truncated.png"), &png[..png.len() / 2]).unwrap();
    claim_png_size(&bad_dir.join("huge.png"), 20_000, 20_000);
    let root = dir.path().join("root");
    let added = json(&ok(lazarus(
        &root,
        &["dataset", "add", "mixed", tree.to_str().unwrap(), "--json"],
    )));
    assert_eq!(added["images"], 11, "{added}");
    ok(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "mixed",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:1",
        ],
    ));

    // Other files go bad after registration, as they do in real life: their
    // bytes are no longer the content the dataset lists (issue 18).
    fs::write(bad_dir.join("empty.png"), b"").unwrap();
    fs::write(bad_dir.join("text.jpg"), "just some text").unwrap();
    fs::remove_file(bad_dir.join("deleted.png")).unwrap();
    let empty_sha256 = lazarus::digest::sha256_hex(b"");

    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let status = json(&ok(lazarus(&root, &["status", "--json"])));
    assert_eq!(status["jobs"]["done"], 1, "{status}");
    assert_eq!(status["images"]["total"], 11);
    assert_eq!(status["images"]["failed"], 5);
    assert_eq!(status["images"]["done"], 6);
    let reasons: Vec<String> = status["failed_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap().to_string())
        .collect();
    let changed =
        format!("the file changed after `dataset add`: its content is now sha256 {empty_sha256}");
    let expect = [
        ("truncated.png", "cannot decode image"),
        ("empty.png", changed.as_str()),
        ("text.jpg", "the file changed after `dataset add`"),
        (
            "huge.png",
            "20000x20000 = 400000000 pixels exceeds the limit",
        ),
        ("deleted.png", "cannot read"),
    ];
    for (file, reason) in expect {
        assert!(
            reasons
                .iter()
                .any(|r| r.contains(file) && r.contains(reason)),
            "no failure for {file} with '{reason}' in {reasons:#?}"
        );
    }
    let human = ok(lazarus(&root, &["status"]));
    assert!(human.contains("huge.png"), "{human}");

    // The good images have their rows; verify accepts the recorded failures.
    let verified = json(&ok(lazarus(&root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["rows"], 6);
}

#[test]
fn an_unwritable_feature_folder_fails_the_job_for_a_retry_and_marks_nothing_done() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    for i in 0..3 {
        write_image(&tree.join(format!("a/{i}.png")), i, ImageFormat::Png);
    }
    let root = dir.path().join("root");
    ok(lazarus(
        &root,
        &["dataset", "add", "d", tree.to_str().unwrap()],
    ));
    let enqueued = json(&ok(lazarus(
        &root,
        &[
            "enqueue",
            "--json",
            "--dataset",
            "d",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:1",
        ],
    )));
    let folder = format!("features/{}", enqueued["fingerprint"].as_str().unwrap());
    // A file where the fingerprint's feature folder must go: no shard can be
    // written (the same failure a read-only folder or a full disk gives,
    // even for root).
    fs::create_dir_all(root.join("features")).unwrap();
    fs::write(root.join(&folder), b"in the way").unwrap();

    ok(lazarus(&root, &["run-worker", "--max-jobs", "1"]));
    let status = json(&ok(lazarus(&root, &["status", "--json"])));
    assert_eq!(status["jobs"]["failed"], 1, "{status}");
    assert_eq!(status["jobs"]["done"], 0);
    let error = status["failed_jobs"][0]["last_error"].as_str().unwrap();
    assert!(error.contains(&folder), "{error}");

    // Once the folder can be written, the retry succeeds.
    fs::remove_file(root.join(&folder)).unwrap();
    ok(lazarus(&root, &["requeue"]));
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let verified = json(&ok(lazarus(&root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["rows"], 3);
}
