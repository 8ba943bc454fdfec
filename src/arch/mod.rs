//! Architecture schemas, as data (`arch/*.toml` at the top of the repository, compiled in, and
//! the user's `--arch FILE`s): where each role's weights live in a model of a family, and how
//! fused tensors lay out their parts. Code only computes what the data names: the row a part's
//! row lands on.
mod decoder;
mod dims;
mod error;
mod role;
mod schema;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub(crate) use decoder::{decoder, embedding, Unsupported, FAMILIES};
pub(crate) use dims::Dims;
pub(crate) use error::ArchError;
pub(crate) use role::Role;
pub(crate) use schema::Schema;
use schema::{Holds, Layout};

use modelforge_core::node::RowMap;

const BUILTIN: &[(&str, &str)] = &[
    ("arch/llama.toml", include_str!("../../arch/llama.toml")),
    ("arch/phi3.toml", include_str!("../../arch/phi3.toml")),
    (
        "arch/gpt_neox.toml",
        include_str!("../../arch/gpt_neox.toml"),
    ),
    ("arch/chatglm.toml", include_str!("../../arch/chatglm.toml")),
    (
        "arch/chatglm2.toml",
        include_str!("../../arch/chatglm2.toml"),
    ),
    ("arch/gpt2.toml", include_str!("../../arch/gpt2.toml")),
];

/// The largest schema file read: the shipped ones are under 2 kB.
const MAX_SCHEMA_LEN: u64 = 1 << 20;

/// Every schema a build knows: the user's (`--arch`), then the shipped ones. A user's schema
/// named like a shipped one replaces it.
pub(crate) struct Schemas {
    list: Vec<Schema>,
    /// The `--arch` files, whose digests the lock records.
    pub files: Vec<PathBuf>,
}

impl Schemas {
    /// The shipped schemas and the user's `files`.
    pub fn load(files: &[PathBuf]) -> Result<Schemas, ArchError> {
        let mut list = Vec::new();
        for path in files {
            let schema = read_file(path)?;
            list.retain(|s: &Schema| s.name != schema.name);
            list.push(schema);
        }
        for (path, text) in BUILTIN {
            let schema = schema::parse(path, text)
                .unwrap_or_else(|e| panic!("the shipped schema {path} is invalid: {e:?}"));
            if !list.iter().any(|s| s.name == schema.name) {
                list.push(schema);
            }
        }
        Ok(Schemas {
            list,
            files: files.to_vec(),
        })
    }

    pub fn named(&self, name: &str) -> Option<&Schema> {
        self.list.iter().find(|s| s.name == name)
    }

    /// Every name, sorted, for a diagnostic to list.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.list.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        names
    }

    /// The schema for a model's config.json: by `model_type` (with its `requires` and
    /// `excludes`), else by an `architectures` entry.
    pub fn detect(&self, config: &Map<String, Value>) -> Option<&Schema> {
        let fits = |s: &&Schema| {
            s.requires.iter().all(|k| config.contains_key(k))
                && !s.excludes.iter().any(|k| config.contains_key(k))
        };
        let model_type = config.get("model_type").and_then(Value::as_str);
        let by_type = self
            .list
            .iter()
            .filter(fits)
            .find(|s| model_type.is_some_and(|t| s.model_types.iter().any(|m| m == t)));
        by_type.or_else(|| {
            let architectures = config.get("architectures").and_then(Value::as_array)?;
            self.list.iter().filter(fits).find(|s| {
                architectures
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| s.architectures.iter().any(|m| m == a))
            })
        })
    }

    /// The schema whose tensor `tensor` is, among all.
    pub fn schema_of(&self, tensor: &str) -> Option<&Schema> {
        self.list.iter().find(|s| s.role_of(tensor).is_some())
    }
}

fn read_file(path: &Path) -> Result<Schema, ArchError> {
    let unreadable = |source| ArchError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_SCHEMA_LEN + 1),
        &mut bytes,
    )
    .map_err(unreadable)?;
    let not_text = || ArchError::NotText {
        path: path.to_owned(),
        limit: MAX_SCHEMA_LEN,
    };
    if bytes.len() as u64 > MAX_SCHEMA_LEN {
        return Err(not_text());
    }
    let text = String::from_utf8(bytes).map_err(|_| not_text())?;
    schema::parse(&path.display().to_string(), &text)
}

/// Reads schema text as `--arch` does; for the fuzz target.
pub(crate) fn parse(path: &str, text: &str) -> Result<Schema, ArchError> {
    schema::parse(path, text)
}

/// Where a role of one layer lives: a tensor, and, in a fused tensor, which of its rows.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Place {
    pub tensor: String,
    pub rows: Option<RowMap>,
    /// The role's own height, when it is a part of a fused tensor.
    pub part_rows: Option<usize>,
    /// The sum of the parts' heights: the fused tensor's height by the schema.
    pub fused_rows: Option<usize>,
    /// The tensor is stored (in × out), as GPT-2's Conv1D: rows land in its columns.
    pub transposed: bool,
}

impl Place {
    /// A tensor found by its own name.
    pub fn named(tensor: String) -> Place {
        Place {
            tensor,
            rows: None,
            part_rows: None,
            fused_rows: None,
            transposed: false,
        }
    }
}

/// `{layer}` in `template` matched against `name`: the layer index.
fn layer_in(template: &str, name: &str) -> Option<usize> {
    let (prefix, suffix) = template.split_once("{layer}")?;
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl Schema {
    /// The widths of a model of this schema.
    pub fn dims(&self, config: &Map<String, Value>) -> Option<Dims> {
        Dims::read(config, &self.config)
    }

    /// The role and layer of a tensor that holds a single role.
    pub fn role_of(&self, tensor: &str) -> Option<(Role, usize)> {
        self.tensors.iter().find_map(|t| {
            let Holds::Role(role) = &t.holds else {
                return None;
            };
            layer_in(&t.name, tensor).map(|layer| (*role, layer))
        })
    }

    /// Whether a tensor writes the residual stream (o, down) rather than reading it, when all
    /// the roles it holds (one, or every part of a fused tensor) agree.
    pub fn writes_residual(&self, tensor: &str) -> Option<bool> {
        let held = self
            .tensors
            .iter()
            .find(|t| layer_in(&t.name, tensor).is_some())?;
        let writes: Vec<bool> = match &held.holds {
            Holds::Role(role) => vec![role.writes_residual()],
            Holds::Parts { parts, .. } => parts.iter().map(|p| p.role.writes_residual()).collect(),
        };
        writes.iter().all(|w| *w == writes[0]).then_some(writes[0])
    }

    fn holds(&self, role: Role) -> bool {
        self.tensors.iter().any(|t| match &t.holds {
            Holds::Role(r) => *r == role,
            Holds::Parts { parts, .. } => parts.iter().any(|p| p.role == role),
        })
    }

    /// Whether no tensor of this schema holds `role` or its counterpart.
    pub fn has_no(&self, role: Role) -> bool {
        !self.holds(role) && !self.holds(role.counterpart().unwrap_or(role))
    }

    /// Whether placing `role` (or its counterpart) needs the model's widths: it is a part of a
    /// fused tensor.
    pub fn needs_widths(&self, role: Role) -> bool {
        let role = if self.holds(role) {
            role
        } else {
            role.counterpart().unwrap_or(role)
        };
        self.tensors.iter().any(|t| match &t.holds {
            Holds::Role(_) => false,
            Holds::Parts { parts, .. } => parts.iter().any(|p| p.role == role),
        })
    }

    /// Where `role` (or, when this schema lacks it, its counterpart) of `layer` lives in a model
    /// of this schema with widths `dims` (needed for parts of fused tensors only).
    pub fn place_of(&self, role: Role, layer: usize, dims: Option<&Dims>) -> Option<Place> {
        let role = if self.holds(role) {
            role
        } else {
            role.counterpart()?
        };
        for t in &self.tensors {
            let name = t.name.replace("{layer}", &layer.to_string());
            let (layout, parts) = match &t.holds {
                Holds::Role(r) if *r == role => {
                    return Some(Place {
                        transposed: t.transposed,
                        ..Place::named(name)
                    })
                }
                Holds::Role(_) => continue,
                Holds::Parts { layout, parts } => (layout, parts),
            };
            let Some(index) = parts.iter().position(|p| p.role == role) else {
                continue;
            };
            let dims = dims?;
            let rows = match layout {
                Layout::Stacked => RowMap::Offset {
                    offset: parts[..index].iter().map(|p| dims.rows(p.rows)).sum(),
                },
                Layout::PerHead => RowMap::PerHead {
                    parts: parts.len(),
                    part: index,
                    head_dim: dims.head_dim,
                    repeat: 1,
                },
            };
            return Some(Place {
                tensor: name,
                rows: Some(rows),
                part_rows: Some(dims.rows(parts[index].rows)),
                fused_rows: Some(parts.iter().map(|p| dims.rows(p.rows)).sum()),
                transposed: t.transposed,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        let config = serde_json::json!({"hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 12});
        let llama = schemas()
            .named("llama")
            .unwrap()
            .dims(config.as_object().unwrap());
        llama.unwrap()
    }

    fn schemas() -> Schemas {
        Schemas::load(&[]).unwrap()
    }

    #[test]
    fn the_shipped_schemas_parse_and_place_roles() {
        let schemas = schemas();
        let llama = schemas.named("llama").unwrap();
        assert_eq!(
            llama.role_of("model.layers.3.self_attn.k_proj.weight"),
            Some((Role::AttnK, 3))
        );
        let phi3 = schemas.named("phi3").unwrap();
        let k = phi3.place_of(Role::AttnK, 1, Some(&dims())).unwrap();
        assert_eq!(k.tensor, "model.layers.1.self_attn.qkv_proj.weight");
        assert_eq!(k.rows, Some(RowMap::Offset { offset: 8 }));
        assert_eq!(k.part_rows, Some(4));
        assert_eq!(k.fused_rows, Some(16));
        let up = phi3.place_of(Role::MlpUp, 0, Some(&dims())).unwrap();
        assert_eq!(up.rows, Some(RowMap::Offset { offset: 12 }));
        let neox = schemas.named("gpt_neox").unwrap();
        let v = neox.place_of(Role::AttnV, 0, Some(&dims())).unwrap();
        assert_eq!(
            v.rows,
            Some(RowMap::PerHead {
                parts: 3,
                part: 2,
                head_dim: 2,
                repeat: 1
            })
        );
        // Head 1's row 0 of v sits after head 0's q, k, v and head 1's q and k.
        assert_eq!(v.rows.unwrap().targets(2).collect::<Vec<_>>(), [6 + 4]);
        // A grouped-query head serving two query heads fills both.
        let grouped = RowMap::PerHead {
            parts: 3,
            part: 1,
            head_dim: 2,
            repeat: 2,
        };
        assert_eq!(
            grouped.targets(3).collect::<Vec<_>>(),
            [2 * 6 + 2 + 1, 3 * 6 + 2 + 1]
        );
        // In a stacked layout, a source kv head serving two groups fills both, one after the
        // other: row 1 of source head 1 goes to groups 2 and 3, after the 8 rows of q.
        let stacked = RowMap::Repeated {
            offset: 8,
            head_dim: 2,
            repeat: 2,
        };
        assert_eq!(
            stacked.targets(3).collect::<Vec<_>>(),
            [8 + 4 + 1, 8 + 6 + 1]
        );
        // GPT-NeoX's non-gated MLP takes LLaMA's up and down projections as its own.
        let fc_in = neox.place_of(Role::MlpUp, 0, Some(&dims())).unwrap();
        assert_eq!(fc_in.tensor, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight");
        assert!(
            neox.place_of(Role::MlpGate, 0, Some(&dims())).is_none(),
            "GPT-NeoX has no gate"
        );
    }

    #[test]
    fn chatglm_versions_and_gpt2_are_told_apart() {
        let schemas = schemas();
        let detect = |config: serde_json::Value| {
            schemas
                .detect(config.as_object().unwrap())
                .map(|s| s.name.clone())
        };
        let v1 = serde_json::json!({"model_type": "chatglm", "position_encoding_2d": true});
        assert_eq!(detect(v1).as_deref(), Some("chatglm"));
        let v2 = serde_json::json!({"model_type": "chatglm", "multi_query_attention": true});
        assert_eq!(detect(v2).as_deref(), Some("chatglm2"));
        let by_class = serde_json::json!({"architectures": ["GPT2LMHeadModel"]});
        assert_eq!(detect(by_class).as_deref(), Some("gpt2"));
        assert_eq!(detect(serde_json::json!({"model_type": "bert"})), None);
    }

    #[test]
    fn chatglm2_reads_its_multi_query_groups() {
        let schemas = schemas();
        let glm2 = schemas.named("chatglm2").unwrap();
        let config = serde_json::json!({"hidden_size": 32, "num_attention_heads": 4, "kv_channels": 8,
            "multi_query_attention": true, "multi_query_group_num": 2, "ffn_hidden_size": 48});
        let dims = glm2.dims(config.as_object().unwrap()).unwrap();
        assert_eq!((dims.q, dims.kv, dims.intermediate), (32, 16, 48));
        let v = glm2.place_of(Role::AttnV, 0, Some(&dims)).unwrap();
        assert_eq!(v.rows, Some(RowMap::Offset { offset: 48 }));
        assert_eq!(v.fused_rows, Some(64));
        let up = glm2.place_of(Role::MlpUp, 0, Some(&dims)).unwrap();
        assert_eq!(up.rows, Some(RowMap::Offset { offset: 48 }));
        // Without multi-query attention every head has its own k and v.
        let mha = serde_json::json!({"hidden_size": 32, "num_attention_heads": 4, "kv_channels": 8,
            "multi_query_attention": false, "multi_query_group_num": 2});
        assert_eq!(glm2.dims(mha.as_object().unwrap()).unwrap().kv, 32);
    }

    #[test]
    fn gpt2_roles_are_columns_of_conv1d_weights() {
        let schemas = schemas();
        let gpt2 = schemas.named("gpt2").unwrap();
        let config = serde_json::json!({"n_embd": 8, "n_head": 2, "n_layer": 2, "n_inner": null});
        let dims = gpt2.dims(config.as_object().unwrap()).unwrap();
        assert_eq!(dims.intermediate, 32);
        let k = gpt2.place_of(Role::AttnK, 1, Some(&dims)).unwrap();
        assert_eq!(k.tensor, "transformer.h.1.attn.c_attn.weight");
        assert!(k.transposed);
        assert_eq!(k.rows, Some(RowMap::Offset { offset: 8 }));
        let fc_in = gpt2.place_of(Role::MlpUp, 0, Some(&dims)).unwrap();
        assert_eq!(fc_in.tensor, "transformer.h.0.mlp.c_fc.weight");
        assert!(fc_in.transposed);
    }

    #[test]
    fn layer_numbers_are_plain_digits() {
        assert_eq!(layer_in("a.{layer}.b", "a.12.b"), Some(12));
        assert_eq!(layer_in("a.{layer}.b", "a.+1.b"), None);
        assert_eq!(layer_in("a.{layer}.b", "a..b"), None);
    }
}
