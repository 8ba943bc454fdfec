//! `modelforge gc` and `modelforge cache stats`: the cache's size, and trimming it.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::Store;

#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub path: String,
    pub objects: u64,
    pub object_bytes: u64,
    /// Of those, the bytes of objects that are also files elsewhere (output shards the cache
    /// holds under a second name): disk space the cache does not add.
    pub shared_bytes: u64,
    pub actions: u64,
    pub files: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub removed_objects: u64,
    pub removed_bytes: u64,
    pub kept_objects: u64,
    pub kept_bytes: u64,
}

pub(super) fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let Ok(fans) = std::fs::read_dir(dir) else {
        return out;
    };
    for fan in fans.flatten() {
        if let Ok(entries) = std::fs::read_dir(fan.path()) {
            for entry in entries.flatten() {
                if let Ok(meta) = entry.metadata() {
                    out.push((entry.path(), meta));
                }
            }
        }
    }
    out
}

pub fn stats(store: &Store) -> Stats {
    let objects = walk(&store.root().join("objects"));
    Stats {
        path: store.root().display().to_string(),
        objects: objects.len() as u64,
        object_bytes: objects.iter().map(|(_, m)| m.len()).sum(),
        shared_bytes: objects
            .iter()
            .filter(|(_, m)| std::os::unix::fs::MetadataExt::nlink(m) > 1)
            .map(|(_, m)| m.len())
            .sum(),
        actions: walk(&store.root().join("actions")).len() as u64,
        files: walk(&store.root().join("files")).len() as u64,
    }
}

/// Removes objects unused for longer than `older_than`, then the least recently used ones
/// until the objects fit in `max_size`. Actions whose object is gone are ignored by reads and
/// removed here.
pub fn collect(
    store: &Store,
    max_size: Option<u64>,
    older_than: Option<Duration>,
) -> std::io::Result<GcReport> {
    let now = SystemTime::now();
    let mut objects = walk(&store.root().join("objects"));
    // Least recently used first.
    objects.sort_by_key(|(_, m)| m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
    let mut total: u64 = objects.iter().map(|(_, m)| m.len()).sum();
    let mut report = GcReport::default();
    for (path, meta) in &objects {
        let age = meta
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        let too_old = older_than.is_some_and(|limit| age > limit);
        let too_big = max_size.is_some_and(|limit| total > limit);
        if too_old || too_big {
            std::fs::remove_file(path)?;
            total -= meta.len();
            report.removed_objects += 1;
            report.removed_bytes += meta.len();
        } else {
            report.kept_objects += 1;
            report.kept_bytes += meta.len();
        }
    }
    for (path, _) in walk(&store.root().join("actions")) {
        let dangling = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<super::ActionEntry>(&b).ok())
            .is_none_or(|entry| !store.object_of(&entry).is_some_and(|(o, _)| o.exists()));
        if dangling {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(report)
}

/// `30d`, `12h`, `90m`, `45s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a whole number"))?;
    let secs = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        other => return Err(format!("unknown unit `{other}`; use s, m, h, d or w")),
    };
    Ok(Duration::from_secs(n * secs))
}
