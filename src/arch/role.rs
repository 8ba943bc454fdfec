//! What a per-layer weight does in a transformer block: the closed set of roles a schema may
//! give a tensor or a part of a fused tensor, and what modelforge knows of each.
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    AttnQ,
    AttnK,
    AttnV,
    AttnO,
    MlpGate,
    MlpUp,
    MlpDown,
    /// A non-gated MLP's input projection (GPT-2, GPT-NeoX): the counterpart of `mlp.up`.
    MlpFcIn,
    /// A non-gated MLP's output projection: the counterpart of `mlp.down`.
    MlpFcOut,
}

impl Role {
    /// Every role, by the name schema files give it.
    pub const ALL: [(&'static str, Role); 9] = [
        ("attn.q", Role::AttnQ),
        ("attn.k", Role::AttnK),
        ("attn.v", Role::AttnV),
        ("attn.o", Role::AttnO),
        ("mlp.gate", Role::MlpGate),
        ("mlp.up", Role::MlpUp),
        ("mlp.down", Role::MlpDown),
        ("mlp.fc_in", Role::MlpFcIn),
        ("mlp.fc_out", Role::MlpFcOut),
    ];

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
    }

    pub fn name(self) -> &'static str {
        Role::ALL
            .iter()
            .find(|(_, r)| *r == self)
            .map(|(n, _)| *n)
            .expect("every role is named")
    }

    /// The role that does the same job in the other kind of MLP: a LoRA of a gated MLP's up
    /// projection goes into a plain MLP's input projection, and back.
    pub fn counterpart(self) -> Option<Role> {
        match self {
            Role::MlpUp => Some(Role::MlpFcIn),
            Role::MlpFcIn => Some(Role::MlpUp),
            Role::MlpDown => Some(Role::MlpFcOut),
            Role::MlpFcOut => Some(Role::MlpDown),
            _ => None,
        }
    }

    /// Whether its output is added to the residual stream (its rows face it); the others read
    /// the residual stream (their columns face it).
    pub fn writes_residual(self) -> bool {
        matches!(self, Role::AttnO | Role::MlpDown | Role::MlpFcOut)
    }

    /// Keys and values: grouped-query attention gives them fewer heads than queries.
    pub fn is_kv(self) -> bool {
        matches!(self, Role::AttnK | Role::AttnV)
    }

    /// Queries and keys: the rotary embedding rotates their rows.
    pub fn is_rotated(self) -> bool {
        matches!(self, Role::AttnQ | Role::AttnK)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
