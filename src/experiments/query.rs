//! Queries behind `lazarus experiments`: list, show, compare, best, ablate.
//! Every statement is parameterised; user text never becomes SQL.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::types::Value;
use rusqlite::{OptionalExtension, Transaction, params_from_iter};
use serde::Serialize;

use super::db::Fail;
use super::{Cell, ExperimentsDb, ExperimentsError, ParamValue, RunStatus, Table};

/// Run fields `--where` accepts besides parameters.
const RUN_FIELDS: [&str; 3] = ["experiment", "dataset", "status"];

/// Which runs `list` shows.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub experiment: Option<String>,
    pub status: Option<RunStatus>,
    /// `--where KEY=VALUE` clauses, as `best` and `ablate` take them.
    pub wheres: Vec<WhereClause>,
}

/// `KEY=VALUE`: a parameter (or `experiment`, `dataset`, `status`) equal to a
/// value. Numeric parameters compare as numbers, so `lr=0.001` matches `1e-3`.
#[derive(Debug, Clone, PartialEq)]
pub struct WhereClause {
    pub key: String,
    pub value: String,
}

impl WhereClause {
    pub fn parse(text: &str) -> Result<Self, ExperimentsError> {
        match text.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Ok(Self {
                key: key.trim().to_string(),
                value: value.trim().to_string(),
            }),
            _ => Err(ExperimentsError::Invalid(format!(
                "`--where {text}`: expected KEY=VALUE, such as head=mlp"
            ))),
        }
    }
}

/// Whether a larger value of a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    HigherIsBetter,
    LowerIsBetter,
}

/// Metrics whose name ends in `loss` are minimised; every other metric is maximised.
pub fn direction_of(metric: &str) -> Direction {
    if metric.ends_with("loss") {
        Direction::LowerIsBetter
    } else {
        Direction::HigherIsBetter
    }
}

/// One row of `runs` with its experiment's name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: String,
    pub experiment: String,
    pub status: RunStatus,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
    pub dataset: String,
    pub encoder_fingerprint: String,
    pub config_hash: String,
    pub git_revision: Option<String>,
    pub host: String,
    pub pid: u32,
}

impl RunRecord {
    /// Start time as RFC 3339 (UTC, seconds).
    pub fn started(&self) -> String {
        format_time(self.start_ms)
    }

    fn duration(&self) -> Cell {
        match self.end_ms {
            Some(end) => Cell::text(
                humantime::format_duration(Duration::from_secs(
                    ((end - self.start_ms).max(0) / 1000) as u64,
                ))
                .to_string(),
            ),
            None => Cell::Missing,
        }
    }
}

fn format_time(ms: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

/// First 12 characters of a hash or fingerprint, enough to tell runs apart in a table.
fn short(text: &str) -> String {
    text.chars().take(12).collect()
}

/// A list of runs as a table.
pub fn runs_table(runs: &[RunRecord]) -> Table {
    let mut table = Table::new([
        "run",
        "experiment",
        "status",
        "started",
        "duration",
        "dataset",
        "encoder",
        "config",
    ]);
    for run in runs {
        table.push(vec![
            Cell::text(&run.id),
            Cell::text(&run.experiment),
            Cell::text(run.status.as_str()),
            Cell::text(run.started()),
            run.duration(),
            Cell::text(&run.dataset),
            Cell::text(short(&run.encoder_fingerprint)),
            Cell::text(short(&run.config_hash)),
        ]);
    }
    table
}

/// A per-step metric series, summarised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSeries {
    pub key: String,
    pub steps: u64,
    pub last_step: u64,
    pub last_value: f64,
}

/// A file recorded in a run folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Artifact {
    pub path: String,
    pub bytes: u64,
}

/// Everything recorded about one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunDetail {
    pub run: RunRecord,
    pub params: BTreeMap<String, ParamValue>,
    pub summary: BTreeMap<String, f64>,
    pub tags: BTreeMap<String, String>,
    pub metrics: Vec<MetricSeries>,
    pub artifacts: Vec<Artifact>,
}

impl RunDetail {
    /// `section, key, value` rows.
    pub fn table(&self) -> Table {
        let mut table = Table::new(["section", "key", "value"]);
        let run = &self.run;
        let mut field = |key: &str, value: Cell| {
            table.push(vec![Cell::text("run"), Cell::text(key), value]);
        };
        field("id", Cell::text(&run.id));
        field("experiment", Cell::text(&run.experiment));
        field("status", Cell::text(run.status.as_str()));
        field("started", Cell::text(run.started()));
        field(
            "ended",
            run.end_ms
                .map_or(Cell::Missing, |ms| Cell::text(format_time(ms))),
        );
        field("dataset", Cell::text(&run.dataset));
        field("encoder_fingerprint", Cell::text(&run.encoder_fingerprint));
        field("config_hash", Cell::text(&run.config_hash));
        field(
            "git_revision",
            run.git_revision.as_ref().map_or(Cell::Missing, Cell::text),
        );
        field("host", Cell::text(&run.host));
        for (key, value) in &self.params {
            table.push(vec![
                Cell::text("param"),
                Cell::text(key),
                param_cell(value),
            ]);
        }
        for (key, value) in &self.summary {
            table.push(vec![
                Cell::text("summary"),
                Cell::text(key),
                Cell::Number(*value),
            ]);
        }
        for series in &self.metrics {
            table.push(vec![
                Cell::text("metric"),
                Cell::text(format!(
                    "{} ({} steps, last at {})",
                    series.key, series.steps, series.last_step
                )),
                Cell::Number(series.last_value),
            ]);
        }
        for (key, value) in &self.tags {
            table.push(vec![Cell::text("tag"), Cell::text(key), Cell::text(value)]);
        }
        for artifact in &self.artifacts {
            table.push(vec![
                Cell::text("artifact"),
                Cell::text(&artifact.path),
                Cell::text(format!("{} bytes", artifact.bytes)),
            ]);
        }
        table
    }
}

fn param_cell(value: &ParamValue) -> Cell {
    // Parameters keep their exact text (0.001, not 1.000e-3).
    Cell::text(value.to_string())
}

/// One logged value of a per-step metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MetricPoint {
    pub step: u64,
    pub value: f64,
    /// When it was logged (Unix milliseconds).
    pub time_ms: i64,
}

/// Which runs a report or an export covers: runs of any of `experiments`
/// (all when empty) that satisfy every `--where` clause.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub experiments: Vec<String>,
    pub wheres: Vec<WhereClause>,
}

/// A run with everything recorded about it, per-step values included.
#[derive(Debug, Clone)]
pub struct RunSnapshot {
    pub detail: RunDetail,
    /// Per-step values by metric key, in step order.
    pub history: BTreeMap<String, Vec<MetricPoint>>,
}

/// The selected runs (by id) read in one transaction, and what the
/// database knows besides, to explain an empty selection.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub runs: Vec<RunSnapshot>,
    /// Runs in the whole database.
    pub total_runs: usize,
    pub known_experiments: Vec<String>,
    pub known_params: Vec<String>,
}

/// One compared quantity across runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonRow {
    /// `run`, `param` or `metric`.
    pub kind: String,
    pub key: String,
    /// One value per compared run, in the order given; `None` where a run lacks it.
    pub values: Vec<Option<ParamValue>>,
}

/// Runs side by side: run fields, the parameters that differ, all summary metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub runs: Vec<String>,
    /// Parameters every run has with the same value.
    pub same_params: BTreeMap<String, ParamValue>,
    pub rows: Vec<ComparisonRow>,
}

impl Comparison {
    pub fn table(&self) -> Table {
        let mut headers = vec!["kind".to_string(), "key".to_string()];
        headers.extend(self.runs.iter().cloned());
        let mut table = Table::new(headers);
        for row in &self.rows {
            let mut cells = vec![Cell::text(&row.kind), Cell::text(&row.key)];
            cells.extend(row.values.iter().map(|value| match value {
                None => Cell::Missing,
                Some(ParamValue::Number(n)) if row.kind == "metric" => Cell::Number(*n),
                Some(value) => param_cell(value),
            }));
            table.push(cells);
        }
        table
    }
}

/// `best`: the top runs by one summary metric.
#[derive(Debug, Clone, Default)]
pub struct BestQuery {
    pub metric: String,
    pub wheres: Vec<WhereClause>,
    /// How many runs to return (at least one).
    pub top: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BestRow {
    pub run: String,
    pub experiment: String,
    pub value: f64,
    pub params: BTreeMap<String, ParamValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BestReport {
    pub metric: String,
    pub direction: Direction,
    pub runs: Vec<BestRow>,
}

impl BestReport {
    pub fn table(&self) -> Table {
        let mut table = Table::new(["rank", "run", "experiment", &self.metric, "params"]);
        for (rank, row) in self.runs.iter().enumerate() {
            let params: Vec<String> = row.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            table.push(vec![
                Cell::Integer(rank as i64 + 1),
                Cell::text(&row.run),
                Cell::text(&row.experiment),
                Cell::Number(row.value),
                Cell::text(params.join(" ")),
            ]);
        }
        table
    }
}

/// `ablate`: groups finished runs by parameters and aggregates a metric over
/// each group (typically the seeds).
#[derive(Debug, Clone, Default)]
pub struct AblationQuery {
    pub by: Vec<String>,
    pub metric: String,
    pub wheres: Vec<WhereClause>,
    /// The baseline level, one value per `by` parameter; default: the first level.
    pub baseline: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AblationRow {
    /// One value per `by` parameter; `None` where runs lack the parameter.
    pub levels: Vec<Option<ParamValue>>,
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n - 1); `None` for a single run.
    pub std: Option<f64>,
    /// `mean` minus the baseline's mean.
    pub diff: f64,
    pub runs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AblationReport {
    pub by: Vec<String>,
    pub metric: String,
    pub direction: Direction,
    pub baseline: Vec<Option<ParamValue>>,
    pub rows: Vec<AblationRow>,
}

impl AblationReport {
    pub fn table(&self) -> Table {
        let mut headers = self.by.clone();
        headers.extend([
            "n".to_string(),
            format!("{} mean", self.metric),
            "std".to_string(),
            "diff vs baseline".to_string(),
        ]);
        let mut table = Table::new(headers);
        for row in &self.rows {
            let mut cells: Vec<Cell> = row
                .levels
                .iter()
                .map(|level| level.as_ref().map_or(Cell::Missing, param_cell))
                .collect();
            cells.extend([
                Cell::Integer(row.n as i64),
                Cell::Number(row.mean),
                row.std.map_or(Cell::Missing, Cell::PlusMinus),
                if row.levels == self.baseline {
                    Cell::text("baseline")
                } else {
                    Cell::Difference(row.diff)
                },
            ]);
            table.push(cells);
        }
        table
    }
}

/// Orders levels: numbers (numerically), then text, then missing.
fn level_order(a: &Option<ParamValue>, b: &Option<ParamValue>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(ParamValue::Number(x)), Some(ParamValue::Number(y))) => x.total_cmp(y),
        (Some(ParamValue::Text(x)), Some(ParamValue::Text(y))) => x.cmp(y),
        (Some(ParamValue::Number(_)), _) => Ordering::Less,
        (_, Some(ParamValue::Number(_))) => Ordering::Greater,
        (Some(ParamValue::Text(_)), None) => Ordering::Less,
        (None, Some(ParamValue::Text(_))) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// Whether a level matches text the user typed (numbers compare numerically).
fn level_matches(level: &Option<ParamValue>, text: &str) -> bool {
    match level {
        Some(ParamValue::Number(n)) => text.parse::<f64>().is_ok_and(|t| t == *n),
        Some(ParamValue::Text(t)) => t == text,
        None => text == "-" || text.is_empty(),
    }
}

const RUN_COLUMNS: &str = "r.id, e.name, r.status, r.start_ms, r.end_ms, r.dataset,
    r.encoder_fingerprint, r.config_hash, r.git_revision, r.host, r.pid";

fn run_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let status: String = row.get(2)?;
    Ok(RunRecord {
        id: row.get(0)?,
        experiment: row.get(1)?,
        status: RunStatus::parse(&status).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
        })?,
        start_ms: row.get(3)?,
        end_ms: row.get(4)?,
        dataset: row.get(5)?,
        encoder_fingerprint: row.get(6)?,
        config_hash: row.get(7)?,
        git_revision: row.get(8)?,
        host: row.get(9)?,
        pid: row.get(10)?,
    })
}

fn param_from_columns(number: Option<f64>, text: Option<String>) -> ParamValue {
    match (number, text) {
        (Some(n), _) => ParamValue::Number(n),
        (None, Some(t)) => ParamValue::Text(t),
        // The CHECK constraint makes exactly one of the two non-null.
        (None, None) => ParamValue::Text(String::new()),
    }
}

fn known_keys(tx: &Transaction<'_>, sql: &str) -> Result<Vec<String>, rusqlite::Error> {
    let mut statement = tx.prepare(sql)?;
    let keys = statement
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(keys)
}

fn known_params(tx: &Transaction<'_>) -> Result<Vec<String>, rusqlite::Error> {
    // `sweep` is known once any sweep has run, even one whose every run was
    // reused (only in sweep_runs).
    known_keys(
        tx,
        "SELECT key FROM params UNION SELECT 'sweep' FROM sweep_runs ORDER BY key",
    )
}

fn known_summary_metrics(tx: &Transaction<'_>) -> Result<Vec<String>, rusqlite::Error> {
    known_keys(tx, "SELECT DISTINCT key FROM summary_metrics ORDER BY key")
}

fn check_metric(tx: &Transaction<'_>, metric: &str) -> Result<(), Fail> {
    let known = known_summary_metrics(tx)?;
    if known.iter().any(|k| k == metric) {
        Ok(())
    } else {
        Err(Fail::Refused(ExperimentsError::UnknownMetric {
            metric: metric.to_string(),
            known,
        }))
    }
}

fn check_params(tx: &Transaction<'_>, keys: &[&str], allow_run_fields: bool) -> Result<(), Fail> {
    let known = known_params(tx)?;
    for key in keys {
        let is_field = allow_run_fields && RUN_FIELDS.contains(key);
        if !is_field && !known.iter().any(|k| k == key) {
            let mut listed = known.clone();
            if allow_run_fields {
                listed.extend(RUN_FIELDS.iter().map(|f| format!("{f} (run field)")));
            }
            return Err(Fail::Refused(ExperimentsError::UnknownParam {
                param: key.to_string(),
                known: listed,
            }));
        }
    }
    Ok(())
}

/// `(SQL condition on runs r / experiments e, its values)` for `--where` clauses.
fn where_sql(wheres: &[WhereClause], values: &mut Vec<Value>) -> String {
    let mut sql = String::new();
    for clause in wheres {
        match clause.key.as_str() {
            "experiment" => {
                values.push(Value::Text(clause.value.clone()));
                sql.push_str(&format!(" AND e.name = ?{}", values.len()));
            }
            "dataset" => {
                values.push(Value::Text(clause.value.clone()));
                sql.push_str(&format!(" AND r.dataset = ?{}", values.len()));
            }
            "status" => {
                values.push(Value::Text(clause.value.to_ascii_uppercase()));
                sql.push_str(&format!(" AND r.status = ?{}", values.len()));
            }
            key => {
                values.push(Value::Text(key.to_string()));
                let key_index = values.len();
                values.push(Value::Text(clause.value.clone()));
                let text_index = values.len();
                values.push(clause.value.parse::<f64>().map_or(Value::Null, Value::Real));
                let number_index = values.len();
                let param = format!(
                    "EXISTS (SELECT 1 FROM params p WHERE p.run_id = r.id AND p.key = ?{key_index}
                       AND (p.value_text = ?{text_index} OR p.value_number = ?{number_index}))"
                );
                if key == "sweep" {
                    // Runs the sweep found FINISHED and reused count as its own.
                    sql.push_str(&format!(
                        " AND ({param} OR EXISTS (SELECT 1 FROM sweep_runs s
                           WHERE s.run_id = r.id AND s.sweep = ?{text_index}))"
                    ));
                } else {
                    sql.push_str(&format!(" AND {param}"));
                }
            }
        }
    }
    sql
}

fn params_of(
    tx: &Transaction<'_>,
    run_id: &str,
) -> Result<BTreeMap<String, ParamValue>, rusqlite::Error> {
    let mut statement = tx.prepare_cached(
        "SELECT key, value_number, value_text FROM params WHERE run_id = ?1 ORDER BY key",
    )?;
    let rows = statement.query_map([run_id], |row| {
        Ok((
            row.get::<_, String>(0)?,
            param_from_columns(row.get(1)?, row.get(2)?),
        ))
    })?;
    rows.collect()
}

/// The sweeps that recorded `run_id` as their own in `sweep_runs`.
fn sweeps_of(tx: &Transaction<'_>, run_id: &str) -> Result<BTreeSet<String>, rusqlite::Error> {
    let mut statement = tx.prepare_cached("SELECT sweep FROM sweep_runs WHERE run_id = ?1")?;
    let rows = statement.query_map([run_id], |row| row.get::<_, String>(0))?;
    rows.collect()
}

fn summary_of(
    tx: &Transaction<'_>,
    run_id: &str,
) -> Result<BTreeMap<String, f64>, rusqlite::Error> {
    let mut statement =
        tx.prepare_cached("SELECT key, value FROM summary_metrics WHERE run_id = ?1 ORDER BY key")?;
    let rows = statement.query_map([run_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

/// Everything recorded about a run, given its row; `history`, when the
/// caller read it, gives the metric series without another query.
fn detail(
    tx: &Transaction<'_>,
    run: RunRecord,
    history: Option<&BTreeMap<String, Vec<MetricPoint>>>,
) -> Result<RunDetail, rusqlite::Error> {
    let run_id = run.id.as_str();
    let metrics = match history {
        Some(history) => history
            .iter()
            .filter_map(|(key, points)| {
                let last = points.last()?;
                Some(MetricSeries {
                    key: key.clone(),
                    steps: points.len() as u64,
                    last_step: last.step,
                    last_value: last.value,
                })
            })
            .collect(),
        None => {
            let mut statement = tx.prepare_cached(
                "SELECT key, COUNT(*), MAX(step),
                        (SELECT value FROM metrics m2 WHERE m2.run_id = m.run_id
                           AND m2.key = m.key ORDER BY step DESC LIMIT 1)
                 FROM metrics m WHERE run_id = ?1 GROUP BY key ORDER BY key",
            )?;
            statement
                .query_map([run_id], |row| {
                    Ok(MetricSeries {
                        key: row.get(0)?,
                        steps: row.get::<_, i64>(1)? as u64,
                        last_step: row.get::<_, i64>(2)? as u64,
                        last_value: row.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?
        }
    };
    let mut statement =
        tx.prepare_cached("SELECT key, value FROM tags WHERE run_id = ?1 ORDER BY key")?;
    let tags = statement
        .query_map([run_id], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut statement =
        tx.prepare_cached("SELECT path, bytes FROM artifacts WHERE run_id = ?1 ORDER BY path")?;
    let artifacts = statement
        .query_map([run_id], |row| {
            Ok(Artifact {
                path: row.get(0)?,
                bytes: row.get::<_, i64>(1)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(RunDetail {
        params: params_of(tx, run_id)?,
        summary: summary_of(tx, run_id)?,
        run,
        tags,
        metrics,
        artifacts,
    })
}

/// Every per-step value of a run, by metric key, in step order.
fn history_of(
    tx: &Transaction<'_>,
    run_id: &str,
) -> Result<BTreeMap<String, Vec<MetricPoint>>, rusqlite::Error> {
    let mut statement = tx.prepare_cached(
        "SELECT key, step, value, time_ms FROM metrics WHERE run_id = ?1 ORDER BY key, step",
    )?;
    let mut history: BTreeMap<String, Vec<MetricPoint>> = BTreeMap::new();
    let rows = statement.query_map([run_id], |row| {
        Ok((
            row.get::<_, String>(0)?,
            MetricPoint {
                step: row.get::<_, i64>(1)? as u64,
                value: row.get(2)?,
                time_ms: row.get(3)?,
            },
        ))
    })?;
    for row in rows {
        let (key, point) = row?;
        match history.get_mut(&key) {
            Some(points) => points.push(point),
            None => {
                history.insert(key, vec![point]);
            }
        }
    }
    Ok(history)
}

/// Runs side by side (what `compare` prints), from their rows, params and
/// summary metrics in the order given.
pub(crate) fn comparison_from(
    run_ids: &[String],
    records: &[RunRecord],
    params: &[BTreeMap<String, ParamValue>],
    summaries: &[BTreeMap<String, f64>],
) -> Comparison {
    let mut rows = Vec::new();
    type RunField = (&'static str, fn(&RunRecord) -> String);
    let fields: [RunField; 5] = [
        ("experiment", |r| r.experiment.clone()),
        ("status", |r| r.status.as_str().to_string()),
        ("dataset", |r| r.dataset.clone()),
        ("encoder", |r| short(&r.encoder_fingerprint)),
        ("config", |r| short(&r.config_hash)),
    ];
    for (key, get) in fields {
        rows.push(ComparisonRow {
            kind: "run".into(),
            key: key.into(),
            values: records
                .iter()
                .map(|r| Some(ParamValue::Text(get(r))))
                .collect(),
        });
    }
    let keys: BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    let mut same_params = BTreeMap::new();
    for key in keys {
        let values: Vec<Option<ParamValue>> = params.iter().map(|p| p.get(key).cloned()).collect();
        if values.iter().all(|v| v == &values[0])
            && let Some(value) = &values[0]
        {
            same_params.insert(key.clone(), value.clone());
        } else {
            rows.push(ComparisonRow {
                kind: "param".into(),
                key: key.clone(),
                values,
            });
        }
    }
    let metric_keys: BTreeSet<&String> = summaries.iter().flat_map(|s| s.keys()).collect();
    for key in metric_keys {
        rows.push(ComparisonRow {
            kind: "metric".into(),
            key: key.clone(),
            values: summaries
                .iter()
                .map(|s| s.get(key).map(|v| ParamValue::Number(*v)))
                .collect(),
        });
    }
    Comparison {
        runs: run_ids.to_vec(),
        same_params,
        rows,
    }
}

/// Sorts best first (highest, or lowest for `LowerIsBetter`); the sort is
/// stable, so ties keep their order (run id order: the earlier run first).
pub(crate) fn rank_by<T>(items: &mut [T], direction: Direction, value: impl Fn(&T) -> f64) {
    items.sort_by(|a, b| match direction {
        Direction::HigherIsBetter => value(b).total_cmp(&value(a)),
        Direction::LowerIsBetter => value(a).total_cmp(&value(b)),
    });
}

/// Finished runs matching `wheres` that have `metric`: `(run, experiment, value)`.
fn finished_with_metric(
    tx: &Transaction<'_>,
    metric: &str,
    wheres: &[WhereClause],
) -> Result<Vec<(String, String, f64)>, rusqlite::Error> {
    let mut values = vec![Value::Text(metric.to_string())];
    let conditions = where_sql(wheres, &mut values);
    let sql = format!(
        "SELECT r.id, e.name, s.value FROM runs r
         JOIN experiments e ON e.id = r.experiment_id
         JOIN summary_metrics s ON s.run_id = r.id AND s.key = ?1
         WHERE r.status = 'FINISHED'{conditions}
         ORDER BY r.id"
    );
    let mut statement = tx.prepare(&sql)?;
    let rows = statement.query_map(params_from_iter(values), |row| {
        Ok((row.get(0)?, row.get(1)?, row.get::<_, f64>(2)?))
    })?;
    // A non-finite value ranks nowhere: it is no result (older lazarus
    // could finish a diverged run).
    let rows: Vec<(String, String, f64)> = rows.collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .filter(|(_, _, value)| value.is_finite())
        .collect())
}

impl ExperimentsDb {
    /// Runs, oldest first, filtered by experiment and status.
    pub fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, ExperimentsError> {
        self.read(|tx| {
            if let Some(name) = &filter.experiment {
                let known = known_keys(tx, "SELECT name FROM experiments ORDER BY name")?;
                if !known.contains(name) {
                    return Err(Fail::Refused(ExperimentsError::Invalid(format!(
                        "unknown experiment `{name}`; known experiments: {}",
                        if known.is_empty() {
                            "none recorded yet".to_string()
                        } else {
                            known.join(", ")
                        }
                    ))));
                }
            }
            let keys: Vec<&str> = filter.wheres.iter().map(|w| w.key.as_str()).collect();
            check_params(tx, &keys, true)?;
            let mut values = vec![
                filter.experiment.clone().map_or(Value::Null, Value::Text),
                filter
                    .status
                    .map_or(Value::Null, |s| Value::Text(s.as_str().to_string())),
            ];
            let conditions = where_sql(&filter.wheres, &mut values);
            let sql = format!(
                "SELECT {RUN_COLUMNS} FROM runs r JOIN experiments e ON e.id = r.experiment_id
                 WHERE (?1 IS NULL OR e.name = ?1) AND (?2 IS NULL OR r.status = ?2){conditions}
                 ORDER BY r.id"
            );
            let mut statement = tx.prepare(&sql)?;
            let rows = statement.query_map(params_from_iter(values), run_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn run_record(&self, tx: &Transaction<'_>, run_id: &str) -> Result<RunRecord, Fail> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs r JOIN experiments e ON e.id = r.experiment_id
             WHERE r.id = ?1"
        );
        match tx.query_row(&sql, [run_id], run_from_row).optional()? {
            Some(run) => Ok(run),
            None => {
                let known: i64 = tx.query_row("SELECT COUNT(*) FROM runs", [], |row| row.get(0))?;
                Err(Fail::Refused(ExperimentsError::UnknownRun {
                    path: self.path().to_path_buf(),
                    run: run_id.to_string(),
                    known: known as usize,
                }))
            }
        }
    }

    /// The folder of a run this database records. A run id names a row, not
    /// a path: `../elsewhere` or an id the database does not know is refused.
    pub fn recorded_run_dir(&self, run_id: &str) -> Result<PathBuf, ExperimentsError> {
        self.read(|tx| self.run_record(tx, run_id).map(|_| ()))?;
        Ok(self.run_dir(run_id))
    }

    /// The selected runs with their params, metrics (summary and per step),
    /// tags and artifacts, in run id order, from one consistent read.
    /// Unknown experiments or parameters select nothing (not an error: the
    /// snapshot lists what is known).
    pub fn snapshot(&self, selection: &Selection) -> Result<Snapshot, ExperimentsError> {
        self.read(|tx| {
            let mut values: Vec<Value> = Vec::new();
            let mut conditions = String::new();
            if !selection.experiments.is_empty() {
                let mut placeholders = Vec::new();
                for name in &selection.experiments {
                    values.push(Value::Text(name.clone()));
                    placeholders.push(format!("?{}", values.len()));
                }
                conditions.push_str(&format!(" AND e.name IN ({})", placeholders.join(", ")));
            }
            conditions.push_str(&where_sql(&selection.wheres, &mut values));
            let sql = format!(
                "SELECT {RUN_COLUMNS} FROM runs r JOIN experiments e ON e.id = r.experiment_id
                 WHERE 1 = 1{conditions} ORDER BY r.id"
            );
            let mut statement = tx.prepare(&sql)?;
            let records = statement
                .query_map(params_from_iter(values), run_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            let mut runs = Vec::with_capacity(records.len());
            for record in records {
                let history = history_of(tx, &record.id)?;
                runs.push(RunSnapshot {
                    detail: detail(tx, record, Some(&history))?,
                    history,
                });
            }
            let total_runs: i64 =
                tx.query_row("SELECT COUNT(*) FROM runs", [], |row| row.get(0))?;
            Ok(Snapshot {
                runs,
                total_runs: total_runs as usize,
                known_experiments: known_keys(tx, "SELECT name FROM experiments ORDER BY name")?,
                known_params: known_params(tx)?,
            })
        })
    }

    /// One run with its params, summary metrics, metric series, tags and artifacts.
    pub fn show_run(&self, run_id: &str) -> Result<RunDetail, ExperimentsError> {
        self.read(|tx| {
            let run = self.run_record(tx, run_id)?;
            Ok(detail(tx, run, None)?)
        })
    }

    /// Per-step values of one metric of a run, by step (for learning curves).
    pub fn metric_history(
        &self,
        run_id: &str,
        metric: &str,
    ) -> Result<Vec<(u64, f64)>, ExperimentsError> {
        self.read(|tx| {
            self.run_record(tx, run_id)?;
            let mut statement = tx.prepare(
                "SELECT step, value FROM metrics WHERE run_id = ?1 AND key = ?2 ORDER BY step",
            )?;
            let rows = statement
                .query_map([run_id, metric], |row| {
                    Ok((row.get::<_, i64>(0)? as u64, row.get(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            if rows.is_empty() {
                let known = known_keys(tx, "SELECT DISTINCT key FROM metrics ORDER BY key")?;
                return Err(Fail::Refused(ExperimentsError::UnknownMetric {
                    metric: metric.to_string(),
                    known,
                }));
            }
            Ok(rows)
        })
    }

    /// Runs side by side: run fields, parameters that differ, summary metrics.
    pub fn compare_runs(&self, run_ids: &[String]) -> Result<Comparison, ExperimentsError> {
        if run_ids.len() < 2 {
            return Err(ExperimentsError::Invalid(format!(
                "compare needs at least two runs, got {}",
                run_ids.len()
            )));
        }
        self.read(|tx| {
            let mut records = Vec::new();
            let mut params = Vec::new();
            let mut summaries = Vec::new();
            for id in run_ids {
                records.push(self.run_record(tx, id)?);
                params.push(params_of(tx, id)?);
                summaries.push(summary_of(tx, id)?);
            }
            Ok(comparison_from(run_ids, &records, &params, &summaries))
        })
    }

    /// The best finished runs by a summary metric (higher is better, except
    /// metrics whose name ends in `loss`).
    pub fn best_runs(&self, query: &BestQuery) -> Result<BestReport, ExperimentsError> {
        let direction = direction_of(&query.metric);
        self.read(|tx| {
            check_metric(tx, &query.metric)?;
            let keys: Vec<&str> = query.wheres.iter().map(|w| w.key.as_str()).collect();
            check_params(tx, &keys, true)?;
            let mut found = finished_with_metric(tx, &query.metric, &query.wheres)?;
            rank_by(&mut found, direction, |(_, _, value)| *value);
            let mut runs = Vec::new();
            for (run, experiment, value) in found.into_iter().take(query.top.max(1)) {
                runs.push(BestRow {
                    params: params_of(tx, &run)?,
                    run,
                    experiment,
                    value,
                });
            }
            if runs.is_empty() {
                return Err(Fail::Refused(ExperimentsError::Invalid(format!(
                    "no finished run has metric `{}` under the given --where filters",
                    query.metric
                ))));
            }
            Ok(BestReport {
                metric: query.metric.clone(),
                direction,
                runs,
            })
        })
    }

    /// Mean ± std of a summary metric per level of the `by` parameters, over
    /// finished runs matching the filters, with the difference from a baseline level.
    pub fn ablate(&self, query: &AblationQuery) -> Result<AblationReport, ExperimentsError> {
        if query.by.is_empty() {
            return Err(ExperimentsError::Invalid(
                "ablate needs at least one parameter in --by".into(),
            ));
        }
        if let Some(baseline) = &query.baseline
            && baseline.len() != query.by.len()
        {
            return Err(ExperimentsError::Invalid(format!(
                "--baseline has {} values but --by names {} parameters ({})",
                baseline.len(),
                query.by.len(),
                query.by.join(",")
            )));
        }
        self.read(|tx| {
            check_metric(tx, &query.metric)?;
            let by: Vec<&str> = query.by.iter().map(String::as_str).collect();
            check_params(tx, &by, false)?;
            let keys: Vec<&str> = query.wheres.iter().map(|w| w.key.as_str()).collect();
            check_params(tx, &keys, true)?;
            let found = finished_with_metric(tx, &query.metric, &query.wheres)?;
            let found = found.into_iter().map(|(run, _, value)| (run, value));
            let by_sweep = query.by.iter().any(|key| key == "sweep");
            let wanted_sweeps: Vec<&str> = query
                .wheres
                .iter()
                .filter(|w| w.key == "sweep")
                .map(|w| w.value.as_str())
                .collect();
            ablation_table(query, found, |run| {
                let params = params_of(tx, run)?;
                if !by_sweep {
                    return Ok(vec![params]);
                }
                // A run counts under every sweep it belongs to: the one that
                // trained it and those that found it FINISHED and reused it.
                let mut sweeps: BTreeSet<String> = sweeps_of(tx, run)?;
                if let Some(ParamValue::Text(trained_by)) = params.get("sweep") {
                    sweeps.insert(trained_by.clone());
                }
                sweeps.retain(|sweep| {
                    wanted_sweeps.is_empty() || wanted_sweeps.contains(&sweep.as_str())
                });
                if sweeps.is_empty() {
                    return Ok(vec![params]);
                }
                Ok(sweeps
                    .into_iter()
                    .map(|sweep| {
                        let mut member = params.clone();
                        member.insert("sweep".to_string(), ParamValue::Text(sweep));
                        member
                    })
                    .collect())
            })
        })
    }
}

/// The ablation table of `query` (what `ablate` prints) over `found`: the
/// finished runs that have the metric, in run id order, with their values;
/// `params` gives the parameter sets a run counts under (one, or one per
/// sweep it belongs to when grouping by `sweep`).
pub(crate) fn ablation_table(
    query: &AblationQuery,
    found: impl IntoIterator<Item = (String, f64)>,
    mut params: impl FnMut(&str) -> Result<Vec<BTreeMap<String, ParamValue>>, Fail>,
) -> Result<AblationReport, Fail> {
    let by: Vec<&str> = query.by.iter().map(String::as_str).collect();
    // (levels, metric values, run ids) per group.
    type Group = (Vec<Option<ParamValue>>, Vec<f64>, Vec<String>);
    let mut groups: Vec<Group> = Vec::new();
    for (run, value) in found {
        for params in params(&run)? {
            let levels: Vec<Option<ParamValue>> =
                by.iter().map(|key| params.get(*key).cloned()).collect();
            match groups.iter_mut().find(|(l, _, _)| *l == levels) {
                Some((_, values, runs)) => {
                    values.push(value);
                    runs.push(run.clone());
                }
                None => groups.push((levels, vec![value], vec![run.clone()])),
            }
        }
    }
    if groups.is_empty() {
        return Err(Fail::Refused(ExperimentsError::Invalid(format!(
            "no finished run has metric `{}` under the given --where filters",
            query.metric
        ))));
    }
    groups.sort_by(|(a, _, _), (b, _, _)| {
        a.iter()
            .zip(b)
            .map(|(x, y)| level_order(x, y))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let stats: Vec<(f64, Option<f64>)> = groups
        .iter()
        .map(|(_, values, _)| mean_std(values))
        .collect();
    let baseline_index = match &query.baseline {
        None => 0,
        Some(wanted) => groups
            .iter()
            .position(|(levels, _, _)| levels.iter().zip(wanted).all(|(l, w)| level_matches(l, w)))
            .ok_or_else(|| {
                let levels: Vec<String> = groups
                    .iter()
                    .map(|(levels, _, _)| {
                        levels
                            .iter()
                            .map(|l| l.as_ref().map_or("-".into(), |v| v.to_string()))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect();
                Fail::Refused(ExperimentsError::Invalid(format!(
                    "--baseline {} is not a level of {}; levels: {}",
                    wanted.join(","),
                    query.by.join(","),
                    levels.join("; ")
                )))
            })?,
    };
    let baseline_mean = stats[baseline_index].0;
    let baseline = groups[baseline_index].0.clone();
    let rows = groups
        .into_iter()
        .zip(stats)
        .map(|((levels, values, runs), (mean, std))| AblationRow {
            levels,
            n: values.len(),
            mean,
            std,
            diff: mean - baseline_mean,
            runs,
        })
        .collect();
    Ok(AblationReport {
        by: query.by.clone(),
        metric: query.metric.clone(),
        direction: direction_of(&query.metric),
        baseline,
        rows,
    })
}

/// Mean and sample standard deviation (n - 1 denominator; `None` for one value).
pub(crate) fn mean_std(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, None);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some(variance.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_std_matches_reference() {
        // numpy: np.std([0.8, 0.82, 0.84], ddof=1) == 0.02
        let (mean, std) = mean_std(&[0.8, 0.82, 0.84]);
        assert!((mean - 0.82).abs() < 1e-12);
        assert!((std.unwrap() - 0.02).abs() < 1e-12);
        assert_eq!(mean_std(&[0.5]), (0.5, None));
    }

    #[test]
    fn loss_metrics_are_minimised() {
        assert_eq!(direction_of("val_loss"), Direction::LowerIsBetter);
        assert_eq!(direction_of("val_accuracy"), Direction::HigherIsBetter);
    }

    #[test]
    fn where_clause_needs_key_and_equals() {
        assert_eq!(
            WhereClause::parse("lr=0.001").unwrap(),
            WhereClause {
                key: "lr".into(),
                value: "0.001".into()
            }
        );
        assert!(WhereClause::parse("lr").is_err());
        assert!(WhereClause::parse("=3").is_err());
    }

    #[test]
    fn levels_order_numbers_then_text_then_missing() {
        let mut levels = vec![
            None,
            Some(ParamValue::Text("b".into())),
            Some(ParamValue::Number(10.0)),
            Some(ParamValue::Text("a".into())),
            Some(ParamValue::Number(2.0)),
        ];
        levels.sort_by(level_order);
        assert_eq!(
            levels,
            vec![
                Some(ParamValue::Number(2.0)),
                Some(ParamValue::Number(10.0)),
                Some(ParamValue::Text("a".into())),
                Some(ParamValue::Text("b".into())),
                None,
            ]
        );
    }
}
