use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A temporary workspace holding recipes, models and adapters.
pub struct Workspace {
    dir: tempfile::TempDir,
}

/// A tensor to write: name, shape, values (f32; written as `dtype`).
pub struct T {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Deterministic values in [-0.5, 0.5) from a seed (an LCG; the test only needs variety).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

pub fn t(name: &str, shape: &[usize], seed: u64) -> T {
    T {
        name: name.into(),
        shape: shape.to_vec(),
        values: values(seed, shape.iter().product()),
    }
}

/// The tensors of a two-layer LLaMA-like model of width `hidden`, vocabulary 16.
pub fn llama_tensors(hidden: usize, layers: usize) -> Vec<T> {
    let mut tensors = vec![
        t("model.embed_tokens.weight", &[16, hidden], 1),
        t("lm_head.weight", &[16, hidden], 2),
        t("model.norm.weight", &[hidden], 3),
    ];
    for layer in 0..layers {
        let p = format!("model.layers.{layer}");
        let seed = 10 + layer as u64 * 10;
        tensors.push(t(
            &format!("{p}.self_attn.q_proj.weight"),
            &[hidden, hidden],
            seed,
        ));
        tensors.push(t(
            &format!("{p}.self_attn.v_proj.weight"),
            &[hidden, hidden],
            seed + 1,
        ));
        tensors.push(t(
            &format!("{p}.mlp.up_proj.weight"),
            &[2 * hidden, hidden],
            seed + 2,
        ));
        tensors.push(t(
            &format!("{p}.input_layernorm.weight"),
            &[hidden],
            seed + 3,
        ));
    }
    tensors
}

pub fn safetensors_bytes(tensors: &[T], dtype: Dtype) -> Vec<u8> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), encode(&t.values, dtype), t.shape.clone()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(name, bytes, shape)| {
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // bf16 by truncation: fixtures only need to be valid bf16, not rounded.
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect(),
        other => panic!("fixtures do not write {other}"),
    }
}

/// A safetensors file from a header written by hand and its data bytes, for files that the
/// `safetensors` crate would refuse to write.
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Reads every tensor of a safetensors file as f32 (F32 only).
pub fn read_f32(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

impl Workspace {
    pub fn new() -> Self {
        Workspace {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    /// A LLaMA-shaped model directory.
    pub fn model(&self, rel: &str, hidden: usize, dtype: Dtype) {
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "num_hidden_layers": 2,
            "torch_dtype": if dtype == Dtype::F32 { "float32" } else { "bfloat16" },
        });
        self.write(
            &format!("{rel}/config.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        );
        self.write(
            &format!("{rel}/generation_config.json"),
            "{\"do_sample\": false}\n",
        );
        self.write(
            &format!("{rel}/model.safetensors"),
            safetensors_bytes(&llama_tensors(hidden, 2), dtype),
        );
    }

    /// A PEFT LoRA adapter with rank `r` on `modules` (paths without `.weight`, with their
    /// (out, in) shapes); `config` is merged into the default adapter_config.json.
    pub fn adapter(
        &self,
        rel: &str,
        modules: &[(&str, usize, usize)],
        r: usize,
        config: serde_json::Value,
    ) {
        // As PEFT writes it: the modules' last names, once each.
        let mut targets: Vec<&str> = modules
            .iter()
            .map(|(m, _, _)| m.rsplit('.').next().unwrap_or(m))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        let mut base = serde_json::json!({
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 2 * r,
            "target_modules": targets,
            "base_model_name_or_path": "tiny-llama",
        });
        if let (Some(base), Some(extra)) = (base.as_object_mut(), config.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        self.write(
            &format!("{rel}/adapter_config.json"),
            serde_json::to_vec_pretty(&base).unwrap(),
        );
        let mut tensors = Vec::new();
        for (i, (module, out, inp)) in modules.iter().enumerate() {
            let seed = 1000 + i as u64 * 2 + rel.len() as u64 * 100;
            tensors.push(t(
                &format!("base_model.model.{module}.lora_A.weight"),
                &[r, *inp],
                seed,
            ));
            tensors.push(t(
                &format!("base_model.model.{module}.lora_B.weight"),
                &[*out, r],
                seed + 1,
            ));
        }
        self.write(
            &format!("{rel}/adapter_model.safetensors"),
            safetensors_bytes(&tensors, Dtype::F32),
        );
    }

    /// Runs `modelforge ARGS` in the workspace with a fixed, colourless environment.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `modelforge ARGS` in the workspace's fixed environment, to be started by the caller.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_modelforge"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .env("LANG", "C.UTF-8")
            .env("TERM", "xterm")
            .env("COLUMNS", "100")
            // No remote cache, whatever `modelforge.toml` lies above the workspace.
            .env("MODELFORGE_REMOTE", "");
        command
    }

    /// Runs a build that must fail, and returns its stderr with the workspace's path masked.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "expected failure, got success: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.replace(&self.dir.path().display().to_string(), "[WS]")
    }

    /// Runs a command that must succeed and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every file under the workspace with its contents' digest, to show a failure changed nothing.
    pub fn snapshot_files(&self) -> Vec<(PathBuf, blake3::Hash)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, blake3::Hash)>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for path in entries {
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    let hash = blake3::hash(&std::fs::read(&path).unwrap());
                    out.push((path, hash));
                }
            }
        }
        let mut files = Vec::new();
        walk(self.dir.path(), &mut files);
        files
    }

    /// What an interrupted or failed build could leave behind: staging directories
    /// (`.NAME.modelforge-tmp-PID`) and anything in a `tmp` folder (the cache's).
    pub fn leftovers(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, in_tmp: bool, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if in_tmp || name.contains(".modelforge-tmp-") || name.ends_with(".tmp") {
                    out.push(path.clone());
                }
                // Not through symbolic links: fixtures make loops on purpose.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, in_tmp || name == "tmp", out);
                }
            }
        }
        let mut found = Vec::new();
        walk(self.dir.path(), false, &mut found);
        found.sort();
        found
    }

    /// Cache objects no action refers to, in every cache under the workspace: what a build
    /// that failed half-way through a tensor must not leave.
    pub fn unreferenced_objects(&self) -> Vec<PathBuf> {
        fn files(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => files(&entry.path(), out),
                    Ok(t) if t.is_file() => out.push(entry.path()),
                    _ => {}
                }
            }
        }
        fn caches(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                if path.join("objects").is_dir() && path.join("actions").is_dir() {
                    out.push(path);
                } else {
                    caches(&path, out);
                }
            }
        }
        let mut roots = Vec::new();
        caches(self.dir.path(), &mut roots);
        let mut unreferenced = Vec::new();
        for root in roots {
            let (mut actions, mut objects) = (Vec::new(), Vec::new());
            files(&root.join("actions"), &mut actions);
            files(&root.join("objects"), &mut objects);
            let referenced: std::collections::HashSet<String> = actions
                .iter()
                .filter_map(|a| {
                    let entry: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(a).ok()?).ok()?;
                    // A result inside an output shard names the shard's object.
                    let object = match entry.get("within") {
                        Some(within) => &within["object"],
                        None => &entry["tensor"],
                    };
                    Some(object.as_str()?.to_owned())
                })
                .collect();
            unreferenced.extend(objects.into_iter().filter(|o| {
                !o.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| referenced.contains(n))
            }));
        }
        unreferenced.sort();
        unreferenced
    }

    /// Like `snapshot_files`, for workspaces holding what it cannot read: symbolic links are
    /// recorded by their target and not followed (fixtures make loops), other special files
    /// (named pipes) and unreadable files by their kind.
    pub fn snapshot_tree(&self) -> Vec<(PathBuf, String)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for path in entries {
                let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
                if kind.is_symlink() {
                    let target = std::fs::read_link(&path).unwrap();
                    out.push((path, format!("-> {}", target.display())));
                } else if kind.is_dir() {
                    walk(&path, out);
                } else if !kind.is_file() {
                    out.push((path, "special".into()));
                } else {
                    let digest = std::fs::read(&path)
                        .map(|bytes| blake3::hash(&bytes).to_string())
                        .unwrap_or_else(|e| format!("unreadable: {e}"));
                    out.push((path, digest));
                }
            }
        }
        let mut files = Vec::new();
        walk(self.dir.path(), &mut files);
        files
    }
}

/// The recipe the fault tests start from: the `base` and `lora` of [`Workspace::with_lora`].
pub const GOOD: &str =
    "[base]\npath = \"base\"\n\n[[adapter]]\npath = \"lora\"\n\n[output]\npath = \"out\"\n";

impl Workspace {
    /// A base of width 4 and an adapter (`lora`) on both layers' q_proj and v_proj.
    pub fn with_lora() -> Workspace {
        let ws = Workspace::new();
        ws.model("base", 4, Dtype::F32);
        let modules: Vec<String> = (0..2)
            .flat_map(|l| ["q_proj", "v_proj"].map(|m| format!("model.layers.{l}.self_attn.{m}")))
            .collect();
        let modules: Vec<(&str, usize, usize)> =
            modules.iter().map(|m| (m.as_str(), 4, 4)).collect();
        ws.adapter("lora", &modules, 2, serde_json::json!({}));
        ws
    }

    /// Builds `recipe`, which must fail, change no file and leave no temporary directory;
    /// returns the diagnostic with the workspace's path masked.
    pub fn refuse(&self, recipe: &str) -> String {
        self.write("recipe.toml", recipe);
        let before = self.snapshot_files();
        let stderr = self.fail(&["build", "recipe.toml"]);
        assert_eq!(
            before,
            self.snapshot_files(),
            "a failed build changed or created files"
        );
        assert_eq!(self.leftovers(), Vec::<std::path::PathBuf>::new());
        stderr
    }
}
