//! A shared remote cache: node results on S3-compatible storage or a shared folder, so that a
//! teammate or a CI runner pulls what another machine computed instead of computing it.
//!
//! ```text
//! PREFIX/modelforge/v1/cas/ab/abcdef…   an object's bytes, named by their blake3 digest
//! PREFIX/modelforge/v1/ac/12/12ab…      node key → the action entry of the object it produced
//! ```
//!
//! Every object pulled is checked against its digest as it is written into the local cache, and
//! recorded there only if it matches: a damaged remote object never reaches an output or the
//! local cache. Objects are pushed before the entries naming them, both created only if absent,
//! so a reader never sees an entry without its object and two machines pushing the same build
//! agree. Only the store's address is ever shown; credentials come from the standard AWS
//! variables and are never printed or recorded.
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::digest::{NodeKey, TensorDigest};
use crate::store::{ActionEntry, Store, VerifyingReader};

/// Bumped when the remote layout changes; other layouts are ignored, never misread.
const LAYOUT: &str = "modelforge/v1";
/// Objects larger than this are read in ranges of this size, several at once; objects larger
/// than [`SINGLE_PUT`] are written in parts of this size.
const PART: u64 = 16 << 20;
/// Objects up to this size are written in one conditional PUT. A multipart upload's parts are
/// assembled by the server, which a file-backed one does by copying them; in memory this holds
/// no more than the parts a multipart upload keeps in flight (8 of [`PART`]).
const SINGLE_PUT: u64 = 8 * PART;
/// Requests in flight at once.
const CONCURRENCY: usize = 8;

/// Why the remote cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    #[error("`{0}` is not a remote cache address: use `s3://BUCKET/PREFIX` or `file:///DIR`")]
    Address(String),
    #[error("cannot use the remote `{url}`: {message}")]
    Unusable { url: String, message: String },
    #[error("the local cache: {0}")]
    Local(#[from] std::io::Error),
}

/// What a pull brought.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct Transfer {
    pub objects: usize,
    pub bytes: u64,
}

/// The outcome of pulling a set of nodes.
#[derive(Debug, Default)]
pub(crate) struct Pulled {
    pub transfer: Transfer,
    /// Nodes whose remote object did not match its digest (left out; computed instead).
    pub damaged: Vec<NodeKey>,
    /// Why the remote could not be read, when it could not.
    pub unreachable: Option<String>,
}

pub(crate) struct Remote {
    /// The address as the user gave it (holds no credentials).
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
}

/// Whether `url` has the form of a remote cache's address: `s3://BUCKET[/PREFIX]` or
/// `file:///DIR` (an absolute path).
pub(crate) fn well_formed(url: &str) -> bool {
    if let Some(rest) = url.strip_prefix("s3://") {
        return !rest.split('/').next().unwrap_or("").is_empty();
    }
    url.strip_prefix("file://")
        .is_some_and(|dir| dir.starts_with('/'))
}

impl Remote {
    /// The remote at `url`: `s3://BUCKET/PREFIX` (configured by `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, and `AWS_ALLOW_HTTP=true` for
    /// plain http) or `file:///DIR`. Every request gives up within seconds, so that a remote
    /// that is down costs a build little.
    pub fn open(url: &str) -> Result<Remote, RemoteError> {
        if !well_formed(url) {
            return Err(RemoteError::Address(url.to_owned()));
        }
        let unusable = |message: String| RemoteError::Unusable {
            url: url.to_owned(),
            message,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) =
            if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let allow_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
                let client = object_store::ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(20));
                let retry = object_store::RetryConfig {
                    backoff: object_store::BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(1),
                        base: 2.0,
                    },
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(8),
                };
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(client)
                    .with_retry(retry);
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    builder = builder.with_region("us-east-1");
                }
                // A custom endpoint (a server of one's own) is addressed by path.
                if std::env::var_os("AWS_ENDPOINT_URL").is_some()
                    || std::env::var_os("AWS_ENDPOINT").is_some()
                {
                    builder = builder.with_virtual_hosted_style_request(false);
                }
                let s3 = builder.build().map_err(|e| unusable(e.to_string()))?;
                (Arc::new(s3), prefix.trim_matches('/').to_owned())
            } else if let Some(dir) = url.strip_prefix("file://") {
                std::fs::create_dir_all(dir).map_err(|e| unusable(e.to_string()))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| unusable(e.to_string()))?;
                (Arc::new(local), String::new())
            } else {
                return Err(RemoteError::Address(url.to_owned()));
            };
        let prefix = match prefix.is_empty() {
            true => ObjectPath::from(LAYOUT),
            false => ObjectPath::from(format!("{prefix}/{LAYOUT}")),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(RemoteError::Local)?;
        Ok(Remote {
            url: url.to_owned(),
            store,
            prefix,
            runtime,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn object(&self, digest: &TensorDigest) -> ObjectPath {
        ObjectPath::from(self.object_name(&digest.hex()))
    }

    fn entry(&self, key: &NodeKey) -> ObjectPath {
        let hex = key.hex();
        ObjectPath::from(format!("{}/ac/{}/{hex}", self.prefix, &hex[..2]))
    }

    /// Pulls the nodes `keys` that the remote holds into `store`, each checked against its
    /// digest before it is recorded.
    pub fn pull(&self, store: &Store, keys: &[NodeKey]) -> Pulled {
        // Once one request finds the remote unusable, the others are not tried.
        let down = std::sync::atomic::AtomicBool::new(false);
        self.runtime.block_on(async {
            let results: Vec<(NodeKey, Result<Option<u64>, Fault>)> =
                futures::stream::iter(keys.iter().copied())
                    .map(|key| {
                        let down = &down;
                        async move {
                            if down.load(std::sync::atomic::Ordering::Relaxed) {
                                return (key, Ok(None));
                            }
                            let result = self.pull_one(store, &key).await;
                            if matches!(result, Err(Fault::Unreachable(_))) {
                                down.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                            (key, result)
                        }
                    })
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
            let mut pulled = Pulled::default();
            for (key, result) in results {
                match result {
                    Ok(Some(bytes)) => {
                        pulled.transfer.objects += 1;
                        pulled.transfer.bytes += bytes;
                    }
                    Ok(None) => {}
                    Err(Fault::Damaged) => pulled.damaged.push(key),
                    Err(Fault::Unreachable(message)) => {
                        pulled.unreachable.get_or_insert(message);
                    }
                }
            }
            pulled
        })
    }

    async fn pull_one(&self, store: &Store, key: &NodeKey) -> Result<Option<u64>, Fault> {
        let bytes = match self.store.get(&self.entry(key)).await {
            Ok(got) => got.bytes().await.map_err(Fault::from)?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let remote: ActionEntry = serde_json::from_slice(&bytes).map_err(|_| Fault::Damaged)?;
        // Every remote result is an object of its own, named by its digest.
        let Some(digest) = remote.tensor else {
            return Err(Fault::Damaged);
        };
        let path = self.object(&digest);
        let mut out = store.object_writer().map_err(|_| Fault::Damaged)?;
        download(&*self.store, &path, remote.len, &mut |bytes| {
            out.write(bytes)
                .map_err(|e| Fault::Unreachable(format!("the local cache: {e}")))
        })
        .await?;
        let local = out
            .finish(false)
            .map_err(|e| Fault::Unreachable(format!("the local cache: {e}")))?;
        if local.tensor != remote.tensor || local.len != remote.len {
            // Its bytes are in the local store under their own digest, named by no entry: the
            // next `gc` removes them.
            return Err(Fault::Damaged);
        }
        let entry = ActionEntry {
            energy: remote.energy,
            overlap: remote.overlap,
            ..local
        };
        store
            .put_action(key, &entry)
            .map_err(|e| Fault::Unreachable(format!("the local cache: {e}")))?;
        Ok(Some(local.len))
    }

    /// Pushes the nodes `keys` that `store` holds and the remote lacks: each object (checked as
    /// it is read) before the entry naming it, both created only if absent.
    pub fn push(&self, store: &Store, keys: &[NodeKey]) -> Result<Transfer, RemoteError> {
        self.runtime.block_on(async {
            let results: Vec<Result<Option<u64>, Fault>> = futures::stream::iter(keys)
                .map(|key| self.push_one(store, key))
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            let mut pushed = Transfer::default();
            for result in results {
                match result {
                    Ok(Some(bytes)) => {
                        pushed.objects += 1;
                        pushed.bytes += bytes;
                    }
                    Ok(None) | Err(Fault::Damaged) => {}
                    Err(Fault::Unreachable(message)) => {
                        return Err(RemoteError::Unusable {
                            url: self.url.clone(),
                            message,
                        })
                    }
                }
            }
            Ok(pushed)
        })
    }

    async fn push_one(&self, store: &Store, key: &NodeKey) -> Result<Option<u64>, Fault> {
        let Some(entry) = store.action(key) else {
            return Ok(None);
        };
        match self.store.head(&self.entry(key)).await {
            Ok(_) => return Ok(None),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // A small object is read once, through the check, so that a damaged local object is
        // never pushed; a range of an output shard, which has no digest of its own, is named
        // by one computed from those bytes.
        let read = |entry: &ActionEntry| -> Result<Vec<u8>, Fault> {
            let mut reader = VerifyingReader::open(store, entry).ok_or(Fault::Damaged)?;
            let mut bytes = vec![0u8; entry.len as usize];
            reader.read_exact(&mut bytes).map_err(|_| Fault::Damaged)?;
            if !reader.check() {
                store.evict(entry);
                return Err(Fault::Damaged);
            }
            Ok(bytes)
        };
        let (digest, mut bytes) = match (entry.tensor, entry.len <= SINGLE_PUT) {
            (Some(digest), _) => (digest, None),
            (None, true) => {
                let bytes = read(&entry)?;
                let mut hasher = blake3::Hasher::new();
                crate::digest::hash_into(&mut hasher, &bytes);
                (TensorDigest::new(hasher.finalize()), Some(bytes))
            }
            (None, false) => (digest_of(store, &entry)?, None),
        };
        let path = self.object(&digest);
        let present = match self.store.head(&path).await {
            Ok(meta) => meta.size == entry.len,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        if !present && entry.len <= SINGLE_PUT {
            let bytes = match bytes.take() {
                Some(bytes) => bytes,
                None => read(&entry)?,
            };
            create(&*self.store, &path, bytes.into()).await?;
        } else if !present {
            let Some(mut reader) = VerifyingReader::open(store, &entry) else {
                return Err(Fault::Damaged);
            };
            let upload = self.store.put_multipart(&path).await.map_err(write_fault)?;
            let mut writer =
                object_store::WriteMultipart::new_with_chunk_size(upload, PART as usize);
            let mut left = entry.len;
            let mut buffer = vec![0u8; PART as usize];
            while left > 0 {
                let n = left.min(PART) as usize;
                if reader.read_exact(&mut buffer[..n]).is_err() {
                    writer.abort().await?;
                    return Err(Fault::Damaged);
                }
                writer.write(&buffer[..n]);
                writer.wait_for_capacity(8).await.map_err(write_fault)?;
                left -= n as u64;
            }
            if !reader.check() {
                writer.abort().await?;
                store.evict(&entry);
                return Err(Fault::Damaged);
            }
            writer.finish().await.map_err(write_fault)?;
        }
        // On the remote, every result is an object of its own.
        let remote = ActionEntry {
            tensor: Some(digest),
            check: None,
            within: None,
            ..entry
        };
        let bytes = serde_json::to_vec(&remote).expect("an entry serialises");
        create(&*self.store, &self.entry(key), bytes.into()).await?;
        Ok(Some(entry.len))
    }
}

/// The blake3 of an entry's bytes, read through its check; a damaged object is evicted.
fn digest_of(store: &Store, entry: &ActionEntry) -> Result<TensorDigest, Fault> {
    let mut reader = VerifyingReader::open(store, entry).ok_or(Fault::Damaged)?;
    let mut hasher = blake3::Hasher::new();
    for window in reader.windows(entry.len) {
        crate::digest::hash_into(&mut hasher, &window.map_err(|_| Fault::Damaged)?);
    }
    if !reader.check() {
        store.evict(entry);
        return Err(Fault::Damaged);
    }
    Ok(TensorDigest::new(hasher.finalize()))
}

impl Remote {
    /// Uploads output files (final path, digest) the remote lacks, as objects named by their
    /// digest, each checked as it is read: identical files of different builds are stored once.
    pub fn push_files(
        &self,
        files: &[(std::path::PathBuf, crate::digest::FileDigest)],
    ) -> Result<Transfer, RemoteError> {
        self.runtime.block_on(async {
            let results: Vec<Result<u64, RemoteError>> = futures::stream::iter(files)
                .map(|(path, digest)| self.push_file(path, digest))
                .buffer_unordered(4)
                .collect()
                .await;
            let mut pushed = Transfer::default();
            for len in results {
                let len = len?;
                if len > 0 {
                    pushed.objects += 1;
                    pushed.bytes += len;
                }
            }
            Ok(pushed)
        })
    }

    /// One output file, unless the remote has it: its length, or 0.
    async fn push_file(
        &self,
        path: &std::path::Path,
        digest: &crate::digest::FileDigest,
    ) -> Result<u64, RemoteError> {
        let object = ObjectPath::from(self.object_name(&digest.hex()));
        match self.store.head(&object).await {
            Ok(_) => return Ok(0),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.unusable(e.to_string())),
        }
        upload_file(&*self.store, &object, path, digest)
            .await
            .map_err(|e| match e {
                Fault::Unreachable(m) => self.unusable(m),
                Fault::Damaged => self.unusable(format!(
                    "`{}` changed while it was being uploaded",
                    path.display()
                )),
            })
    }

    /// Downloads the object of each `digest` into a file staged beside `target`, checked
    /// against the digest as it is written; nothing is renamed into place here. An error names
    /// the file that is missing or damaged.
    pub fn fetch_files(
        &self,
        files: &[(crate::digest::FileDigest, std::path::PathBuf)],
    ) -> Result<(Vec<crate::io::atomic::StagedFile>, Transfer), FetchError> {
        self.runtime.block_on(async {
            let results: Vec<Result<(crate::io::atomic::StagedFile, u64), FetchError>> =
                futures::stream::iter(files)
                    .map(|(digest, target)| self.fetch_file(digest, target))
                    .buffer_unordered(4)
                    .collect()
                    .await;
            let mut staged = Vec::new();
            let mut fetched = Transfer::default();
            for result in results {
                let (file, len) = result?;
                fetched.objects += 1;
                fetched.bytes += len;
                staged.push(file);
            }
            Ok((staged, fetched))
        })
    }

    async fn fetch_file(
        &self,
        digest: &crate::digest::FileDigest,
        target: &std::path::Path,
    ) -> Result<(crate::io::atomic::StagedFile, u64), FetchError> {
        let object = ObjectPath::from(self.object_name(&digest.hex()));
        let remote_error = |e: object_store::Error| match e {
            object_store::Error::NotFound { .. } => FetchError::Missing(target.to_owned()),
            e => FetchError::Remote(self.unusable(e.to_string())),
        };
        let len = self.store.head(&object).await.map_err(remote_error)?.size;
        let (file, out) =
            crate::io::atomic::StagedFile::create(target).map_err(|source| FetchError::Local {
                path: target.to_owned(),
                source,
            })?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
        let mut hasher = blake3::Hasher::new();
        let mut local = None;
        let written = download(&*self.store, &object, len, &mut |bytes| {
            crate::digest::hash_into(&mut hasher, bytes);
            std::io::Write::write_all(&mut out, bytes).map_err(|e| {
                local = Some(e);
                Fault::Damaged
            })
        })
        .await;
        if let Some(source) = local {
            return Err(FetchError::Local {
                path: target.to_owned(),
                source,
            });
        }
        match written {
            Ok(()) => {}
            Err(Fault::Damaged) => return Err(FetchError::Missing(target.to_owned())),
            Err(Fault::Unreachable(m)) => return Err(FetchError::Remote(self.unusable(m))),
        }
        std::io::Write::flush(&mut out).map_err(|source| FetchError::Local {
            path: target.to_owned(),
            source,
        })?;
        if crate::digest::FileDigest::new(hasher.finalize()) != *digest {
            return Err(FetchError::Damaged(target.to_owned()));
        }
        Ok((file, len))
    }

    fn object_name(&self, hex: &str) -> String {
        format!("{}/cas/{}/{hex}", self.prefix, &hex[..2])
    }

    fn unusable(&self, message: String) -> RemoteError {
        RemoteError::Unusable {
            url: self.url.clone(),
            message,
        }
    }
}

/// Why an output could not be fetched from the remote.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("the remote cache has no object for `{}`", .0.display())]
    Missing(std::path::PathBuf),
    #[error("the remote cache's object for `{}` does not match the lock's digest", .0.display())]
    Damaged(std::path::PathBuf),
    #[error(transparent)]
    Remote(RemoteError),
    #[error("`{path}`: {source}", path = path.display())]
    Local {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Uploads the file at `path` as `object`, in parts when large, checking that its bytes have
/// the digest `digest` before completing the upload. Returns its length.
async fn upload_file(
    store: &dyn ObjectStore,
    object: &ObjectPath,
    path: &std::path::Path,
    digest: &crate::digest::FileDigest,
) -> Result<u64, Fault> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| Fault::Unreachable(e.to_string()))?;
    let len = file
        .metadata()
        .map_err(|e| Fault::Unreachable(e.to_string()))?
        .len();
    let mut hasher = blake3::Hasher::new();
    if len <= SINGLE_PUT {
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes)
            .map_err(|e| Fault::Unreachable(e.to_string()))?;
        crate::digest::hash_into(&mut hasher, &bytes);
        if crate::digest::FileDigest::new(hasher.finalize()) != *digest {
            return Err(Fault::Damaged);
        }
        create(store, object, bytes.into()).await?;
        return Ok(len);
    }
    let upload = store.put_multipart(object).await.map_err(write_fault)?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART as usize);
    let mut buffer = vec![0u8; PART as usize];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| Fault::Unreachable(e.to_string()))?;
        if n == 0 {
            break;
        }
        crate::digest::hash_into(&mut hasher, &buffer[..n]);
        writer.write(&buffer[..n]);
        writer.wait_for_capacity(8).await.map_err(write_fault)?;
    }
    if crate::digest::FileDigest::new(hasher.finalize()) != *digest {
        writer.abort().await?;
        return Err(Fault::Damaged);
    }
    writer.finish().await.map_err(write_fault)?;
    Ok(len)
}

/// Streams the object at `path`, `len` bytes long, into `write` in order: large objects as
/// ranges fetched several at once.
async fn download(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    len: u64,
    write: &mut dyn FnMut(&[u8]) -> Result<(), Fault>,
) -> Result<(), Fault> {
    if len > PART {
        let ranges: Vec<std::ops::Range<u64>> = (0..len)
            .step_by(PART as usize)
            .map(|start| start..(start + PART).min(len))
            .collect();
        let mut parts = futures::stream::iter(ranges)
            .map(|range| store.get_range(path, range))
            .buffered(4);
        while let Some(part) = parts.next().await {
            write(&part.map_err(not_found_is_damage)?)?;
        }
    } else {
        let got = store.get(path).await.map_err(not_found_is_damage)?;
        let mut chunks = got.into_stream();
        while let Some(chunk) = chunks.try_next().await.map_err(Fault::from)? {
            write(&chunk)?;
        }
    }
    Ok(())
}

/// Writes `payload` at `path` unless something is there already (the same bytes: names are
/// digests). Stores that do not enforce the condition overwrite with the same bytes.
async fn create(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    payload: PutPayload,
) -> Result<(), Fault> {
    let options = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store.put_opts(path, payload, options).await {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
        Err(object_store::Error::NotImplemented { .. }) => Ok(()),
        Err(e) => Err(write_fault(e)),
    }
}

/// Why one node could not be pulled or pushed.
enum Fault {
    /// Its remote object is missing or does not match its digest, or its local one is damaged.
    Damaged,
    /// The remote could not be read or written: the message says why.
    Unreachable(String),
}

impl From<object_store::Error> for Fault {
    fn from(e: object_store::Error) -> Self {
        Fault::Unreachable(e.to_string())
    }
}

/// A refused write says what is usually wrong: a key that may read the remote but not write it.
fn write_fault(e: object_store::Error) -> Fault {
    match e {
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            Fault::Unreachable(format!(
                "the server refused to store objects with these credentials: the key may not write here (pushing needs a key that may write; a build without `--push` only reads): {e}"
            ))
        }
        e => e.into(),
    }
}

/// An entry whose object is missing is a damaged remote, not an unreachable one.
fn not_found_is_damage(e: object_store::Error) -> Fault {
    match e {
        object_store::Error::NotFound { .. } => Fault::Damaged,
        e => e.into(),
    }
}
