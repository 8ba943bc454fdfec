use insta::assert_snapshot;
use safetensors::Dtype;

use crate::support::{read_f32, safetensors_bytes, Workspace, GOOD, T};

/// A schema for a model whose q and v projections are stacked in one `qv` tensor.
pub const STACKED_QV: &str = r#"name = "stacked_qv"

[[tensor]]
name = "blocks.{layer}.qv.weight"
layout = "stacked"
parts = [
  { role = "attn.q", rows = "q" },
  { role = "attn.v", rows = "q" },
]
"#;

/// The shared base and adapter (on q_proj and v_proj), the base also written with q and v
/// stacked into `blocks.{layer}.qv` (as `qv/`), a config.json no shipped schema knows.
fn workspace() -> Workspace {
    let ws = Workspace::with_lora();
    let base = read_f32(&ws.path("base/model.safetensors"));
    let mut tensors = Vec::new();
    for (name, (shape, values)) in &base {
        if name.contains(".v_proj.") {
            continue;
        }
        let Some(q) = name.strip_suffix(".self_attn.q_proj.weight") else {
            tensors.push(T {
                name: name.clone(),
                shape: shape.clone(),
                values: values.clone(),
            });
            continue;
        };
        let layer = q.trim_start_matches("model.layers.");
        let (_, v) = &base[&format!("{q}.self_attn.v_proj.weight")];
        tensors.push(T {
            name: format!("blocks.{layer}.qv.weight"),
            shape: vec![2 * shape[0], shape[1]],
            values: values.iter().chain(v).copied().collect(),
        });
    }
    ws.write(
        "qv/model.safetensors",
        safetensors_bytes(&tensors, Dtype::F32),
    );
    ws.write(
        "qv/config.json",
        r#"{"model_type": "mystery", "hidden_size": 4, "num_attention_heads": 2, "num_hidden_layers": 2}"#,
    );
    ws
}

#[test]
fn a_user_schema_places_an_adapter_by_role() {
    let ws = workspace();
    ws.write("recipe.toml", GOOD);
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    ws.write("stacked_qv.toml", STACKED_QV);
    ws.write(
        "qv.toml",
        GOOD.replace("\"base\"", "\"qv\"\narch = \"stacked_qv\"")
            .replace("\"out\"", "\"out-qv\""),
    );
    ws.ok(&["build", "qv.toml", "--quiet", "--arch", "stacked_qv.toml"]);
    let plain = read_f32(&ws.path("out/model.safetensors"));
    let fused = read_f32(&ws.path("out-qv/model.safetensors"));
    for layer in 0..2 {
        let (_, q) = &plain[&format!("model.layers.{layer}.self_attn.q_proj.weight")];
        let (_, v) = &plain[&format!("model.layers.{layer}.self_attn.v_proj.weight")];
        let (_, qv) = &fused[&format!("blocks.{layer}.qv.weight")];
        let want: Vec<f32> = q.iter().chain(v).copied().collect();
        assert_eq!(qv, &want, "layer {layer}: [q; v] of the plain build");
    }
    let report = std::fs::read_to_string(ws.path("out-qv/transfer.txt")).unwrap();
    assert!(
        report.contains("fused by role into part of `blocks.0.qv.weight`"),
        "{report}"
    );
    // The schema file is an input: the lock records it.
    let lock = std::fs::read_to_string(ws.path("qv.lock")).unwrap();
    assert!(lock.contains("stacked_qv.toml"), "{lock}");
}

#[test]
fn an_adapter_with_no_place_in_a_base_of_unknown_architecture() {
    // Without the schema, nothing tells where q_proj goes in `qv/`.
    let ws = workspace();
    assert_snapshot!(ws.refuse(&GOOD.replace("\"base\"", "\"qv\"")));
}

#[test]
fn unknown_architecture_name() {
    let ws = workspace();
    assert_snapshot!(ws.refuse(&GOOD.replace("\"base\"", "\"qv\"\narch = \"stacked\"")));
}

/// Builds with `--arch schema.toml` holding `schema`; the build must fail.
fn schema_fails(schema: &str) -> String {
    let ws = workspace();
    ws.write("schema.toml", schema);
    ws.write(
        "recipe.toml",
        GOOD.replace("\"base\"", "\"qv\"\narch = \"stacked_qv\""),
    );
    ws.fail(&["build", "recipe.toml", "--arch", "schema.toml"])
}

#[test]
fn schema_unknown_key() {
    assert_snapshot!(schema_fails(
        &STACKED_QV.replace("layout = \"stacked\"", "layout = \"stacked\"\nfused = true")
    ));
}

#[test]
fn schema_bad_layout() {
    assert_snapshot!(schema_fails(
        &STACKED_QV.replace("\"stacked\"", "\"interleaved\"")
    ));
}

#[test]
fn schema_bad_role() {
    assert_snapshot!(schema_fails(&STACKED_QV.replace("attn.v", "attn.value")));
}

#[test]
fn schema_role_held_twice() {
    assert_snapshot!(schema_fails(&STACKED_QV.replace("attn.v", "attn.q")));
}

#[test]
fn schema_template_without_layer() {
    assert_snapshot!(schema_fails(&STACKED_QV.replace("{layer}", "0")));
}

#[test]
fn schema_parts_without_layout() {
    assert_snapshot!(schema_fails(
        &STACKED_QV.replace("layout = \"stacked\"\n", "")
    ));
}

#[test]
fn schema_unknown_rotary_convention() {
    assert_snapshot!(schema_fails(
        &STACKED_QV.replace("\n\n[[tensor]]", "\nrotary = \"neox\"\n\n[[tensor]]")
    ));
}

#[test]
fn schema_file_missing() {
    let ws = workspace();
    ws.write("recipe.toml", GOOD);
    assert_snapshot!(ws.fail(&["plan", "recipe.toml", "--arch", "nowhere.toml"]));
}

#[test]
fn schema_that_does_not_fit_the_base() {
    // Three parts of 4 rows each, where `qv` has 8 rows.
    assert_snapshot!(schema_fails(&STACKED_QV.replace(
        "  { role = \"attn.v\", rows = \"q\" },",
        "  { role = \"attn.k\", rows = \"q\" },\n  { role = \"attn.v\", rows = \"q\" },"
    )));
}

#[test]
fn rotary_pairs_that_do_not_fit_a_head() {
    // Heads of 2 rows cannot hold ChatGLM's pairs of quarter heads.
    assert_snapshot!(schema_fails(
        &STACKED_QV.replace("\n\n[[tensor]]", "\nrotary = \"glm_2d\"\n\n[[tensor]]")
    ));
}

#[test]
fn llama_q_and_v_land_in_the_columns_of_gpt2_c_attn() {
    // GPT-2's Conv1D weights are (in × out): c_attn holds [Q | K | V] side by side, so the
    // adapter's q and v deltas, transposed, land in its first and last four columns.
    let ws = workspace();
    ws.write("recipe.toml", GOOD);
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let base = read_f32(&ws.path("base/model.safetensors"));
    let plain = read_f32(&ws.path("out/model.safetensors"));
    let transposed = |m: &[f32]| -> Vec<f32> { (0..16).map(|i| m[(i % 4) * 4 + i / 4]).collect() };
    let c_attn = |q: &[f32], v: &[f32]| -> Vec<f32> {
        let (q, v) = (transposed(q), transposed(v));
        (0..4)
            .flat_map(|row| {
                let k = [0.25f32; 4];
                [&q[row * 4..row * 4 + 4], &k[..], &v[row * 4..row * 4 + 4]].concat()
            })
            .collect()
    };
    let layer = |w: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>, l: usize| {
        let get = |m: &str| {
            w[&format!("model.layers.{l}.self_attn.{m}.weight")]
                .1
                .clone()
        };
        c_attn(&get("q_proj"), &get("v_proj"))
    };
    let tensors: Vec<T> = (0..2)
        .map(|l| T {
            name: format!("transformer.h.{l}.attn.c_attn.weight"),
            shape: vec![4, 12],
            values: layer(&base, l),
        })
        .collect();
    ws.write(
        "gpt2/model.safetensors",
        safetensors_bytes(&tensors, Dtype::F32),
    );
    ws.write(
        "gpt2/config.json",
        r#"{"model_type": "gpt2", "n_embd": 4, "n_head": 2, "n_layer": 2}"#,
    );
    ws.write(
        "gpt2.toml",
        GOOD.replace("\"base\"", "\"gpt2\"")
            .replace("\"out\"", "\"out-gpt2\""),
    );
    ws.ok(&["build", "gpt2.toml", "--quiet"]);
    let fused = read_f32(&ws.path("out-gpt2/model.safetensors"));
    for l in 0..2 {
        let got = &fused[&format!("transformer.h.{l}.attn.c_attn.weight")].1;
        let want = layer(&plain, l);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "layer {l}: off by {worst}");
    }
    let report = std::fs::read_to_string(ws.path("out-gpt2/transfer.txt")).unwrap();
    assert!(report.contains("c_attn.weight`, as columns"), "{report}");
}

#[test]
fn a_base_config_without_the_widths_its_schema_reads() {
    let ws = workspace();
    ws.write("stacked_qv.toml", STACKED_QV);
    ws.write(
        "qv/config.json",
        r#"{"model_type": "mystery", "num_hidden_layers": 2}"#,
    );
    ws.write(
        "recipe.toml",
        GOOD.replace("\"base\"", "\"qv\"\narch = \"stacked_qv\""),
    );
    assert_snapshot!(ws.fail(&["build", "recipe.toml", "--arch", "stacked_qv.toml"]));
}

#[test]
fn an_adapter_named_as_following_an_unknown_architecture() {
    let ws = workspace();
    assert_snapshot!(ws.refuse(&GOOD.replace("\"lora\"", "\"lora\"\narch = \"llama3\"")));
}

#[test]
fn an_adapter_whose_architecture_is_named() {
    // `arch = "llama"` on the adapter: its module names are read with the LLaMA schema only.
    let ws = workspace();
    ws.write("recipe.toml", GOOD);
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    ws.write("stacked_qv.toml", STACKED_QV);
    ws.write(
        "qv.toml",
        GOOD.replace("\"base\"", "\"qv\"\narch = \"stacked_qv\"")
            .replace("\"lora\"", "\"lora\"\narch = \"llama\"")
            .replace("\"out\"", "\"out-qv\""),
    );
    ws.ok(&["build", "qv.toml", "--quiet", "--arch", "stacked_qv.toml"]);
    let plain = read_f32(&ws.path("out/model.safetensors"));
    let fused = read_f32(&ws.path("out-qv/model.safetensors"));
    let (_, q) = &plain["model.layers.1.self_attn.q_proj.weight"];
    assert_eq!(&fused["blocks.1.qv.weight"].1[..16], &q[..]);
}

/// An adapter on q, k and v into the stacked-qv base, whose schema has no k: the k deltas have
/// no counterpart there.
fn unmatched_k(policy: &str) -> (Workspace, String) {
    let ws = workspace();
    ws.write("stacked_qv.toml", STACKED_QV);
    let modules: Vec<String> = (0..2)
        .flat_map(|l| {
            ["q_proj", "k_proj", "v_proj"].map(|m| format!("model.layers.{l}.self_attn.{m}"))
        })
        .collect();
    let modules: Vec<(&str, usize, usize)> = modules.iter().map(|m| (m.as_str(), 4, 4)).collect();
    ws.adapter("qkv", &modules, 2, serde_json::json!({}));
    let recipe = format!(
        "[base]\npath = \"qv\"\narch = \"stacked_qv\"\n\n[[adapter]]\npath = \"qkv\"\n\n[adapter.map]\n{policy}\n[output]\npath = \"out\"\n"
    );
    ws.write("recipe.toml", &recipe);
    (ws, recipe)
}

#[test]
fn a_module_without_counterpart_is_skipped_with_a_warning_by_default() {
    let (ws, _) = unmatched_k("unmatched = \"skip\"\n");
    let run = ws.run(&["build", "recipe.toml", "--arch", "stacked_qv.toml"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("(attn.k) has no counterpart"), "{stderr}");
    let report = std::fs::read_to_string(ws.path("out/transfer.txt")).unwrap();
    assert!(
        report.contains("model.layers.1.self_attn.k_proj: skipped: attn.k has no counterpart"),
        "{report}"
    );
}

#[test]
fn a_module_without_counterpart_fails_the_build_when_the_recipe_says_so() {
    let (ws, _) = unmatched_k("unmatched = \"error\"\n");
    let before = ws.snapshot_files();
    let stderr = ws.fail(&["build", "recipe.toml", "--arch", "stacked_qv.toml"]);
    assert_eq!(before, ws.snapshot_files(), "a failed build changed files");
    assert_snapshot!(stderr);
}

#[test]
fn unknown_unmatched_policy() {
    let (ws, recipe) = unmatched_k("unmatched = \"warn\"\n");
    assert_snapshot!(ws.refuse(&recipe));
}
