//! `lazarus review`: the images of a dataset most worth a person's look,
//! among those that are unlabeled or that the head gets wrong.
//!
//! Probabilities come from the runs' heads on the dataset's cached features
//! (`predict::TrainedHead`); with several runs the consensus is their mean.
//! Strategies, rank 1 first:
//!
//! - `margin`: smallest difference between the two most likely classes of
//!   the consensus (score = p1 - p2, ascending);
//! - `entropy`: highest predictive entropy of the consensus
//!   (score = -sum p ln p, in nats, descending);
//! - `disagreement`: query by committee over two or more runs: the mean
//!   Kullback-Leibler divergence of each run's distribution from the
//!   consensus (score = mean_k KL(p_k || p_mean) in nats, descending;
//!   McCallum and Nigam 1998), zero when every run says the same.
//!
//! `write_sheet` writes `review.csv` and a static contact sheet
//! (`index.html` with JPEG thumbnails in `thumbs/`, linked relatively so the
//! folder can be moved), staged beside the target and renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use crate::features::FeatureSet;
use crate::features::catalog::{self, FeatureKind, FeatureRequest};
use crate::html::escape;
use crate::layout::Layout;
use crate::predict::{PredictError, TrainedHead, load_run_head, top_k};

/// Longest side of a contact-sheet thumbnail, in pixels.
pub const THUMBNAIL_SIZE: u32 = 160;
pub const CSV_FILE: &str = "review.csv";
pub const HTML_FILE: &str = "index.html";
pub const THUMBNAIL_DIR: &str = "thumbs";

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("strategy {strategy} compares runs: give at least 2 with --run, got {given}")]
    TooFewRuns {
        strategy: &'static str,
        given: usize,
    },
    #[error("give at least one run with --run")]
    NoRun,
    #[error(
        "dataset {dataset} has no features with fingerprint {fingerprint} (those run {run}'s head \
         reads, encoder {encoder}): no folder {path}; run `lazarus enqueue --dataset {dataset} \
         --encoder {encoder}` and a worker first"
    )]
    NoFeatures {
        dataset: String,
        fingerprint: String,
        run: String,
        encoder: String,
        path: PathBuf,
    },
    #[error(
        "runs {first} and {other} predict different classes ({first_classes} vs {other_classes}); a committee needs the same classes in the same order"
    )]
    ClassMismatch {
        first: String,
        other: String,
        first_classes: String,
        other_classes: String,
    },
    #[error("dataset {dataset}: no image has features for every run ({runs})")]
    NothingToReview { dataset: String, runs: String },
    #[error("incomplete features for run {run}: {message}")]
    Incomplete { run: String, message: String },
    #[error(transparent)]
    Out(#[from] crate::output_dir::OutputError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Predict(#[from] PredictError),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReviewError + '_ {
    move |source| ReviewError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Margin,
    Entropy,
    Disagreement,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Margin => "margin",
            Strategy::Entropy => "entropy",
            Strategy::Disagreement => "disagreement",
        }
    }

    /// True when a smaller score is more worth a look.
    fn ascending(self) -> bool {
        self == Strategy::Margin
    }
}

/// How to review.
pub struct ReviewConfig {
    pub strategy: Strategy,
    /// How many images to list.
    pub top: usize,
    pub device: Device,
    /// Review the images that have features when some lack them, instead
    /// of refusing.
    pub allow_partial: bool,
}

/// One listed image.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewItem {
    pub rank: usize,
    pub path: PathBuf,
    pub image_id: String,
    pub index: usize,
    pub true_label: Option<String>,
    pub predicted: String,
    /// The consensus probability of the predicted class.
    pub probability: f64,
    pub score: f64,
    /// Labeled, and the prediction differs from the label.
    pub mispredicted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReviewReport {
    pub dataset: String,
    pub runs: Vec<String>,
    pub strategy: Strategy,
    /// Images with features for every run.
    pub scored: usize,
    /// Of those, unlabeled or mispredicted.
    pub candidates: usize,
    pub items: Vec<ReviewItem>,
}

/// One run's head with the dataset's feature rows it reads.
struct Member {
    run: String,
    head: TrainedHead,
    features: FeatureSet,
    /// Each image's first row (view 0).
    row_of_index: HashMap<usize, usize>,
    /// How many of an image's views (from view 0) the run's answers
    /// average (`enqueue --views`, `--eval-views`).
    views_used: usize,
}

/// Scores every image of `dataset` with the runs' heads and lists the
/// `config.top` unlabeled or mispredicted ones most worth a look.
pub fn review(
    layout: &Layout,
    runs: &[String],
    dataset: &str,
    config: &ReviewConfig,
) -> Result<ReviewReport, ReviewError> {
    if runs.is_empty() {
        return Err(ReviewError::NoRun);
    }
    if config.strategy == Strategy::Disagreement && runs.len() < 2 {
        return Err(ReviewError::TooFewRuns {
            strategy: config.strategy.name(),
            given: runs.len(),
        });
    }
    let manifest = crate::dataset::load(layout, dataset)?;
    let mut members: Vec<Member> = Vec::with_capacity(runs.len());
    for run in runs {
        let (head, inputs) = load_run_head(layout, run, &config.device)?;
        let dir = crate::features::feature_dir(layout, &inputs.fingerprint);
        if !dir.is_dir() {
            return Err(ReviewError::NoFeatures {
                dataset: dataset.to_string(),
                fingerprint: inputs.fingerprint.clone(),
                run: run.clone(),
                encoder: inputs.encoder.clone().unwrap_or_else(|| "unknown".into()),
                path: dir,
            });
        }
        let opened = catalog::open(
            layout,
            &FeatureRequest {
                dataset,
                fingerprint: Some(&inputs.fingerprint),
                kind: Some(FeatureKind::Pooled),
                ..FeatureRequest::default()
            },
        )?;
        if !opened.lacking.is_empty() && !config.allow_partial {
            return Err(ReviewError::Incomplete {
                run: run.clone(),
                message: catalog::lacking_message(
                    dataset,
                    opened.info.version,
                    &opened.fingerprint,
                    opened.lacking_by_split(),
                    opened.info.images,
                ),
            });
        }
        let features = opened.features;
        if let Some(first) = members.first()
            && first.head.class_names() != head.class_names()
        {
            return Err(ReviewError::ClassMismatch {
                first: first.run.clone(),
                other: run.clone(),
                first_classes: first.head.class_names().join(","),
                other_classes: head.class_names().join(","),
            });
        }
        // An image's rows are its views, consecutive, view 0 first.
        let views = features.views()?.count();
        let mut row_of_index = HashMap::new();
        for (row, &index) in features.image_indices().iter().enumerate() {
            row_of_index.entry(index).or_insert(row);
        }
        for &first in row_of_index.values() {
            features.check_view_rows(first, views)?;
        }
        members.push(Member {
            run: run.clone(),
            head,
            features,
            row_of_index,
            views_used: inputs.config.eval_views.rows_used(views),
        });
    }
    // Images every run has features for, in manifest order.
    let images: Vec<&crate::dataset::ImageRecord> = manifest
        .images
        .iter()
        .filter(|r| {
            members
                .iter()
                .all(|m| m.row_of_index.contains_key(&r.index))
        })
        .collect();
    if images.is_empty() {
        return Err(ReviewError::NothingToReview {
            dataset: dataset.to_string(),
            runs: runs.join(", "),
        });
    }
    let mut per_run: Vec<Vec<Vec<f32>>> = Vec::with_capacity(members.len());
    for member in &members {
        let firsts: Vec<usize> = images
            .iter()
            .map(|r| member.row_of_index[&r.index])
            .collect();
        let rows = crate::train::data::view_rows(&firsts, member.views_used);
        let probabilities = member.head.probabilities_of_rows(&member.features, &rows)?;
        // As `predict` answers: the mean over the views the run evaluates.
        let classes = member.head.class_names().len();
        let averaged = crate::train::data::average_views(
            &probabilities.concat(),
            classes,
            member.views_used,
            member.views_used,
        );
        per_run.push(
            averaged
                .chunks(classes.max(1))
                .map(|p| p.iter().map(|&v| v as f32).collect())
                .collect(),
        );
    }
    let class_names = members[0].head.class_names();
    let mut candidates: Vec<ReviewItem> = Vec::new();
    for (i, record) in images.iter().enumerate() {
        let distributions: Vec<&[f32]> = per_run.iter().map(|p| p[i].as_slice()).collect();
        let consensus = mean_distribution(&distributions);
        let best = top_k(&consensus, 2);
        let predicted = class_names[best[0].0].clone();
        let mispredicted = record.label.as_ref().is_some_and(|l| *l != predicted);
        if record.label.is_some() && !mispredicted {
            continue;
        }
        let score = match config.strategy {
            Strategy::Margin => margin(&consensus),
            Strategy::Entropy => entropy(&consensus),
            Strategy::Disagreement => mean_divergence_from_consensus(&distributions),
        };
        candidates.push(ReviewItem {
            rank: 0,
            path: record.path.clone(),
            image_id: record.id.clone(),
            index: record.index,
            true_label: record.label.clone(),
            predicted,
            probability: best[0].1 as f64,
            score,
            mispredicted,
        });
    }
    let candidate_count = candidates.len();
    candidates.sort_by(|a, b| {
        let order = if config.strategy.ascending() {
            a.score.total_cmp(&b.score)
        } else {
            b.score.total_cmp(&a.score)
        };
        order.then(a.index.cmp(&b.index))
    });
    candidates.truncate(config.top);
    for (rank, item) in candidates.iter_mut().enumerate() {
        item.rank = rank + 1;
    }
    Ok(ReviewReport {
        dataset: dataset.to_string(),
        runs: runs.to_vec(),
        strategy: config.strategy,
        scored: images.len(),
        candidates: candidate_count,
        items: candidates,
    })
}

/// The element-wise mean of probability distributions.
pub fn mean_distribution(distributions: &[&[f32]]) -> Vec<f32> {
    let classes = distributions[0].len();
    let mut mean = vec![0f64; classes];
    for p in distributions {
        for (m, v) in mean.iter_mut().zip(*p) {
            *m += *v as f64;
        }
    }
    mean.iter()
        .map(|m| (m / distributions.len() as f64) as f32)
        .collect()
}

/// p1 - p2 of the two most likely classes (p1 for a single class).
pub fn margin(p: &[f32]) -> f64 {
    let best = top_k(p, 2);
    best[0].1 as f64 - best.get(1).map_or(0.0, |b| b.1 as f64)
}

/// -sum p ln p, in nats (0 ln 0 = 0).
pub fn entropy(p: &[f32]) -> f64 {
    p.iter()
        .map(|&v| v as f64)
        .filter(|&v| v > 0.0)
        .map(|v| -v * v.ln())
        .sum()
}

/// mean_k KL(p_k || mean), in nats: the committee's disagreement.
pub fn mean_divergence_from_consensus(distributions: &[&[f32]]) -> f64 {
    let consensus = mean_distribution(distributions);
    let total: f64 = distributions
        .iter()
        .map(|p| {
            p.iter()
                .zip(&consensus)
                .map(|(&a, &m)| (a as f64, m as f64))
                .filter(|&(a, m)| a > 0.0 && m > 0.0)
                .map(|(a, m)| a * (a / m).ln())
                .sum::<f64>()
        })
        .sum();
    (total / distributions.len() as f64).max(0.0)
}

/// What `review --out` writes: `review.csv`, `index.html`, `thumbs/NNNN.jpg`.
pub const OUTPUT_KIND: crate::output_dir::Kind = crate::output_dir::Kind {
    verb: "lazarus review",
    recognises: |file| {
        file == CSV_FILE
            || file == HTML_FILE
            || file
                .strip_prefix(THUMBNAIL_DIR)
                .and_then(|rest| rest.strip_prefix('/'))
                .and_then(|name| name.strip_suffix(".jpg"))
                .is_some_and(|rank| !rank.is_empty() && rank.bytes().all(|b| b.is_ascii_digit()))
    },
    replace_without_force: true,
};

/// Writes `review.csv` and the contact sheet into `out`: staged in a temp
/// folder beside it and renamed into place. A previous review there is
/// replaced; a folder holding anything lazarus did not write is refused
/// (see `output_dir`: `force` replaces a review from before markers).
pub fn write_sheet(
    report: &ReviewReport,
    out: &Path,
    options: crate::output_dir::ReplaceOptions,
) -> Result<(), ReviewError> {
    let prior = crate::output_dir::check(out, &OUTPUT_KIND, options)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    let staging = crate::atomic::temp_path_for(out);
    let result = (|| {
        let thumbs = staging.join(THUMBNAIL_DIR);
        std::fs::create_dir_all(&thumbs).map_err(io_error(&thumbs))?;
        let mut written = vec![CSV_FILE.to_string(), HTML_FILE.to_string()];
        let mut previews: Vec<Result<String, String>> = Vec::with_capacity(report.items.len());
        for item in &report.items {
            let name = format!("{THUMBNAIL_DIR}/{:04}.jpg", item.rank);
            previews.push(match thumbnail(&item.path) {
                Ok(bytes) => {
                    let path = staging.join(&name);
                    crate::atomic::write_file(&path, &bytes).map_err(io_error(&path))?;
                    written.push(name.clone());
                    Ok(name)
                }
                Err(reason) => Err(reason),
            });
        }
        let path = staging.join(CSV_FILE);
        crate::atomic::write_file(&path, &csv_bytes(report).map_err(io_error(&path))?)
            .map_err(io_error(&path))?;
        let path = staging.join(HTML_FILE);
        crate::atomic::write_file(&path, contact_sheet(report, &previews).as_bytes())
            .map_err(io_error(&path))?;
        crate::output_dir::write_marker(&staging, &OUTPUT_KIND, &written)?;
        crate::output_dir::publish(&staging, out, &prior)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// `rank,path,true_label,predicted,probability,score,mispredicted`.
pub fn csv_bytes(report: &ReviewReport) -> std::io::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "rank",
        "path",
        "true_label",
        "predicted",
        "probability",
        "score",
        "mispredicted",
    ])?;
    for item in &report.items {
        writer.write_record([
            item.rank.to_string(),
            item.path.display().to_string(),
            item.true_label.clone().unwrap_or_default(),
            item.predicted.clone(),
            format!("{:.6}", item.probability),
            format!("{:.6}", item.score),
            item.mispredicted.to_string(),
        ])?;
    }
    writer.into_inner().map_err(|e| e.into_error())
}

/// A JPEG thumbnail of an image, or why there is none.
fn thumbnail(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let image = crate::preprocess::decode_rgb8(
        &bytes,
        path,
        crate::preprocess::PreprocessConfig::DEFAULT_MAX_PIXELS,
    )
    .map_err(|e| e.to_string())?;
    // Longest side to THUMBNAIL_SIZE; tiny images are scaled up too, so
    // every card shows a visible picture.
    let longest = image.width().max(image.height()) as u64;
    let side = |length: u32| ((length as u64 * THUMBNAIL_SIZE as u64 / longest).max(1)) as u32;
    let small = image::imageops::resize(
        &image,
        side(image.width()),
        side(image.height()),
        image::imageops::FilterType::Triangle,
    );
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .encode_image(&small)
        .map_err(|e| format!("cannot encode the thumbnail of {}: {e}", path.display()))?;
    Ok(out)
}

/// The static HTML page: one card per listed image.
fn contact_sheet(report: &ReviewReport, previews: &[Result<String, String>]) -> String {
    let title = format!(
        "Review of {}: {} by {}",
        report.dataset,
        report.strategy.name(),
        report.runs.join(", ")
    );
    let mut html = String::new();
    html.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    html.push_str(&format!("<title>{}</title>\n", escape(&title)));
    html.push_str(
        "<style>\n\
         body { font-family: sans-serif; margin: 16px; background: #f4f4f4; color: #222; }\n\
         .grid { display: flex; flex-wrap: wrap; gap: 12px; }\n\
         .card { width: 180px; background: #fff; border: 3px solid #9bb; border-radius: 6px; padding: 6px; font-size: 12px; }\n\
         .card.mispredicted { border-color: #d22; background: #fff0f0; }\n\
         .card.unlabeled { border-color: #999; border-style: dashed; }\n\
         .card img { width: 160px; height: 160px; object-fit: contain; background: #ddd; display: block; margin: 0 auto 4px; }\n\
         .noimage { width: 160px; height: 160px; background: #ddd; display: flex; align-items: center; justify-content: center; text-align: center; margin: 0 auto 4px; }\n\
         .rank { font-weight: bold; font-size: 14px; }\n\
         .flag { color: #d22; font-weight: bold; }\n\
         .path { color: #666; word-break: break-all; }\n\
         </style>\n</head>\n<body>\n",
    );
    html.push_str(&format!("<h1>{}</h1>\n", escape(&title)));
    html.push_str(&format!(
        "<p>{} of {} scored images are unlabeled or mispredicted; the {} most worth a look are \
         shown, rank 1 first (score: {}). Red: mispredicted; dashed: unlabeled. \
         <a href=\"{CSV_FILE}\">{CSV_FILE}</a></p>\n<div class=\"grid\">\n",
        report.candidates,
        report.scored,
        report.items.len(),
        match report.strategy {
            Strategy::Margin => "top-1 minus top-2 probability, smallest first",
            Strategy::Entropy => "predictive entropy in nats, highest first",
            Strategy::Disagreement =>
                "mean KL divergence of the runs from their consensus, highest first",
        }
    ));
    for (item, preview) in report.items.iter().zip(previews) {
        let class = if item.mispredicted {
            "card mispredicted"
        } else if item.true_label.is_none() {
            "card unlabeled"
        } else {
            "card"
        };
        let picture = match preview {
            Ok(src) => format!(
                "<img src=\"{}\" alt=\"{}\">",
                escape(src),
                escape(&item.path.display().to_string())
            ),
            Err(reason) => format!("<div class=\"noimage\">{}</div>", escape(reason)),
        };
        let truth = match &item.true_label {
            Some(label) => escape(label),
            None => "<i>unlabeled</i>".to_string(),
        };
        let flag = if item.mispredicted {
            " <span class=\"flag\">mispredicted</span>"
        } else {
            ""
        };
        let name = item
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        html.push_str(&format!(
            "<div class=\"{class}\">{picture}<div class=\"rank\">#{}{flag}</div>\
             <div>predicted: <b>{}</b> ({:.3})</div><div>true: {truth}</div>\
             <div>score: {:.4}</div><div class=\"path\" title=\"{}\">{}</div></div>\n",
            item.rank,
            escape(&item.predicted),
            item.probability,
            item.score,
            escape(&item.path.display().to_string()),
            escape(&name)
        ));
    }
    html.push_str("</div>\n</body>\n</html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_match_hand_computed_values() {
        // margin of [0.5, 0.3, 0.2] = 0.2; entropy = -(0.5 ln 0.5 + 0.3 ln 0.3
        // + 0.2 ln 0.2) = 1.0296530140645737 nats (scipy.stats.entropy gives
        // the same).
        let p = [0.5f32, 0.3, 0.2];
        assert!((margin(&p) - 0.2).abs() < 1e-6);
        assert!((entropy(&p) - 1.029_653_014_064_573_7).abs() < 1e-6);
        // Two runs [1, 0] and [0, 1]: consensus [0.5, 0.5]; each KL is ln 2.
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        let d = mean_divergence_from_consensus(&[&a, &b]);
        assert!((d - std::f64::consts::LN_2).abs() < 1e-9, "{d}");
        // Agreement is zero disagreement.
        assert_eq!(mean_divergence_from_consensus(&[&p, &p]), 0.0);
    }

    #[test]
    fn html_escapes_names() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
