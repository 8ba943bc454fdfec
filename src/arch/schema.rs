//! One architecture schema file, read and checked: the shipped ones (`arch/*.toml`) and the
//! user's (`--arch FILE`) go through this same reader, so every fault in a user's schema is a
//! diagnostic pointing at its span.
use std::fmt;
use std::sync::Arc;

use miette::NamedSource;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::error::ArchError;
use super::role::Role;
use crate::recipe::Src;
use modelforge_core::rotary::Rotary;

/// A checked schema: every role known, every name template with one `{layer}`.
#[derive(Debug)]
pub(crate) struct Schema {
    pub name: String,
    /// The `model_type` values of config.json this schema describes.
    pub model_types: Vec<String>,
    /// The `architectures` entries of config.json this schema describes.
    pub architectures: Vec<String>,
    /// config.json keys that must be present, to tell apart families sharing a model_type.
    pub requires: Vec<String>,
    /// config.json keys that must be absent.
    pub excludes: Vec<String>,
    /// How q and k rows pair up for the rotary embedding; `None`: no rotary embedding, or one
    /// modelforge does not permute into.
    pub rotary: Option<Rotary>,
    pub config: ConfigKeys,
    pub tensors: Vec<TensorSchema>,
}

/// One per-layer tensor: `{layer}` in its name stands for the layer index.
#[derive(Debug)]
pub(crate) struct TensorSchema {
    pub name: String,
    /// Stored (in × out), as GPT-2's Conv1D: a role's rows are the tensor's columns.
    pub transposed: bool,
    pub holds: Holds,
}

#[derive(Debug)]
pub(crate) enum Holds {
    Role(Role),
    Parts { layout: Layout, parts: Vec<Part> },
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Layout {
    /// Parts one after the other: [Q; K; V].
    Stacked,
    /// Parts interleaved per attention head: [q_h; k_h; v_h] for each head h.
    PerHead,
}

/// One part of a fused tensor, as a schema file writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPart {
    role: Spanned<String>,
    rows: Rows,
}

/// One part of a fused tensor, checked.
#[derive(Debug)]
pub(crate) struct Part {
    pub role: Role,
    pub rows: Rows,
}

/// A part's height (of the logical out × in weight), from the model's config.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Rows {
    /// heads × head_dim.
    Q,
    /// kv_heads × head_dim.
    Kv,
    Intermediate,
    Hidden,
}

/// Which config.json keys give a model's widths; each a list of names, the first present wins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigKeys {
    #[serde(default)]
    pub hidden: Option<Keys>,
    #[serde(default)]
    pub heads: Option<Keys>,
    #[serde(default)]
    pub kv_heads: Option<Keys>,
    /// A boolean key that switches `kv_heads` on (ChatGLM2's `multi_query_attention`): when it
    /// is false, every head has its own k and v.
    #[serde(default)]
    pub kv_heads_if: Option<String>,
    #[serde(default)]
    pub head_dim: Option<Keys>,
    #[serde(default)]
    pub intermediate: Option<Keys>,
}

/// `"key"` or `["key", "other_key"]`.
#[derive(Debug, Clone)]
pub(crate) struct Keys(pub Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeysVisitor;

        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = Keys;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a config.json key or a list of them")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Keys, E> {
                Ok(Keys(vec![v.to_owned()]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = seq.next_element()? {
                    keys.push(key);
                }
                Ok(Keys(keys))
            }
        }

        deserializer.deserialize_any(KeysVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    name: Spanned<String>,
    #[serde(default)]
    model_types: Vec<String>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    excludes: Vec<String>,
    #[serde(default)]
    rotary: Option<Spanned<String>>,
    #[serde(default)]
    config: Option<ConfigKeys>,
    #[serde(default, rename = "tensor")]
    tensors: Vec<Spanned<RawTensor>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    name: Spanned<String>,
    #[serde(default)]
    role: Option<Spanned<String>>,
    #[serde(default)]
    layout: Option<Spanned<Layout>>,
    #[serde(default)]
    parts: Option<Spanned<Vec<RawPart>>>,
    #[serde(default)]
    transposed: bool,
}

/// Reads the schema in `text`, named `path` in diagnostics.
pub(crate) fn parse(path: &str, text: &str) -> Result<Schema, ArchError> {
    let src: Src = NamedSource::new(path, Arc::new(text.to_owned()));
    let invalid =
        |message: String, help: &str, span: Option<std::ops::Range<usize>>| ArchError::Invalid {
            message,
            help: help.into(),
            src: src.clone(),
            span: span.map(Into::into),
        };
    let raw: RawSchema = toml::from_str(text).map_err(|err| {
        let message = err.message().to_owned();
        let help = if message.contains("recursion") {
            "a schema needs at most three levels, as in `parts = [ { role = \"attn.q\", rows = \"q\" } ]`"
        } else if message.starts_with("unknown field") {
            "remove the key or fix its spelling; see README.md (Architectures) for a schema's keys"
        } else if message.starts_with("unknown variant") {
            "use one of the values the message lists"
        } else if message.starts_with("missing field") {
            "add the missing key"
        } else {
            "see README.md (Architectures) and arch/*.toml for the schema format"
        };
        invalid(
            format!("invalid architecture schema: {message}"),
            help,
            err.span(),
        )
    })?;

    let name = raw.name.get_ref();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            format!("`{name:?}` is not a schema name"),
            "name it with letters, digits and `_`, such as `\"chatglm2\"`: recipes refer to it by `arch = \"...\"`",
            Some(raw.name.span()),
        ));
    }
    let rotary = match &raw.rotary {
        None => None,
        Some(text) => Some(
            Rotary::ALL
                .iter()
                .find(|(n, _)| n == text.get_ref())
                .map(|(_, r)| *r)
                .ok_or_else(|| {
                    invalid(
                        format!("unknown rotary convention `{}`", text.get_ref()),
                        "use `\"half\"` (LLaMA's rotate_half), `\"glm_2d\"` (ChatGLM-6B) or `\"interleaved_first_half\"` (ChatGLM2/3), or leave it out",
                        Some(text.span()),
                    )
                })?,
        ),
    };
    if raw.tensors.is_empty() {
        return Err(invalid(
            format!("the schema `{name}` has no `[[tensor]]`"),
            "add a `[[tensor]]` with a `name` and a `role` (or `layout` and `parts`) for each per-layer tensor",
            Some(raw.name.span()),
        ));
    }

    let mut tensors = Vec::new();
    let mut seen_roles: Vec<Role> = Vec::new();
    let mut check_role = |role: &Spanned<String>| -> Result<Role, ArchError> {
        let Some(known) = Role::parse(role.get_ref()) else {
            return Err(invalid(
                format!("unknown role `{}`", role.get_ref()),
                &format!(
                    "roles are {}",
                    Role::ALL
                        .iter()
                        .map(|(r, _)| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some(role.span()),
            ));
        };
        if seen_roles.contains(&known) {
            return Err(invalid(
                format!("the role `{known}` is held by two tensors"),
                "each role lives in one tensor (or one part of a fused tensor); remove one",
                Some(role.span()),
            ));
        }
        seen_roles.push(known);
        Ok(known)
    };
    for tensor in raw.tensors {
        let span = tensor.span();
        let tensor = tensor.into_inner();
        let template = tensor.name.get_ref();
        let placeholders = template.matches('{').count();
        if template.matches("{layer}").count() != 1 || placeholders != 1 {
            return Err(invalid(
                format!("the tensor name `{template}` needs exactly one `{{layer}}`"),
                "write where the layer index goes, e.g. `\"model.layers.{layer}.self_attn.q_proj.weight\"`; no other `{...}` placeholders exist",
                Some(tensor.name.span()),
            ));
        }
        if tensors.iter().any(|t: &TensorSchema| &t.name == template) {
            return Err(invalid(
                format!("the tensor `{template}` is described twice"),
                "keep one `[[tensor]]` per tensor",
                Some(tensor.name.span()),
            ));
        }
        let holds = match (tensor.role, tensor.layout, tensor.parts) {
            (Some(role), None, None) => Holds::Role(check_role(&role)?),
            (None, Some(layout), Some(parts)) => {
                if parts.get_ref().is_empty() {
                    return Err(invalid(
                        "`parts = []` holds no role".into(),
                        "list the parts in the order the tensor lays them out, e.g. `[ { role = \"attn.q\", rows = \"q\" }, ... ]`",
                        Some(parts.span()),
                    ));
                }
                let parts_span = parts.span();
                let parts = parts
                    .into_inner()
                    .into_iter()
                    .map(|part| {
                        Ok(Part {
                            role: check_role(&part.role)?,
                            rows: part.rows,
                        })
                    })
                    .collect::<Result<Vec<Part>, ArchError>>()?;
                let layout = *layout.get_ref();
                if layout == Layout::PerHead && parts.iter().any(|p| p.rows != parts[0].rows) {
                    return Err(invalid(
                        "`per_head` parts must all have the same `rows`".into(),
                        "a per-head layout interleaves one head of each part; give every part `rows = \"q\"`",
                        Some(parts_span),
                    ));
                }
                Holds::Parts { layout, parts }
            }
            (Some(_), _, Some(_)) | (Some(_), Some(_), None) => {
                return Err(invalid(
                    format!("the tensor `{template}` has both a `role` and a `layout` or `parts`"),
                    "a tensor holds one `role`, or several `parts` laid out as `layout` says; keep one",
                    Some(span),
                ))
            }
            (None, None, Some(_)) => {
                return Err(invalid(
                    format!("the tensor `{template}` has `parts` but no `layout`"),
                    "add `layout = \"stacked\"` ([Q; K; V]) or `layout = \"per_head\"` ([q_h; k_h; v_h] per head)",
                    Some(span),
                ))
            }
            (None, Some(_), None) => {
                return Err(invalid(
                    format!("the tensor `{template}` has a `layout` but no `parts`"),
                    "add `parts = [ { role = \"attn.q\", rows = \"q\" }, ... ]` in the order the tensor lays them out",
                    Some(span),
                ))
            }
            (None, None, None) => {
                return Err(invalid(
                    format!("the tensor `{template}` holds no role"),
                    "add `role = \"attn.q\"` (or another role), or `layout` and `parts` for a fused tensor",
                    Some(span),
                ))
            }
        };
        tensors.push(TensorSchema {
            name: template.clone(),
            transposed: tensor.transposed,
            holds,
        });
    }
    Ok(Schema {
        name: raw.name.into_inner(),
        model_types: raw.model_types,
        architectures: raw.architectures,
        requires: raw.requires,
        excludes: raw.excludes,
        rotary,
        config: raw.config.unwrap_or_default(),
        tensors,
    })
}
