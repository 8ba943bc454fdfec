//! `modelforge-engine`: computes the tensors a build asks for (a JSON job on standard input),
//! block of rows by block of rows, writes each result into the cache (or, for a task to hand off,
//! into a file the build settles), and answers one JSON line
//! per finished tensor. It is the only modelforge program that loads LibTorch; `modelforge`
//! starts it only when some tensor must be computed.
use std::io::{BufRead, Read, Write};

use modelforge_core::job::{Done, Handed, Job, NonFinite, Reply, ScoreJob, Task, SLOT_BYTES};
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
    let mut stdin = std::io::stdin().lock();
    let mut request = Vec::new();
    if std::env::args().nth(1).as_deref() == Some("score") {
        stdin
            .read_to_end(&mut request)
            .map_err(|e| format!("cannot read the job: {e}"))?;
        return score(&request);
    }
    // The job is the first line; what follows are the slots the build gives back.
    stdin
        .read_until(b'\n', &mut request)
        .map_err(|e| format!("cannot read the job: {e}"))?;
    drop(stdin);
    let job: Job = serde_json::from_slice(&request).map_err(|e| format!("malformed job: {e}"))?;
    let mut slots = Slots::inherit(&job.slots)?;
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
        let cannot_write = |e: std::io::Error| format!("cannot write into the cache: {e}");
        let writer = || store.object_writer().map_err(cannot_write);
        let mut handed = None;
        let computed = match node {
            Node::Fuse(f) => {
                let out = match (hand_off, slots.take(f)) {
                    (false, _) => writer()?,
                    (true, Some((slot, file))) => {
                        handed = Some(Handed::Slot(slot));
                        store.slot_writer(file).map_err(cannot_write)?
                    }
                    (true, None) => {
                        let out = store.handed_writer(build).map_err(cannot_write)?;
                        handed = Some(Handed::File(out.path().to_owned()));
                        out
                    }
                };
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

/// The slots of shared memory the build lent (see [`Job::slots`]): which are free, and the
/// numbers the build writes on standard input as it gives them back.
struct Slots {
    files: Vec<std::fs::File>,
    free: Vec<usize>,
    given_back: std::sync::mpsc::Receiver<usize>,
}

impl Slots {
    fn inherit(fds: &[i32]) -> Result<Slots, String> {
        use std::os::fd::FromRawFd;
        let mut files = Vec::new();
        for &fd in fds {
            // The slot must be a descriptor this process holds: fstat says so without
            // touching it.
            // SAFETY: fstat only writes into `stat`, which is plain data.
            let mut stat: libc::stat = unsafe { std::mem::zeroed() };
            if fd < 0 || unsafe { libc::fstat(fd, &mut stat) } != 0 {
                return Err(format!(
                    "the job names slot {fd}, which this engine did not inherit"
                ));
            }
            // SAFETY: the descriptor is open (above), and only this File closes it.
            files.push(unsafe { std::fs::File::from_raw_fd(fd) });
        }
        let (give, given_back) = std::sync::mpsc::channel();
        if !files.is_empty() {
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    match line.trim().parse() {
                        Ok(slot) if give.send(slot).is_ok() => {}
                        _ => break,
                    }
                }
            });
        }
        Ok(Slots {
            free: (0..files.len()).collect(),
            files,
            given_back,
        })
    }

    /// A free slot for `tensor`'s result, if one is free now and the result fits; the engine
    /// never waits for one.
    fn take(&mut self, tensor: &modelforge_core::node::Fuse) -> Option<(usize, std::fs::File)> {
        let numel: u64 = tensor.origin.shape.iter().map(|&d| d as u64).product();
        if numel * tensor.dtype.bitsize() as u64 / 8 > SLOT_BYTES {
            return None;
        }
        while let Ok(slot) = self.given_back.try_recv() {
            if slot < self.files.len() && !self.free.contains(&slot) {
                self.free.push(slot);
            }
        }
        let slot = self.free.pop()?;
        match self.files[slot].try_clone() {
            Ok(file) => Some((slot, file)),
            Err(_) => {
                self.free.push(slot);
                None
            }
        }
    }
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
