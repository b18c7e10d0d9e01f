//! `lazarus experiments export --format mlflow`: runs written in MLflow's
//! file-store layout, which `mlflow ui --backend-store-uri DIR`,
//! `mlflow.search_runs` and `MlflowClient` read.
//!
//! ```text
//! DIR/0/meta.yaml                      MLflow's "Default" experiment (a new store only)
//! DIR/.trash/
//! DIR/EXPERIMENT_ID/meta.yaml          one experiment per lazarus experiment
//! DIR/EXPERIMENT_ID/RUN_UUID/meta.yaml run: name (the lazarus run id), status,
//!                                      start and end times, artifact URI
//!     params/KEY                       the value as lazarus prints it
//!     metrics/KEY                      "TIMESTAMP_MS VALUE STEP" per line
//!     tags/KEY                         lazarus tags, lazarus.* fields, mlflow.* system tags
//!     artifacts/...                    copies of the run folder's files (not checkpoints)
//! ```
//!
//! - Per-step metrics keep their key, steps and times. A summary metric is
//!   logged once at step 0 at the run's end time; if a per-step series has
//!   the same key (`val/accuracy` per epoch, and the kept epoch's value as
//!   the summary), the summary is logged as `summary/KEY` instead.
//! - Ids are derived from lazarus's, so exporting again rewrites the same
//!   folders: nothing is duplicated, changed files are replaced (each one
//!   atomically), unchanged ones are left alone, and files lazarus did not
//!   write there (tags or notes added in MLflow) are kept. An experiment
//!   already in the store under the same name is reused.
//! - Keys MLflow would refuse (characters other than letters, digits,
//!   `_ - . /` and space; empty or `.`/`..` path segments) are rewritten,
//!   and the summary lists them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;
use serde::Serialize;

use super::db::list_artifacts;
use super::query::Selection;
use super::{ExperimentsDb, ExperimentsError, ParamValue, RunSnapshot, RunStatus, io_error};

/// What to export where.
#[derive(Debug, Clone)]
pub struct MlflowConfig {
    pub out: PathBuf,
    pub selection: Selection,
}

/// One exported experiment.
#[derive(Debug, Clone, Serialize)]
pub struct MlflowExperiment {
    pub name: String,
    pub experiment_id: String,
    pub runs: usize,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct MlflowSummary {
    pub out: PathBuf,
    pub experiments: Vec<MlflowExperiment>,
    pub runs: usize,
    /// lazarus run id -> MLflow run id.
    pub run_ids: BTreeMap<String, String>,
    /// Metadata, param, metric and tag files written (new or changed).
    pub files_written: usize,
    pub files_unchanged: usize,
    pub artifacts_copied: usize,
    pub artifacts_unchanged: usize,
    /// `original -> exported` for keys MLflow would not accept as they are.
    pub renamed_keys: BTreeMap<String, String>,
}

/// The name MLflow gives its own first experiment.
const DEFAULT_EXPERIMENT: (&str, &str) = ("0", "Default");

/// MLflow's stored run status numbers (`mlflow.entities.RunStatus`).
fn status_number(status: RunStatus) -> u8 {
    match status {
        RunStatus::Running => 1,
        RunStatus::Finished => 3,
        RunStatus::Failed => 4,
        RunStatus::Killed => 5,
    }
}

/// Exports the selected runs into the MLflow file store `config.out`
/// (created if absent; an existing folder must be empty or a file store).
pub fn export_mlflow(
    db: &ExperimentsDb,
    config: &MlflowConfig,
) -> Result<MlflowSummary, ExperimentsError> {
    super::io_pool()?.install(|| export(db, config))
}

fn export(db: &ExperimentsDb, config: &MlflowConfig) -> Result<MlflowSummary, ExperimentsError> {
    let out = &config.out;
    check_store(out)?;
    let snapshot = db.snapshot(&config.selection)?;
    for name in &config.selection.experiments {
        if !snapshot.known_experiments.contains(name) {
            return Err(ExperimentsError::Invalid(format!(
                "unknown experiment `{name}`; known experiments: {}",
                if snapshot.known_experiments.is_empty() {
                    "none recorded yet".to_string()
                } else {
                    snapshot.known_experiments.join(", ")
                }
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    let out = std::fs::canonicalize(out).map_err(io_error(out))?;
    let mut existing = store_experiments(&out)?;
    let mut writer = Writer::default();
    if !out.join(DEFAULT_EXPERIMENT.0).exists() && existing.is_empty() {
        let dir = out.join(DEFAULT_EXPERIMENT.0);
        writer.write(
            dir.join("meta.yaml"),
            experiment_meta(&out, DEFAULT_EXPERIMENT.0, DEFAULT_EXPERIMENT.1, 0),
        )?;
        existing.insert(
            DEFAULT_EXPERIMENT.1.to_string(),
            DEFAULT_EXPERIMENT.0.to_string(),
        );
    }
    let trash = out.join(".trash");
    std::fs::create_dir_all(&trash).map_err(io_error(&trash))?;

    let mut experiments: Vec<MlflowExperiment> = Vec::new();
    let mut run_ids = BTreeMap::new();
    let mut renamed = BTreeMap::new();
    let mut artifacts = ArtifactCopy::default();
    for run in &snapshot.runs {
        let record = &run.detail.run;
        let experiment_id = match existing.get(&record.experiment) {
            Some(id) => id.clone(),
            None => {
                let id = new_experiment_id(&out, &record.experiment);
                let created = snapshot
                    .runs
                    .iter()
                    .filter(|r| r.detail.run.experiment == record.experiment)
                    .map(|r| r.detail.run.start_ms)
                    .min()
                    .unwrap_or(record.start_ms);
                writer.write(
                    out.join(&id).join("meta.yaml"),
                    experiment_meta(&out, &id, &record.experiment, created),
                )?;
                existing.insert(record.experiment.clone(), id.clone());
                id
            }
        };
        match experiments.iter_mut().find(|e| e.name == record.experiment) {
            Some(experiment) => experiment.runs += 1,
            None => experiments.push(MlflowExperiment {
                name: record.experiment.clone(),
                experiment_id: experiment_id.clone(),
                runs: 1,
            }),
        }
        let run_uuid = run_uuid(&record.id);
        let run_dir = out.join(&experiment_id).join(&run_uuid);
        for folder in ["metrics", "params", "tags", "artifacts"] {
            let path = run_dir.join(folder);
            std::fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        writer.write(
            run_dir.join("meta.yaml"),
            run_meta(&run_dir, &experiment_id, &run_uuid, run),
        )?;
        for (key, text) in run_files(run, &mut renamed) {
            writer.write(run_dir.join(key.0).join(&key.1), text.into_bytes())?;
        }
        artifacts.add(&db.run_dir(&record.id), &run_dir.join("artifacts"))?;
        run_ids.insert(record.id.clone(), run_uuid);
    }
    let (files_written, files_unchanged) = writer.finish()?;
    let (artifacts_copied, artifacts_unchanged) = artifacts.finish()?;
    Ok(MlflowSummary {
        out,
        runs: snapshot.runs.len(),
        experiments,
        run_ids,
        files_written,
        files_unchanged,
        artifacts_copied,
        artifacts_unchanged,
        renamed_keys: renamed,
    })
}

/// `out` is absent, an empty folder, or an MLflow file store (a `.trash`
/// folder or experiment folders with `meta.yaml`).
fn check_store(out: &Path) -> Result<(), ExperimentsError> {
    let entries = match std::fs::read_dir(out) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) if out.exists() && !out.is_dir() => {
            return Err(ExperimentsError::Invalid(format!(
                "{} exists and is not a folder ({err}); --out names the MLflow store folder",
                out.display()
            )));
        }
        Err(error) => return Err(io_error(out)(error)),
    };
    let mut empty = true;
    for entry in entries {
        let entry = entry.map_err(io_error(out))?;
        empty = false;
        let path = entry.path();
        if entry.file_name() == ".trash" || path.join("meta.yaml").is_file() {
            return Ok(());
        }
    }
    if empty {
        Ok(())
    } else {
        Err(ExperimentsError::Invalid(format!(
            "{} is not empty and is not an MLflow file store (no .trash folder, no experiment \
             folder with a meta.yaml); nothing was written: pass an empty or new folder, or a store",
            out.display()
        )))
    }
}

/// Experiments already in the store: name -> id.
fn store_experiments(out: &Path) -> Result<BTreeMap<String, String>, ExperimentsError> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(out).map_err(io_error(out))? {
        let entry = entry.map_err(io_error(out))?;
        let meta = entry.path().join("meta.yaml");
        let Ok(text) = std::fs::read_to_string(&meta) else {
            continue;
        };
        let fields = yaml_fields(&text);
        if let (Some(name), Some(id)) = (fields.get("name"), fields.get("experiment_id")) {
            found.insert(name.clone(), id.clone());
        }
    }
    Ok(found)
}

/// Top-level `key: scalar` lines of a meta.yaml (plain, 'single' or
/// "double" quoted), enough to read experiment names and ids.
fn yaml_fields(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with([' ', '-', '#']) {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\''))
        {
            inner.replace("''", "'")
        } else if value.starts_with('"') {
            serde_json::from_str::<String>(value).unwrap_or_else(|_| value.to_string())
        } else {
            value.to_string()
        };
        fields.insert(key.trim().to_string(), value);
    }
    fields
}

/// A free experiment id derived from the name (MLflow's ids are decimal strings).
fn new_experiment_id(out: &Path, name: &str) -> String {
    let digest = crate::digest::sha256_hex(format!("lazarus experiment {name}").as_bytes());
    let mut id = u64::from_str_radix(&digest[..15], 16).unwrap_or(1) % 1_000_000_000_000_000;
    loop {
        let candidate = format!("{}", id.max(1));
        if !out.join(&candidate).exists() {
            return candidate;
        }
        id += 1;
    }
}

/// The MLflow run id of a lazarus run: 32 hex digits derived from its id.
pub fn run_uuid(run_id: &str) -> String {
    crate::digest::sha256_hex(format!("lazarus run {run_id}").as_bytes())[..32].to_string()
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialise")
}

/// `file://` URI of an absolute path, each segment percent-encoded.
fn file_uri(path: &Path) -> String {
    format!("file://{}", crate::html::url_path(&path.to_string_lossy()))
}

fn experiment_meta(out: &Path, id: &str, name: &str, created_ms: i64) -> Vec<u8> {
    format!(
        "artifact_location: {}\ncreation_time: {created_ms}\nexperiment_id: {}\n\
         last_update_time: {created_ms}\nlifecycle_stage: active\nname: {}\n",
        quoted(&file_uri(&out.join(id))),
        quoted(id),
        quoted(name)
    )
    .into_bytes()
}

fn run_meta(run_dir: &Path, experiment_id: &str, run_uuid: &str, run: &RunSnapshot) -> Vec<u8> {
    let record = &run.detail.run;
    format!(
        "artifact_uri: {}\nend_time: {}\nentry_point_name: ''\nexperiment_id: {}\n\
         lifecycle_stage: active\nrun_id: {run_uuid}\nrun_name: {}\nrun_uuid: {run_uuid}\n\
         source_name: ''\nsource_type: 4\nsource_version: ''\nstart_time: {}\nstatus: {}\n\
         tags: []\nuser_id: {}\n",
        quoted(&file_uri(&run_dir.join("artifacts"))),
        record
            .end_ms
            .map_or_else(|| "null".to_string(), |ms| ms.to_string()),
        quoted(experiment_id),
        quoted(&record.id),
        record.start_ms,
        status_number(record.status),
        quoted("lazarus"),
    )
    .into_bytes()
}

/// `((folder, key), content)` of every param, metric and tag file of a run.
fn run_files(
    run: &RunSnapshot,
    renamed: &mut BTreeMap<String, String>,
) -> Vec<((&'static str, String), String)> {
    let detail = &run.detail;
    let record = &detail.run;
    let mut files = Vec::new();
    let mut params: Vec<(String, String)> = detail
        .params
        .iter()
        .map(|(key, value)| (key.clone(), param_text(value)))
        .collect();
    params.sort();
    for (key, value) in keys_for_mlflow(params, renamed) {
        files.push((("params", key), value));
    }
    let mut metrics: Vec<(String, String)> = Vec::new();
    for (key, points) in &run.history {
        let mut text = String::new();
        for point in points {
            text.push_str(&format!(
                "{} {} {}\n",
                point.time_ms, point.value, point.step
            ));
        }
        metrics.push((key.clone(), text));
    }
    let time = record.end_ms.unwrap_or(record.start_ms);
    for (key, value) in &detail.summary {
        let key = if run.history.contains_key(key) {
            format!("summary/{key}")
        } else {
            key.clone()
        };
        metrics.push((key, format!("{time} {value} 0\n")));
    }
    for (key, value) in keys_for_mlflow(metrics, renamed) {
        files.push((("metrics", key), value));
    }
    let mut tags: Vec<(String, String)> = detail
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.extend([
        ("mlflow.runName".to_string(), record.id.clone()),
        ("mlflow.source.name".to_string(), "lazarus".to_string()),
        ("mlflow.source.type".to_string(), "LOCAL".to_string()),
        ("mlflow.user".to_string(), "lazarus".to_string()),
        ("lazarus.run_id".to_string(), record.id.clone()),
        ("lazarus.experiment".to_string(), record.experiment.clone()),
        ("lazarus.status".to_string(), record.status.to_string()),
        ("lazarus.dataset".to_string(), record.dataset.clone()),
        (
            "lazarus.encoder_fingerprint".to_string(),
            record.encoder_fingerprint.clone(),
        ),
        (
            "lazarus.config_hash".to_string(),
            record.config_hash.clone(),
        ),
        ("lazarus.host".to_string(), record.host.clone()),
    ]);
    if let Some(revision) = &record.git_revision {
        tags.push(("mlflow.source.git.commit".to_string(), revision.clone()));
    }
    tags.sort();
    for (key, value) in keys_for_mlflow(tags, renamed) {
        files.push((("tags", key), value));
    }
    files
}

/// A parameter's text: numbers as lazarus prints them (0.001, 32).
fn param_text(value: &ParamValue) -> String {
    value.to_string()
}

/// Keys MLflow accepts as they are, others rewritten (and recorded): only
/// letters, digits, `_ - . /` and space; no empty or `.`/`..` segments;
/// no key that is also a folder of another key (`a` beside `a/b`).
fn keys_for_mlflow(
    entries: Vec<(String, String)>,
    renamed: &mut BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let cleaned: Vec<(String, String, String)> = entries
        .into_iter()
        .map(|(key, value)| {
            let clean = clean_key(&key);
            (key, clean, value)
        })
        .collect();
    let all: BTreeSet<&str> = cleaned.iter().map(|(_, clean, _)| clean.as_str()).collect();
    // A file cannot share its path with another key's folder.
    let is_folder = |key: &str| {
        all.iter()
            .any(|other| other.starts_with(&format!("{key}/")))
    };
    let wanted: Vec<String> = cleaned
        .iter()
        .map(|(_, clean, _)| {
            if is_folder(clean) {
                clean.replace('/', ".")
            } else {
                clean.clone()
            }
        })
        .collect();
    // Keys that need no change keep their name; rewritten ones yield on a clash.
    let mut taken: BTreeSet<String> = cleaned
        .iter()
        .zip(&wanted)
        .filter(|((original, _, _), key)| original == *key)
        .map(|(_, key)| key.clone())
        .collect();
    let mut out = Vec::with_capacity(cleaned.len());
    for ((original, _, value), key) in cleaned.iter().zip(wanted) {
        let mut key = key;
        if &key != original {
            let base = key.clone();
            let mut n = 2;
            while !taken.insert(key.clone()) {
                key = format!("{base}_{n}");
                n += 1;
            }
            renamed.insert(original.clone(), key.clone());
        }
        out.push((key, value.clone()));
    }
    out
}

fn clean_key(key: &str) -> String {
    let replaced: String = key
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | '/') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let segments: Vec<String> = replaced
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| match s {
            "." | ".." => s.replace('.', "_"),
            s => s.to_string(),
        })
        .collect();
    if segments.is_empty() {
        "_".to_string()
    } else {
        segments.join("/")
    }
}

/// Metadata files of an export: written only where their content changed,
/// all published together at the end.
#[derive(Default)]
struct Writer {
    files: Vec<(PathBuf, Vec<u8>)>,
    folders: BTreeSet<PathBuf>,
}

impl Writer {
    fn write(&mut self, path: PathBuf, bytes: Vec<u8>) -> Result<(), ExperimentsError> {
        if let Some(parent) = path.parent()
            && self.folders.insert(parent.to_path_buf())
        {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        self.files.push((path, bytes));
        Ok(())
    }

    /// Compares with what is there (many files at a time) and writes what differs.
    fn finish(self) -> Result<(usize, usize), ExperimentsError> {
        let total = self.files.len();
        let changed: Vec<(PathBuf, Vec<u8>)> = self
            .files
            .into_par_iter()
            .filter(|(path, bytes)| std::fs::read(path).map_or(true, |existing| existing != *bytes))
            .collect();
        let first = changed.first().map(|(p, _)| p.clone()).unwrap_or_default();
        crate::atomic::write_files(&changed).map_err(io_error(first))?;
        Ok((changed.len(), total - changed.len()))
    }
}

/// Run files copied as artifacts: a file whose size and modification time
/// match the copy is left alone.
#[derive(Default)]
struct ArtifactCopy {
    /// (source, target, source's modification time) of files to copy.
    wanted: Vec<(PathBuf, PathBuf, SystemTime)>,
    unchanged: usize,
}

impl ArtifactCopy {
    fn add(&mut self, run_dir: &Path, target: &Path) -> Result<(), ExperimentsError> {
        if !run_dir.is_dir() {
            return Ok(());
        }
        for (path, bytes) in list_artifacts(run_dir)? {
            if path.starts_with("checkpoints/") {
                continue;
            }
            let from = run_dir.join(&path);
            let to = target.join(&path);
            let modified = std::fs::metadata(&from)
                .and_then(|m| m.modified())
                .map_err(io_error(&from))?;
            if let Ok(existing) = std::fs::metadata(&to)
                && existing.len() == bytes
                && existing.modified().ok() == Some(modified)
            {
                self.unchanged += 1;
                continue;
            }
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io_error(parent))?;
            }
            self.wanted.push((from, to, modified));
        }
        Ok(())
    }

    /// Copies to temp files (many at a time, keeping the modification
    /// time), then publishes them together.
    fn finish(self) -> Result<(usize, usize), ExperimentsError> {
        let staged: Vec<(PathBuf, PathBuf)> = self
            .wanted
            .iter()
            .map(|(_, to, _)| (crate::atomic::temp_path_for(to), to.clone()))
            .collect();
        let copied: Result<(), ExperimentsError> = self
            .wanted
            .par_iter()
            .zip(&staged)
            .try_for_each(|((from, _, modified), (temp, _))| {
                std::fs::copy(from, temp)
                    .and_then(|_| {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(temp)?
                            .set_modified(*modified)
                    })
                    .map_err(|error| ExperimentsError::Io {
                        path: from.clone(),
                        error,
                    })
            });
        if let Err(err) = copied {
            for (temp, _) in &staged {
                let _ = std::fs::remove_file(temp);
            }
            return Err(err);
        }
        let first = staged.first().map(|(_, p)| p.clone()).unwrap_or_default();
        crate::atomic::publish_files(&staged).map_err(io_error(first))?;
        Ok((staged.len(), self.unchanged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_acceptable_and_unique() {
        let mut renamed = BTreeMap::new();
        let keys = keys_for_mlflow(
            vec![
                ("test/recall/a+b".into(), "1".into()),
                ("test/recall/a_b".into(), "2".into()),
                ("val/roc_auc".into(), "3".into()),
                ("val/roc_auc/cat".into(), "4".into()),
                ("x//./y".into(), "5".into()),
            ],
            &mut renamed,
        );
        let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "test/recall/a_b_2",
                "test/recall/a_b",
                "val.roc_auc",
                "val/roc_auc/cat",
                "x/_/y"
            ]
        );
        assert_eq!(renamed["test/recall/a+b"], "test/recall/a_b_2");
        assert!(!renamed.contains_key("test/recall/a_b"));
        assert_eq!(renamed["val/roc_auc"], "val.roc_auc");
        assert!(!renamed.contains_key("val/roc_auc/cat"));
    }

    #[test]
    fn yaml_fields_read_mlflow_and_lazarus_quoting() {
        let fields = yaml_fields(
            "artifact_location: file:///tmp/x\nexperiment_id: '12'\nname: 'it''s'\ntags: []\n",
        );
        assert_eq!(fields["experiment_id"], "12");
        assert_eq!(fields["name"], "it's");
        let fields = yaml_fields("experiment_id: \"7\"\nname: \"a \\\"b\\\"\"\n");
        assert_eq!(fields["name"], "a \"b\"");
        let fields = yaml_fields("name: plain words\n");
        assert_eq!(fields["name"], "plain words");
    }

    #[test]
    fn file_uris_encode_segments() {
        assert_eq!(file_uri(Path::new("/tmp/a b/%x")), "file:///tmp/a%20b/%25x");
    }

    #[test]
    fn run_ids_are_stable_hex() {
        let id = run_uuid("20261124-232226-000");
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, run_uuid("20261124-232226-000"));
        assert_ne!(id, run_uuid("20261124-232226-001"));
    }
}
