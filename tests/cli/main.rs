//! modelforge's command-line tests: one binary, one module per topic. Fixtures are tiny models
//! and adapters written by `support`, so these tests need no Python; the comparisons with PEFT
//! and transformers live in tests/peers/.

/// Writing fixtures and running the binary.
mod support;

/// Every user-facing failure, pinned as the person sees it.
mod diagnostics;

/// Fused values against answers computed by hand, and the shape of the output directory.
mod build;

/// Architecture schemas: the user's (`--arch FILE`) and `arch =` in recipes, what they place,
/// and every fault in a schema pinned as the person sees it.
mod arch;

/// The transfer report's figures and verdict per carried adapter, on known answers: a copy of
/// the source base, a permuted copy (by position and through `align`), no source base at all.
mod transfer;

/// `modelforge inspect`.
mod inspect;

/// The content-addressed build: no-op and incremental rebuilds, the lock file, `verify`,
/// reproducibility, a damaged cache, concurrent and killed builds.
mod incremental;

/// Damaged and hostile inputs: each refused with a diagnostic, leaving the previous output as it was.
mod hostile;

/// Resource limits: a large model under a small memory budget, and a disk that fills up.
mod limits;

/// The adapters users bring: tied embeddings, DoRA, trainable tokens, resized vocabularies,
/// experts' parameters, on known answers, and their refusals pinned.
mod real_adapters;

/// The workspace's settings file, `modelforge.toml`: the remote cache it names, what comes
/// before it, and its faults pinned.
mod settings;

/// `[output] gguf`: the file's frame, the lock and `verify`, and its refusals pinned.
mod gguf;
