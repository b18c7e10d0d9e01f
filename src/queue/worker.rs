//! The claim loop: claim a job of a kind the executor runs, keep its lease
//! alive from a heartbeat thread while it runs, complete or fail it, repeat.
//!
//! Stop requests (SIGINT/SIGTERM set the `stop` flag) are honoured between
//! jobs: the current job is finished, or released if the executor gives up on
//! it, and the loop returns. A job that ignores the request for longer than
//! `WorkerConfig::stop_deadline` allows is abandoned: the monitor thread stops
//! renewing its lease, releases it (the try is given back) and calls the
//! deadline's `abandon`, which ends the process. A worker that loses its lease
//! (its heartbeat or completion is refused) drops the job and carries on: the
//! newer attempt owns it. If the refused job was superseded (`enqueue
//! --force`) rather than reclaimed, nobody owns it any more, so the executor
//! is asked to undo its output (`Executor::superseded`).
//!
//! A panic inside a job is that job's failure: it is caught around the
//! executor (`catch_unwind`; lazarus is never built with `panic = "abort"`),
//! recorded with the panic message as the job's error (the try counts, the
//! lease ends with it), and the loop goes on. The monitor thread stops with
//! the claim loop however that ends, a panic outside a job included.

use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{JobResult, KindBacklog, Lease, Queue, QueueError};

/// What running one job came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; per-item failures are inside the result.
    Completed(JobResult),
    /// The whole job failed (retried with backoff, dead after max attempts).
    Failed(String),
    /// The executor stopped early because `stop` was set: release the job.
    Interrupted,
}

/// Runs jobs of some kinds.
pub trait Executor: Sync {
    /// The job kinds this executor can run; the worker claims only these.
    fn kinds(&self) -> Vec<String>;
    /// Runs one job. Long jobs should check `stop` and return `Interrupted`.
    fn execute(&self, lease: &Lease, stop: &AtomicBool) -> Outcome;
    /// The queue refused `lease`'s completion because the job was
    /// superseded (`enqueue --force`) while it ran: undo what the run left
    /// behind (its output is stale). A job merely reclaimed by another
    /// worker is not superseded: its output is that worker's too.
    fn superseded(&self, lease: &Lease) -> Result<(), String> {
        let _ = lease;
        Ok(())
    }
}

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub lease: Duration,
    /// Return once no job of our kinds is pending or waiting for a retry,
    /// instead of polling (jobs running on other workers are left to them).
    pub until_empty: bool,
    /// Return after this many jobs (completed or failed).
    pub max_jobs: Option<u64>,
    /// Wait between claims when nothing is claimable.
    pub poll_interval: Duration,
    /// How long a job may ignore a stop request; `None`: wait for it however long.
    pub stop_deadline: Option<StopDeadline>,
}

/// The bounded wait after a stop request (SIGINT/SIGTERM).
#[derive(Debug, Clone, Copy)]
pub struct StopDeadline {
    /// How long after the stop request the worker waits for its running job
    /// (or queue call) to return.
    pub grace: Duration,
    /// Called from the monitor thread once `grace` has passed and the claim
    /// loop has not returned, after the running job's lease was released. The
    /// job's thread cannot be stopped from outside, so this must end the process.
    pub abandon: fn(&Abandoned) -> !,
}

/// What the worker was doing when its stop deadline passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    pub worker: String,
    pub grace: Duration,
    /// The job still running (id, attempt), if any.
    pub job: Option<(i64, u32)>,
    /// Whether the queue accepted the release of that job (pending again, the try given back).
    pub released: bool,
}

/// One job this worker failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobFailure {
    pub job_id: i64,
    pub attempt: u32,
    pub reason: String,
}

/// Why the loop returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `until_empty` and no job of our kinds is waiting.
    Empty,
    MaxJobs,
    /// The stop flag was set (SIGINT/SIGTERM).
    Signal,
    /// Only jobs of kinds this worker cannot run are waiting.
    Blocked,
}

/// What a worker did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerReport {
    pub worker: String,
    pub completed: u64,
    pub failed: u64,
    /// Jobs whose lease was lost before the result could be recorded.
    pub lease_lost: u64,
    /// Of those, completed jobs that had been superseded while they ran,
    /// whose output the executor removed (`Executor::superseded`).
    pub superseded_discarded: u64,
    /// Superseded jobs whose output the executor failed to remove, with why
    /// (`verify --repair` removes it later).
    pub discard_failures: Vec<JobFailure>,
    /// Jobs given back on a stop request.
    pub released: u64,
    pub stopped: StopReason,
    /// With `Blocked`: the unfinished kinds this worker cannot run, with counts.
    pub blocked_kinds: Vec<(String, u64)>,
    /// The jobs this worker failed (`failed` of them), with their errors.
    pub failures: Vec<JobFailure>,
    /// With `until_empty`: milliseconds spent with nothing to claim while
    /// jobs of its kinds ran under other workers' leases, waiting for them
    /// (they finish, or their lease expires and this worker reclaims them).
    pub waited_for_running_ms: u64,
}

/// The job the heartbeat thread keeps alive.
struct Current {
    job_id: i64,
    attempt: u32,
    last_beat: Instant,
}

/// Runs the claim loop until the queue is empty (with `until_empty`), `max_jobs`
/// jobs ran, `stop` is set, or only unrunnable kinds are left.
pub fn run(
    queue: &dyn Queue,
    executor: &dyn Executor,
    config: &WorkerConfig,
    stop: &AtomicBool,
) -> Result<WorkerReport, QueueError> {
    let kinds = executor.kinds();
    let kind_refs: Vec<&str> = kinds.iter().map(String::as_str).collect();
    let current: Mutex<Option<Current>> = Mutex::new(None);
    let finished = AtomicBool::new(false);
    // Three beats per lease: one lost beat still leaves a third of the lease.
    let beat_every = (config.lease / 3).max(Duration::from_millis(10));
    let tick = (beat_every / 2).min(Duration::from_millis(200));

    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut stop_seen: Option<Instant> = None;
            while !finished.load(Ordering::SeqCst) {
                std::thread::sleep(tick);
                if let Some(deadline) = &config.stop_deadline
                    && stop.load(Ordering::SeqCst)
                    && stop_seen.get_or_insert_with(Instant::now).elapsed() >= deadline.grace
                    && !finished.load(Ordering::SeqCst)
                {
                    abandon(queue, config, deadline, &current);
                }
                let due = {
                    let mut slot = current.lock().unwrap_or_else(|p| p.into_inner());
                    match slot.as_mut() {
                        Some(job) if job.last_beat.elapsed() >= beat_every => {
                            job.last_beat = Instant::now();
                            Some((job.job_id, job.attempt))
                        }
                        _ => None,
                    }
                };
                if let Some((job_id, attempt)) = due {
                    // A refused beat means the lease is lost; the completion will be
                    // refused too, so the main loop learns it there. Transient errors
                    // are retried at the next beat.
                    let _ = queue.heartbeat(job_id, attempt, config.lease);
                }
            }
        });
        // However the claim loop ends (a panic outside a job included), the
        // monitor thread stops with it: nothing renews a lease after that.
        let _stop_monitor = SetOnDrop(&finished);
        claim_loop(queue, executor, config, stop, &kind_refs, &current)
    })
}

/// Sets the flag when dropped, also while unwinding.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The stop deadline passed: no more beats for the running job, which goes
/// back to the queue, then the deadline's `abandon` ends the process.
fn abandon(
    queue: &dyn Queue,
    config: &WorkerConfig,
    deadline: &StopDeadline,
    current: &Mutex<Option<Current>>,
) -> ! {
    let job = current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(|job| (job.job_id, job.attempt));
    let released = job.is_some_and(|(job_id, attempt)| queue.release(job_id, attempt).is_ok());
    (deadline.abandon)(&Abandoned {
        worker: config.worker_id.clone(),
        grace: deadline.grace,
        job,
        released,
    })
}

/// The text of a panic payload (`panic!` with a message gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

fn claim_loop(
    queue: &dyn Queue,
    executor: &dyn Executor,
    config: &WorkerConfig,
    stop: &AtomicBool,
    kinds: &[&str],
    current: &Mutex<Option<Current>>,
) -> Result<WorkerReport, QueueError> {
    let mut report = WorkerReport {
        worker: config.worker_id.clone(),
        completed: 0,
        failed: 0,
        lease_lost: 0,
        superseded_discarded: 0,
        discard_failures: Vec::new(),
        released: 0,
        stopped: StopReason::Empty,
        blocked_kinds: Vec::new(),
        failures: Vec::new(),
        waited_for_running_ms: 0,
    };
    let ran = |report: &WorkerReport| report.completed + report.failed + report.lease_lost;
    let limit_reached =
        |report: &WorkerReport| config.max_jobs.is_some_and(|max| ran(report) >= max);
    let mut next: Option<Lease> = None;
    loop {
        let lease = match next.take() {
            Some(lease) => lease,
            None => {
                if stop.load(Ordering::SeqCst) {
                    report.stopped = StopReason::Signal;
                    return Ok(report);
                }
                if limit_reached(&report) {
                    report.stopped = StopReason::MaxJobs;
                    return Ok(report);
                }
                match queue.claim(&config.worker_id, kinds, config.lease)? {
                    Some(lease) => lease,
                    None => {
                        let backlog = queue.backlog_by_kind()?;
                        let ours = |b: &KindBacklog| kinds.contains(&b.kind.as_str());
                        let ours_waiting: u64 =
                            backlog.iter().filter(|b| ours(b)).map(|b| b.waiting).sum();
                        let others: Vec<(String, u64)> = backlog
                            .iter()
                            .filter(|b| !ours(b) && b.waiting > 0)
                            .map(|b| (b.kind.clone(), b.waiting))
                            .collect();
                        if ours_waiting == 0 && !others.is_empty() {
                            report.stopped = StopReason::Blocked;
                            report.blocked_kinds = others;
                            return Ok(report);
                        }
                        // Jobs running on other workers are theirs: an expired one
                        // is reclaimed by whichever worker is still polling.
                        let ours_running: u64 =
                            backlog.iter().filter(|b| ours(b)).map(|b| b.running).sum();
                        // A job running under another lease is not done: its
                        // worker may be dead, and nobody else may be polling
                        // when its lease expires. `until_empty` waits for it to
                        // finish or to become claimable.
                        let waiting_for_others = ours_waiting == 0 && config.until_empty;
                        if waiting_for_others && ours_running == 0 {
                            report.stopped = StopReason::Empty;
                            return Ok(report);
                        }
                        let slept = Instant::now();
                        sleep_unless_stopped(config.poll_interval, stop);
                        if waiting_for_others {
                            report.waited_for_running_ms += slept.elapsed().as_millis() as u64;
                        }
                        continue;
                    }
                }
            }
        };
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Current {
            job_id: lease.job_id,
            attempt: lease.attempt,
            last_beat: Instant::now(),
        });
        // A panic is this job's failure, not the worker's end.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| executor.execute(&lease, stop)))
            .unwrap_or_else(|payload| {
                Outcome::Failed(format!("the job panicked: {}", panic_message(&*payload)))
            });
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let completed = matches!(outcome, Outcome::Completed(_));
        let recorded = match outcome {
            Outcome::Completed(result) => {
                report.completed += 1;
                let claim_next = !stop.load(Ordering::SeqCst) && !limit_reached(&report);
                if claim_next {
                    // One transaction for both halves the write-lock traffic.
                    queue
                        .complete_and_claim(
                            lease.job_id,
                            lease.attempt,
                            &result,
                            &config.worker_id,
                            kinds,
                            config.lease,
                        )
                        .map(|claimed| next = claimed)
                } else {
                    queue.complete(lease.job_id, lease.attempt, &result)
                }
                .inspect_err(|_| report.completed -= 1)
            }
            Outcome::Failed(message) => {
                let recorded = queue.fail(lease.job_id, lease.attempt, &message);
                if recorded.is_ok() {
                    report.failed += 1;
                    report.failures.push(JobFailure {
                        job_id: lease.job_id,
                        attempt: lease.attempt,
                        reason: message,
                    });
                }
                recorded.map(|_| ())
            }
            Outcome::Interrupted => {
                report.released += 1;
                queue
                    .release(lease.job_id, lease.attempt)
                    .inspect_err(|_| report.released -= 1)
            }
        };
        match recorded {
            Ok(()) => {}
            Err(QueueError::LeaseLost { .. }) => {
                report.lease_lost += 1;
                if completed && queue.job(lease.job_id)?.superseded {
                    match executor.superseded(&lease) {
                        Ok(()) => report.superseded_discarded += 1,
                        Err(reason) => report.discard_failures.push(JobFailure {
                            job_id: lease.job_id,
                            attempt: lease.attempt,
                            reason: format!(
                                "superseded while it ran; cleaning up its output failed: {reason}"
                            ),
                        }),
                    }
                }
            }
            Err(err) => return Err(err),
        }
    }
}

fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}
