//! Inputs named by Hugging Face repository (`hf = "org/name"`), found in the local Hugging Face
//! cache as `huggingface_hub` lays it out: `models--org--name/refs/<revision>` holds the commit
//! a branch or tag points at, and `models--org--name/snapshots/<commit>/` the files of that
//! commit. modelforge reads the cache; it never downloads.
use std::path::{Path, PathBuf};

/// The local Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub(crate) fn cache_root() -> PathBuf {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    var("HOME")
        .unwrap_or_default()
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// A repository's snapshot, resolved.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Snapshot {
    pub repo: String,
    pub commit: String,
    pub dir: PathBuf,
}

/// Why a repository cannot be found in the local cache.
#[derive(Debug)]
pub(crate) enum Missing {
    /// `repo` is not of the form `org/name`.
    BadName,
    /// No snapshot for this revision: the folder looked at.
    NotCached(PathBuf),
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot of `repo` at `revision` (a branch, a tag or a commit) in the cache at `root`.
pub(crate) fn snapshot(root: &Path, repo: &str, revision: &str) -> Result<Snapshot, Missing> {
    let valid = |part: &str| {
        !part.is_empty()
            && !part.contains("--")
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let (org, name) = repo.split_once('/').ok_or(Missing::BadName)?;
    // A branch may hold slashes (`refs/pr/1`), never a step out of the repository's folder.
    let revision_ok = revision.split('/').all(|part| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    });
    if !valid(org) || !valid(name) || !revision_ok {
        return Err(Missing::BadName);
    }
    let folder = root.join(format!("models--{org}--{name}"));
    let commit = if is_commit(revision) {
        revision.to_owned()
    } else {
        let read = std::fs::read_to_string(folder.join("refs").join(revision))
            .map_err(|_| Missing::NotCached(folder.clone()))?;
        let commit = read.trim().to_owned();
        if !is_commit(&commit) {
            return Err(Missing::NotCached(folder));
        }
        commit
    };
    let dir = folder.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Err(Missing::NotCached(folder));
    }
    Ok(Snapshot {
        repo: repo.to_owned(),
        commit,
        dir,
    })
}

/// How the lock names a file inside a cached snapshot: `hf://org/name@commit/file`, the same on
/// every machine (the commit pinned); `None` for a file outside any snapshot.
pub(crate) fn shown(path: &Path) -> Option<String> {
    let parts: Vec<&str> = path
        .components()
        .map(|c| c.as_os_str().to_str().unwrap_or(""))
        .collect();
    let at = parts.iter().rposition(|p| *p == "snapshots")?;
    let folder = parts.get(at.checked_sub(1)?)?.strip_prefix("models--")?;
    let (org, name) = folder.split_once("--")?;
    let commit = parts.get(at + 1).filter(|c| is_commit(c))?;
    let rest = parts.get(at + 2..).filter(|r| !r.is_empty())?.join("/");
    Some(format!("hf://{org}/{name}@{commit}/{rest}"))
}

/// The file a lock's `hf://org/name@commit/file` names in the local cache.
pub(crate) fn path_of(shown: &str) -> Option<PathBuf> {
    let rest = shown.strip_prefix("hf://")?;
    let (repo, rest) = rest.split_once('@')?;
    let (commit, file) = rest.split_once('/')?;
    let (org, name) = repo.split_once('/')?;
    Some(
        cache_root()
            .join(format!("models--{org}--{name}"))
            .join("snapshots")
            .join(commit)
            .join(file),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_file_is_shown_by_repository_and_commit() {
        let commit = "a".repeat(40);
        let path = PathBuf::from(format!(
            "/home/x/.cache/huggingface/hub/models--org--my-model/snapshots/{commit}/model.safetensors"
        ));
        let shown = shown(&path).unwrap();
        assert_eq!(
            shown,
            format!("hf://org/my-model@{commit}/model.safetensors")
        );
        assert!(path_of(&shown).unwrap().ends_with(format!(
            "models--org--my-model/snapshots/{commit}/model.safetensors"
        )));
        assert_eq!(
            super::shown(Path::new("/data/models/model.safetensors")),
            None
        );
    }

    #[test]
    fn names_that_escape_the_cache_are_refused() {
        let root = Path::new("/nowhere");
        for repo in ["org", "../x/y", "org/..", "a--b/c", "org/name/extra"] {
            assert!(
                matches!(snapshot(root, repo, "main"), Err(Missing::BadName)),
                "{repo}"
            );
        }
        assert!(matches!(
            snapshot(root, "org/name", "../../etc"),
            Err(Missing::BadName)
        ));
    }
}
