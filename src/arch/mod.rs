//! Architecture schemas, as data (`arch/*.toml` at the top of the repository, compiled in):
//! where each role's weights live in a model of a family, and how fused tensors lay out their
//! parts. Code only computes what the data names: the row a part's row lands on.
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::exec::job::RowMap;

const BUILTIN: &[(&str, &str)] = &[
    ("arch/llama.toml", include_str!("../../arch/llama.toml")),
    ("arch/phi3.toml", include_str!("../../arch/phi3.toml")),
    (
        "arch/gpt_neox.toml",
        include_str!("../../arch/gpt_neox.toml"),
    ),
    ("arch/chatglm.toml", include_str!("../../arch/chatglm.toml")),
];

/// Roles that do the same work in gated and non-gated MLPs: a SwiGLU `up` projection lands on a
/// GELU MLP's input projection, `down` on its output one. (`gate` has no counterpart.)
const COUNTERPARTS: &[(&str, &str)] = &[("mlp.up", "mlp.fc_in"), ("mlp.down", "mlp.fc_out")];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Schema {
    pub name: String,
    /// The `model_type` values of config.json this schema describes.
    pub model_types: Vec<String>,
    /// config.json keys that must be present, to tell apart families sharing a model_type.
    #[serde(default)]
    requires: Vec<String>,
    #[serde(rename = "tensor")]
    tensors: Vec<TensorSchema>,
}

/// One per-layer tensor: `{layer}` in its name stands for the layer index. It holds one role,
/// or several `parts` laid out as `layout` says.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorSchema {
    name: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    layout: Option<Layout>,
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Layout {
    /// Parts one after the other: [Q; K; V].
    Stacked,
    /// Parts interleaved per attention head: [q_h; k_h; v_h] for each head h.
    PerHead,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    role: String,
    rows: Rows,
}

/// A part's height, from the model's config.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Rows {
    /// heads × head_dim.
    Q,
    /// kv_heads × head_dim.
    Kv,
    Intermediate,
    Hidden,
}

/// The widths of a model, read from its config.json.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    q: usize,
    kv: usize,
    intermediate: usize,
    hidden: usize,
    head_dim: usize,
}

impl Dims {
    pub fn from_config(config: &Map<String, Value>) -> Option<Dims> {
        let get = |key: &str| config.get(key).and_then(Value::as_u64).map(|v| v as usize);
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        let kv_heads = get("num_key_value_heads").unwrap_or(heads);
        let head_dim = get("head_dim").unwrap_or(hidden / heads.max(1));
        Some(Dims {
            q: heads * head_dim,
            kv: kv_heads * head_dim,
            intermediate: get("intermediate_size")
                .or_else(|| get("inner_hidden_size"))
                .or_else(|| get("ffn_hidden_size"))
                .unwrap_or(4 * hidden),
            hidden,
            head_dim,
        })
    }

    fn rows(&self, rows: Rows) -> usize {
        match rows {
            Rows::Q => self.q,
            Rows::Kv => self.kv,
            Rows::Intermediate => self.intermediate,
            Rows::Hidden => self.hidden,
        }
    }
}

/// Where a role of one layer lives: a tensor, and, in a fused tensor, which of its rows.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Place {
    pub tensor: String,
    pub rows: Option<RowMap>,
    /// The role's own height, when it is a part of a fused tensor.
    pub part_rows: Option<usize>,
}

/// Every schema modelforge ships.
pub(crate) fn builtin() -> Vec<Schema> {
    BUILTIN
        .iter()
        .map(|(path, text)| {
            toml::from_str(text)
                .unwrap_or_else(|e| panic!("the shipped schema {path} is invalid: {e}"))
        })
        .collect()
}

fn counterpart(role: &str) -> Option<&'static str> {
    COUNTERPARTS.iter().find_map(|(a, b)| {
        (*a == role)
            .then_some(*b)
            .or_else(|| (*b == role).then_some(*a))
    })
}

/// `{layer}` in `template` matched against `name`: the layer index.
fn layer_in(template: &str, name: &str) -> Option<usize> {
    let (prefix, suffix) = template.split_once("{layer}")?;
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

impl Schema {
    /// The schema for a model's config.json, by `model_type`.
    pub fn for_config<'a>(
        schemas: &'a [Schema],
        config: &Map<String, Value>,
    ) -> Option<&'a Schema> {
        let model_type = config.get("model_type").and_then(Value::as_str)?;
        schemas.iter().find(|s| {
            s.model_types.iter().any(|t| t == model_type)
                && s.requires.iter().all(|k| config.contains_key(k))
        })
    }

    /// The role and layer of a tensor that holds a single role.
    pub fn role_of(&self, tensor: &str) -> Option<(&str, usize)> {
        self.tensors.iter().find_map(|t| {
            let role = t.role.as_deref()?;
            layer_in(&t.name, tensor).map(|layer| (role, layer))
        })
    }

    fn holds(&self, role: &str) -> bool {
        self.tensors
            .iter()
            .any(|t| t.role.as_deref() == Some(role) || t.parts.iter().any(|p| p.role == role))
    }

    /// Whether no tensor of this schema holds `role` or its counterpart.
    pub fn has_no(&self, role: &str) -> bool {
        !self.holds(role) && !self.holds(counterpart(role).unwrap_or(role))
    }

    /// Where `role` (or, when this schema lacks it, its counterpart) of `layer` lives in a model
    /// of this schema with widths `dims`.
    pub fn place_of(&self, role: &str, layer: usize, dims: &Dims) -> Option<Place> {
        let role = if self.holds(role) {
            role
        } else {
            counterpart(role)?
        };
        for t in &self.tensors {
            let name = t.name.replace("{layer}", &layer.to_string());
            if t.role.as_deref() == Some(role) {
                return Some(Place {
                    tensor: name,
                    rows: None,
                    part_rows: None,
                });
            }
            let Some(index) = t.parts.iter().position(|p| p.role == role) else {
                continue;
            };
            let rows = match t.layout? {
                Layout::Stacked => RowMap::Offset {
                    offset: t.parts[..index].iter().map(|p| dims.rows(p.rows)).sum(),
                },
                Layout::PerHead => RowMap::PerHead {
                    parts: t.parts.len(),
                    part: index,
                    head_dim: dims.head_dim,
                    repeat: 1,
                },
            };
            return Some(Place {
                tensor: name,
                rows: Some(rows),
                part_rows: Some(dims.rows(t.parts[index].rows)),
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
        Dims::from_config(config.as_object().unwrap()).unwrap()
    }

    #[test]
    fn the_shipped_schemas_parse_and_place_roles() {
        let schemas = builtin();
        let llama = schemas.iter().find(|s| s.name == "llama").unwrap();
        assert_eq!(
            llama.role_of("model.layers.3.self_attn.k_proj.weight"),
            Some(("attn.k", 3))
        );
        let phi3 = schemas.iter().find(|s| s.name == "phi3").unwrap();
        let k = phi3.place_of("attn.k", 1, &dims()).unwrap();
        assert_eq!(k.tensor, "model.layers.1.self_attn.qkv_proj.weight");
        assert_eq!(k.rows, Some(RowMap::Offset { offset: 8 }));
        assert_eq!(k.part_rows, Some(4));
        let up = phi3.place_of("mlp.up", 0, &dims()).unwrap();
        assert_eq!(up.rows, Some(RowMap::Offset { offset: 12 }));
        let neox = schemas.iter().find(|s| s.name == "gpt_neox").unwrap();
        let v = neox.place_of("attn.v", 0, &dims()).unwrap();
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
        // GPT-NeoX's non-gated MLP takes LLaMA's up and down projections as its own.
        let fc_in = neox.place_of("mlp.up", 0, &dims()).unwrap();
        assert_eq!(fc_in.tensor, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight");
        assert!(
            neox.place_of("mlp.gate", 0, &dims()).is_none(),
            "GPT-NeoX has no gate"
        );
    }
}
