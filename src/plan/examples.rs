//! An adapter's `examples`: texts of what it does, which the transfer report scores on the
//! source base with the adapter and on the built model, to say how much of the adapter's effect
//! on them the carried adapter keeps. Planning opens the source base, checks that both bases are
//! of a family the engine runs and that the adapter is one it can add, and tokenizes the texts;
//! the engine checks the weights' shapes when it scores, and a pass it cannot run after the
//! model is built costs the figure (with a warning), not the build.
use std::path::PathBuf;

use modelforge_core::job::{Decoder, ScoreDelta, TensorPlace};

use super::PlanError;
use crate::arch::{self, Unsupported};
use crate::io::hf::HfModel;
use crate::io::peft::PeftAdapter;
use crate::recipe::{AdapterEntry, Entry, Src};

/// One adapter's examples, and what scoring them reads.
#[derive(Debug)]
pub(crate) struct Examples {
    /// The adapter, as the report names it.
    pub adapter: String,
    pub texts: PathBuf,
    /// The texts' tokens by the source base's tokenizer, and by the base's.
    pub source_ids: Vec<Vec<i64>>,
    pub target_ids: Vec<Vec<i64>>,
    pub source: HfModel,
    pub source_decoder: Decoder,
    /// The adapter as the source's forward pass adds it.
    pub deltas: Vec<ScoreDelta>,
    pub replacements: Vec<TensorPlace>,
    /// The base's tokenizer (the built model's forward pass is the base's, read from the
    /// output's tensors).
    pub target_tokenizer: PathBuf,
}

impl Examples {
    /// The examples of the adapter `entry` (read as `adapter`) onto `base`, or `None`
    /// where it gives none.
    pub fn of(
        entry: &AdapterEntry,
        adapter: &PeftAdapter,
        base: &HfModel,
        src: &Src,
    ) -> Result<Option<Examples>, PlanError> {
        let (Some(texts), Some(source)) = (&entry.examples, &entry.source) else {
            return Ok(None);
        };
        let unfit = |what: &str, why: Unsupported| {
            PlanError::Examples {
            message: match why {
                Unsupported::Family(model_type) => format!(
                    "the {what} is a `{model_type}` model, whose forward pass modelforge does not compute (it does {})",
                    arch::FAMILIES.join(", ")
                ),
                Unsupported::Config(message) => format!("the {what}'s config.json: {message}"),
            },
            src: src.clone(),
            span: texts.span,
        }
        };
        let source_model = HfModel::open(&source.path)
            .map_err(|e| PlanError::input(e, src.clone(), source.span, "this source base"))?;
        let source_decoder = arch::decoder(&source_model.config, |name| {
            source_model.weights.get(name).is_some()
        })
        .map_err(|why| unfit("source base", why))?;
        arch::decoder(&base.config, |name| base.weights.get(name).is_some())
            .map_err(|why| unfit("base", why))?;
        for (model, entry) in [(&base.dir, None), (&source_model.dir, Some(source))] {
            let tokenizer = model.join("tokenizer.json");
            if !tokenizer.is_file() {
                return Err(PlanError::Examples {
                    message: format!(
                        "`{}` has no tokenizer.json, which scoring the examples needs",
                        model.display()
                    ),
                    src: src.clone(),
                    span: entry.map_or(texts.span, |e: &Entry| e.span),
                });
            }
        }
        let fault = |message: String| PlanError::Examples {
            message,
            src: src.clone(),
            span: texts.span,
        };
        let (deltas, replacements) = adapter
            .as_deltas(&source_decoder, |name| source_model.weights.get(name).is_some())
            .map_err(|why| fault(format!("the adapter on its source base: {why}, which scoring the examples does not add")))?;
        let read = crate::io::texts::read(&texts.path).map_err(|e| fault(e.to_string()))?;
        let tokenize = |dir: &std::path::Path| {
            crate::io::texts::tokenize(&dir.join("tokenizer.json"), &read)
                .map_err(|e| fault(e.to_string()))
        };
        Ok(Some(Examples {
            adapter: entry.entry.written.clone(),
            texts: texts.path.clone(),
            source_ids: tokenize(&source_model.dir)?,
            target_ids: tokenize(&base.dir)?,
            source_decoder,
            deltas,
            replacements,
            target_tokenizer: base.dir.join("tokenizer.json"),
            source: source_model,
        }))
    }

    /// The files scoring reads beyond the build's own inputs: inputs of the build like them.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.texts.clone(),
            self.target_tokenizer.clone(),
            self.source.dir.join("tokenizer.json"),
            self.source.dir.join("config.json"),
        ];
        files.extend(self.source.weight_files());
        files
    }
}
