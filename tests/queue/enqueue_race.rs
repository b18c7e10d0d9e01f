//! Issue 19, item 4, with real processes: concurrent `enqueue`s of one
//! dataset with different chunk sizes schedule every image once (the
//! coverage read and the inserts are one transaction), on the SQLite file
//! and on PostgreSQL (`LAZARUS_TEST_POSTGRES`, required when `CI=true`).
//! And `verify --repair` repairs an image enqueued twice (as enqueues that
//! raced before the fix left them): the later jobs go, nothing is missing.

use crate::support;

use std::path::Path;
use std::process::Stdio;

use support::{json, lazarus, ok};

const IMAGES: u32 = 48;
const ROUNDS: u32 = 6;

/// A dataset of `IMAGES` distinct images (seeds from `first_seed`).
fn add_dataset(root: &Path, name: &str, first_seed: u32) {
    let tree = root.join("sources").join(name);
    for seed in first_seed..first_seed + IMAGES {
        support::write_image(
            &tree.join(format!("class{}/img{seed}.png", seed % 2)),
            seed,
            image::ImageFormat::Png,
        );
    }
    ok(lazarus(
        root,
        &["dataset", "add", name, tree.to_str().unwrap()],
    ));
}

/// Three enqueues of `name` started together, with chunk sizes 4, 5 and 7.
fn race(root: &Path, queue: Option<&str>, name: &str) {
    let children: Vec<_> = ["4", "5", "7"]
        .iter()
        .map(|chunk| {
            support::queue_command(root, queue)
                .args([
                    "enqueue",
                    "--dataset",
                    name,
                    "--encoder",
                    "efficientnet-lite0",
                    "--weights",
                    "random:1",
                    "--chunk-size",
                    chunk,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn each_image_is_enqueued_once(queue: Option<&str>) {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    for round in 0..ROUNDS {
        let name = format!("round{round}");
        add_dataset(root, &name, 1 + round * IMAGES);
        race(root, queue, &name);
        let status = json(&ok(support::lazarus_on(
            root,
            queue,
            &["status", "--json", "--dataset", &name],
        )));
        assert_eq!(
            status["images"]["total"], IMAGES,
            "round {round}: every image once: {status}"
        );
        // Nothing is extracted yet (verify exits 1: every image missing),
        // but no image is in two jobs.
        let verified = support::lazarus_on(root, queue, &["verify", "--json", "--dataset", &name]);
        let verified = json(&support::stdout(&verified));
        assert_eq!(verified["missing"], IMAGES, "round {round}: {verified}");
        assert_eq!(verified["duplicates"], 0, "round {round}: {verified}");
    }
}

#[test]
fn concurrent_enqueues_schedule_each_image_once_on_sqlite() {
    each_image_is_enqueued_once(None);
}

#[test]
fn concurrent_enqueues_schedule_each_image_once_on_postgres() {
    let Some(server) = support::postgres::server("concurrent_enqueues") else {
        return;
    };
    let schema = support::postgres::Schema::create(&server);
    each_image_is_enqueued_once(Some(&schema.url));
}

/// Adds, behind lazarus's back, a second set of jobs holding every image of
/// the live jobs again in chunks of 6: what two racing enqueues left.
fn enqueue_everything_twice(root: &Path) {
    let db = rusqlite::Connection::open(root.join("jobs/queue.db")).unwrap();
    let rows: Vec<(String, String, String, String)> = db
        .prepare("SELECT grp, variant, fingerprint, payload FROM jobs WHERE superseded = 0")
        .unwrap()
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut images = Vec::new();
    let mut template: Option<serde_json::Value> = None;
    for (_, _, _, payload) in &rows {
        let payload: serde_json::Value = serde_json::from_str(payload).unwrap();
        images.extend(payload["images"].as_array().unwrap().iter().cloned());
        template.get_or_insert(payload);
    }
    let (group, variant, fingerprint, _) = &rows[0];
    for (n, chunk) in images.chunks(6).enumerate() {
        let mut payload = template.clone().unwrap();
        payload["images"] = serde_json::Value::Array(chunk.to_vec());
        payload["image_indices"] = chunk.iter().map(|image| image["index"].clone()).collect();
        db.execute(
            "INSERT INTO jobs (kind, grp, variant, fingerprint, dedup_key, items, payload,
                 state, enqueued_at_ms)
             VALUES ('extract', ?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0)",
            rusqlite::params![
                group,
                variant,
                fingerprint,
                format!("extract:raced-{n}"),
                chunk.len() as i64,
                payload.to_string()
            ],
        )
        .unwrap();
    }
}

#[test]
fn verify_repair_retires_jobs_that_enqueue_an_image_again() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    add_dataset(root, "twice", 1);
    let enqueue = [
        "enqueue",
        "--json",
        "--dataset",
        "twice",
        "--encoder",
        "efficientnet-lite0",
        "--weights",
        "random:1",
        "--chunk-size",
        "8",
    ];
    assert_eq!(json(&ok(lazarus(root, &enqueue)))["jobs_added"], 6);
    enqueue_everything_twice(root);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let status = json(&ok(lazarus(root, &["status", "--json"])));
    assert_eq!(status["images"]["total"], 2 * IMAGES, "{status}");
    let broken = lazarus(root, &["verify", "--json"]);
    assert_eq!(broken.status.code(), Some(1));
    let broken = json(&support::stdout(&broken));
    assert_eq!(broken["duplicates"], IMAGES, "{broken}");
    // Readers refuse the ambiguous set rather than pick a row.
    let refused = support::fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "twice",
            "--encoder",
            "efficientnet-lite0",
            "--epochs",
            "1",
        ],
    ));
    assert!(refused.contains("has rows in both"), "{refused}");

    let repaired = lazarus(root, &["verify", "--repair", "--json"]);
    let repaired = json(&support::stdout(&repaired));
    let retired: Vec<i64> = repaired["groups"][0]["retired_jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_i64().unwrap())
        .collect();
    assert_eq!(retired.len(), 8, "the 8 raced jobs go: {repaired}");
    assert!(
        retired.iter().all(|&id| id > 6),
        "the oldest jobs stay: {retired:?}"
    );
    // Every image kept its row in the oldest job's shard: nothing to redo.
    let verified = json(&ok(lazarus(root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["rows"], IMAGES);
    let status = json(&ok(lazarus(root, &["status", "--json"])));
    assert_eq!(status["images"]["total"], IMAGES, "{status}");
    assert_eq!(status["jobs"]["pending"], 0, "{status}");
    ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "twice",
            "--encoder",
            "efficientnet-lite0",
            "--epochs",
            "1",
        ],
    ));
}
