//! Output directories appear all at once or not at all: a build writes into a hidden sibling
//! and swaps it into place at the end. A failed or killed build leaves any previous output as
//! it was.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const MARK: &str = ".modelforge-tmp-";

pub(crate) struct StagingDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Creates an empty staging directory beside `target`, first removing what killed builds
    /// of the same target left behind.
    pub fn new(target: &Path) -> std::io::Result<Self> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| std::io::Error::other("the output path has no file name"))?
            .to_string_lossy()
            .into_owned();
        std::fs::create_dir_all(&parent)?;
        remove_abandoned(&parent, &name);
        let staging = parent.join(format!(".{name}{MARK}{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir(&staging)?;
        Ok(StagingDir {
            target: target.to_owned(),
            staging,
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the staged directory into place, replacing an existing output in one step. The
    /// previous output, if any, now sits at the staging path and is removed on drop, so that
    /// the caller can finish what must happen quickly (the lock file) before that slow part.
    pub fn commit(&mut self) -> std::io::Result<()> {
        sync_dir(&self.staging)?;
        if self.target.exists() {
            exchange(&self.staging, &self.target)?;
            // The old output now sits at the staging path; Drop removes it.
        } else {
            std::fs::rename(&self.staging, &self.target)?;
            self.committed = true;
        }
        Ok(())
    }

    /// Flushes the rename itself to disk (after [`StagingDir::commit`]).
    pub fn sync_parent(&self) {
        let _ = sync_parent(&self.target);
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`), falling back to two renames
/// on file systems that cannot.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both are valid NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let aside = a.with_extension("old");
    std::fs::rename(b, &aside)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&aside, a)
}

/// Removes what killed builds left beside `target` (`.NAME.modelforge-tmp-PID`).
pub(crate) fn remove_abandoned_beside(target: &Path) {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Some(name) = target.file_name() {
        remove_abandoned(parent, &name.to_string_lossy());
    }
}

/// A file (the lock, a GGUF) written completely beside its target, then renamed over it.
pub(crate) struct StagedFile {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Writes `bytes` beside `target`, flushed to disk when `durable`.
    pub fn new(target: &Path, bytes: &[u8], durable: bool) -> std::io::Result<Self> {
        let (staged, mut file) = StagedFile::create(target)?;
        std::io::Write::write_all(&mut file, bytes)?;
        if durable {
            file.sync_all()?;
        }
        Ok(staged)
    }

    /// An empty file beside `target`, for the caller to write (a large single-file output,
    /// the GGUF), and what renames it over `target`.
    pub fn create(target: &Path) -> std::io::Result<(Self, std::fs::File)> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| std::io::Error::other("the path has no file name"))?
            .to_string_lossy()
            .into_owned();
        remove_abandoned(&parent, &name);
        std::fs::create_dir_all(&parent)?;
        let staged = StagedFile {
            target: target.to_owned(),
            staging: parent.join(format!(".{name}{MARK}{}", std::process::id())),
            committed: false,
        };
        let file = std::fs::File::create(&staged.staging)?;
        Ok((staged, file))
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.staging, &self.target)?;
        self.committed = true;
        sync_parent(&self.target)
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

/// Removes `.NAME.modelforge-tmp-PID` siblings (directories or files) whose process is gone.
fn remove_abandoned(parent: &Path, name: &str) {
    let prefix = format!(".{name}{MARK}");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive || pid == std::process::id() as i32 {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_replaces_and_drop_discards() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), "old").unwrap();

        let staged = StagingDir::new(&target).unwrap();
        std::fs::write(staged.path().join("new"), "new").unwrap();
        drop(staged);
        assert!(
            target.join("old").exists(),
            "an abandoned build leaves the output alone"
        );

        let mut staged = StagingDir::new(&target).unwrap();
        std::fs::write(staged.path().join("new"), "new").unwrap();
        staged.commit().unwrap();
        assert!(target.join("new").exists());
        drop(staged);
        assert!(target.join("new").exists() && !target.join("old").exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no staging directory is left"
        );
    }
}
