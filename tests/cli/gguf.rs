//! `[output] gguf`: the file's frame on a tiny model, the lock and `verify`, and the refusals
//! pinned. (tests/peers/test_gguf.py checks every tensor and key against gguf-py, and
//! test_llama_cpp.py runs the file in llama.cpp.)
use insta::assert_snapshot;

use crate::support::{Workspace, GOOD};

/// The with-LoRA workspace's base made complete enough for GGUF: widths, heads, a BPE
/// tokenizer of 16 tokens.
fn workspace() -> Workspace {
    let ws = Workspace::with_lora();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.path("base/config.json")).unwrap()).unwrap();
    for (key, value) in [
        ("num_attention_heads", 2),
        ("num_key_value_heads", 2),
        ("intermediate_size", 8),
        ("vocab_size", 16),
    ] {
        config[key] = value.into();
    }
    ws.write("base/config.json", serde_json::to_vec(&config).unwrap());
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..16).map(|i| (format!("t{i}"), i.into())).collect();
    let tokenizer = serde_json::json!({
        "model": {"type": "BPE", "vocab": vocab, "merges": ["t 1"]},
        "added_tokens": [{"id": 0, "content": "t0", "special": true}],
    });
    ws.write(
        "base/tokenizer.json",
        serde_json::to_vec(&tokenizer).unwrap(),
    );
    ws
}

fn recipe(extra: &str) -> String {
    GOOD.replace("path = \"out\"", &format!("path = \"out\"\n{extra}"))
}

#[test]
fn a_gguf_is_written_locked_and_verified() {
    let ws = workspace();
    ws.write("recipe.toml", recipe("gguf = \"model.gguf\""));
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let bytes = std::fs::read(ws.path("model.gguf")).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    // The with-LoRA base's 11 tensors, none without a GGUF name.
    assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 11);
    let lock = std::fs::read_to_string(ws.path("recipe.lock")).unwrap();
    assert!(
        lock.contains("model.gguf") && lock.contains("model.Modelfile"),
        "{lock}"
    );
    ws.ok(&["verify", "recipe.toml"]);
    let modelfile = std::fs::read_to_string(ws.path("model.Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./model.gguf"), "{modelfile}");
}

#[test]
fn gguf_type_without_a_gguf_is_refused() {
    let ws = workspace();
    assert_snapshot!(ws.refuse(&recipe("gguf_type = \"q8_0\"")));
}

#[test]
fn a_base_without_a_tokenizer_json_is_refused_before_anything_is_computed() {
    let ws = workspace();
    std::fs::remove_file(ws.path("base/tokenizer.json")).unwrap();
    assert_snapshot!(ws.refuse(&recipe("gguf = \"model.gguf\"")));
}

#[test]
fn an_architecture_without_a_gguf_layout_is_refused() {
    let ws = workspace();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.path("base/config.json")).unwrap()).unwrap();
    config["model_type"] = "phi3".into();
    ws.write("base/config.json", serde_json::to_vec(&config).unwrap());
    assert_snapshot!(ws.refuse(&recipe("gguf = \"model.gguf\"")));
}
