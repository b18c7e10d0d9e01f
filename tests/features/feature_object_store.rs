//! The feature store behind its trait, on object_store's in-memory and local
//! file system backends: shards are published shard first, marker second; a
//! shard without its `.done` is invisible, reconcile removes it, and
//! `download` brings published shards to a local folder `FeatureSet` maps.
#![cfg(feature = "object-store")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use half::f16;
use lazarus::features::store::{
    self, FeatureStore, LocalFeatureStore, ObjectFeatureStore, published_shards,
};
use lazarus::features::{self, FeatureSet, JobRef, ShardData};

const FOLDER: &str = "cells/0123abcd";

/// The content id of test image `image` (there is no file).
fn id(image: i64) -> [u8; 32] {
    lazarus::digest::sha256(format!("image {image}").as_bytes())
}

fn publish(store: &dyn FeatureStore, shard_index: u64, first_image: i64) {
    let images: Vec<i64> = (first_image..first_image + 3).collect();
    let content_ids: Vec<[u8; 32]> = images.iter().map(|&image| id(image)).collect();
    let pooled: Vec<f16> = images
        .iter()
        .flat_map(|&image| (0..4).map(move |d| f16::from_f32(image as f32 + d as f32 / 4.0)))
        .collect();
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
    let marker = store::publish_shard(store, FOLDER, shard_index, &data, metadata, job).unwrap();
    assert_eq!(marker.rows, 3);
}

fn in_memory() -> ObjectFeatureStore {
    let memory = Arc::new(object_store::memory::InMemory::new());
    ObjectFeatureStore::new(memory, "team/features", "memory:///team/features").unwrap()
}

/// A shard whose writer died before its marker: the bytes of a real shard.
fn unpublished_shard(store: &dyn FeatureStore, shard_index: u64) {
    let scratch = tempfile::tempdir().unwrap();
    let local = LocalFeatureStore::new(scratch.path());
    publish(&local, 0, 100);
    let bytes = local
        .read(FOLDER, &features::shard_file_name(0))
        .unwrap()
        .unwrap();
    store
        .write(FOLDER, &features::shard_file_name(shard_index), &bytes)
        .unwrap();
}

#[test]
fn a_shard_without_its_marker_is_invisible_and_download_maps_the_published_ones() {
    let store = in_memory();
    publish(&store, 1, 3);
    publish(&store, 0, 0);
    unpublished_shard(&store, 2);
    let names: Vec<String> = store
        .list(FOLDER)
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(
        names,
        [
            "shard-000000.done",
            "shard-000000.safetensors",
            "shard-000001.done",
            "shard-000001.safetensors",
            "shard-000002.safetensors"
        ]
    );
    assert_eq!(published_shards(&store, FOLDER).unwrap(), [0, 1]);

    let local = tempfile::tempdir().unwrap();
    assert_eq!(store::download(&store, FOLDER, local.path()).unwrap(), 2);
    assert!(
        !local.path().join(features::shard_file_name(2)).exists(),
        "the unpublished shard stays behind"
    );
    let set = FeatureSet::open(local.path()).unwrap();
    assert_eq!(set.len(), 6);
    for image in 0..6 {
        assert_eq!(set.rows_of(&id(image)).len(), 1, "image {image}");
    }
    // Image 4, dimension 3: 4 + 3/4, exact in f16.
    assert_eq!(
        set.pooled(set.rows_of(&id(4)).start)[3],
        f16::from_f32(4.75)
    );
    // A second download finds everything in place.
    assert_eq!(store::download(&store, FOLDER, local.path()).unwrap(), 0);
}

#[test]
fn reconcile_removes_unpublished_and_corrupt_shards_marker_first() {
    let store = in_memory();
    publish(&store, 0, 0);
    publish(&store, 1, 3);
    unpublished_shard(&store, 2);
    // Shard 1's bytes change after its marker: its checksum no longer matches.
    let mut bytes = store
        .read(FOLDER, &features::shard_file_name(1))
        .unwrap()
        .unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    store
        .write(FOLDER, &features::shard_file_name(1), &bytes)
        .unwrap();

    // A writer may still be between its two writes: young files stay.
    let young = store::reconcile_store(&store, FOLDER, Duration::from_secs(3600)).unwrap();
    assert!(young.removed_unpublished.is_empty());
    assert_eq!(young.valid, [0]);
    assert_eq!(young.invalid.len(), 1);
    assert!(young.invalid[0].1.contains("sha256"), "{:?}", young.invalid);

    let report = store::reconcile_store(&store, FOLDER, Duration::ZERO).unwrap();
    assert_eq!(report.removed_unpublished, [2]);
    assert_eq!(report.valid, [0]);
    let names: Vec<String> = store
        .list(FOLDER)
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["shard-000000.done", "shard-000000.safetensors"]);
}

#[test]
fn file_urls_use_object_stores_local_backend_under_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/shared", dir.path().display());
    std::fs::create_dir_all(dir.path().join("shared")).unwrap();
    let store = ObjectFeatureStore::from_url(&url).unwrap();
    publish(&store, 7, 21);
    let folder = dir.path().join("shared").join(FOLDER);
    assert!(folder.join("shard-000007.safetensors").is_file());
    assert!(folder.join("shard-000007.done").is_file());
    // The same bytes the local store writes: the formats are one.
    let local = LocalFeatureStore::new(dir.path().join("local"));
    publish(&local, 7, 21);
    assert_eq!(
        std::fs::read(folder.join("shard-000007.safetensors")).unwrap(),
        local
            .read(FOLDER, "shard-000007.safetensors")
            .unwrap()
            .unwrap()
    );
    // And the local file system reader accepts what the object store wrote.
    let set = FeatureSet::open(&folder).unwrap();
    assert_eq!(set.len(), 3);
    for image in 21..24 {
        assert_eq!(
            set.pooled(set.rows_of(&id(image)).start)[0],
            f16::from_f32(image as f32)
        );
    }
}

#[test]
fn urls_without_a_backend_in_this_build_are_refused_by_name() {
    let err = ObjectFeatureStore::from_url("gopher://bucket/prefix").unwrap_err();
    assert!(err.to_string().contains("gopher://bucket/prefix"), "{err}");
}

#[test]
fn folders_lists_sub_folders_alike_in_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/shared", dir.path().display());
    let stores: Vec<Box<dyn FeatureStore>> = vec![
        Box::new(in_memory()),
        Box::new(ObjectFeatureStore::from_url(&url).unwrap()),
        Box::new(LocalFeatureStore::new(dir.path().join("local"))),
    ];
    for store in &stores {
        publish(store.as_ref(), 1, 0);
        store
            .write("cells/fedcba98", "shard-000002.done", b"{}")
            .unwrap();
        assert_eq!(store.folders("").unwrap(), ["cells"], "{store:?}");
        assert_eq!(
            store.folders("cells").unwrap(),
            ["0123abcd", "fedcba98"],
            "{store:?}"
        );
        assert!(store.folders(FOLDER).unwrap().is_empty(), "{store:?}");
        assert!(store.folders("absent").unwrap().is_empty(), "{store:?}");
    }
}
