//! `lazarus sweep` through the CLI on synthetic features: 24 heads in one
//! pass, each equal to the same config trained alone; finished configs are
//! skipped; a killed sweep resumes; concurrent `train` processes lose no
//! rows in experiments.db.

use crate::support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Synthetic, fails, json, lazarus, ok, synthetic_features};

const SPEC: Synthetic = Synthetic {
    name: "toy",
    counts: &[150, 150, 150],
    dim: 16,
    separation: 1.2,
};

fn write_sweep(root: &Path, epochs: usize) -> String {
    let path = root.join("sweep.toml");
    std::fs::write(
        &path,
        format!(
            r#"
name = "toy-heads"
dataset = "toy"
encoder = "toy-encoder"
epochs = {epochs}
batch_size = 32
[grid]
head = ["linear", "mlp"]
lr = [0.001, 0.003, 0.01]
class_weights = ["none", "balanced"]
seed = [0, 1]
"#
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn count(root: &Path, sql: &str) -> i64 {
    let db = rusqlite::Connection::open(root.join("experiments/experiments.db")).unwrap();
    db.query_row(sql, [], |row| row.get(0)).unwrap()
}

#[test]
fn sweep_trains_24_heads_in_one_pass_equal_to_training_each_alone() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("sweep");
    synthetic_features(&root, &SPEC);
    let file = write_sweep(&root, 4);
    let outcome = json(&ok(lazarus(&root, &["sweep", &file, "--json"])));
    let trained = outcome["trained"].as_array().unwrap();
    assert_eq!(trained.len(), 24, "{outcome:#}");
    assert_eq!(outcome["passes"], 1);
    assert_eq!(
        count(&root, "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"),
        24
    );
    for chart in outcome["charts"].as_array().unwrap() {
        assert!(Path::new(chart.as_str().unwrap()).is_file(), "{chart}");
    }

    // Two heads trained alone, in another root, with the same settings.
    let alone_root = temp.path().join("alone");
    synthetic_features(&alone_root, &SPEC);
    for (head, lr, weights, seed) in [
        ("mlp", "0.003", "balanced", "1"),
        ("linear", "0.01", "none", "0"),
    ] {
        let alone = json(&ok(lazarus(
            &alone_root,
            &[
                "train",
                "--dataset",
                "toy",
                "--encoder",
                "toy-encoder",
                "--head",
                head,
                "--lr",
                lr,
                "--class-weights",
                weights,
                "--seed",
                seed,
                "--epochs",
                "4",
                "--batch-size",
                "32",
                "--json",
            ],
        )));
        let in_sweep = trained
            .iter()
            .find(|r| r["config_hash"] == alone["config_hash"])
            .unwrap_or_else(|| panic!("no sweep run with config hash {}", alone["config_hash"]));
        assert_eq!(
            in_sweep["test"], alone["test"],
            "{head} lr {lr} {weights} seed {seed}"
        );
        assert_eq!(in_sweep["epochs"], alone["epochs"]);
    }

    // Running it again skips every finished config.
    let again = json(&ok(lazarus(&root, &["sweep", &file, "--json"])));
    assert_eq!(again["trained"].as_array().unwrap().len(), 0);
    assert_eq!(again["skipped"].as_array().unwrap().len(), 24);

    // The ablation table reads the sweep's runs: 2 seeds per level.
    let table = json(&ok(lazarus(
        &root,
        &[
            "experiments",
            "ablate",
            "--by",
            "head",
            "--metric",
            "test/accuracy",
            "--json",
        ],
    )));
    for row in table["rows"].as_array().unwrap() {
        assert_eq!(row["n"], 12, "{table:#}");
    }

    // Bad sweep files name the problem.
    std::fs::write(
        root.join("bad.toml"),
        "name = \"x\"\ndataset = \"toy\"\nencoder = \"toy-encoder\"\n[grid]\nlearning_rate = [1]\n",
    )
    .unwrap();
    let message = fails(lazarus(
        &root,
        &["sweep", root.join("bad.toml").to_str().unwrap()],
    ));
    assert!(
        message.contains("unknown grid key `learning_rate`"),
        "{message}"
    );
}

#[test]
fn killed_sweep_resumes_and_finishes_every_head() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    synthetic_features(root, &SPEC);
    let file = write_sweep(root, 30);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .arg("--root")
        .arg(root)
        .args(["sweep", &file, "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 once some head has checkpointed a few epochs.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep finished before the kill"
        );
        let checkpointed = std::fs::read_dir(root.join("experiments/runs"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .any(|run| run.path().join("checkpoints/epoch-0003.json").exists());
        if checkpointed {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let resumed = json(&ok(lazarus(root, &["sweep", &file, "--json"])));
    let trained = resumed["trained"].as_array().unwrap();
    assert!(
        trained
            .iter()
            .any(|r| r["resumed_from_epoch"].as_u64().unwrap() >= 3),
        "no head resumed from its checkpoint"
    );
    assert_eq!(
        count(root, "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"),
        24
    );
    assert_eq!(
        count(root, "SELECT COUNT(*) FROM runs"),
        24,
        "a killed run was started anew"
    );
    // Every epoch of every head is logged exactly once.
    assert_eq!(
        count(
            root,
            "SELECT COUNT(*) FROM (SELECT run_id, step FROM metrics \
             WHERE key = 'val/accuracy' GROUP BY run_id, step)"
        ),
        24 * 30
    );
}

#[test]
fn concurrent_train_processes_lose_no_rows() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    synthetic_features(root, &SPEC);
    let children: Vec<_> = (0..4)
        .map(|seed| {
            Command::new(env!("CARGO_BIN_EXE_lazarus"))
                .arg("--root")
                .arg(root)
                .args([
                    "train",
                    "--dataset",
                    "toy",
                    "--encoder",
                    "toy-encoder",
                    "--epochs",
                    "6",
                    "--batch-size",
                    "16",
                    "--json",
                    "--seed",
                ])
                .arg(seed.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut per_epoch_keys = 0;
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report = json(&String::from_utf8_lossy(&output.stdout));
        per_epoch_keys = report["epochs"][0].as_object().unwrap().len() as i64;
    }
    assert_eq!(
        count(root, "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"),
        4
    );
    assert_eq!(
        count(root, "SELECT COUNT(*) FROM metrics"),
        4 * 6 * per_epoch_keys
    );
    assert!(count(root, "SELECT COUNT(*) FROM summary_metrics") >= 4 * 10);
}

#[test]
fn a_sweep_file_can_set_every_train_option() {
    // The options of `lazarus train`, as clap lists them in its help: a
    // flag added to `train` without a sweep key fails here.
    let temp = tempfile::tempdir().unwrap();
    let help = ok(lazarus(temp.path(), &["train", "--help"]));
    let mut flags: Vec<String> = Vec::new();
    for line in help.lines() {
        let line = line.trim_start();
        let option = if let Some(rest) = line.strip_prefix("--") {
            rest
        } else if line.starts_with('-') && line.get(2..6) == Some(", --") {
            &line[6..]
        } else {
            continue;
        };
        let name: String = option
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        flags.push(name);
    }
    for expected in ["memory-budget", "step-gamma", "normal-label", "init-from"] {
        assert!(flags.iter().any(|f| f == expected), "{flags:?}\n{help}");
    }
    // The flags of one invocation: `lazarus sweep` takes --device, --json
    // and --allow-partial itself, and its `name` is the experiment; --root,
    // --queue and --version are every verb's.
    let invocation = [
        "help",
        "version",
        "root",
        "queue",
        "resume",
        "device",
        "json",
        "experiment",
        "allow-partial",
    ];
    let known = lazarus::runs::sweep_file::KNOWN_SETTINGS;
    for flag in flags.iter().filter(|f| !invocation.contains(&f.as_str())) {
        let key = flag.replace('-', "_");
        assert!(
            known.contains(&key.as_str()),
            "train --{flag} has no sweep key `{key}`"
        );
    }

    // Those settings take effect, with train's defaults and units, fixed or
    // as grid axes.
    use lazarus::train::config::ClassWeights;
    use lazarus::train::schedule::Schedule;
    let parse = |text: &str| {
        lazarus::runs::sweep_file::parse(
            Path::new("s.toml"),
            &format!("name = \"s\"\ndataset = \"d\"\nencoder = \"e\"\n{text}"),
        )
        .unwrap()
    };
    let defaults = parse("schedule = \"plateau\"\n");
    let point = &defaults.points[0];
    assert_eq!(
        point.config.schedule,
        Schedule::ReduceOnPlateau {
            patience: 3,
            factor: 0.1
        }
    );
    assert_eq!(point.config.memory_budget_bytes, 4 << 30);
    assert_eq!(point.config.checkpoint_every, 1);
    assert_eq!(point.config.init_from, None);
    assert_eq!(point.fingerprint, None);
    assert!(point.pooled.is_any());
    let set = parse(
        "schedule = \"step\"\nstep_epochs = 4\nmemory_budget = \"1GiB\"\n\
         checkpoint_every = 2\ninit_from = \"run-a\"\nfingerprint = \"abc\"\n\
         class_weights = \"weights.csv\"\nlayers = \"all\"\nimage_size = 300\nresize = \"stretch\"\n[grid]\nstep_gamma = [0.5, 0.25]\n",
    );
    assert_eq!(set.points.len(), 2);
    for (point, gamma) in set.points.iter().zip([0.5, 0.25]) {
        assert_eq!(
            point.config.schedule,
            Schedule::Step {
                every_epochs: 4,
                gamma
            }
        );
        assert_eq!(point.config.memory_budget_bytes, 1 << 30);
        assert_eq!(point.config.checkpoint_every, 2);
        assert_eq!(point.config.init_from.as_deref(), Some("run-a"));
        assert_eq!(point.fingerprint.as_deref(), Some("abc"));
        // Canonical, as enqueue names the folder's layers.
        assert_eq!(point.pooled.layers.as_deref(), Some("1,2,3,4,5,6,7,head"));
        assert_eq!(point.pooled.image_size, Some(300));
        assert_eq!(point.pooled.resize.as_deref(), Some("stretch"));
        assert_eq!(
            point.class_weights_file.as_deref(),
            Some(Path::new("weights.csv"))
        );
        assert_eq!(point.config.class_weights, ClassWeights::None);
    }
    // Bytes as a number still read as bytes; a unit train refuses, sweeps refuse.
    assert_eq!(
        parse("memory_budget = 1048576\n").points[0]
            .config
            .memory_budget_bytes,
        1 << 20
    );
    let error = lazarus::runs::sweep_file::parse(
        Path::new("s.toml"),
        "name = \"s\"\ndataset = \"d\"\nencoder = \"e\"\nmemory_budget = \"1GB\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("unknown memory unit"), "{error}");
}

#[test]
fn the_maps_key_is_a_grid_axis_of_spatial_runs_only() {
    let parse = |text: &str| {
        lazarus::runs::sweep_file::parse(
            Path::new("s.toml"),
            &format!("name = \"s\"\ndataset = \"d\"\nencoder = \"e\"\n{text}"),
        )
    };
    let sweep = parse("task = \"segment\"\n[grid]\nmaps = [\"16,32\", \"32,8,4,16\"]\n").unwrap();
    let maps: Vec<Option<&str>> = sweep
        .points
        .iter()
        .map(|point| point.pooled.maps.as_deref())
        .collect();
    // Canonical, as enqueue names the folder's maps.
    assert_eq!(maps, [Some("16,32"), Some("4,8,16,32")]);
    let error = parse("maps = \"4,8\"\n").unwrap_err().to_string();
    assert!(
        error.contains("maps '4,8'") && error.contains("spatial"),
        "{error}"
    );
    let error = parse("task = \"segment\"\nmaps = \"4,5\"\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("'4,5'"), "{error}");
}
