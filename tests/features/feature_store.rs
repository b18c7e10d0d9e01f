//! The feature cache through the library API: publish shards, survive the
//! leftovers of killed writers, read them memory-mapped by content id, bind
//! them to a manifest, refuse corrupt shards.

use std::collections::HashMap;
use std::fs;

use half::f16;
use lazarus::digest::ContentId;
use lazarus::features::{
    self, FeatureSet, JobRef, MapData, ReconcileConfig, ShardData, SpatialData,
};

const NO_GRACE: ReconcileConfig = ReconcileConfig {
    grace: std::time::Duration::ZERO,
};

/// The content id of test image `image` (there is no file).
fn id(image: i64) -> [u8; 32] {
    lazarus::digest::sha256(format!("image {image}").as_bytes())
}

fn rows(first_image: i64, n_rows: usize, dim: usize) -> (Vec<[u8; 32]>, Vec<f16>) {
    let images: Vec<i64> = (0..n_rows as i64).map(|i| first_image + i).collect();
    let pooled = images
        .iter()
        .flat_map(|&image| (0..dim).map(move |d| f16::from_f32(image as f32 + d as f32 / 8.0)))
        .collect();
    (images.iter().map(|&image| id(image)).collect(), pooled)
}

fn publish(dir: &std::path::Path, shard_index: u64, first_image: i64, n_rows: usize) {
    let (content_ids, pooled) = rows(first_image, n_rows, 4);
    let data = ShardData {
        content_ids: &content_ids,
        pooled: &pooled,
        feature_dim: 4,
        spatial: None,
        views: None,
    };
    let metadata = HashMap::from([("encoder".to_string(), "test".to_string())]);
    let job = JobRef {
        job_id: shard_index as i64,
        attempt: 1,
    };
    let marker = features::write_shard(dir, shard_index, &data, metadata, job).unwrap();
    assert_eq!(marker.rows, n_rows);
    assert_eq!(marker.format, features::SHARD_FORMAT_VERSION);
}

/// (manifest index, content id) of images `images`, indexed from 0.
fn manifest(images: &[i64]) -> Vec<(usize, ContentId)> {
    images
        .iter()
        .enumerate()
        .map(|(index, &image)| (index, ContentId::full(id(image))))
        .collect()
}

#[test]
fn shards_read_back_by_content_id_and_bound_in_manifest_order() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 1, 3, 3); // images 3, 4, 5
    publish(dir.path(), 0, 0, 3); // images 0, 1, 2
    let set = FeatureSet::open(dir.path()).unwrap();
    assert_eq!(set.len(), 6);
    assert_eq!(set.feature_dim(), 4);
    // Image 4's row: values image + d/8, exact in f16.
    let expected: Vec<f16> = (0..4)
        .map(|d| f16::from_f32(4.0 + d as f32 / 8.0))
        .collect();
    let row = set.rows_of(&id(4));
    assert_eq!(row.len(), 1);
    assert_eq!(set.pooled(row.start), expected.as_slice());
    assert_eq!(set.content_id(row.start), &id(4));
    assert!(set.rows_of(&id(9)).is_empty());
    assert_eq!(set.metadata()["encoder"], "test");

    // A dataset listing images 5, 4, 9 (no features) and 0, in that order.
    let (bound, lacking) = set.bind("d", manifest(&[5, 4, 9, 0])).unwrap();
    assert_eq!(bound.image_indices(), [0, 1, 3]);
    assert_eq!(lacking, [2]);
    assert_eq!(bound.pooled(1), expected.as_slice());
    assert_eq!(bound.rows_where(|index| index != 1), vec![0, 2]);

    let rows = features::read_folder_rows(dir.path()).unwrap();
    assert!(rows.corrupt.is_empty(), "{:?}", rows.corrupt);
    assert_eq!(rows.shards[&0], [id(0), id(1), id(2)]);
    assert_eq!(rows.shards[&1], [id(3), id(4), id(5)]);
}

#[test]
fn an_old_manifests_short_id_finds_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 0, 0, 3);
    let set = FeatureSet::open(dir.path()).unwrap();
    let short = ContentId::parse(&hex::encode(id(1))[..16]).unwrap();
    let (bound, lacking) = set.bind("d", [(0, short)]).unwrap();
    assert!(lacking.is_empty());
    assert_eq!(bound.content_id(0), &id(1));
}

#[test]
fn spatial_maps_and_tiles_round_trip_and_tiles_of_one_image_are_not_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    // Image 7 in two tiles, image 8 in one.
    let content_ids = vec![id(7), id(7), id(8)];
    let pooled: Vec<f16> = (0..3 * 3).map(|v| f16::from_f32(v as f32)).collect();
    let fine: Vec<f16> = (0..3 * 2 * 3 * 3)
        .map(|v| f16::from_f32(v as f32))
        .collect();
    let coarse: Vec<f16> = (0..3 * 4 * 2 * 2)
        .map(|v| f16::from_f32(-(v as f32)))
        .collect();
    let tiles = [[0i64, 0, 256, 256], [344, 0, 256, 256], [0, 0, 224, 224]];
    let maps = [
        MapData {
            stride: 32,
            values: &coarse,
            shape: [4, 2, 2],
        },
        MapData {
            stride: 16,
            values: &fine,
            shape: [2, 3, 3],
        },
    ];
    let data = ShardData {
        content_ids: &content_ids,
        pooled: &pooled,
        feature_dim: 3,
        spatial: Some(SpatialData {
            tiles: &tiles,
            maps: &maps,
        }),
        views: None,
    };
    features::write_shard(
        dir.path(),
        0,
        &data,
        HashMap::new(),
        JobRef {
            job_id: 1,
            attempt: 1,
        },
    )
    .unwrap();
    let set = FeatureSet::open(dir.path()).unwrap();
    // Finest map first, whatever the order they were written in.
    let strides: Vec<usize> = set.maps().iter().map(|m| m.stride).collect();
    assert_eq!(strides, vec![16, 32]);
    assert_eq!(set.len(), 3);
    // Image 7's tiles are consecutive rows, in the order written.
    let tiles_of_7 = set.rows_of(&id(7));
    assert_eq!(tiles_of_7.len(), 2);
    let second = tiles_of_7.start + 1;
    assert_eq!(set.map(second, 0), &fine[18..36]);
    assert_eq!(set.tile(second), Some([344, 0, 256, 256]));
    let eight = set.rows_of(&id(8)).start;
    assert_eq!(set.map(eight, 1), &coarse[32..48]);
    let (bound, _) = set.bind("d", manifest(&[7, 8])).unwrap();
    assert_eq!(bound.image_indices(), &[0, 0, 1]);
    assert_eq!(bound.tile(1), Some([344, 0, 256, 256]));
    let rows = features::read_folder_rows(dir.path()).unwrap();
    assert_eq!(rows.shards[&0].len(), 3);
}

#[test]
fn reconcile_removes_leftovers_and_invalid_shards_and_readers_refuse_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    publish(path, 0, 0, 2);
    publish(path, 1, 2, 2);
    publish(path, 2, 4, 2);
    publish(path, 3, 5, 2); // image 5 again: a duplicate
    // A killed writer's temp file, a shard that never got its marker,
    // and a shard whose bytes changed after its marker was written.
    fs::write(path.join(".tmp-123-0-shard-000009.safetensors"), b"partial").unwrap();
    fs::copy(
        path.join("shard-000000.safetensors"),
        path.join("shard-000007.safetensors"),
    )
    .unwrap();
    let mut bytes = fs::read(path.join("shard-000001.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(path.join("shard-000001.safetensors"), bytes).unwrap();

    let rows = features::read_folder_rows(path).unwrap();
    assert_eq!(rows.corrupt.len(), 1);
    assert_eq!(rows.corrupt[0].0, 1);
    assert!(rows.corrupt[0].1.contains("sha256"), "{:?}", rows.corrupt);
    assert_eq!(rows.shards.keys().copied().collect::<Vec<_>>(), [0, 2, 3]);

    // Readers refuse a corrupt shard by name, with the repair command.
    let err = FeatureSet::open(path).unwrap_err().to_string();
    assert!(
        err.contains("shard-000001.safetensors")
            && err.contains("sha256")
            && err.contains("lazarus verify --repair"),
        "{err}"
    );

    let reconciled = features::reconcile(path, &NO_GRACE).unwrap();
    assert_eq!(reconciled.removed_temp_files.len(), 1);
    assert_eq!(reconciled.removed_unpublished.len(), 1);
    assert_eq!(reconciled.invalid.len(), 1);
    assert_eq!(reconciled.valid, vec![0, 2, 3]);
    assert!(!path.join("shard-000001.done").exists());
    // Safe to repeat: a second pass finds nothing to do.
    let again = features::reconcile(path, &NO_GRACE).unwrap();
    assert!(again.removed_temp_files.is_empty() && again.invalid.is_empty());
    assert_eq!(again.valid, vec![0, 2, 3]);

    // The reader refuses ambiguous data rather than picking a row.
    let err = FeatureSet::open(path).unwrap_err().to_string();
    assert!(
        err.contains(&format!("image {} has rows in both", hex::encode(id(5)))),
        "{err}"
    );
}

#[test]
fn a_marker_with_the_wrong_size_makes_readers_refuse_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 0, 0, 2);
    publish(dir.path(), 1, 2, 2);
    let shard = dir.path().join("shard-000001.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    bytes.extend_from_slice(b"trailing");
    fs::write(&shard, bytes).unwrap();
    let err = FeatureSet::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("shard-000001.safetensors") && err.contains("marker says"),
        "{err}"
    );
}

#[test]
fn checksums_are_cached_until_a_shard_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 0, 0, 2);
    FeatureSet::open(dir.path()).unwrap();
    let cache = dir.path().join("verified.json");
    let verified: serde_json::Value = serde_json::from_slice(&fs::read(&cache).unwrap()).unwrap();
    assert!(
        verified["shards"]["shard-000000.safetensors"]["sha256"].is_string(),
        "{verified}"
    );
    // A byte flipped in place (same size) changes the file's times: the
    // cached check no longer applies and the checksum catches it.
    let shard = dir.path().join("shard-000000.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .and_then(|mut file| std::io::Write::write_all(&mut file, &bytes))
        .unwrap();
    let err = FeatureSet::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("sha256") && err.contains("shard-000000"),
        "{err}"
    );
}

#[test]
fn reconcile_leaves_young_files_to_a_writer_that_may_still_be_at_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    publish(path, 0, 0, 2);
    fs::write(path.join(".tmp-1-0-shard-000001.safetensors"), b"in flight").unwrap();
    fs::copy(
        path.join("shard-000000.safetensors"),
        path.join("shard-000002.safetensors"),
    )
    .unwrap();
    let grace = ReconcileConfig {
        grace: std::time::Duration::from_secs(3600),
    };
    let report = features::reconcile(path, &grace).unwrap();
    assert!(report.removed_temp_files.is_empty() && report.removed_unpublished.is_empty());
    assert!(path.join(".tmp-1-0-shard-000001.safetensors").exists());
    let report = features::reconcile(path, &NO_GRACE).unwrap();
    assert_eq!(report.removed_temp_files.len(), 1);
    assert_eq!(report.removed_unpublished.len(), 1);
}
