//! What a build did, for people (one line) and scripts (`--json`).
use std::time::Duration;

use serde::Serialize;

use crate::backend::Backend;
use crate::io::writer::WrittenFile;
use crate::plan::Plan;
use crate::recipe::Recipe;

#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    pub output: String,
    pub device: String,
    pub tensors: usize,
    /// Tensors changed by at least one adapter.
    pub fused: usize,
    /// Tensors copied byte for byte.
    pub copied: usize,
    pub files: Vec<String>,
    pub bytes: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

impl Summary {
    pub fn new(
        recipe: &Recipe,
        plan: &Plan,
        backend: &Backend,
        files: &[WrittenFile],
        elapsed: Duration,
    ) -> Self {
        let fused = plan.tensors.iter().filter(|t| !t.deltas.is_empty()).count();
        let copied = plan.tensors.iter().filter(|t| t.is_copy()).count();
        Summary {
            output: recipe.output.path.path.display().to_string(),
            device: backend.name(),
            tensors: plan.tensors.len(),
            fused,
            copied,
            files: files
                .iter()
                .filter_map(|f| f.path.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
            bytes: files.iter().map(|f| f.size).sum(),
            seconds: elapsed.as_secs_f64(),
            warnings: plan.warnings.clone(),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "built {} in {:.2}s on {}: {} tensors ({} fused, {} copied), {:.1} MB in {} file(s)",
            self.output,
            self.seconds,
            self.device,
            self.tensors,
            self.fused,
            self.copied,
            self.bytes as f64 / 1e6,
            self.files.len()
        )
    }
}
