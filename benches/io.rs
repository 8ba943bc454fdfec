//! Micro-benchmarks of modelforge's own hot paths, the ones without LibTorch: hashing (every
//! input file, every cache object read back, every output byte) and writing (cache objects and
//! output shards). Sizes are those of a 1B model's larger tensors.
//!
//!     cargo bench --bench io
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use modelforge::benching::write_safetensors;
use modelforge::store::{hash_file, Store};
use safetensors::Dtype;

/// `len` bytes that do not compress or repeat.
fn bytes(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

const LEN: usize = 64 << 20;

fn hashing(c: &mut Criterion) {
    let data = bytes(LEN);
    let mut group = c.benchmark_group("hash");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(LEN as u64));
    group.bench_function("blake3 one thread, 64 MiB", |b| {
        b.iter(|| blake3::hash(black_box(&data)))
    });
    // What objects, outputs and staged writes use: rayon over all cores for pieces ≥ 1 MiB.
    group.bench_function("digest::hash_into, 64 MiB in 8 MiB pieces", |b| {
        b.iter(|| {
            let mut hasher = blake3::Hasher::new();
            for piece in data.chunks(8 << 20) {
                modelforge::digest::hash_into(&mut hasher, black_box(piece));
            }
            hasher.finalize()
        })
    });
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("input");
    std::fs::write(&file, &data).expect("written");
    // An input file in the page cache, as a cold build hashes the base.
    group.bench_function("store::hash_file, 64 MiB file", |b| {
        b.iter(|| hash_file(black_box(&file)).expect("hashed"))
    });
    group.finish();
}

fn writing(c: &mut Criterion) {
    let data = bytes(LEN);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(&dir.path().join("cache")).expect("a store");
    let mut group = c.benchmark_group("write");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(LEN as u64));
    // What the engine does with each result: stream into tmp/, hash, rename to its digest.
    group.bench_function("cache object, 64 MiB in 4 MiB pieces", |b| {
        b.iter(|| {
            let mut out = store.object_writer().expect("a writer");
            for piece in data.chunks(4 << 20) {
                out.write(black_box(piece)).expect("written");
            }
            let entry = out.finish(false).expect("finished");
            // The next iteration writes the same bytes: start from an empty store each time.
            store.evict(&entry);
        })
    });
    // An output shard of 8 MiB-wide bf16 tensors (5632 × 2048 projections and smaller).
    let shapes: Vec<(String, Vec<usize>)> = (0..LEN / (5632 * 2048 * 2) + 1)
        .map(|i| {
            (
                format!("model.layers.{i}.mlp.up_proj.weight"),
                vec![5632, 2048],
            )
        })
        .collect();
    let mut offset = 0;
    let tensors: Vec<_> = shapes
        .iter()
        .filter_map(|(name, shape)| {
            let len = shape.iter().product::<usize>() * 2;
            let slice = data.get(offset..offset + len)?;
            offset += len;
            Some((name.as_str(), Dtype::BF16, shape.clone(), slice))
        })
        .collect();
    let written: u64 = tensors.iter().map(|t| t.3.len() as u64).sum();
    group.throughput(Throughput::Bytes(written));
    let path = dir.path().join("model.safetensors");
    group.bench_function(
        format!(
            "safetensors shard, {} bf16 tensors of 5632×2048",
            tensors.len()
        ),
        |b| b.iter(|| write_safetensors(&path, black_box(&tensors)).expect("written")),
    );
    group.finish();
}

criterion_group!(benches, hashing, writing);
criterion_main!(benches);
