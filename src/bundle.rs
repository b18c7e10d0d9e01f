//! `lazarus export` and `lazarus predict --bundle`: a trained model of any
//! task as a self-contained folder that predicts without experiments/ or
//! features/.
//!
//! ```text
//! BUNDLE/
//!   bundle.json        format version, task, source run, head configuration
//!   encoder.json       encoder name, weights (sha256:HEX or random:SEED),
//!                      preprocessing the features recorded, feature
//!                      fingerprint and dimension
//!   model_card.json    the run's model card (dataset, split sizes, metrics
//!                      with intervals, config, date, intended use, limits)
//!   manifest.json      sha256 and size of every other file
//! classification (format 1, as before issue 21):
//!   head.safetensors   layers.N.weight/bias, input_mean, input_std (the
//!                      training split's standardisation), as the run wrote it
//!   classes.json       class index -> name
//! anomaly (format 2), the run's files as it wrote them:
//!   scorer.safetensors standardisation, memory bank or Gaussians; patch
//!                      scorers: channels, tiling, heat-map settings
//!   config.json        the run's configuration (scorer, patch settings)
//!   metrics.json       its metrics, among them the threshold
//!                      (val/best_f1_threshold)
//! fine-tuned classification (`train --unfreeze-from`; format 2, so that a
//! lazarus reading format 1 refuses it instead of ignoring the blocks):
//!   the classification files, and
//!   blocks.safetensors the trained encoder blocks with their layout, encoder
//!                      and weights (metadata), as the run wrote them;
//!                      bundle.json lists them (`trained_blocks`)
//! segmentation (format 2):
//!   head.safetensors   the head with its standardisation and its map,
//!                      grid and tile settings (metadata), as the run wrote it
//!   config.json        the run's configuration (head layers)
//!   classes.json       class index -> name
//! ```
//!
//! The bundle is staged in a temp folder beside the target and renamed into
//! place, so a bundle either exists whole or not at all. Opening one checks
//! every file against the manifest before anything is read as a model; the
//! encoder's weights are checked against their sha256 before they are
//! loaded. An opened bundle is a [`Predictor`], so it predicts through the
//! one per-image path of runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::experiments::run_files::{INPUTS_FILE, METRICS_FILE};
use crate::features::catalog::FeatureCache;
use crate::layout::Layout;
use crate::predict::{
    EncoderReference, FineTunedModel, Model, PredictConfig, PredictError, Prediction, Predictor,
    PredictorParts, RunPredictions, TrainedHead, predict_files,
};
use crate::train::anomaly::SavedScorer;
use crate::train::config::{EvalViews, HeadConfig, Task};
use crate::train::finetune::FineTunedBlocks;

/// The layout version of classification bundles (unchanged since the first).
pub const BUNDLE_FORMAT_VERSION: u32 = 1;
/// The layout version of anomaly and segmentation bundles, which a lazarus
/// reading version 1 only refuses by its version.
pub const TASK_BUNDLE_FORMAT_VERSION: u32 = 2;
pub const HEAD_FILE: &str = "head.safetensors";
pub const CLASSES_FILE: &str = "classes.json";
pub const ENCODER_FILE: &str = "encoder.json";
pub const BUNDLE_FILE: &str = "bundle.json";
pub const MODEL_CARD_FILE: &str = crate::experiments::run_files::MODEL_CARD_FILE;
pub const MANIFEST_FILE: &str = "manifest.json";
/// An anomaly run's scorer, as `train --task anomaly` writes it.
pub const SCORER_FILE: &str = "scorer.safetensors";
/// A fine-tuned classifier's blocks, as `train --unfreeze-from` writes them.
pub const BLOCKS_FILE: &str = crate::experiments::run_files::BLOCKS_FILE;
/// Every file a bundle of any task may hold besides its manifest.
const ALL_FILES: [&str; 9] = [
    BLOCKS_FILE,
    HEAD_FILE,
    CLASSES_FILE,
    ENCODER_FILE,
    BUNDLE_FILE,
    MODEL_CARD_FILE,
    SCORER_FILE,
    INPUTS_FILE,
    METRICS_FILE,
];

/// The files a bundle of `task` holds besides its manifest.
pub fn bundle_files(task: Task) -> &'static [&'static str] {
    match task {
        Task::Classify => &[
            HEAD_FILE,
            CLASSES_FILE,
            ENCODER_FILE,
            BUNDLE_FILE,
            MODEL_CARD_FILE,
        ],
        Task::Anomaly => &[
            SCORER_FILE,
            INPUTS_FILE,
            METRICS_FILE,
            ENCODER_FILE,
            BUNDLE_FILE,
            MODEL_CARD_FILE,
        ],
        Task::Segment => &[
            HEAD_FILE,
            INPUTS_FILE,
            CLASSES_FILE,
            ENCODER_FILE,
            BUNDLE_FILE,
            MODEL_CARD_FILE,
        ],
    }
}

/// The files copied as the run wrote them (the others are written by export).
fn run_files(task: Task) -> &'static [&'static str] {
    match task {
        Task::Classify => &[HEAD_FILE],
        Task::Anomaly => &[SCORER_FILE, INPUTS_FILE, METRICS_FILE],
        Task::Segment => &[HEAD_FILE, INPUTS_FILE],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("run {run} cannot be exported: {message}")]
    Unexportable { run: String, message: String },
    #[error(transparent)]
    Out(#[from] crate::output_dir::OutputError),
    #[error("{bundle} is not a bundle: {file} is missing")]
    MissingFile { bundle: PathBuf, file: String },
    #[error("bundle {bundle}: {file} is not listed in {MANIFEST_FILE}")]
    NotInManifest { bundle: PathBuf, file: String },
    #[error(
        "bundle {bundle}: {file} has sha256 {actual}, but {MANIFEST_FILE} records {expected} \
         (the file was changed or damaged)"
    )]
    ChecksumMismatch {
        bundle: PathBuf,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("bundle {bundle}: {file}: {message}")]
    Corrupt {
        bundle: PathBuf,
        file: String,
        message: String,
    },
    #[error("--task {wanted}: bundle {bundle} holds a {task} model")]
    OtherTask {
        bundle: PathBuf,
        task: &'static str,
        wanted: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Predict(#[from] PredictError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `bundle.json`: what the bundle is and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleInfo {
    pub format_version: u32,
    pub lazarus_version: String,
    pub exported_at: String,
    /// The run's task; bundles written before issue 21 have none and are
    /// classifiers.
    #[serde(default)]
    pub task: Task,
    pub run_id: String,
    pub dataset: String,
    pub head: HeadConfig,
    /// Where the standardisation statistics are.
    pub standardisation: String,
    /// How an answer reads an image's views when `encoder.json` names
    /// several (`train --eval-views`; absent: `mean`, as in bundles written
    /// before `--views`).
    #[serde(default, skip_serializing_if = "EvalViews::is_mean")]
    pub eval_views: EvalViews,
    /// The encoder blocks a fine-tuned classifier trained; absent for a
    /// frozen encoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_blocks: Option<TrainedBlocks>,
}

impl BundleInfo {
    /// The layout version a bundle of this task (and blocks) is written in.
    fn wanted_format(&self) -> u32 {
        match self.task {
            Task::Classify if self.trained_blocks.is_none() => BUNDLE_FORMAT_VERSION,
            Task::Classify | Task::Anomaly | Task::Segment => TASK_BUNDLE_FORMAT_VERSION,
        }
    }

    /// The files the bundle holds besides its manifest.
    fn files(&self) -> Vec<&'static str> {
        let mut files = bundle_files(self.task).to_vec();
        if self.trained_blocks.is_some() {
            files.push(BLOCKS_FILE);
        }
        files
    }
}

/// `bundle.json`'s record of the encoder blocks a fine-tuned classifier
/// trained (`train --unfreeze-from K`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedBlocks {
    /// K: the blocks after it read its output (a stride-4, -8 or -16 map).
    pub after_block: usize,
    /// What changed from the pretrained encoder, in order: `block11`, …,
    /// `head_conv`.
    pub changed: Vec<String>,
    /// Where they are.
    pub file: String,
}

/// `classes.json`: class names in output order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassMap {
    /// Class name by output index.
    pub classes: BTreeMap<usize, String>,
}

/// `manifest.json`: every other file of the bundle.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, ManifestEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// What `export` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub bundle: PathBuf,
    pub run_id: String,
    pub task: Task,
    pub encoder: EncoderReference,
    pub manifest: Manifest,
}

/// What `export --out` writes: the bundle's files and its manifest.
pub const OUTPUT_KIND: crate::output_dir::Kind = crate::output_dir::Kind {
    verb: "lazarus export",
    recognises: |file| file == MANIFEST_FILE || ALL_FILES.contains(&file),
    replace_without_force: false,
};

/// Writes run `run_id` (of any task) as a bundle at `out`: a new or empty
/// folder, or, with `options.force`, a bundle lazarus exported before (see
/// `output_dir`).
pub fn export(
    layout: &Layout,
    run_id: &str,
    out: &Path,
    options: crate::output_dir::ReplaceOptions,
) -> Result<ExportReport, BundleError> {
    let run_dir = crate::predict::run_folder(layout, run_id)?;
    let prior = crate::output_dir::check(out, &OUTPUT_KIND, options)?;
    let unexportable = |message: String| BundleError::Unexportable {
        run: run_id.to_string(),
        message,
    };
    // Opening the run as `predict` does checks that its model is complete
    // and consistent, by the task it recorded.
    let predictor = Predictor::open_run(layout, run_id, &Device::Cpu)?;
    let task = predictor.task();
    let inputs = crate::train::run::read_run_inputs(&run_dir).map_err(PredictError::from)?;
    let card_path = run_dir.join(MODEL_CARD_FILE);
    let card = std::fs::read(&card_path).map_err(|e| {
        unexportable(format!(
            "{} is not readable ({e}): the run did not finish",
            card_path.display()
        ))
    })?;
    let features_folder = || match predictor.cache() {
        Some(cache) => cache.features().dir().display().to_string(),
        None => format!("features/{}", inputs.fingerprint),
    };
    let encoder = predictor.encoder_reference().cloned().ok_or_else(|| {
        unexportable(format!(
            "its features {} do not name a registered encoder and its weights \
             (encoder {:?}), so new images could not be encoded",
            features_folder(),
            inputs.encoder
        ))
    })?;
    if encoder.weights.is_empty() {
        return Err(unexportable(format!(
            "neither its features {} nor its head record the encoder's weights, so new \
             images could not be encoded",
            features_folder()
        )));
    }
    let trained_blocks = match predictor.model() {
        Model::FineTuned(model) => {
            let blocks = model.blocks.blocks();
            let first = blocks.after_block() + 1;
            let mut changed: Vec<String> = (first..first + blocks.n_blocks())
                .map(|index| format!("block{index}"))
                .collect();
            changed.push("head_conv".into());
            Some(TrainedBlocks {
                after_block: blocks.after_block(),
                changed,
                file: BLOCKS_FILE.into(),
            })
        }
        _ => None,
    };
    let (standardisation, class_names) = match predictor.model() {
        model @ (Model::Classify(_) | Model::FineTuned(_)) => {
            let head = model.classifier().expect("a classifier");
            // A fine-tuned head reads its blocks' pooled features, whose
            // widths `FineTunedModel::check` compared with this same
            // encoder reference when the run was opened.
            if matches!(model, Model::Classify(_)) && encoder.feature_dim != head.input_dim() {
                return Err(unexportable(format!(
                    "its head reads {} features, its feature folder holds {}",
                    head.input_dim(),
                    encoder.feature_dim
                )));
            }
            (
                format!(
                    "{HEAD_FILE}: input_mean, input_std (training split of {})",
                    inputs.dataset
                ),
                Some(head.class_names().to_vec()),
            )
        }
        Model::Anomaly(_) => (
            format!(
                "{SCORER_FILE}: input_mean, input_std (normal training images of {})",
                inputs.dataset
            ),
            None,
        ),
        Model::Segment(_) => (
            format!(
                "{HEAD_FILE}: input_mean, input_std (training tiles of {})",
                inputs.dataset
            ),
            Some(predictor.class_names().to_vec()),
        ),
    };
    let mut info = BundleInfo {
        format_version: 0,
        lazarus_version: crate::VERSION.to_string(),
        exported_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        task,
        run_id: run_id.to_string(),
        dataset: inputs.dataset.clone(),
        head: inputs.config.head.clone(),
        standardisation,
        eval_views: inputs.config.eval_views,
        trained_blocks,
    };
    info.format_version = info.wanted_format();
    let mut contents: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut copied = run_files(task).to_vec();
    if info.trained_blocks.is_some() {
        copied.push(BLOCKS_FILE);
    }
    for file in copied {
        let path = run_dir.join(file);
        contents.push((file, std::fs::read(&path).map_err(io_error(&path))?));
    }
    if let Some(class_names) = class_names {
        let classes = ClassMap {
            classes: class_names.into_iter().enumerate().collect(),
        };
        contents.push((CLASSES_FILE, to_json(&classes)));
    }
    contents.push((ENCODER_FILE, to_json(&encoder)));
    contents.push((BUNDLE_FILE, to_json(&info)));
    contents.push((MODEL_CARD_FILE, card));
    let mut manifest = Manifest::default();
    for (name, bytes) in &contents {
        manifest.files.insert(
            name.to_string(),
            ManifestEntry {
                sha256: crate::digest::sha256_hex(bytes),
                bytes: bytes.len() as u64,
            },
        );
    }

    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    let staging = crate::atomic::temp_path_for(out);
    let written = (|| -> Result<(), BundleError> {
        std::fs::create_dir(&staging).map_err(io_error(&staging))?;
        for (name, bytes) in &contents {
            let path = staging.join(name);
            crate::atomic::write_file(&path, bytes).map_err(io_error(&path))?;
        }
        let path = staging.join(MANIFEST_FILE);
        crate::atomic::write_file(&path, &to_json(&manifest)).map_err(io_error(&path))?;
        let mut written: Vec<String> = contents.iter().map(|(f, _)| f.to_string()).collect();
        written.push(MANIFEST_FILE.to_string());
        crate::output_dir::write_marker(&staging, &OUTPUT_KIND, &written)?;
        crate::output_dir::publish(&staging, out, &prior)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written?;
    Ok(ExportReport {
        bundle: out.to_path_buf(),
        run_id: run_id.to_string(),
        task,
        encoder,
        manifest,
    })
}

/// A bundle JSON file: pretty, newline-terminated.
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("bundle records serialise");
    bytes.push(b'\n');
    bytes
}

/// An opened, checked bundle.
pub struct Bundle {
    pub dir: PathBuf,
    pub info: BundleInfo,
    pub encoder: EncoderReference,
    /// The bundle's model, predicting through the path of runs (no cache
    /// until [`Predictor::with_cache`] gives it one).
    pub predictor: Predictor,
}

/// Opens a bundle: every file its task needs must be present and match the
/// manifest's sha256 before it is read as a model.
pub fn open(dir: &Path, device: &Device) -> Result<Bundle, BundleError> {
    let bundle = dir.to_path_buf();
    let read = |file: &str| -> Result<Vec<u8>, BundleError> {
        let path = dir.join(file);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BundleError::MissingFile {
                bundle: bundle.clone(),
                file: file.to_string(),
            }),
            Err(e) => Err(BundleError::Io { path, source: e }),
        }
    };
    let corrupt = |file: &str, message: String| BundleError::Corrupt {
        bundle: bundle.clone(),
        file: file.to_string(),
        message,
    };
    let manifest: Manifest = serde_json::from_slice(&read(MANIFEST_FILE)?)
        .map_err(|e| corrupt(MANIFEST_FILE, e.to_string()))?;
    let checked = |file: &str| -> Result<Vec<u8>, BundleError> {
        let entry = manifest
            .files
            .get(file)
            .ok_or_else(|| BundleError::NotInManifest {
                bundle: bundle.clone(),
                file: file.to_string(),
            })?;
        let bytes = read(file)?;
        let actual = crate::digest::sha256_hex(&bytes);
        if actual != entry.sha256 {
            return Err(BundleError::ChecksumMismatch {
                bundle: bundle.clone(),
                file: file.to_string(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    };
    // bundle.json says the task, which says what else the bundle holds.
    let info: BundleInfo = serde_json::from_slice(&checked(BUNDLE_FILE)?)
        .map_err(|e| corrupt(BUNDLE_FILE, e.to_string()))?;
    let wanted_version = info.wanted_format();
    if info.format_version != wanted_version {
        return Err(corrupt(
            BUNDLE_FILE,
            format!(
                "format version {} for a {} bundle, this lazarus reads {wanted_version}",
                info.format_version,
                info.task.name()
            ),
        ));
    }
    let mut contents = BTreeMap::new();
    for file in info.files() {
        contents.insert(file, checked(file)?);
    }
    let encoder: EncoderReference = serde_json::from_slice(&contents[ENCODER_FILE])
        .map_err(|e| corrupt(ENCODER_FILE, e.to_string()))?;
    let class_names = match contents.get(CLASSES_FILE) {
        None => Vec::new(),
        Some(bytes) => {
            let classes: ClassMap =
                serde_json::from_slice(bytes).map_err(|e| corrupt(CLASSES_FILE, e.to_string()))?;
            let names: Vec<String> = classes.classes.values().cloned().collect();
            if classes.classes.keys().copied().ne(0..names.len()) {
                return Err(corrupt(
                    CLASSES_FILE,
                    "class indices must run 0, 1, 2, ... without gaps".into(),
                ));
            }
            names
        }
    };
    let model = match info.task {
        Task::Classify => {
            let tensors = crate::train::checkpoint::tensors_from_bytes(
                &contents[HEAD_FILE],
                &dir.join(HEAD_FILE),
                device,
            )
            .map_err(|e| corrupt(HEAD_FILE, e.to_string()))?;
            let head = TrainedHead::from_tensors(
                &info.head,
                &tensors,
                class_names.clone(),
                &dir.join(HEAD_FILE),
            )
            .map_err(|e| corrupt(HEAD_FILE, e.to_string()))?;
            match contents.get(BLOCKS_FILE) {
                None => {
                    if head.input_dim() != encoder.feature_dim {
                        return Err(corrupt(
                            HEAD_FILE,
                            format!(
                                "the head reads {} features, {ENCODER_FILE} says the encoder \
                                 gives {}",
                                head.input_dim(),
                                encoder.feature_dim
                            ),
                        ));
                    }
                    Model::Classify(head)
                }
                Some(bytes) => {
                    let blocks = FineTunedBlocks::from_bytes(bytes, &dir.join(BLOCKS_FILE))
                        .map_err(|e| corrupt(BLOCKS_FILE, e.to_string()))?;
                    let model = FineTunedModel { head, blocks };
                    model
                        .check(&format!("bundle {}", dir.display()), Some(&encoder))
                        .map_err(|e| corrupt(BLOCKS_FILE, e.to_string()))?;
                    Model::FineTuned(Box::new(model))
                }
            }
        }
        // The run's own readers, on the files just checked.
        Task::Anomaly => {
            let scorer =
                SavedScorer::load(dir, device).map_err(|e| corrupt(SCORER_FILE, e.to_string()))?;
            if scorer.patch().is_none() && scorer.feature_dim() != encoder.feature_dim {
                return Err(corrupt(
                    SCORER_FILE,
                    format!(
                        "the scorer reads {} features, {ENCODER_FILE} says the encoder gives {}",
                        scorer.feature_dim(),
                        encoder.feature_dim
                    ),
                ));
            }
            Model::Anomaly(scorer)
        }
        Task::Segment => {
            let inputs: crate::train::run::RunInputs =
                serde_json::from_slice(&contents[INPUTS_FILE])
                    .map_err(|e| corrupt(INPUTS_FILE, e.to_string()))?;
            let trained = crate::segment::model::load_head(dir, &inputs.config, device)
                .map_err(|e| corrupt(HEAD_FILE, e.to_string()))?;
            Model::Segment(trained)
        }
    };
    let predictor = Predictor::new(PredictorParts {
        owner: format!("bundle {}", dir.display()),
        run_id: info.run_id.clone(),
        fingerprint: encoder.fingerprint.clone(),
        device: device.clone(),
        model,
        class_names,
        cache: None,
        encoder: Some(encoder.clone()),
        eval_views: info.eval_views,
    });
    Ok(Bundle {
        dir: bundle,
        info,
        encoder,
        predictor,
    })
}

/// What `predict --bundle` is asked for besides the images.
pub struct BundlePredictConfig<'a> {
    /// A lazarus root whose cached features of the bundle's fingerprint are
    /// reused where present (`--dataset`).
    pub cache_root: Option<&'a Layout>,
    /// `--task`: the task the bundle must hold.
    pub task: Option<Task>,
    /// Where tile-based models write masks and heat maps.
    pub out_dir: Option<&'a Path>,
}

/// Predicts classes with a classification bundle (`predict_with` for any
/// task). `cache`: a lazarus root and dataset whose cached features (same
/// fingerprint as the bundle's) are reused where present.
pub fn predict(
    bundle_dir: &Path,
    cache: Option<(&Layout, &str)>,
    images: &[PathBuf],
    config: &PredictConfig,
) -> Result<Vec<Prediction>, BundleError> {
    let bundle_config = BundlePredictConfig {
        cache_root: cache.map(|(layout, _dataset)| layout),
        task: Some(Task::Classify),
        out_dir: None,
    };
    match predict_with(bundle_dir, images, config, &bundle_config)? {
        RunPredictions::Classify(predictions) => Ok(predictions),
        other => unreachable!("a {} bundle passed --task classify", other.task().name()),
    }
}

/// Predicts with a bundle of any task through the one per-image path of runs.
pub fn predict_with(
    bundle_dir: &Path,
    images: &[PathBuf],
    config: &PredictConfig,
    bundle_config: &BundlePredictConfig,
) -> Result<RunPredictions, BundleError> {
    let bundle = open(bundle_dir, &config.device)?;
    if let Some(wanted) = bundle_config.task
        && wanted != bundle.info.task
    {
        return Err(BundleError::OtherTask {
            bundle: bundle.dir,
            task: bundle.info.task.name(),
            wanted: wanted.name(),
        });
    }
    let cache = match bundle_config.cache_root {
        Some(layout) => FeatureCache::open_if_present(layout, &bundle.encoder.fingerprint)
            .map_err(PredictError::from)?,
        None => None,
    };
    let predictor = bundle.predictor.with_cache(cache);
    Ok(predict_files(
        &predictor,
        images,
        config,
        bundle_config.out_dir,
    )?)
}
