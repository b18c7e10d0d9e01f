//! Workers against jobs that go wrong, with real processes: a panic inside a
//! job fails that job (with its message) and the worker goes on or exits; a
//! job that ignores SIGTERM is released after `--stop-grace-secs`; hostile
//! legacy `.pth` weights (overflowing strides, a memo "billion laughs", a
//! stride-0 view of a terabyte) fail their job with a message naming the file
//! instead of hanging, exhausting memory or aborting the worker.

use crate::support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{fails, image_folder, json, lazarus, ok, queue_command, stderr};

/// Waits for `child` to exit within `limit`; kills it and fails the test if
/// it does not (the bug this file guards against is a worker that never exits).
fn wait_with_limit(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!(
                "{what} did not exit within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn spawn(root: &Path, args: &[&str]) -> Child {
    queue_command(root, None)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn queue_status(root: &Path) -> serde_json::Value {
    json(&ok(lazarus(root, &["status", "--json"])))
}

/// Polls `status --json` until `done` holds (at most `secs` seconds).
fn wait_for_status(
    root: &Path,
    secs: u64,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let status = queue_status(root);
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "timed out; status: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[test]
fn a_job_that_panics_is_failed_with_its_message_and_the_worker_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--noop-jobs",
            "1",
            "--noop-panic",
            "boom in a job",
        ],
    ));
    ok(lazarus(root, &["enqueue", "--noop-jobs", "1"]));
    let worker = spawn(
        root,
        &[
            "run-worker",
            "--json",
            "--max-jobs",
            "2",
            "--lease-secs",
            "1",
        ],
    );
    let output = wait_with_limit(worker, Duration::from_secs(60), "the worker");
    assert!(output.status.success(), "{output:?}");
    let report = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(report["failed"], 1, "{report}");
    assert_eq!(report["completed"], 1, "{report}");
    let reason = report["failures"][0]["reason"].as_str().unwrap();
    assert_eq!(reason, "the job panicked: boom in a job");
    assert!(stderr(&output).contains("job 1 failed (attempt 1): the job panicked"));

    // The try counts and the lease is gone: failed, waiting for its retry.
    let status = queue_status(root);
    assert_eq!(status["jobs"]["failed"], 1, "{status}");
    assert_eq!(status["jobs"]["running"], 0, "{status}");
    assert_eq!(status["jobs"]["done"], 1, "{status}");
    assert!(
        status["failed_jobs"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("boom in a job"),
        "{status}"
    );
}

#[test]
fn a_worker_whose_job_panicked_stops_heartbeating_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--noop-jobs",
            "1",
            "--noop-panic",
            "index out of bounds",
        ],
    ));
    // A polling worker: it keeps running after the failed job.
    let worker = spawn(root, &["run-worker", "--json", "--lease-secs", "1"]);
    wait_for_status(root, 30, |s| s["jobs"]["failed"] == 1);
    // Beats would renew a lease; a failed job has none to renew, for 2 leases.
    std::thread::sleep(Duration::from_millis(2000));
    let status = queue_status(root);
    assert_eq!(status["jobs"]["running"], 0, "{status}");
    assert_eq!(status["jobs"]["failed"], 1, "{status}");
    signal(&worker, "TERM");
    let output = wait_with_limit(worker, Duration::from_secs(10), "the worker after SIGTERM");
    assert!(output.status.success(), "{output:?}");
    let report = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(report["stopped"], "signal");
    assert_eq!(report["failed"], 1);
}

#[test]
fn a_job_that_ignores_sigterm_is_released_after_the_grace_and_a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--noop-jobs",
            "1",
            "--noop-sleep-ms",
            "600000",
            "--noop-ignore-stop",
        ],
    ));
    let worker = spawn(root, &["run-worker", "--stop-grace-secs", "2"]);
    wait_for_status(root, 30, |s| s["jobs"]["running"] == 1);
    let started = Instant::now();
    signal(&worker, "TERM");
    let output = wait_with_limit(worker, Duration::from_secs(20), "the worker after SIGTERM");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the job had its grace"
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let message = stderr(&output);
    assert!(
        message.contains("job 1 (attempt 1) did not stop and is pending again"),
        "{message}"
    );
    assert!(message.contains("--stop-grace-secs"), "{message}");
    let status = queue_status(root);
    assert_eq!(status["jobs"]["pending"], 1, "released: {status}");
    assert_eq!(status["jobs"]["running"], 0, "{status}");

    // A second signal does not wait for the grace.
    let worker = spawn(root, &["run-worker", "--stop-grace-secs", "600"]);
    wait_for_status(root, 30, |s| s["jobs"]["running"] == 1);
    let started = Instant::now();
    signal(&worker, "INT");
    std::thread::sleep(Duration::from_millis(300));
    signal(&worker, "TERM");
    let output = wait_with_limit(
        worker,
        Duration::from_secs(10),
        "the worker after 2 signals",
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr(&output).contains("second stop request"),
        "{output:?}"
    );
}

#[test]
fn until_empty_exits_non_zero_with_the_reasons_when_no_job_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--noop-jobs",
            "1",
            "--noop-panic",
            "always broken",
        ],
    ));
    // Retries at once (hidden test setting): 5 tries, then the job is dead.
    let worker = spawn(
        root,
        &["run-worker", "--until-empty", "--retry-delay-ms", "0"],
    );
    let output = wait_with_limit(worker, Duration::from_secs(60), "the worker");
    let message = fails(output);
    for attempt in 1..=5 {
        assert!(
            message.contains(&format!(
                "job 1 failed (attempt {attempt}): the job panicked: always broken"
            )),
            "{message}"
        );
    }
    assert!(message.contains("no job succeeded: 5 failed"), "{message}");
    let status = queue_status(root);
    assert_eq!(status["jobs"]["dead"], 1, "{status}");
}

#[test]
fn a_restarted_until_empty_worker_waits_for_a_dead_workers_job_and_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let markers = root.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--noop-jobs",
            "1",
            "--noop-sleep-ms",
            "1000",
            "--noop-marker-dir",
            markers.to_str().unwrap(),
        ],
    ));
    let mut doomed = spawn(root, &["run-worker", "--lease-secs", "3"]);
    wait_for_status(root, 30, |s| s["jobs"]["running"] == 1);
    doomed.kill().unwrap(); // SIGKILL: the job stays running under its lease
    doomed.wait().unwrap();
    let status = queue_status(root);
    assert_eq!(status["jobs"]["running"], 1, "{status}");

    let output = ok(lazarus(
        root,
        &["run-worker", "--until-empty", "--json", "--lease-secs", "1"],
    ));
    let report = json(&output);
    assert_eq!(
        report["completed"], 1,
        "it ran the job once the lease expired: {report}"
    );
    assert!(
        report["waited_for_running_ms"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(markers.join("job-1-attempt-2").exists());
    let status = queue_status(root);
    assert_eq!(status["jobs"]["done"], 1, "{status}");
}

/// Pickle opcodes written by hand, as torch's legacy `_save` would.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn string(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// LONG1: any non-negative integer below 2^64.
    fn int(&mut self, n: u64) -> &mut Self {
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.push(0); // sign byte: non-negative
        self.op(&[0x8a, bytes.len() as u8]).op(&bytes)
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn tuple(&mut self, items: &[u64]) -> &mut Self {
        self.op(b"(");
        for &n in items {
            self.int(n);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(FloatStorage key, offset, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, key: &str, numel: u64, size: &[u64], stride: &[u64]) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(")
            .string("storage")
            .global("torch", "FloatStorage")
            .string(key)
            .string("cpu")
            .int(numel)
            .op(b"Nt")
            .op(b"Q");
        self.int(0).tuple(size).tuple(stride).op(&[0x89]);
        self.global("collections", "OrderedDict")
            .op(b")R")
            .op(b"t")
            .op(b"R")
    }
}

/// The first three pickles of a legacy file: magic, protocol, sys_info.
fn header() -> Vec<u8> {
    let mut p = Pickle::default();
    let magic: u128 = 0x1950a86a20f9469cfc6c;
    p.op(&[0x80, 2, 0x8a, 10])
        .op(&magic.to_le_bytes()[..10])
        .op(b".");
    p.op(&[0x80, 2, b'M']).op(&1001u16.to_le_bytes()).op(b".");
    p.op(&[0x80, 2, b'}', b'(']);
    p.string("little_endian").op(&[0x88]).op(b"u.");
    p.0
}

/// A legacy file with one float tensor `w` viewing a storage of `numel` floats.
fn one_tensor_file(numel: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
    let mut bytes = header();
    let mut p = Pickle::default();
    p.op(&[0x80, 2])
        .global("collections", "OrderedDict")
        .op(b")R(");
    p.string("w").tensor("k0", numel, size, stride);
    p.op(b"u.");
    p.op(&[0x80, 2, b']', b'(']).string("k0").op(b"e.");
    bytes.extend_from_slice(&p.0);
    bytes.extend_from_slice(&numel.to_le_bytes());
    for v in 0..numel {
        bytes.extend_from_slice(&(v as f32).to_le_bytes());
    }
    bytes
}

/// A "billion laughs" state dict: each level is a pair of two copies of the
/// level below, fetched through the memo: 7 bytes per level, 2^levels values.
fn memo_bomb(levels: usize) -> Vec<u8> {
    let mut bytes = header();
    let mut p = Pickle::default();
    p.op(&[0x80, 2, b'N', b'q', 0]);
    for _ in 0..levels {
        p.op(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
    }
    p.op(b".");
    bytes.extend_from_slice(&p.0);
    bytes
}

/// A legacy file whose state-dict pickle is `body` (after PROTO 2).
fn with_body(body: &[u8]) -> Vec<u8> {
    let mut bytes = header();
    bytes.extend_from_slice(&[0x80, 2]);
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn hostile_pth_weights_fail_their_job_with_a_message_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let pwned = dir.path().join("pwned");
    let touch = format!("touch {}", pwned.display());
    let tree = image_folder(dir.path(), &[2]);
    ok(lazarus(
        &root,
        &["dataset", "add", "tiny", tree.to_str().unwrap()],
    ));
    let files = [
        // Strides (2^64 - 1, 2): the reach of the view overflows (it panicked).
        (
            "overflow.pth",
            one_tensor_file(4, &[2, 2], &[u64::MAX, 2]),
            "reaches past the storage",
        ),
        // A stride-0 view of 2^40 elements over one float: 4 TB asked of 4 bytes.
        (
            "expand.pth",
            one_tensor_file(1, &[1 << 40], &[0]),
            "times the 4 bytes of the file's storages",
        ),
        ("laughs.pth", memo_bomb(24), "values (memo copies included)"),
        // Code execution attempts: none may run.
        (
            "system.pth",
            with_body(
                &Pickle::default()
                    .global("os", "system")
                    .string(&touch)
                    .op(b"\x85R.")
                    .0,
            ),
            "refusing global 'os.system'",
        ),
        (
            "eval.pth",
            with_body(
                &Pickle::default()
                    .string("builtins")
                    .string("eval")
                    .op(&[0x93])
                    .string(&format!("__import__('os').system('{touch}')"))
                    .op(b"\x85R.")
                    .0,
            ),
            "refusing global 'builtins.eval'",
        ),
        (
            "inst.pth",
            with_body(
                &Pickle::default()
                    .op(b"(")
                    .string(&touch)
                    .op(b"ios\nsystem\n.")
                    .0,
            ),
            "refusing pickle opcode 0x69 ('i')",
        ),
        (
            "zip.pth",
            b"PK\x03\x04 data.pkl: the current torch format, a zip archive".to_vec(),
            "zip-format torch file",
        ),
        // A storage that claims to be a view of another one.
        (
            "storage.pth",
            with_body(
                &Pickle::default()
                    .global("collections", "OrderedDict")
                    .op(b")R(")
                    .string("w")
                    .global("torch._utils", "_rebuild_tensor_v2")
                    .op(b"((")
                    .string("storage")
                    .global("torch", "FloatStorage")
                    .string("k0")
                    .string("cpu")
                    .int(4)
                    .op(b"(")
                    .string("k1")
                    .int(0)
                    .int(4)
                    .op(b"ttQ")
                    .int(0)
                    .tuple(&[4])
                    .tuple(&[1])
                    .op(&[0x89])
                    .global("collections", "OrderedDict")
                    .op(b")RtRu.")
                    .0,
            ),
            "shared storage views are not supported",
        ),
    ];
    for (name, bytes, _) in &files {
        assert!(bytes.len() < 400, "{name} is a small file");
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        ok(lazarus(
            &root,
            &[
                "enqueue",
                "--dataset",
                "tiny",
                "--encoder",
                "efficientnet-lite0",
                "--weights",
                path.to_str().unwrap(),
            ],
        ));
    }
    let count = files.len().to_string();
    let worker = spawn(&root, &["run-worker", "--json", "--max-jobs", &count]);
    let output = wait_with_limit(worker, Duration::from_secs(120), "the worker");
    assert!(output.status.success(), "{output:?}");
    let report = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(report["failed"], files.len(), "{report}");
    assert!(!pwned.exists(), "no pickle payload ran");
    let errors: Vec<String> = queue_status(&root)["failed_jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["last_error"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors.len(), files.len(), "{errors:#?}");
    for (name, _, reason) in &files {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(name) && e.contains(reason)),
            "no failure for {name} with '{reason}' in {errors:#?}"
        );
    }
}
