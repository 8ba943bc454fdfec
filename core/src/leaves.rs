//! A blake3 hash computed from leaves: the bytes are cut into pieces of the same size
//! (a power of two of at least blake3's 1 KiB chunk), each piece is hashed on its own, by any
//! thread and in any order, and the pieces' chaining values are merged into the hash blake3
//! gives the whole. This is blake3's own tree (section 2.1 of its paper): a leaf starting at a
//! multiple of its size is a complete subtree, and every parent above the leaves splits its
//! bytes where `left_subtree_len` says, which is always on a leaf boundary.
//!
//! Files are hashed this way on all cores, each worker mapping and hashing whole leaves (rather
//! than all workers splitting one mapped window after another), and output shards are hashed by
//! the threads that write them.
use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// How `len` bytes are cut into leaves of `size` bytes: what hashing one leaf needs, and
/// cheap to copy to every thread that does.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    size: u64,
    len: u64,
}

impl Layout {
    /// Leaves of `size` bytes (a power of two, at least 1 KiB) covering `len` bytes.
    pub fn new(size: u64, len: u64) -> Layout {
        assert!(
            size.is_power_of_two() && size >= blake3::CHUNK_LEN as u64,
            "a leaf is a power of two of at least one chunk"
        );
        Layout { size, len }
    }

    /// How many bytes the leaves cover.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// How many leaves cover the bytes (one, for no bytes).
    pub fn count(&self) -> usize {
        self.len.div_ceil(self.size).max(1) as usize
    }

    /// Where leaf `index` starts, and how many bytes it has.
    pub fn range(&self, index: usize) -> (u64, u64) {
        let start = index as u64 * self.size;
        (start, self.size.min(self.len - start))
    }

    /// A hasher for the bytes of leaf `index`, fed in order; [`Layout::end`] takes it back.
    pub fn start(&self, index: usize) -> blake3::Hasher {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(self.range(index).0);
        hasher
    }

    /// Leaf `index`'s hash, from the hasher [`Layout::start`] gave and that was fed its bytes;
    /// it goes to [`Leaves::set`].
    pub fn end(&self, index: usize, hasher: &blake3::Hasher) -> Leaf {
        let len = self.range(index).1;
        assert_eq!(hasher.count(), len, "leaf {index} has {len} bytes");
        match self.count() {
            1 => Leaf::Whole(hasher.finalize()),
            _ => Leaf::Part(index, hasher.finalize_non_root()),
        }
    }
}

/// The leaves' hashes, set in any order, then merged.
pub struct Leaves {
    layout: Layout,
    cvs: Vec<Option<ChainingValue>>,
    /// The hash of the whole when it fits one leaf: a lone leaf is the root, which has no
    /// chaining value of its own.
    whole: Option<blake3::Hash>,
}

impl Leaves {
    pub fn new(layout: Layout) -> Leaves {
        Leaves {
            layout,
            cvs: vec![None; layout.count()],
            whole: None,
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn set(&mut self, leaf: Leaf) {
        match leaf {
            Leaf::Whole(hash) => self.whole = Some(hash),
            Leaf::Part(index, cv) => self.cvs[index] = Some(cv),
        }
    }

    /// The hash of all the bytes; `None` while a leaf is missing.
    pub fn finish(&self) -> Option<blake3::Hash> {
        if self.cvs.len() == 1 {
            return self.whole;
        }
        let len = self.layout.len;
        let split = left_subtree_len(len);
        Some(merge_subtrees_root(
            &self.subtree(0, split)?,
            &self.subtree(split, len - split)?,
            Mode::Hash,
        ))
    }

    /// The chaining value of the `len` bytes at `start`, a complete subtree.
    fn subtree(&self, start: u64, len: u64) -> Option<ChainingValue> {
        let size = self.layout.size;
        if len <= size {
            return self.cvs[(start / size) as usize];
        }
        let split = left_subtree_len(len);
        Some(merge_subtrees_non_root(
            &self.subtree(start, split)?,
            &self.subtree(start + split, len - split)?,
            Mode::Hash,
        ))
    }
}

/// One leaf's hash, to be set.
pub enum Leaf {
    Part(usize, ChainingValue),
    Whole(blake3::Hash),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_hashed_in_any_order_give_blake3_of_the_whole() {
        let bytes: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for size in [1024u64, 2048, 8192] {
            for len in [
                0, 1, 1023, 1024, 1025, 2047, 2048, 2049, 5000, 8192, 8193, 40_000,
            ] {
                let bytes = &bytes[..len];
                let layout = Layout::new(size, len as u64);
                let mut leaves = Leaves::new(layout);
                let mut hashed: Vec<Leaf> = (0..layout.count())
                    .map(|i| {
                        let (start, n) = layout.range(i);
                        let mut hasher = layout.start(i);
                        hasher.update(&bytes[start as usize..(start + n) as usize]);
                        layout.end(i, &hasher)
                    })
                    .collect();
                hashed.reverse();
                let last = hashed.pop();
                for leaf in hashed {
                    leaves.set(leaf);
                }
                assert_eq!(leaves.finish(), None, "leaf 0 of {len} is missing");
                leaves.set(last.unwrap());
                assert_eq!(
                    leaves.finish(),
                    Some(blake3::hash(bytes)),
                    "{len} bytes in leaves of {size}"
                );
            }
        }
    }
}
