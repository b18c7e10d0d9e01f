//! Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder.
//!
//! A reader sees either the old content or the new, never a torn file. Every
//! write under jobs/datasets, features/ and experiments/ goes through here.
//! Temp files are named `.tmp-<pid>-<counter>-<name>` so that a reconciler can
//! recognise and remove the ones a killed process left behind.
//!
//! Many files at once ([`write_files`], [`sync_tree`]) are fsynced
//! concurrently: a journaling file system commits them together, so a
//! thousand small files cost about what a handful do one after another.
//! Output folders a verb replaces whole (`experiments report --out`) carry
//! [`OUTPUT_MARKER`]; [`replace_output_dir`] never deletes a folder without it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of every temp file and folder this module creates.
pub const TEMP_PREFIX: &str = ".tmp-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temp path beside `target` (same folder, so the rename is atomic).
pub fn temp_path_for(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp_name = format!("{TEMP_PREFIX}{}-{counter}-{name}", std::process::id());
    target.with_file_name(temp_name)
}

/// Writes `bytes` to `target` atomically and durably.
pub fn write_file(target: &Path, bytes: &[u8]) -> io::Result<()> {
    write_file_with(target, |file| file.write_all(bytes))
}

/// Creates a temp file beside `target`, lets `fill` write it, then fsyncs and
/// renames it into place. On any error the temp file is removed.
pub fn write_file_with(
    target: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let temp = temp_path_for(target);
    let result = (|| {
        let mut file = File::create(&temp)?;
        fill(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, target)?;
        sync_parent(target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Publishes a fully written folder `staging` as `target` with one rename.
/// Fails with `AlreadyExists` if `target` exists; `staging` is then left for the caller.
pub fn publish_dir(staging: &Path, target: &Path) -> io::Result<()> {
    sync_dir(staging)?;
    if target.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", target.display()),
        ));
    }
    fs::rename(staging, target)?;
    sync_parent(target)
}

/// Writes many files atomically and durably: each goes to a temp file beside
/// its target, all temps are fsynced together (a journaling file system
/// commits concurrent fsyncs as one), then each is renamed into place and
/// the folders that changed are fsynced. Parent folders must exist. On an
/// error, temps not yet renamed are removed; files already renamed stay
/// (each one whole, old or new).
pub fn write_files(files: &[(PathBuf, Vec<u8>)]) -> io::Result<()> {
    let staged: Vec<(PathBuf, PathBuf)> = files
        .iter()
        .map(|(target, _)| (temp_path_for(target), target.clone()))
        .collect();
    let indices: Vec<usize> = (0..files.len()).collect();
    if let Err(err) = for_each_parallel(&indices, |&index| {
        fs::write(&staged[index].0, &files[index].1)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", staged[index].0.display())))
    }) {
        discard(&staged);
        return Err(err);
    }
    publish_files(&staged)
}

/// Publishes files written (not yet fsynced) to temp paths from
/// [`temp_path_for`]: fsyncs them all together, renames each onto its
/// target, then fsyncs the folders that changed. On an error the temps not
/// yet renamed are removed.
pub fn publish_files(staged: &[(PathBuf, PathBuf)]) -> io::Result<()> {
    let temps: Vec<PathBuf> = staged.iter().map(|(temp, _)| temp.clone()).collect();
    if let Err(err) = for_each_parallel(&temps, |path| sync_file(path)) {
        discard(staged);
        return Err(err);
    }
    if let Err(err) = for_each_parallel(staged, |(temp, target)| {
        fs::rename(temp, target)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", target.display())))
    }) {
        // Renamed ones are whole files in place; the rest are removed.
        discard(staged);
        return Err(err);
    }
    let mut parents: Vec<PathBuf> = staged
        .iter()
        .filter_map(|(_, target)| target.parent())
        .map(|parent| {
            if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent.to_path_buf()
            }
        })
        .collect();
    parents.sort();
    parents.dedup();
    for_each_parallel(&parents, |dir| sync_dir(dir).map_err(|e| named(e, dir)))
}

fn discard(staged: &[(PathBuf, PathBuf)]) {
    for (temp, _) in staged {
        let _ = fs::remove_file(temp);
    }
}

/// fsyncs every file and folder under `dir` (and `dir` itself), many at a
/// time: a freshly written folder is durable before it is published with
/// one rename, at a fraction of the cost of one fsync after another.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    let mut paths = vec![dir.to_path_buf()];
    let mut next = 0;
    while next < paths.len() {
        if fs::symlink_metadata(&paths[next])?.is_dir() {
            for entry in fs::read_dir(&paths[next])? {
                paths.push(entry?.path());
            }
        }
        next += 1;
    }
    for_each_parallel(&paths, |path| sync_file(path))
}

/// fsyncs a file (or folder) by path; the error names it.
fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| named(e, path))
}

fn named(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// How many fsyncs run at once: enough for the file system to batch them,
/// whatever the number of cores (they wait on the disk, not the CPU).
const SYNC_THREADS: usize = 16;

/// Runs `action` on every item from [`SYNC_THREADS`] threads; the first
/// error is returned (the action's error names its file).
fn for_each_parallel<T: Sync>(
    items: &[T],
    action: impl Fn(&T) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let next = AtomicU64::new(0);
    let threads = SYNC_THREADS.min(items.len());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> io::Result<()> {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(item) = items.get(index) else {
                            return Ok(());
                        };
                        action(item)?;
                    }
                })
            })
            .collect();
        // The scope joins every worker; the first error is the answer.
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("sync thread panicked")))
        })
    })
}

/// Name of the file lazarus writes into every output folder it may later
/// replace whole (`experiments report --out`): a folder without it was not
/// written by lazarus and is never deleted.
pub const OUTPUT_MARKER: &str = ".lazarus-output";

/// What an output folder path holds before a verb writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFolder {
    /// Nothing there yet.
    Absent,
    /// A folder lazarus wrote before, of the expected kind: replaceable.
    Ours,
}

/// The marker's content: who wrote the folder and as what (`report`, ...).
pub fn output_marker(kind: &str) -> Vec<u8> {
    let marker = serde_json::json!({
        "written_by": "lazarus",
        "kind": kind,
        "lazarus_version": env!("CARGO_PKG_VERSION"),
    });
    serde_json::to_vec_pretty(&marker).expect("a JSON value serialises")
}

/// Whether `target` may become an output folder of `kind`: absent, or a
/// folder holding lazarus's marker for that kind. Anything else is refused
/// with `AlreadyExists` and a message that names it, and is left untouched.
pub fn check_output_dir(target: &Path, kind: &str) -> io::Result<OutputFolder> {
    let metadata = match fs::symlink_metadata(target) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(OutputFolder::Absent),
        Err(err) => return Err(err),
    };
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} {why}; lazarus replaces only folders it wrote (left untouched: choose \
                 another --out or move it away)",
                target.display()
            ),
        ))
    };
    if !metadata.is_dir() {
        return refuse("exists and is not a folder".into());
    }
    let marker_path = target.join(OUTPUT_MARKER);
    let text = match fs::read_to_string(&marker_path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return refuse(format!("exists and has no {OUTPUT_MARKER} marker"));
        }
        Err(err) => return Err(err),
    };
    let found: Option<String> = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .filter(|value| value["written_by"] == "lazarus")
        .and_then(|value| value["kind"].as_str().map(str::to_string));
    match found {
        Some(found) if found == kind => Ok(OutputFolder::Ours),
        Some(found) => refuse(format!("holds a lazarus {found}, not a {kind}")),
        None => refuse(format!("has a {OUTPUT_MARKER} that lazarus did not write")),
    }
}

/// Publishes the fully written folder `staging` (which holds the marker for
/// `kind`) as `target`. A previous output folder there is replaced as a
/// whole, and only if [`check_output_dir`] accepts it: it moves aside under
/// a temp name, the new folder takes its name, then the old one is removed.
pub fn replace_output_dir(staging: &Path, target: &Path, kind: &str) -> io::Result<()> {
    sync_tree(staging)?;
    match check_output_dir(target, kind)? {
        OutputFolder::Absent => publish_dir(staging, target),
        OutputFolder::Ours => {
            let old = temp_path_for(target);
            fs::rename(target, &old)?;
            if let Err(err) = publish_dir(staging, target) {
                // Put the previous folder back: the target is never left missing.
                let _ = fs::rename(&old, target);
                return Err(err);
            }
            remove_tree(&old)
        }
    }
}

/// Removes a folder and everything under it, many files at a time (like
/// fsyncs, unlinks wait on the journal, not on the CPU).
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    // Folders by depth, found breadth first.
    let mut levels: Vec<Vec<PathBuf>> = vec![vec![dir.to_path_buf()]];
    let mut files = Vec::new();
    while let Some(level) = levels.last() {
        let mut below = Vec::new();
        for folder in level {
            for entry in fs::read_dir(folder)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    below.push(entry.path());
                } else {
                    files.push(entry.path());
                }
            }
        }
        if below.is_empty() {
            break;
        }
        levels.push(below);
    }
    for_each_parallel(&files, |path| {
        fs::remove_file(path).map_err(|e| named(e, path))
    })?;
    // Deepest level first: its folders are empty by then.
    for level in levels.iter().rev() {
        for_each_parallel(level, |folder| {
            fs::remove_dir(folder).map_err(|e| named(e, folder))
        })?;
    }
    Ok(())
}

/// fsyncs the folder that holds `path`, so a rename inside it survives power loss.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// fsyncs a folder's entry list.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// True for names this module uses for temp files and folders.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.json");
        write_file(&target, b"one").unwrap();
        write_file(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.json".to_string()]);
    }

    #[test]
    fn failed_fill_leaves_old_content_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.json");
        write_file(&target, b"old").unwrap();
        let err = write_file_with(&target, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_files_writes_all_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        let files = vec![
            (dir.path().join("a"), b"one".to_vec()),
            (dir.path().join("sub/b"), b"two".to_vec()),
        ];
        write_files(&files).unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"one");
        assert_eq!(fs::read(dir.path().join("sub/b")).unwrap(), b"two");
        // A missing parent folder fails the batch and leaves no temp behind.
        let err = write_files(&[
            (dir.path().join("c"), b"3".to_vec()),
            (dir.path().join("missing/d"), b"4".to_vec()),
        ])
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !is_temp_name(n)), "{names:?}");
        assert!(!dir.path().join("c").exists());
    }

    #[test]
    fn output_folders_are_replaced_only_when_lazarus_wrote_them() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        assert_eq!(
            check_output_dir(&target, "report").unwrap(),
            OutputFolder::Absent
        );
        let stage = |content: &str| {
            let staging = temp_path_for(&target);
            fs::create_dir(&staging).unwrap();
            fs::write(staging.join(OUTPUT_MARKER), output_marker("report")).unwrap();
            fs::write(staging.join("index.html"), content).unwrap();
            staging
        };
        replace_output_dir(&stage("first"), &target, "report").unwrap();
        fs::write(target.join("added.txt"), "x").unwrap();
        assert_eq!(
            check_output_dir(&target, "report").unwrap(),
            OutputFolder::Ours
        );
        replace_output_dir(&stage("second"), &target, "report").unwrap();
        assert_eq!(
            fs::read_to_string(target.join("index.html")).unwrap(),
            "second"
        );
        assert!(!target.join("added.txt").exists(), "replaced as a whole");
        // Another kind of lazarus output, or a folder without the marker, is refused.
        let err = check_output_dir(&target, "review").unwrap_err();
        assert!(
            err.to_string()
                .contains("holds a lazarus report, not a review"),
            "{err}"
        );
        let theirs = dir.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        fs::write(theirs.join("thesis.tex"), "keep").unwrap();
        let staging = stage("third");
        let err = replace_output_dir(&staging, &theirs, "report").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            err.to_string().contains("has no .lazarus-output marker"),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(theirs.join("thesis.tex")).unwrap(),
            "keep"
        );
        fs::write(theirs.join(OUTPUT_MARKER), "{}").unwrap();
        let err = check_output_dir(&theirs, "report").unwrap_err();
        assert!(
            err.to_string().contains("that lazarus did not write"),
            "{err}"
        );
    }

    #[test]
    fn remove_tree_removes_nested_folders() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        for i in 0..40 {
            let folder = tree.join(format!("d{}", i % 4)).join("sub");
            fs::create_dir_all(&folder).unwrap();
            fs::write(folder.join(format!("f{i}")), b"x").unwrap();
        }
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(dir.path().exists());
    }

    #[test]
    fn publish_dir_refuses_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join(".tmp-x");
        let target = dir.path().join("x");
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("f"), b"1").unwrap();
        publish_dir(&staging, &target).unwrap();
        assert!(target.join("f").exists());
        fs::create_dir(&staging).unwrap();
        let err = publish_dir(&staging, &target).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }
}
