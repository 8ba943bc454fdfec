//! `modelforge-engine`: computes the tensors a build asks for (a JSON job on standard input),
//! block of rows by block of rows, writes each result into the cache (or, for a task to hand off,
//! into a file the build settles), and answers one JSON line
//! per finished tensor. It is the only modelforge program that loads LibTorch; `modelforge`
//! starts it only when some tensor must be computed.
use std::io::{Read, Write};

use modelforge_core::job::{Done, Job, NonFinite, Reply, ScoreJob, Task};
use modelforge_core::node::Node;
use modelforge_core::store::Store;
use modelforge_engine::error::EngineError;
use modelforge_engine::inputs::Inputs;
use modelforge_engine::{align, backend, fuse};

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("modelforge-engine: {message}");
            }
            1
        }
    };
    // Everything the engine makes is out by now: its files written and closed, each answer
    // flushed, stderr unbuffered. A normal exit would still run LibTorch's static destructors
    // (deregistering every operator it registered at load: about 70 ms, which the build waits
    // for, a tenth of an incremental build), so the engine leaves without them.
    // SAFETY: _exit ends the process without touching any Rust state.
    unsafe { libc::_exit(code) }
}

fn run() -> Result<(), String> {
    // The engine works for one build: when that build dies, so does the engine, rather than
    // computing on for nobody (its finished objects are in the cache either way).
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a signal for this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    if std::os::unix::process::parent_id() == 1 {
        // Nobody is listening. Leave at once: running LibTorch's and MKL's exit handlers while
        // they are still initialising makes MKL print a spurious fatal error.
        // SAFETY: _exit ends the process without touching any Rust state.
        unsafe { libc::_exit(1) }
    }
    let mut request = Vec::new();
    std::io::stdin()
        .read_to_end(&mut request)
        .map_err(|e| format!("cannot read the job: {e}"))?;
    if std::env::args().nth(1).as_deref() == Some("score") {
        return score(&request);
    }
    let job: Job = serde_json::from_slice(&request).map_err(|e| format!("malformed job: {e}"))?;
    let backend = backend::Backend::select(job.device).map_err(|e| e.to_string())?;
    let store = Store::open(&job.cache)
        .map_err(|e| format!("cannot open the cache `{}`: {e}", job.cache.display()))?;
    let mut inputs = Inputs::new(&job.places);
    let stdout = std::io::stdout();
    let answer = |reply: &Reply| {
        let line = serde_json::to_string(reply).expect("a reply serialises");
        let mut out = stdout.lock();
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(|e| format!("cannot answer: {e}"))
    };
    // Results to hand off live as long as the build that asked for them.
    let build = std::os::unix::process::parent_id();
    // In the job's order: each node after those it reads.
    for Task {
        name,
        key,
        node,
        hand_off,
    } in &job.nodes
    {
        if node.key() != *key {
            return Err(format!(
                "`{name}` reads back as another node than the build wrote ({} for {}): the build and the engine disagree on the job's format",
                node.key().hex(),
                key.hex()
            ));
        }
        let key = *key;
        let writer = || {
            match hand_off {
                true => store.handed_writer(build),
                false => store.object_writer(),
            }
            .map_err(|e| format!("cannot write into the cache: {e}"))
        };
        let mut handed = None;
        let computed = match node {
            Node::Fuse(f) => {
                let out = writer()?;
                handed = hand_off.then(|| out.path().to_owned());
                fuse::fuse(&backend, &store, &mut inputs, f, None, &job, out)
            }
            Node::Refactor { fuse: f, refactor } => fuse::fuse(
                &backend,
                &store,
                &mut inputs,
                f,
                Some(refactor),
                &job,
                writer()?,
            ),
            Node::Copy { .. } => Err(EngineError::Shape("a copied tensor is not computed".into())),
            step => align::step(&backend, &store, &mut inputs, step, job.fsync),
        };
        let entry = match computed {
            Ok(entry) => entry,
            Err(EngineError::NonFinite { index, what }) => {
                answer(&Reply::NonFinite(NonFinite {
                    tensor: name.clone(),
                    index,
                    what: what.into(),
                }))?;
                // The build explains it; nothing to add here.
                return Err(String::new());
            }
            Err(e) => return Err(format!("`{name}` ({}): {e}", key.hex())),
        };
        if handed.is_none() {
            store
                .put_action(&key, &entry)
                .map_err(|e| format!("cannot record `{name}` in the cache: {e}"))?;
        }
        answer(&Reply::Done(Done { key, entry, handed }))?;
    }
    Ok(())
}

/// `modelforge-engine score`: one [`ScoreJob`] in, one line of [`Scores`] out.
fn score(request: &[u8]) -> Result<(), String> {
    let job: ScoreJob =
        serde_json::from_slice(request).map_err(|e| format!("malformed job: {e}"))?;
    let backend = backend::Backend::select(job.device).map_err(|e| e.to_string())?;
    // One forward pass at a time: LibTorch's own threads share each product over the cores.
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
    let scores =
        modelforge_engine::score::score(&job, backend.device).map_err(|e| e.to_string())?;
    let line = serde_json::to_string(&scores).expect("scores serialise");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|e| format!("cannot answer: {e}"))
}
