//! File formats the stages share: safetensors in and out, Hugging Face model directories and
//! PEFT adapters. Readers validate what they read; nothing here trusts a file.
pub(crate) mod atomic;
pub(crate) mod direct;
pub(crate) mod error;
pub(crate) mod hf;
pub(crate) mod hf_cache;
pub(crate) use modelforge_core::mapped;
pub(crate) mod paths;
pub(crate) mod peft;
pub(crate) mod piece;
pub(crate) mod safetensors;
pub(crate) mod sentencepiece;
pub(crate) mod size;
pub(crate) mod texts;
pub(crate) mod write_behind;
pub(crate) mod writer;

pub(crate) use error::InputError;
