//! Writing files and directories so that a crash or a kill at any moment leaves either the old
//! complete version or the new complete one, never a truncated file: everything is written
//! under a temporary name, flushed to disk, and renamed into place (a rename within one
//! directory is atomic on every platform Rust supports).
//!
//! The one place the sae crates write results, weights, checkpoints and converted datasets.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

/// An I/O error and the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct Error {
    /// The file or directory.
    pub path: PathBuf,
    /// What went wrong.
    #[source]
    pub source: io::Error,
}

/// Attaches `path` to an I/O error.
pub fn at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error { path: path.to_path_buf(), source }
}

/// The temporary name `path` is written under: `path` with `.tmp` appended.
pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), Error> {
    write_atomic_with(path, |tmp| std::fs::write(tmp, contents).map_err(at(tmp)))
}

/// Calls `write` to create the file at a temporary path, then flushes it to disk and renames
/// it to `path`. On error the temporary file is removed and `path` is untouched.
pub fn write_atomic_with<E: From<Error>>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let tmp = temporary_path(path);
    let result = write(&tmp).and_then(|()| {
        // Write access: Windows flushes only handles that may write.
        OpenOptions::new().write(true).open(&tmp).and_then(|f| f.sync_all()).map_err(at(&tmp))?;
        std::fs::rename(&tmp, path).map_err(at(path))?;
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Moves the completely written directory `tmp` to `dest`, replacing what is there. Readers
/// that trust `dest` only once a marker or pointer inside it or beside it says so (checkpoints'
/// `last.json`, a converted dataset's `COMPLETE`) never see a partial directory.
pub fn replace_dir(tmp: &Path, dest: &Path) -> Result<(), Error> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(at(dest))?;
    }
    std::fs::rename(tmp, dest).map_err(at(dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("sae-fs-{name}-")).tempdir().unwrap()
    }

    #[test]
    fn writes_replace_whole_files_and_failed_writes_leave_the_old_one() {
        let dir = scratch("file");
        let dir = dir.path();
        let path = dir.join("summary.csv");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let failed: Result<(), Error> = write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"partial").map_err(at(tmp))?;
            Err(Error { path: tmp.to_path_buf(), source: io::Error::other("disk full") })
        });
        assert!(failed.unwrap_err().to_string().contains("summary.csv.tmp: disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(!temporary_path(&path).exists(), "the temporary file is removed");
        let missing = dir.join("no-such-dir").join("x.json");
        assert!(write_atomic(&missing, b"{}").unwrap_err().to_string().contains("no-such-dir"));
    }

    #[test]
    fn replace_dir_swaps_in_the_new_directory() {
        let dir = scratch("dir");
        let dir = dir.path();
        let (tmp, dest) = (dir.join("epoch-0001.tmp"), dir.join("epoch-0001"));
        for contents in ["old", "new"] {
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::write(tmp.join("state.json"), contents).unwrap();
            replace_dir(&tmp, &dest).unwrap();
        }
        assert_eq!(std::fs::read_to_string(dest.join("state.json")).unwrap(), "new");
        assert!(!tmp.exists());
    }
}
