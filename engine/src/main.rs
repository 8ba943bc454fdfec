//! `modelforge-engine`: computes the tensors a build asks for (a JSON job on standard input),
//! block of rows by block of rows, writes each result into the cache, and answers one JSON line
//! per finished tensor. It is the only modelforge program that loads LibTorch; `modelforge`
//! starts it only when some tensor must be computed.
use std::io::{Read, Write};
use std::process::ExitCode;

use modelforge_core::job::{Done, Job, NonFinite, Reply};
use modelforge_core::store::Store;
use modelforge_engine::{align, backend, fuse};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("modelforge-engine: {message}");
            }
            ExitCode::FAILURE
        }
    }
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
    let job: Job = serde_json::from_slice(&request).map_err(|e| format!("malformed job: {e}"))?;
    let backend = backend::Backend::select(job.device)?;
    let store = Store::open(&job.cache)
        .map_err(|e| format!("cannot open the cache `{}`: {e}", job.cache.display()))?;
    let mut inputs = fuse::Inputs::default();
    let stdout = std::io::stdout();
    let answer = |reply: &Reply| {
        let line = serde_json::to_string(reply).expect("a reply serialises");
        let mut out = stdout.lock();
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(|e| format!("cannot answer: {e}"))
    };
    // Alignment maps first: the aligned deltas read them, and the tensors read those.
    for step in &job.align {
        let key = step.key();
        let entry = align::step(&backend, &store, &mut inputs, step, job.fsync)
            .map_err(|e| format!("alignment node {}: {e}", key.hex()))?;
        store
            .put_action(&key, &entry)
            .map_err(|e| format!("cannot record alignment node {}: {e}", key.hex()))?;
        answer(&Reply::Done(Done { key, entry }))?;
    }
    for tensor in &job.tensors {
        let entry = match fuse::fuse(
            &backend,
            &store,
            &mut inputs,
            tensor,
            job.budget,
            job.fsync,
            job.check_finite,
        ) {
            Ok(entry) => entry,
            Err(fuse::FuseError::Io(e)) => return Err(format!("`{}`: {e}", tensor.name)),
            Err(fuse::FuseError::NonFinite { index, what }) => {
                answer(&Reply::NonFinite(NonFinite {
                    tensor: tensor.name.clone(),
                    index,
                    what: what.into(),
                }))?;
                // The build explains it; nothing to add here.
                return Err(String::new());
            }
        };
        store
            .put_action(&tensor.key, &entry)
            .map_err(|e| format!("cannot record `{}` in the cache: {e}", tensor.name))?;
        answer(&Reply::Done(Done {
            key: tensor.key,
            entry,
        }))?;
    }
    Ok(())
}
