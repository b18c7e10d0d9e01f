//! Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder.
//!
//! A reader sees either the old content or the new, never a torn file. Every
//! write under jobs/datasets, features/ and experiments/ goes through here.
//! Temp files are named `.tmp-<pid>-<counter>-<name>` so that a reconciler can
//! recognise and remove the ones a killed process left behind.

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
