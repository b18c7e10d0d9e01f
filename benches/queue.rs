//! Queue throughput: claim and complete 10,000 no-op jobs with 4 concurrent
//! `run-worker` processes on one SQLite queue, and on PostgreSQL when
//! `LAZARUS_TEST_POSTGRES` names a server (a fresh schema per round), in the
//! same run. Not a timed test: it prints jobs per second (wall clock from
//! spawning the workers to the last exit, process start-up included).
//! Run with `cargo bench --bench queue`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const JOBS: u64 = 10_000;
const WORKERS: usize = 4;
const ROUNDS: usize = 3;

/// Where a round keeps its jobs: the root's SQLite file, or a PostgreSQL server.
#[derive(Clone)]
enum Backend {
    Sqlite,
    Postgres(String),
}

fn lazarus(root: &Path, queue: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lazarus"));
    command.arg("--root").arg(root);
    match queue {
        Some(url) => command.env("LAZARUS_QUEUE", url),
        None => command.env_remove("LAZARUS_QUEUE"),
    };
    command
}

fn round(workers: usize, backend: &Backend) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let schema = format!("lazarus_bench_{}", std::process::id());
    let queue_url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres(server) => {
            let mut client =
                postgres::Client::connect(server, postgres::NoTls).expect("bench server");
            client
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
                ))
                .expect("fresh schema");
            let separator = if server.contains('?') { '&' } else { '?' };
            Some(format!(
                "{server}{separator}options=-c%20search_path%3D{schema}"
            ))
        }
    };
    let queue = queue_url.as_deref();
    let lazarus = |root: &Path| lazarus(root, queue);
    let enqueued = lazarus(root)
        .args(["enqueue", "--noop-jobs", &JOBS.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("enqueue runs");
    assert!(enqueued.success(), "enqueue failed");

    let started = Instant::now();
    let children: Vec<_> = (0..workers)
        .map(|i| {
            lazarus(root)
                .args(["run-worker", "--until-empty", "--json", "--worker-id"])
                .arg(format!("bench{i}"))
                .stdout(Stdio::piped())
                .spawn()
                .expect("worker starts")
        })
        .collect();
    let mut completed = 0;
    for child in children {
        let output = child.wait_with_output().expect("worker exits");
        assert!(output.status.success(), "worker failed");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        completed += report["completed"].as_u64().expect("completed count");
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(completed, JOBS, "every job completed once");

    let status = lazarus(root)
        .args(["status", "--json"])
        .output()
        .expect("status runs");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(status["jobs"]["done"], JOBS);
    let on_postgres = status["queue"]
        .as_str()
        .is_some_and(|q| q.starts_with("postgres"));
    assert_eq!(
        on_postgres,
        queue.is_some(),
        "measured the wrong queue: {status}"
    );
    if let Backend::Postgres(server) = backend {
        let mut client = postgres::Client::connect(server, postgres::NoTls).expect("bench server");
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .expect("drop schema");
    }
    JOBS as f64 / elapsed
}

fn main() {
    // `cargo test --benches` passes --bench-less flags; only run under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("queue benchmark: run with `cargo bench --bench queue`");
        return;
    }
    let mut backends = vec![("sqlite", Backend::Sqlite)];
    match std::env::var("LAZARUS_TEST_POSTGRES") {
        Ok(server) if !server.is_empty() => backends.push(("postgres", Backend::Postgres(server))),
        _ => println!("queue: LAZARUS_TEST_POSTGRES unset: SQLite only"),
    }
    for (name, backend) in &backends {
        for workers in [WORKERS, 1] {
            let mut rates: Vec<f64> = (0..ROUNDS).map(|_| round(workers, backend)).collect();
            rates.sort_by(|a, b| a.total_cmp(b));
            println!(
                "queue ({name}): {JOBS} noop jobs, {workers} worker process(es): median {:.0} jobs/s (min {:.0}, max {:.0}, {ROUNDS} rounds)",
                rates[ROUNDS / 2],
                rates[0],
                rates[ROUNDS - 1]
            );
        }
    }
}
