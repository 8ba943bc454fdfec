use insta::assert_snapshot;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::support::Workspace;

/// A base and one adapter, built into `out/` with the workspace's default cache (`cache/`), in
/// a workspace whose `modelforge.toml` names a shared folder as the remote cache.
fn workspace() -> Workspace {
    let ws = Workspace::new();
    ws.model("base", 4, Dtype::F32);
    ws.adapter(
        "a",
        &[("model.layers.0.self_attn.q_proj", 4, 4)],
        2,
        json!({}),
    );
    ws.write(
        "recipe.toml",
        "[base]\npath = \"base\"\n[[adapter]]\npath = \"a\"\n[output]\npath = \"out\"\n",
    );
    let shared = ws.path("shared");
    ws.write(
        "modelforge.toml",
        format!("[remote]\nurl = \"file://{}\"\n", shared.display()),
    );
    ws
}

fn build(ws: &Workspace, extra: &[&str], env: &[(&str, &str)]) -> Value {
    let mut command = ws.command(&[&["build", "recipe.toml", "--json"], extra].concat());
    command
        .env_remove("MODELFORGE_REMOTE")
        .envs(env.iter().copied());
    let out = command.output().expect("modelforge runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Starting again on another machine: no cache, no output, no lock.
fn forget(ws: &Workspace) {
    for dir in ["cache", "out"] {
        std::fs::remove_dir_all(ws.path(dir)).unwrap();
    }
    std::fs::remove_file(ws.path("recipe.lock")).unwrap();
}

#[test]
fn the_workspace_settings_name_the_remote_cache() {
    let ws = workspace();
    let pushed = build(&ws, &["--push"], &[]);
    assert_eq!(pushed["nodes"]["computed"], 1);
    assert!(
        pushed["pushed"]["objects"].as_u64().unwrap() > 0,
        "{pushed}"
    );

    // Another machine with the same workspace pulls instead of computing, and writes nothing.
    forget(&ws);
    let pulled = build(&ws, &[], &[]);
    assert_eq!(pulled["nodes"]["computed"], 0, "{pulled}");
    assert_eq!(pulled["pulled"]["objects"], 1, "{pulled}");
    assert!(pulled.get("pushed").is_none(), "{pulled}");

    // An empty MODELFORGE_REMOTE turns it off; `--remote` and MODELFORGE_REMOTE come first.
    forget(&ws);
    let alone = build(&ws, &[], &[("MODELFORGE_REMOTE", "")]);
    assert_eq!(alone["nodes"]["computed"], 1, "{alone}");
    assert!(alone.get("pulled").is_none(), "{alone}");
    forget(&ws);
    let elsewhere = format!("file://{}", ws.path("elsewhere").display());
    let other = build(&ws, &["--remote", &elsewhere], &[]);
    assert_eq!(other["nodes"]["computed"], 1, "{other}");
    assert_eq!(other["pulled"]["objects"], 0, "{other}");
}

#[test]
fn settings_that_are_not_understood_are_a_diagnostic() {
    let ws = workspace();
    ws.write(
        "modelforge.toml",
        "[remote]\nurl = \"s3://team/models\"\npush = true\n",
    );
    assert_snapshot!(fail(&ws));
    ws.write("modelforge.toml", "[remote]\nurl = 3\n");
    assert_snapshot!(fail(&ws));
    // A path in a `file://` address must be absolute: relative to what, on another machine?
    ws.write("modelforge.toml", "[remote]\nurl = \"file://shared\"\n");
    assert_snapshot!(fail(&ws));
}

fn fail(ws: &Workspace) -> String {
    let out = ws
        .command(&["build", "recipe.toml"])
        .env_remove("MODELFORGE_REMOTE")
        .output()
        .expect("modelforge runs");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).replace(&ws.path("").display().to_string(), "[WS]/")
}

#[test]
fn the_settings_are_looked_for_above_the_recipe_itself_not_its_path_text() {
    // `c/` has settings naming a remote; the recipe lies in `b/`, reached from `c/` as
    // `../b`: `c/` is not above it, though `c/../b`'s text is.
    let ws = workspace();
    std::fs::create_dir_all(ws.path("c")).unwrap();
    std::fs::rename(ws.path("modelforge.toml"), ws.path("c/modelforge.toml")).unwrap();
    std::fs::create_dir_all(ws.path("b")).unwrap();
    for name in ["base", "a", "recipe.toml"] {
        std::fs::rename(ws.path(name), ws.path(&format!("b/{name}"))).unwrap();
    }
    let out = ws
        .command(&["build", "../b/recipe.toml", "--json"])
        .env_remove("MODELFORGE_REMOTE")
        .current_dir(ws.path("c"))
        .output()
        .expect("modelforge runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary.get("pulled").is_none(), "{summary}");
    assert!(
        !ws.path("shared").exists(),
        "the remote of `c/` was not used"
    );
}
