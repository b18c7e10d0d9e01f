//! Experiments database throughput. Not a timed test: it prints figures.
//! Run with `cargo bench --bench experiments`.
//!
//! 1. Logging: `RunHandle::log_metrics` calls per second (8 metrics per call,
//!    one transaction each, as one epoch of `train` logs), with 1 writer and
//!    with 4 concurrent writers, each on its own connection (SQLite then
//!    arbitrates the write lock as it does between processes).
//! 2. Queries: `ablate` and `best` over 1,000 finished runs.

use std::time::Instant;

use lazarus::experiments::{
    AblationQuery, BestQuery, ExperimentsDb, ParamValue, RunStart, RunStatus,
};
use lazarus::layout::Layout;

const CALLS_PER_WRITER: u64 = 2_000;
const METRICS_PER_CALL: usize = 8;
const QUERY_RUNS: usize = 1_000;
const ROUNDS: usize = 3;

fn start(seed: usize) -> RunStart {
    RunStart {
        experiment: "bench".into(),
        dataset: "toy".into(),
        encoder_fingerprint: "fp".into(),
        config_hash: format!("config-{seed}"),
        params: vec![
            (
                "head".into(),
                ParamValue::Text(["linear", "mlp"][seed % 2].into()),
            ),
            (
                "lr".into(),
                ParamValue::Number([1e-3, 1e-2, 1e-1][seed % 3]),
            ),
            ("seed".into(), ParamValue::Number(seed as f64)),
        ],
        tags: vec![],
    }
}

/// Calls per second over all writers.
fn logging_round(writers: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = Layout::new(dir.path());
    drop(ExperimentsDb::open(&layout).expect("database opens"));
    let names: Vec<String> = (0..METRICS_PER_CALL)
        .map(|m| format!("metric_{m}"))
        .collect();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for writer in 0..writers {
            let layout = layout.clone();
            let names = &names;
            scope.spawn(move || {
                let db = ExperimentsDb::open(&layout).expect("database opens");
                let run = db.start_run(start(writer)).expect("run starts");
                for step in 0..CALLS_PER_WRITER {
                    let metrics: Vec<(&str, f64)> =
                        names.iter().map(|n| (n.as_str(), step as f64)).collect();
                    run.log_metrics(step, &metrics).expect("metrics logged");
                }
                run.finish(RunStatus::Finished, &[("val_accuracy", 0.5)])
                    .expect("run finishes");
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let db = ExperimentsDb::open(&layout).expect("database opens");
    let runs = db.list_runs(&Default::default()).expect("runs listed");
    assert_eq!(runs.len(), writers);
    (writers as u64 * CALLS_PER_WRITER) as f64 / elapsed
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    for writers in [1, 4] {
        let rounds: Vec<f64> = (0..ROUNDS).map(|_| logging_round(writers)).collect();
        println!(
            "log_metrics, {writers} writer(s), {METRICS_PER_CALL} metrics per call: median {:.0} calls/s ({:.0} metric rows/s), rounds {:?}",
            median(rounds.clone()),
            median(rounds.clone()) * METRICS_PER_CALL as f64,
            rounds.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let db = ExperimentsDb::open(&Layout::new(dir.path())).expect("database opens");
    for seed in 0..QUERY_RUNS {
        let run = db.start_run(start(seed)).expect("run starts");
        let value = 0.5 + (seed % 17) as f64 / 100.0;
        run.finish(
            RunStatus::Finished,
            &[("val/accuracy", value), ("val/loss", 1.0 - value)],
        )
        .expect("run finishes");
    }
    let ablate = AblationQuery {
        by: vec!["head".into(), "lr".into()],
        metric: "val/accuracy".into(),
        wheres: vec![],
        baseline: None,
    };
    let best = BestQuery {
        metric: "val/loss".into(),
        wheres: vec![],
        top: 5,
    };
    let mut ablate_ms = Vec::new();
    let mut best_ms = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let report = db.ablate(&ablate).expect("ablation");
        ablate_ms.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(report.rows.iter().map(|r| r.n).sum::<usize>(), QUERY_RUNS);
        let started = Instant::now();
        db.best_runs(&best).expect("best");
        best_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "ablate --by head,lr over {QUERY_RUNS} runs: median {:.1} ms; best --top 5: median {:.1} ms",
        median(ablate_ms),
        median(best_ms)
    );
}
