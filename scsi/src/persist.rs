//! Files the target keeps its own state in (persistent reservations,
//! the stats file), replaced so that a crash at any instant leaves the old
//! contents or the new, never a torn mix or an empty file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replace `path` with `bytes`: write a temporary file beside it, fsync
/// it, rename it over `path`, and fsync the directory so the rename itself
/// survives a power loss. A crash before the rename leaves the old file
/// (and a stale temporary one, overwritten next time).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Remove `path` (gone already is fine) and fsync its directory, so the
/// removal is not undone by a power loss.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        // A stale temporary file from a crash is simply overwritten.
        std::fs::write(temp_path(&p), b"torn").unwrap();
        write_atomic(&p, b"3").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"3");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        remove_durably(&p).unwrap();
        remove_durably(&p).unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn a_directory_that_cannot_take_the_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("state");
        assert!(write_atomic(&p, b"x").is_err());
    }
}
