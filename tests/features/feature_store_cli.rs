//! `--feature-store` end to end: a worker publishes every shard (and its
//! `.done`) to a `file://` store and nothing under ROOT/features; `verify
//! --feature-store` checks the store against the queue; a shard lost from the
//! store is re-queued by a worker starting on it, or by `verify --repair
//! --feature-store`; `features pull`
//! mirrors the store into ROOT/features, where `verify` and `train` read it;
//! a second pull copies nothing. Bad URLs are refused with the accepted forms.
#![cfg(feature = "object-store")]

use crate::support;

use std::path::Path;

use support::{fails, image_folder, json, lazarus, ok};

/// Shard and marker file names in a folder, sorted; none when it is absent.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(all_files(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn workers_publish_to_the_store_and_pull_brings_shards_home() {
    let temp = tempfile::tempdir().unwrap();
    let root = &temp.path().join("root");
    let store_dir = temp.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let store_url = format!("file://{}", store_dir.display());

    let tree = image_folder(temp.path(), &[10, 10]);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let enqueued = json(&ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:5",
            "--chunk-size",
            "8",
            "--json",
        ],
    )));
    let fingerprint = enqueued["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(enqueued["jobs_added"], 3, "{enqueued}");

    ok(lazarus(
        root,
        &[
            "run-worker",
            "--until-empty",
            "--threads",
            "1",
            "--feature-store",
            &store_url,
        ],
    ));
    assert!(
        all_files(&root.join("features")).is_empty(),
        "the local feature cache stays empty: {:?}",
        all_files(&root.join("features"))
    );
    // One folder per fingerprint, shared by every dataset (issue 18).
    let stored = store_dir.join(&fingerprint);
    let names = file_names(&stored);
    let shards = names.iter().filter(|n| n.ends_with(".safetensors")).count();
    let markers = names.iter().filter(|n| n.ends_with(".done")).count();
    assert_eq!((shards, markers, names.len()), (3, 3, 6), "{names:?}");

    // The store holds what the queue expects; the local folder does not yet.
    let checked = json(&ok(lazarus(
        root,
        &["verify", "--feature-store", &store_url, "--json"],
    )));
    assert_eq!(checked["ok"], true, "{checked}");
    assert_eq!(checked["rows"], 20, "{checked}");
    // A shard lost from the store: verify sees it, a worker starting on the
    // store re-queues its job and publishes it again.
    let lost = stored.join(names.iter().find(|n| n.ends_with(".safetensors")).unwrap());
    let original_bytes = std::fs::metadata(&lost).unwrap().len();
    std::fs::remove_file(&lost).unwrap();
    let output = lazarus(root, &["verify", "--feature-store", &store_url, "--json"]);
    let damaged = json(&support::stdout(&output));
    fails(output);
    assert_eq!(damaged["corrupt"], 1, "{damaged}");
    ok(lazarus(
        root,
        &[
            "run-worker",
            "--until-empty",
            "--threads",
            "1",
            "--feature-store",
            &store_url,
        ],
    ));
    assert_eq!(std::fs::metadata(&lost).unwrap().len(), original_bytes);
    let repaired = json(&ok(lazarus(
        root,
        &["verify", "--feature-store", &store_url, "--json"],
    )));
    assert_eq!(repaired["ok"], true, "{repaired}");
    // The same loss repaired by `verify --repair`: the job goes back to
    // pending and its marker leaves the store.
    std::fs::remove_file(&lost).unwrap();
    let output = lazarus(
        root,
        &[
            "verify",
            "--repair",
            "--feature-store",
            &store_url,
            "--json",
        ],
    );
    let repairing = json(&support::stdout(&output));
    fails(output);
    let reopened = &repairing["groups"][0]["reopened_jobs"];
    assert_eq!(reopened.as_array().unwrap().len(), 1, "{repairing}");
    assert_eq!(file_names(&stored).len(), 4);
    ok(lazarus(
        root,
        &["run-worker", "--until-empty", "--feature-store", &store_url],
    ));
    assert_eq!(file_names(&stored), names);
    assert_eq!(file_names(&stored), names);
    assert!(all_files(&root.join("features")).is_empty());

    let output = lazarus(root, &["verify", "--json"]);
    let local = json(&support::stdout(&output));
    fails(output);
    assert_eq!(local["missing"], 20, "{local}");

    let pulled = json(&ok(lazarus(
        root,
        &[
            "features",
            "pull",
            "--from",
            &store_url,
            "--dataset",
            "toy",
            "--json",
        ],
    )));
    assert_eq!(pulled[0]["fingerprint"], fingerprint.as_str(), "{pulled}");
    assert_eq!(pulled[0]["dataset"], "toy", "{pulled}");
    assert_eq!(pulled[0]["published"], 3, "{pulled}");
    assert_eq!(pulled[0]["copied"], 3, "{pulled}");
    let local_dir = root.join("features").join(&fingerprint);
    assert_eq!(file_names(&local_dir), names);
    for name in &names {
        let same = std::fs::read(local_dir.join(name)).unwrap()
            == std::fs::read(stored.join(name)).unwrap();
        assert!(same, "{name} is a byte copy");
    }
    let verified = json(&ok(lazarus(root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");

    let again = json(&ok(lazarus(
        root,
        &[
            "features",
            "pull",
            "--from",
            &store_url,
            "--dataset",
            "toy",
            "--fingerprint",
            &fingerprint,
            "--json",
        ],
    )));
    assert_eq!(again[0]["copied"], 0, "{again}");
    let message = fails(lazarus(
        root,
        &[
            "features",
            "pull",
            "--from",
            &store_url,
            "--dataset",
            "other",
        ],
    ));
    assert!(
        message.contains("dataset 'other' is not registered"),
        "{message}"
    );
    let message = fails(lazarus(
        root,
        &[
            "features",
            "pull",
            "--from",
            &store_url,
            "--fingerprint",
            "0123abcd",
        ],
    ));
    assert!(
        message.contains("no published shards under fingerprint 0123abcd"),
        "{message}"
    );

    let trained = json(&ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--epochs",
            "2",
            "--json",
        ],
    )));
    assert!(trained["run_id"].is_string(), "{trained}");
}

#[test]
fn bad_feature_store_urls_are_refused_with_the_accepted_forms() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let message = fails(lazarus(
        root,
        &[
            "run-worker",
            "--until-empty",
            "--feature-store",
            "ftp://host/x",
        ],
    ));
    assert!(message.contains("ftp://host/x"), "{message}");
    assert!(
        message.contains("file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX"),
        "{message}"
    );
    let message = fails(lazarus(
        root,
        &[
            "features",
            "pull",
            "--from",
            "file://relative/path",
            "--dataset",
            "toy",
        ],
    ));
    assert!(message.contains("absolute path"), "{message}");
    // The variable is read like the flag.
    let output = support::queue_command(root, None)
        .args(["verify"])
        .env("LAZARUS_FEATURE_STORE", "gs://bucket/prefix")
        .output()
        .unwrap();
    let message = fails(output);
    assert!(message.contains("gs://bucket/prefix"), "{message}");
    #[cfg(not(feature = "s3"))]
    {
        let message = fails(lazarus(
            root,
            &["verify", "--feature-store", "s3://bucket/prefix"],
        ));
        assert!(message.contains("s3://bucket/prefix"), "{message}");
        assert!(message.contains("`s3` cargo feature"), "{message}");
    }
}
