//! Files written whole or not at all: the bytes go to a temporary name in the target's folder
//! (so the rename stays on one file system), are synced to disk, and the temporary file is
//! renamed over the target. A crash, a full disk or a failed encoder leaves the old file (or
//! none), never a partial one. Every layer that writes files uses this module, so it imports
//! nothing but the error type.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// How files are written: `(path, bytes)`. The default, [`write_and_sync`], writes and syncs;
/// tests inject failures.
pub type WriteFile<'a> = dyn FnMut(&Path, &[u8]) -> std::io::Result<()> + 'a;

/// `dir/.name.tmp-PID`: beside the target so the rename stays on one file system; the process
/// id keeps two processes writing the same target apart.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` and syncs it to disk (not atomic by itself).
pub fn write_and_sync(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Syncs a folder's entries (renames into it) to disk, where the platform allows.
pub fn sync_dir(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// Writes `bytes` to `path` atomically (temporary file, sync, rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, bytes, &mut write_and_sync)
}

/// [`write_atomically`] with the temporary file written by `write_file`.
pub fn write_atomically_with(path: &Path, bytes: &[u8], write_file: &mut WriteFile) -> Result<()> {
    let temporary = temporary_path(path);
    match write_file(&temporary, bytes).and_then(|_| std::fs::rename(&temporary, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            Err(Error::io(path, e))
        }
    }
}

/// Streams a file to `path` atomically: `write` fills the temporary file (its errors are its
/// own, so that it can say what failed: an encoder, a decompressor), which is then flushed,
/// synced and renamed. On any error the temporary file is removed and `path` is untouched.
pub fn write_streamed_atomically<T>(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> Result<T>) -> Result<T> {
    let temporary = temporary_path(path);
    let result = (|| -> Result<T> {
        let mut out = BufWriter::new(File::create(&temporary).map_err(|e| Error::io(path, e))?);
        let value = write(&mut out)?;
        let file = out.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        std::fs::rename(&temporary, path).map_err(|e| Error::io(path, e))?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("diffuse-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect()
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_nothing_behind() {
        let dir = scratch("failed");
        let target = dir.join("file.txt");
        write_atomically(&target, b"old").unwrap();
        let error = write_atomically_with(&target, b"new", &mut |path, _| {
            std::fs::write(path, b"ne")?;
            Err(std::io::Error::from_raw_os_error(28))
        })
        .unwrap_err();
        assert!(error.to_string().contains("file.txt"), "{error}");
        let streamed = write_streamed_atomically(&target, |out| {
            out.write_all(b"partial").map_err(|e| Error::io(&target, e))?;
            Err::<(), _>(Error::invalid("the encoder failed"))
        });
        assert!(streamed.unwrap_err().to_string().contains("the encoder failed"));
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
        assert_eq!(write_streamed_atomically(&target, |out| out.write_all(b"new").map_err(|e| Error::io(&target, e)).map(|_| 3)).unwrap(), 3);
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
