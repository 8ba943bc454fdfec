//! Running `modelforge-engine`, the separate program that links LibTorch: starting LibTorch
//! costs about 0.2 s and 115 MB, which a build that computes nothing never pays.
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use super::job::{Handed, Job, NonFinite, Reply, ScoreJob, Scores, SLOTS};
use super::ExecError;
use crate::digest::{FileDigest, NodeKey};
use crate::store::{ActionEntry, Store, VerifyingReader, Within};

const NAME: &str = "modelforge-engine";

/// `MODELFORGE_ENGINE`, else `modelforge-engine` beside this executable, else on PATH.
fn engine_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MODELFORGE_ENGINE").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(NAME)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(NAME))
}

/// A running engine. A thread reads its answers, so that the build can assemble the output
/// while the engine computes: [`Engine::wait_for`] blocks until one node is in the cache.
pub(crate) struct Engine {
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Its standard error, passed on to the build's.
    stderr: Option<HeldStderr>,
    state: Arc<(Mutex<State>, Condvar)>,
    path: PathBuf,
    expected: usize,
    /// The shared memory lent to the engine (see [`Job::slots`]).
    slots: Vec<File>,
    /// Where slots are given back to the engine.
    stdin: Mutex<Option<ChildStdin>>,
    /// Where results go that no shard settled (see [`Engine::settle`]).
    store: Store,
    fsync: bool,
}

#[derive(Default)]
struct State {
    done: HashSet<NodeKey>,
    /// Results handed to the build, not yet settled: their entry and where they are.
    handed: HashMap<NodeKey, (ActionEntry, Handed)>,
    /// Handed results written where the build needs them, whose files are gone: their entry,
    /// until the shard holding them is complete.
    consumed: HashMap<NodeKey, ActionEntry>,
    /// The engine refused a result holding NaN or infinity.
    refused: Option<NonFinite>,
    /// The engine's standard output is closed: nothing more will come.
    closed: bool,
    /// How long the engine ran (until it closed its output).
    seconds: f64,
    /// How long [`Engine::wait_for`] blocked, in all.
    waited: f64,
}

/// What the engine did.
pub(crate) struct Run {
    /// The engine's peak resident memory, in bytes.
    pub peak_rss: u64,
    pub seconds: f64,
    /// How long the build waited for the engine's results.
    pub waited: f64,
}

/// An engine process waiting for its job: started before the build knows what to compute, so
/// that LibTorch loads (about 0.2 s) while the build resolves the recipe and hashes its inputs.
/// Dropped unused, it is killed before it reads anything, and whatever it wrote to its standard
/// error is dropped with it: an engine that cannot load LibTorch says so only in a build that
/// needs it.
pub(crate) struct Spawned {
    child: Option<Child>,
    path: PathBuf,
    stderr: Option<HeldStderr>,
    slots: Vec<File>,
}

/// The engine started with `args`, reading its job on a pipe and answering on another; its
/// standard error as `stderr` says.
fn start(args: &[&str], stderr: Stdio) -> Result<(Child, PathBuf), ExecError> {
    let path = engine_path();
    let child = Command::new(&path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| ExecError::Engine {
            message: format!("cannot start `{}`: {e}", path.display()),
            help: "`cargo build` builds modelforge-engine beside modelforge; or point MODELFORGE_ENGINE at it".into(),
        })?;
    Ok((child, path))
}

impl Spawned {
    pub fn new() -> Result<Spawned, ExecError> {
        // Inherited by the engine, and by no later child of the build. Where shared memory
        // cannot be had, results are handed in files.
        let slots: Vec<File> = (0..SLOTS).map_while(|_| shared_memory().ok()).collect();
        let started = start(&[], Stdio::piped());
        for slot in &slots {
            // SAFETY: F_SETFD on a descriptor this process owns changes only its flags.
            unsafe { libc::fcntl(slot.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let (mut child, path) = started?;
        let stderr = child
            .stderr
            .take()
            .map(|from| HeldStderr::new(from, Box::new(std::io::stderr())));
        Ok(Spawned {
            child: Some(child),
            path,
            stderr,
            slots,
        })
    }
}

/// An anonymous file in memory that a child process inherits.
fn shared_memory() -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string; without MFD_CLOEXEC the descriptor stays
    // open across exec.
    let fd = unsafe { libc::memfd_create(c"modelforge-slot".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created, and only this File closes it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Killed before its input closes: an engine that read an empty job would complain.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What an engine said before its job (`None` once released), and where it all goes.
type Passing = Arc<Mutex<(Option<Vec<u8>>, Box<dyn Write + Send>)>>;

/// The engine's standard error, held back until the build gives it a job, then passed on to
/// this process's own as it comes.
struct HeldStderr {
    shared: Passing,
    thread: std::thread::JoinHandle<()>,
}

impl HeldStderr {
    fn new(mut from: impl std::io::Read + Send + 'static, to: Box<dyn Write + Send>) -> HeldStderr {
        let shared = Arc::new(Mutex::new((Some(Vec::new()), to)));
        let passing = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = match from.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut guard = passing.lock().unwrap_or_else(|e| e.into_inner());
                let (held, to) = &mut *guard;
                match held.as_mut() {
                    Some(buffer) => buffer.extend_from_slice(&chunk[..n]),
                    None => {
                        let _ = to.write_all(&chunk[..n]);
                    }
                }
            }
        });
        HeldStderr { shared, thread }
    }

    /// Writes what was held and passes on the rest from now on.
    fn release(&self) {
        let mut guard = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let (held, to) = &mut *guard;
        if let Some(buffer) = held.take() {
            let _ = to.write_all(&buffer);
        }
    }

    /// Waits until the engine's standard error is closed and all of it passed on.
    fn finish(self) {
        self.release();
        let _ = self.thread.join();
    }
}

impl Engine {
    /// Starts the engine on `job` (in `spawned`, when the build started one early); its
    /// results land in the cache one by one, or, for the tasks it hands off, in files the
    /// build settles.
    pub fn start(
        mut job: Job,
        store: &Store,
        progress: bool,
        spawned: Option<Spawned>,
    ) -> Result<Engine, ExecError> {
        let mut spawned = match spawned {
            Some(spawned) => spawned,
            None => Spawned::new()?,
        };
        let (mut child, path, stderr, slots) = (
            spawned
                .child
                .take()
                .expect("a spawned engine has its process"),
            spawned.path.clone(),
            spawned.stderr.take(),
            std::mem::take(&mut spawned.slots),
        );
        job.slots = slots.iter().map(|slot| slot.as_raw_fd()).collect();
        if let Some(stderr) = &stderr {
            stderr.release();
        }
        // The engine's time counts from its job, not from its start (which may have been
        // early, while the build resolved).
        let started = std::time::Instant::now();
        // One line (JSON escapes the line breaks in strings); the engine's standard input
        // stays open for the slots given back.
        let mut request = serde_json::to_vec(&job).expect("a job serialises");
        request.push(b'\n');
        let mut stdin = child.stdin.take();
        if let Some(pipe) = &mut stdin {
            // A failed write means the engine died; its exit status says why.
            let _ = pipe.write_all(&request);
        }
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let bar = super::progress_bar(job.nodes.len(), "fusing ", progress);
        let stdout = child.stdout.take();
        let shared = state.clone();
        let reader = std::thread::spawn(move || {
            let (lock, changed) = &*shared;
            for line in stdout
                .into_iter()
                .flat_map(|out| BufReader::new(out).lines())
            {
                let Ok(line) = line else { break };
                let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                match serde_json::from_str::<Reply>(&line) {
                    Ok(Reply::Done(done)) => {
                        state.done.insert(done.key);
                        if let Some(path) = done.handed {
                            state.handed.insert(done.key, (done.entry, path));
                        }
                        bar.inc(1);
                    }
                    Ok(Reply::NonFinite(found)) => state.refused = Some(found),
                    Err(_) => {}
                }
                changed.notify_all();
            }
            bar.finish_and_clear();
            let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
            state.closed = true;
            state.seconds = started.elapsed().as_secs_f64();
            changed.notify_all();
        });
        Ok(Engine {
            child,
            reader: Some(reader),
            stderr,
            state,
            path,
            expected: job.nodes.len(),
            slots,
            stdin: Mutex::new(stdin),
            store: store.clone(),
            fsync: job.fsync,
        })
    }

    /// Whether the engine handed the result of `key` over, and no shard has settled it yet.
    pub fn handed(&self, key: &NodeKey) -> bool {
        let (lock, _) = &*self.state;
        let state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.handed.contains_key(key)
    }

    /// Opens the result of `key` if the engine handed it over and no shard has settled it
    /// yet: its entry, where it is (for messages) and its bytes (`None` if they cannot be
    /// opened).
    pub fn open_handed(
        &self,
        key: &NodeKey,
    ) -> Option<(ActionEntry, PathBuf, Option<VerifyingReader>)> {
        let (entry, handed) = {
            let (lock, _) = &*self.state;
            let state = lock.lock().unwrap_or_else(|e| e.into_inner());
            state.handed.get(key).cloned()?
        };
        Some(match handed {
            Handed::File(path) => {
                let reader = VerifyingReader::open_handed(&path, &entry);
                (entry, path, reader)
            }
            Handed::Slot(slot) => {
                let reader = self
                    .slots
                    .get(slot)
                    .and_then(|file| VerifyingReader::open_slot(file.try_clone().ok()?, &entry));
                (
                    entry,
                    PathBuf::from(format!("(the engine's slot {slot})")),
                    reader,
                )
            }
        })
    }

    /// Lets go of a handed result's bytes: its file is removed, its slot given back.
    fn release(&self, handed: Handed) {
        match handed {
            Handed::File(path) => {
                let _ = std::fs::remove_file(path);
            }
            Handed::Slot(slot) => {
                let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(pipe) = stdin.as_mut() {
                    // An engine that stopped reading has finished: nothing to give back to.
                    let _ = writeln!(pipe, "{slot}").and_then(|_| pipe.flush());
                }
            }
        }
    }

    /// The build has written the handed result `key` everywhere it needs it: its file goes
    /// now, seconds after it was written, so that the kernel (which writes dirty pages back
    /// after 30 s, or under memory pressure) usually never writes it, and its bytes reach the
    /// disk once, in the shard. Its entry waits for [`Engine::settle`]; a build that stops before then (or
    /// whose shard cannot be linked into the cache) computes it again next time.
    pub fn consume(&self, key: &NodeKey) {
        let (lock, _) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((entry, handed)) = state.handed.remove(key) {
            state.consumed.insert(*key, entry);
            drop(state);
            self.release(handed);
        }
    }

    /// Records the handed results written into the shard `object` (already adopted by the
    /// store) at the offsets given, and removes the files of those not yet consumed.
    pub fn settle(&self, object: FileDigest, placed: &[(NodeKey, u64)]) -> std::io::Result<()> {
        let entries: Vec<(NodeKey, ActionEntry)> = {
            let (lock, _) = &*self.state;
            let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
            placed
                .iter()
                .filter_map(|(key, offset)| {
                    let entry = match (state.consumed.remove(key), state.handed.remove(key)) {
                        (Some(entry), _) => entry,
                        (None, Some((entry, handed))) => {
                            self.release(handed);
                            entry
                        }
                        (None, None) => return None,
                    };
                    let within = Some(Within {
                        object,
                        offset: *offset,
                    });
                    Some((*key, ActionEntry { within, ..entry }))
                })
                .collect()
        };
        // A file each, created on every core: a shard's worth of entries written one by one
        // (154 for the benchmark's one-shard output) took about 50 ms under strace at the end
        // of the build, with nothing else left to run beside it.
        use rayon::prelude::*;
        entries
            .par_iter()
            .try_for_each(|(key, entry)| self.store.put_action(key, entry))
    }

    /// Makes every handed result no shard settled an object of its own: a build that stops
    /// early, or whose shards could not be linked into the cache, still caches what the
    /// engine computed. Caching is all this is: a result that cannot be promoted (its file
    /// gone, the cache unwritable) is dropped and computed again by the next build that needs
    /// it, and fails nothing.
    fn promote_rest(&self) {
        let (lock, _) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        for (key, (entry, handed)) in std::mem::take(&mut state.handed) {
            let promoted = match &handed {
                Handed::File(path) => self.store.promote(path, &key, &entry, self.fsync),
                Handed::Slot(slot) => match self.slots.get(*slot) {
                    Some(file) => self.store.promote_slot(file, &key, &entry, self.fsync),
                    None => Err(std::io::Error::other("no such slot")),
                },
            };
            if promoted.is_err() {
                self.release(handed);
            }
        }
    }

    /// Whether this engine computed `key` (so far).
    pub fn computed(&self, key: &NodeKey) -> bool {
        let (lock, _) = &*self.state;
        let state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.done.contains(key)
    }

    /// Blocks until the engine has put `key` in the cache; `false` if it stopped without.
    pub fn wait_for(&self, key: &NodeKey) -> bool {
        let (lock, changed) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        let started = std::time::Instant::now();
        let done = loop {
            if state.done.contains(key) {
                break true;
            }
            if state.closed {
                break false;
            }
            state = changed.wait(state).unwrap_or_else(|e| e.into_inner());
        };
        state.waited += started.elapsed().as_secs_f64();
        done
    }

    /// Waits for the engine to exit; an error if it did not compute everything it was given.
    pub fn finish(mut self) -> Result<Run, ExecError> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        // Nothing more to give back: the engine has answered for everything.
        drop(self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
        let (status, peak_rss) = wait_with_peak(&self.child).map_err(|e| ExecError::Engine {
            message: e.to_string(),
            help: "the engine could not be waited for".into(),
        })?;
        // All it said is out before the build says anything about it.
        if let Some(stderr) = self.stderr.take() {
            stderr.finish();
        }
        self.promote_rest();
        let (lock, _) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = state.refused.take() {
            return Err(ExecError::NonFinite {
                tensor: found.tensor,
                what: found.what,
                index: found.index,
                src: None,
                weights: Vec::new(),
            });
        }
        let done = state.done.len();
        if !status.success() || done != self.expected {
            return Err(ExecError::Engine {
                message: format!(
                    "`{}` stopped ({status}) after {done} of {} tensors",
                    self.path.display(),
                    self.expected
                ),
                help: "its own message is above; what it finished is cached, so the next build resumes there".into(),
            });
        }
        Ok(Run {
            peak_rss,
            seconds: state.seconds,
            waited: state.waited,
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A build that fails while the engine runs (the output could not be written, say)
        // stops it; a finished engine is already reaped, and this does nothing.
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
            if let Some(stderr) = self.stderr.take() {
                stderr.finish();
            }
            self.promote_rest();
        }
    }
}

/// Runs `modelforge-engine score` on `job`: the forward pass `modelforge score` asks for.
pub(crate) fn score(job: &ScoreJob) -> Result<Scores, ExecError> {
    let failed = |message: String| ExecError::Engine {
        message,
        help: "its own message is above, if it said one".into(),
    };
    let (mut child, path) = start(&["score"], Stdio::inherit())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A failed write means the engine died; its exit status says why.
        let _ = stdin.write_all(&serde_json::to_vec(job).expect("a job serialises"));
    }
    let output = child
        .wait_with_output()
        .map_err(|e| failed(format!("`{}` could not be waited for: {e}", path.display())))?;
    if !output.status.success() {
        return Err(failed(format!(
            "`{}` stopped ({})",
            path.display(),
            output.status
        )));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| {
        failed(format!(
            "`{}` answered what is not scores: {e}",
            path.display()
        ))
    })
}

/// Waits for `child` like `Child::wait`, also returning its peak resident memory in bytes.
fn wait_with_peak(child: &std::process::Child) -> std::io::Result<(ExitStatus, u64)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, and zero is a valid value of it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our child; status and usage are valid for writes.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            // ru_maxrss is in kilobytes on Linux.
            return Ok((ExitStatus::from_raw(status), usage.ru_maxrss as u64 * 1024));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// This process's own peak resident memory, in bytes.
pub(crate) fn own_peak_rss() -> u64 {
    // SAFETY: as above; getrusage only writes into usage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &Sink) -> String {
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    /// What an engine says before its job is held, and said only once it has one; what it
    /// says after passes straight on. Unreleased, it is never said.
    #[test]
    fn an_engine_says_nothing_until_it_has_a_job() {
        let spawn = || {
            Command::new("sh")
                .args(["-c", "echo before >&2; read line; echo after >&2"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut child = spawn();
        let sink = Sink::default();
        let held = HeldStderr::new(child.stderr.take().unwrap(), Box::new(sink.clone()));
        // Until the engine's first words are read and held.
        while held.shared.lock().unwrap().0.as_ref().unwrap().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(text(&sink), "");
        held.release();
        assert_eq!(text(&sink), "before\n");
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        child.wait().unwrap();
        held.finish();
        assert_eq!(text(&sink), "before\nafter\n");

        // Never released: killed, and what it said goes with it.
        let mut child = spawn();
        let sink = Sink::default();
        let held = HeldStderr::new(child.stderr.take().unwrap(), Box::new(sink.clone()));
        while held.shared.lock().unwrap().0.as_ref().unwrap().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = held.thread.join();
        assert_eq!(text(&sink), "");
    }
}
