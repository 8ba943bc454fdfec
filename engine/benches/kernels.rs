//! Micro-benchmarks of the engine's kernels on a TinyLlama MLP projection (5632 × 2048, bf16)
//! and a rank-16 LoRA: the delta product, the fused add + cast (LibTorch's passes, and the CPU's
//! one pass, `elementwise::fuse`), one block end to end, and one
//! whole tensor into a cache object. Blocks are the size the engine cuts under its default
//! 64 MiB budget on two cores; the block kernels run on one thread, as each rayon worker does.
//!
//!     cargo bench -p modelforge-engine --bench kernels
use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use modelforge_core::digest::TensorDigest;
use modelforge_core::job::{Job, Place, Task};
use modelforge_core::node::{Content, Delta, DeviceClass, Fuse, Input, LoraKind, Node, Weighted};
use modelforge_core::store::Store;
use modelforge_engine::backend::{Backend, BlockDelta, BlockValues};
use modelforge_engine::fuse::fuse;
use modelforge_engine::inputs::Inputs;
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

const ROWS: usize = 5632;
const COLS: usize = 2048;
const RANK: usize = 16;
/// Rows per block: 64 MiB / (20 bytes × 2 blocks × 2 threads) elements, as fuse.rs cuts them.
const BLOCK_ROWS: usize = (64 << 20) / (20 * 4) / COLS;

fn values(shape: &[i64], scale: f64, seed: i64) -> Vec<f32> {
    tch::manual_seed(seed);
    let t = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * scale;
    let mut out = vec![0f32; t.numel()];
    let n = out.len();
    t.copy_data(&mut out, n);
    out
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    let t = Tensor::from_slice(v).to_kind(Kind::BFloat16);
    let mut out = vec![0u8; v.len() * 2];
    t.copy_data_u8(&mut out, v.len());
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn kernels(c: &mut Criterion) {
    let backend = Backend::select(modelforge_core::job::Device::Cpu).expect("the CPU");
    let (rows, cols) = (BLOCK_ROWS, COLS);
    let base = bf16_bytes(&values(&[rows as i64, cols as i64], 0.02, 0));
    let b = values(&[rows as i64, RANK as i64], 0.01, 1);
    let a = values(&[RANK as i64, cols as i64], 0.02, 2);
    let delta = BlockDelta {
        factor: 2.0,
        values: BlockValues::LowRank {
            left: &b,
            right: &a,
            rank: RANK,
        },
        magnitude: None,
    };
    let w = backend.base(&base, Dtype::BF16, rows, cols);

    let mut group = c.benchmark_group(format!("block {rows}×{cols}, rank {RANK}"));
    group
        .sample_size(20)
        .throughput(Throughput::Elements((rows * cols) as u64));
    group.bench_function("delta product (factor·B·A, f32)", |bench| {
        bench.iter(|| {
            backend.merged_delta(
                &w,
                rows,
                cols,
                std::slice::from_ref(black_box(&delta)),
                &[1.0],
                None,
            )
        })
    });
    let product = backend.merged_delta(&w, rows, cols, std::slice::from_ref(&delta), &[1.0], None);
    group.bench_function("fused add + cast to bf16 (with finiteness scan)", |bench| {
        bench
            .iter(|| backend.add_and_round(w.shallow_clone(), product.shallow_clone(), Dtype::BF16))
    });
    let product_values = Vec::<f32>::try_from(product.flatten(0, -1)).expect("f32 values");
    group.bench_function("one pass: bf16 + factor·delta, rounded to bf16", |bench| {
        bench.iter(|| {
            modelforge_engine::elementwise::fuse(
                black_box(&base),
                Dtype::BF16,
                Some((&product_values, 1.0)),
                Dtype::BF16,
            )
        })
    });
    group.bench_function("fuse_block: bf16 bytes in, bf16 bytes out", |bench| {
        bench.iter(|| {
            backend.fuse_block(
                black_box(&base),
                Dtype::BF16,
                rows,
                cols,
                std::slice::from_ref(&delta),
                Dtype::BF16,
            )
        })
    });
    group.finish();
}

/// A base tensor and an adapter's factors in files, and the job that fuses them.
fn tensor_job(dir: &Path) -> Job {
    let base = bf16_bytes(&values(&[ROWS as i64, COLS as i64], 0.02, 3));
    let a = f32_bytes(&values(&[RANK as i64, COLS as i64], 0.02, 4));
    let b = f32_bytes(&values(&[ROWS as i64, RANK as i64], 0.01, 5));
    let (base_path, lora_path) = (dir.join("base.bin"), dir.join("lora.bin"));
    std::fs::write(&base_path, &base).expect("written");
    std::fs::write(&lora_path, [a.as_slice(), b.as_slice()].concat()).expect("written");
    let mut places = Vec::new();
    let mut input =
        |path: &Path, name: &str, dtype, shape: Vec<usize>, start: usize, len: usize| {
            let content = Content::Bytes(TensorDigest::of(name.as_bytes()));
            places.push(Place {
                content: content.clone(),
                tensor: name.into(),
                path: path.to_owned(),
                start: start as u64,
                len: len as u64,
            });
            Input {
                content,
                tensor: name.into(),
                dtype,
                shape,
            }
        };
    let fuse = Fuse {
        origin: input(
            &base_path,
            "w",
            Dtype::BF16,
            vec![ROWS, COLS],
            0,
            base.len(),
        ),
        origin_cast: None,
        deltas: vec![Weighted {
            weight: 1.0,
            scaling: 2.0,
            delta: Delta::low_rank(
                LoraKind::Linear,
                input(&lora_path, "a", Dtype::F32, vec![RANK, COLS], 0, a.len()),
                input(
                    &lora_path,
                    "b",
                    Dtype::F32,
                    vec![ROWS, RANK],
                    a.len(),
                    b.len(),
                ),
            ),
        }],
        merge: None,
        dtype: Dtype::BF16,
        device: DeviceClass::Cpu,
    };
    Job {
        cache: dir.join("cache"),
        device: modelforge_core::job::Device::Cpu,
        budget: 64 << 20,
        fsync: false,
        check_finite: true,
        nodes: vec![Task {
            name: "model.layers.0.mlp.up_proj.weight".into(),
            key: Node::Fuse(fuse.clone()).key(),
            node: Node::Fuse(fuse),
            hand_off: false,
        }],
        places,
        slots: Vec::new(),
    }
}

fn whole_tensor(c: &mut Criterion) {
    let backend = Backend::select(modelforge_core::job::Device::Cpu).expect("the CPU");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let job = tensor_job(dir.path());
    let store = Store::open(&job.cache).expect("a store");
    let Node::Fuse(node) = &job.nodes[0].node else {
        unreachable!("a fusion")
    };
    let mut inputs = Inputs::new(&job.places);
    let mut group = c.benchmark_group(format!("tensor {ROWS}×{COLS}, rank {RANK}"));
    group
        .sample_size(10)
        .throughput(Throughput::Elements((ROWS * COLS) as u64));
    // Reading, the blocks on all cores, writing and hashing the object: the engine's per-tensor
    // work with the inputs in the page cache.
    group.bench_function("fuse into a cache object (all cores)", |bench| {
        bench.iter(|| {
            let out = store.object_writer().expect("a cache object");
            let entry = fuse(
                &backend,
                &store,
                &mut inputs,
                black_box(node),
                None,
                &job,
                out,
            );
            assert!(entry.is_ok(), "fused");
        })
    });
    group.finish();
}

criterion_group!(benches, kernels, whole_tensor);
criterion_main!(benches);
