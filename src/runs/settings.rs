//! One run's settings from `train`'s flags or a sweep file's keys: the same
//! names (a flag's with `_` for `-`), defaults and units, read by one
//! builder ([`train_settings`]) into a `TrainConfig`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use toml::Value;

use crate::features::catalog::PooledChoice;
use crate::train::anomaly::patch::{self, PatchConfig};
use crate::train::anomaly::{AnomalyConfig, Coreset, DEFAULT_K, Scorer};
use crate::train::config::{
    Activation, BlocksPooling, BlocksPrecisionChoice, ClassWeights, EarlyStopping, EvalViews,
    HeadConfig, MapMix, Optimizer, Precision, Sampler, TaskConfig, TrainConfig, TrainViews,
    Unfreeze,
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
    "layers",
    "image_size",
    "resize",
    "views",
    "maps",
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
    "train_views",
    "eval_views",
    "epochs",
    "seed",
    "label_smoothing",
    "monitor",
    "patience",
    "clip_grad_norm",
    "memory_budget",
    "checkpoint_every",
    "unfreeze_from",
    "blocks_lr",
    "blocks_weight_decay",
    "blocks_drop_path",
    "blocks_precision",
    "blocks_pool",
    "mix_maps",
    "ema",
    "augment_maps",
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

/// Settings that only anomaly runs (`task = "anomaly"`) use: those after
/// `task` in [`KNOWN_SETTINGS`].
const ANOMALY_SETTINGS: &[&str] = KNOWN_SETTINGS.split_at(KNOWN_SETTINGS.len() - 8).1;

/// Where settings come from: it names them in messages (`--heatmap-sigma`
/// or `heatmap_sigma`) and decides what a setting that does not apply means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `lazarus train`'s flags: one run, so a flag that does not apply is refused.
    Flags,
    /// One point of a sweep file (fixed, grid and random values together).
    SweepFile,
}

impl Source {
    fn name(self, key: &str) -> String {
        match self {
            Source::Flags => format!("--{}", key.replace('_', "-")),
            Source::SweepFile => key.to_string(),
        }
    }
}

/// One run's settings besides its dataset and encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    pub config: TrainConfig,
    /// The feature folder (`fingerprint`); found by dataset and encoder
    /// when None.
    pub fingerprint: Option<String>,
    /// Only pooled features extracted with these options (`layers`,
    /// canonical as `PooledLayers` prints them; `image_size`; `resize`).
    pub pooled: PooledChoice,
    /// `class_weights = "FILE"`: read against the classes once the data is
    /// loaded; it then replaces `config.class_weights`.
    pub class_weights_file: Option<PathBuf>,
}

/// Builds one run's settings from `settings` (train's defaults for the
/// rest), as `source` gives them: `train`'s flags are refused where they do
/// not apply, a sweep file's keys are left aside where a grid combines them
/// with settings they do not apply to.
pub fn train_settings(
    settings: &BTreeMap<String, Value>,
    source: Source,
) -> Result<TrainSettings, String> {
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
    let task = one_of("task", &["classify", "anomaly", "segment"])?;
    let anomaly = if task.as_deref() == Some("anomaly") {
        Some(anomaly_settings(settings, source)?)
    } else {
        // Without any task, anomaly settings mean a forgotten task =
        // "anomaly"; with a grid over task, other points leave them aside.
        if (source == Source::Flags || task.is_none())
            && let Some(key) = ANOMALY_SETTINGS.iter().find(|k| settings.contains_key(**k))
        {
            return Err(match source {
                Source::Flags => format!("{} applies to --task anomaly only", source.name(key)),
                Source::SweepFile => {
                    format!("{key} applies to task = \"anomaly\" only (add task = \"anomaly\")")
                }
            });
        }
        None
    };
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
        None | Some("linear") if source == Source::Flags && settings.contains_key("dropout") => {
            return Err(
                "--dropout applies to --head mlp: a linear head has no hidden layer to drop".into(),
            );
        }
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
    // `train --task anomaly` has always stored no class weights: a scorer
    // has no loss to weight.
    if source == Source::Flags
        && anomaly.is_some()
        && text("class_weights")?.is_some_and(|v| v != "none")
    {
        return Err("--class-weights applies to --task classify and segment only".into());
    }
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
    if let Some(v) = one_of("train_views", &["sample", "first"])? {
        config.train_views = if v == "first" {
            TrainViews::First
        } else {
            TrainViews::Sample
        };
    }
    if let Some(v) = one_of("eval_views", &["mean", "first"])? {
        config.eval_views = if v == "first" {
            EvalViews::First
        } else {
            EvalViews::Mean
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
    // `augment_maps = 1` or `"1"` alike, as `views`.
    if let Some(value) = match settings.get("augment_maps") {
        Some(Value::Integer(n)) => Some(n.to_string()),
        _ => text("augment_maps")?,
    } {
        config.augment_maps = value
            .parse::<crate::encoders::ViewSet>()
            .map_err(|e| format!("augment_maps: {e}"))?;
    }
    config.unfreeze = match count("unfreeze_from")? {
        Some(after_block) => Some(Unfreeze {
            after_block,
            blocks_learning_rate: number("blocks_lr")?.unwrap_or(Unfreeze::DEFAULT_LEARNING_RATE),
            blocks_weight_decay: number("blocks_weight_decay")?
                .unwrap_or(Unfreeze::DEFAULT_WEIGHT_DECAY),
            drop_path: number("blocks_drop_path")?.unwrap_or(0.0),
            precision: text("blocks_precision")?
                .map(|text| BlocksPrecisionChoice::parse(&text).map_err(|e| e.to_string()))
                .transpose()?
                .unwrap_or_default(),
            pooling: text("blocks_pool")?
                .map(|text| BlocksPooling::parse(&text).map_err(|e| e.to_string()))
                .transpose()?
                .unwrap_or_default(),
            mix: text("mix_maps")?
                .map(|text| MapMix::parse(&text).map_err(|e| e.to_string()))
                .transpose()?
                .unwrap_or_default(),
            ema: number("ema")?.unwrap_or(0.0),
        }),
        None => {
            // A sweep's points without `unfreeze_from` leave the blocks'
            // settings aside, as a linear point leaves `dropout`.
            if source == Source::Flags
                && let Some(key) = [
                    "blocks_lr",
                    "blocks_weight_decay",
                    "blocks_drop_path",
                    "blocks_precision",
                    "blocks_pool",
                    "mix_maps",
                    "ema",
                ]
                .into_iter()
                .find(|key| settings.contains_key(*key))
            {
                return Err(format!(
                    "{} applies to --unfreeze-from K (trained encoder blocks)",
                    source.name(key)
                ));
            }
            None
        }
    };
    config.task = match (task.as_deref(), anomaly) {
        (Some("anomaly"), Some(anomaly)) => TaskConfig::Anomaly(anomaly),
        (Some("segment"), _) => {
            if text("monitor")?.is_none() {
                config.monitor = "val/dice".into();
            }
            TaskConfig::Segment
        }
        _ => TaskConfig::Classify,
    };
    config.validate().map_err(|e| e.to_string())?;
    let spatial_anomaly = config
        .task
        .anomaly()
        .is_some_and(|anomaly| anomaly.patch.is_some());
    let pooled = PooledChoice {
        layers: text("layers")?
            .map(|value| crate::encoders::PooledLayers::parse(&value).map(|l| l.to_string()))
            .transpose()
            .map_err(|e| e.to_string())?,
        image_size: count("image_size")?
            .map(|size| {
                u32::try_from(size)
                    .ok()
                    .filter(|size| *size > 0)
                    .ok_or_else(|| {
                        format!("image_size must be a positive size in pixels, got {size}")
                    })
            })
            .transpose()?,
        resize: one_of("resize", &["crop", "stretch", "pad"])?,
        // `views = 1` or `"1"` alike.
        views: match settings.get("views") {
            Some(Value::Integer(n)) => Some(n.to_string()),
            _ => text("views")?,
        }
        .map(|value| {
            value
                .parse::<crate::encoders::ViewSet>()
                .map(|views| views.name().to_string())
        })
        .transpose()
        .map_err(|e| e.to_string())?,
        maps: None,
    };
    let maps = text("maps")?
        .map(|value| crate::encoders::SpatialMaps::parse(&value).map(|maps| maps.to_string()))
        .transpose()
        .map_err(|e| e.to_string())?;
    // Fine-tuned classifiers read the cached maps their blocks continue from.
    let spatial_task = config.task == crate::train::config::Task::Segment
        || spatial_anomaly
        || config.unfreeze.is_some();
    if let Some(maps) = &maps
        && !spatial_task
    {
        return Err(format!(
            "{} '{maps}' picks spatial features; classification and image-level anomaly runs read pooled ones",
            source.name("maps")
        ));
    }
    // Spatial folders have an input square too (`enqueue --spatial
    // --image-size N`); the other pooled options do not apply to them.
    if spatial_task
        && let Some(key) = ["layers", "resize", "views"]
            .into_iter()
            .find(|key| settings.contains_key(*key))
    {
        return Err(format!(
            "{} picks pooled features; segmentation, patch-level anomaly and fine-tuned \
             (--unfreeze-from) runs read spatial ones",
            source.name(key)
        ));
    }
    Ok(TrainSettings {
        fingerprint: text("fingerprint")?,
        pooled: PooledChoice { maps, ..pooled },
        class_weights_file,
        config,
    })
}

/// The anomaly settings of a run: labels as a string (comma-separated) or
/// a list; `k` and `coreset` apply to the knn scorer: refused as flags,
/// ignored by mahalanobis points of a sweep (a grid over k gives one
/// mahalanobis run).
fn anomaly_settings(
    settings: &BTreeMap<String, Value>,
    source: Source,
) -> Result<AnomalyConfig, String> {
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
        return Err(match source {
            Source::Flags => format!(
                "{} applies to --task anomaly --spatial only",
                source.name(key)
            ),
            Source::SweepFile => format!("{key} applies to spatial = true anomaly points only"),
        });
    }
    if source == Source::Flags
        && scorer == "mahalanobis"
        && (settings.contains_key("k") || settings.contains_key("coreset"))
    {
        return Err("--k and --coreset apply to --scorer knn only".into());
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
                // `--coreset 0.1` or `--coreset 200`, as a string.
                Some(Value::String(text)) => Some(Coreset::parse(text).map_err(|e| e.to_string())?),
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
    // Flags leave this to the config's check, which names --normal-label.
    if normal_labels.is_empty() && source == Source::SweepFile {
        return Err("task = \"anomaly\" needs normal_label (the normal class or classes)".into());
    }
    let patch = if spatial {
        Some(PatchConfig {
            channels: match settings.get("channels") {
                None => patch::default_channels(&scorer),
                Some(Value::String(text)) if text == "all" => None,
                Some(Value::Integer(n)) if *n >= 1 => Some(*n as usize),
                Some(Value::String(text)) if source == Source::Flags => {
                    Some(text.parse().map_err(|e| {
                        format!("--channels {text:?}: give a number of channels or `all`: {e}")
                    })?)
                }
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

    fn settings(text: &str) -> BTreeMap<String, Value> {
        toml::from_str(text).unwrap()
    }

    fn refusal(text: &str, source: Source) -> String {
        train_settings(&settings(text), source).unwrap_err()
    }

    #[test]
    fn anomaly_settings_are_those_after_task() {
        let task = KNOWN_SETTINGS.iter().position(|k| *k == "task").unwrap();
        assert_eq!(ANOMALY_SETTINGS, &KNOWN_SETTINGS[task + 1..]);
        assert_eq!(ANOMALY_SETTINGS[0], "normal_label");
    }

    #[test]
    fn flags_that_do_not_apply_are_refused_and_sweep_points_leave_them_aside() {
        let flags = Source::Flags;
        assert_eq!(
            refusal("task = \"classify\"\nk = 5", flags),
            "--k applies to --task anomaly only"
        );
        assert_eq!(
            refusal("task = \"segment\"\nheatmap_sigma = 2.0", flags),
            "--heatmap-sigma applies to --task anomaly only"
        );
        let mahalanobis_k =
            "task = \"anomaly\"\nnormal_label = [\"ok\"]\nscorer = \"mahalanobis\"\nk = 3";
        assert_eq!(
            refusal(mahalanobis_k, flags),
            "--k and --coreset apply to --scorer knn only"
        );
        let point = train_settings(&settings(mahalanobis_k), Source::SweepFile).unwrap();
        assert_eq!(
            point.config.task.anomaly().unwrap().scorer,
            Scorer::Mahalanobis
        );
        let linear_dropout = "head = \"linear\"\ndropout = 0.1";
        assert_eq!(
            refusal(linear_dropout, flags),
            "--dropout applies to --head mlp: a linear head has no hidden layer to drop"
        );
        let point = train_settings(&settings(linear_dropout), Source::SweepFile).unwrap();
        assert_eq!(point.config.head, HeadConfig::Linear);
        assert_eq!(
            refusal(
                "task = \"anomaly\"\nnormal_label = [\"ok\"]\nchannels = \"10\"",
                flags
            ),
            "--channels applies to --task anomaly --spatial only"
        );
        assert_eq!(
            refusal(
                "task = \"anomaly\"\nnormal_label = [\"ok\"]\nclass_weights = \"balanced\"",
                flags
            ),
            "--class-weights applies to --task classify and segment only"
        );
        // Without a task key a sweep file names the task it forgot.
        assert_eq!(
            refusal("k = 5", Source::SweepFile),
            "k applies to task = \"anomaly\" only (add task = \"anomaly\")"
        );
    }

    #[test]
    fn flags_and_sweep_keys_give_the_same_config() {
        // As `train` passes them (strings for --coreset and --channels) and
        // as a sweep file writes them (numbers).
        let flags = settings(
            "task = \"anomaly\"\nnormal_label = [\"ok\"]\nspatial = true\ncoreset = \"0.1\"\n\
             channels = \"50\"\nmemory_budget = \"1GiB\"\nseed = 3",
        );
        let sweep = settings(
            "task = \"anomaly\"\nnormal_label = \"ok\"\nspatial = true\ncoreset = 0.1\n\
             channels = 50\nmemory_budget = 1073741824\nseed = 3",
        );
        let from_flags = train_settings(&flags, Source::Flags).unwrap();
        let from_sweep = train_settings(&sweep, Source::SweepFile).unwrap();
        assert_eq!(from_flags, from_sweep);
        let anomaly = from_flags.config.task.anomaly().unwrap();
        assert_eq!(anomaly.patch.as_ref().unwrap().channels, Some(50));
        assert_eq!(
            anomaly.scorer,
            Scorer::Knn {
                k: patch::DEFAULT_PATCH_K,
                coreset: Some(Coreset::Fraction(0.1))
            }
        );
        // A segmentation run's monitor defaults to val/dice from either.
        let segment = settings("task = \"segment\"");
        for source in [Source::Flags, Source::SweepFile] {
            let config = train_settings(&segment, source).unwrap().config;
            assert_eq!(config.monitor, "val/dice");
        }
    }

    #[test]
    fn unfreeze_settings_read_alike_from_flags_and_sweep_keys() {
        let text = "unfreeze_from = 10\nblocks_lr = 3e-4\nmaps = \"16\"\nschedule = \"cosine\"";
        let from_flags = train_settings(&settings(text), Source::Flags).unwrap();
        let from_sweep = train_settings(&settings(text), Source::SweepFile).unwrap();
        assert_eq!(from_flags, from_sweep);
        assert_eq!(
            from_flags.config.unfreeze,
            Some(Unfreeze {
                after_block: 10,
                blocks_learning_rate: 3e-4,
                blocks_weight_decay: Unfreeze::DEFAULT_WEIGHT_DECAY,
                drop_path: 0.0,
                precision: BlocksPrecisionChoice::F32,
                pooling: BlocksPooling::Mean,
                mix: MapMix::None,
                ema: 0.0,
            })
        );
        // Fine-tuned runs read spatial folders: `maps` picks one.
        assert_eq!(from_flags.pooled.maps.as_deref(), Some("16"));
        assert_eq!(
            refusal("unfreeze_from = 10\nlayers = \"all\"", Source::Flags),
            "--layers picks pooled features; segmentation, patch-level anomaly and fine-tuned \
             (--unfreeze-from) runs read spatial ones"
        );
        // The blocks' settings without blocks: refused as flags, left aside
        // by a sweep's points (a grid over unfreeze_from and none).
        assert_eq!(
            refusal("blocks_weight_decay = 0.1", Source::Flags),
            "--blocks-weight-decay applies to --unfreeze-from K (trained encoder blocks)"
        );
        let point = train_settings(&settings("blocks_lr = 0.1"), Source::SweepFile).unwrap();
        assert_eq!(point.config.unfreeze, None);
        // Map mixing as a sweep key: read into the blocks' settings, a bad
        // value named.
        let mixed = train_settings(
            &settings("unfreeze_from = 4\nmix_maps = \"cutmix:1\"\nema = 0.998"),
            Source::SweepFile,
        )
        .unwrap();
        assert_eq!(
            mixed
                .config
                .unfreeze
                .map(|unfreeze| (unfreeze.mix, unfreeze.ema)),
            Some((MapMix::Cutmix { alpha: 1.0 }, 0.998))
        );
        assert!(
            refusal(
                "unfreeze_from = 4\nmix_maps = \"cutmix\"",
                Source::SweepFile
            )
            .contains("unknown map mixing \"cutmix\""),
        );
        let refused = refusal("augment_maps = \"flips\"", Source::SweepFile);
        assert!(
            refused.contains("--augment-maps flips applies to --unfreeze-from K"),
            "{refused}"
        );
        let augmented = train_settings(
            &settings("unfreeze_from = 10\naugment_maps = \"dihedral\""),
            Source::Flags,
        )
        .unwrap();
        assert_eq!(
            augmented.config.augment_maps,
            crate::encoders::ViewSet::Dihedral
        );
        // What fine-tuning does not support is refused by name.
        let refused = refusal("unfreeze_from = 10\ntask = \"segment\"", Source::Flags);
        assert!(
            refused.contains("task segment keeps the encoder frozen"),
            "{refused}"
        );
        let refused = refusal("unfreeze_from = 10\noptimizer = \"sgd\"", Source::Flags);
        assert!(refused.contains("--optimizer sgd"), "{refused}");
        let refused = refusal("unfreeze_from = 10\nclip_grad_norm = 1.0", Source::Flags);
        assert!(refused.contains("--clip-grad-norm 1"), "{refused}");
        let refused = refusal("unfreeze_from = 10\nblocks_lr = 0", Source::SweepFile);
        assert!(
            refused.contains("blocks learning rate 0 must be positive"),
            "{refused}"
        );
        // Stored with the config, and part of its hash.
        let config = from_flags.config;
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"unfreeze\":{\"after_block\":10"), "{json}");
        let back: TrainConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        let frozen = TrainConfig {
            unfreeze: None,
            ..config.clone()
        };
        assert_ne!(config.config_hash("d", "fp"), frozen.config_hash("d", "fp"));
    }
}
