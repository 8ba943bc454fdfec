//! Running `modelforge-engine`, the separate program that links LibTorch: starting LibTorch
//! costs about 0.2 s and 115 MB, which a build that computes nothing never pays.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use super::job::{Job, Reply};
use super::ExecError;

const NAME: &str = "modelforge-engine";

/// `MODELFORGE_ENGINE`, else `modelforge-engine` beside this executable, else on PATH.
fn engine_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MODELFORGE_ENGINE").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(NAME)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(NAME))
}

/// What the engine did.
pub(crate) struct Run {
    /// The engine's peak resident memory, in bytes.
    pub peak_rss: u64,
}

/// Has the engine compute `job`; each result is in the cache when this returns.
pub(crate) fn run(job: &Job, progress: bool) -> Result<Run, ExecError> {
    let path = engine_path();
    let mut child = Command::new(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| ExecError::Engine {
            message: format!("cannot start `{}`: {e}", path.display()),
            help: "`cargo build` builds modelforge-engine beside modelforge; or point MODELFORGE_ENGINE at it".into(),
        })?;
    let request = serde_json::to_vec(job).expect("a job serialises");
    if let Some(mut stdin) = child.stdin.take() {
        // A failed write means the engine died; its exit status says why.
        let _ = stdin.write_all(&request);
    }
    let bar = super::progress_bar(job.tensors.len(), "fusing ", progress);
    let mut done = 0;
    let mut refused = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Reply>(&line) {
                // The result itself is in the cache; the build reads it from there.
                Ok(Reply::Done(_)) => {
                    done += 1;
                    bar.inc(1);
                }
                Ok(Reply::NonFinite(found)) => refused = Some(found),
                Err(_) => {}
            }
        }
    }
    bar.finish_and_clear();
    let (status, peak_rss) = wait_with_peak(&child).map_err(|e| ExecError::Engine {
        message: e.to_string(),
        help: "the engine could not be waited for".into(),
    })?;
    if let Some(found) = refused {
        return Err(ExecError::NonFinite {
            tensor: found.tensor,
            what: found.what,
            index: found.index,
        });
    }
    if !status.success() || done != job.tensors.len() {
        return Err(ExecError::Engine {
            message: format!("`{}` stopped ({status}) after {} of {} tensors", path.display(), done, job.tensors.len()),
            help: "its own message is above; what it finished is cached, so the next build resumes there".into(),
        });
    }
    Ok(Run { peak_rss })
}

/// Waits for `child` like `Child::wait`, also returning its peak resident memory in bytes.
fn wait_with_peak(child: &std::process::Child) -> std::io::Result<(ExitStatus, u64)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, and zero is a valid value of it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our child; status and usage are valid for writes.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            // ru_maxrss is in kilobytes on Linux.
            return Ok((ExitStatus::from_raw(status), usage.ru_maxrss as u64 * 1024));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// This process's own peak resident memory, in bytes.
pub(crate) fn own_peak_rss() -> u64 {
    // SAFETY: as above; getrusage only writes into usage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}
