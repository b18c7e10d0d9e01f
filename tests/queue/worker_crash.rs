//! Crash test with real processes: 2 workers extracting 512 generated images
//! are killed with SIGKILL at random moments, at least 10 times, and
//! restarted. At the end `verify` is clean, every image has exactly one row,
//! and the pooled features are bit-identical to an uninterrupted run.
//! The same test runs with the queue in SQLite and in PostgreSQL
//! (`LAZARUS_TEST_POSTGRES`, required when `CI=true`), and with workers
//! publishing to a `file://` feature store that is then pulled.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use lazarus::features::FeatureSet;
use support::{json, lazarus, lazarus_on, ok};

const IMAGES: usize = 512;
const KILLS: usize = 10;

/// A small deterministic generator for kill timing (xorshift64).
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn spawn_worker(root: &Path, queue: Option<&str>, store: Option<&str>, name: &str) -> Child {
    let mut command = support::queue_command(root, queue);
    if let Some(url) = store {
        command.env("LAZARUS_FEATURE_STORE", url);
    }
    command
        .args([
            "run-worker",
            "--until-empty",
            "--lease-secs",
            "2",
            "--threads",
            "1",
        ])
        .args(["--worker-id", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn enqueue(root: &Path, queue: Option<&str>) {
    ok(lazarus_on(
        root,
        queue,
        &[
            "enqueue",
            "--dataset",
            "blobs",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:7",
            "--chunk-size",
            "16",
        ],
    ));
}

fn feature_dir(root: &Path) -> PathBuf {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(root.join("features"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(folders.len(), 1, "one fingerprint folder: {folders:?}");
    folders.pop().unwrap()
}

#[test]
fn killed_workers_lose_nothing_and_repeat_nothing_sqlite() {
    killed_workers_lose_nothing_and_repeat_nothing(None, None);
}

/// Workers publishing to a `file://` feature store (object_store's local
/// file system), pulled into ROOT/features before the comparison.
#[cfg(feature = "object-store")]
#[test]
fn killed_workers_lose_nothing_and_repeat_nothing_feature_store() {
    killed_workers_lose_nothing_and_repeat_nothing(None, Some("store"));
}

#[test]
fn killed_workers_lose_nothing_and_repeat_nothing_postgres() {
    let Some(server) = support::postgres::server("killed_workers_postgres") else {
        return;
    };
    let schema = support::postgres::Schema::create(&server);
    killed_workers_lose_nothing_and_repeat_nothing(Some(&schema.url), None);
}

/// The reference run always uses its own SQLite queue and ROOT/features; the
/// interrupted one uses `queue` (PostgreSQL) when given, and publishes to a
/// `file://` store in the folder `store` of the temp dir when given.
fn killed_workers_lose_nothing_and_repeat_nothing(queue: Option<&str>, store: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let store_url = store.map(|name| format!("file://{}", dir.path().join(name).display()));
    let store = store_url.as_deref();
    let tree = dir.path().join("tree");
    let mut seed = 0;
    for class in 0..4 {
        for i in 0..IMAGES / 4 {
            seed += 1;
            support::write_image(
                &tree.join(format!("c{class}/{i:04}.png")),
                seed,
                image::ImageFormat::Png,
            );
        }
    }
    let reference = dir.path().join("reference");
    let crashed = dir.path().join("crashed");
    for (root, queue) in [(&reference, None), (&crashed, queue)] {
        ok(lazarus(
            root,
            &["dataset", "add", "blobs", tree.to_str().unwrap()],
        ));
        enqueue(root, queue);
    }

    // The uninterrupted run.
    ok(lazarus(&reference, &["run-worker", "--until-empty"]));

    // The interrupted run: kill a random worker every 0.1 to 0.7 s, restart it
    // (on an idle machine the 512 images take only a few seconds: longer
    // pauses could run out of work before the tenth kill).
    let mut random = Random(0x5eed_1234_abcd_ef01);
    let mut workers: Vec<Child> = (0..2)
        .map(|i| spawn_worker(&crashed, queue, store, &format!("w{i}")))
        .collect();
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while kills < KILLS {
        assert!(Instant::now() < deadline, "kill phase took too long");
        std::thread::sleep(Duration::from_millis(100 + random.below(600)));
        let victim = random.below(2) as usize;
        if workers[victim].try_wait().unwrap().is_none() {
            workers[victim].kill().unwrap(); // SIGKILL
            kills += 1;
        }
        workers[victim].wait().unwrap();
        workers[victim] = spawn_worker(&crashed, queue, store, &format!("w{victim}-{kills}"));
    }
    for worker in &mut workers {
        assert!(worker.wait().unwrap().success());
    }
    // Jobs held by the last killed workers come back once their 2 s lease expires.
    std::thread::sleep(Duration::from_millis(2500));
    let mut last = vec!["run-worker", "--until-empty"];
    last.extend(store.iter().flat_map(|url| ["--feature-store", url]));
    ok(lazarus_on(&crashed, queue, &last));
    if let Some(url) = store {
        let in_store = json(&ok(lazarus_on(
            &crashed,
            queue,
            &["verify", "--feature-store", url, "--json"],
        )));
        assert_eq!(in_store["ok"], true, "{in_store}");
        assert!(
            !crashed.join("features").exists(),
            "workers on a store write nothing under ROOT/features"
        );
        ok(lazarus_on(
            &crashed,
            queue,
            &["features", "pull", "--from", url, "--dataset", "blobs"],
        ));
    }

    let status = json(&ok(lazarus_on(&crashed, queue, &["status", "--json"])));
    assert_eq!(status["jobs"]["done"], (IMAGES / 16) as u64, "{status}");
    assert_eq!(status["images"]["done"], IMAGES as u64, "{status}");
    let verified = json(&ok(lazarus_on(&crashed, queue, &["verify", "--json"])));
    if let Some(url) = queue {
        assert!(
            !crashed.join("jobs/queue.db").exists(),
            "with the queue in {url}, no SQLite queue file is created"
        );
    }
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["rows"], IMAGES as u64);
    assert_eq!(verified["duplicates"], 0);

    let expected = FeatureSet::open(&feature_dir(&reference)).unwrap();
    let actual = FeatureSet::open(&feature_dir(&crashed)).unwrap();
    // Every image once, each row named by its file's content.
    assert_eq!(actual.len(), IMAGES);
    let dataset = lazarus::dataset::load(&lazarus::layout::Layout::new(&crashed), "blobs").unwrap();
    for record in &dataset.images {
        let sha256 = support::file_sha256(&record.path);
        assert_eq!(
            actual.rows_of(&sha256).len(),
            1,
            "{}",
            record.path.display()
        );
    }
    // Both sets are ordered by content id: row for row the same images.
    for row in 0..IMAGES {
        assert_eq!(actual.content_id(row), expected.content_id(row));
    }
    for row in 0..IMAGES {
        let (a, b) = (actual.pooled(row), expected.pooled(row));
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "row {row} differs from the uninterrupted run"
        );
    }
}
