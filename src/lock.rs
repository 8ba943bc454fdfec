//! `<recipe>.lock`: what a build was made from and what it made, by digest. TOML with sorted
//! keys and no timestamps, so that it is stable across runs and diffs well in git.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::FileDigest;

pub const VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Lock {
    pub version: u32,
    pub modelforge: String,
    /// blake3 of the recipe's text.
    pub recipe: FileDigest,
    pub resolved: Resolved,
    /// Input files, by path relative to the recipe's folder.
    pub inputs: BTreeMap<String, FileDigest>,
    /// Output files, by path relative to the recipe's folder.
    pub outputs: BTreeMap<String, FileDigest>,
}

/// Everything the build decided that the recipe did not spell out.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Resolved {
    /// `cpu` or `cuda`: results may differ in the last bits between the two.
    pub device: String,
    pub dtype: String,
    pub merge: crate::recipe::MergeMethod,
    /// The seed of random pruning (DARE), as given in `[merge]` or derived from the recipe.
    pub seed: u64,
}

/// `recipes/quickstart.toml` → `recipes/quickstart.lock`.
pub(crate) fn path_for(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

impl Lock {
    pub fn read(path: &Path) -> Option<Result<Lock, String>> {
        let text = std::fs::read_to_string(path).ok()?;
        Some(toml::from_str(&text).map_err(|e| e.message().to_owned()))
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("a lock serialises");
        format!(
            "# Written by `modelforge build`; commit it beside the recipe. Do not edit.\n{body}"
        )
    }
}
