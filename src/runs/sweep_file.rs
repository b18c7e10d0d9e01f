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

use crate::train::TrainError;
use crate::train::anomaly::patch::{self, PatchConfig};
use crate::train::anomaly::{AnomalyConfig, Coreset, DEFAULT_K, Scorer};
use crate::train::config::{
    Activation, ClassWeights, EarlyStopping, HeadConfig, Optimizer, Precision, Sampler, Task,
    TrainConfig,
};
use crate::train::schedule::Schedule;

/// Settings a sweep may fix, list or sample: every setting of `lazarus
/// train` (the flag's name with `_` for `-`), with the same defaults and
/// units. Only the flags of one invocation are not settings: `--resume`,
/// and what `lazarus sweep` takes itself (`--device`, `--json`,
/// `--allow-partial`, and `--experiment`, which is the sweep's `name`).
pub const KNOWN_SETTINGS: &[&str] = &[
    "dataset",
    "encoder",
    "fingerprint",
    "init_from",
    "head",
    "hidden",
    "dropout",
    "activation",
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "schedule",
    "warmup_steps",
    "step_epochs",
    "step_gamma",
    "plateau_patience",
    "plateau_factor",
    "batch_size",
    "precision",
    "class_weights",
    "sampler",
    "epochs",
    "seed",
    "label_smoothing",
    "monitor",
    "patience",
    "clip_grad_norm",
    "memory_budget",
    "checkpoint_every",
    "task",
    "normal_label",
    "anomaly_label",
    "scorer",
    "k",
    "coreset",
    "spatial",
    "channels",
    "heatmap_sigma",
];

/// Settings that only anomaly points (`task = "anomaly"`) use.
const ANOMALY_SETTINGS: &[&str] = &[
    "normal_label",
    "anomaly_label",
    "scorer",
    "k",
    "coreset",
    "spatial",
    "channels",
    "heatmap_sigma",
];

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

/// Builds one head's config from its settings (defaults for the rest).
fn point(settings: &BTreeMap<String, Value>) -> Result<SweepPoint, String> {
    let text = |key: &str| -> Result<Option<String>, String> {
        settings
            .get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{key} must be a string, got {v}"))
            })
            .transpose()
    };
    let number = |key: &str| -> Result<Option<f64>, String> {
        settings
            .get(key)
            .map(|v| {
                v.as_float()
                    .or_else(|| v.as_integer().map(|i| i as f64))
                    .ok_or_else(|| format!("{key} must be a number, got {v}"))
            })
            .transpose()
    };
    let count = |key: &str| -> Result<Option<usize>, String> {
        settings
            .get(key)
            .map(|v| {
                v.as_integer()
                    .filter(|&i| i >= 0)
                    .map(|i| i as usize)
                    .ok_or_else(|| format!("{key} must be a whole number, got {v}"))
            })
            .transpose()
    };
    let one_of = |key: &str, allowed: &[&str]| -> Result<Option<String>, String> {
        match text(key)? {
            Some(v) if !allowed.contains(&v.as_str()) => Err(format!(
                "{key} = {v:?} is not one of {}",
                allowed.join(", ")
            )),
            other => Ok(other),
        }
    };
    let dataset = text("dataset")?.ok_or("no dataset")?;
    let encoder = text("encoder")?.ok_or("no encoder")?;
    let mut config = TrainConfig::default();
    let hidden = match settings.get("hidden") {
        None => vec![256],
        Some(Value::Integer(n)) if *n > 0 => vec![*n as usize],
        Some(Value::Array(sizes)) => sizes
            .iter()
            .map(|s| {
                s.as_integer()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("hidden sizes must be positive integers, got {s}"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "hidden must be a size or a list of sizes, got {other}"
            ));
        }
    };
    config.head = match one_of("head", &["linear", "mlp"])?.as_deref() {
        None | Some("linear") => HeadConfig::Linear,
        _ => HeadConfig::Mlp {
            hidden,
            dropout: number("dropout")?.unwrap_or(0.0),
            activation: match one_of("activation", &["relu", "gelu"])?.as_deref() {
                Some("gelu") => Activation::Gelu,
                _ => Activation::Relu,
            },
        },
    };
    if let Some(v) = count("epochs")? {
        config.epochs = v;
    }
    if let Some(v) = number("lr")? {
        config.learning_rate = v;
    }
    if let Some(v) = number("weight_decay")? {
        config.weight_decay = v;
    }
    if let Some(v) = one_of("optimizer", &["adamw", "sgd"])? {
        config.optimizer = if v == "sgd" {
            Optimizer::Sgd {
                momentum: number("momentum")?.unwrap_or(0.9),
            }
        } else {
            Optimizer::AdamW
        };
    }
    if let Some(v) = one_of("schedule", &["constant", "cosine", "step", "plateau"])? {
        config.schedule = match v.as_str() {
            "cosine" => Schedule::Cosine {
                warmup_steps: count("warmup_steps")?.unwrap_or(0),
            },
            // The defaults of `train --step-epochs`, `--step-gamma`,
            // `--plateau-patience` and `--plateau-factor`.
            "step" => Schedule::Step {
                every_epochs: count("step_epochs")?.unwrap_or(10),
                gamma: number("step_gamma")?.unwrap_or(0.1),
            },
            "plateau" => Schedule::ReduceOnPlateau {
                patience: count("plateau_patience")?.unwrap_or(3),
                factor: number("plateau_factor")?.unwrap_or(0.1),
            },
            _ => Schedule::Constant,
        };
    }
    if let Some(v) = count("batch_size")? {
        config.batch_size = v;
    }
    if let Some(v) = text("precision")? {
        config.precision = Precision::parse(&v).map_err(|e| e.to_string())?;
    }
    // none, balanced, or a file of class,weight lines or a JSON object, as
    // `train --class-weights`.
    let mut class_weights_file = None;
    match text("class_weights")?.as_deref() {
        None | Some("none") => config.class_weights = ClassWeights::None,
        Some("balanced") => config.class_weights = ClassWeights::Balanced,
        Some(file) => class_weights_file = Some(PathBuf::from(file)),
    }
    if let Some(v) = one_of("sampler", &["uniform", "balanced"])? {
        config.sampler = if v == "balanced" {
            Sampler::Balanced
        } else {
            Sampler::Uniform
        };
    }
    if let Some(v) = count("seed")? {
        config.seed = v as u64;
    }
    if let Some(v) = number("label_smoothing")? {
        config.label_smoothing = v;
    }
    if let Some(v) = text("monitor")? {
        config.monitor = v;
    }
    if let Some(v) = count("patience")? {
        config.early_stopping = Some(EarlyStopping { patience: v });
    }
    config.gradient_clip = number("clip_grad_norm")?;
    // Bytes as a whole number, or a size with its unit as `train
    // --memory-budget` takes it ("1GiB", "512MiB").
    match settings.get("memory_budget") {
        None => {}
        Some(Value::Integer(bytes)) if *bytes > 0 => config.memory_budget_bytes = *bytes as u64,
        Some(Value::String(size)) => config.memory_budget_bytes = crate::memory::parse_bytes(size)?,
        Some(other) => {
            return Err(format!(
                "memory_budget must be a size such as \"1GiB\" or a number of bytes, got {other}"
            ));
        }
    }
    if let Some(v) = count("checkpoint_every")? {
        config.checkpoint_every = v;
    }
    config.init_from = text("init_from")?;
    let task = one_of("task", &["classify", "anomaly", "segment"])?;
    if task.as_deref() == Some("anomaly") {
        config.task = Task::Anomaly;
        config.anomaly = Some(anomaly_point(settings)?);
    } else if settings.get("task").is_none()
        && let Some(key) = ANOMALY_SETTINGS.iter().find(|k| settings.contains_key(**k))
    {
        // Without any task, anomaly settings mean a forgotten task = "anomaly";
        // with a grid over task, other points leave them aside.
        return Err(format!(
            "{key} applies to task = \"anomaly\" only (add task = \"anomaly\")"
        ));
    } else if task.as_deref() == Some("segment") {
        config.task = Task::Segment;
        if text("monitor")?.is_none() {
            config.monitor = "val/dice".into();
        }
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(SweepPoint {
        dataset,
        encoder,
        fingerprint: text("fingerprint")?,
        class_weights_file,
        config,
        params: settings.clone(),
    })
}

/// The anomaly settings of a point: labels as a string (comma-separated) or
/// a list; `k` and `coreset` apply to the knn scorer and are ignored by
/// mahalanobis points (a grid over k gives one mahalanobis run).
fn anomaly_point(settings: &BTreeMap<String, Value>) -> Result<AnomalyConfig, String> {
    let labels = |key: &str| -> Result<Vec<String>, String> {
        match settings.get(key) {
            None => Ok(Vec::new()),
            Some(Value::String(text)) => {
                Ok(text.split(',').map(|l| l.trim().to_string()).collect())
            }
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("{key} must be class names, got {item}"))
                })
                .collect(),
            Some(other) => Err(format!("{key} must be a class name or a list, got {other}")),
        }
    };
    let scorer = match settings.get("scorer") {
        None => "knn",
        Some(v) => v
            .as_str()
            .ok_or_else(|| format!("scorer must be a string, got {v}"))?,
    };
    let spatial = match settings.get("spatial") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| format!("spatial must be true or false, got {v}"))?,
    };
    if !spatial
        && let Some(key) = ["channels", "heatmap_sigma"]
            .iter()
            .find(|k| settings.contains_key(**k))
    {
        return Err(format!(
            "{key} applies to spatial = true anomaly points only"
        ));
    }
    let scorer = match scorer {
        "knn" => Scorer::Knn {
            k: match settings.get("k") {
                None if spatial => patch::DEFAULT_PATCH_K,
                None => DEFAULT_K,
                Some(v) => v
                    .as_integer()
                    .filter(|&k| k >= 1)
                    .map(|k| k as usize)
                    .ok_or_else(|| format!("k must be a whole number of at least 1, got {v}"))?,
            },
            coreset: match settings.get("coreset") {
                None => None,
                Some(Value::Float(f)) => Some(Coreset::Fraction(*f)),
                Some(Value::Integer(n)) if *n >= 1 => Some(Coreset::Count(*n as usize)),
                Some(other) => {
                    return Err(format!(
                        "coreset must be a fraction such as 0.1 or a row count such as 200, got {other}"
                    ));
                }
            },
        },
        "mahalanobis" => Scorer::Mahalanobis,
        other => return Err(format!("scorer = {other:?} is not one of knn, mahalanobis")),
    };
    let normal_labels = labels("normal_label")?;
    if normal_labels.is_empty() {
        return Err("task = \"anomaly\" needs normal_label (the normal class or classes)".into());
    }
    let patch = if spatial {
        Some(PatchConfig {
            channels: match settings.get("channels") {
                None => patch::default_channels(&scorer),
                Some(Value::String(text)) if text == "all" => None,
                Some(Value::Integer(n)) if *n >= 1 => Some(*n as usize),
                Some(other) => {
                    return Err(format!(
                        "channels must be a number of channels or \"all\", got {other}"
                    ));
                }
            },
            heatmap_sigma: match settings.get("heatmap_sigma") {
                None => patch::DEFAULT_HEATMAP_SIGMA,
                Some(v) => v
                    .as_float()
                    .or_else(|| v.as_integer().map(|i| i as f64))
                    .ok_or_else(|| format!("heatmap_sigma must be a number, got {v}"))?,
            },
        })
    } else {
        None
    };
    Ok(AnomalyConfig {
        normal_labels,
        anomaly_labels: labels("anomaly_label")?,
        scorer,
        patch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let first = sweep.points[0].config.anomaly.as_ref().unwrap();
        assert_eq!(first.normal_labels, ["0.0"]);
        assert_eq!(first.anomaly_labels, ["1.0"]);
        assert_eq!(
            first.scorer,
            Scorer::Knn {
                k: 1,
                coreset: None
            }
        );
        assert_eq!(sweep.points[0].config.task, Task::Anomaly);
        // k does not change a mahalanobis point: one config hash for both.
        let hashes: std::collections::BTreeSet<String> = sweep
            .points
            .iter()
            .filter(|p| p.config.anomaly.as_ref().unwrap().scorer == Scorer::Mahalanobis)
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
        assert_eq!(mixed.points[0].config.task, Task::Classify);
        assert_eq!(mixed.points[0].config.anomaly, None);
        assert_eq!(mixed.points[1].config.task, Task::Anomaly);
    }
}
