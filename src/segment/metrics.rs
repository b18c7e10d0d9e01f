//! Segmentation metrics from a pixel confusion matrix: Dice, IoU, pixel
//! accuracy, precision and recall. All but pixel accuracy are over the
//! foreground classes (1 and up), pooled over every pixel of a split, and
//! averaged over the classes where they are defined (Dice and IoU: in the
//! truth or the prediction; recall: in the truth; precision: predicted).

use std::collections::BTreeMap;

/// Pixel counts: `counts[truth][predicted]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelConfusion {
    counts: Vec<Vec<u64>>,
}

impl PixelConfusion {
    /// `classes` includes the background (2 for binary masks).
    pub fn new(classes: usize) -> Self {
        PixelConfusion {
            counts: vec![vec![0; classes]; classes],
        }
    }

    pub fn add(&mut self, truth: &[u8], predicted: &[u8]) {
        for (&t, &p) in truth.iter().zip(predicted) {
            self.counts[t as usize][p as usize] += 1;
        }
    }

    /// The mean of `score(tp, fp, fn)` over the foreground classes where it
    /// is defined (Some); 1 when it is defined for none.
    fn per_class(&self, score: impl Fn(u64, u64, u64) -> Option<f64>) -> f64 {
        let classes = self.counts.len();
        let mut total = 0.0;
        let mut counted = 0;
        for class in 1..classes {
            let tp = self.counts[class][class];
            let fn_ = self.counts[class].iter().sum::<u64>() - tp;
            let fp = (0..classes).map(|t| self.counts[t][class]).sum::<u64>() - tp;
            if let Some(value) = score(tp, fp, fn_) {
                total += value;
                counted += 1;
            }
        }
        // No foreground anywhere, and none predicted: a perfect answer.
        if counted == 0 {
            1.0
        } else {
            total / counted as f64
        }
    }

    /// 2 TP / (2 TP + FP + FN), averaged over foreground classes.
    pub fn dice(&self) -> f64 {
        self.per_class(|tp, fp, fn_| {
            (tp + fp + fn_ > 0).then(|| 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64)
        })
    }

    /// TP / (TP + FP + FN), averaged over foreground classes.
    pub fn iou(&self) -> f64 {
        self.per_class(|tp, fp, fn_| {
            (tp + fp + fn_ > 0).then(|| tp as f64 / (tp + fp + fn_) as f64)
        })
    }

    /// TP / (TP + FN), averaged over the foreground classes in the truth.
    pub fn recall(&self) -> f64 {
        self.per_class(|tp, _, fn_| (tp + fn_ > 0).then(|| tp as f64 / (tp + fn_) as f64))
    }

    /// TP / (TP + FP), averaged over the foreground classes predicted.
    pub fn precision(&self) -> f64 {
        self.per_class(|tp, fp, _| (tp + fp > 0).then(|| tp as f64 / (tp + fp) as f64))
    }

    /// Correct pixels over all pixels.
    pub fn pixel_accuracy(&self) -> f64 {
        let total: u64 = self.counts.iter().flatten().sum();
        let correct: u64 = (0..self.counts.len()).map(|c| self.counts[c][c]).sum();
        if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        }
    }

    /// `split/dice`, `split/iou`, `split/pixel_accuracy`, and the foreground
    /// `split/precision` and `split/recall`.
    pub fn metrics(&self, split: &str) -> BTreeMap<String, f64> {
        BTreeMap::from([
            (format!("{split}/dice"), self.dice()),
            (format!("{split}/iou"), self.iou()),
            (format!("{split}/pixel_accuracy"), self.pixel_accuracy()),
            (format!("{split}/precision"), self.precision()),
            (format!("{split}/recall"), self.recall()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_scores_match_hand_counts() {
        // truth 1 1 1 0 0 0, predicted 1 1 0 1 0 0: TP 2, FN 1, FP 1, TN 2.
        let mut confusion = PixelConfusion::new(2);
        confusion.add(&[1, 1, 1, 0, 0, 0], &[1, 1, 0, 1, 0, 0]);
        assert!((confusion.dice() - 4.0 / 6.0).abs() < 1e-12);
        assert!((confusion.iou() - 2.0 / 4.0).abs() < 1e-12);
        assert!((confusion.pixel_accuracy() - 4.0 / 6.0).abs() < 1e-12);
        assert!((confusion.recall() - 2.0 / 3.0).abs() < 1e-12);
        assert!((confusion.precision() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn index_masks_average_the_foreground_classes_that_occur() {
        // Class 1 perfect (dice 1), class 2 half found (TP 1, FN 1: dice 2/3),
        // class 3 absent everywhere (skipped).
        let mut confusion = PixelConfusion::new(4);
        confusion.add(&[0, 1, 1, 2, 2], &[0, 1, 1, 2, 0]);
        assert!((confusion.dice() - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((confusion.iou() - (1.0 + 0.5) / 2.0).abs() < 1e-12);
        // Recall: class 1 2/2, class 2 1/2; precision: 2/2 and 1/1.
        assert!((confusion.recall() - 0.75).abs() < 1e-12);
        assert!((confusion.precision() - 1.0).abs() < 1e-12);
    }
}
