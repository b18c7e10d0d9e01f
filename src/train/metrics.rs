//! Classification metrics as pure functions over predicted probabilities.
//!
//! Names follow the contract `<split>/<metric>`, e.g. `val/macro_f1`.
//!
//! A NaN or infinite probability or score is never a hit: an example whose
//! probabilities are not all finite counts as a miss for top-k accuracy, is
//! in no predicted column of the confusion matrix (but still in its class's
//! recall), gets the worst log-loss; in ROC-AUC, average precision and F1 a
//! non-finite score ranks a positive below every negative and a negative
//! above every positive.

use std::collections::BTreeMap;

use super::TrainError;
use crate::experiments::run_files::SplitCurves;

/// Predictions for one split: one probability row per example.
pub struct Predictions<'a> {
    /// Row-major `[examples, classes]` probabilities (each row sums to 1).
    pub probabilities: &'a [f32],
    /// True class index per example.
    pub labels: &'a [usize],
    pub class_count: usize,
}

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Predictions<'_> {
    fn check(&self) -> Result<(), TrainError> {
        if self.class_count == 0 || self.labels.is_empty() {
            return Err(TrainError::Invalid("no examples or no classes".into()));
        }
        if self.probabilities.len() != self.labels.len() * self.class_count {
            return Err(TrainError::Invalid(format!(
                "{} probabilities for {} examples of {} classes",
                self.probabilities.len(),
                self.labels.len(),
                self.class_count
            )));
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l >= self.class_count) {
            return Err(TrainError::Invalid(format!(
                "label {bad} out of range for {} classes",
                self.class_count
            )));
        }
        Ok(())
    }

    fn row(&self, example: usize) -> &[f32] {
        &self.probabilities[example * self.class_count..(example + 1) * self.class_count]
    }

    /// Whether every probability of an example is finite (else it is a miss).
    fn scored(&self, example: usize) -> bool {
        self.row(example).iter().all(|p| p.is_finite())
    }

    /// Arg-max class per example (ties go to the lower index); `None` for an
    /// example whose probabilities are not all finite.
    pub fn predicted(&self) -> Vec<Option<usize>> {
        (0..self.labels.len())
            .map(|example| {
                if !self.scored(example) {
                    return None;
                }
                let row = self.row(example);
                let mut best = 0;
                for (class, &p) in row.iter().enumerate() {
                    if p > row[best] {
                        best = class;
                    }
                }
                Some(best)
            })
            .collect()
    }

    /// Per true class, the examples with a non-finite probability (misses).
    fn unscored_per_class(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.class_count];
        for (example, &label) in self.labels.iter().enumerate() {
            if !self.scored(example) {
                counts[label] += 1;
            }
        }
        counts
    }
}

/// Mean negative log-likelihood of the true class (probabilities clamped at 1e-12).
pub fn log_loss(predictions: &Predictions) -> Result<f64, TrainError> {
    predictions.check()?;
    let total: f64 = predictions
        .labels
        .iter()
        .enumerate()
        .map(|(example, &label)| {
            let p = predictions.row(example)[label] as f64;
            // A non-finite probability gets the worst loss the clamp allows.
            -(if p.is_finite() { p.max(1e-12) } else { 1e-12 }).ln()
        })
        .sum();
    Ok(total / predictions.labels.len() as f64)
}

/// Fraction of examples whose true class is among the `k` most probable.
pub fn top_k_accuracy(predictions: &Predictions, k: usize) -> Result<f64, TrainError> {
    predictions.check()?;
    let hits = predictions
        .labels
        .iter()
        .enumerate()
        .filter(|&(example, &label)| {
            if !predictions.scored(example) {
                return false;
            }
            let row = predictions.row(example);
            // Rank of the true class: classes strictly more probable, or equal with a lower index.
            let rank = row
                .iter()
                .enumerate()
                .filter(|&(class, &p)| p > row[label] || (p == row[label] && class < label))
                .count();
            rank < k
        })
        .count();
    Ok(hits as f64 / predictions.labels.len() as f64)
}

/// `matrix[true][predicted]` counts; examples with a non-finite
/// probability are in no cell (they were predicted as nothing).
pub fn confusion_matrix(predictions: &Predictions) -> Result<Vec<Vec<u64>>, TrainError> {
    predictions.check()?;
    let mut matrix = vec![vec![0u64; predictions.class_count]; predictions.class_count];
    for (&label, predicted) in predictions.labels.iter().zip(predictions.predicted()) {
        if let Some(predicted) = predicted {
            matrix[label][predicted] += 1;
        }
    }
    Ok(matrix)
}

/// Per-class precision, recall and F1 from a confusion matrix; 0 where undefined.
pub fn class_scores(matrix: &[Vec<u64>]) -> Vec<ClassScores> {
    class_scores_with_misses(matrix, &vec![0; matrix.len()])
}

/// `class_scores`, with `unscored[c]` examples of class c outside the
/// matrix (predicted as nothing): they lower that class's recall.
fn class_scores_with_misses(matrix: &[Vec<u64>], unscored: &[u64]) -> Vec<ClassScores> {
    (0..matrix.len())
        .map(|class| {
            let true_positive = matrix[class][class] as f64;
            let predicted: u64 = matrix.iter().map(|row| row[class]).sum();
            let actual: u64 = matrix[class].iter().sum::<u64>() + unscored[class];
            let precision = ratio(true_positive, predicted as f64);
            let recall = ratio(true_positive, actual as f64);
            let f1 = ratio(2.0 * precision * recall, precision + recall);
            ClassScores {
                precision,
                recall,
                f1,
            }
        })
        .collect()
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        0.0
    } else {
        numerator / denominator
    }
}

/// (score, positive) pairs with every non-finite score made a miss: a
/// positive's becomes -inf (below every negative), a negative's +inf.
fn worst_case(scores: &[f64], positives: &[bool]) -> Vec<(f64, bool)> {
    scores
        .iter()
        .zip(positives)
        .map(|(&score, &positive)| match (score.is_finite(), positive) {
            (true, _) => (score, positive),
            (false, true) => (f64::NEG_INFINITY, true),
            (false, false) => (f64::INFINITY, false),
        })
        .collect()
}

/// One-vs-rest ROC-AUC of one class (Mann-Whitney, ties count half); `None`
/// when the class has no positive or no negative example.
pub fn roc_auc_one_vs_rest(predictions: &Predictions, class: usize) -> Option<f64> {
    let (scores, positives): (Vec<f64>, Vec<bool>) = predictions
        .labels
        .iter()
        .enumerate()
        .map(|(example, &label)| (predictions.row(example)[class] as f64, label == class))
        .unzip();
    roc_auc(&scores, &positives)
}

/// ROC-AUC of a binary problem (higher score = more likely positive), as the
/// Mann-Whitney statistic: ties between a positive and a negative count half.
/// `None` when there is no positive or no negative example.
pub fn roc_auc(scores: &[f64], positives: &[bool]) -> Option<f64> {
    let mut scored: Vec<(f64, bool)> = worst_case(scores, positives);
    let positive_count = scored.iter().filter(|(_, positive)| *positive).count();
    let negative_count = scored.len() - positive_count;
    if positive_count == 0 || negative_count == 0 {
        return None;
    }
    // Rank-sum form of Mann-Whitney U in O(n log n): tied scores share their
    // average rank, which counts a tie between classes as half a win.
    scored.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let mut positive_rank_sum = 0.0f64;
    let mut start = 0;
    while start < scored.len() {
        let mut end = start + 1;
        while end < scored.len() && scored[end].0 == scored[start].0 {
            end += 1;
        }
        // Ranks start + 1 ..= end, averaged.
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = scored[start..end].iter().filter(|(_, p)| *p).count();
        positive_rank_sum += average_rank * tied_positives as f64;
        start = end;
    }
    let (p, n) = (positive_count as f64, negative_count as f64);
    Some((positive_rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// Cumulative counts at each distinct score, highest score first: calling
/// everything with a score at or above `threshold` positive gives
/// `true_positives` and `false_positives`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdCounts {
    pub threshold: f64,
    pub true_positives: usize,
    pub false_positives: usize,
}

/// One [`ThresholdCounts`] per distinct score, in decreasing score order.
pub fn threshold_counts(scores: &[f64], positives: &[bool]) -> Vec<ThresholdCounts> {
    let mut scored: Vec<(f64, bool)> = worst_case(scores, positives);
    scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<ThresholdCounts> = Vec::new();
    let (mut true_positives, mut false_positives) = (0, 0);
    for (index, &(score, positive)) in scored.iter().enumerate() {
        if positive {
            true_positives += 1;
        } else {
            false_positives += 1;
        }
        // Close a threshold after the last example with this score.
        if scored.get(index + 1).is_none_or(|next| next.0 != score) {
            out.push(ThresholdCounts {
                threshold: score,
                true_positives,
                false_positives,
            });
        }
    }
    out
}

/// The ROC curve as (false positive rate, true positive rate) points from
/// (0, 0) to (1, 1), one per distinct score; `None` without both classes.
pub fn roc_curve(scores: &[f64], positives: &[bool]) -> Option<Vec<(f64, f64)>> {
    let positive_count = positives.iter().filter(|p| **p).count();
    let negative_count = positives.len() - positive_count;
    if positive_count == 0 || negative_count == 0 {
        return None;
    }
    let mut points = vec![(0.0, 0.0)];
    points.extend(threshold_counts(scores, positives).iter().map(|c| {
        (
            c.false_positives as f64 / negative_count as f64,
            c.true_positives as f64 / positive_count as f64,
        )
    }));
    Some(points)
}

/// Area under the precision-recall curve as average precision (scikit-learn's
/// `average_precision_score`): the sum over distinct thresholds of
/// (recall gained) x precision, without interpolation. `None` without positives.
pub fn average_precision(scores: &[f64], positives: &[bool]) -> Option<f64> {
    let positive_count = positives.iter().filter(|p| **p).count();
    if positive_count == 0 {
        return None;
    }
    let mut previous_recall = 0.0;
    let mut area = 0.0;
    for c in threshold_counts(scores, positives) {
        let recall = c.true_positives as f64 / positive_count as f64;
        let precision = c.true_positives as f64 / (c.true_positives + c.false_positives) as f64;
        area += (recall - previous_recall) * precision;
        previous_recall = recall;
    }
    Some(area)
}

/// The precision-recall curve as (recall, precision) points, one per
/// distinct score from the highest down: scikit-learn's
/// `precision_recall_curve` reversed, without its final (recall 0,
/// precision 1) point. `None` without positives.
pub fn precision_recall_curve(scores: &[f64], positives: &[bool]) -> Option<Vec<(f64, f64)>> {
    let positive_count = positives.iter().filter(|p| **p).count();
    if positive_count == 0 {
        return None;
    }
    Some(
        threshold_counts(scores, positives)
            .iter()
            .map(|c| {
                (
                    c.true_positives as f64 / positive_count as f64,
                    c.true_positives as f64 / (c.true_positives + c.false_positives) as f64,
                )
            })
            .collect(),
    )
}

/// ROC and precision-recall curves of one split's binary scores, with
/// their areas, as `curves.json` records them.
pub fn split_curves(split: &str, scores: &[f64], positives: &[bool]) -> SplitCurves {
    let pairs = |points: Option<Vec<(f64, f64)>>| -> Vec<[f64; 2]> {
        points
            .unwrap_or_default()
            .into_iter()
            .map(|(x, y)| [x, y])
            .collect()
    };
    let positive_count = positives.iter().filter(|p| **p).count();
    SplitCurves {
        split: split.to_string(),
        positives: positive_count,
        negatives: positives.len() - positive_count,
        roc_auc: roc_auc(scores, positives),
        average_precision: average_precision(scores, positives),
        roc: pairs(roc_curve(scores, positives)),
        precision_recall: pairs(precision_recall_curve(scores, positives)),
    }
}

/// The threshold with the highest F1 when scores at or above it are called positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BestF1 {
    pub f1: f64,
    pub threshold: f64,
    pub precision: f64,
    pub recall: f64,
}

/// The distinct score with the best F1 (the highest such score on ties);
/// `None` without positives.
pub fn best_f1(scores: &[f64], positives: &[bool]) -> Option<BestF1> {
    let positive_count = positives.iter().filter(|p| **p).count();
    if positive_count == 0 {
        return None;
    }
    let mut best: Option<BestF1> = None;
    for c in threshold_counts(scores, positives) {
        let precision = c.true_positives as f64 / (c.true_positives + c.false_positives) as f64;
        let recall = c.true_positives as f64 / positive_count as f64;
        let f1 = ratio(2.0 * precision * recall, precision + recall);
        if best.is_none_or(|b| f1 > b.f1) {
            best = Some(BestF1 {
                f1,
                threshold: c.threshold,
                precision,
                recall,
            });
        }
    }
    best
}

/// F1 when scores at or above `threshold` are called positive (0 where undefined).
pub fn f1_at(scores: &[f64], positives: &[bool], threshold: f64) -> f64 {
    let (mut true_positives, mut called, mut actual) = (0usize, 0usize, 0usize);
    for (score, positive) in worst_case(scores, positives) {
        let call = score >= threshold;
        called += call as usize;
        actual += positive as usize;
        true_positives += (call && positive) as usize;
    }
    let precision = ratio(true_positives as f64, called as f64);
    let recall = ratio(true_positives as f64, actual as f64);
    ratio(2.0 * precision * recall, precision + recall)
}

/// All scalar metrics of one split, keyed `<split>/<metric>`; per-class
/// scores are keyed `<split>/<metric>/<class name>`.
pub fn split_metrics(
    split: &str,
    predictions: &Predictions,
    class_names: &[String],
) -> Result<BTreeMap<String, f64>, TrainError> {
    predictions.check()?;
    if class_names.len() != predictions.class_count {
        return Err(TrainError::Invalid(format!(
            "{} class names for {} classes",
            class_names.len(),
            predictions.class_count
        )));
    }
    let mut out = BTreeMap::new();
    let matrix = confusion_matrix(predictions)?;
    let unscored = predictions.unscored_per_class();
    let scores = class_scores_with_misses(&matrix, &unscored);
    let present: Vec<usize> = (0..predictions.class_count)
        .filter(|&c| matrix[c].iter().sum::<u64>() + unscored[c] > 0)
        .collect();
    out.insert(format!("{split}/loss"), log_loss(predictions)?);
    out.insert(format!("{split}/accuracy"), top_k_accuracy(predictions, 1)?);
    if predictions.class_count >= 5 {
        out.insert(format!("{split}/top5"), top_k_accuracy(predictions, 5)?);
    }
    let macro_f1 = scores.iter().map(|s| s.f1).sum::<f64>() / scores.len() as f64;
    out.insert(format!("{split}/macro_f1"), macro_f1);
    // Balanced accuracy averages recall over classes present in this split.
    let balanced = present.iter().map(|&c| scores[c].recall).sum::<f64>() / present.len() as f64;
    out.insert(format!("{split}/balanced_accuracy"), balanced);
    // One sort per class over the whole split: the costliest metric, so
    // the classes run in parallel.
    let aucs: Vec<Option<f64>> = {
        use rayon::prelude::*;
        (0..predictions.class_count)
            .into_par_iter()
            .map(|class| roc_auc_one_vs_rest(predictions, class))
            .collect()
    };
    for ((name, s), auc) in class_names.iter().zip(&scores).zip(aucs) {
        out.insert(format!("{split}/precision/{name}"), s.precision);
        out.insert(format!("{split}/recall/{name}"), s.recall);
        out.insert(format!("{split}/f1/{name}"), s.f1);
        if let Some(auc) = auc {
            out.insert(format!("{split}/roc_auc/{name}"), auc);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Four examples, three classes; labels 0,0,1,2; arg-max 0,1,1,0.
    const PROBABILITIES: [f32; 12] = [
        0.7, 0.2, 0.1, //
        0.3, 0.6, 0.1, //
        0.1, 0.8, 0.1, //
        0.5, 0.2, 0.3, //
    ];
    const LABELS: [usize; 4] = [0, 0, 1, 2];

    fn predictions() -> Predictions<'static> {
        Predictions {
            probabilities: &PROBABILITIES,
            labels: &LABELS,
            class_count: 3,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn confusion_and_class_scores_match_hand_counts() {
        // Hand-counted: true 0 -> predicted 0,1; true 1 -> 1; true 2 -> 0.
        let matrix = confusion_matrix(&predictions()).unwrap();
        assert_eq!(matrix, vec![vec![1, 1, 0], vec![0, 1, 0], vec![1, 0, 0]]);
        let scores = class_scores(&matrix);
        // Class 0: precision 1/2, recall 1/2, F1 1/2. Class 1: 1/2, 1, 2/3. Class 2: 0.
        assert!(close(scores[0].precision, 0.5) && close(scores[0].recall, 0.5));
        assert!(close(scores[1].precision, 0.5) && close(scores[1].recall, 1.0));
        assert!(close(scores[1].f1, 2.0 / 3.0));
        assert_eq!(scores[2].f1, 0.0);
    }

    #[test]
    fn split_metrics_match_hand_computed_values() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m = split_metrics("val", &predictions(), &names).unwrap();
        // Hand-computed: loss = -(ln .7 + ln .3 + ln .8 + ln .3)/4.
        let loss = -(0.7f64.ln() + 0.3f64.ln() + 0.8f64.ln() + 0.3f64.ln()) / 4.0;
        assert!((m["val/loss"] - loss).abs() < 1e-6);
        assert!(close(m["val/accuracy"], 0.5));
        // macro-F1 = (1/2 + 2/3 + 0)/3; balanced accuracy = (1/2 + 1 + 0)/3.
        assert!(close(m["val/macro_f1"], (0.5 + 2.0 / 3.0) / 3.0));
        assert!(close(m["val/balanced_accuracy"], 0.5));
        assert!(
            !m.contains_key("val/top5"),
            "top-5 needs at least 5 classes"
        );
        // Class c: positive score .3 vs negatives .1,.1,.1 -> AUC 1.
        assert!(close(m["val/roc_auc/c"], 1.0));
        // Class a: positives .7,.3 vs negatives .1,.5 -> wins 2 + 1 = 3 of 4.
        assert!(close(m["val/roc_auc/a"], 0.75));
    }

    #[test]
    fn top_k_counts_true_class_rank() {
        // Top-2 hand count: example 3 (label 2, score .3 ranks 2nd) joins; example 1 (.3 ranks 2nd) joins.
        assert!(close(top_k_accuracy(&predictions(), 2).unwrap(), 1.0));
    }

    #[test]
    fn mismatched_shapes_are_rejected() {
        let bad = Predictions {
            probabilities: &PROBABILITIES[..11],
            labels: &LABELS,
            class_count: 3,
        };
        assert!(log_loss(&bad).is_err());
    }

    // Six examples with a tie across classes (0.35). Reference values from
    // scikit-learn 1.9.1: roc_auc_score 0.8333333333333333,
    // average_precision_score 0.8666666666666667, roc_curve(drop_intermediate=False)
    // fpr [0, 0, 0, 1/3, 2/3, 1], tpr [0, 1/3, 2/3, 2/3, 1, 1]; F1 from
    // precision_recall_curve is highest (0.8) at threshold 0.7.
    const BINARY_SCORES: [f64; 6] = [0.1, 0.4, 0.35, 0.8, 0.35, 0.7];
    const BINARY_POSITIVES: [bool; 6] = [false, false, true, true, false, true];

    #[test]
    fn binary_metrics_match_scikit_learn() {
        let (s, y) = (&BINARY_SCORES, &BINARY_POSITIVES);
        assert!(close(roc_auc(s, y).unwrap(), 0.8333333333333333));
        assert!(close(average_precision(s, y).unwrap(), 0.8666666666666667));
        let curve = roc_curve(s, y).unwrap();
        let expected = [
            (0.0, 0.0),
            (0.0, 1.0 / 3.0),
            (0.0, 2.0 / 3.0),
            (1.0 / 3.0, 2.0 / 3.0),
            (2.0 / 3.0, 1.0),
            (1.0, 1.0),
        ];
        assert_eq!(curve.len(), expected.len());
        for (got, want) in curve.iter().zip(expected) {
            assert!(close(got.0, want.0) && close(got.1, want.1), "{curve:?}");
        }
        // scikit-learn: precision_recall_curve gives precision
        // [1/2, 3/5, 2/3, 1, 1, 1], recall [1, 1, 2/3, 2/3, 1/3, 0].
        let pr = precision_recall_curve(s, y).unwrap();
        let expected = [
            (1.0 / 3.0, 1.0),
            (2.0 / 3.0, 1.0),
            (2.0 / 3.0, 2.0 / 3.0),
            (1.0, 0.6),
            (1.0, 0.5),
        ];
        assert_eq!(pr.len(), expected.len(), "{pr:?}");
        for (got, want) in pr.iter().zip(expected) {
            assert!(close(got.0, want.0) && close(got.1, want.1), "{pr:?}");
        }
        let curves = split_curves("test", s, y);
        assert_eq!((curves.positives, curves.negatives), (3, 3));
        assert_eq!(curves.roc.len(), 6);
        assert!(close(curves.average_precision.unwrap(), 0.8666666666666667));
        let best = best_f1(s, y).unwrap();
        assert!(close(best.f1, 0.8) && best.threshold == 0.7, "{best:?}");
        assert!(close(f1_at(s, y, 0.7), 0.8));
        // scikit-learn's documented example: roc_auc_score 0.75, average precision 0.8333.
        let (s, y) = ([0.1, 0.4, 0.35, 0.8], [false, false, true, true]);
        assert!(close(roc_auc(&s, &y).unwrap(), 0.75));
        assert!(close(
            average_precision(&s, &y).unwrap(),
            0.8333333333333333
        ));
        assert_eq!(roc_auc(&s, &[true; 4]), None, "one class only");
    }

    #[test]
    fn nan_probabilities_are_misses_everywhere() {
        // Example 1 (label 0) and example 3 (label 2) have NaN rows: before,
        // every comparison with NaN was false and both counted as hits.
        let nan = f32::NAN;
        let probabilities = [
            0.7, 0.2, 0.1, //
            nan, nan, nan, //
            0.1, 0.8, 0.1, //
            0.2, nan, 0.3, //
        ];
        let p = Predictions {
            probabilities: &probabilities,
            labels: &LABELS,
            class_count: 3,
        };
        // Hand count: hits are examples 0 and 2 only.
        assert!(close(top_k_accuracy(&p, 1).unwrap(), 0.5));
        assert!(close(top_k_accuracy(&p, 3).unwrap(), 0.5));
        let matrix = confusion_matrix(&p).unwrap();
        assert_eq!(matrix, vec![vec![1, 0, 0], vec![0, 1, 0], vec![0, 0, 0]]);
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m = split_metrics("val", &p, &names).unwrap();
        // Class a: recall 1/2 (its NaN example is a miss), precision 1; c: 0.
        assert!(close(m["val/recall/a"], 0.5) && close(m["val/precision/a"], 1.0));
        assert!(close(m["val/recall/c"], 0.0));
        assert!(close(m["val/balanced_accuracy"], (0.5 + 1.0 + 0.0) / 3.0));
        assert!(m["val/loss"].is_finite());
        // All NaN: nothing is a hit, the AUC is the worst.
        let all_nan = [nan; 12];
        let p = Predictions {
            probabilities: &all_nan,
            labels: &LABELS,
            class_count: 3,
        };
        assert_eq!(top_k_accuracy(&p, 1).unwrap(), 0.0);
        assert_eq!(
            split_metrics("val", &p, &names).unwrap()["val/accuracy"],
            0.0
        );
        let (s, y) = ([f64::NAN, 0.2, f64::NAN, 0.9], [true, false, false, true]);
        // Ranked: positive NaN lowest, negative NaN highest: wins 1 of 4.
        assert!(close(roc_auc(&s, &y).unwrap(), 0.25));
        assert!(close(f1_at(&s, &y, 0.5), 2.0 * 0.5 * 0.5 / (0.5 + 0.5)));
    }
}
