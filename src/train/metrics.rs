//! Classification metrics as pure functions over predicted probabilities.
//!
//! Names follow the contract `<split>/<metric>`, e.g. `val/macro_f1`.

use std::collections::BTreeMap;

use super::TrainError;

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

    /// Arg-max class per example; ties go to the lower index.
    pub fn predicted(&self) -> Vec<usize> {
        (0..self.labels.len())
            .map(|example| {
                let row = self.row(example);
                let mut best = 0;
                for (class, &p) in row.iter().enumerate() {
                    if p > row[best] {
                        best = class;
                    }
                }
                best
            })
            .collect()
    }
}

/// Mean negative log-likelihood of the true class (probabilities clamped at 1e-12).
pub fn log_loss(predictions: &Predictions) -> Result<f64, TrainError> {
    predictions.check()?;
    let total: f64 = predictions
        .labels
        .iter()
        .enumerate()
        .map(|(example, &label)| -(predictions.row(example)[label] as f64).max(1e-12).ln())
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

/// `matrix[true][predicted]` counts.
pub fn confusion_matrix(predictions: &Predictions) -> Result<Vec<Vec<u64>>, TrainError> {
    predictions.check()?;
    let mut matrix = vec![vec![0u64; predictions.class_count]; predictions.class_count];
    for (&label, predicted) in predictions.labels.iter().zip(predictions.predicted()) {
        matrix[label][predicted] += 1;
    }
    Ok(matrix)
}

/// Per-class precision, recall and F1 from a confusion matrix; 0 where undefined.
pub fn class_scores(matrix: &[Vec<u64>]) -> Vec<ClassScores> {
    (0..matrix.len())
        .map(|class| {
            let true_positive = matrix[class][class] as f64;
            let predicted: u64 = matrix.iter().map(|row| row[class]).sum();
            let actual: u64 = matrix[class].iter().sum();
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

/// One-vs-rest ROC-AUC of one class (Mann-Whitney, ties count half); `None`
/// when the class has no positive or no negative example.
pub fn roc_auc_one_vs_rest(predictions: &Predictions, class: usize) -> Option<f64> {
    let mut scored: Vec<(f32, bool)> = predictions
        .labels
        .iter()
        .enumerate()
        .map(|(example, &label)| (predictions.row(example)[class], label == class))
        .collect();
    let positives = scored.iter().filter(|(_, positive)| *positive).count();
    let negatives = scored.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Rank-sum form of Mann-Whitney U in O(n log n): tied scores share their
    // average rank, which counts a tie between classes as half a win.
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
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
    let (p, n) = (positives as f64, negatives as f64);
    Some((positive_rank_sum - p * (p + 1.0) / 2.0) / (p * n))
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
    let scores = class_scores(&matrix);
    let present: Vec<usize> = (0..predictions.class_count)
        .filter(|&c| matrix[c].iter().sum::<u64>() > 0)
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
    for (class, (name, s)) in class_names.iter().zip(&scores).enumerate() {
        out.insert(format!("{split}/precision/{name}"), s.precision);
        out.insert(format!("{split}/recall/{name}"), s.recall);
        out.insert(format!("{split}/f1/{name}"), s.f1);
        if let Some(auc) = roc_auc_one_vs_rest(predictions, class) {
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
}
