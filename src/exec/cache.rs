//! The cache commands: `cache stats`, `cache verify` and `gc`.
use super::CacheOptions;

use super::{open_store, ExecError};

/// `modelforge cache stats`.
pub fn cache_stats(cache: &CacheOptions, json: bool) -> miette::Result<()> {
    let store = open_store(cache, None)?;
    let stats = crate::store::stats(&store);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&stats).expect("stats serialise")
        );
    } else {
        outln!(
            "{}: {} objects ({:.1} MB, of which {:.1} MB are output files it shares), {} actions, {} file digests",
            stats.path,
            stats.objects,
            stats.object_bytes as f64 / 1e6,
            stats.shared_bytes as f64 / 1e6,
            stats.actions,
            stats.files
        );
    }
    Ok(())
}

/// `modelforge gc`.
pub fn gc(
    cache: &CacheOptions,
    max_size: Option<u64>,
    older_than: Option<std::time::Duration>,
) -> miette::Result<()> {
    let store = open_store(cache, None)?;
    let report =
        crate::store::collect(&store, max_size, older_than).map_err(|source| ExecError::Cache {
            path: store.root().to_owned(),
            source,
        })?;
    outln!(
        "removed {} objects ({:.1} MB); kept {} ({:.1} MB)",
        report.removed_objects,
        report.removed_bytes as f64 / 1e6,
        report.kept_objects,
        report.kept_bytes as f64 / 1e6
    );
    Ok(())
}

/// `modelforge cache verify`: re-hashes every object; fails if any is damaged.
pub fn cache_verify(cache: &CacheOptions, repair: bool, json: bool) -> miette::Result<()> {
    let store = open_store(cache, None)?;
    let report = crate::store::check(&store, repair);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
    } else {
        outln!(
            "{}: {} objects ({:.1} MB) hashed, {} bad; {} actions, {} dangling; {} temporary files of running builds",
            store.root().display(),
            report.objects,
            report.object_bytes as f64 / 1e6,
            report.bad_objects.len(),
            report.actions,
            report.dangling_actions.len(),
            report.tmp_files,
        );
        for path in &report.bad_objects {
            let what = if repair { "removed" } else { "bad" };
            outln!("  {what}: {}", path.display());
        }
    }
    match report.bad_objects.first() {
        Some(first) if !repair => Err(ExecError::CacheDamaged {
            path: store.root().to_owned(),
            count: report.bad_objects.len(),
            first: first.clone(),
        }
        .into()),
        _ => Ok(()),
    }
}
