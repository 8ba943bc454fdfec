use insta::assert_snapshot;
use safetensors::Dtype;

use crate::support::{Workspace, GOOD};

fn workspace() -> Workspace {
    Workspace::with_lora()
}

fn fails(ws: &Workspace, recipe: &str) -> String {
    ws.refuse(recipe)
}

#[test]
fn the_good_recipe_builds() {
    // The faults below are each one change away from this recipe.
    let ws = workspace();
    ws.write("recipe.toml", GOOD);
    ws.ok(&["build", "recipe.toml", "--quiet"]);
}

#[test]
fn unknown_key() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("path = \"lora\"", "path = \"lora\"\nwieght = 0.5")
    ));
}

#[test]
fn wrong_type() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("path = \"lora\"", "path = \"lora\"\nweight = \"high\"")
    ));
}

#[test]
fn missing_base() {
    let ws = workspace();
    assert_snapshot!(fails(&ws, &GOOD.replace("\"base\"", "\"models/llama\"")));
}

#[test]
fn missing_adapter() {
    let ws = workspace();
    assert_snapshot!(fails(&ws, &GOOD.replace("\"lora\"", "\"adapters/none\"")));
}

#[test]
fn base_without_config() {
    let ws = workspace();
    std::fs::remove_file(ws.path("base/config.json")).unwrap();
    assert_snapshot!(fails(&ws, GOOD));
}

#[test]
fn adapter_targets_nothing_in_the_base() {
    let ws = workspace();
    ws.adapter(
        "other",
        &[("transformer.h.0.attn.c_attn", 4, 4)],
        2,
        serde_json::json!({"base_model_name_or_path": "gpt2"}),
    );
    assert_snapshot!(fails(&ws, &GOOD.replace("\"lora\"", "\"other\"")));
}

#[test]
fn adapter_with_one_unknown_target() {
    let ws = workspace();
    ws.adapter(
        "partial",
        &[
            ("model.layers.0.self_attn.q_proj", 4, 4),
            ("model.layers.0.self_attn.k_proj", 4, 4),
        ],
        2,
        serde_json::json!({}),
    );
    assert_snapshot!(fails(&ws, &GOOD.replace("\"lora\"", "\"partial\"")));
}

#[test]
fn adapter_shapes_do_not_fit() {
    let ws = workspace();
    ws.adapter(
        "wide",
        &[("model.layers.0.self_attn.q_proj", 8, 8)],
        2,
        serde_json::json!({"base_model_name_or_path": "llama-13b"}),
    );
    assert_snapshot!(fails(&ws, &GOOD.replace("\"lora\"", "\"wide\"")));
}

#[test]
fn malformed_layer_range() {
    let ws = workspace();
    let recipe = GOOD.replace(
        "path = \"lora\"",
        "path = \"lora\"\nweight = [ { value = 1.0 }, { layers = \"8..4\", value = 0.5 } ]",
    );
    assert_snapshot!(fails(&ws, &recipe));
}

#[test]
fn layer_range_beyond_the_layer_count() {
    let ws = workspace();
    let recipe = GOOD.replace(
        "path = \"lora\"",
        "path = \"lora\"\nweight = [ { layers = \"1..3\", value = 0.5 } ]",
    );
    assert_snapshot!(fails(&ws, &recipe));
}

#[test]
fn non_finite_weight() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("path = \"lora\"", "path = \"lora\"\nweight = nan")
    ));
}

#[test]
fn unknown_device() {
    let ws = workspace();
    assert_snapshot!(fails(&ws, &format!("{GOOD}\n[build]\ndevice = \"tpu\"\n")));
}

#[test]
fn output_over_an_input() {
    let ws = workspace();
    assert_snapshot!(fails(&ws, &GOOD.replace("\"out\"", "\"base\"")));
}

#[test]
fn pickled_adapter_is_refused() {
    let ws = workspace();
    std::fs::rename(
        ws.path("lora/adapter_model.safetensors"),
        ws.path("lora/adapter_model.bin"),
    )
    .unwrap();
    assert_snapshot!(fails(&ws, GOOD));
}

#[test]
fn dora_without_its_magnitude_is_refused() {
    let ws = workspace();
    ws.adapter(
        "dora",
        &[("model.layers.0.self_attn.q_proj", 4, 4)],
        2,
        serde_json::json!({"use_dora": true}),
    );
    assert_snapshot!(fails(&ws, &GOOD.replace("\"lora\"", "\"dora\"")));
}

#[test]
fn rank_in_config_differs_from_the_tensors() {
    let ws = workspace();
    ws.adapter(
        "lying",
        &[("model.layers.0.self_attn.q_proj", 4, 4)],
        2,
        serde_json::json!({"r": 8}),
    );
    assert_snapshot!(fails(&ws, &GOOD.replace("\"lora\"", "\"lying\"")));
}

#[test]
fn truncated_weights() {
    let ws = workspace();
    let bytes = std::fs::read(ws.path("base/model.safetensors")).unwrap();
    ws.write("base/model.safetensors", &bytes[..bytes.len() - 10]);
    assert_snapshot!(fails(&ws, GOOD));
}

#[test]
fn a_failed_build_keeps_the_previous_output() {
    let ws = workspace();
    ws.write("recipe.toml", GOOD);
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let before = ws.snapshot_files();
    ws.adapter(
        "wide",
        &[("model.layers.0.self_attn.q_proj", 8, 8)],
        2,
        serde_json::json!({}),
    );
    ws.write("recipe.toml", GOOD.replace("\"lora\"", "\"wide\""));
    ws.fail(&["build", "recipe.toml"]);
    ws.write("recipe.toml", GOOD);
    let mut after = ws.snapshot_files();
    after.retain(|(p, _)| !p.starts_with(ws.path("wide")));
    assert_eq!(before, after);
}

#[test]
fn merge_method_without_density() {
    let ws = workspace();
    assert_snapshot!(fails(&ws, &format!("{GOOD}\n[merge]\nmethod = \"ties\"\n")));
}

#[test]
fn majority_sign_without_sign_election() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &format!(
            "{GOOD}\n[merge]\nmethod = \"dare_linear\"\ndensity = 0.5\nmajority_sign = \"total\"\n"
        )
    ));
}

#[test]
fn density_out_of_range() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &format!("{GOOD}\n[merge]\nmethod = \"magnitude_prune\"\ndensity = 1.5\n")
    ));
}

#[test]
fn adapter_output_over_an_input() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"out\"\nadapter = \"lora\"")
    ));
}

#[test]
fn output_that_names_nothing() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("path = \"out\"", "dtype = \"bf16\"")
    ));
}

#[test]
fn adapter_rank_without_adapter_output() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"out\"\nadapter_rank = 8")
    ));
}

#[test]
fn full_model_of_another_shape() {
    let ws = workspace();
    ws.model("wide", 8, Dtype::F32);
    assert_snapshot!(fails(&ws, &GOOD.replace("\"lora\"", "\"wide\"")));
}

#[test]
fn align_without_a_source() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace(
            "path = \"lora\"",
            "path = \"lora\"\n[adapter.map]\ndims = \"align\""
        )
    ));
}

#[test]
fn unknown_width_adaptation() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace(
            "path = \"lora\"",
            "path = \"lora\"\n[adapter.map]\ndims = \"stretch\""
        )
    ));
}

#[test]
fn rank_without_align() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace(
            "path = \"lora\"",
            "path = \"lora\"\n[adapter.map]\ndims = \"pad\"\nrank = 4"
        )
    ));
}

#[test]
fn truncate_into_a_wider_base() {
    let ws = workspace();
    ws.model("wide", 8, Dtype::F32);
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("\"base\"", "\"wide\"").replace(
            "path = \"lora\"",
            "path = \"lora\"\n[adapter.map]\ndims = \"truncate\""
        )
    ));
}

#[test]
fn align_without_shared_tokens() {
    // The source's embedding has other rows than the base's, and neither has a tokenizer.json.
    let ws = workspace();
    ws.model("source", 4, Dtype::F32);
    let tensors = vec![crate::support::t("model.embed_tokens.weight", &[20, 4], 1)];
    ws.write(
        "source/model.safetensors",
        crate::support::safetensors_bytes(&tensors, Dtype::F32),
    );
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace(
            "path = \"lora\"",
            "path = \"lora\"\nsource = \"source\"\n[adapter.map]\ndims = \"align\""
        )
    ));
}

#[test]
fn layer_table_beyond_the_base() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace(
            "path = \"lora\"",
            "path = \"lora\"\n[adapter.map]\nlayers = { 0 = 0, 1 = 5 }"
        )
    ));
}

#[test]
fn unknown_shard_grouping() {
    let ws = workspace();
    assert_snapshot!(fails(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"out\"\nshard_by = \"layer\"")
    ));
}

/// GOOD with `keys` added to its adapter.
fn adapter_with(keys: &str) -> String {
    GOOD.replace("path = \"lora\"", &format!("path = \"lora\"\n{keys}"))
}

#[test]
fn examples_without_a_source() {
    let ws = workspace();
    ws.write("examples.txt", "a text\n");
    assert_snapshot!(fails(&ws, &adapter_with("examples = \"examples.txt\"")));
}

#[test]
fn examples_that_are_missing_or_a_folder() {
    let ws = workspace();
    let with =
        |examples: &str| adapter_with(&format!("source = \"base\"\nexamples = \"{examples}\""));
    assert_snapshot!("examples_missing", fails(&ws, &with("none.txt")));
    assert_snapshot!("examples_a_folder", fails(&ws, &with("base")));
}

#[test]
fn examples_on_a_base_the_engine_cannot_run() {
    let ws = workspace();
    ws.write("examples.txt", "a text\n");
    assert_snapshot!(fails(
        &ws,
        &adapter_with("source = \"base\"\nexamples = \"examples.txt\"")
    ));
}
