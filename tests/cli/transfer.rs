use safetensors::Dtype;
use serde_json::{json, Value};

use crate::support::{llama_tensors, safetensors_bytes, Workspace};

const HIDDEN: usize = 16;

/// The source base with its residual stream permuted (an orthogonal map): every weight reading
/// it has its columns permuted, the norms their entries. The same function, other coordinates.
fn permuted_copy(ws: &Workspace, rel: &str) {
    let perm: Vec<usize> = (0..HIDDEN).map(|i| (i * 5 + 3) % HIDDEN).collect();
    let mut tensors = llama_tensors(HIDDEN, 2);
    for t in &mut tensors {
        let cols = *t.shape.last().unwrap();
        if cols != HIDDEN {
            continue;
        }
        let rows = t.values.len() / cols;
        let old = t.values.clone();
        for r in 0..rows {
            for (c, &p) in perm.iter().enumerate() {
                t.values[r * cols + c] = old[r * cols + p];
            }
        }
    }
    ws.write(
        &format!("{rel}/config.json"),
        serde_json::to_vec(&json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "num_hidden_layers": 2,
            "torch_dtype": "float32",
        }))
        .unwrap(),
    );
    ws.write(
        &format!("{rel}/model.safetensors"),
        safetensors_bytes(&tensors, Dtype::F32),
    );
}

/// Builds the adapter `lora` (made on `src`) into `base` with `dims`; returns transfer.json
/// and the build's summary line.
fn carry(ws: &Workspace, base: &str, dims: &str) -> (Value, String) {
    let out = format!("out-{base}-{dims}");
    ws.write(
        "recipe.toml",
        format!("[base]\npath = \"{base}\"\n[[adapter]]\npath = \"lora\"\nsource = \"src\"\n[adapter.map]\ndims = \"{dims}\"\n[output]\npath = \"{out}\"\n"),
    );
    let line = build(ws);
    let report = std::fs::read_to_string(ws.path(&format!("{out}/transfer.json"))).unwrap();
    (serde_json::from_str(&report).unwrap(), line)
}

/// Builds recipe.toml; returns what it says on standard error (the summary line).
fn build(ws: &Workspace) -> String {
    let out = ws.run(&["build", "recipe.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failed: {stderr}");
    stderr
}

fn workspace() -> Workspace {
    let ws = Workspace::new();
    ws.model("src", HIDDEN, Dtype::F32);
    ws.model("same", HIDDEN, Dtype::F32);
    permuted_copy(&ws, "permuted");
    let modules = [
        ("model.layers.0.self_attn.q_proj", HIDDEN, HIDDEN),
        ("model.layers.1.self_attn.v_proj", HIDDEN, HIDDEN),
        ("model.layers.1.mlp.up_proj", 2 * HIDDEN, HIDDEN),
    ];
    ws.adapter("lora", &modules, 2, json!({}));
    ws
}

/// The adapter copied unchanged into a copy of its own base: every module compared under the
/// identity scores 1, nothing is lost, and the verdict says so, in the report and the build line.
#[test]
fn a_copy_of_the_source_base_is_close_under_the_identity() {
    let ws = workspace();
    let (report, line) = carry(&ws, "same", "exact");
    let adapter = &report["adapters"][0];
    assert_eq!(adapter["verdict"], "close to the source", "{report}");
    assert_eq!(adapter["modules"], 3, "{report}");
    assert!(
        (adapter["overlap"].as_f64().unwrap() - 1.0).abs() < 1e-4,
        "{report}"
    );
    assert!(
        (adapter["transfer"].as_f64().unwrap() - 1.0).abs() < 1e-3,
        "{report}"
    );
    for module in report["modules"].as_array().unwrap() {
        assert_eq!(module["energy"], 1.0, "{module}");
        assert!(
            (module["overlap"].as_f64().unwrap() - 1.0).abs() < 1e-4,
            "{module}"
        );
    }
    assert!(
        line.contains("`lora`: close to the source (transfer 1.00: energy kept 1.000, subspace overlap 1.000, 3 of 3 modules fused)"),
        "{line}"
    );
    let text = std::fs::read_to_string(ws.path("out-same-exact/transfer.txt")).unwrap();
    assert!(
        text.starts_with("lora: close to the source (transfer 1.00"),
        "{text}"
    );
    assert!(
        text.contains("; energy kept 1.000; subspace overlap 1.000\n"),
        "{text}"
    );
}

/// A copy whose residual stream is permuted computes the same function in other coordinates:
/// copied by position the adapter lands on the wrong directions, which the identity's overlap
/// shows (about √(1/8), as unrelated bases); through `align` the fitted map finds the
/// permutation and the overlap is 1.
#[test]
fn a_permuted_copy_is_unrelated_by_position_and_close_through_align() {
    let ws = workspace();
    let (exact, line) = carry(&ws, "permuted", "exact");
    let adapter = &exact["adapters"][0];
    assert_eq!(
        adapter["verdict"], "unrelated bases: expect nothing",
        "{exact}"
    );
    assert!(adapter["overlap"].as_f64().unwrap() < 0.6, "{exact}");
    assert!(adapter["transfer"].as_f64().unwrap() < 0.2, "{exact}");
    assert_eq!(adapter["energy"], 1.0, "{exact}");
    assert!(
        line.contains("`lora`: unrelated bases: expect nothing (transfer 0."),
        "{line}"
    );
    let (aligned, line) = carry(&ws, "permuted", "align");
    let adapter = &aligned["adapters"][0];
    assert_eq!(adapter["verdict"], "close to the source", "{aligned}");
    assert!(adapter["overlap"].as_f64().unwrap() > 0.999, "{aligned}");
    assert!(adapter["energy"].as_f64().unwrap() > 0.999, "{aligned}");
    assert!(
        line.contains("`lora`: close to the source (transfer 1.00"),
        "{line}"
    );
}

/// Without a source base to compare with, the report says it cannot tell rather than guess.
#[test]
fn without_a_source_base_the_report_cannot_tell() {
    let ws = workspace();
    ws.model("wide", 2 * HIDDEN, Dtype::F32);
    ws.write(
        "recipe.toml",
        "[base]\npath = \"wide\"\n[[adapter]]\npath = \"lora\"\n[adapter.map]\ndims = \"pad\"\n[output]\npath = \"out\"\n",
    );
    let line = build(&ws);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path("out/transfer.json")).unwrap())
            .unwrap();
    let adapter = &report["adapters"][0];
    assert!(
        adapter["verdict"]
            .as_str()
            .unwrap()
            .starts_with("the report cannot tell"),
        "{report}"
    );
    assert!(adapter.get("overlap").is_none(), "{report}");
    assert!(line.contains("`lora`: the report cannot tell"), "{line}");
}

/// An adapter on a fused tensor, carried into a copy of its base by name: the fused tensor has
/// no single role, but all its parts read the residual stream, so it is compared all the same.
#[test]
fn a_fused_module_placed_by_name_is_compared() {
    let ws = Workspace::new();
    let tensors: Vec<crate::support::T> = (0..2)
        .map(|l| crate::support::t(&format!("blocks.{l}.qv.weight"), &[16, 8], 40 + l))
        .collect();
    for dir in ["qv-src", "qv"] {
        ws.write(
            &format!("{dir}/model.safetensors"),
            safetensors_bytes(&tensors, Dtype::F32),
        );
        ws.write(
            &format!("{dir}/config.json"),
            r#"{"model_type": "mystery", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 2}"#,
        );
    }
    ws.write("stacked_qv.toml", crate::arch::STACKED_QV);
    ws.adapter(
        "lora",
        &[("blocks.0.qv", 16, 8), ("blocks.1.qv", 16, 8)],
        2,
        json!({}),
    );
    ws.write(
        "recipe.toml",
        "[base]\npath = \"qv\"\narch = \"stacked_qv\"\n[[adapter]]\npath = \"lora\"\nsource = \"qv-src\"\narch = \"stacked_qv\"\n[output]\npath = \"out\"\n",
    );
    let out = ws.run(&["build", "recipe.toml", "--arch", "stacked_qv.toml"]);
    let line = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{line}");
    assert!(
        line.contains("`lora`: close to the source (transfer 1.00"),
        "{line}"
    );
}

/// The report waits for its figures even when no tensor does: here the fused tensors are cached
/// by a build without `source`, and only the comparisons are computed (once written before
/// them, the report said it could not tell).
#[test]
fn the_report_waits_for_its_figures() {
    let ws = workspace();
    ws.write(
        "recipe.toml",
        "[base]\npath = \"same\"\n[[adapter]]\npath = \"lora\"\n[output]\npath = \"out\"\n",
    );
    build(&ws);
    let (report, line) = carry(&ws, "same", "exact");
    assert!(line.contains("(0 computed, 3 from cache"), "{line}");
    assert_eq!(
        report["adapters"][0]["verdict"], "close to the source",
        "{report}"
    );
}
