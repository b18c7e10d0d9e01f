//! What the report shows, worked out from a snapshot before any page is
//! written: metric and parameter columns, best runs, experiments, and the
//! comparison pages. Rankings and ablation tables come from the same
//! functions as `experiments best`, `ablate` and `compare`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::super::db::Fail;
use super::super::query::{ablation_table, rank_by};
use super::super::{
    AblationQuery, AblationReport, ExperimentsError, ParamValue, RunSnapshot, RunStatus,
    direction_of,
};

/// Metrics a report prefers as its headline, in order, when `--metric` is not given.
const PREFERRED_METRICS: [&str; 8] = [
    "test/accuracy",
    "test/dice",
    "test/roc_auc",
    "test/pixel_roc_auc",
    "test/macro_f1",
    "val/accuracy",
    "val/dice",
    "val/roc_auc",
];

/// Runs a default comparison page puts side by side.
pub const TOP_RUNS_COMPARED: usize = 5;

/// The parameter whose levels are pooled (mean ± std over seeds), never an axis.
pub const SEED_PARAM: &str = "seed";

pub struct Model {
    /// Every summary metric of the selected runs, headline first.
    pub metrics: Vec<String>,
    /// Parameters whose value differs between selected runs.
    pub params: Vec<String>,
    /// Best finished run per summary metric over the selection.
    pub best: BTreeMap<String, usize>,
    pub primary: Option<String>,
    pub experiments: Vec<ExperimentModel>,
    pub comparisons: Vec<ComparisonModel>,
}

pub struct ExperimentModel {
    pub name: String,
    pub slug: String,
    pub runs: Vec<usize>,
    /// Parameters that vary within the experiment.
    pub params: Vec<String>,
    /// Those that are ablation and parallel-coordinate axes (all but the seed).
    pub axes: Vec<String>,
    /// Headline summary metrics of its finished runs, the primary one first.
    pub metrics: Vec<String>,
    pub primary: Option<String>,
    pub best: BTreeMap<String, usize>,
}

pub struct ComparisonModel {
    pub title: String,
    pub slug: String,
    pub runs: Vec<usize>,
    /// Why these runs, in words, before [`ComparisonModel::command`].
    pub why: String,
    /// The terminal command that shows the same.
    pub command: String,
}

impl Model {
    /// `compare`: the run id lists of extra comparison pages, each checked
    /// against the selection.
    pub fn new(
        runs: &[RunSnapshot],
        wanted_metric: Option<&str>,
        compare: &[Vec<String>],
    ) -> Result<Self, ExperimentsError> {
        let index_of: HashMap<&str, usize> = runs
            .iter()
            .enumerate()
            .map(|(i, run)| (run.detail.run.id.as_str(), i))
            .collect();
        let all: Vec<usize> = (0..runs.len()).collect();
        let metrics_found: BTreeSet<&str> = runs
            .iter()
            .flat_map(|run| run.detail.summary.keys().map(String::as_str))
            .collect();
        if let Some(metric) = wanted_metric
            && !runs.is_empty()
            && !metrics_found.contains(metric)
        {
            return Err(ExperimentsError::UnknownMetric {
                metric: metric.to_string(),
                known: metrics_found.iter().map(|m| m.to_string()).collect(),
            });
        }
        let primary = pick_primary(&metrics_found, wanted_metric);
        let metrics = ordered_metrics(metrics_found, primary.as_deref());
        let params = varying_params(runs, &all);
        let scores: Vec<String> = metrics.iter().filter(|m| is_score(m)).cloned().collect();
        let best = best_per_metric(runs, &all, &scores);

        let mut experiments: Vec<ExperimentModel> = Vec::new();
        let mut slugs = Slugs::default();
        for (i, run) in runs.iter().enumerate() {
            let name = &run.detail.run.experiment;
            match experiments.iter_mut().find(|e| &e.name == name) {
                Some(experiment) => experiment.runs.push(i),
                None => experiments.push(ExperimentModel {
                    name: name.clone(),
                    slug: slugs.take(name),
                    runs: vec![i],
                    params: Vec::new(),
                    axes: Vec::new(),
                    metrics: Vec::new(),
                    primary: None,
                    best: BTreeMap::new(),
                }),
            }
        }
        let mut comparisons = Vec::new();
        let mut comparison_slugs = Slugs::default();
        for experiment in &mut experiments {
            experiment.params = varying_params(runs, &experiment.runs);
            experiment.axes = axes(runs, &experiment.runs, &experiment.params);
            let finished_metrics: BTreeSet<&str> = experiment
                .runs
                .iter()
                .map(|&i| &runs[i].detail)
                .filter(|d| d.run.status == RunStatus::Finished)
                .flat_map(|d| d.summary.keys().map(String::as_str))
                .filter(|key| is_headline(key) && is_score(key))
                .collect();
            experiment.primary = pick_primary(&finished_metrics, wanted_metric);
            experiment.metrics = ordered_metrics(finished_metrics, experiment.primary.as_deref());
            experiment.best = best_per_metric(runs, &experiment.runs, &experiment.metrics);
            if let Some(metric) = &experiment.primary {
                let ranked = ranked_runs(runs, &experiment.runs, metric);
                if ranked.len() >= 2 {
                    let top: Vec<usize> = ranked.into_iter().take(TOP_RUNS_COMPARED).collect();
                    comparisons.push(ComparisonModel {
                        title: format!("{}: top {} by {metric}", experiment.name, top.len()),
                        slug: comparison_slugs.take(&format!("{}-top", experiment.name)),
                        why: format!(
                            "The best {} finished runs of experiment {} by {metric}, as ranked by",
                            top.len(),
                            experiment.name,
                        ),
                        command: format!(
                            "lazarus experiments best --metric {metric} --where experiment={} --top {}",
                            experiment.name,
                            top.len()
                        ),
                        runs: top,
                    });
                }
            }
        }
        for ids in compare {
            if ids.len() < 2 {
                return Err(ExperimentsError::Invalid(format!(
                    "--compare {}: a comparison needs at least two runs",
                    ids.join(",")
                )));
            }
            let mut members = Vec::with_capacity(ids.len());
            for id in ids {
                let index = index_of.get(id.as_str()).copied().ok_or_else(|| {
                    ExperimentsError::Invalid(format!(
                        "--compare {}: run `{id}` is not among the {} runs of this report \
                         (`lazarus experiments list` shows run ids)",
                        ids.join(","),
                        runs.len()
                    ))
                })?;
                members.push(index);
            }
            comparisons.push(ComparisonModel {
                title: ids.join(" vs "),
                slug: comparison_slugs.take(&ids.join("-")),
                why: "The runs given with --compare, as shown by".to_string(),
                command: format!("lazarus experiments compare {}", ids.join(" ")),
                runs: members,
            });
        }
        Ok(Self {
            metrics,
            params,
            best,
            primary,
            experiments,
            comparisons,
        })
    }
}

/// A metric without a per-class suffix: `test/accuracy`, not `test/recall/cat`.
pub fn is_headline(key: &str) -> bool {
    key.matches('/').count() <= 1
}

/// Whether a summary metric scores a run (so a best run is marked for it),
/// rather than describing it: `best_epoch`, `epochs_run`, `peak_rss_bytes`,
/// what an anomaly fit saw (`train/memory_bank`, `train/shrinkage`), image
/// counts (`test/normal`, `test/excluded`) and decision thresholds are not
/// scores. Per-class metrics (`test/recall/normal`) always are.
pub fn is_score(key: &str) -> bool {
    match key.split('/').collect::<Vec<_>>().as_slice() {
        [_] | ["train", _] => false,
        [_, name] => {
            let count = matches!(*name, "normal" | "anomalous" | "excluded" | "skipped_steps");
            let threshold = name.ends_with("threshold") && !name.starts_with("f1_at");
            !(count || threshold)
        }
        _ => true,
    }
}

/// The parameters an experiment's ablations and parallel coordinates use:
/// those that vary, but not the seed (pooled), nor one that only mirrors
/// another: missing where that one has a single value per level (an MLP's
/// `hidden` or `activation` beside `head`).
fn axes(runs: &[RunSnapshot], members: &[usize], params: &[String]) -> Vec<String> {
    let value = |i: usize, key: &str| runs[i].detail.params.get(key);
    let complete = |key: &str| members.iter().all(|&i| value(i, key).is_some());
    // Whether `key`'s value is a function of `other`'s.
    let determined_by = |key: &str, other: &str| {
        let mut seen: Vec<(Option<&ParamValue>, Option<&ParamValue>)> = Vec::new();
        members.iter().all(|&i| {
            let (from, to) = (value(i, other), value(i, key));
            match seen.iter().find(|(f, _)| *f == from) {
                Some((_, t)) => *t == to,
                None => {
                    seen.push((from, to));
                    true
                }
            }
        })
    };
    params
        .iter()
        .filter(|p| p.as_str() != SEED_PARAM)
        .filter(|p| {
            complete(p)
                || !params.iter().any(|q| {
                    q != *p && q.as_str() != SEED_PARAM && complete(q) && determined_by(p, q)
                })
        })
        .cloned()
        .collect()
}

/// Order of metrics in tables: test, then validation, then others; per-class
/// after those; what is not a score last.
fn metric_rank(key: &str) -> (u8, u8, &str) {
    let split = if key.starts_with("test/") {
        0
    } else if key.starts_with("val/") {
        1
    } else if key.starts_with("train/") {
        2
    } else {
        3
    };
    let group = if !is_score(key) {
        2
    } else {
        u8::from(!is_headline(key))
    };
    (group, split, key)
}

fn ordered_metrics(keys: BTreeSet<&str>, primary: Option<&str>) -> Vec<String> {
    let mut keys: Vec<&str> = keys.into_iter().collect();
    keys.sort_by(|a, b| {
        (Some(*b) == primary)
            .cmp(&(Some(*a) == primary))
            .then_with(|| metric_rank(a).cmp(&metric_rank(b)))
    });
    keys.into_iter().map(str::to_string).collect()
}

fn pick_primary(keys: &BTreeSet<&str>, wanted: Option<&str>) -> Option<String> {
    if let Some(wanted) = wanted
        && keys.contains(wanted)
    {
        return Some(wanted.to_string());
    }
    PREFERRED_METRICS
        .iter()
        .find(|m| keys.contains(**m))
        .map(|m| m.to_string())
        .or_else(|| {
            let mut headline: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|k| is_headline(k) && is_score(k))
                .collect();
            headline.sort_by_key(|k| metric_rank(k));
            headline.first().map(|k| k.to_string())
        })
}

/// Parameter keys whose value (or absence) differs between the runs.
pub fn varying_params(runs: &[RunSnapshot], members: &[usize]) -> Vec<String> {
    let keys: BTreeSet<&String> = members
        .iter()
        .flat_map(|&i| runs[i].detail.params.keys())
        .collect();
    keys.into_iter()
        .filter(|key| {
            let mut values = members.iter().map(|&i| runs[i].detail.params.get(*key));
            let first = values.next().flatten();
            values.any(|value| value != first)
        })
        .cloned()
        .collect()
}

/// Finished runs among `members` that have `metric`, best first (ties: earlier run first).
pub fn ranked_runs(runs: &[RunSnapshot], members: &[usize], metric: &str) -> Vec<usize> {
    let mut found: Vec<(usize, f64)> = members
        .iter()
        .filter(|&&i| runs[i].detail.run.status == RunStatus::Finished)
        .filter_map(|&i| runs[i].detail.summary.get(metric).map(|v| (i, *v)))
        .collect();
    rank_by(&mut found, direction_of(metric), |(_, value)| *value);
    found.into_iter().map(|(i, _)| i).collect()
}

fn best_per_metric(
    runs: &[RunSnapshot],
    members: &[usize],
    metrics: &[String],
) -> BTreeMap<String, usize> {
    metrics
        .iter()
        .filter_map(|metric| {
            ranked_runs(runs, members, metric)
                .first()
                .map(|&i| (metric.clone(), i))
        })
        .collect()
}

/// The ablation table `experiments ablate --by BY --metric METRIC` gives
/// over these runs (finished ones with the metric, in run id order).
pub fn ablation(
    runs: &[RunSnapshot],
    members: &[usize],
    by: &[String],
    metric: &str,
) -> Option<AblationReport> {
    let found = members
        .iter()
        .filter(|&&i| runs[i].detail.run.status == RunStatus::Finished)
        .filter_map(|&i| {
            let detail = &runs[i].detail;
            detail
                .summary
                .get(metric)
                .map(|v| (detail.run.id.clone(), *v))
        });
    let params_by_id: HashMap<&str, &BTreeMap<String, ParamValue>> = members
        .iter()
        .map(|&i| (runs[i].detail.run.id.as_str(), &runs[i].detail.params))
        .collect();
    let query = AblationQuery {
        by: by.to_vec(),
        metric: metric.to_string(),
        wheres: Vec::new(),
        baseline: None,
    };
    ablation_table(&query, found, |run| {
        params_by_id
            .get(run)
            .map(|params| vec![(*params).clone()])
            .ok_or_else(|| Fail::Refused(ExperimentsError::Invalid(format!("no run {run}"))))
    })
    .ok()
}

/// File-name-safe, unique names for pages.
#[derive(Default)]
pub struct Slugs {
    taken: BTreeSet<String>,
}

impl Slugs {
    pub fn take(&mut self, name: &str) -> String {
        let mut base = String::new();
        for c in name.chars() {
            if c.is_ascii_alphanumeric() {
                base.push(c.to_ascii_lowercase());
            } else if !base.ends_with('-') {
                base.push('-');
            }
        }
        let base = base.trim_matches('-').chars().take(60).collect::<String>();
        let base = if base.is_empty() {
            "page".to_string()
        } else {
            base
        };
        let mut slug = base.clone();
        let mut n = 2;
        while !self.taken.insert(slug.clone()) {
            slug = format!("{base}-{n}");
            n += 1;
        }
        slug
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_order_primary_then_test_val_other_then_per_class() {
        let keys: BTreeSet<&str> = [
            "val/loss",
            "test/recall/cat",
            "best_epoch",
            "test/accuracy",
            "test/loss",
            "val/accuracy",
        ]
        .into_iter()
        .collect();
        assert_eq!(
            ordered_metrics(keys.clone(), Some("val/accuracy")),
            [
                "val/accuracy",
                "test/accuracy",
                "test/loss",
                "val/loss",
                "test/recall/cat",
                "best_epoch"
            ]
        );
        assert_eq!(pick_primary(&keys, None).as_deref(), Some("test/accuracy"));
        assert_eq!(
            pick_primary(&keys, Some("val/loss")).as_deref(),
            Some("val/loss")
        );
    }

    #[test]
    fn counts_thresholds_and_bookkeeping_are_not_scores() {
        for key in [
            "test/accuracy",
            "val/loss",
            "test/recall/cat",
            "test/pixel_roc_auc",
            "test/f1/normal",
            "test/f1_at_val_threshold",
        ] {
            assert!(is_score(key), "{key}");
        }
        for key in [
            "best_epoch",
            "peak_rss_bytes",
            "test/normal",
            "val/excluded",
            "train/memory_bank",
            "train/shrinkage",
            "test/best_f1_threshold",
        ] {
            assert!(!is_score(key), "{key}");
        }
    }

    #[test]
    fn slugs_are_safe_and_unique() {
        let mut slugs = Slugs::default();
        assert_eq!(slugs.take("Toy Heads/v2"), "toy-heads-v2");
        assert_eq!(slugs.take("toy heads v2"), "toy-heads-v2-2");
        assert_eq!(slugs.take("???"), "page");
    }
}
