//! Training inputs: the memory-mapped feature rows of one dataset version
//! (found and joined by content id through `features::catalog`), checked
//! and split, with standardisation statistics from the training split.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::dataset::{self, Split};
use crate::features::FeatureSet;
use crate::features::catalog::{self, FeatureKind, FeatureRequest};
use crate::layout::Layout;

use super::TrainError;

/// The images of one split, each by its first feature row (view 0; the
/// only row in folders of one view), and their class indices.
#[derive(Debug, Clone, Default)]
pub struct SplitRows {
    pub rows: Vec<usize>,
    pub labels: Vec<usize>,
}

/// A checked training input; rows stay memory-mapped in `features`.
pub struct TrainData {
    pub dataset_name: String,
    /// The manifest version the rows are joined to.
    pub dataset_version: u32,
    pub features: FeatureSet,
    pub fingerprint: String,
    pub class_names: Vec<String>,
    pub train: SplitRows,
    pub val: SplitRows,
    pub test: SplitRows,
    /// Labelled images of the version without a feature row (only with
    /// `LoadConfig::allow_partial`; otherwise such a set is refused).
    pub images_lacking: usize,
    /// Per-dimension mean and standard deviation over the training split.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// 1 / std, so standardising is one multiply-add per value.
    inverse_std: Vec<f32>,
    /// Rows per image (`enqueue --views`; 1 before it): image `first`'s
    /// rows are `first..first + views`, view k at `first + k`.
    pub views: usize,
}

/// How training data is read.
#[derive(Debug, Clone, Default)]
pub struct LoadConfig {
    /// At most this many bytes of mapped feature pages stay resident.
    pub resident_limit_bytes: u64,
    /// Class renames or merges (see `TrainConfig::label_map`).
    pub label_map: BTreeMap<String, String>,
    pub split_labels: SplitLabels,
    /// Only features made by this encoder.
    pub encoder: Option<String>,
    /// Only pooled features of these extraction options.
    pub pooled: catalog::PooledChoice,
    /// Pooled or spatial features; `None` accepts either.
    pub kind: Option<FeatureKind>,
    /// The manifest version to train on; `None` for the current one.
    pub version: Option<u32>,
    /// Train on the images that have features when some lack them,
    /// instead of refusing the set.
    pub allow_partial: bool,
}

/// Which classes each split must hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SplitLabels {
    /// The same label set in train, val and test (a classifier needs it).
    #[default]
    Same,
    /// Any labels per split: anomaly detection trains on normal images only,
    /// so a train split without the anomalous classes is expected.
    Any,
}

/// Opens and checks the features of a dataset: every split has examples,
/// splits share one label set, no row holds NaN or inf, and every labelled
/// image has features (unless `config.allow_partial`).
pub fn load(
    layout: &Layout,
    dataset_name: &str,
    fingerprint: Option<&str>,
    config: &LoadConfig,
) -> Result<TrainData, TrainError> {
    let opened = catalog::open(
        layout,
        &FeatureRequest {
            dataset: dataset_name,
            version: config.version,
            encoder: config.encoder.as_deref(),
            kind: config.kind,
            fingerprint,
            pooled: Some(&config.pooled),
        },
    )?;
    let fingerprint = opened.fingerprint;
    let info = opened.info;
    let features = opened.features;
    features.set_resident_limit(config.resident_limit_bytes);
    if features.is_empty() {
        return Err(TrainError::NoFeatures(format!(
            "{} holds no row of dataset {dataset_name}",
            features.dir().display()
        )));
    }
    // Only (class, split) per manifest row is kept: a manifest of millions
    // of images is streamed, never held.
    for from in config.label_map.keys() {
        if !info.class_order.contains(from) {
            return Err(TrainError::Invalid(format!(
                "label map names class {from:?}, which dataset {dataset_name} does not have; \
                 its classes are {}",
                info.class_order.join(", ")
            )));
        }
    }
    // Mapped class names, in order of first appearance in the class order.
    let mut class_names: Vec<String> = Vec::new();
    let mut mapped_index: HashMap<&str, u32> = HashMap::new();
    for name in &info.class_order {
        let mapped = config.label_map.get(name).unwrap_or(name);
        let index = match class_names.iter().position(|c| c == mapped) {
            Some(index) => index,
            None => {
                class_names.push(mapped.clone());
                class_names.len() - 1
            }
        };
        mapped_index.insert(name, index as u32);
    }
    // By manifest index (indices of removed rows stay empty).
    let mut labelled: Vec<Option<(u32, Split)>> = Vec::with_capacity(info.images);
    dataset::visit_images_at(layout, dataset_name, Some(info.version), |record| {
        let entry = match record.label.as_deref() {
            None => None,
            Some(label) => Some((
                *mapped_index
                    .get(label)
                    .ok_or_else(|| dataset::DatasetError::Corrupt {
                        path: layout.dataset_dir(dataset_name),
                        message: format!("label {label} missing from the class order"),
                    })?,
                record.split,
            )),
        };
        if labelled.len() <= record.index {
            labelled.resize(record.index + 1, None);
        }
        labelled[record.index] = entry;
        Ok(())
    })?;
    let mut lacking = [0usize; 3];
    for missing in &opened.lacking {
        if labelled.get(missing.index).copied().flatten().is_some() {
            lacking[split_slot(missing.split)] += 1;
        }
    }
    let images_lacking: usize = lacking.iter().sum();
    if images_lacking > 0 && !config.allow_partial {
        let labelled_count = labelled.iter().filter(|l| l.is_some()).count();
        return Err(TrainError::Incomplete(catalog::lacking_message(
            dataset_name,
            info.version,
            &fingerprint,
            lacking,
            labelled_count,
        )));
    }

    // An image's views are consecutive rows, view 0 first (checked here,
    // so every reader below may count on it).
    let views = features.views()?.count();
    let mut splits: [SplitRows; 3] = Default::default();
    for row in (0..features.len()).step_by(views) {
        let image_index = features.image_indices()[row];
        features.check_view_rows(row, views)?;
        let Some(Some((class, split))) = labelled.get(image_index).copied() else {
            continue;
        };
        let class = class as usize;
        if (row..row + views).any(|row| features.pooled(row).iter().any(|v| !v.is_finite())) {
            return Err(TrainError::NonFinite { image_index });
        }
        let slot = split_slot(split);
        splits[slot].rows.push(row);
        splits[slot].labels.push(class);
    }
    let names = ["train", "val", "test"];
    for (split, name) in splits.iter().zip(names) {
        if split.rows.is_empty() {
            return Err(TrainError::EmptySplit(name));
        }
    }
    let label_sets: Vec<BTreeSet<usize>> = splits
        .iter()
        .map(|s| s.labels.iter().copied().collect())
        .collect();
    for (set, name) in label_sets.iter().zip(names).skip(1) {
        if config.split_labels == SplitLabels::Same && set != &label_sets[0] {
            let show = |s: &BTreeSet<usize>| {
                s.iter()
                    .map(|&c| class_names[c].as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return Err(TrainError::LabelMismatch(format!(
                "train has {{{}}}, {name} has {{{}}}",
                show(&label_sets[0]),
                show(set)
            )));
        }
    }
    // Over every view of the training images: each is a training example.
    let (mean, std) = standardisation(&features, &view_rows(&splits[0].rows, views));
    let [train, val, test] = splits;
    Ok(TrainData {
        dataset_name: dataset_name.to_string(),
        dataset_version: info.version,
        features,
        fingerprint,
        class_names,
        train,
        val,
        test,
        images_lacking,
        inverse_std: std.iter().map(|s| 1.0 / s).collect(),
        mean,
        std,
        views,
    })
}

/// Per image, the mean over its first `used` views of `values`, which
/// holds `views` consecutive rows of `width` values per image (class
/// probabilities, or anomaly scores with width 1), summed in f64 in view
/// order. Evaluation and prediction average through it alike.
pub fn average_views<T: Copy + Into<f64>>(
    values: &[T],
    width: usize,
    views: usize,
    used: usize,
) -> Vec<f64> {
    let used = used.clamp(1, views.max(1));
    values
        .chunks(width * views.max(1))
        .flat_map(|image| {
            (0..width).map(move |column| {
                let sum: f64 = (0..used)
                    .map(|view| image[view * width + column].into())
                    .sum();
                sum / used as f64
            })
        })
        .collect()
}

/// Every row of the images whose first rows are `firsts`, in order: an
/// image's `views` rows together, view 0 first.
pub fn view_rows(firsts: &[usize], views: usize) -> Vec<usize> {
    firsts
        .iter()
        .flat_map(|&first| first..first + views)
        .collect()
}

fn split_slot(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Val => 1,
        Split::Test => 2,
    }
}

/// Mean and standard deviation per dimension of the pooled `rows`.
fn standardisation(features: &FeatureSet, rows: &[usize]) -> (Vec<f32>, Vec<f32>) {
    mean_and_std(
        features.feature_dim(),
        rows.iter()
            .map(|&row| features.pooled(row).iter().map(|v| v.to_f64())),
    )
}

/// Mean and standard deviation per dimension of `rows` of `dim` values,
/// accumulated in f64; a constant dimension gets std 1 so it standardises to
/// zero instead of dividing by zero.
pub(crate) fn mean_and_std<R: IntoIterator<Item = f64>>(
    dim: usize,
    rows: impl IntoIterator<Item = R>,
) -> (Vec<f32>, Vec<f32>) {
    let mut sum = vec![0f64; dim];
    let mut sum_sq = vec![0f64; dim];
    let mut n_rows = 0usize;
    for row in rows {
        n_rows += 1;
        for (d, v) in row.into_iter().enumerate() {
            sum[d] += v;
            sum_sq[d] += v * v;
        }
    }
    let n = n_rows as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sum_sq
        .iter()
        .zip(&mean)
        .map(|(sq, m)| {
            let var = (sq / n - m * m).max(0.0);
            if var < 1e-12 { 1.0 } else { var.sqrt() as f32 }
        })
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

/// The per-dimension mean and standard deviation a head's inputs are
/// standardised with (written into its head file).
#[derive(Debug, Clone, Copy)]
pub struct Standardisation<'a> {
    pub mean: &'a [f32],
    pub std: &'a [f32],
}

/// Rows one gather task converts: enough work to be worth a hand-off.
const GATHER_ROWS_PER_TASK: usize = 64;

impl TrainData {
    /// The training split's statistics of the pooled rows.
    pub fn standardisation(&self) -> Standardisation<'_> {
        Standardisation {
            mean: &self.mean,
            std: &self.std,
        }
    }

    /// Standardised f32 copy of the given rows only: one batch at a time, so the
    /// cache is never copied whole into memory.
    pub fn gather(&self, rows: &[usize]) -> Vec<f32> {
        let mut out = Vec::new();
        self.gather_into(rows, &mut out);
        out
    }

    /// `gather` into a buffer the caller reuses from batch to batch: a fresh
    /// megabyte-sized allocation per batch costs more in page faults than
    /// the conversion itself.
    pub fn gather_into(&self, rows: &[usize], out: &mut Vec<f32>) {
        use half::slice::HalfFloatSliceExt;
        let dim = self.features.feature_dim();
        use rayon::prelude::*;
        out.resize(rows.len() * dim, 0.0);
        // Conversion is most of a linear head's step: spread a batch's rows
        // over the pool (each row is written by one thread, so the result
        // does not depend on the split).
        out.par_chunks_mut(dim)
            .zip(rows.par_iter())
            .with_min_len(GATHER_ROWS_PER_TASK)
            .for_each(|(values, &row)| {
                // Vectorised f16 -> f32 (F16C where the CPU has it), then standardise.
                // (The loop is in the optimised kernels crate: at this crate's
                // opt-level it was half of a dev build's training time.)
                self.features.pooled(row).convert_to_f32_slice(values);
                lazarus_kernels::neighbours::standardise_row(values, &self.mean, &self.inverse_std);
            });
        self.features.enforce_resident_limit();
    }
}
