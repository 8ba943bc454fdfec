use safetensors::Dtype;
use serde_json::json;

use crate::support::{llama_tensors, read_f32, values, Workspace};

/// W + factor · B·A (or its transpose) in f64, the answer the math gives.
fn expected(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    (out, inp, r): (usize, usize, usize),
    factor: f64,
    transposed: bool,
) -> Vec<f32> {
    let mut result = w.to_vec();
    for i in 0..out {
        for j in 0..inp {
            let dot: f64 = (0..r)
                .map(|k| b[i * r + k] as f64 * a[k * inp + j] as f64)
                .sum();
            let at = if transposed { j * out + i } else { i * inp + j };
            result[at] = (w[at] as f64 + factor * dot) as f32;
        }
    }
    result
}

fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in actual.iter().zip(expected).enumerate() {
        assert!((x - y).abs() <= 1e-6 * scale, "{what}[{i}]: {x} vs {y}");
    }
}

/// The base tensor `name` of the fixture model of width 4.
fn base_tensor(name: &str) -> Vec<f32> {
    llama_tensors(4, 2)
        .into_iter()
        .find(|t| t.name == name)
        .unwrap()
        .values
}

/// The A and B an adapter fixture wrote for its `index`-th module.
fn lora(rel: &str, index: u64, out: usize, inp: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    let seed = 1000 + index * 2 + rel.len() as u64 * 100;
    (values(seed, r * inp), values(seed + 1, out * r))
}

const Q0: &str = "model.layers.0.self_attn.q_proj";
const V1: &str = "model.layers.1.self_attn.v_proj";

#[test]
fn fuses_the_weighted_delta_and_copies_the_rest() {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    ws.adapter("lora", &[(Q0, 4, 4), (V1, 4, 4)], 2, json!({}));
    ws.write("recipe.toml", "[base]\npath = \"base\"\n[[adapter]]\npath = \"lora\"\nweight = 0.5\n[output]\npath = \"out\"\n");
    let summary: serde_json::Value =
        serde_json::from_str(&ws.ok(&["build", "recipe.toml", "--json"])).unwrap();
    assert_eq!(summary["fused"], 2);
    assert_eq!(summary["nodes"]["total"], 11);

    let out = read_f32(&ws.path("out/model.safetensors"));
    // lora_alpha = 2r, so the scaling is 2 and the factor 0.5 · 2.
    for (i, module) in [Q0, V1].iter().enumerate() {
        let (a, b) = lora("lora", i as u64, 4, 4, 2);
        let name = format!("{module}.weight");
        let want = expected(&base_tensor(&name), &a, &b, (4, 4, 2), 1.0, false);
        assert_close(&out[&name].1, &want, &name);
    }
    assert_eq!(
        out["model.layers.0.self_attn.v_proj.weight"].1,
        base_tensor("model.layers.0.self_attn.v_proj.weight")
    );
    assert_eq!(out.len(), 11);

    for file in ["config.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(ws.path(&format!("base/{file}"))).unwrap(),
            std::fs::read(ws.path(&format!("out/{file}"))).unwrap()
        );
    }
    let card = std::fs::read_to_string(ws.path("out/README.md")).unwrap();
    assert!(card.starts_with("---\nbase_model: \"base\"\n"), "{card}");
    assert!(card.contains("| `lora` | 0.5 | 2 | 4 |"), "{card}");
    assert!(card.contains("weight = 0.5"), "the card quotes the recipe");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.path("out/modelforge.json")).unwrap()).unwrap();
    let base_digest = blake3::hash(&std::fs::read(ws.path("base/model.safetensors")).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(manifest["inputs"]["base/model.safetensors"], base_digest);
    let out_digest = blake3::hash(&std::fs::read(ws.path("out/model.safetensors")).unwrap())
        .to_hex()
        .to_string();
    let lock: toml::Value =
        toml::from_str(&std::fs::read_to_string(ws.path("recipe.lock")).unwrap()).unwrap();
    assert_eq!(
        lock["outputs"]["out/model.safetensors"].as_str(),
        Some(out_digest.as_str())
    );
    assert_eq!(
        lock["inputs"]["base/model.safetensors"].as_str(),
        Some(base_digest.as_str())
    );
}

#[test]
fn weight_rules_pick_the_last_match() {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    let modules = [
        (Q0, 4, 4),
        ("model.layers.0.self_attn.v_proj", 4, 4),
        ("model.layers.1.self_attn.q_proj", 4, 4),
        (V1, 4, 4),
    ];
    ws.adapter("lora", &modules, 2, json!({"lora_alpha": 2}));
    ws.write(
        "recipe.toml",
        r#"[base]
path = "base"
[[adapter]]
path = "lora"
weight = [ { value = 2.0 }, { layers = "1..", value = 0.5 }, { modules = ["q_proj"], layers = "0..1", value = 0.0 } ]
[output]
path = "out"
"#,
    );
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let out = read_f32(&ws.path("out/model.safetensors"));
    // alpha = r, so the factor is the weight.
    for (i, (module, weight)) in [
        (Q0, 0.0),
        ("model.layers.0.self_attn.v_proj", 2.0),
        ("model.layers.1.self_attn.q_proj", 0.5),
        (V1, 0.5),
    ]
    .iter()
    .enumerate()
    {
        let (a, b) = lora("lora", i as u64, 4, 4, 2);
        let name = format!("{module}.weight");
        let want = expected(&base_tensor(&name), &a, &b, (4, 4, 2), *weight, false);
        assert_close(&out[&name].1, &want, &name);
    }
}

#[test]
fn stacked_adapters_add_up() {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    ws.adapter("one", &[(Q0, 4, 4)], 2, json!({}));
    ws.adapter(
        "two",
        &[(Q0, 4, 4)],
        3,
        json!({"use_rslora": true, "lora_alpha": 3}),
    );
    ws.write("recipe.toml", "[base]\npath = \"base\"\n[[adapter]]\npath = \"one\"\nweight = 0.7\n[[adapter]]\npath = \"two\"\nweight = 0.4\n[output]\npath = \"out\"\n");
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let name = format!("{Q0}.weight");
    let (a1, b1) = lora("one", 0, 4, 4, 2);
    let (a2, b2) = lora("two", 0, 4, 4, 3);
    let after_one = expected(&base_tensor(&name), &a1, &b1, (4, 4, 2), 0.7 * 2.0, false);
    // rsLoRA scales by alpha/sqrt(r).
    let want = expected(
        &after_one,
        &a2,
        &b2,
        (4, 4, 3),
        0.4 * 3.0 / 3f64.sqrt(),
        false,
    );
    assert_close(
        &read_f32(&ws.path("out/model.safetensors"))[&name].1,
        &want,
        &name,
    );
}

#[test]
fn fan_in_fan_out_transposes_the_delta() {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    // A Conv1D stores its weight as (in, out). Read that way, up_proj's (8, 4) is a layer from
    // 8 to 4 features: A is (r, 8), B is (4, r), and the delta (B·A)ᵀ is (8, 4).
    let module = "model.layers.0.mlp.up_proj";
    ws.adapter(
        "conv",
        &[(module, 4, 8)],
        2,
        json!({"fan_in_fan_out": true}),
    );
    ws.write(
        "recipe.toml",
        "[base]\npath = \"base\"\n[[adapter]]\npath = \"conv\"\n[output]\npath = \"out\"\n",
    );
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let name = format!("{module}.weight");
    let (a, b) = lora("conv", 0, 4, 8, 2);
    let want = expected(&base_tensor(&name), &a, &b, (4, 8, 2), 2.0, true);
    assert_close(
        &read_f32(&ws.path("out/model.safetensors"))[&name].1,
        &want,
        &name,
    );
}

#[test]
fn rebuilds_are_byte_identical_and_shards_round_trip() {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    ws.adapter("lora", &[(Q0, 4, 4)], 2, json!({}));
    let recipe = |out: &str, base: &str, shard: &str| {
        format!("[base]\npath = \"{base}\"\n[[adapter]]\npath = \"lora\"\n[output]\npath = \"{out}\"\nmax_shard_size = \"{shard}\"\n")
    };
    ws.write("a.toml", recipe("a", "base", "5GB"));
    ws.write("b.toml", recipe("b", "base", "5GB"));
    ws.ok(&["build", "a.toml", "--quiet"]);
    ws.ok(&["build", "b.toml", "--quiet"]);
    ws.ok(&["build", "b.toml", "--quiet"]);
    let bytes = |p: &str| std::fs::read(ws.path(p)).unwrap();
    assert_eq!(bytes("a/model.safetensors"), bytes("b/model.safetensors"));

    // Sharded at 200 bytes: several files and an index that names every tensor.
    ws.write("s.toml", recipe("sharded", "base", "200B"));
    ws.ok(&["build", "s.toml", "--quiet"]);
    let index: serde_json::Value =
        serde_json::from_slice(&bytes("sharded/model.safetensors.index.json")).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 11);
    let files: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 2, "{files:?}");
    let total: u64 = files
        .iter()
        .map(|f| {
            read_f32(&ws.path(&format!("sharded/{f}")))
                .values()
                .map(|(_, v)| v.len() as u64 * 4)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);

    // The sharded output is itself a base: fusing nothing into it gives the single-file tensors back.
    ws.write(
        "c.toml",
        "[base]\npath = \"sharded\"\n[output]\npath = \"c\"\n",
    );
    ws.ok(&["build", "c.toml", "--quiet"]);
    assert_eq!(
        read_f32(&ws.path("c/model.safetensors")),
        read_f32(&ws.path("a/model.safetensors"))
    );
}

#[test]
fn output_dtype_converts_floats_and_the_config() {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    ws.write(
        "recipe.toml",
        "[base]\npath = \"base\"\n[output]\npath = \"out\"\ndtype = \"bf16\"\n",
    );
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let bytes = std::fs::read(ws.path("out/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, view) = st
        .tensors()
        .into_iter()
        .find(|(n, _)| n == "lm_head.weight")
        .unwrap();
    assert_eq!(view.dtype(), Dtype::BF16);
    // bf16 keeps the top 16 bits, rounded to nearest even.
    let want = base_tensor("lm_head.weight")[0];
    let got = f32::from_bits((u16::from_le_bytes([view.data()[0], view.data()[1]]) as u32) << 16);
    assert!((got - want).abs() <= want.abs() / 128.0, "{got} vs {want}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.path("out/config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn lora_bias_and_modules_to_save() {
    use crate::support::{safetensors_bytes, t};
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    // A base whose q_proj has a bias, as Qwen2's has.
    let mut tensors = llama_tensors(4, 2);
    tensors.push(t("model.layers.0.self_attn.q_proj.bias", &[4], 77));
    ws.write(
        "base/model.safetensors",
        safetensors_bytes(&tensors, Dtype::F32),
    );
    ws.write(
        "lora/adapter_config.json",
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_bias": true, "modules_to_save": ["lm_head"]}"#,
    );
    let adapter = vec![
        t(&format!("base_model.model.{Q0}.lora_A.weight"), &[2, 4], 5),
        t(&format!("base_model.model.{Q0}.lora_B.weight"), &[4, 2], 6),
        t(&format!("base_model.model.{Q0}.lora_B.bias"), &[4], 7),
        t("base_model.model.lm_head.weight", &[16, 4], 8),
    ];
    ws.write(
        "lora/adapter_model.safetensors",
        safetensors_bytes(&adapter, Dtype::F32),
    );
    ws.write("recipe.toml", "[base]\npath = \"base\"\n[[adapter]]\npath = \"lora\"\nweight = 0.5\n[output]\npath = \"out\"\n");
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let out = read_f32(&ws.path("out/model.safetensors"));
    // PEFT merges lora_bias as bias += scaling · lora_B.bias; the weight multiplies it too.
    let bias = values(77, 4);
    let want: Vec<f32> = bias
        .iter()
        .zip(values(7, 4))
        .map(|(b, d)| (*b as f64 + 0.5 * 2.0 * d as f64) as f32)
        .collect();
    assert_close(
        &out["model.layers.0.self_attn.q_proj.bias"].1,
        &want,
        "bias",
    );
    let want = expected(
        &base_tensor(&format!("{Q0}.weight")),
        &values(5, 8),
        &values(6, 8),
        (4, 4, 2),
        1.0,
        false,
    );
    assert_close(&out[&format!("{Q0}.weight")].1, &want, "q_proj");
    // modules_to_save replaces the tensor outright, whatever the weight.
    assert_eq!(out["lm_head.weight"].1, values(8, 64));
}

/// `dims = "truncate"` and `"pad"` known answers: the delta's leading rows and columns land on
/// the base's, and the rest of the base is unchanged.
#[test]
fn truncate_and_pad_keep_the_leading_block_of_the_delta() {
    let ws = Workspace::new();
    ws.adapter("lora", &[(Q0, 4, 4), (V1, 4, 4)], 2, json!({}));
    for (dims, width) in [("truncate", 3), ("pad", 6)] {
        ws.model(dims, width, Dtype::F32);
        ws.write(
            "recipe.toml",
            format!("[base]\npath = \"{dims}\"\n[[adapter]]\npath = \"lora\"\n[adapter.map]\ndims = \"{dims}\"\n[output]\npath = \"out-{dims}\"\n"),
        );
        ws.ok(&["build", "recipe.toml", "--quiet"]);
        let out = read_f32(&ws.path(&format!("out-{dims}/model.safetensors")));
        for (i, module) in [Q0, V1].iter().enumerate() {
            let (a, b) = lora("lora", i as u64, 4, 4, 2);
            let name = format!("{module}.weight");
            let base = llama_tensors(width, 2)
                .into_iter()
                .find(|t| t.name == name)
                .unwrap()
                .values;
            let full = expected(&[0.0; 16], &a, &b, (4, 4, 2), 2.0, false);
            let mut want = base.clone();
            for row in 0..width.min(4) {
                for col in 0..width.min(4) {
                    want[row * width + col] =
                        (base[row * width + col] as f64 + full[row * 4 + col] as f64) as f32;
                }
            }
            assert_close(&out[&name].1, &want, &format!("{dims} {name}"));
        }
        let transfer =
            std::fs::read_to_string(ws.path(&format!("out-{dims}/transfer.txt"))).unwrap();
        assert!(
            transfer.contains(&format!("dims {dims} [4, 4] -> [{width}, {width}]")),
            "{transfer}"
        );
    }
}
