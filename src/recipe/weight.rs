//! An adapter's weight: one number, or rules over layers and modules where the last match wins.
use std::ops::Range;

use miette::SourceSpan;

use super::layers::LayerRange;

#[derive(Clone, Debug)]
pub(crate) struct WeightRule {
    pub value: f64,
    /// Where the recipe gives the value (`None`: the default).
    pub span: Option<SourceSpan>,
    pub layers: Option<(LayerRange, SourceSpan)>,
    /// Module names matched as PEFT matches `target_modules`: the whole path or its last parts.
    pub modules: Option<Vec<String>>,
}

/// A rule with its layer range resolved against the base's layer count.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedRule {
    pub value: f64,
    pub span: Option<SourceSpan>,
    pub layers: Option<Range<usize>>,
    pub modules: Option<Vec<String>>,
}

/// An adapter's weight rules, resolved.
#[derive(Clone, Debug, Default)]
pub(crate) struct Weight {
    rules: Vec<ResolvedRule>,
}

impl Weight {
    pub fn new(rules: Vec<ResolvedRule>) -> Self {
        Weight { rules }
    }

    /// The weight of the delta for `module` (its dotted path in the base, without `.weight`)
    /// in `layer`. Unmatched modules keep weight 1.0.
    pub fn for_module(&self, module: &str, layer: Option<usize>) -> f64 {
        self.rule_for(module, layer).0
    }

    /// The weight for `module` in `layer`, and where the recipe gives it (`None`: nowhere,
    /// the default 1.0).
    pub fn rule_for(&self, module: &str, layer: Option<usize>) -> (f64, Option<SourceSpan>) {
        let mut weight = (1.0, None);
        for ResolvedRule {
            value,
            span,
            layers,
            modules,
        } in &self.rules
        {
            let layer_ok = match (layers, layer) {
                (None, _) => true,
                (Some(range), Some(layer)) => range.contains(&layer),
                (Some(_), None) => false,
            };
            let module_ok = modules
                .as_ref()
                .is_none_or(|names| names.iter().any(|name| module_matches(module, name)));
            if layer_ok && module_ok {
                weight = (*value, *span);
            }
        }
        weight
    }
}

/// `name` matches `module` when it is the whole path or a suffix of whole components:
/// `q_proj` and `self_attn.q_proj` both match `model.layers.0.self_attn.q_proj`.
pub(crate) fn module_matches(module: &str, name: &str) -> bool {
    module == name
        || (module.ends_with(name) && module.as_bytes()[module.len() - name.len() - 1] == b'.')
}

/// The layer a module belongs to: the first dotted component that is a number
/// (`model.layers.3.mlp.up_proj` → 3, `transformer.h.0.attn.c_attn` → 0).
pub(crate) fn layer_of(module: &str) -> Option<usize> {
    module.split('.').find_map(|part| part.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_matching_rule_wins() {
        let rule = |value, layers, modules| ResolvedRule {
            value,
            span: None,
            layers,
            modules,
        };
        let weight = Weight::new(vec![
            rule(1.0, None, None),
            rule(0.5, Some(2..4), None),
            rule(0.0, Some(0..4), Some(vec!["q_proj".into()])),
        ]);
        assert_eq!(
            weight.for_module("model.layers.1.self_attn.v_proj", Some(1)),
            1.0
        );
        assert_eq!(
            weight.for_module("model.layers.3.self_attn.v_proj", Some(3)),
            0.5
        );
        assert_eq!(
            weight.for_module("model.layers.3.self_attn.q_proj", Some(3)),
            0.0
        );
        assert_eq!(weight.for_module("model.embed_tokens", None), 1.0);
    }

    #[test]
    fn modules_match_whole_components_only() {
        assert!(module_matches("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(module_matches(
            "model.layers.0.self_attn.q_proj",
            "self_attn.q_proj"
        ));
        assert!(!module_matches(
            "model.layers.0.self_attn.xq_proj",
            "q_proj"
        ));
        assert_eq!(layer_of("transformer.h.11.attn.c_attn"), Some(11));
        assert_eq!(layer_of("model.embed_tokens"), None);
    }
}
