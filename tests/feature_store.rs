//! The feature cache through the library API: publish shards, survive the
//! leftovers of killed writers, read them memory-mapped, verify coverage.

use std::collections::HashMap;
use std::fs;

use half::f16;
use lazarus::features::{
    self, FeatureSet, JobRef, MapData, ReconcileConfig, ShardData, SpatialData,
};

const NO_GRACE: ReconcileConfig = ReconcileConfig {
    grace: std::time::Duration::ZERO,
};

fn rows(first_image: i64, n_rows: usize, dim: usize) -> (Vec<i64>, Vec<f16>) {
    let image_index: Vec<i64> = (0..n_rows as i64).map(|i| first_image + i).collect();
    let pooled = image_index
        .iter()
        .flat_map(|&image| (0..dim).map(move |d| f16::from_f32(image as f32 + d as f32 / 8.0)))
        .collect();
    (image_index, pooled)
}

fn publish(dir: &std::path::Path, shard_index: u64, first_image: i64, n_rows: usize) {
    let (image_index, pooled) = rows(first_image, n_rows, 4);
    let data = ShardData {
        image_index: &image_index,
        pooled: &pooled,
        feature_dim: 4,
        spatial: None,
    };
    let metadata = HashMap::from([("encoder".to_string(), "test".to_string())]);
    let job = JobRef {
        job_id: shard_index as i64,
        attempt: 1,
    };
    let marker = features::write_shard(dir, shard_index, &data, metadata, job).unwrap();
    assert_eq!(marker.rows, n_rows);
}

#[test]
fn shards_read_back_by_image_in_order_with_zero_copy_views() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 1, 3, 3); // images 3, 4, 5
    publish(dir.path(), 0, 0, 3); // images 0, 1, 2
    let set = FeatureSet::open(dir.path()).unwrap();
    assert_eq!(set.len(), 6);
    assert_eq!(set.feature_dim(), 4);
    assert_eq!(set.image_indices(), [0, 1, 2, 3, 4, 5]);
    // Row 4 is image 4: values image + d/8, exact in f16.
    let expected: Vec<f16> = (0..4)
        .map(|d| f16::from_f32(4.0 + d as f32 / 8.0))
        .collect();
    assert_eq!(set.pooled(4), expected.as_slice());
    assert_eq!(set.rows_where(|image| image % 2 == 1), vec![1, 3, 5]);
    assert_eq!(set.metadata()["encoder"], "test");

    let report = features::verify(dir.path(), &[0, 1, 2, 3, 4, 5]).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.rows, 6);
}

#[test]
fn spatial_maps_and_tiles_round_trip_and_tiles_of_one_image_are_not_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    // Image 7 in two tiles, image 8 in one.
    let image_index = vec![7i64, 7, 8];
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
        image_index: &image_index,
        pooled: &pooled,
        feature_dim: 3,
        spatial: Some(SpatialData {
            tiles: &tiles,
            maps: &maps,
        }),
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
    assert_eq!(set.image_indices(), &[7, 7, 8]);
    assert_eq!(set.map(1, 0), &fine[18..36]);
    assert_eq!(set.map(2, 1), &coarse[32..48]);
    assert_eq!(set.tile(1), Some([344, 0, 256, 256]));
    let report = features::verify(dir.path(), &[7, 8]).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.rows, 3);
}

#[test]
fn reconcile_removes_leftovers_and_invalid_shards_and_verify_reports_them() {
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

    let report = features::verify(path, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    assert!(!report.ok);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].0, 1);
    assert!(
        report.corrupt[0].1.contains("sha256"),
        "{:?}",
        report.corrupt
    );
    assert_eq!(report.missing, vec![2, 3, 7]);
    assert_eq!(report.duplicates.get(&5), Some(&vec![2, 3]));

    // The reader refuses ambiguous data rather than picking a row.
    let err = FeatureSet::open(path).unwrap_err().to_string();
    assert!(err.contains("image 5 has rows in both"), "{err}");

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
}

#[test]
fn a_marker_with_the_wrong_size_hides_its_shard_from_readers() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 0, 0, 2);
    publish(dir.path(), 1, 2, 2);
    let shard = dir.path().join("shard-000001.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    bytes.extend_from_slice(b"trailing");
    fs::write(&shard, bytes).unwrap();
    let set = FeatureSet::open(dir.path()).unwrap();
    assert_eq!(set.image_indices(), [0, 1]);
    assert_eq!(set.skipped_shards().len(), 1);
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
