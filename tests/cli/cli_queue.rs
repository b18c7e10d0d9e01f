//! `enqueue`, `run-worker`, `status`, `requeue` through the real binary:
//! bad input leaves the queue file untouched, enqueue is idempotent per
//! configuration, and extract jobs are refused until extraction lands.

use crate::support;

use std::path::Path;
use std::process::{Command, Output};

use support::{fails, image_folder, json, lazarus, ok};

/// Runs lazarus with an empty weights cache, so no weights are installed.
fn lazarus_without_weights(root: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .env_remove("LAZARUS_QUEUE")
        .arg("--root")
        .arg(root)
        .args(args)
        .env("LAZARUS_CACHE", cache)
        .output()
        .unwrap()
}

fn queue_db(root: &Path) -> std::path::PathBuf {
    root.join("jobs").join("queue.db")
}

fn add_dataset(root: &Path, name: &str, counts: &[usize]) {
    let tree = image_folder(&root.join(format!("src-{name}")), counts);
    ok(lazarus(
        root,
        &["dataset", "add", name, tree.to_str().unwrap()],
    ));
}

/// Every verb that opens the queue, with arguments that would otherwise work.
const QUEUE_VERBS: &[&[&str]] = &[
    &["status"],
    &["status", "--json"],
    &["enqueue", "--noop-jobs", "2"],
    &["run-worker", "--until-empty"],
    &["requeue"],
];

#[test]
fn a_queue_file_that_is_not_sqlite_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("jobs")).unwrap();
    let bytes: Vec<u8> = b"these are my notes, not a database\n".repeat(200);
    std::fs::write(queue_db(root), &bytes).unwrap();
    for args in QUEUE_VERBS {
        let err = fails(lazarus(root, args));
        assert!(
            err.contains("is not a SQLite database") && err.contains("queue.db"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read(queue_db(root)).unwrap(), bytes, "{args:?}");
    }
    let entries: Vec<_> = std::fs::read_dir(root.join("jobs")).unwrap().collect();
    assert_eq!(entries.len(), 1, "no -wal or -shm file was created");
}

#[test]
fn a_queue_with_a_newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(lazarus(root, &["enqueue", "--noop-jobs", "3"]));
    {
        let connection = rusqlite::Connection::open(queue_db(root)).unwrap();
        connection
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
    }
    let bytes = std::fs::read(queue_db(root)).unwrap();
    for args in QUEUE_VERBS {
        let err = fails(lazarus(root, args));
        assert!(
            err.contains("schema version 99") && err.contains("queue.db"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read(queue_db(root)).unwrap(), bytes, "{args:?}");
    }
    let connection = rusqlite::Connection::open(queue_db(root)).unwrap();
    let pending: i64 = connection
        .query_row(
            "SELECT COUNT(*) FROM jobs WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(pending, 3);
}

#[test]
fn bad_enqueue_arguments_are_refused_and_leave_the_queue_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    add_dataset(root, "plants", &[3, 2]);
    let cache = root.join("empty-cache");
    let enqueue = |args: &[&str]| {
        let mut all = vec!["enqueue"];
        all.extend_from_slice(args);
        lazarus_without_weights(root, &cache, &all)
    };

    // Before any queue exists: refusals create no queue file.
    let err = fails(enqueue(&[
        "--dataset",
        "plants",
        "--encoder",
        "efficientnet-lite0",
        "--chunk-size",
        "0",
        "--weights",
        "random:1",
    ]));
    assert!(err.contains("--chunk-size must be at least 1"), "{err}");
    assert!(!queue_db(root).exists());

    ok(lazarus(root, &["enqueue", "--noop-jobs", "1"]));
    let bytes = std::fs::read(queue_db(root)).unwrap();
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &[
                "--dataset",
                "plants",
                "--encoder",
                "efficientnet-lite0",
                "--chunk-size",
                "0",
                "--weights",
                "random:1",
            ],
            &["--chunk-size must be at least 1"],
        ),
        (
            &[
                "--dataset",
                "plants",
                "--encoder",
                "resnet-9000",
                "--weights",
                "random:1",
            ],
            &["unknown encoder 'resnet-9000'", "efficientnet-lite0"],
        ),
        (
            &[
                "--dataset",
                "animals",
                "--encoder",
                "efficientnet-lite0",
                "--weights",
                "random:1",
            ],
            &["dataset 'animals' is not registered", "plants"],
        ),
        (
            &["--dataset", "plants", "--encoder", "efficientnet-lite0"],
            &["lazarus weights fetch efficientnet-lite0"],
        ),
        (
            &[
                "--dataset",
                "plants",
                "--encoder",
                "efficientnet-lite0",
                "--weights",
                "/no/such/weights.safetensors",
            ],
            &["/no/such/weights.safetensors"],
        ),
    ];
    for (args, needles) in cases {
        let err = fails(enqueue(args));
        for needle in needles {
            assert!(
                err.contains(needle),
                "{args:?}: expected '{needle}' in {err}"
            );
        }
        assert_eq!(std::fs::read(queue_db(root)).unwrap(), bytes, "{args:?}");
    }
    // Usage errors exit 2.
    let out = lazarus(root, &["enqueue", "--dataset", "plants"]);
    assert_eq!(out.status.code(), Some(2));
    let out = lazarus(root, &["run-worker", "--lease-secs", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The shard files of a fingerprint folder, by name.
fn shard_files(root: &Path, fingerprint: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("features").join(fingerprint))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".safetensors") || name.ends_with(".done"))
        .collect();
    names.sort();
    names
}

#[test]
fn enqueue_force_removes_the_retired_shards_so_the_redone_folder_verifies_without_repair() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Two datasets on one fingerprint: garden's 8 images include plants' 6
    // (the same seeds give the same bytes).
    add_dataset(root, "garden", &[4, 4]);
    add_dataset(root, "plants", &[3, 3]);
    // `enqueue` of `dataset`, `--force` or not, as JSON or as the line a
    // person reads.
    let run_enqueue = |dataset: &str, more: &[&str]| {
        let mut args = vec![
            "enqueue",
            "--dataset",
            dataset,
            "--encoder",
            "efficientnet-lite0",
            "--chunk-size",
            "4",
            "--weights",
            "random:7",
        ];
        args.extend_from_slice(more);
        ok(lazarus(root, &args))
    };
    let enqueue = |dataset: &str, force: bool| {
        json(&run_enqueue(
            dataset,
            if force {
                &["--json", "--force"]
            } else {
                &["--json"]
            },
        ))
    };
    let garden = enqueue("garden", false);
    assert_eq!(garden["jobs_added"], 2);
    let fingerprint = garden["fingerprint"].as_str().unwrap().to_string();
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    assert_eq!(enqueue("plants", false)["already_covered"], 6);
    let before = shard_files(root, &fingerprint);
    assert_eq!(before.len(), 4, "{before:?}");

    // Both of garden's jobs hold plants' images: both are retired, their
    // shards go at once, and garden's other 2 images are enqueued again.
    let forced = enqueue("plants", true);
    assert_eq!(forced["superseded"], 2, "{forced}");
    assert_eq!(forced["shards_removed"], 2, "{forced}");
    assert_eq!(forced["other_images_enqueued"], 2, "{forced}");
    assert_eq!(shard_files(root, &fingerprint), Vec::<String>::new());
    let text = run_enqueue("plants", &["--force"]);
    assert!(
        text.contains("2 old jobs retired by --force (0 of their shards removed)"),
        "{text}"
    );

    // Redone: one row per image of both datasets, nothing stale, no repair.
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let verified = json(&ok(lazarus(root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["stale"], 0, "{verified}");
    let after = shard_files(root, &fingerprint);
    assert_eq!(after.len(), 6, "{after:?}");
    assert!(after.iter().all(|name| !before.contains(name)), "{after:?}");
}

#[test]
fn enqueue_is_idempotent_force_redoes_and_options_change_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    add_dataset(root, "plants", &[5, 4]);
    let base = [
        "enqueue",
        "--json",
        "--dataset",
        "plants",
        "--encoder",
        "efficientnet-lite0",
        "--chunk-size",
        "4",
        "--weights",
        "random:7",
    ];
    let first = json(&ok(lazarus(root, &base)));
    assert_eq!(first["images"], 9);
    assert_eq!(first["images_enqueued"], 9);
    assert_eq!(first["jobs_added"], 3);
    assert_eq!(first["weights"], "random:7");
    let fingerprint = first["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fingerprint.len(), 64);

    let again = json(&ok(lazarus(root, &base)));
    assert_eq!(again["already_covered"], 9);
    assert_eq!(again["jobs_added"], 0);
    assert_eq!(again["fingerprint"], fingerprint.as_str());

    let mut forced = base.to_vec();
    forced.push("--force");
    let forced = json(&ok(lazarus(root, &forced)));
    assert_eq!(forced["superseded"], 3);
    assert_eq!(forced["jobs_added"], 3);

    let status = json(&ok(lazarus(root, &["status", "--json"])));
    assert_eq!(
        status["jobs"]["pending"], 3,
        "forced jobs replace the old ones"
    );
    assert_eq!(status["images"]["total"], 9);
    assert_eq!(status["images"]["done"], 0);
    assert_eq!(status["groups"][0]["dataset"], "plants");
    assert_eq!(status["groups"][0]["encoder"], "efficientnet-lite0");

    // Another seed, or --spatial: a new fingerprint covers every image again.
    let mut other_seed = base.to_vec();
    other_seed[9] = "random:8";
    let other = json(&ok(lazarus(root, &other_seed)));
    assert_ne!(other["fingerprint"], fingerprint.as_str());
    assert_eq!(other["jobs_added"], 3);
    let mut spatial = base.to_vec();
    spatial.push("--spatial");
    let spatial = json(&ok(lazarus(root, &spatial)));
    assert_ne!(spatial["fingerprint"], fingerprint.as_str());
    assert_eq!(spatial["images_enqueued"], 9);
    // --cache-at K (issue 22): the spatial folder of the map that is block
    // K's output, the same feature set as --spatial --maps with its stride.
    let with = |more: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(more);
        lazarus(root, &args)
    };
    let fingerprint_with = |more: &[&str]| json(&ok(with(more)))["fingerprint"].clone();
    assert_eq!(
        fingerprint_with(&["--cache-at", "10"]),
        fingerprint_with(&["--spatial", "--maps", "16"])
    );
    assert_eq!(
        fingerprint_with(&["--cache-at", "4", "--maps", "16"]),
        fingerprint_with(&["--spatial", "--maps", "8,16"])
    );
    // Tiling applies to --cache-at as to --spatial (a folder of its own).
    let tiled = fingerprint_with(&["--cache-at", "10", "--tile-size", "300"]);
    assert_eq!(
        tiled,
        fingerprint_with(&["--spatial", "--maps", "16", "--tile-size", "300"])
    );
    assert_ne!(tiled, fingerprint_with(&["--cache-at", "10"]));
    let refused = with(&["--tile-size", "300"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        support::stderr(&refused).contains("<--spatial|--cache-at <K>>"),
        "{}",
        support::stderr(&refused)
    );
    let refused = fails(with(&["--cache-at", "9"]));
    assert!(
        refused.contains("--cache-at 9")
            && refused.contains(
                "K must be 2 (the stride-4 map), 4 (the stride-8 map), 10 (the stride-16 map)"
            ),
        "{refused}"
    );
    // A usage error (clap's exit status 2): pooled options do not combine.
    let refused = with(&["--cache-at", "10", "--layers", "all"]);
    assert_eq!(refused.status.code(), Some(2));
    let refused = support::stderr(&refused);
    assert!(
        refused.contains("--cache-at") && refused.contains("--layers"),
        "{refused}"
    );
    let mut resnet = base.to_vec();
    resnet[5] = "resnet18";
    resnet.extend_from_slice(&["--cache-at", "4"]);
    let refused = fails(lazarus(root, &resnet));
    assert!(
        refused.contains("--cache-at 4")
            && refused.contains("resnet18 is not an EfficientNet-Lite"),
        "{refused}"
    );

    // A weights file is identified by its content.
    let weights = root.join("w.safetensors");
    std::fs::write(&weights, b"weights v1").unwrap();
    let mut from_file = base.to_vec();
    from_file[9] = weights.to_str().unwrap();
    let file_a = json(&ok(lazarus(root, &from_file)));
    std::fs::write(&weights, b"weights v2").unwrap();
    let file_b = json(&ok(lazarus(root, &from_file)));
    assert_ne!(file_a["fingerprint"], file_b["fingerprint"]);

    // A dataset of the same two images as plants' first ones: covered by
    // plants' jobs (coverage is by content, across datasets).
    add_dataset(root, "copies", &[2]);
    let mut copies = base.to_vec();
    copies[3] = "copies";
    let covered = json(&ok(lazarus(root, &copies)));
    assert_eq!(covered["already_covered"], 2, "{covered}");
    assert_eq!(covered["jobs_added"], 0, "{covered}");

    // A dataset of two images of its own.
    let rocks_tree = root.join("src-rocks");
    for seed in [901, 902] {
        support::write_image(
            &rocks_tree.join(format!("stone/{seed}.png")),
            seed,
            image::ImageFormat::Png,
        );
    }
    ok(lazarus(
        root,
        &["dataset", "add", "rocks", rocks_tree.to_str().unwrap()],
    ));
    let mut rocks = base.to_vec();
    rocks[3] = "rocks";
    ok(lazarus(root, &rocks));
    let all = json(&ok(lazarus(root, &["status", "--json"])));
    // plants under 8 feature sets (3 of them the --cache-at folders), rocks under 1.
    assert_eq!(all["images"]["total"], 9 * 8 + 2);
    let only_rocks = json(&ok(lazarus(
        root,
        &["status", "--json", "--dataset", "rocks"],
    )));
    assert_eq!(only_rocks["images"]["total"], 2);
    assert_eq!(only_rocks["jobs"]["pending"], 1);
    assert_eq!(only_rocks["groups"].as_array().unwrap().len(), 1);
    let table = ok(lazarus(root, &["status"]));
    assert!(
        table.contains("plants") && table.contains("rocks") && table.contains("0/9"),
        "{table}"
    );

    // A worker runs the oldest job (the random:7 configuration of plants).
    ok(lazarus(root, &["run-worker", "--max-jobs", "1"]));
    let after = json(&ok(lazarus(root, &["status", "--json"])));
    assert_eq!(after["jobs"]["done"], 1, "{after}");
    assert_eq!(
        after["jobs"]["pending"].as_u64().unwrap() + 1,
        all["jobs"]["pending"].as_u64().unwrap()
    );
}

#[test]
fn status_of_a_missing_queue_reports_zeros_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let status = json(&ok(lazarus(root, &["status", "--json"])));
    for state in ["pending", "running", "done", "failed", "dead"] {
        assert_eq!(status["jobs"][state], 0);
    }
    for key in ["total", "done", "failed"] {
        assert_eq!(status["images"][key], 0);
    }
    assert!(!queue_db(root).exists());
    assert_eq!(
        json(&ok(lazarus(root, &["requeue", "--json"])))["requeued"],
        0
    );
}

#[test]
fn a_failed_job_is_retried_after_requeue_and_workers_stop_after_max_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let markers = root.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--noop-jobs",
            "3",
            "--noop-marker-dir",
            markers.to_str().unwrap(),
        ],
    ));
    // A marker already in place makes job 2's first attempt fail.
    std::fs::write(markers.join("job-2-attempt-1"), "someone else").unwrap();
    let report = json(&ok(lazarus(
        root,
        &[
            "run-worker",
            "--json",
            "--max-jobs",
            "3",
            "--worker-id",
            "solo",
        ],
    )));
    assert_eq!(report["completed"], 2);
    assert_eq!(report["failed"], 1);
    assert_eq!(report["stopped"], "max_jobs");

    let status = json(&ok(lazarus(root, &["status", "--json"])));
    assert_eq!(status["jobs"]["failed"], 1);
    assert_eq!(status["jobs"]["done"], 2);
    assert_eq!(status["failed_jobs"][0]["job_id"], 2);
    assert!(
        status["failed_jobs"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("job-2-attempt-1"),
        "{status}"
    );
    let table = ok(lazarus(root, &["status"]));
    assert!(table.contains("failed job 2"), "{table}");

    // Backoff keeps it for 10 s; requeue makes it claimable at once.
    let requeued = json(&ok(lazarus(root, &["requeue", "--failed", "--json"])));
    assert_eq!(requeued["requeued"], 1);
    let report = json(&ok(lazarus(
        root,
        &["run-worker", "--json", "--until-empty"],
    )));
    assert_eq!(report["completed"], 1);
    assert_eq!(report["stopped"], "empty");
    assert!(markers.join("job-2-attempt-2").exists());
    let status = json(&ok(lazarus(root, &["status", "--json"])));
    assert_eq!(status["jobs"]["done"], 3);
    assert_eq!(status["jobs"]["failed"], 0);
}

#[test]
fn a_queue_that_is_not_a_postgres_url_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    for value in ["mysql://db/jobs", "jobs/queue.db"] {
        let err = fails(support::lazarus_on(dir.path(), Some(value), &["status"]));
        assert!(
            err.contains(&format!("--queue {value}: expected a postgres://")),
            "{err}"
        );
    }
    assert!(!dir.path().join("jobs").exists(), "nothing was created");
}

/// The whole verb chain over PostgreSQL: enqueue, work, status and requeue
/// name the queue by its URL with the password hidden, and no SQLite file
/// appears under the root.
#[test]
fn verbs_use_the_postgres_queue_and_never_print_its_password() {
    let Some(server) = support::postgres::server("verbs_use_the_postgres_queue") else {
        return;
    };
    let schema = support::postgres::Schema::create(&server);
    // The test server trusts loopback, so any password is accepted and must be hidden.
    let url = match schema.url.split_once("://postgres@") {
        Some((scheme, rest)) => format!("{scheme}://postgres:hunter2@{rest}"),
        None => schema.url.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let queue = Some(url.as_str());
    let added = json(&ok(support::lazarus_on(
        root,
        queue,
        &["enqueue", "--json", "--noop-jobs", "5"],
    )));
    assert_eq!(added["jobs_added"], 5);
    let worked = json(&ok(support::lazarus_on(
        root,
        queue,
        &["run-worker", "--until-empty", "--json"],
    )));
    assert_eq!(worked["completed"], 5);
    let status_text = ok(support::lazarus_on(root, queue, &["status", "--json"]));
    let status = json(&status_text);
    assert_eq!(status["jobs"]["done"], 5, "{status}");
    let shown = status["queue"].as_str().unwrap();
    assert!(shown.starts_with("postgres://"), "{shown}");
    if url != schema.url {
        assert!(shown.contains("postgres:***@"), "{shown}");
    }
    for text in [&status_text, &added.to_string(), &worked.to_string()] {
        assert!(!text.contains("hunter2"), "password leaked: {text}");
    }
    let requeued = json(&ok(support::lazarus_on(
        root,
        queue,
        &["requeue", "--json"],
    )));
    assert_eq!(requeued["requeued"], 0);
    assert!(!root.join("jobs/queue.db").exists(), "no SQLite queue");
}

/// Issue 19, item 8: `--weights rel/path` is resolved against the folder
/// `enqueue` runs in, checked there, and stored absolute, so a worker
/// started anywhere else finds it.
#[test]
fn a_relative_weights_path_is_checked_at_enqueue_and_stored_absolute() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    add_dataset(root, "plants", &[3, 2]);
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let installed =
        lazarus::weights::cache_root().join("weights/efficientnet-lite0/model.safetensors");
    assert!(installed.is_file(), "run scripts/fetch_assets.sh");
    std::fs::copy(&installed, models.join("lite0.safetensors")).unwrap();
    let enqueue = |weights: &str| {
        support::queue_command(root, None)
            .current_dir(root)
            .args([
                "enqueue",
                "--json",
                "--dataset",
                "plants",
                "--encoder",
                "efficientnet-lite0",
                "--weights",
                weights,
            ])
            .output()
            .unwrap()
    };
    let err = fails(enqueue("models/missing.safetensors"));
    assert!(err.contains("models/missing.safetensors"), "{err}");
    assert!(!queue_db(root).exists(), "refused before the queue opened");

    ok(enqueue("models/lite0.safetensors"));
    let db = rusqlite::Connection::open(queue_db(root)).unwrap();
    let payload: String = db
        .query_row("SELECT payload FROM jobs LIMIT 1", [], |row| row.get(0))
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
    let stored = payload["weights"]["path"].as_str().unwrap();
    assert_eq!(
        std::path::Path::new(stored),
        std::fs::canonicalize(models.join("lite0.safetensors")).unwrap(),
        "{payload}"
    );
    // A worker in another folder extracts with them.
    let elsewhere = tempfile::tempdir().unwrap();
    let worker = support::queue_command(root, None)
        .current_dir(elsewhere.path())
        .args(["run-worker", "--until-empty", "--json"])
        .output()
        .unwrap();
    let report = json(&ok(worker));
    assert_eq!(report["completed"], 1, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
}
