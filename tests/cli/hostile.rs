//! Damaged, malformed and hostile inputs. Each test first builds a good output, then breaks one
//! input and builds again into the same output: the build must fail with a diagnostic that says
//! what is wrong (pinned), leave every file as it was, the previous output included, and leave
//! no temporary directory behind.
use std::time::{Duration, Instant};

use insta::assert_snapshot;
use safetensors::Dtype;
use serde_json::json;

use crate::support::{llama_tensors, raw_safetensors, safetensors_bytes, t, Workspace, GOOD, T};

const Q0: &str = "model.layers.0.self_attn.q_proj";

/// The shared base and adapter, with their fused output in `out/`.
fn built() -> Workspace {
    let ws = Workspace::with_lora();
    ws.write("recipe.toml", GOOD);
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    assert!(ws.path("out/model.safetensors").is_file());
    ws
}

/// Builds `recipe` into the output of the good build; the build must fail and change nothing.
fn refused(ws: &Workspace, recipe: &str) -> String {
    ws.refuse(recipe)
}

/// `refused`, for workspaces with symbolic link loops or named pipes, which `snapshot_files`
/// would follow or block on.
fn refused_special(ws: &Workspace, recipe: &str) -> String {
    ws.write("recipe.toml", recipe);
    let before = ws.snapshot_tree();
    let stderr = ws.fail(&["build", "recipe.toml"]);
    assert_eq!(
        before,
        ws.snapshot_tree(),
        "a failed build changed or created files"
    );
    assert_eq!(ws.leftovers(), Vec::<std::path::PathBuf>::new());
    stderr
}

/// Replaces the base's weights with `bytes`.
fn base_weights(ws: &Workspace, bytes: Vec<u8>) {
    ws.write("base/model.safetensors", bytes);
}

/// `model.norm.weight` (F32, 4 elements: 16 bytes) described by `entry`, with `data` bytes.
fn one_tensor(entry: &str, data: usize) -> Vec<u8> {
    raw_safetensors(
        &format!("{{\"model.norm.weight\":{entry}}}"),
        &vec![0u8; data],
    )
}

/// An adapter written tensor by tensor (F32), with `config` over the default adapter_config.json.
fn adapter_of(ws: &Workspace, rel: &str, tensors: &[T], mut config: serde_json::Value) {
    // `target_modules` as PEFT writes it, unless the test gives its own.
    let mut targets: Vec<&str> = tensors
        .iter()
        .filter_map(|t| t.name.split(".lora_").next()?.rsplit('.').next())
        .collect();
    targets.sort_unstable();
    targets.dedup();
    if config.get("target_modules").is_none() {
        config["target_modules"] = json!(targets);
    }
    ws.adapter(rel, &[], 2, config);
    ws.write(
        &format!("{rel}/adapter_model.safetensors"),
        safetensors_bytes(tensors, Dtype::F32),
    );
}

fn lora_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

// --- safetensors files ------------------------------------------------------------------------

#[test]
fn shorter_than_the_length_field() {
    let ws = built();
    base_weights(&ws, vec![1, 2, 3, 4, 5]);
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn truncated_inside_the_header() {
    let ws = built();
    let bytes = std::fs::read(ws.path("base/model.safetensors")).unwrap();
    base_weights(&ws, bytes[..40].to_vec());
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn truncated_inside_the_data() {
    let ws = built();
    let bytes = std::fs::read(ws.path("base/model.safetensors")).unwrap();
    base_weights(&ws, bytes[..bytes.len() - 100].to_vec());
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn header_length_beyond_the_file() {
    let ws = built();
    let mut bytes = std::fs::read(ws.path("base/model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
    base_weights(&ws, bytes);
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn header_over_100_mb() {
    // The `safetensors` crate's limit ("header too large"); the length is refused before
    // anything is allocated, so the file itself can be small.
    let ws = built();
    let mut bytes = std::fs::read(ws.path("base/model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&100_000_001u64.to_le_bytes());
    base_weights(&ws, bytes);
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn header_is_not_json() {
    let ws = built();
    base_weights(&ws, raw_safetensors("{\"model.norm.weight\": {dtype", &[]));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn header_is_not_an_object() {
    let ws = built();
    base_weights(&ws, raw_safetensors("[\"model.norm.weight\"]", &[]));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn header_is_not_utf8() {
    let ws = built();
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    base_weights(&ws, bytes);
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn tensor_entry_is_not_a_description() {
    let ws = built();
    base_weights(
        &ws,
        one_tensor(
            r#"{"dtype":"F32","shape":"four","data_offsets":[0,16]}"#,
            16,
        ),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn unknown_dtype() {
    let ws = built();
    base_weights(
        &ws,
        one_tensor(r#"{"dtype":"F31","shape":[4],"data_offsets":[0,16]}"#, 16),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn shape_and_dtype_do_not_fit_the_byte_range() {
    let ws = built();
    base_weights(
        &ws,
        one_tensor(r#"{"dtype":"F32","shape":[4],"data_offsets":[0,12]}"#, 12),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn shape_overflows() {
    let ws = built();
    base_weights(
        &ws,
        one_tensor(
            r#"{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,16]}"#,
            16,
        ),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

/// Two F32 tensors of 4 elements with the given data offsets.
fn two_tensors(a: [u64; 2], b: [u64; 2], data: usize) -> Vec<u8> {
    let header = json!({
        "model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": a},
        "model.layers.0.input_layernorm.weight": {"dtype": "F32", "shape": [4], "data_offsets": b},
    });
    raw_safetensors(&header.to_string(), &vec![0u8; data])
}

#[test]
fn overlapping_data_offsets() {
    let ws = built();
    base_weights(&ws, two_tensors([0, 16], [8, 24], 24));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn reversed_data_offsets() {
    let ws = built();
    base_weights(&ws, two_tensors([0, 16], [32, 16], 32));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn out_of_bounds_data_offsets() {
    let ws = built();
    base_weights(&ws, two_tensors([0, 16], [1 << 40, (1 << 40) + 16], 32));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn gap_between_tensors() {
    let ws = built();
    base_weights(&ws, two_tensors([0, 16], [24, 40], 40));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn trailing_bytes() {
    let ws = built();
    let mut bytes = std::fs::read(ws.path("base/model.safetensors")).unwrap();
    bytes.extend_from_slice(b"trailing");
    base_weights(&ws, bytes);
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn header_order_need_not_be_data_order() {
    // Not a fault: safetensors sorts entries by their offsets, and so does modelforge.
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    let tensors = llama_tensors(4, 2);
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    // Data in name order, header in reverse name order.
    let mut sorted: Vec<&T> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut entries = Vec::new();
    for tensor in &sorted {
        let start = data.len();
        data.extend(tensor.values.iter().flat_map(|v| v.to_le_bytes()));
        entries.push((
            tensor.name.clone(),
            json!({"dtype": "F32", "shape": tensor.shape, "data_offsets": [start, data.len()]}),
        ));
    }
    for (name, entry) in entries.into_iter().rev() {
        header.insert(name, entry);
    }
    ws.write(
        "base/model.safetensors",
        raw_safetensors(&serde_json::Value::Object(header).to_string(), &data),
    );
    ws.write(
        "recipe.toml",
        "[base]\npath = \"base\"\n[output]\npath = \"out\"\n",
    );
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    let out = crate::support::read_f32(&ws.path("out/model.safetensors"));
    for tensor in &tensors {
        assert_eq!(out[&tensor.name].1, tensor.values, "{}", tensor.name);
    }
}

#[test]
fn tensor_named_twice_in_one_header() {
    let ws = built();
    let entry = r#"{"dtype":"F32","shape":[4],"data_offsets":[0,16]}"#;
    let header = format!("{{\"model.norm.weight\":{entry},\"model.norm.weight\":{entry}}}");
    base_weights(&ws, raw_safetensors(&header, &[0; 16]));
    assert_snapshot!(refused(&ws, GOOD));
}

// --- sharded models ---------------------------------------------------------------------------

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// Turns `base` into two shards and an index; `index` edits the weight map before it is
/// written, `extra` adds tensors to the second shard.
fn shard_base(
    ws: &Workspace,
    index: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    extra: Vec<T>,
) {
    std::fs::remove_file(ws.path("base/model.safetensors")).unwrap();
    let (first, mut second): (Vec<T>, Vec<T>) = llama_tensors(4, 2)
        .into_iter()
        .partition(|t| t.name.starts_with("model.layers.0."));
    let mut map = serde_json::Map::new();
    for tensor in &first {
        map.insert(tensor.name.clone(), SHARD1.into());
    }
    for tensor in &second {
        map.insert(tensor.name.clone(), SHARD2.into());
    }
    second.extend(extra);
    ws.write(
        &format!("base/{SHARD1}"),
        safetensors_bytes(&first, Dtype::F32),
    );
    ws.write(
        &format!("base/{SHARD2}"),
        safetensors_bytes(&second, Dtype::F32),
    );
    index(&mut map);
    ws.write(
        "base/model.safetensors.index.json",
        serde_json::to_vec_pretty(&json!({"metadata": {}, "weight_map": map})).unwrap(),
    );
}

#[test]
fn sharded_base_builds() {
    // The faults below are each one change away from this.
    let ws = built();
    shard_base(&ws, |_| {}, Vec::new());
    ws.ok(&["build", "recipe.toml", "--quiet"]);
}

#[test]
fn tensor_in_two_shards() {
    let ws = built();
    shard_base(
        &ws,
        |_| {},
        vec![t("model.layers.0.self_attn.q_proj.weight", &[4, 4], 7)],
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn index_names_a_missing_shard() {
    let ws = built();
    shard_base(
        &ws,
        |map| {
            map.insert(
                "model.norm.weight".into(),
                "model-00003-of-00002.safetensors".into(),
            );
        },
        Vec::new(),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn index_names_a_tensor_its_shard_lacks() {
    let ws = built();
    shard_base(
        &ws,
        |map| {
            map.insert("model.extra.weight".into(), SHARD1.into());
        },
        Vec::new(),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn index_shard_escapes_the_directory() {
    let ws = built();
    // The file it names exists, outside the model: it is refused for where it is.
    ws.write(
        "outside.safetensors",
        safetensors_bytes(&[t("model.norm.weight", &[4], 3)], Dtype::F32),
    );
    shard_base(
        &ws,
        |map| {
            map.insert("model.norm.weight".into(), "../outside.safetensors".into());
        },
        Vec::new(),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn index_without_weight_map() {
    let ws = built();
    shard_base(&ws, |_| {}, Vec::new());
    ws.write(
        "base/model.safetensors.index.json",
        "{\"metadata\": {}, \"weights\": {}}",
    );
    assert_snapshot!(refused(&ws, GOOD));
}

// --- config.json and adapter_config.json ------------------------------------------------------

#[test]
fn base_config_missing() {
    let ws = built();
    std::fs::remove_file(ws.path("base/config.json")).unwrap();
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn base_config_is_not_json() {
    let ws = built();
    ws.write("base/config.json", "{\"model_type\": \"llama\",");
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn base_config_is_not_an_object() {
    let ws = built();
    ws.write("base/config.json", "[\"llama\"]");
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn base_config_over_100_mb() {
    // Sparse: the size is refused before anything is read.
    let ws = built();
    let file = std::fs::File::create(ws.path("base/config.json")).unwrap();
    file.set_len(100_000_001).unwrap();
    drop(file);
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn adapter_config_missing() {
    let ws = built();
    std::fs::remove_file(ws.path("lora/adapter_config.json")).unwrap();
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn adapter_config_is_not_json() {
    let ws = built();
    ws.write("lora/adapter_config.json", "{r: 2}");
    assert_snapshot!(refused(&ws, GOOD));
}

/// The good adapter with `config` over its adapter_config.json.
fn adapter_config(ws: &Workspace, config: serde_json::Value) {
    let path = ws.path("lora/adapter_config.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (key, v) in config.as_object().unwrap() {
        value[key] = v.clone();
    }
    ws.write("lora/adapter_config.json", value.to_string());
}

#[test]
fn rank_is_a_string() {
    let ws = built();
    adapter_config(&ws, json!({"r": "2"}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn alpha_is_a_list() {
    let ws = built();
    adapter_config(&ws, json!({"lora_alpha": [4]}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn dora_flag_is_a_string() {
    // Read as "not DoRA", this would fuse a DoRA adapter as a plain LoRA.
    let ws = built();
    adapter_config(&ws, json!({"use_dora": "yes"}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn rank_pattern_is_fractional() {
    let ws = built();
    adapter_config(&ws, json!({"rank_pattern": {"q_proj": 2.5}}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn target_modules_is_a_number() {
    let ws = built();
    adapter_config(&ws, json!({"target_modules": 7}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn rank_differs_from_the_tensors() {
    let ws = built();
    adapter_config(&ws, json!({"r": 16}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn target_modules_match_none_of_the_adapters_weights() {
    let ws = built();
    adapter_config(&ws, json!({"target_modules": ["o_proj", "gate_proj"]}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn target_modules_pattern_matches_none_of_the_adapters_weights() {
    let ws = built();
    adapter_config(&ws, json!({"target_modules": ".*\\.mlp\\..*"}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn target_modules_match_nothing_in_the_base() {
    let ws = built();
    let module = "model.layers.0.self_attn.o_proj";
    adapter_of(
        &ws,
        "lora",
        &[
            t(&lora_key(module, "A"), &[2, 4], 1),
            t(&lora_key(module, "B"), &[4, 2], 2),
        ],
        json!({"target_modules": ["o_proj"]}),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

// --- tensors ----------------------------------------------------------------------------------

#[test]
fn nan_in_an_adapter() {
    let ws = built();
    let mut a = t(&lora_key(Q0, "A"), &[2, 4], 1);
    a.values[5] = f32::NAN;
    adapter_of(
        &ws,
        "lora",
        &[a, t(&lora_key(Q0, "B"), &[4, 2], 2)],
        json!({}),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn infinity_in_a_bf16_adapter() {
    let ws = built();
    let mut b = t(&lora_key(Q0, "B"), &[4, 2], 2);
    b.values[7] = f32::NEG_INFINITY;
    ws.write(
        "lora/adapter_model.safetensors",
        safetensors_bytes(&[t(&lora_key(Q0, "A"), &[2, 4], 1), b], Dtype::BF16),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn lora_ranks_disagree() {
    let ws = built();
    adapter_of(
        &ws,
        "lora",
        &[
            t(&lora_key(Q0, "A"), &[2, 4], 1),
            t(&lora_key(Q0, "B"), &[4, 3], 2),
        ],
        json!({}),
    );
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn lora_a_without_b() {
    let ws = built();
    adapter_of(&ws, "lora", &[t(&lora_key(Q0, "A"), &[2, 4], 1)], json!({}));
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn adapter_without_tensors() {
    let ws = built();
    ws.write("lora/adapter_model.safetensors", raw_safetensors("{}", &[]));
    assert_snapshot!(refused(&ws, GOOD));
}

// --- files ------------------------------------------------------------------------------------

#[test]
fn base_with_only_pickled_weights() {
    let ws = built();
    std::fs::remove_file(ws.path("base/model.safetensors")).unwrap();
    // The pickle protocol-2 header: modelforge must refuse it by name, never open it.
    ws.write("base/pytorch_model.bin", b"\x80\x02}q\x00.");
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn adapter_weights_are_a_directory() {
    let ws = built();
    std::fs::remove_file(ws.path("lora/adapter_model.safetensors")).unwrap();
    std::fs::create_dir(ws.path("lora/adapter_model.safetensors")).unwrap();
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn base_config_is_a_directory() {
    let ws = built();
    std::fs::remove_file(ws.path("base/config.json")).unwrap();
    std::fs::create_dir(ws.path("base/config.json")).unwrap();
    assert_snapshot!(refused(&ws, GOOD));
}

#[test]
fn unreadable_adapter_weights() {
    use std::os::unix::fs::PermissionsExt;
    let ws = built();
    let path = ws.path("lora/adapter_model.safetensors");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&path).is_err() {
        let stderr = refused_special(&ws, GOOD);
        assert!(stderr.contains("Permission denied"), "{stderr}");
        assert!(stderr.contains("chmod a+r"), "{stderr}");
        return;
    }
    // Root reads files of mode 000, so the build runs as `nobody` (65534), for whom the
    // workspace is opened up but the adapter's weights stay unreadable.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "reads mode 000 without being root"
    );
    open_up(&ws.path(""));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    ws.write("recipe.toml", GOOD);
    let before = ws.snapshot_tree();
    let mut command = ws.command(&["build", "recipe.toml"]);
    // SAFETY: between fork and exec this only calls async-signal-safe functions.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the build read a file of mode 000");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains("chmod a+r"), "{stderr}");
    assert_eq!(before, ws.snapshot_tree(), "a failed build changed files");
    assert_eq!(ws.leftovers(), Vec::<std::path::PathBuf>::new());
}

/// Makes everything under `dir` readable and writable by every user (folders searchable).
fn open_up(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir).unwrap();
    let mode = if meta.is_dir() { 0o777 } else { 0o666 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            open_up(&entry.unwrap().path());
        }
    }
}

#[test]
fn adapter_weights_are_a_symlink_loop() {
    let ws = built();
    let path = ws.path("lora/adapter_model.safetensors");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("adapter_model.safetensors", &path).unwrap();
    assert_snapshot!(refused_special(&ws, GOOD));
}

#[test]
fn base_directory_is_a_symlink_loop() {
    let ws = built();
    std::os::unix::fs::symlink("loop", ws.path("loop")).unwrap();
    assert_snapshot!(refused_special(&ws, &GOOD.replace("\"base\"", "\"loop\"")));
}

#[test]
fn base_weights_are_a_named_pipe() {
    // Opening a pipe for reading waits for a writer: the build must refuse it without opening.
    let ws = built();
    let path = ws.path("base/model.safetensors");
    std::fs::remove_file(&path).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    assert_snapshot!(refused_special(&ws, GOOD));
}

// --- recipes ----------------------------------------------------------------------------------

/// Runs `refused` and checks that it took less than `limit` (debug builds of the binary).
fn refused_within(ws: &Workspace, recipe: &str, limit: Duration) -> String {
    let start = Instant::now();
    let stderr = refused(ws, recipe);
    let took = start.elapsed();
    assert!(took < limit, "took {took:?}");
    stderr
}

#[test]
fn ten_megabytes_of_comments() {
    let ws = built();
    let comments = "# a comment line that goes on for a while, to fill ten megabytes\n"
        .repeat(10_000_000 / 64);
    let recipe = format!("{comments}{GOOD}\n[build]\ndevice = \"tpu\"\n");
    assert_snapshot!(refused_within(&ws, &recipe, Duration::from_secs(10)));
}

#[test]
fn a_hundred_thousand_adapters() {
    let ws = built();
    let recipe = format!(
        "{GOOD}{}[[adapter]]\npath = \"missing\"\n",
        "[[adapter]]\npath = \"lora\"\nweight = 0.5\n".repeat(100_000)
    );
    assert_snapshot!(refused_within(&ws, &recipe, Duration::from_secs(10)));
}

#[test]
fn values_nested_ten_thousand_deep() {
    let ws = built();
    let recipe = GOOD.replace(
        "path = \"lora\"",
        // One bracket a line, so that the diagnostic quotes a few short lines.
        &format!(
            "path = \"lora\"\nweight = {}1{}",
            "[\n".repeat(10_000),
            "]\n".repeat(10_000)
        ),
    );
    assert_snapshot!(refused_within(&ws, &recipe, Duration::from_secs(10)));
}

#[test]
fn tables_nested_ten_thousand_deep() {
    let ws = built();
    let recipe = format!("{GOOD}\n[build.{}x]\ny = 1\n", "x.".repeat(10_000));
    assert_snapshot!(refused_within(&ws, &recipe, Duration::from_secs(10)));
}

#[test]
fn recipe_over_the_size_limit() {
    let ws = built();
    let recipe = format!("{GOOD}{}", "#\n".repeat(9 << 20));
    assert_snapshot!(refused_within(&ws, &recipe, Duration::from_secs(10)));
}

#[test]
fn recipe_is_not_utf8() {
    let ws = built();
    ws.write("recipe.toml", b"[base]\npath = \"b\xffse\"\n");
    let before = ws.snapshot_files();
    let stderr = ws.fail(&["build", "recipe.toml"]);
    assert_eq!(before, ws.snapshot_files());
    assert_snapshot!(stderr);
}

#[test]
fn recipe_is_a_directory() {
    let ws = built();
    std::fs::create_dir(ws.path("recipes.toml")).unwrap();
    let before = ws.snapshot_files();
    let stderr = ws.fail(&["build", "recipes.toml"]);
    assert_eq!(before, ws.snapshot_files());
    assert_snapshot!(stderr);
}

#[test]
fn layer_number_past_usize() {
    let ws = built();
    let recipe = GOOD.replace(
        "path = \"lora\"",
        "path = \"lora\"\nweight = [ { layers = \"18446744073709551615\", value = 0.5 } ]",
    );
    assert_snapshot!(refused(&ws, &recipe));
}

#[test]
fn empty_module_name() {
    let ws = built();
    let recipe = GOOD.replace(
        "path = \"lora\"",
        "path = \"lora\"\nweight = [ { modules = [\"\"], value = 0.5 } ]",
    );
    assert_snapshot!(refused(&ws, &recipe));
}

// --- outputs ----------------------------------------------------------------------------------

#[test]
fn output_over_the_base() {
    let ws = built();
    assert_snapshot!(refused(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"base\"")
    ));
}

#[test]
fn output_holding_the_recipe() {
    let ws = built();
    assert_snapshot!(refused(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \".\"")
    ));
}

#[test]
fn output_inside_an_adapter() {
    let ws = built();
    assert_snapshot!(refused(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"lora/fused\"")
    ));
}

#[test]
fn output_through_a_link_to_the_base() {
    let ws = built();
    std::os::unix::fs::symlink(ws.path("base"), ws.path("alias")).unwrap();
    assert_snapshot!(refused(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"alias/fused\"")
    ));
}

#[test]
fn output_over_its_own_adapter_output() {
    let ws = built();
    assert_snapshot!(refused(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"out\"\nadapter = \"out/lora\"")
    ));
}

#[test]
fn output_over_the_cache() {
    let ws = built();
    assert!(ws.path("cache/v1/objects").is_dir());
    assert_snapshot!(refused(
        &ws,
        &GOOD.replace("path = \"out\"", "path = \"cache\"")
    ));
    assert_snapshot!(
        "output_inside_the_cache",
        refused(
            &ws,
            &GOOD.replace("path = \"out\"", "path = \"cache/v1/fused\"")
        )
    );
}

// --- non-finite values, and the opt-out -------------------------------------------------------

#[test]
fn nan_in_an_adapter_is_fused_when_allowed() {
    let ws = built();
    let mut a = t(&lora_key(Q0, "A"), &[2, 4], 1);
    a.values[5] = f32::NAN;
    adapter_of(
        &ws,
        "lora",
        &[a, t(&lora_key(Q0, "B"), &[4, 2], 2)],
        json!({}),
    );
    // The result holds the NaN too, so one flag lets both through.
    ws.ok(&["build", "recipe.toml", "--quiet", "--allow-non-finite"]);
    let out = crate::support::read_f32(&ws.path("out/model.safetensors"));
    let q = &out[&format!("{Q0}.weight")].1;
    // A's element 5 is row 1, column 1: every row of B·A has a NaN in column 1.
    assert!((0..4).all(|row| q[row * 4 + 1].is_nan()), "{q:?}");
    assert!(q.iter().filter(|v| v.is_nan()).count() == 4, "{q:?}");
}

#[test]
fn a_result_that_overflows_its_dtype() {
    let ws = built();
    // Finite inputs, but a weight that takes the fused q_proj past f16's largest value.
    let recipe = GOOD
        .replace("path = \"lora\"", "path = \"lora\"\nweight = 1e9")
        .replace("path = \"out\"", "path = \"out\"\ndtype = \"f16\"");
    ws.write("recipe.toml", &recipe);
    let (out_before, lock_before) = (
        std::fs::read(ws.path("out/model.safetensors")).unwrap(),
        std::fs::read(ws.path("recipe.lock")).unwrap(),
    );
    // The tensors computed before the bad one are sound and stay cached; nothing is written.
    assert_snapshot!(ws.fail(&["build", "recipe.toml"]));
    assert_eq!(
        out_before,
        std::fs::read(ws.path("out/model.safetensors")).unwrap()
    );
    assert_eq!(lock_before, std::fs::read(ws.path("recipe.lock")).unwrap());
    assert_eq!(ws.leftovers(), Vec::<std::path::PathBuf>::new());
    // The refused tensor's bytes never became an object.
    assert_eq!(ws.unreferenced_objects(), Vec::<std::path::PathBuf>::new());
    ws.ok(&["cache", "verify"]);
    ws.ok(&["build", "recipe.toml", "--quiet", "--allow-non-finite"]);
    let bytes = std::fs::read(ws.path("out/model.safetensors")).unwrap();
    let out = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let q = out.tensor(&format!("{Q0}.weight")).unwrap();
    assert_eq!(q.dtype(), Dtype::F16);
    let infinite = q
        .data()
        .chunks(2)
        .filter(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7fff == 0x7c00)
        .count();
    assert!(infinite > 0);
}
