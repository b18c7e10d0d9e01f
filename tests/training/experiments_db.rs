//! The experiments database with real processes: several writers at once
//! lose no rows; a run whose process is killed with SIGKILL becomes KILLED at
//! the next open; a second open in one process keeps the first connection's
//! lock, so an outside reader neither deletes the WAL under it nor misses a
//! commit. Plus the refusals (newer schema, not SQLite).
//!
//! Child processes are this test binary run again with `CHILD_MODE` set: the
//! test named on its command line then does the child's part instead.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use lazarus::experiments::{
    ExperimentsDb, ExperimentsError, ParamValue, RunFilter, RunStart, RunStatus,
};
use lazarus::layout::Layout;

const CHILD_MODE: &str = "LAZARUS_EXPERIMENTS_CHILD";
const CHILD_ROOT: &str = "LAZARUS_EXPERIMENTS_ROOT";

const WRITERS: usize = 4;
const RUNS_PER_WRITER: usize = 3;
const STEPS: u64 = 40;
const METRICS_PER_STEP: usize = 3;

fn start(experiment: &str, seed: usize) -> RunStart {
    RunStart {
        experiment: experiment.into(),
        dataset: "toy".into(),
        encoder_fingerprint: "fp-1".into(),
        config_hash: format!("config-{seed}"),
        params: vec![
            ("seed".into(), ParamValue::Number(seed as f64)),
            ("head".into(), ParamValue::Text("linear".into())),
        ],
        tags: vec![("pid".into(), std::process::id().to_string())],
    }
}

/// Runs this module's test `test` again in a child process with `mode`;
/// returns the child.
fn spawn_child(test: &str, mode: &str, root: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &support::harness_name(module_path!(), test),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MODE, mode)
        .env(CHILD_ROOT, root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// In a child: the mode and root to act on.
fn child_mode() -> Option<(String, Layout)> {
    let mode = std::env::var(CHILD_MODE).ok()?;
    let root = std::env::var(CHILD_ROOT).expect("child root is set");
    Some((mode, Layout::new(root)))
}

#[test]
fn concurrent_writer_processes_lose_no_rows() {
    if let Some((mode, layout)) = child_mode() {
        assert_eq!(mode, "write");
        let db = ExperimentsDb::open(&layout).unwrap();
        for r in 0..RUNS_PER_WRITER {
            let run = db.start_run(start("concurrent", r)).unwrap();
            for step in 0..STEPS {
                let metrics: Vec<(String, f64)> = (0..METRICS_PER_STEP)
                    .map(|m| (format!("metric_{m}"), step as f64 + m as f64))
                    .collect();
                run.log_metrics(step, &metrics).unwrap();
            }
            run.write_artifact("metrics.json", b"{}").unwrap();
            run.finish(RunStatus::Finished, &[("val_accuracy", 0.5)])
                .unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let test = "concurrent_writer_processes_lose_no_rows";
    let children: Vec<_> = (0..WRITERS)
        .map(|_| spawn_child(test, "write", dir.path()))
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "a writer failed: {output:?}");
    }
    // Count with plain SQL, independently of the library's queries.
    let connection =
        rusqlite::Connection::open(dir.path().join("experiments/experiments.db")).unwrap();
    let count = |sql: &str| -> i64 { connection.query_row(sql, [], |row| row.get(0)).unwrap() };
    let runs = (WRITERS * RUNS_PER_WRITER) as i64;
    assert_eq!(
        count("SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"),
        runs
    );
    assert_eq!(count("SELECT COUNT(DISTINCT id) FROM runs"), runs);
    assert_eq!(
        count("SELECT COUNT(*) FROM metrics"),
        runs * STEPS as i64 * METRICS_PER_STEP as i64
    );
    assert_eq!(count("SELECT COUNT(*) FROM params"), runs * 2);
    assert_eq!(count("SELECT COUNT(*) FROM summary_metrics"), runs);
    assert_eq!(
        count("SELECT COUNT(DISTINCT value) FROM tags WHERE key = 'pid'"),
        WRITERS as i64
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM artifacts WHERE path = 'metrics.json'"),
        runs
    );
    assert_eq!(count("SELECT COUNT(*) FROM experiments"), 1);
    // Every run folder exists, and no lock file outlives its run.
    let db = ExperimentsDb::open(&Layout::new(dir.path())).unwrap();
    for run in db.list_runs(&RunFilter::default()).unwrap() {
        let run_dir = db.run_dir(&run.id);
        assert!(
            run_dir.join("metrics.json").exists(),
            "{}",
            run_dir.display()
        );
        assert!(!run_dir.join(".lock").exists(), "{}", run_dir.display());
    }
}

#[test]
fn run_of_a_killed_process_becomes_killed_at_next_open() {
    if let Some((mode, layout)) = child_mode() {
        assert_eq!(mode, "hold");
        let db = ExperimentsDb::open(&layout).unwrap();
        let run = db.start_run(start("crash", 0)).unwrap();
        run.log_metrics(1, &[("train_loss", 0.7)]).unwrap();
        // Straight to the pipe: the test harness captures `println!`.
        let mut stdout = std::io::stdout();
        writeln!(stdout, "RUN {}", run.id()).unwrap();
        stdout.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(120));
        panic!("the parent should have killed this child");
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    let mut child = spawn_child(
        "run_of_a_killed_process_becomes_killed_at_next_open",
        "hold",
        dir.path(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let run_id = loop {
        let line = lines.next().expect("child prints its run id").unwrap();
        // The harness's "test NAME ... " precedes it on the same line.
        if let Some((_, id)) = line.split_once("RUN ") {
            break id.trim().to_string();
        }
    };
    // While the child lives, opening the database leaves its run alone.
    let db = ExperimentsDb::open(&layout).unwrap();
    assert_eq!(db.reap_dead_runs().unwrap(), Vec::<String>::new());
    assert_eq!(db.show_run(&run_id).unwrap().run.status, RunStatus::Running);
    drop(db);

    child.kill().unwrap(); // SIGKILL: no destructor, no finish
    child.wait().unwrap();

    let db = ExperimentsDb::open(&layout).unwrap();
    let detail = db.show_run(&run_id).unwrap();
    assert_eq!(detail.run.status, RunStatus::Killed);
    assert!(detail.run.end_ms.is_some());
    // What the run logged before it died is kept.
    assert_eq!(
        db.metric_history(&run_id, "train_loss").unwrap(),
        vec![(1, 0.7)]
    );
    assert_eq!(db.reap_dead_runs().unwrap(), Vec::<String>::new());
}

#[test]
fn live_run_in_this_process_is_not_reaped_and_drop_marks_failed() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    let db = ExperimentsDb::open(&layout).unwrap();
    let run = db.start_run(start("drop", 0)).unwrap();
    let id = run.id().to_string();
    assert!(run.dir().join(".lock").exists());
    // A second handle on the same file (as another verb would open) sees the lock held.
    let other = ExperimentsDb::open(&layout).unwrap();
    assert_eq!(other.show_run(&id).unwrap().run.status, RunStatus::Running);
    drop(run);
    let detail = other.show_run(&id).unwrap();
    assert_eq!(detail.run.status, RunStatus::Failed);
    assert_eq!(db.find_finished("config-0").unwrap(), None);
}

#[test]
fn finished_runs_are_found_by_config_hash_and_record_everything() {
    let dir = tempfile::tempdir().unwrap();
    let db = ExperimentsDb::open(&Layout::new(dir.path())).unwrap();
    let first = db.start_run(start("find", 7)).unwrap();
    let first_id = first.id().to_string();
    first
        .log_metrics(1, &[("val_loss", 0.4), ("train_loss", 0.3)])
        .unwrap();
    let err = first.log_metrics(1, &[("val_loss", 0.5)]).unwrap_err();
    assert!(
        matches!(&err, ExperimentsError::DuplicateMetric { key, step: 1, .. } if key == "val_loss"),
        "{err}"
    );
    first.write_artifact("plots/curve.svg", b"<svg/>").unwrap();
    let err = first.write_artifact("../escape", b"x").unwrap_err();
    assert!(
        err.to_string()
            .contains("relative path inside the run folder"),
        "{err}"
    );
    first
        .finish(RunStatus::Finished, &[("val_accuracy", 0.75)])
        .unwrap();
    let second = db.start_run(start("find", 7)).unwrap();
    assert!(
        second.id() > first_id.as_str(),
        "ids sort by start: {} then {}",
        first_id,
        second.id()
    );
    second
        .finish(RunStatus::Failed, &[] as &[(&str, f64)])
        .unwrap();

    assert_eq!(
        db.find_finished("config-7").unwrap(),
        Some(first_id.clone())
    );
    let detail = db.show_run(&first_id).unwrap();
    assert_eq!(detail.run.status, RunStatus::Finished);
    assert_eq!(detail.run.host, db.host());
    assert_eq!(detail.params["seed"], ParamValue::Number(7.0));
    assert_eq!(detail.summary["val_accuracy"], 0.75);
    assert_eq!(detail.tags["pid"], std::process::id().to_string());
    let artifacts: Vec<&str> = detail.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(artifacts, ["plots/curve.svg"]);
    assert_eq!(detail.metrics.len(), 2);
}

#[test]
fn newer_schema_and_foreign_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    drop(ExperimentsDb::open(&layout).unwrap());
    let path = dir.path().join("experiments/experiments.db");
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute(
                "INSERT INTO schema_version (version, applied_ms) VALUES (99, 0)",
                [],
            )
            .unwrap();
        // Fold the WAL into the main file so the bytes compared below are the whole database.
        connection
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = ExperimentsDb::open(&layout).unwrap_err();
    assert!(
        matches!(
            err,
            ExperimentsError::NewerSchema {
                found: 99,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("newer than the 2 this lazarus knows"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);

    std::fs::write(&path, b"not a database at all, just text").unwrap();
    let err = ExperimentsDb::open(&layout).unwrap_err();
    assert!(matches!(err, ExperimentsError::NotSqlite { .. }), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"not a database at all, just text"
    );
}

/// A second open of experiments.db in a process that already holds it must
/// leave the first connection's locks alone. Closing any descriptor of the
/// file drops all of the process's POSIX locks on it (SQLite's "how to
/// corrupt" 2.2): an outside reader then took itself for the last
/// connection, checkpointed and deleted the WAL under the open connection,
/// whose later commits went to the unlinked WAL, unseen by every other
/// process (a sweep's per-epoch metrics, until the sweep ended). The outside
/// reader is Python's `sqlite3` module, as users query the file; whether a
/// reader deletes the WAL depends on its SQLite version (3.40 does), so the
/// lock itself is checked too, in /proc/locks.
#[test]
fn a_second_open_keeps_the_first_connections_lock_and_commits_visible_to_other_processes() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    let first = ExperimentsDb::open(&layout).unwrap();
    let path = first.path().to_path_buf();
    let outside_count = || -> i64 {
        let script = "import sqlite3, sys\n\
                      connection = sqlite3.connect(sys.argv[1])\n\
                      print(connection.execute('SELECT COUNT(*) FROM metrics').fetchone()[0])\n\
                      connection.close()";
        let output = Command::new("python3")
            .args(["-c", script])
            .arg(&path)
            .output()
            .unwrap();
        assert!(output.status.success(), "the reader failed: {output:?}");
        String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let run = first.start_run(start("locks", 0)).unwrap();
    run.log_metrics(0, &[("loss", 1.0)]).unwrap();
    let wal = path.with_extension("db-wal");
    assert!(wal.exists(), "{}", wal.display());
    assert!(holds_posix_lock(&path), "{}", path.display());

    // The second open (a sweep opens the file again for each fine-tuned
    // point), then an outside reader that opens and closes.
    let second = ExperimentsDb::open(&layout).unwrap();
    assert!(
        holds_posix_lock(&path),
        "the second open dropped this process's lock on {}",
        path.display()
    );
    assert_eq!(outside_count(), 1);
    assert!(
        wal.exists(),
        "an outside reader deleted {} while this process held the database",
        wal.display()
    );
    for step in 1..4 {
        run.log_metrics(step, &[("loss", 1.0 / (step + 1) as f64)])
            .unwrap();
        assert_eq!(
            outside_count(),
            step as i64 + 1,
            "the commit of step {step} is not visible to another process"
        );
    }
    drop(second);
    run.finish(RunStatus::Finished, &[("val_accuracy", 0.5)])
        .unwrap();
    assert!(holds_posix_lock(&path), "{}", path.display());
    assert_eq!(outside_count(), 4);
}

/// Whether this process holds a POSIX lock on `path` (Linux's /proc/locks:
/// `N: POSIX ADVISORY READ|WRITE PID MAJOR:MINOR:INODE START END`).
fn holds_posix_lock(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(path).unwrap().ino();
    let pid = std::process::id().to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .any(|fields| {
            fields.get(1) == Some(&"POSIX")
                && fields.get(4) == Some(&pid.as_str())
                && fields
                    .get(5)
                    .and_then(|device_inode| device_inode.rsplit(':').next())
                    == Some(inode.to_string().as_str())
        })
}
