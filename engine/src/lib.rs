//! The engine's arithmetic, as a library: `modelforge-engine` (main.rs) runs it on the jobs a
//! build sends, and the micro-benchmarks in `benches/` time its kernels. Not a stable API.
pub mod align;
pub mod backend;
pub mod elementwise;
pub mod error;
pub mod fuse;
pub mod inputs;
pub mod score;
