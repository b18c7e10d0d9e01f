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
//! Folders a verb replaces whole live in `output_dir`.

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

/// Removes files many at a time (like fsyncs, unlinks wait on the journal,
/// not on the CPU); a file already gone is fine.
pub fn remove_files(paths: &[PathBuf]) -> io::Result<()> {
    for_each_parallel(paths, |path| match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(named(e, path)),
    })
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
