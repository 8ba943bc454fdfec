//! Rotary-embedding conventions, and the row permutation that carries q and k rows from one to
//! another.
//!
//! A rotary embedding rotates pairs of rows of each head by an angle proportional to the
//! position, each pair at its own frequency. Models differ in which rows pair up:
//!
//! - `half` (HF LLaMA's `rotate_half`, Phi-3, Mistral, Qwen): pair i is rows (i, i + d/2),
//!   i < d/2, at frequency base^(−2i/d).
//! - `glm_2d` (ChatGLM-6B v1, `position_encoding_2d`): each head's two halves are rotated
//!   separately, the first with the position ids, the second with the block position ids, each
//!   with `rotate_half` inside its half: pairs (j, j + d/4) and (d/2 + j, d/2 + j + d/4),
//!   j < d/4, both at frequency base^(−4j/d).
//! - `interleaved_first_half` (ChatGLM2/3): adjacent rows (2j, 2j + 1) of the first half pair up,
//!   j < d/4, at frequency base^(−4j/d); the second half is not rotated.
//!
//! Each convention is a list of *slots*, ordered so that slot i takes LLaMA's pair i: in the GLM
//! conventions, LLaMA's even pairs 2j (frequency base^(−4j/d)) go to the GLM pairs of the same
//! frequency (first half, position ids), and its odd pairs 2j + 1, whose frequencies GLM does
//! not have, go to the second half (block position ids in v1, no rotation in v2). A row moves to
//! the same element (first or second) of the same slot, so that a rotation's sign is kept. Only
//! the even pairs keep their exact rotation; that is the most the target's convention allows.
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Rotary {
    Half,
    Glm2d,
    InterleavedFirstHalf,
}

impl Rotary {
    /// Every convention and its name in schema files.
    pub const ALL: [(&'static str, Rotary); 3] = [
        ("half", Rotary::Half),
        ("glm_2d", Rotary::Glm2d),
        ("interleaved_first_half", Rotary::InterleavedFirstHalf),
    ];

    /// The name schema files use.
    pub fn name(self) -> &'static str {
        Rotary::ALL
            .iter()
            .find(|(_, r)| *r == self)
            .map_or("?", |(n, _)| n)
    }

    /// Whether a head of `head_dim` rows can be laid out this way.
    pub fn fits(self, head_dim: usize) -> bool {
        match self {
            Rotary::Half => head_dim > 0 && head_dim.is_multiple_of(2),
            Rotary::Glm2d | Rotary::InterleavedFirstHalf => {
                head_dim > 0 && head_dim.is_multiple_of(4)
            }
        }
    }

    /// Row `row` of a head: its slot and its element (0: first of the pair, 1: second).
    fn slot_of(self, d: usize, row: usize) -> (usize, usize) {
        let (half, within) = (row / (d / 2), row % (d / 2));
        match self {
            Rotary::Half => (within, half),
            Rotary::Glm2d => (2 * (within % (d / 4)) + half, within / (d / 4)),
            Rotary::InterleavedFirstHalf => (2 * (within / 2) + half, within % 2),
        }
    }

    /// The row of a head holding element `element` of slot `slot`.
    fn row_of(self, d: usize, slot: usize, element: usize) -> usize {
        let (j, half) = (slot / 2, slot % 2);
        match self {
            Rotary::Half => slot + element * (d / 2),
            Rotary::Glm2d => half * (d / 2) + j + element * (d / 4),
            Rotary::InterleavedFirstHalf => half * (d / 2) + 2 * j + element,
        }
    }
}

/// q or k rows carried from one rotary convention to another, head by head.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotaryMap {
    pub from: Rotary,
    pub to: Rotary,
    pub head_dim: usize,
}

impl RotaryMap {
    /// The row that row `row` of the source becomes, in the target's convention.
    pub fn row(&self, row: usize) -> usize {
        let d = self.head_dim;
        let (head, within) = (row / d, row % d);
        let (slot, element) = self.from.slot_of(d, within);
        head * d + self.to.row_of(d, slot, element)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(from: Rotary, to: Rotary, d: usize) -> Vec<usize> {
        let map = RotaryMap {
            from,
            to,
            head_dim: d,
        };
        (0..d).map(|r| map.row(r)).collect()
    }

    #[test]
    fn llama_pairs_land_on_glm_pairs() {
        // LLaMA d = 8: pairs (0,4) (1,5) (2,6) (3,7) at frequencies f0 > f1 > f2 > f3.
        // ChatGLM-6B: first half pairs (0,2) at f0 and (1,3) at f2; second half (4,6), (5,7).
        assert_eq!(
            rows(Rotary::Half, Rotary::Glm2d, 8),
            [0, 4, 1, 5, 2, 6, 3, 7]
        );
        // ChatGLM2: first half pairs (0,1) at f0 and (2,3) at f2; the second half unrotated.
        assert_eq!(
            rows(Rotary::Half, Rotary::InterleavedFirstHalf, 8),
            [0, 4, 2, 6, 1, 5, 3, 7]
        );
        // The second head moves within itself.
        let map = RotaryMap {
            from: Rotary::Half,
            to: Rotary::Glm2d,
            head_dim: 8,
        };
        assert_eq!(map.row(8 + 1), 8 + 4);
    }

    #[test]
    fn every_map_is_a_permutation_and_inverts() {
        for (_, from) in Rotary::ALL {
            for (_, to) in Rotary::ALL {
                let there = rows(from, to, 16);
                let mut sorted = there.clone();
                sorted.sort();
                assert_eq!(sorted, (0..16).collect::<Vec<_>>());
                let back = rows(to, from, 16);
                assert!((0..16).all(|r| back[there[r]] == r));
            }
        }
    }
}
