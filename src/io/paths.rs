//! Comparing paths that may not exist yet, through symbolic links: what decides whether an
//! output would land on an input or on the cache.
use std::path::{Path, PathBuf};

/// The absolute form of `path` with every symbolic link on it resolved. The path need not
/// exist: its longest existing ancestor is resolved and the rest appended as written.
pub(crate) fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(mut resolved) = existing.canonicalize() {
            resolved.extend(rest.iter().rev());
            return resolved;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Whether one of the two (resolved) paths is the other or lies inside it.
pub(crate) fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_nest_through_links_and_missing_parts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("models")).unwrap();
        std::os::unix::fs::symlink(root.join("models"), root.join("link")).unwrap();
        assert_eq!(
            resolve(&root.join("link/new/out")),
            root.join("models/new/out")
        );
        assert!(nested(
            &resolve(&root.join("link")),
            &resolve(&root.join("models/base"))
        ));
        assert!(!nested(
            &resolve(&root.join("models-out")),
            &resolve(&root.join("models"))
        ));
    }
}
