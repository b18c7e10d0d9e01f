//! Reading image files without being fooled by what is not a file.
//!
//! A FIFO among the images would block a plain `read` for ever, and a
//! device file could return endless bytes, so every image lazarus reads
//! (at `dataset add`, in the worker, in `predict`) goes through
//! [`read_regular_file`]: it opens without blocking, checks that the opened
//! object is a regular file, and only then reads. Symbolic links are
//! followed wherever they point (a manifest may name any path); what they
//! resolve to must be a regular file.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

/// Why a path could not be read as an image file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not a regular file ({kind})")]
    NotRegular { kind: &'static str },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What kind of file system object `metadata` describes, in words.
pub fn kind_of(metadata: &Metadata) -> &'static str {
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return "regular file";
    }
    if file_type.is_dir() {
        return "folder";
    }
    if file_type.is_symlink() {
        return "symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "FIFO";
        }
        if file_type.is_socket() {
            return "socket";
        }
        if file_type.is_block_device() {
            return "block device";
        }
        if file_type.is_char_device() {
            return "character device";
        }
    }
    "special file"
}

/// Reads a whole regular file; anything else (FIFO, socket, device, folder)
/// is refused without blocking.
pub fn read_regular_file(path: &Path) -> Result<Vec<u8>, ReadError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer comes; with
        // O_NONBLOCK it returns at once, and the check below refuses it.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let mut file: File = options.open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(ReadError::NotRegular {
            kind: kind_of(&metadata),
        });
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_and_folders_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        std::fs::write(&path, b"bytes").unwrap();
        assert_eq!(read_regular_file(&path).unwrap(), b"bytes");
        let err = read_regular_file(dir.path()).unwrap_err();
        assert!(err.to_string().contains("folder"), "{err}");
    }
}
