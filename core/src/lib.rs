//! What modelforge's planner (the `modelforge` crate) and its compute engine
//! (`modelforge-engine`, which alone links LibTorch) share, and nothing else: typed digests, the
//! content-addressed store both read and write, the job the planner sends the engine and its
//! answers, and the rotary conventions a job may carry. It knows nothing of recipes, the
//! command line, diagnostics or LibTorch.
pub mod digest;
pub mod job;
pub mod leaves;
pub mod mapped;
pub mod node;
pub mod rotary;
pub mod store;
