//! Real processes on one queue: 4 `run-worker`s, an enqueuer adding jobs
//! while they run, and a `status --json` poller. Every job must be executed
//! and recorded exactly once, and no "database is locked" may reach a user.
//! Each test runs on the SQLite file and on PostgreSQL (`LAZARUS_TEST_POSTGRES`,
//! required when `CI=true`; see tests/support/postgres.rs).

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const WORKERS: usize = 4;
const BATCHES: u64 = 4;
const PER_BATCH: u64 = 500;

/// Where the processes of one test work: a root, and the queue they share
/// (the root's SQLite file, or a PostgreSQL schema of the test's own).
#[derive(Clone)]
struct Target {
    root: PathBuf,
    queue: Option<String>,
}

/// The SQLite target, or the PostgreSQL one (with the schema kept alive by
/// the returned guard); `None` when no PostgreSQL test server is configured.
fn target(
    dir: &Path,
    backend: Backend,
    test: &str,
) -> Option<(Target, Option<support::postgres::Schema>)> {
    let root = dir.to_path_buf();
    match backend {
        Backend::Sqlite => Some((Target { root, queue: None }, None)),
        Backend::Postgres => {
            let schema = support::postgres::Schema::create(&support::postgres::server(test)?);
            let queue = Some(schema.url.clone());
            Some((Target { root, queue }, Some(schema)))
        }
    }
}

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

fn command(target: &Target) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lazarus"));
    command.arg("--root").arg(&target.root);
    match &target.queue {
        Some(url) => command.env("LAZARUS_QUEUE", url),
        None => command.env_remove("LAZARUS_QUEUE"),
    };
    command
}

fn status_json(target: &Target) -> (serde_json::Value, Output) {
    let output = command(target).args(["status", "--json"]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (value, output)
}

fn assert_not_locked(what: &str, output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.to_lowercase().contains("database is locked")
            && !stderr.to_lowercase().contains("busy"),
        "{what} printed a lock error: {stderr}"
    );
}

#[test]
fn four_workers_an_enqueuer_and_a_poller_do_every_job_exactly_once_sqlite() {
    four_workers_an_enqueuer_and_a_poller_do_every_job_exactly_once(Backend::Sqlite);
}

#[test]
fn four_workers_an_enqueuer_and_a_poller_do_every_job_exactly_once_postgres() {
    four_workers_an_enqueuer_and_a_poller_do_every_job_exactly_once(Backend::Postgres);
}

fn four_workers_an_enqueuer_and_a_poller_do_every_job_exactly_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((root, _schema)) = target(dir.path(), backend, "four_workers_exactly_once") else {
        return;
    };
    let markers = root.root.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let total = BATCHES * PER_BATCH;

    // Workers start first, on a queue file that does not exist yet.
    let workers: Vec<Child> = (0..WORKERS)
        .map(|i| {
            command(&root)
                .args(["run-worker", "--json", "--lease-secs", "60", "--worker-id"])
                .arg(format!("w{i}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();

    let enqueuer = {
        let root = root.clone();
        let markers = markers.clone();
        std::thread::spawn(move || {
            (0..BATCHES)
                .map(|_| {
                    let output = command(&root)
                        .args(["enqueue", "--json", "--noop-jobs"])
                        .arg(PER_BATCH.to_string())
                        .arg("--noop-marker-dir")
                        .arg(&markers)
                        .output()
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    output
                })
                .collect::<Vec<Output>>()
        })
    };

    let finished = Arc::new(AtomicBool::new(false));
    let poller = {
        let root = root.clone();
        let finished = Arc::clone(&finished);
        std::thread::spawn(move || {
            let mut polls = Vec::new();
            while !finished.load(Ordering::SeqCst) {
                polls.push(status_json(&root));
            }
            polls
        })
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = 0;
    while Instant::now() < deadline {
        let (status, _) = status_json(&root);
        done = status["jobs"]["done"].as_u64().unwrap_or(0);
        if done >= total {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    finished.store(true, Ordering::SeqCst);

    // SIGTERM: each worker stops between jobs and exits 0.
    for worker in &workers {
        let killed = Command::new("kill")
            .args(["-TERM", &worker.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    let worker_outputs: Vec<Output> = workers
        .into_iter()
        .map(|w| w.wait_with_output().unwrap())
        .collect();
    let enqueue_outputs = enqueuer.join().unwrap();
    let polls = poller.join().unwrap();
    assert_eq!(done, total, "all jobs done within 60 s");

    for output in &enqueue_outputs {
        assert_not_locked("enqueue", output);
        assert!(output.status.success(), "enqueue failed: {output:?}");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["jobs_added"], PER_BATCH);
    }
    let mut completed = 0;
    for output in &worker_outputs {
        assert_not_locked("run-worker", output);
        assert!(output.status.success(), "worker failed: {output:?}");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["stopped"], "signal");
        assert_eq!(report["lease_lost"], 0);
        assert_eq!(report["failed"], 0);
        completed += report["completed"].as_u64().unwrap();
    }
    assert_eq!(completed, total, "completions reported by the workers");
    assert!(polls.len() >= 2, "the poller ran while the workers did");
    let mut last_done = 0;
    for (status, output) in &polls {
        assert_not_locked("status", output);
        assert!(output.status.success(), "status failed: {output:?}");
        let done = status["jobs"]["done"].as_u64().unwrap();
        assert!(done >= last_done, "done never goes back");
        last_done = done;
    }

    // Exactly one execution per job: one marker per job id, all first attempts.
    let names: Vec<String> = std::fs::read_dir(&markers)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len() as u64, total, "one execution per job");
    let ids: BTreeSet<u64> = names
        .iter()
        .map(|name| {
            let rest = name.strip_prefix("job-").unwrap();
            let (id, attempt) = rest.split_once("-attempt-").unwrap();
            assert_eq!(attempt, "1", "{name}: no job ran twice");
            id.parse().unwrap()
        })
        .collect();
    assert_eq!(ids, (1..=total).collect::<BTreeSet<u64>>());
    // Several workers took part.
    let mut by_worker = std::collections::BTreeMap::new();
    for name in &names {
        let who = std::fs::read_to_string(markers.join(name)).unwrap();
        *by_worker.entry(who.trim().to_string()).or_insert(0u64) += 1;
    }
    assert!(by_worker.len() >= 2, "work was shared: {by_worker:?}");

    let (status, _) = status_json(&root);
    assert_eq!(status["jobs"]["done"], total);
    for state in ["pending", "running", "failed", "dead"] {
        assert_eq!(status["jobs"][state], 0, "{state}: {status}");
    }
}

/// Polls `status --json` until `check` holds, for at most `secs` seconds.
fn wait_for(
    root: &Target,
    secs: u64,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, _) = status_json(root);
        if check(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out; last status: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn enqueue_slow_job(root: &Target, markers: &Path, sleep_ms: u64) {
    let output = command(root)
        .args(["enqueue", "--noop-jobs", "1", "--noop-sleep-ms"])
        .arg(sleep_ms.to_string())
        .arg("--noop-marker-dir")
        .arg(markers)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn a_killed_workers_job_is_reclaimed_after_its_lease_expires_sqlite() {
    a_killed_workers_job_is_reclaimed_after_its_lease_expires(Backend::Sqlite);
}

#[test]
fn a_killed_workers_job_is_reclaimed_after_its_lease_expires_postgres() {
    a_killed_workers_job_is_reclaimed_after_its_lease_expires(Backend::Postgres);
}

fn a_killed_workers_job_is_reclaimed_after_its_lease_expires(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((target, _schema)) = target(dir.path(), backend, "killed_worker_reclaimed") else {
        return;
    };
    let root = &target;
    let markers = target.root.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    enqueue_slow_job(root, &markers, 1500);

    let mut doomed = command(root)
        .args(["run-worker", "--lease-secs", "1", "--worker-id", "doomed"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(root, 10, |s| s["jobs"]["running"] == 1);
    // Mid-job: the marker is written before the job starts sleeping.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !markers.join("job-1-attempt-1").exists() {
        assert!(
            Instant::now() < deadline,
            "the doomed worker started the job"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    doomed.kill().unwrap(); // SIGKILL: no release, no completion
    doomed.wait().unwrap();
    let status = wait_for(root, 10, |s| s["groups"][0]["expired_leases"] == 1);
    assert_eq!(
        status["jobs"]["running"], 1,
        "still leased to the dead worker"
    );

    let output = command(root)
        .args(["run-worker", "--until-empty", "--json", "--lease-secs", "1"])
        .args(["--worker-id", "rescuer"])
        .output()
        .unwrap();
    assert_not_locked("run-worker", &output);
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["completed"], 1);
    // The rescuer ran attempt 2 for 1.5 s under a 1 s lease: heartbeats kept it.
    assert_eq!(report["lease_lost"], 0);
    assert_eq!(
        std::fs::read_to_string(markers.join("job-1-attempt-2"))
            .unwrap()
            .trim(),
        "rescuer"
    );
    let status = wait_for(root, 1, |_| true);
    assert_eq!(status["jobs"]["done"], 1);
}

#[test]
fn sigterm_releases_the_running_job_and_exits_zero_sqlite() {
    sigterm_releases_the_running_job_and_exits_zero(Backend::Sqlite);
}

#[test]
fn sigterm_releases_the_running_job_and_exits_zero_postgres() {
    sigterm_releases_the_running_job_and_exits_zero(Backend::Postgres);
}

fn sigterm_releases_the_running_job_and_exits_zero(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((target, _schema)) = target(dir.path(), backend, "sigterm_releases") else {
        return;
    };
    let root = &target;
    let markers = target.root.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    enqueue_slow_job(root, &markers, 30_000);
    let worker = command(root)
        .args(["run-worker", "--json", "--worker-id", "polite"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(root, 10, |s| s["jobs"]["running"] == 1);
    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = worker.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped promptly"
    );
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["released"], 1);
    assert_eq!(report["completed"], 0);
    assert_eq!(report["stopped"], "signal");
    let status = wait_for(root, 1, |_| true);
    assert_eq!(status["jobs"]["pending"], 1, "given back: {status}");
    assert_eq!(status["jobs"]["running"], 0);
}
