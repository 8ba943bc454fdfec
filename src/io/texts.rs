//! Texts to score, one per line of a UTF-8 file, and their tokens by a model's own
//! `tokenizer.json` (as `tokenizers`, and transformers' fast tokenizers, encode them, special
//! tokens added).
use std::path::{Path, PathBuf};

use miette::Diagnostic;
use thiserror::Error;

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum TextsError {
    #[error("cannot use the tokenizer `{}`: {message}", path.display())]
    #[diagnostic(
        code(modelforge::texts::tokenizer),
        help("texts are tokenized with the model's tokenizer.json, as `tokenizers` (and transformers' fast tokenizers) read it; save it with the model (`tokenizer.save_pretrained`)")
    )]
    Tokenizer { path: PathBuf, message: String },

    #[error("cannot read the texts `{}`: {message}", path.display())]
    #[diagnostic(
        code(modelforge::texts::texts),
        help("give a UTF-8 text file, one text per line")
    )]
    Texts { path: PathBuf, message: String },
}

/// The texts of `path`, one per line; empty lines are skipped.
pub(crate) fn read(path: &Path) -> Result<Vec<String>, TextsError> {
    let bytes = std::fs::read(path).map_err(|e| TextsError::Texts {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| TextsError::Texts {
        path: path.to_owned(),
        message: format!("not UTF-8 (at byte {})", e.utf8_error().valid_up_to()),
    })?;
    let texts: Vec<String> = text
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if texts.is_empty() {
        return Err(TextsError::Texts {
            path: path.to_owned(),
            message: "it holds no text".into(),
        });
    }
    Ok(texts)
}

/// Each text's token ids by the tokenizer `path`.
pub(crate) fn tokenize(path: &Path, texts: &[String]) -> Result<Vec<Vec<i64>>, TextsError> {
    let failed = |message: String| TextsError::Tokenizer {
        path: path.to_owned(),
        message,
    };
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(path).map_err(|e| failed(e.to_string()))?;
    // Whole texts, as transformers' `tokenizer(text)` encodes them: tokenizer.json's own
    // truncation and padding (for batches in training) are off there too.
    tokenizer
        .with_truncation(None)
        .map_err(|e| failed(e.to_string()))?;
    tokenizer.with_padding(None);
    texts
        .iter()
        .map(|text| {
            tokenizer
                .encode(text.as_str(), true)
                .map(|e| e.get_ids().iter().map(|&id| id as i64).collect())
                .map_err(|e| failed(e.to_string()))
        })
        .collect()
}
