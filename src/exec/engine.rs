//! Running `modelforge-engine`, the separate program that links LibTorch: starting LibTorch
//! costs about 0.2 s and 115 MB, which a build that computes nothing never pays.
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::job::{Done, Job};
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

/// Has the engine compute `job`; each result is in the cache when this returns.
pub(crate) fn run(job: &Job, progress: bool) -> Result<Vec<Done>, ExecError> {
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
    let bar = super::progress_bar(job.align.len() + job.tensors.len(), "fusing ", progress);
    let mut done = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(result) = serde_json::from_str::<Done>(&line) {
                done.push(result);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let status = child.wait().map_err(|e| ExecError::Engine {
        message: e.to_string(),
        help: "the engine could not be waited for".into(),
    })?;
    let expected = job.align.len() + job.tensors.len();
    if !status.success() || done.len() != expected {
        return Err(ExecError::Engine {
            message: format!("`{}` stopped ({status}) after {} of {expected} nodes", path.display(), done.len()),
            help: "its own message is above; what it finished is cached, so the next build resumes there".into(),
        });
    }
    Ok(done)
}
