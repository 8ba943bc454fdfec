//! `modelforge verify`: the output directory, re-hashed, against the lock file.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use miette::Diagnostic;
use thiserror::Error;

use crate::lock::Lock;
use crate::store;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum VerifyError {
    #[error("there is no lock file `{}`", path.display())]
    #[diagnostic(
        code(modelforge::verify::no_lock),
        help("run `modelforge build` first; it writes the lock beside the recipe")
    )]
    NoLock { path: PathBuf },

    #[error("the lock file `{}` cannot be read: {message}", path.display())]
    #[diagnostic(
        code(modelforge::verify::bad_lock),
        help("rebuild to rewrite it, or restore it from git")
    )]
    BadLock { path: PathBuf, message: String },

    #[error("the output does not match the lock file:\n{}", problems.join("\n"))]
    #[diagnostic(
        code(modelforge::verify::mismatch),
        help("rebuild with `modelforge build` to restore the output, or find out what changed it")
    )]
    Mismatch { problems: Vec<String> },
}

/// Re-hashes every output file the lock names (no stat cache: every byte is read) and lists
/// files that differ, are missing, or are not in the lock.
pub(crate) fn verify(recipe_dir: &Path, outputs: &[&Path], lock: &Lock) -> miette::Result<()> {
    let mut problems = Vec::new();
    for (path, digest) in &lock.outputs {
        match store::hash_file(&recipe_dir.join(path)) {
            Ok(actual) if actual == *digest => {}
            Ok(actual) => problems.push(format!(
                "  changed: `{path}` (blake3 {actual}, the lock says {digest})"
            )),
            Err(e) => problems.push(format!("  missing: `{path}` ({e})")),
        }
    }
    let locked: BTreeSet<PathBuf> = lock.outputs.keys().map(|p| recipe_dir.join(p)).collect();
    for output_dir in outputs {
        if let Ok(entries) = std::fs::read_dir(output_dir) {
            let mut extra: Vec<String> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| !locked.iter().any(|l| same_file(l, p)))
                .map(|p| format!("  not in the lock: `{}`", p.display()))
                .collect();
            extra.sort();
            problems.extend(extra);
        }
    }
    if problems.is_empty() {
        let names: Vec<String> = outputs.iter().map(|o| o.display().to_string()).collect();
        outln!(
            "{}: {} files match the lock",
            names.join(", "),
            lock.outputs.len()
        );
        Ok(())
    } else {
        Err(VerifyError::Mismatch { problems }.into())
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
