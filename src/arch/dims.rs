//! A model's widths, read from its config.json through the keys its schema names.
use serde_json::{Map, Value};

use super::schema::{ConfigKeys, Keys, Rows};

/// The widths of a model, read from its config.json.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub q: usize,
    pub kv: usize,
    pub intermediate: usize,
    pub hidden: usize,
    pub head_dim: usize,
}

const HIDDEN: &[&str] = &["hidden_size", "n_embd", "d_model"];
const HEADS: &[&str] = &["num_attention_heads", "n_head"];
const KV_HEADS: &[&str] = &["num_key_value_heads"];
const HEAD_DIM: &[&str] = &["head_dim"];
const INTERMEDIATE: &[&str] = &[
    "intermediate_size",
    "inner_hidden_size",
    "ffn_hidden_size",
    "n_inner",
];

impl Dims {
    /// Widths from the keys `keys` names, the usual ones where it names none.
    pub fn read(config: &Map<String, Value>, keys: &ConfigKeys) -> Option<Dims> {
        let get = |named: &Option<Keys>, usual: &[&str]| -> Option<usize> {
            // Widths beyond 2^32 are no model's; refusing them keeps row arithmetic in range.
            let from = |key: &str| {
                config
                    .get(key)
                    .and_then(Value::as_u64)
                    .filter(|v| *v <= 1 << 32)
                    .map(|v| v as usize)
            };
            match named {
                Some(Keys(named)) => named.iter().find_map(|k| from(k)),
                None => usual.iter().find_map(|k| from(k)),
            }
        };
        let hidden = get(&keys.hidden, HIDDEN)?;
        let heads = get(&keys.heads, HEADS)?.max(1);
        let grouped = keys
            .kv_heads_if
            .as_ref()
            .is_none_or(|flag| config.get(flag).and_then(Value::as_bool) == Some(true));
        let kv_heads = if grouped {
            get(&keys.kv_heads, KV_HEADS).unwrap_or(heads)
        } else {
            heads
        };
        let head_dim = get(&keys.head_dim, HEAD_DIM).unwrap_or(hidden / heads);
        Some(Dims {
            q: heads.checked_mul(head_dim)?,
            kv: kv_heads.checked_mul(head_dim)?,
            intermediate: get(&keys.intermediate, INTERMEDIATE).unwrap_or(hidden.checked_mul(4)?),
            hidden,
            head_dim,
        })
    }

    pub(crate) fn rows(&self, rows: Rows) -> usize {
        match rows {
            Rows::Q => self.q,
            Rows::Kv => self.kv,
            Rows::Intermediate => self.intermediate,
            Rows::Hidden => self.hidden,
        }
    }
}
