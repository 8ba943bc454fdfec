//! The adapters users bring, on tiny known answers: tied embeddings, DoRA, trainable tokens,
//! resized vocabularies and experts' parameters. (tests/peers/test_real_adapters.py compares
//! the same kinds with PEFT's own merge.)
use insta::assert_snapshot;
use safetensors::Dtype;

use crate::support::{read_f32, safetensors_bytes, t, Workspace, GOOD, T};

/// Writes an adapter of `tensors` (PEFT keys without `base_model.model.`) and `config`.
fn adapter(ws: &Workspace, rel: &str, tensors: Vec<T>, config: serde_json::Value) {
    let mut base = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4});
    for (k, v) in config.as_object().unwrap() {
        base[k] = v.clone();
    }
    ws.write(
        &format!("{rel}/adapter_config.json"),
        serde_json::to_vec(&base).unwrap(),
    );
    let tensors: Vec<T> = tensors
        .into_iter()
        .map(|t| T {
            name: format!("base_model.model.{}", t.name),
            ..t
        })
        .collect();
    ws.write(
        &format!("{rel}/adapter_model.safetensors"),
        safetensors_bytes(&tensors, Dtype::F32),
    );
}

/// A base of width 4 whose config ties its embeddings; `head` keeps a stale `lm_head.weight`
/// (a copy of the embedding) in the checkpoint.
fn tied_base(ws: &Workspace, head: bool) {
    ws.model("base", 4, Dtype::F32);
    let mut tensors = crate::support::llama_tensors(4, 2);
    let embedding = tensors[0].values.clone();
    tensors.retain(|t| t.name != "lm_head.weight");
    if head {
        tensors.push(T {
            name: "lm_head.weight".into(),
            shape: vec![16, 4],
            values: embedding,
        });
    }
    ws.write(
        "base/model.safetensors",
        safetensors_bytes(&tensors, Dtype::F32),
    );
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.path("base/config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = true.into();
    ws.write("base/config.json", serde_json::to_vec(&config).unwrap());
}

fn matmul(b: &[f32], a: &[f32], rows: usize, r: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum();
        }
    }
    out
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{got:?} != {want:?}"
        );
    }
}

fn config(ws: &Workspace) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(ws.path("out/config.json")).unwrap()).unwrap()
}

#[test]
fn a_lora_on_the_head_of_a_tied_model_changes_the_shared_embedding() {
    for stale in [false, true] {
        let ws = Workspace::new();
        tied_base(&ws, stale);
        let (a, b) = (
            t("lm_head.lora_A.weight", &[2, 4], 7),
            t("lm_head.lora_B.weight", &[16, 2], 8),
        );
        let delta = matmul(&b.values, &a.values, 16, 2, 4);
        adapter(
            &ws,
            "lora",
            vec![a, b],
            serde_json::json!({"target_modules": ["lm_head"]}),
        );
        ws.write("recipe.toml", GOOD);
        ws.ok(&["build", "recipe.toml", "--quiet"]);
        let out = read_f32(&ws.path("out/model.safetensors"));
        let base = read_f32(&ws.path("base/model.safetensors"));
        let want: Vec<f32> = base["model.embed_tokens.weight"]
            .1
            .iter()
            .zip(&delta)
            .map(|(w, d)| w + 2.0 * d)
            .collect();
        close(&out["model.embed_tokens.weight"].1, &want);
        assert!(
            !out.contains_key("lm_head.weight"),
            "a tied head is left out"
        );
        assert_eq!(config(&ws)["tie_word_embeddings"], true);
    }
}

#[test]
fn modules_to_save_on_one_side_of_a_tie_writes_both_apart() {
    let ws = Workspace::new();
    tied_base(&ws, false);
    let trained = t("model.embed_tokens.weight", &[16, 4], 9);
    let values = trained.values.clone();
    adapter(
        &ws,
        "lora",
        vec![trained],
        serde_json::json!({"modules_to_save": ["embed_tokens"]}),
    );
    ws.write("recipe.toml", GOOD);
    let summary = ws.ok(&["build", "recipe.toml", "--json"]);
    assert!(summary.contains("tie_word_embeddings = false"), "{summary}");
    let out = read_f32(&ws.path("out/model.safetensors"));
    let base = read_f32(&ws.path("base/model.safetensors"));
    assert_eq!(out["model.embed_tokens.weight"].1, values);
    // The head keeps the base's (shared) values.
    assert_eq!(out["lm_head.weight"].1, base["model.embed_tokens.weight"].1);
    assert_eq!(config(&ws)["tie_word_embeddings"], false);
    let card = std::fs::read_to_string(ws.path("out/README.md")).unwrap();
    assert!(card.contains("tie_word_embeddings = false"), "{card}");
}

#[test]
fn dora_scales_each_row_to_its_magnitude() {
    let ws = Workspace::with_lora();
    let module = "model.layers.0.self_attn.q_proj";
    let (a, b) = (
        t(&format!("{module}.lora_A.weight"), &[2, 4], 3),
        t(&format!("{module}.lora_B.weight"), &[4, 2], 4),
    );
    let m = t(&format!("{module}.lora_magnitude_vector"), &[4], 5);
    let (av, bv, mv) = (a.values.clone(), b.values.clone(), m.values.clone());
    adapter(
        &ws,
        "dora",
        vec![a, b, m],
        serde_json::json!({"use_dora": true, "target_modules": ["q_proj"]}),
    );
    ws.write(
        "recipe.toml",
        GOOD.replace("\"lora\"", "\"dora\"\nweight = 0.5"),
    );
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let base = read_f32(&ws.path("base/model.safetensors"));
    let w = &base[&format!("{module}.weight")].1;
    // weight 0.5 × scaling 2 scales ΔW; the magnitude stays absolute.
    let sum: Vec<f32> = w
        .iter()
        .zip(matmul(&bv, &av, 4, 2, 4))
        .map(|(w, d)| w + d)
        .collect();
    let want: Vec<f32> = sum
        .chunks(4)
        .zip(&mv)
        .flat_map(|(row, m)| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.iter().map(move |v| m / norm * v).collect::<Vec<_>>()
        })
        .collect();
    let out = read_f32(&ws.path("out/model.safetensors"));
    close(&out[&format!("{module}.weight")].1, &want);
}

#[test]
fn trainable_tokens_replace_their_rows() {
    let ws = Workspace::with_lora();
    let delta = t(
        "model.embed_tokens.token_adapter.trainable_tokens_delta",
        &[2, 4],
        6,
    );
    let rows = delta.values.clone();
    adapter(
        &ws,
        "tokens",
        vec![delta],
        serde_json::json!({"trainable_token_indices": [3, 11]}),
    );
    ws.write("recipe.toml", GOOD.replace("\"lora\"", "\"tokens\""));
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let base = read_f32(&ws.path("base/model.safetensors"));
    let mut want = base["model.embed_tokens.weight"].1.clone();
    want[12..16].copy_from_slice(&rows[..4]);
    want[44..48].copy_from_slice(&rows[4..]);
    let out = read_f32(&ws.path("out/model.safetensors"));
    assert_eq!(out["model.embed_tokens.weight"].1, want);
    assert_eq!(
        out["lm_head.weight"].1, base["lm_head.weight"].1,
        "untied: the head is untouched"
    );
}

#[test]
fn experts_get_their_own_slice_of_the_factors() {
    // A [E=2, out=3, in=4] parameter; A is (E·r × in), B (out × E·r), expert e's rank column k
    // at k·E + e.
    let ws = Workspace::with_lora();
    let mut tensors = crate::support::llama_tensors(4, 2);
    let experts = t("model.layers.0.mlp.experts.down_proj", &[2, 3, 4], 20);
    let base = experts.values.clone();
    tensors.push(experts);
    ws.write(
        "base/model.safetensors",
        safetensors_bytes(&tensors, Dtype::F32),
    );
    let module = "model.layers.0.mlp.experts";
    let (a, b) = (
        t(&format!("{module}.lora_A.weight"), &[4, 4], 21),
        t(&format!("{module}.lora_B.weight"), &[3, 4], 22),
    );
    let (av, bv) = (a.values.clone(), b.values.clone());
    adapter(
        &ws,
        "moe",
        vec![a, b],
        serde_json::json!({"target_modules": null, "target_parameters": ["mlp.experts.down_proj"]}),
    );
    ws.write("recipe.toml", GOOD.replace("\"lora\"", "\"moe\""));
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let mut want = base.clone();
    for e in 0..2 {
        for o in 0..3 {
            for i in 0..4 {
                let d: f32 = (0..2)
                    .map(|k| bv[o * 4 + k * 2 + e] * av[(e * 2 + k) * 4 + i])
                    .sum();
                want[e * 12 + o * 4 + i] += 2.0 * d;
            }
        }
    }
    let out = read_f32(&ws.path("out/model.safetensors"));
    close(&out["model.layers.0.mlp.experts.down_proj"].1, &want);
}

#[test]
fn dora_with_adapted_widths_is_refused() {
    // Made for a base twice as wide: `truncate` would cut rows the magnitude belongs to.
    let ws = Workspace::with_lora();
    let module = "model.layers.0.self_attn.q_proj";
    adapter(
        &ws,
        "dora",
        vec![
            t(&format!("{module}.lora_A.weight"), &[2, 8], 3),
            t(&format!("{module}.lora_B.weight"), &[8, 2], 4),
            t(&format!("{module}.lora_magnitude_vector"), &[8], 5),
        ],
        serde_json::json!({"use_dora": true}),
    );
    let recipe = GOOD.replace("\"lora\"", "\"dora\"\n[adapter.map]\ndims = \"truncate\"");
    assert_snapshot!(ws.refuse(&recipe));
}

#[test]
fn a_trainable_token_outside_the_vocabulary_is_refused() {
    let ws = Workspace::with_lora();
    adapter(
        &ws,
        "tokens",
        vec![t(
            "model.embed_tokens.token_adapter.trainable_tokens_delta",
            &[1, 4],
            6,
        )],
        serde_json::json!({"trainable_token_indices": [16]}),
    );
    assert_snapshot!(ws.refuse(&GOOD.replace("\"lora\"", "\"tokens\"")));
}

#[test]
fn a_resized_embedding_without_its_head_is_refused() {
    let ws = Workspace::with_lora();
    adapter(
        &ws,
        "resized",
        vec![t("model.embed_tokens.weight", &[20, 4], 6)],
        serde_json::json!({"modules_to_save": ["embed_tokens"]}),
    );
    assert_snapshot!(ws.refuse(&GOOD.replace("\"lora\"", "\"resized\"")));
}

#[test]
fn a_resized_vocabulary_with_both_sides_builds_the_resized_model() {
    let ws = Workspace::with_lora();
    adapter(
        &ws,
        "resized",
        vec![
            t("model.embed_tokens.weight", &[20, 4], 6),
            t("lm_head.weight", &[20, 4], 7),
        ],
        serde_json::json!({"modules_to_save": ["embed_tokens", "lm_head"]}),
    );
    ws.write("resized/tokenizer.json", "{\"added\": true}");
    ws.write("recipe.toml", GOOD.replace("\"lora\"", "\"resized\""));
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let out = read_f32(&ws.path("out/model.safetensors"));
    assert_eq!(out["lm_head.weight"].0, vec![20, 4]);
    assert_eq!(config(&ws)["vocab_size"], 20);
    assert_eq!(
        std::fs::read_to_string(ws.path("out/tokenizer.json")).unwrap(),
        "{\"added\": true}"
    );
}

#[test]
fn a_changed_magnitude_or_token_row_rebuilds_only_its_tensor() {
    // Node keys name an adapter's tensors by their own bytes, not by the adapter file's.
    let ws = Workspace::with_lora();
    let dora = |magnitude_seed: u64, token_seed: u64| {
        let mut tensors = Vec::new();
        for module in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
        ] {
            tensors.push(t(&format!("{module}.lora_A.weight"), &[2, 4], 3));
            tensors.push(t(&format!("{module}.lora_B.weight"), &[4, 2], 4));
        }
        tensors.push(t(
            "model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            &[4],
            magnitude_seed,
        ));
        tensors.push(t(
            "model.layers.1.self_attn.q_proj.lora_magnitude_vector",
            &[4],
            5,
        ));
        tensors.push(t(
            "model.embed_tokens.token_adapter.trainable_tokens_delta",
            &[1, 4],
            token_seed,
        ));
        adapter(
            &ws,
            "dora",
            tensors,
            serde_json::json!({"use_dora": true, "trainable_token_indices": [3]}),
        );
    };
    let computed = || -> (u64, String) {
        let plan = ws.ok(&["plan", "recipe.toml"]);
        let summary: serde_json::Value =
            serde_json::from_str(&ws.ok(&["build", "recipe.toml", "--json"])).unwrap();
        (summary["nodes"]["computed"].as_u64().unwrap(), plan)
    };
    dora(5, 6);
    ws.write("recipe.toml", GOOD.replace("\"lora\"", "\"dora\""));
    assert_eq!(computed().0, 3);
    dora(7, 6);
    let (n, plan) = computed();
    assert_eq!(
        n, 1,
        "only layer 0's q_proj reads the changed magnitude:\n{plan}"
    );
    assert!(
        plan.contains("compute  model.layers.0.self_attn.q_proj.weight  (`dora/adapter_model.safetensors` changed)"),
        "{plan}"
    );
    dora(7, 8);
    assert_eq!(computed().0, 1, "only the embedding reads the token row");
}
