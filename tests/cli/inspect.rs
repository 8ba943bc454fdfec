use safetensors::Dtype;

use crate::support::Workspace;

#[test]
fn describes_a_model() {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::BF16);
    let report: serde_json::Value =
        serde_json::from_str(&ws.ok(&["inspect", "base", "--json"])).unwrap();
    assert_eq!(report["architecture"], "LlamaForCausalLM");
    assert_eq!(report["schema"], "llama");
    assert_eq!(report["layers"], 2);
    // 2 × 16×4 (embeddings, head) + 4 (norm) + 2 × (16 + 16 + 32 + 4)
    assert_eq!(report["parameters"], 128 + 4 + 2 * 68);
    assert_eq!(report["dtypes"]["BF16"], 268);
}

#[test]
fn describes_an_adapter() {
    let ws = Workspace::new();
    ws.adapter(
        "lora",
        &[
            ("model.layers.0.self_attn.q_proj", 4, 4),
            ("model.layers.1.self_attn.q_proj", 4, 4),
        ],
        2,
        serde_json::json!({}),
    );
    let report: serde_json::Value =
        serde_json::from_str(&ws.ok(&["inspect", "lora", "--json"])).unwrap();
    assert_eq!(report["kind"], "adapter");
    assert_eq!(report["r"], 2);
    assert_eq!(report["lora_alpha"], 4.0);
    assert_eq!(report["modules"]["q_proj"], 2);
    assert_eq!(report["base_model"], "tiny-llama");
}
