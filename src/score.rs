//! `modelforge score`: how likely a model finds each of a file's texts — each text tokenized
//! with the model's own `tokenizer.json` and run through the model's forward pass by the
//! engine (LibTorch, f32, one layer at a time). A text's log-likelihood does not depend on how
//! a tokenizer cuts it, so two models with different vocabularies compare on the same texts:
//! a fused output against its base, a carried adapter against its source.
use std::path::{Path, PathBuf};

use miette::Diagnostic;
use serde_json::{json, Value};
use thiserror::Error;

use crate::arch::{self, Unsupported, FAMILIES};
use crate::io::hf::HfModel;
use crate::io::peft::PeftAdapter;
use modelforge_core::job::{Decoder, Device, ScoreJob};

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum ScoreError {
    #[error("`{}` is a `{model_type}` model, whose forward pass modelforge does not compute", dir.display())]
    #[diagnostic(
        code(modelforge::score::family),
        help("`score` runs the model types {}", FAMILIES.join(", "))
    )]
    Family { dir: PathBuf, model_type: String },

    #[error("`{}`: {message}", path.display())]
    #[diagnostic(
        code(modelforge::score::config),
        help("`score` computes the forward pass of these families as transformers does and refuses what it would compute otherwise: the setting or value named above")
    )]
    Config { path: PathBuf, message: String },

    #[error("`{}`: {message}, which `score --adapter` does not add", dir.display())]
    #[diagnostic(
        code(modelforge::score::adapter),
        help("build the adapter into the model with `modelforge build` and score the output")
    )]
    Adapter { dir: PathBuf, message: String },
}

pub fn score(
    model: &Path,
    adapter: Option<&Path>,
    texts: &Path,
    device: Device,
    json: bool,
) -> miette::Result<()> {
    let hf = HfModel::open(model)?;
    let decoder = decoder(&hf)?;
    let (deltas, replacements) = match adapter {
        Some(dir) => {
            let adapter = PeftAdapter::open(dir)?;
            adapter
                .as_deltas(&decoder, |name| hf.weights.get(name).is_some())
                .map_err(|message| ScoreError::Adapter {
                    dir: dir.to_owned(),
                    message,
                })?
        }
        None => (Vec::new(), Vec::new()),
    };
    let texts = crate::io::texts::read(texts)?;
    let ids = crate::io::texts::tokenize(&model.join("tokenizer.json"), &texts)?;
    let tensors = hf.weights.places();
    let scores = crate::exec::score(&ScoreJob {
        device,
        decoder,
        tensors,
        deltas,
        replacements,
        texts: ids.clone(),
    })?;
    let report = report(model, &ids, &scores.logprobs);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
    } else {
        print_text(&report, &texts);
    }
    Ok(())
}

fn report(model: &Path, ids: &[Vec<i64>], logprobs: &[Vec<f64>]) -> Value {
    let mut total = 0.0;
    let mut predicted = 0usize;
    let rows: Vec<Value> = ids
        .iter()
        .zip(logprobs)
        .map(|(ids, lp)| {
            let sum = lp.iter().fold(0.0, |sum, x| sum + x);
            total += sum;
            predicted += lp.len();
            json!({
                "tokens": ids.len(),
                "logprob": sum,
                "nats_per_token": if lp.is_empty() { 0.0 } else { -sum / lp.len() as f64 },
            })
        })
        .collect();
    let nats = if predicted == 0 {
        0.0
    } else {
        -total / predicted as f64
    };
    json!({
        "model": model.display().to_string(),
        "texts": rows,
        "tokens": predicted,
        "nats_per_token": nats,
        "perplexity": nats.exp(),
    })
}

fn print_text(report: &Value, texts: &[String]) {
    outln!("{:>7} {:>12} {:>10}  text", "tokens", "logprob", "nats/tok");
    for (row, text) in report["texts"].as_array().into_iter().flatten().zip(texts) {
        let shown: String = text.chars().take(60).collect();
        let more = if shown.len() < text.len() { "…" } else { "" };
        outln!(
            "{:>7} {:>12.4} {:>10.4}  {shown}{more}",
            row["tokens"].as_u64().unwrap_or(0),
            row["logprob"].as_f64().unwrap_or(0.0),
            row["nats_per_token"].as_f64().unwrap_or(0.0),
        );
    }
    outln!(
        "{} tokens predicted: {:.4} nats per token, perplexity {:.4}",
        report["tokens"],
        report["nats_per_token"].as_f64().unwrap_or(0.0),
        report["perplexity"].as_f64().unwrap_or(0.0),
    );
}

/// `model`'s forward pass, or a diagnostic.
fn decoder(model: &HfModel) -> Result<Decoder, ScoreError> {
    arch::decoder(&model.config, |name| model.weights.get(name).is_some()).map_err(
        |why| match why {
            Unsupported::Family(model_type) => ScoreError::Family {
                dir: model.dir.clone(),
                model_type,
            },
            Unsupported::Config(message) => ScoreError::Config {
                path: model.dir.join("config.json"),
                message,
            },
        },
    )
}
