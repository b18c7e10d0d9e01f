//! Sweep files (`lazarus sweep configs/NAME.toml`): fixed settings, a grid
//! and optional random samples, expanded into one `TrainConfig` per head.
//!
//! ```toml
//! name = "elpv-heads"
//! dataset = "elpv"
//! encoder = "efficientnet-lite0"
//! epochs = 20
//! [grid]
//! head = ["linear", "mlp"]
//! lr = [0.001, 0.003, 0.01]
//! class_weights = ["none", "balanced"]
//! seed = [0, 1]
//! [random]            # optional: samples drawn per grid point
//! samples = 4
//! seed = 0
//! weight_decay = { log_uniform = [1e-6, 1e-2] }
//! dropout = { uniform = [0.0, 0.5] }
//! [label_map]         # optional: rename or merge classes
//! "0.0" = "normal"
//! ```
//!
//! Every setting may be fixed at the top level, listed in `[grid]`, or drawn
//! in `[random]`; `dataset` and `encoder` may be grid axes too (heads on
//! different feature sets train in separate passes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use toml::Value;

pub use super::settings::KNOWN_SETTINGS;
use super::settings::{Source, TrainSettings, train_settings};
use crate::train::TrainError;
use crate::train::config::TrainConfig;

/// Keys of the file besides settings.
const KNOWN_SECTIONS: &[&str] = &["name", "grid", "random", "label_map"];

/// One head of a sweep: where it trains and how.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    pub dataset: String,
    pub encoder: String,
    /// The feature folder (`fingerprint`); found by dataset and encoder
    /// when None, as `train` finds it.
    pub fingerprint: Option<String>,
    /// Only pooled features of these options (`layers`, `image_size`,
    /// `resize`).
    pub pooled: crate::features::catalog::PooledChoice,
    /// `class_weights = "FILE"`: read against the classes once the data is
    /// loaded; it then replaces `config.class_weights`.
    pub class_weights_file: Option<PathBuf>,
    pub config: TrainConfig,
    /// The settings as given (grid and random values included), for the
    /// experiments database's params table.
    pub params: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    pub name: String,
    pub points: Vec<SweepPoint>,
    /// Class renames or merges applied before training.
    pub label_map: BTreeMap<String, String>,
}

impl Sweep {
    /// The metric the sweep's chart plots when the user names none:
    /// `test/roc_auc` when every head is an anomaly scorer, else
    /// `test/accuracy`.
    pub fn default_chart_metric(&self) -> &'static str {
        let all_anomaly = self
            .points
            .iter()
            .all(|point| point.config.task == crate::train::config::Task::Anomaly);
        if all_anomaly {
            "test/roc_auc"
        } else {
            "test/accuracy"
        }
    }
}

fn invalid(path: &Path, message: String) -> TrainError {
    TrainError::Invalid(format!("sweep file {}: {message}", path.display()))
}

/// Reads and expands a sweep file.
pub fn read(path: &Path) -> Result<Sweep, TrainError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(path, format!("cannot read it: {e}")))?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Sweep, TrainError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| invalid(path, e.to_string()))?;
    let known = || {
        format!(
            "{}, {}",
            KNOWN_SECTIONS.join(", "),
            KNOWN_SETTINGS.join(", ")
        )
    };
    let mut fixed = BTreeMap::new();
    let mut grid: Vec<(String, Vec<Value>)> = Vec::new();
    let mut random: Option<toml::Table> = None;
    let mut label_map = BTreeMap::new();
    let mut name = None;
    for (key, value) in table {
        match key.as_str() {
            "name" => {
                name = Some(
                    value
                        .as_str()
                        .ok_or_else(|| invalid(path, "name must be a string".into()))?
                        .to_string(),
                )
            }
            "grid" => {
                let axes = value
                    .as_table()
                    .ok_or_else(|| invalid(path, "[grid] must be a table".into()))?;
                if axes.is_empty() {
                    return Err(invalid(path, "[grid] is empty".into()));
                }
                for (axis, values) in axes {
                    if !KNOWN_SETTINGS.contains(&axis.as_str()) {
                        return Err(invalid(
                            path,
                            format!(
                                "unknown grid key `{axis}`; known: {}",
                                KNOWN_SETTINGS.join(", ")
                            ),
                        ));
                    }
                    let values = values.as_array().ok_or_else(|| {
                        invalid(path, format!("grid.{axis} must be a list of values"))
                    })?;
                    if values.is_empty() {
                        return Err(invalid(path, format!("grid.{axis} is an empty list")));
                    }
                    grid.push((axis.clone(), values.clone()));
                }
            }
            "random" => {
                random = Some(
                    value
                        .as_table()
                        .ok_or_else(|| invalid(path, "[random] must be a table".into()))?
                        .clone(),
                )
            }
            "label_map" => {
                let map = value
                    .as_table()
                    .ok_or_else(|| invalid(path, "[label_map] must be a table".into()))?;
                for (from, to) in map {
                    let to = to.as_str().ok_or_else(|| {
                        invalid(path, format!("label_map.{from:?} must be a class name"))
                    })?;
                    label_map.insert(from.clone(), to.to_string());
                }
            }
            setting if KNOWN_SETTINGS.contains(&setting) => {
                fixed.insert(key.clone(), value);
            }
            other => {
                return Err(invalid(
                    path,
                    format!("unknown key `{other}`; known: {}", known()),
                ));
            }
        }
    }
    let name = name.ok_or_else(|| invalid(path, "no `name`".into()))?;

    // Cartesian product of the grid axes, in file order, last axis fastest.
    let mut combinations: Vec<BTreeMap<String, Value>> = vec![fixed.clone()];
    for (axis, values) in &grid {
        combinations = combinations
            .into_iter()
            .flat_map(|base| {
                values.iter().map(move |v| {
                    let mut point = base.clone();
                    point.insert(axis.clone(), v.clone());
                    point
                })
            })
            .collect();
    }
    if let Some(random) = random {
        combinations = sample_random(path, &random, combinations)?;
    }
    let mut points = Vec::with_capacity(combinations.len());
    for (index, settings) in combinations.into_iter().enumerate() {
        points.push(
            point(&settings)
                .map_err(|message| invalid(path, format!("head {}: {message}", index + 1)))?,
        );
    }
    Ok(Sweep {
        name,
        points,
        label_map,
    })
}

/// Adds `samples` random draws of the `[random]` settings to each combination.
fn sample_random(
    path: &Path,
    random: &toml::Table,
    combinations: Vec<BTreeMap<String, Value>>,
) -> Result<Vec<BTreeMap<String, Value>>, TrainError> {
    let samples = random
        .get("samples")
        .and_then(Value::as_integer)
        .filter(|&n| n > 0)
        .ok_or_else(|| invalid(path, "[random] needs samples = N (N >= 1)".into()))?;
    let seed = random.get("seed").and_then(Value::as_integer).unwrap_or(0);
    let mut rng = ChaCha8Rng::seed_from_u64(seed as u64);
    let mut out = Vec::new();
    for base in combinations {
        for _ in 0..samples {
            let mut point = base.clone();
            for (key, spec) in random {
                if key == "samples" || key == "seed" {
                    continue;
                }
                if !KNOWN_SETTINGS.contains(&key.as_str()) {
                    return Err(invalid(
                        path,
                        format!(
                            "unknown random key `{key}`; known: samples, seed, {}",
                            KNOWN_SETTINGS.join(", ")
                        ),
                    ));
                }
                point.insert(key.clone(), draw(path, key, spec, &mut rng)?);
            }
            out.push(point);
        }
    }
    Ok(out)
}

fn draw(path: &Path, key: &str, spec: &Value, rng: &mut ChaCha8Rng) -> Result<Value, TrainError> {
    let bad = || {
        invalid(
            path,
            format!(
                "random.{key} must be {{ uniform = [lo, hi] }}, {{ log_uniform = [lo, hi] }} \
                 or {{ choice = [values] }}"
            ),
        )
    };
    let table = spec.as_table().ok_or_else(bad)?;
    let (kind, args) = table.iter().next().ok_or_else(bad)?;
    let args = args.as_array().ok_or_else(bad)?;
    let number = |v: &Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
    match kind.as_str() {
        "choice" if !args.is_empty() => Ok(args[rng.random_range(0..args.len())].clone()),
        "uniform" | "log_uniform" if args.len() == 2 => {
            let (lo, hi) = (
                number(&args[0]).ok_or_else(bad)?,
                number(&args[1]).ok_or_else(bad)?,
            );
            if !lo.is_finite() || !hi.is_finite() || lo > hi || (kind == "log_uniform" && lo <= 0.0)
            {
                return Err(bad());
            }
            let u: f64 = rng.random();
            Ok(Value::Float(if kind == "uniform" {
                lo + u * (hi - lo)
            } else {
                (lo.ln() + u * (hi.ln() - lo.ln())).exp()
            }))
        }
        _ => Err(bad()),
    }
}

/// One head of the sweep from its settings (train's defaults for the rest).
fn point(settings: &BTreeMap<String, Value>) -> Result<SweepPoint, String> {
    let text = |key: &str| match settings.get(key) {
        None => Err(format!("no {key}")),
        Some(v) => v
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{key} must be a string, got {v}")),
    };
    let dataset = text("dataset")?;
    let encoder = text("encoder")?;
    let TrainSettings {
        config,
        fingerprint,
        pooled,
        class_weights_file,
    } = train_settings(settings, Source::SweepFile)?;
    Ok(SweepPoint {
        dataset,
        encoder,
        fingerprint,
        pooled,
        class_weights_file,
        config,
        params: settings.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::anomaly::Scorer;
    use crate::train::config::{ClassWeights, HeadConfig, Task, TaskConfig};

    const ISSUE_EXAMPLE: &str = r#"
        name = "elpv-heads"
        dataset = "elpv"
        encoder = "efficientnet-lite0"
        epochs = 20
        [grid]
        head = ["linear", "mlp"]
        lr = [0.001, 0.003, 0.01]
        class_weights = ["none", "balanced"]
        seed = [0, 1]
    "#;

    #[test]
    fn every_sweep_file_in_configs_reads() {
        // The demo runs most of them; the rest (blobs-segment) would rot
        // unseen without this.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut read_files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let sweep = read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!sweep.points.is_empty(), "{}", path.display());
                read_files += 1;
            }
        }
        assert!(
            read_files >= 10,
            "{read_files} sweep files under {}",
            dir.display()
        );
        let blobs = read(&dir.join("blobs-segment.toml")).unwrap();
        assert_eq!(blobs.points.len(), 3);
        assert_eq!(blobs.points[0].config.task.kind(), Task::Segment);
    }

    #[test]
    fn the_issue_example_expands_to_24_heads() {
        let sweep = parse(Path::new("s.toml"), ISSUE_EXAMPLE).unwrap();
        assert_eq!(sweep.name, "elpv-heads");
        assert_eq!(sweep.points.len(), 24);
        let first = &sweep.points[0];
        assert_eq!(first.dataset, "elpv");
        assert_eq!(first.config.head, HeadConfig::Linear);
        assert_eq!(first.config.epochs, 20);
        assert_eq!(first.config.learning_rate, 0.001);
        assert_eq!(first.config.seed, 0);
        // Seed is the last axis: it varies fastest.
        assert_eq!(sweep.points[1].config.seed, 1);
        assert!(matches!(
            sweep.points[23].config.head,
            HeadConfig::Mlp { .. }
        ));
        assert_eq!(
            sweep.points[23].config.class_weights,
            ClassWeights::Balanced
        );
        let hashes: std::collections::BTreeSet<String> = sweep
            .points
            .iter()
            .map(|p| p.config.config_hash("elpv", "fp"))
            .collect();
        assert_eq!(hashes.len(), 24, "every head has its own config hash");
    }

    #[test]
    fn unknown_keys_and_empty_grids_are_refused_with_what_is_known() {
        let error = parse(
            Path::new("s.toml"),
            "name = \"x\"\ndataset = \"d\"\nencoder = \"e\"\nlearning_rate = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("unknown key `learning_rate`") && error.contains("lr"),
            "{error}"
        );
        let error = parse(Path::new("s.toml"), "name = \"x\"\n[grid]\nlr = []\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("grid.lr is an empty list"), "{error}");
        let error = parse(Path::new("s.toml"), "name = \"x\"\n[grid]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("[grid] is empty"), "{error}");
        let error = parse(
            Path::new("s.toml"),
            "name = \"x\"\ndataset = \"d\"\nencoder = \"e\"\n[grid]\nhead = [\"linear\", \"tree\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("head 2: head = \"tree\" is not one of linear, mlp"),
            "{error}"
        );
    }

    #[test]
    fn random_samples_are_seeded_and_within_range() {
        let text = r#"
            name = "r"
            dataset = "d"
            encoder = "e"
            [grid]
            head = ["linear"]
            [random]
            samples = 5
            seed = 3
            lr = { log_uniform = [0.0001, 0.1] }
        "#;
        let a = parse(Path::new("s.toml"), text).unwrap();
        let b = parse(Path::new("s.toml"), text).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.points.len(), 5);
        for p in &a.points {
            assert!((0.0001..=0.1).contains(&p.config.learning_rate));
        }
    }

    #[test]
    fn anomaly_points_read_scorer_k_and_labels() {
        let text = r#"
            name = "a"
            dataset = "d"
            encoder = "e"
            task = "anomaly"
            normal_label = "0.0"
            anomaly_label = ["1.0"]
            [grid]
            scorer = ["knn", "mahalanobis"]
            k = [1, 5]
        "#;
        let sweep = parse(Path::new("s.toml"), text).unwrap();
        assert_eq!(sweep.points.len(), 4);
        let first = sweep.points[0].config.task.anomaly().unwrap();
        assert_eq!(first.normal_labels, ["0.0"]);
        assert_eq!(first.anomaly_labels, ["1.0"]);
        assert_eq!(
            first.scorer,
            Scorer::Knn {
                k: 1,
                coreset: None
            }
        );
        assert_eq!(sweep.points[0].config.task.kind(), Task::Anomaly);
        // k does not change a mahalanobis point: one config hash for both.
        let hashes: std::collections::BTreeSet<String> = sweep
            .points
            .iter()
            .filter(|p| p.config.task.anomaly().unwrap().scorer == Scorer::Mahalanobis)
            .map(|p| p.config.config_hash("d", "f"))
            .collect();
        assert_eq!(hashes.len(), 1);

        let error = parse(
            Path::new("s.toml"),
            "name = \"x\"\ndataset = \"d\"\nencoder = \"e\"\nscorer = \"knn\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("scorer applies to task = \"anomaly\" only"),
            "{error}"
        );
        let error = parse(
            Path::new("s.toml"),
            "name = \"x\"\ndataset = \"d\"\nencoder = \"e\"\ntask = \"anomaly\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("needs normal_label"), "{error}");
        // A grid over task: classify points leave the anomaly settings aside.
        let mixed = parse(
            Path::new("s.toml"),
            "name = \"x\"\ndataset = \"d\"\nencoder = \"e\"\nnormal_label = \"ok\"\n\
             [grid]\ntask = [\"classify\", \"anomaly\"]\n",
        )
        .unwrap();
        assert_eq!(mixed.points[0].config.task, TaskConfig::Classify);
        assert_eq!(mixed.points[1].config.task.kind(), Task::Anomaly);
    }
}
