//! The workspace's settings file, `modelforge.toml`: what a team shares beside its recipes and
//! would otherwise repeat on every command line. Today one setting: the remote cache.
//!
//! ```toml
//! [remote]
//! url = "s3://team-models/modelforge"
//! ```
//!
//! The file is looked for in the recipe's folder and each folder above it, up to the first that
//! holds `.git` (the repository's root); the nearest wins. `--remote` and `MODELFORGE_REMOTE`
//! come before it (an empty `MODELFORGE_REMOTE` turns the remote off).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};
use serde::Deserialize;
use thiserror::Error;

/// The settings file's name.
pub(crate) const FILE: &str = "modelforge.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    remote: Option<Remote>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Remote {
    url: toml::Spanned<String>,
}

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum SettingsError {
    #[error("cannot read the workspace settings `{}`", path.display())]
    #[diagnostic(
        code(modelforge::settings::unreadable),
        help("check that the file is readable, or remove it")
    )]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the workspace settings `{}` are not valid: {message}", path.display())]
    #[diagnostic(
        code(modelforge::settings::invalid),
        help("the file holds one table, `[remote]`, with one key, `url = \"s3://BUCKET/PREFIX\"` or `url = \"file:///DIR\"`")
    )]
    Invalid {
        path: PathBuf,
        message: String,
        #[source_code]
        src: NamedSource<Arc<String>>,
        #[label("here")]
        span: Option<SourceSpan>,
    },
}

/// The nearest settings file above `recipe` (its folder first), up to the repository's root.
/// The folders are the real ones (links and `..` resolved), not the path's text.
fn find(recipe: &Path) -> Option<PathBuf> {
    let folder = std::path::absolute(recipe).ok()?.parent()?.to_owned();
    let folder = folder.canonicalize().unwrap_or(folder);
    for dir in folder.ancestors() {
        let file = dir.join(FILE);
        if file.is_file() {
            return Some(file);
        }
        if dir.join(".git").exists() {
            return None;
        }
    }
    None
}

/// The remote cache a command on `recipe` uses: `given` (`--remote`), else MODELFORGE_REMOTE
/// (empty: none), else the workspace settings' `[remote] url`.
pub(crate) fn remote(
    given: Option<String>,
    recipe: &Path,
) -> Result<Option<String>, SettingsError> {
    if let Some(url) = given.or_else(|| std::env::var("MODELFORGE_REMOTE").ok()) {
        return Ok(Some(url).filter(|url| !url.is_empty()));
    }
    let Some(path) = find(recipe) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::Unreadable {
        path: path.clone(),
        source,
    })?;
    let invalid = |message: String, span: Option<std::ops::Range<usize>>| SettingsError::Invalid {
        path: path.clone(),
        message,
        span: span.map(SourceSpan::from),
        src: NamedSource::new(path.display().to_string(), Arc::new(text.clone())),
    };
    let settings: Settings =
        toml::from_str(&text).map_err(|e| invalid(e.message().to_owned(), e.span()))?;
    let Some(url) = settings.remote.map(|r| r.url) else {
        return Ok(None);
    };
    if !crate::remote::well_formed(url.get_ref()) {
        return Err(invalid(
            format!("`{}` is not a remote cache's address", url.get_ref()),
            Some(url.span()),
        ));
    }
    Ok(Some(url.into_inner()))
}
