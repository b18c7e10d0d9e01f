//! `lazarus export` and `lazarus predict --bundle`: a trained head as a
//! self-contained folder that predicts without experiments/ or features/.
//!
//! ```text
//! BUNDLE/
//!   head.safetensors   layers.N.weight/bias, input_mean, input_std (the
//!                      training split's standardisation), as the run wrote it
//!   classes.json       class index -> name
//!   encoder.json       encoder name, weights (sha256:HEX or random:SEED),
//!                      preprocessing, feature fingerprint and dimension
//!   bundle.json        format version, source run, head configuration
//!   model_card.json    the run's model card (dataset, split sizes, metrics
//!                      with intervals, config, date, intended use, limits)
//!   manifest.json      sha256 and size of every other file
//! ```
//!
//! The bundle is staged in a temp folder beside the target and renamed into
//! place, so a bundle either exists whole or not at all. Opening one checks
//! every file against the manifest before anything is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::features::catalog::FeatureCache;
use crate::layout::Layout;
use crate::predict::{
    EncoderReference, PredictConfig, PredictError, Prediction, Predictor, TrainedHead,
    predict_images,
};
use crate::train::config::HeadConfig;

/// The bundle layout version this lazarus writes and reads.
pub const BUNDLE_FORMAT_VERSION: u32 = 1;
pub const HEAD_FILE: &str = "head.safetensors";
pub const CLASSES_FILE: &str = "classes.json";
pub const ENCODER_FILE: &str = "encoder.json";
pub const BUNDLE_FILE: &str = "bundle.json";
pub const MODEL_CARD_FILE: &str = "model_card.json";
pub const MANIFEST_FILE: &str = "manifest.json";
/// Every file a bundle holds besides its manifest.
const FILES: [&str; 5] = [
    HEAD_FILE,
    CLASSES_FILE,
    ENCODER_FILE,
    BUNDLE_FILE,
    MODEL_CARD_FILE,
];

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
    pub run_id: String,
    pub dataset: String,
    pub head: HeadConfig,
    /// Where the standardisation statistics are (tensor names in `head.safetensors`).
    pub standardisation: String,
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
    pub encoder: EncoderReference,
    pub manifest: Manifest,
}

/// What `export --out` writes: the bundle's files and its manifest.
pub const OUTPUT_KIND: crate::output_dir::Kind = crate::output_dir::Kind {
    verb: "lazarus export",
    recognises: |file| file == MANIFEST_FILE || FILES.contains(&file),
    replace_without_force: false,
};

/// Writes run `run_id` as a bundle at `out`: a new or empty folder, or,
/// with `options.force`, a bundle lazarus exported before (see `output_dir`).
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
    // A bundle holds a classifier head and the encoder that feeds it; the
    // task is what the run recorded, asked before any file is read as a head.
    let task = crate::predict::run_task(layout, run_id)?;
    if task != crate::train::config::Task::Classify {
        return Err(unexportable(format!(
            "its task is {}, and a bundle holds a classification head only; predict with \
             `lazarus predict --run {run_id}` on this root instead",
            task.name()
        )));
    }
    // Loading the head checks that it is complete and consistent.
    let (head, inputs) = crate::predict::load_run_head(layout, run_id, &Device::Cpu)?;
    let card_path = run_dir.join(MODEL_CARD_FILE);
    let card = std::fs::read(&card_path).map_err(|e| {
        unexportable(format!(
            "{} is not readable ({e}): the run did not finish",
            card_path.display()
        ))
    })?;
    let cache = FeatureCache::open(layout, &inputs.fingerprint).map_err(PredictError::from)?;
    let features = cache.features();
    let encoder =
        EncoderReference::from_features(features, &inputs.fingerprint)?.ok_or_else(|| {
            unexportable(format!(
                "its features {} do not name a registered encoder and its weights \
                 (encoder {:?}), so new images could not be encoded",
                features.dir().display(),
                inputs.encoder
            ))
        })?;
    if encoder.feature_dim != head.input_dim() {
        return Err(unexportable(format!(
            "its head reads {} features, its feature folder holds {}",
            head.input_dim(),
            encoder.feature_dim
        )));
    }
    let info = BundleInfo {
        format_version: BUNDLE_FORMAT_VERSION,
        lazarus_version: crate::VERSION.to_string(),
        exported_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        run_id: run_id.to_string(),
        dataset: inputs.dataset.clone(),
        head: inputs.config.head.clone(),
        standardisation: format!(
            "{HEAD_FILE}: input_mean, input_std (training split of {})",
            inputs.dataset
        ),
    };
    let classes = ClassMap {
        classes: inputs.class_names.iter().cloned().enumerate().collect(),
    };
    let head_path = run_dir.join(HEAD_FILE);
    let head_bytes = std::fs::read(&head_path).map_err(io_error(&head_path))?;
    let contents: Vec<(&str, Vec<u8>)> = vec![
        (HEAD_FILE, head_bytes),
        (CLASSES_FILE, to_json(&classes)),
        (ENCODER_FILE, to_json(&encoder)),
        (BUNDLE_FILE, to_json(&info)),
        (MODEL_CARD_FILE, card),
    ];
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
        let mut written: Vec<String> = FILES.iter().map(|f| f.to_string()).collect();
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
    pub head: TrainedHead,
}

/// Opens a bundle: every file must be present and match the manifest's sha256.
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
    let mut contents = BTreeMap::new();
    for file in FILES {
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
        contents.insert(file, bytes);
    }
    let info: BundleInfo = serde_json::from_slice(&contents[BUNDLE_FILE])
        .map_err(|e| corrupt(BUNDLE_FILE, e.to_string()))?;
    if info.format_version != BUNDLE_FORMAT_VERSION {
        return Err(corrupt(
            BUNDLE_FILE,
            format!(
                "format version {}, this lazarus reads {BUNDLE_FORMAT_VERSION}",
                info.format_version
            ),
        ));
    }
    let encoder: EncoderReference = serde_json::from_slice(&contents[ENCODER_FILE])
        .map_err(|e| corrupt(ENCODER_FILE, e.to_string()))?;
    let classes: ClassMap = serde_json::from_slice(&contents[CLASSES_FILE])
        .map_err(|e| corrupt(CLASSES_FILE, e.to_string()))?;
    let class_names: Vec<String> = classes.classes.values().cloned().collect();
    if classes.classes.keys().copied().ne(0..class_names.len()) {
        return Err(corrupt(
            CLASSES_FILE,
            "class indices must run 0, 1, 2, ... without gaps".into(),
        ));
    }
    let tensors = crate::train::checkpoint::tensors_from_bytes(
        &contents[HEAD_FILE],
        &dir.join(HEAD_FILE),
        device,
    )
    .map_err(|e| corrupt(HEAD_FILE, e.to_string()))?;
    let head = TrainedHead::from_tensors(&info.head, &tensors, class_names, &dir.join(HEAD_FILE))
        .map_err(|e| corrupt(HEAD_FILE, e.to_string()))?;
    if head.input_dim() != encoder.feature_dim {
        return Err(corrupt(
            HEAD_FILE,
            format!(
                "the head reads {} features, {ENCODER_FILE} says the encoder gives {}",
                head.input_dim(),
                encoder.feature_dim
            ),
        ));
    }
    Ok(Bundle {
        dir: bundle,
        info,
        encoder,
        head,
    })
}

/// Predicts with a bundle. `cache`: a lazarus root and dataset whose cached
/// features (same fingerprint as the bundle's) are reused where present.
pub fn predict(
    bundle_dir: &Path,
    cache: Option<(&Layout, &str)>,
    images: &[PathBuf],
    config: &PredictConfig,
) -> Result<Vec<Prediction>, BundleError> {
    let bundle = open(bundle_dir, &config.device)?;
    // The root's cache of the bundle's fingerprint (every dataset's images).
    let cache = match cache {
        Some((layout, _dataset)) => {
            FeatureCache::open_if_present(layout, &bundle.encoder.fingerprint)
                .map_err(PredictError::from)?
        }
        None => None,
    };
    let predictor = Predictor {
        head: &bundle.head,
        cache: cache.as_ref(),
        encoder: Some(&bundle.encoder),
        owner: format!("bundle {}", bundle_dir.display()),
    };
    Ok(predict_images(&predictor, images, config)?)
}
