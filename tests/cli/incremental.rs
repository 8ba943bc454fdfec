use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Value};

use crate::support::Workspace;

const QS: [(&str, usize, usize); 2] = [
    ("model.layers.0.self_attn.q_proj", 4, 4),
    ("model.layers.1.self_attn.q_proj", 4, 4),
];
const VS: [(&str, usize, usize); 2] = [
    ("model.layers.0.self_attn.v_proj", 4, 4),
    ("model.layers.1.self_attn.v_proj", 4, 4),
];

/// A base and two adapters on disjoint modules: `a` on the q projections, `b` on the v ones.
fn workspace(b_weight: f64) -> Workspace {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    ws.adapter("a", &QS, 2, json!({}));
    ws.adapter("b", &VS, 2, json!({}));
    write_recipe(&ws, b_weight);
    ws
}

fn write_recipe(ws: &Workspace, b_weight: f64) {
    ws.write(
        "recipe.toml",
        format!("[base]\npath = \"base\"\n[[adapter]]\npath = \"a\"\n[[adapter]]\npath = \"b\"\nweight = {b_weight:?}\n[output]\npath = \"out\"\n"),
    );
}

fn build(ws: &Workspace, extra: &[&str]) -> Value {
    let mut args = vec!["build", "recipe.toml", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&ws.ok(&args)).unwrap()
}

fn nodes(summary: &Value) -> (u64, u64, u64) {
    let n = &summary["nodes"];
    (
        n["computed"].as_u64().unwrap(),
        n["reused"].as_u64().unwrap(),
        n["copied"].as_u64().unwrap(),
    )
}

fn read(ws: &Workspace, rel: &str) -> Vec<u8> {
    std::fs::read(ws.path(rel)).unwrap()
}

#[test]
fn an_unchanged_build_does_nothing() {
    let ws = workspace(0.5);
    let first = build(&ws, &[]);
    assert_eq!(nodes(&first), (4, 0, 7));
    let lock = read(&ws, "recipe.lock");
    let second = build(&ws, &[]);
    assert_eq!(second["up_to_date"], true);
    assert_eq!(nodes(&second), (0, 4, 7));
    assert_eq!(lock, read(&ws, "recipe.lock"));
}

#[test]
fn changing_one_adapter_recomputes_only_its_tensors() {
    let ws = workspace(0.5);
    build(&ws, &[]);
    let q = read(&ws, "out/model.safetensors");

    write_recipe(&ws, 0.25);
    let plan = ws.ok(&["plan", "recipe.toml"]);
    assert!(plan.contains("compute  model.layers.0.self_attn.v_proj.weight  (the weight of `b` (recipe.toml:7) went from 0.5 to 0.25)"), "{plan}");
    assert!(
        plan.contains("cached   model.layers.0.self_attn.q_proj.weight"),
        "{plan}"
    );
    assert!(
        plan.ends_with(
            "write    model.safetensors\n11 tensors: 2 to compute, 2 cached, 7 copied; 1 shard: 1 to write, 0 kept\n"
        ),
        "{plan}"
    );
    assert_eq!(nodes(&build(&ws, &[])), (2, 2, 7));
    assert_ne!(q, read(&ws, "out/model.safetensors"));

    // Replacing b's file (other values, same shapes) also touches only b's tensors.
    let b = read(&ws, "b/adapter_model.safetensors");
    ws.adapter("b", &VS, 2, json!({"lora_alpha": 3}));
    ws.adapter("bb", &VS, 2, json!({}));
    std::fs::copy(
        ws.path("bb/adapter_model.safetensors"),
        ws.path("b/adapter_model.safetensors"),
    )
    .unwrap();
    assert_ne!(b, read(&ws, "b/adapter_model.safetensors"));
    assert_eq!(nodes(&build(&ws, &[])), (2, 2, 7));

    // Going back to the first recipe and files reuses everything from the cache.
    ws.adapter("b", &VS, 2, json!({}));
    write_recipe(&ws, 0.5);
    assert_eq!(nodes(&build(&ws, &[])), (0, 4, 7));
    assert_eq!(q, read(&ws, "out/model.safetensors"));
}

#[test]
fn builds_are_byte_identical_across_caches_and_thread_counts() {
    let ws = workspace(0.5);
    let outputs = |ws: &Workspace| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(ws.path("out"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files.push(("lock".into(), read(ws, "recipe.lock")));
        files
    };
    let mut runs = Vec::new();
    for (threads, cache) in [("1", "c1"), ("2", "c2"), ("2", "c1"), ("1", "c2")] {
        let _ = std::fs::remove_dir_all(ws.path("out"));
        let status = ws
            .command(&["build", "recipe.toml", "--quiet", "--cache", cache])
            .env("RAYON_NUM_THREADS", threads)
            .status()
            .unwrap();
        assert!(status.success());
        runs.push(outputs(&ws));
    }
    assert!(
        runs.windows(2).all(|w| w[0] == w[1]),
        "cold and warm caches, 1 and 2 threads, give the same bytes"
    );
}

#[test]
fn locked_builds_fail_on_a_changed_input() {
    let ws = workspace(0.5);
    assert!(ws
        .fail(&["build", "recipe.toml", "--locked"])
        .contains("there is no lock file"));
    build(&ws, &[]);
    build(&ws, &["--locked"]);
    ws.adapter("b", &VS, 2, json!({"lora_alpha": 3}));
    insta::assert_snapshot!(ws.fail(&["build", "recipe.toml", "--locked"]));
}

#[test]
fn verify_compares_the_output_with_the_lock() {
    let ws = workspace(0.5);
    build(&ws, &[]);
    assert!(ws
        .ok(&["verify", "recipe.toml"])
        .contains("5 files match the lock"));
    let mut bytes = read(&ws, "out/model.safetensors");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    ws.write("out/model.safetensors", &bytes);
    ws.write("out/extra.txt", "x");
    let err = ws.fail(&["verify", "recipe.toml"]);
    assert!(err.contains("changed: `out/model.safetensors`"), "{err}");
    assert!(err.contains("not in the lock: `out/extra.txt`"), "{err}");
    // A rebuild notices the damage (the stat cache sees a new mtime) and restores the output.
    std::fs::remove_file(ws.path("out/extra.txt")).unwrap();
    assert_eq!(build(&ws, &[])["up_to_date"], false);
    ws.ok(&["verify", "recipe.toml"]);
}

/// `modelforge cache verify` finds every object sound; returns how many there are.
fn cache_is_sound(ws: &Workspace, cache: &str) -> u64 {
    let report: Value =
        serde_json::from_str(&ws.ok(&["cache", "verify", "--json", "--cache", cache])).unwrap();
    assert_eq!(report["bad_objects"], json!([]), "{report}");
    report["objects"].as_u64().unwrap()
}

/// The cache's entries for computed tensors, as JSON.
fn entries(ws: &Workspace, cache: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(ws.path(&format!("{cache}/v1/actions"))).unwrap() {
        for entry in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            out.push(
                serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap(),
            );
        }
    }
    out
}

#[test]
fn fused_bytes_are_written_once_the_output_shard_being_their_cache_object() {
    use std::os::unix::fs::MetadataExt;
    let ws = workspace(0.5);
    build(&ws, &[]);
    let shard = std::fs::metadata(ws.path("out/model.safetensors")).unwrap();
    let digest = blake3::hash(&read(&ws, "out/model.safetensors"))
        .to_hex()
        .to_string();
    // Every computed tensor's entry names its range in the output's shard, and the cache
    // holds that shard under a second name: one file, no copy.
    let entries = entries(&ws, "cache");
    assert_eq!(entries.len(), 4);
    for entry in &entries {
        assert_eq!(entry["within"]["object"], json!(digest), "{entry}");
    }
    let object = ws.path(&format!("cache/v1/objects/{}/{digest}", &digest[..2]));
    let meta = std::fs::metadata(&object).unwrap();
    assert_eq!((meta.ino(), meta.nlink()), (shard.ino(), 2));
    assert_eq!(cache_is_sound(&ws, "cache"), 1);
    assert_eq!(ws.unreferenced_objects(), Vec::<std::path::PathBuf>::new());
    assert!(std::fs::read_dir(ws.path("cache/v1/tmp"))
        .unwrap()
        .next()
        .is_none());

    // Removing the output leaves the cache whole: a rebuild computes nothing.
    let good = read(&ws, "out/model.safetensors");
    std::fs::remove_dir_all(ws.path("out")).unwrap();
    assert_eq!(nodes(&build(&ws, &[])), (0, 4, 7));
    assert_eq!(good, read(&ws, "out/model.safetensors"));
}

#[test]
fn results_no_shard_takes_become_objects_of_their_own() {
    let ws = workspace(0.5);
    let recipe = |weight: f64| {
        format!("[base]\npath = \"base\"\n[[adapter]]\npath = \"a\"\n[[adapter]]\npath = \"b\"\nweight = {weight:?}\n[output]\npath = \"out\"\nshard_by = \"inputs\"\n")
    };
    ws.write("recipe.toml", recipe(0.5));
    build(&ws, &[]);
    // The results go, the build record stays. With b's weight changed, the shard of the q
    // projections (a's alone) is kept, but the engine computes its tensors again and hands
    // them to a build that writes no shard of them; the v shard's are written into it.
    for gone in ["objects", "actions"] {
        std::fs::remove_dir_all(ws.path(&format!("cache/v1/{gone}"))).unwrap();
    }
    ws.write("recipe.toml", recipe(0.25));
    let again = build(&ws, &[]);
    assert_eq!(
        (again["shards_kept"].as_u64(), nodes(&again).0),
        (Some(2), 4)
    );
    let entries = entries(&ws, "cache");
    let within = entries.iter().filter(|e| e.get("within").is_some()).count();
    let own = entries.iter().filter(|e| e["tensor"].is_string()).count();
    assert_eq!((entries.len(), within, own), (4, 2, 2), "{entries:?}");
    // The q tensors' two objects and the v shard.
    assert_eq!(cache_is_sound(&ws, "cache"), 3);
    assert!(std::fs::read_dir(ws.path("cache/v1/tmp"))
        .unwrap()
        .next()
        .is_none());
    ws.write("recipe.toml", recipe(0.5));
    assert_eq!(
        nodes(&build(&ws, &[])).0,
        2,
        "b's tensors at 0.5 again; a's are cached"
    );
}

#[test]
fn a_corrupt_cache_object_is_evicted_and_recomputed() {
    let ws = workspace(0.5);
    build(&ws, &[]);
    let good = read(&ws, "out/model.safetensors");
    // One byte of a computed tensor, inside the cache object that is also the output's file
    // (as a tool rewriting the output in place would).
    let entry = &entries(&ws, "cache")[0];
    let digest = entry["within"]["object"].as_str().unwrap();
    let object = ws.path(&format!("cache/v1/objects/{}/{digest}", &digest[..2]));
    let at = entry["within"]["offset"].as_u64().unwrap() as usize;
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(&object, bytes).unwrap();
    assert_ne!(good, read(&ws, "out/model.safetensors"));
    let err = ws.fail(&["cache", "verify", "--cache", "cache"]);
    assert!(err.contains("1 object(s) in the cache"), "{err}");

    // The damaged output is rebuilt, not passed off as current; the cache's damaged object goes.
    std::fs::remove_file(ws.path("recipe.lock")).unwrap();
    let out = ws.command(&["build", "recipe.toml"]).output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not match its digest; it was evicted and is being recomputed"),
        "{stderr}"
    );
    assert_eq!(good, read(&ws, "out/model.safetensors"));
    assert_eq!(cache_is_sound(&ws, "cache"), 1);
}

#[test]
fn concurrent_builds_share_a_cache() {
    let ws = workspace(0.5);
    ws.write("other.toml", "[base]\npath = \"base\"\n[[adapter]]\npath = \"a\"\nweight = 2.0\n[output]\npath = \"other\"\n");
    let children: Vec<_> = ["recipe.toml", "recipe.toml", "other.toml", "other.toml"]
        .iter()
        .map(|recipe| ws.command(&["build", recipe, "--quiet"]).spawn().unwrap())
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let (first, other) = (
        read(&ws, "out/model.safetensors"),
        read(&ws, "other/model.safetensors"),
    );
    // The same builds, alone and with a fresh cache, give the same bytes.
    ws.ok(&["build", "recipe.toml", "--quiet", "--cache", "fresh"]);
    ws.ok(&["build", "other.toml", "--quiet", "--cache", "fresh"]);
    assert_eq!(first, read(&ws, "out/model.safetensors"));
    assert_eq!(other, read(&ws, "other/model.safetensors"));
    cache_is_sound(&ws, "cache");
}

/// A model large enough that a build takes a while (width 256), an adapter on three modules of
/// each layer, and a recipe fusing it with `weight` into `out`.
fn killable(weight: &str) -> Workspace {
    let ws = Workspace::new();
    ws.model("base", 256, Dtype::F32);
    let modules: Vec<(String, usize, usize)> = (0..2)
        .flat_map(|l| {
            [
                ("self_attn.q_proj", 256, 256),
                ("self_attn.v_proj", 256, 256),
                ("mlp.up_proj", 512, 256),
            ]
            .map(|(m, o, i)| (format!("model.layers.{l}.{m}"), o, i))
        })
        .collect();
    let modules: Vec<(&str, usize, usize)> = modules
        .iter()
        .map(|(m, o, i)| (m.as_str(), *o, *i))
        .collect();
    ws.adapter("a", &modules, 8, json!({}));
    write_killable_recipe(&ws, weight);
    ws
}

fn write_killable_recipe(ws: &Workspace, weight: &str) {
    ws.write(
        "recipe.toml",
        format!("[base]\npath = \"base\"\n[[adapter]]\npath = \"a\"\nweight = {weight}\n[output]\npath = \"out\"\n"),
    );
}

/// Every file of `out/`, by name, with its digest.
fn output_files(ws: &Workspace) -> std::collections::BTreeMap<String, blake3::Hash> {
    std::fs::read_dir(ws.path("out"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap())
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, blake3::hash(&std::fs::read(e.path()).unwrap()))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_killed_build_leaves_no_trace_but_its_cache() {
    const WEIGHTS: [&str; 3] = ["0.5", "1.0", "0.25"];
    // The complete output of each recipe, built alone in a workspace of its own.
    let complete: Vec<_> = WEIGHTS
        .iter()
        .map(|weight| {
            let ws = killable(weight);
            ws.ok(&["build", "recipe.toml", "--quiet"]);
            output_files(&ws)
        })
        .collect();

    let ws = killable("0.75");
    let started = std::time::Instant::now();
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    // 20 moments spread at random over a build's whole run (and a little past it), in builds
    // that cycle through three recipes, so that each has work to do or finds some of it cached
    // by an earlier killed build. The seed is printed so that a failure can be replayed.
    let span_ms = (started.elapsed().as_millis() as u64 * 6 / 5).max(50);
    let seed = std::env::var("MODELFORGE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill moments: MODELFORGE_KILL_SEED={seed}, over {span_ms} ms");
    let mut rng = seed | 1;
    for round in 0..20 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay_ms = rng % span_ms;
        let weight = round % WEIGHTS.len();
        write_killable_recipe(&ws, WEIGHTS[weight]);
        let before = output_files(&ws);
        let mut child = ws
            .command(&["build", "recipe.toml", "--quiet"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        // SAFETY: the child is ours and has not been waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        // The output is the previous one or the complete new one, never a mixture.
        let after = output_files(&ws);
        assert!(
            after == before || after == complete[weight],
            "round {round}, killed at {delay_ms} ms: the output is neither the previous nor the new one"
        );
        cache_is_sound(&ws, "cache");
    }
    // The engine may outlive a killed build for a moment; then the next build succeeds, and
    // gives what a clean build gives.
    std::thread::sleep(std::time::Duration::from_millis(500));
    write_killable_recipe(&ws, WEIGHTS[0]);
    ws.ok(&["build", "recipe.toml", "--quiet"]);
    assert_eq!(complete[0], output_files(&ws));
    ws.ok(&["verify", "recipe.toml"]);
    assert!(cache_is_sound(&ws, "cache") > 0);
    let leftovers: Vec<_> = std::fs::read_dir(ws.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("modelforge-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_shipped_example_has_golden_digests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ws = Workspace::new();
    for file in ["recipes/quickstart.toml"]
        .into_iter()
        .map(String::from)
        .chain(
            ["examples/tiny-llama", "examples/tiny-llama-lora"]
                .iter()
                .flat_map(|dir| {
                    std::fs::read_dir(root.join(dir))
                        .unwrap()
                        .map(move |e| format!("{dir}/{}", e.unwrap().file_name().to_string_lossy()))
                }),
        )
    {
        ws.write(&file, std::fs::read(root.join(&file)).unwrap());
    }
    ws.ok(&["build", "recipes/quickstart.toml", "--quiet"]);
    let digest = |rel: &str| blake3::hash(&read(&ws, rel)).to_hex().to_string();
    insta::assert_snapshot!(
        "quickstart_digests",
        format!(
            "model.safetensors {}\nconfig.json {}\nREADME.md {}\nquickstart.lock {}",
            digest("build/quickstart/model.safetensors"),
            digest("build/quickstart/config.json"),
            digest("build/quickstart/README.md"),
            digest("recipes/quickstart.lock"),
        )
    );
}

#[test]
fn gc_trims_the_cache_and_builds_recover() {
    let ws = workspace(0.5);
    build(&ws, &["--fsync"]);
    let stats: Value =
        serde_json::from_str(&ws.ok(&["cache", "stats", "--json", "--cache", "cache"])).unwrap();
    // The four computed tensors are ranges of one object: the output's shard, whose bytes
    // the cache shares with the output.
    assert_eq!(stats["objects"], 1);
    assert_eq!(stats["actions"], 4);
    assert_eq!(stats["shared_bytes"], stats["object_bytes"]);
    // Recently used objects survive an age limit; a size limit of one byte removes them all.
    assert!(ws
        .ok(&["gc", "--cache", "cache", "--older-than", "1d"])
        .contains("removed 0 objects"));
    assert!(ws
        .ok(&["gc", "--cache", "cache", "--max-size", "1B"])
        .contains("removed 1 objects"));
    // The output keeps its file.
    assert!(ws.path("out/model.safetensors").exists());
    let stats: Value =
        serde_json::from_str(&ws.ok(&["cache", "stats", "--json", "--cache", "cache"])).unwrap();
    assert_eq!(
        (stats["objects"].as_u64(), stats["actions"].as_u64()),
        (Some(0), Some(0))
    );
    std::fs::remove_dir_all(ws.path("out")).unwrap();
    assert_eq!(nodes(&build(&ws, &[])), (4, 0, 7));
}

/// The three shards of `shard_by = "inputs"` over `workspace`: the base's untouched tensors,
/// those `a` reaches (q) and those `b` reaches (v), as (file name, inode).
fn shards_by_input(ws: &Workspace) -> [(String, u64); 3] {
    use std::os::unix::fs::MetadataExt;
    let index: Value =
        serde_json::from_slice(&read(ws, "out/model.safetensors.index.json")).unwrap();
    let file = |tensor: &str| {
        let name = index["weight_map"][tensor].as_str().unwrap().to_owned();
        let inode = std::fs::metadata(ws.path(&format!("out/{name}")))
            .unwrap()
            .ino();
        (name, inode)
    };
    let shards = [
        file("model.norm.weight"),
        file("model.layers.1.self_attn.q_proj.weight"),
        file("model.layers.1.self_attn.v_proj.weight"),
    ];
    assert_eq!(
        file("model.layers.0.self_attn.q_proj.weight"),
        shards[1],
        "one shard per set of adapters"
    );
    let distinct: std::collections::BTreeSet<_> = shards.iter().map(|s| &s.0).collect();
    assert_eq!(distinct.len(), 3, "{shards:?}");
    shards
}

fn weights(ws: &Workspace, dir: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(ws.path(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn shards_by_input_are_rewritten_only_when_an_input_they_depend_on_changes() {
    let ws = workspace(0.5);
    let recipe = |out: &str, weight: f64| {
        format!("[base]\npath = \"base\"\n[[adapter]]\npath = \"a\"\n[[adapter]]\npath = \"b\"\nweight = {weight:?}\n[output]\npath = \"{out}\"\nshard_by = \"inputs\"\nmax_shard_size = \"1GB\"\n")
    };
    ws.write("recipe.toml", recipe("out", 0.5));
    let first = build(&ws, &[]);
    assert_eq!(first["shards_kept"], 0);
    let [base, q, v] = shards_by_input(&ws);

    // Changing b's weight: only the shard of v projections is written again.
    ws.write("recipe.toml", recipe("out", 0.25));
    let plan = ws.ok(&["plan", "recipe.toml"]);
    assert!(plan.contains(&format!("keep     {}\n", base.0)), "{plan}");
    assert!(plan.contains(&format!("write    {}\n", v.0)), "{plan}");
    assert!(plan.ends_with("3 shards: 1 to write, 2 kept\n"), "{plan}");
    let second = build(&ws, &["--fsync"]);
    assert_eq!(nodes(&second), (2, 2, 7));
    assert_eq!(second["shards_kept"], 2);
    let [base2, q2, v2] = shards_by_input(&ws);
    assert_eq!((&base, &q), (&base2, &q2), "kept: the same inodes");
    assert_eq!(v.0, v2.0);
    assert_ne!(v.1, v2.1, "the v shard is a new file");
    ws.ok(&["verify", "recipe.toml"]);

    // What was kept equals what a build from an empty cache writes.
    ws.write("fresh.toml", recipe("fresh", 0.25));
    ws.ok(&["build", "fresh.toml", "--quiet", "--cache", "fresh-cache"]);
    assert_eq!(weights(&ws, "out"), weights(&ws, "fresh"));

    // A kept shard changed on disk since it was written is not kept again: the stat cache sees
    // its new modification time, and its digest no longer matches.
    let path = ws.path(&format!("out/{}", base.0));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    ws.write("recipe.toml", recipe("out", 0.5));
    ws.write("fresh.toml", recipe("fresh", 0.5));
    let third = build(&ws, &[]);
    assert_eq!(third["shards_kept"], 1, "only the q shard");
    ws.ok(&["build", "fresh.toml", "--quiet", "--cache", "fresh-cache"]);
    assert_eq!(weights(&ws, "out"), weights(&ws, "fresh"));
    ws.ok(&["verify", "recipe.toml"]);
}

/// Inputs the cache has not seen start the engine early, to load LibTorch while they are
/// hashed; a build that then finds everything cached stops it before it reads a job, and the
/// engine says nothing.
#[test]
fn an_engine_started_early_and_not_needed_goes_quietly() {
    let ws = workspace(0.5);
    build(&ws, &[]);
    // The same bytes in a new file: the stat cache hashes it again.
    let base = read(&ws, "base/model.safetensors");
    std::fs::remove_file(ws.path("base/model.safetensors")).unwrap();
    ws.write("base/model.safetensors", &base);
    let out = ws.run(&["build", "recipe.toml", "--json"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["up_to_date"], true);
    // A recipe whose bytes are not the lock's starts its engine at once too: a comment changes
    // them and nothing else.
    let recipe = read(&ws, "recipe.toml");
    ws.write(
        "recipe.toml",
        [b"# a comment\n".as_slice(), &recipe].concat(),
    );
    let out = ws.run(&["build", "recipe.toml", "--json"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert_eq!(nodes(&serde_json::from_slice(&out.stdout).unwrap()).0, 0);
    // And when something must be computed after all, the early engine computes it.
    write_recipe(&ws, 0.25);
    std::fs::remove_file(ws.path("base/model.safetensors")).unwrap();
    ws.write("base/model.safetensors", &base);
    assert_eq!(nodes(&build(&ws, &[])), (2, 2, 7));
}

/// An engine that cannot start (its LibTorch missing, say) is heard of in the builds that need
/// it, and only in them: the early start of a build that computes nothing says nothing.
#[test]
fn an_engine_that_cannot_load_is_heard_of_only_when_needed() {
    use std::os::unix::fs::PermissionsExt;
    let ws = workspace(0.5);
    build(&ws, &[]);
    let fake = ws.path("fake-engine");
    ws.write(
        "fake-engine",
        "#!/bin/sh\necho 'fake-engine: error while loading shared libraries: libtorch_cpu.so' >&2\nexit 127\n",
    );
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = || {
        ws.command(&["build", "recipe.toml", "--json"])
            .env("MODELFORGE_ENGINE", &fake)
            .output()
            .unwrap()
    };
    // A recipe whose bytes are not the lock's starts the engine at once; nothing is computed.
    let recipe = read(&ws, "recipe.toml");
    ws.write(
        "recipe.toml",
        [b"# a comment\n".as_slice(), &recipe].concat(),
    );
    let out = run();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // Something to compute: the build fails, and the engine's own words are there.
    write_recipe(&ws, 0.25);
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("libtorch_cpu.so"), "{stderr}");
    assert!(stderr.contains("its own message is above"), "{stderr}");
}

#[test]
fn a_reader_that_stops_reading_is_no_error_and_a_full_disk_is_one() {
    let ws = workspace(0.5);
    build(&ws, &[]);
    // `plan … | head -1`: the reader goes after the first line.
    let mut plan = ws.command(&["plan", "recipe.toml"]);
    let mut child = plan
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("modelforge starts");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("modelforge runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // `plan … > /dev/full`: said once, and the command fails.
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let output = ws
        .command(&["plan", "recipe.toml"])
        .stdout(full)
        .output()
        .expect("modelforge runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        stderr.matches("cannot write to standard output").count(),
        1,
        "{stderr}"
    );
}
