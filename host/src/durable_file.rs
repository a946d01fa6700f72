//! Replacing a whole file so that a crash leaves the old or the new content,
//! never a torn or missing file: the one way the hub writes the files of its
//! storage folder that must survive a crash (hub twin cache, scope cache and
//! its master key, queue status, compiled plugin cache).
//!
//! Owns the write sequence only: a temporary file in the target's folder,
//! fsync of the file, rename over the target, fsync of the folder. Built on
//! the `atomic-write-file` crate (with `unnamed-tmpfile`: on Linux the
//! temporary file is an unnamed `O_TMPFILE`, so a `kill -9` mid-write leaves
//! nothing behind; elsewhere it falls back to a hidden named file that is
//! removed on error). Does not own what is written, where, or when; the fjall
//! queue has its own journal.

use std::io::Write;
use std::path::Path;

use atomic_write_file::AtomicWriteFile;

/// Who may read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mode 0666 less the umask (a replaced file keeps its mode).
    Default,
    /// Mode 0600: only the hub's user (secrets, keys).
    Private,
}

/// Replaces `path` with `bytes`, durably. On error the old file (if any) is
/// left as it was.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_with(path, Access::Default, |f| f.write_all(bytes))
}

/// [`replace`] with mode 0600 for a file that holds a secret.
pub fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_with(path, Access::Private, |f| f.write_all(bytes))
}

/// Replaces `path` with what `write` writes, durably. If `write` fails, the
/// new content is discarded and the old file is left as it was.
pub fn replace_with(
    path: &Path,
    access: Access,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut options = AtomicWriteFile::options();
    if access == Access::Private {
        use atomic_write_file::unix::OpenOptionsExt as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
        options.preserve_mode(false);
    }
    let mut file = options.open(path)?;
    match write(&mut file) {
        // commit: fsync the file, rename it over `path`, fsync the folder.
        Ok(()) => file.commit(),
        Err(e) => {
            let _ = file.discard();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_content_is_replaced_whole_and_no_temporary_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"a much longer first version").unwrap();
        replace(&path, b"short").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_failing_write_leaves_the_old_file_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"old").unwrap();
        let err = replace_with(&path, Access::Default, |f| {
            f.write_all(b"half of the new")?;
            Err(std::io::Error::other("serializer gave up"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "serializer gave up");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_write_into_a_missing_folder_fails_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-folder").join("state.json");
        assert!(replace(&path, b"x").is_err());
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_private_file_is_readable_by_its_owner_only_even_when_it_replaces_a_readable_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        replace_private(&path, b"new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }
}
