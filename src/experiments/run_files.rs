//! A run's folder (`experiments/runs/RUN/`, [`RunFolder`]) and the names
//! and formats of the files in it, shared by the code that writes them
//! (training) and the code that reads them (`--resume`, `--init-from`,
//! `predict`, `experiments report`). No other module spells a file name.
//!
//! - [`CURVES_FILE`] (`curves.json`): ROC and precision-recall curves of a
//!   binary score, per split ([`ScoreCurves`]); written by binary
//!   classification runs (the second class's probability on the test split)
//!   and anomaly runs (the anomaly score on val and test).
//! - [`DICE_FILE`] (`test_dice.csv`): Dice and IoU per test image of a
//!   segmentation run ([`ImageDice`]).
//! - `metrics.json` (the run report: `test_confusion_matrix` for
//!   classification runs), `config.json` (`class_names`), `model_card.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// ROC and precision-recall curves, per split.
pub const CURVES_FILE: &str = "curves.json";

/// Dice per test image of a segmentation run.
pub const DICE_FILE: &str = "test_dice.csv";

/// The run report a training run writes last (a run without it did not finish).
pub const METRICS_FILE: &str = "metrics.json";

/// The run's recorded inputs (dataset, fingerprint, class names, config).
pub const INPUTS_FILE: &str = "config.json";

/// The run's model card.
pub const MODEL_CARD_FILE: &str = "model_card.json";

/// The run's settings as TOML, for people (`config.json` is what runs read).
pub const CONFIG_TOML_FILE: &str = "config.toml";

/// The kept head of a classification or segmentation run.
pub const HEAD_FILE: &str = "head.safetensors";

/// The trained encoder blocks of a fine-tuned run (`train --unfreeze-from`),
/// beside its head: parameters named as `train::blocks::TopBlocks` names
/// them, and their layout, the encoder and its weights as metadata.
pub const BLOCKS_FILE: &str = "blocks.safetensors";

/// The fitted scorer of an anomaly run.
pub const SCORER_FILE: &str = "scorer.safetensors";

/// An anomaly run's score per val and test image.
pub const SCORES_FILE: &str = "scores.csv";

/// Learning curves, confusion matrices, ROC curves.
pub const PLOTS_DIR: &str = "plots";

/// Resumable checkpoints (`train::checkpoint`) and the best head so far.
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// The best epoch's head file, in [`CHECKPOINTS_DIR`].
pub const BEST_HEAD_FILE: &str = "best.safetensors";

/// The exclusive lock a run's process holds while it runs.
pub const LOCK_FILE: &str = ".lock";

/// A run's folder: where each of its files is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFolder {
    path: PathBuf,
}

impl RunFolder {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RunFolder { path: path.into() }
    }

    /// `experiments/runs/RUN/`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `config.json`: what `--resume`, `predict` and the report read.
    pub fn inputs(&self) -> PathBuf {
        self.path.join(INPUTS_FILE)
    }

    /// `metrics.json`, written last: a run without it did not finish.
    pub fn metrics(&self) -> PathBuf {
        self.path.join(METRICS_FILE)
    }

    pub fn model_card(&self) -> PathBuf {
        self.path.join(MODEL_CARD_FILE)
    }

    pub fn head(&self) -> PathBuf {
        self.path.join(HEAD_FILE)
    }

    pub fn blocks(&self) -> PathBuf {
        self.path.join(BLOCKS_FILE)
    }

    pub fn scorer(&self) -> PathBuf {
        self.path.join(SCORER_FILE)
    }

    pub fn plots(&self) -> PathBuf {
        self.path.join(PLOTS_DIR)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.path.join(CHECKPOINTS_DIR)
    }

    /// `checkpoints/best.safetensors`.
    pub fn best_head(&self) -> PathBuf {
        self.checkpoints().join(BEST_HEAD_FILE)
    }

    pub fn lock(&self) -> PathBuf {
        self.path.join(LOCK_FILE)
    }

    /// Whether the run wrote its report (`metrics.json`).
    pub fn is_finished(&self) -> bool {
        self.metrics().is_file()
    }
}

/// Curves of one binary score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreCurves {
    /// What a positive is: the positive class's name, or `anomalous`.
    pub positive: String,
    pub splits: Vec<SplitCurves>,
}

/// The curves of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitCurves {
    pub split: String,
    pub positives: usize,
    pub negatives: usize,
    /// Area under the ROC curve; `None` without both classes.
    pub roc_auc: Option<f64>,
    /// Average precision (scikit-learn's `average_precision_score`); `None` without positives.
    pub average_precision: Option<f64>,
    /// (false positive rate, true positive rate), from (0, 0) to (1, 1), one
    /// point per distinct score; empty without both classes.
    pub roc: Vec<[f64; 2]>,
    /// (recall, precision), one point per distinct score from the highest
    /// down (recall rises); empty without positives. Average precision is
    /// the area under its steps.
    pub precision_recall: Vec<[f64; 2]>,
}

/// Dice and IoU of one test image, over its tiles' pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDice {
    /// The image's manifest index in its dataset.
    pub image_index: usize,
    pub tiles: usize,
    pub dice: f64,
    pub iou: f64,
}

const DICE_HEADER: [&str; 4] = ["image_index", "tiles", "dice", "iou"];

/// `test_dice.csv`: a header, then one row per image.
pub fn dice_csv(images: &[ImageDice]) -> Vec<u8> {
    let mut text = DICE_HEADER.join(",");
    text.push('\n');
    for image in images {
        text.push_str(&format!(
            "{},{},{},{}\n",
            image.image_index, image.tiles, image.dice, image.iou
        ));
    }
    text.into_bytes()
}

/// Reads `test_dice.csv`; the error names the line and what is wrong with it.
pub fn read_dice_csv(text: &str) -> Result<Vec<ImageDice>, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.split(',').eq(DICE_HEADER) => {}
        Some((_, header)) => {
            return Err(format!(
                "line 1: header `{header}`, expected `{}`",
                DICE_HEADER.join(",")
            ));
        }
        None => return Err("empty file".into()),
    }
    let mut images = Vec::new();
    for (index, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        let parsed = (|| {
            let [image_index, tiles, dice, iou] = fields.as_slice() else {
                return None;
            };
            Some(ImageDice {
                image_index: image_index.parse().ok()?,
                tiles: tiles.parse().ok()?,
                dice: dice.parse().ok()?,
                iou: iou.parse().ok()?,
            })
        })();
        images.push(parsed.ok_or_else(|| {
            format!(
                "line {}: `{line}` is not image_index,tiles,dice,iou",
                index + 1
            )
        })?);
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_csv_reads_back_and_names_bad_lines() {
        let images = vec![
            ImageDice {
                image_index: 3,
                tiles: 2,
                dice: 0.75,
                iou: 0.6,
            },
            ImageDice {
                image_index: 10,
                tiles: 1,
                dice: 1.0,
                iou: 1.0,
            },
        ];
        let text = String::from_utf8(dice_csv(&images)).unwrap();
        assert_eq!(read_dice_csv(&text).unwrap(), images);
        let err = read_dice_csv("image_index,tiles,dice,iou\n1,1,x,0.5\n").unwrap_err();
        assert!(err.starts_with("line 2: `1,1,x,0.5`"), "{err}");
        let err = read_dice_csv("a,b\n").unwrap_err();
        assert!(err.contains("line 1: header `a,b`"), "{err}");
    }
}
