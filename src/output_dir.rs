//! Folders lazarus writes whole and may later replace (`review --out`,
//! `export --out`), and the one rule for replacing them: never delete a
//! file lazarus did not write.
//!
//! Every such folder holds a marker, [`MARKER_FILE`], naming the verb that
//! wrote it and the files it wrote. An existing `--out` folder is replaced
//! only when every file in it is one of those; a folder holding anything
//! else is refused, naming the files, whatever the flags. A folder without
//! a marker (written before markers existed) is replaced only with
//! `--force`, and only if each of its files is one that verb writes (its
//! `Kind::recognises`). An empty folder is simply used. The new content is
//! staged beside the target and swapped in with renames; the old folder is
//! then removed file by file, lazarus's files only.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The marker in every folder a verb writes whole.
pub const MARKER_FILE: &str = ".lazarus-output.json";

/// What the marker records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The verb that wrote the folder, e.g. `lazarus review`.
    pub written_by: String,
    pub lazarus_version: String,
    /// Every file it wrote, relative to the folder, `/`-separated.
    pub files: Vec<String>,
}

/// A kind of folder a verb writes.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// The verb, as messages name it (`lazarus review`).
    pub verb: &'static str,
    /// Whether a file (relative path, `/`-separated) is one this verb
    /// writes: how a folder from before markers is recognised.
    pub recognises: fn(&str) -> bool,
    /// Whether a folder this verb wrote (with a marker) is replaced without
    /// `--force` (a review is redone in place; a bundle is a deliverable).
    pub replace_without_force: bool,
}

/// How an existing folder is treated.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplaceOptions {
    /// Replace a folder of this verb that has no marker, or a bundle.
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "{path} holds files {verb} did not write ({files}); it is never replaced: move them out or choose another --out"
    )]
    Foreign {
        path: PathBuf,
        verb: &'static str,
        files: String,
    },
    #[error(
        "{path} has no {MARKER_FILE}: it looks like the output of an older {verb}; --force replaces it (only its {count} files, all of a kind {verb} writes)"
    )]
    Unmarked {
        path: PathBuf,
        verb: &'static str,
        count: usize,
    },
    #[error("{path} was written by {verb} already; --force replaces it")]
    Exists { path: PathBuf, verb: &'static str },
    #[error("{path} is not a folder")]
    NotAFolder { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What is at the target before a verb writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prior {
    Absent,
    /// An empty folder: used as is.
    Empty,
    /// A folder that may be replaced: these files (relative paths) go.
    Replaceable(Vec<String>),
}

/// The files under `dir`, relative and `/`-separated, sorted; symbolic
/// links count as files (they are never followed).
pub fn files_under(dir: &Path) -> Result<Vec<String>, OutputError> {
    let mut out = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = pending.pop() {
        for entry in std::fs::read_dir(&folder).map_err(io_error(&folder))? {
            let entry = entry.map_err(io_error(&folder))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = format!("{prefix}{name}");
            let kind = entry.file_type().map_err(io_error(&entry.path()))?;
            if kind.is_dir() {
                pending.push((entry.path(), format!("{relative}/")));
            } else {
                out.push(relative);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Checks whether `out` may be written by `kind` under `options`.
pub fn check(out: &Path, kind: &Kind, options: ReplaceOptions) -> Result<Prior, OutputError> {
    let metadata = match std::fs::symlink_metadata(out) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Prior::Absent),
        Err(e) => return Err(io_error(out)(e)),
    };
    if !metadata.is_dir() {
        return Err(OutputError::NotAFolder {
            path: out.to_path_buf(),
        });
    }
    let files = files_under(out)?;
    if files.is_empty() {
        return Ok(Prior::Empty);
    }
    let marker: Option<Marker> = if files.iter().any(|f| f == MARKER_FILE) {
        let path = out.join(MARKER_FILE);
        std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    } else {
        None
    };
    let ours = |file: &str| match &marker {
        Some(marker) => file == MARKER_FILE || marker.files.iter().any(|listed| listed == file),
        None => (kind.recognises)(file),
    };
    let foreign: Vec<&String> = files.iter().filter(|f| !ours(f)).collect();
    if !foreign.is_empty() {
        const SHOWN: usize = 5;
        let mut names: Vec<String> = foreign.iter().take(SHOWN).map(|f| f.to_string()).collect();
        if foreign.len() > SHOWN {
            names.push(format!("and {} more", foreign.len() - SHOWN));
        }
        return Err(OutputError::Foreign {
            path: out.to_path_buf(),
            verb: kind.verb,
            files: names.join(", "),
        });
    }
    match (marker.is_some(), options.force) {
        (false, false) => Err(OutputError::Unmarked {
            path: out.to_path_buf(),
            verb: kind.verb,
            count: files.len(),
        }),
        (true, false) if !kind.replace_without_force => Err(OutputError::Exists {
            path: out.to_path_buf(),
            verb: kind.verb,
        }),
        _ => Ok(Prior::Replaceable(files)),
    }
}

/// Writes the marker of a staged folder: `files` are what the verb wrote.
pub fn write_marker(staging: &Path, kind: &Kind, files: &[String]) -> Result<(), OutputError> {
    let mut files = files.to_vec();
    files.sort();
    let marker = Marker {
        written_by: kind.verb.to_string(),
        lazarus_version: crate::VERSION.to_string(),
        files,
    };
    let path = staging.join(MARKER_FILE);
    let mut bytes = serde_json::to_vec_pretty(&marker).expect("a marker serialises");
    bytes.push(b'\n');
    crate::atomic::write_file(&path, &bytes).map_err(io_error(&path))
}

/// Puts the fully written `staging` folder in place of `out` (as `check`
/// found it): a rename, after moving a replaceable folder aside. The old
/// folder is then removed: its files as `check` listed them, then its
/// (now empty) folders; anything that appeared there since stays, and is
/// named in the error.
pub fn publish(staging: &Path, out: &Path, prior: &Prior) -> Result<(), OutputError> {
    match prior {
        Prior::Absent => crate::atomic::publish_dir(staging, out).map_err(io_error(out)),
        Prior::Empty => {
            // remove_dir only removes an empty folder: nothing can be lost.
            std::fs::remove_dir(out).map_err(io_error(out))?;
            crate::atomic::publish_dir(staging, out).map_err(io_error(out))
        }
        Prior::Replaceable(files) => {
            let old = crate::atomic::temp_path_for(out);
            std::fs::rename(out, &old).map_err(io_error(out))?;
            if let Err(err) = crate::atomic::publish_dir(staging, out) {
                // Put the old folder back: nothing changed.
                let _ = std::fs::rename(&old, out);
                return Err(io_error(out)(err));
            }
            remove_listed(&old, files)
        }
    }
}

/// Removes `files` from `dir`, then its folders bottom-up, each only if empty.
fn remove_listed(dir: &Path, files: &[String]) -> Result<(), OutputError> {
    let paths: Vec<PathBuf> = files.iter().map(|file| dir.join(file)).collect();
    crate::atomic::remove_files(&paths).map_err(io_error(dir))?;
    let mut folders: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
    folders.insert(dir.to_path_buf());
    for path in &paths {
        let mut parent = path.parent();
        while let Some(folder) = parent.filter(|p| p.starts_with(dir) && *p != dir) {
            if !folders.insert(folder.to_path_buf()) {
                break;
            }
            parent = folder.parent();
        }
    }
    let mut folders: Vec<PathBuf> = folders.into_iter().collect();
    // Deepest first.
    folders.sort_by_key(|f| std::cmp::Reverse(f.components().count()));
    for folder in folders {
        if let Err(e) = std::fs::remove_dir(&folder) {
            let left = files_under(dir).unwrap_or_default().join(", ");
            return Err(OutputError::Io {
                path: folder,
                source: std::io::Error::new(
                    e.kind(),
                    format!(
                        "the replaced folder, moved to {}, still holds files lazarus did not write ({left}); they were left there",
                        dir.display()
                    ),
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: Kind = Kind {
        verb: "lazarus test",
        recognises: |file| file == "a.txt" || file.starts_with("sub/"),
        replace_without_force: true,
    };

    fn staged(dir: &Path, name: &str, files: &[&str]) -> PathBuf {
        let staging = dir.join(name);
        for file in files {
            let path = staging.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, name).unwrap();
        }
        let listed: Vec<String> = files.iter().map(|f| f.to_string()).collect();
        write_marker(&staging, &KIND, &listed).unwrap();
        staging
    }

    #[test]
    fn a_marked_folder_is_replaced_and_a_foreign_file_blocks_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = staged(dir.path(), "first", &["a.txt", "sub/b.txt"]);
        let prior = check(&out, &KIND, ReplaceOptions::default()).unwrap();
        assert_eq!(prior, Prior::Absent);
        publish(&first, &out, &prior).unwrap();
        let second = staged(dir.path(), "second", &["a.txt"]);
        let prior = check(&out, &KIND, ReplaceOptions::default()).unwrap();
        publish(&second, &out, &prior).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("a.txt")).unwrap(),
            "second"
        );
        assert!(!out.join("sub").exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "the old folder is gone, nothing else left");

        std::fs::write(out.join("thesis.tex"), "mine").unwrap();
        for force in [false, true] {
            let err = check(&out, &KIND, ReplaceOptions { force }).unwrap_err();
            assert!(err.to_string().contains("thesis.tex"), "{err}");
        }
    }

    #[test]
    fn an_unmarked_folder_needs_force_and_only_if_every_file_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::write(out.join("a.txt"), "old").unwrap();
        std::fs::write(out.join("sub/x"), "old").unwrap();
        let err = check(&out, &KIND, ReplaceOptions::default()).unwrap_err();
        assert!(
            matches!(err, OutputError::Unmarked { count: 2, .. }),
            "{err}"
        );
        let prior = check(&out, &KIND, ReplaceOptions { force: true }).unwrap();
        assert!(matches!(prior, Prior::Replaceable(ref f) if f.len() == 2));
        std::fs::write(out.join("notes.md"), "mine").unwrap();
        let err = check(&out, &KIND, ReplaceOptions { force: true }).unwrap_err();
        assert!(matches!(err, OutputError::Foreign { .. }), "{err}");
        // An empty folder is used as is.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(
            check(&empty, &KIND, ReplaceOptions::default()).unwrap(),
            Prior::Empty
        );
    }
}
