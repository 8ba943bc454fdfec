//! `modelforge-engine`: computes the tensors a build asks for (a JSON job on standard input),
//! block of rows by block of rows, writes each result into the cache (or, for a task to hand off,
//! into a file the build settles), and answers one JSON line
//! per finished tensor. It is the only modelforge program that loads LibTorch; `modelforge`
//! starts it only when some tensor must be computed.
use std::io::{BufRead, Read, Write};

use modelforge_core::job::{Done, Handed, Job, NonFinite, Reply, ScoreJob, Task, SLOT_BYTES};
use modelforge_core::node::Node;
use modelforge_core::store::{ActionEntry, Store};
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
    // A result is recorded (unless handed to the build) and answered as soon as it is
    // complete: for a streamed tensor, on its writer's thread.
    let done = {
        let store = store.clone();
        move |tag: &Tag, entry: &ActionEntry| -> Result<(), EngineError> {
            if tag.handed.is_none() {
                store.put_action(&tag.key, entry).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot record it in the cache: {e}"))
                })?;
            }
            answer(&Reply::Done(Done {
                key: tag.key,
                entry: *entry,
                handed: tag.handed.clone(),
            }))
            .map_err(|e| EngineError::Io(std::io::Error::other(e)))
        }
    };
    let done = std::sync::Arc::new(done);
    let mut pipeline = fuse::Pipeline::new(done.clone());
    // Results to hand off live as long as the build that asked for them.
    let build = std::os::unix::process::parent_id();
    // In the job's order: each node after those it reads. Tensors fused block by block go
    // through the pipeline, the next one started while the one before finishes; any other
    // node waits until it is empty, so that what it reads from the cache is there.
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
        let cannot_write = |e: std::io::Error| format!("cannot write into the cache: {e}");
        let writer = || store.object_writer().map_err(cannot_write);
        let mut tag = Tag {
            name: name.clone(),
            key: *key,
            handed: None,
        };
        let computed = match node {
            Node::Fuse(f) => {
                let slot = match hand_off {
                    true => {
                        let numel: u64 = f.origin.shape.iter().map(|&d| d as u64).product();
                        slots.take(numel * f.dtype.bitsize() as u64 / 8)
                    }
                    false => None,
                };
                let out = match slot {
                    Some((slot, file)) => {
                        tag.handed = Some(Handed::Slot(slot));
                        store.slot_writer(file).map_err(cannot_write)?
                    }
                    None if !hand_off => writer()?,
                    None => {
                        let out = store.handed_writer(build).map_err(cannot_write)?;
                        tag.handed = Some(Handed::File(out.path().to_owned()));
                        out
                    }
                };
                match fuse::start(&backend, &store, &mut inputs, f, None, &job, out) {
                    Ok(fuse::Started::Streamed(stream)) => {
                        if let Some(outcome) = pipeline.push(backend, stream, tag) {
                            settled(outcome.map(drop))?;
                        }
                        continue;
                    }
                    Ok(fuse::Started::Done(entry)) => Ok(entry),
                    Err(e) => Err(e),
                }
            }
            Node::Refactor { fuse: f, refactor } => {
                drain(&mut pipeline)?;
                fuse::fuse(
                    &backend,
                    &store,
                    &mut inputs,
                    f,
                    Some(refactor),
                    &job,
                    writer()?,
                )
            }
            Node::Copy { .. } => Err(EngineError::Shape("a copied tensor is not computed".into())),
            step => {
                drain(&mut pipeline)?;
                align::step(&backend, &store, &mut inputs, step, job.fsync)
            }
        };
        // Those streamed before this one come first, errors included.
        drain(&mut pipeline)?;
        settled(
            computed
                .and_then(|entry| done(&tag, &entry))
                .map_err(|e| (tag, e)),
        )?;
    }
    drain(&mut pipeline)
}

/// A result, known by its node and where it was handed.
#[derive(Clone)]
struct Tag {
    name: String,
    key: modelforge_core::digest::NodeKey,
    handed: Option<Handed>,
}

/// One line of JSON on standard output (a [`Reply`], or a score job's [`Scores`]).
fn answer(reply: &impl serde::Serialize) -> Result<(), String> {
    let line = serde_json::to_string(reply).expect("an answer serialises");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|e| format!("cannot answer: {e}"))
}

/// What a node's outcome means for the engine: a result (already answered) lets it go on; a
/// non-finite result is answered, for the build to explain; any other error stops it.
fn settled(outcome: Result<(), (Tag, EngineError)>) -> Result<(), String> {
    match outcome {
        Ok(_) => Ok(()),
        Err((tag, EngineError::NonFinite { index, what })) => {
            answer(&Reply::NonFinite(NonFinite {
                tensor: tag.name,
                index,
                what: what.into(),
            }))?;
            // The build explains it; nothing to add here.
            Err(String::new())
        }
        Err((tag, e)) => Err(format!("`{}` ({}): {e}", tag.name, tag.key.hex())),
    }
}

/// Waits for every tensor in the pipeline, in order.
fn drain(pipeline: &mut fuse::Pipeline<Tag>) -> Result<(), String> {
    while let Some(outcome) = pipeline.oldest() {
        settled(outcome.map(drop))?;
    }
    Ok(())
}

/// The slots of shared memory the build lent (see [`Job::slots`]): which are free, and the
/// numbers the build writes on standard input as it gives them back.
struct Slots {
    files: Vec<std::fs::File>,
    free: Vec<usize>,
    given_back: std::sync::mpsc::Receiver<usize>,
    /// Whether a task waits for a slot when none is free (see [`Slots::take`]).
    patient: bool,
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
            patient: true,
        })
    }

    /// A free slot for a result of `bytes`, if it fits one. With none free, the engine
    /// waits up to [`PATIENCE`] for the build to give one back. The build writes results in
    /// the order they are computed and gives each slot back once written, so the engine waits
    /// only where it is ahead of that writing, and computing further ahead would take CPU
    /// time the writing needs (a result handed in a file costs page-cache pages, allocated
    /// and freed anew). A wait that times out means that the build is busy with something
    /// else (writing tensors it copies, or results in another order): the engine then hands
    /// what finds no free slot in a file, without waiting, until the build gives a slot back.
    fn take(&mut self, bytes: u64) -> Option<(usize, std::fs::File)> {
        if self.files.is_empty() || bytes > SLOT_BYTES {
            return None;
        }
        while let Ok(slot) = self.given_back.try_recv() {
            self.give_back(slot);
        }
        if self.free.is_empty() && self.patient {
            match self.given_back.recv_timeout(PATIENCE) {
                Ok(slot) => self.give_back(slot),
                Err(_) => self.patient = false,
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

    fn give_back(&mut self, slot: usize) {
        self.patient = true;
        if slot < self.files.len() && !self.free.contains(&slot) {
            self.free.push(slot);
        }
    }
}

/// How long the engine waits for a slot (see [`Slots::take`]); the build writes a result in
/// milliseconds.
const PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);

/// `modelforge-engine score`: one [`ScoreJob`] in, one line of [`Scores`] out.
fn score(request: &[u8]) -> Result<(), String> {
    let job: ScoreJob =
        serde_json::from_slice(request).map_err(|e| format!("malformed job: {e}"))?;
    let backend = backend::Backend::select(job.device).map_err(|e| e.to_string())?;
    // One forward pass at a time: LibTorch's own threads share each product over the cores.
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
    let scores =
        modelforge_engine::score::score(&job, backend.device).map_err(|e| e.to_string())?;
    answer(&scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(count: usize) -> (Slots, std::sync::mpsc::Sender<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let files = (0..count)
            .map(|i| std::fs::File::create(dir.path().join(i.to_string())).unwrap())
            .collect();
        let (give, given_back) = std::sync::mpsc::channel();
        let slots = Slots {
            free: (0..count).collect(),
            files,
            given_back,
            patient: true,
        };
        (slots, give)
    }

    /// With every slot taken, a task waits for one to come back; when none comes back in
    /// time, that task and the next ones go without one at once, until the build gives one
    /// back. A result larger than a slot never takes one.
    #[test]
    fn a_task_waits_for_a_slot_until_a_wait_comes_to_nothing() {
        let (mut slots, give) = slots(2);
        assert!(slots.take(SLOT_BYTES + 1).is_none());
        let (a, _) = slots.take(10).unwrap();
        let (b, _) = slots.take(10).unwrap();
        assert_ne!(a, b);
        // Given back while the next task waits.
        let giver = std::thread::spawn({
            let give = give.clone();
            move || {
                std::thread::sleep(PATIENCE / 10);
                give.send(a).unwrap();
            }
        });
        assert_eq!(slots.take(10).map(|(slot, _)| slot), Some(a));
        giver.join().unwrap();
        // Nothing comes back: one wait, then none.
        let waited = std::time::Instant::now();
        assert!(slots.take(10).is_none());
        assert!(waited.elapsed() >= PATIENCE);
        let waited = std::time::Instant::now();
        assert!(slots.take(10).is_none());
        assert!(waited.elapsed() < PATIENCE / 2);
        // A slot given back: taken, and the next task waits again.
        give.send(b).unwrap();
        assert_eq!(slots.take(10).map(|(slot, _)| slot), Some(b));
        let waited = std::time::Instant::now();
        assert!(slots.take(10).is_none());
        assert!(waited.elapsed() >= PATIENCE);
    }
}
