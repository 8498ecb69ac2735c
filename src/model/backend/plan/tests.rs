use super::launch::{self, Arg, Launch, LoraSiteShape, Module};
use super::meta::{MetaLayout, StepMeta};
use super::*;
use crate::lora::batch::LoraBatch;
use crate::model::backend::HeadShape;
use crate::rng::Xoshiro256;
use std::collections::HashMap;

const BLOCK_SIZE: usize = 16;
const MAX_BLOCKS: usize = 8;
const MAX_RANK: usize = 32;
const SCRATCH: u32 = 999;

/// A decode step of `rows` sequences: random contexts, block tables and adapters (some
/// rows base, some sharing an adapter).
fn random_decode(rng: &mut Xoshiro256, rows: usize) -> ForwardBatch {
    let adapters = rng.range(0, 5);
    let mut batch = ForwardBatch::default();
    for _ in 0..rows {
        let context = rng.range(0, MAX_BLOCKS * BLOCK_SIZE - 1);
        let table: Vec<u32> = (0..=context / BLOCK_SIZE)
            .map(|_| rng.range(0, 500) as u32)
            .collect();
        let slot = match adapters {
            0 => -1,
            n => rng.range(0, n) as i32 - 1,
        };
        let row = batch.push_adapter_chunk(&[rng.range(1, 100) as u32], context, &table, slot);
        batch.logit_rows.push(row);
    }
    // The engine's slots are dense: one per adapter version in the step, in id order.
    let mut used: Vec<i32> = batch.slots.iter().copied().filter(|&s| s >= 0).collect();
    used.sort_unstable();
    used.dedup();
    for s in &mut batch.slots {
        if *s >= 0 {
            *s = used.binary_search(s).unwrap() as i32;
        }
    }
    batch
}

/// The batch padded to its bucket and packed at the bucket's capacity, with fake
/// descriptor-table addresses per slot.
fn plan(batch: &ForwardBatch) -> StepMeta {
    let bucket = decode_bucket(batch.tokens.len()).unwrap();
    let padded = pad_decode(batch, bucket, SCRATCH).unwrap();
    let lora = LoraBatch::new(&padded.slots);
    let slots = padded.slots.iter().copied().max().unwrap_or(-1) + 1;
    let tables: Vec<u64> = (0..slots as u64).map(|s| 0x1000 + 0x100 * s).collect();
    let capacity = StepCapacity::bucket(bucket, MAX_BLOCKS, MAX_RANK);
    StepMeta::pack(&padded, &lora, BLOCK_SIZE, capacity, &tables, 0xdead).unwrap()
}

/// Every launch of our kernels in one layer of a model shaped like Llama 3.2 1B with
/// LoRA on q, v and down.
fn layer_launches(layout: &MetaLayout) -> Vec<Launch> {
    let shape = HeadShape::causal(32, 8, 64);
    let mut out = vec![
        launch::rope(layout, 32, 32).unwrap(),
        launch::rope(layout, 8, 32).unwrap(),
        launch::kv_write(layout, 8 * 64).unwrap(),
        launch::attention(layout, BLOCK_SIZE, shape).unwrap(),
    ];
    out.extend(
        launch::decode_attention(layout, BLOCK_SIZE, shape, 2)
            .unwrap()
            .unwrap(),
    );
    let sites = [
        (2048, 3072, 0, 2048, 0),
        (2048, 3072, 2560, 512, 2),
        (8192, 2048, 0, 2048, 6),
    ];
    for (in_features, y_stride, y_offset, out_features, site) in sites {
        let site = LoraSiteShape {
            in_features,
            y_stride,
            y_offset,
            out_features,
            site,
            x_aligned: true,
            elem_bytes: 2,
        };
        out.extend(launch::lora(layout, &site).unwrap());
    }
    out
}

#[test]
fn buckets_cover_every_size_up_to_the_largest() {
    assert_eq!(decode_bucket(1), Some(1));
    assert_eq!(decode_bucket(3), Some(4));
    assert_eq!(decode_bucket(33), Some(48));
    assert_eq!(decode_bucket(256), Some(256));
    assert_eq!(decode_bucket(257), None);
    assert!(DECODE_BUCKETS.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn padded_rows_are_base_tokens_writing_the_scratch_block() {
    let mut rng = Xoshiro256::from_seed(7);
    let batch = random_decode(&mut rng, 5);
    let padded = pad_decode(&batch, 8, SCRATCH).unwrap();
    assert_eq!(padded.tokens.len(), 8);
    assert_eq!(padded.logit_rows, (0..8).collect::<Vec<_>>());
    assert_eq!(&padded.tokens[..5], &batch.tokens[..]);
    for row in 5..8 {
        assert_eq!(padded.slots[row], -1);
        assert_eq!(padded.positions[row], 0);
        assert_eq!(padded.chunks[row].block_table, vec![SCRATCH]);
    }
    let meta = plan(&batch);
    let l = meta.layout;
    for row in 5..8 {
        assert_eq!(
            meta.words[l.kv_slot + row],
            SCRATCH as i32 * BLOCK_SIZE as i32
        );
    }
    // A prefill chunk, or a step past the bucket, is refused.
    let mut prefill = ForwardBatch::default();
    let row = prefill.push_chunk(&[1, 2, 3], 0, &[0]);
    prefill.logit_rows.push(row);
    assert!(pad_decode(&prefill, 8, SCRATCH).is_err());
    assert!(pad_decode(&batch, 4, SCRATCH).is_err());
}

/// The property CUDA-graph replay rests on: any two decode steps of one bucket have the
/// same metadata layout and the same launches, argument for argument.
#[test]
fn every_batch_of_a_bucket_has_one_launch_plan() {
    let mut rng = Xoshiro256::from_seed(42);
    for (i, &bucket) in DECODE_BUCKETS.iter().enumerate() {
        let smallest = if i == 0 { 1 } else { DECODE_BUCKETS[i - 1] + 1 };
        let reference = plan(&random_decode(&mut rng, bucket));
        let reference_launches = layer_launches(&reference.layout);
        for _ in 0..8 {
            let rows = rng.range(smallest, bucket);
            let other = plan(&random_decode(&mut rng, rows));
            assert_eq!(
                other.layout, reference.layout,
                "bucket {bucket}, {rows} rows"
            );
            assert_eq!(other.words.len(), reference.words.len());
            assert_eq!(layer_launches(&other.layout), reference_launches);
        }
    }
}

/// What the kernels read from the buffer is the batch: positions, cache rows, chunks,
/// block tables, segments covering every adapter token once, and the slot table.
#[test]
fn packed_metadata_is_the_batch() {
    let mut rng = Xoshiro256::from_seed(3);
    for rows in [1, 7, 24, 61] {
        let batch = random_decode(&mut rng, rows);
        let meta = plan(&batch);
        let (l, w) = (meta.layout, &meta.words);
        for (t, chunk) in batch.chunks.iter().enumerate() {
            let pos = chunk.context_len;
            let block = chunk.block_table[pos / BLOCK_SIZE] as usize;
            assert_eq!(w[l.positions + t], pos as i32);
            assert_eq!(
                w[l.kv_slot + t],
                (block * BLOCK_SIZE + pos % BLOCK_SIZE) as i32
            );
            assert_eq!(w[l.row_chunk + t], t as i32);
            let table = &w[l.block_tables + t * MAX_BLOCKS..][..chunk.block_table.len()];
            assert!(table
                .iter()
                .zip(&chunk.block_table)
                .all(|(&a, &b)| a == b as i32));
        }
        let mut seen = vec![0; l.capacity.rows];
        for g in [l.sgmv, l.bgmv] {
            for s in 0..g.capacity {
                let (start, len) = (w[g.start + s] as usize, w[g.len + s] as usize);
                let slot = w[g.slot + s];
                if len == 0 {
                    assert_eq!(
                        slot as usize,
                        l.capacity.slots - 1,
                        "unused segments are null"
                    );
                }
                for e in start..start + len {
                    let t = w[l.sorted_tokens + e] as usize;
                    assert_eq!(batch.slots[t], slot, "token {t} in its adapter's segment");
                    seen[t] += 1;
                }
            }
        }
        for (t, &slot) in batch.slots.iter().enumerate() {
            assert_eq!(seen[t], usize::from(slot >= 0), "token {t} of slot {slot}");
        }
        let table = |i: usize| {
            let at = l.slot_tables + 2 * i;
            w[at] as u32 as u64 | (w[at + 1] as u32 as u64) << 32
        };
        assert_eq!(table(l.capacity.slots - 1), 0xdead);
        assert_eq!(l.slot_tables % 2, 0, "u64 entries are 8-byte aligned");
        if batch.slots.contains(&0) {
            assert_eq!(table(0), 0x1000);
        }
    }
}

#[test]
fn packing_refuses_what_exceeds_the_capacity() {
    let mut rng = Xoshiro256::from_seed(5);
    let batch = random_decode(&mut rng, 9);
    let lora = LoraBatch::new(&batch.slots);
    let small = StepCapacity::bucket(8, MAX_BLOCKS, MAX_RANK);
    assert!(StepMeta::pack(&batch, &lora, BLOCK_SIZE, small, &[], 0).is_err());
    let mut long = ForwardBatch::default();
    let row = long.push_chunk(&[1], BLOCK_SIZE + 3, &[4, 5]);
    long.logit_rows.push(row);
    let lora = LoraBatch::new(&long.slots);
    let one_block = StepCapacity::bucket(1, 1, MAX_RANK);
    let err = StepMeta::pack(&long, &lora, BLOCK_SIZE, one_block, &[], 0).unwrap_err();
    assert!(err.to_string().contains("exceeds the capacity"), "{err}");
    let two_blocks = StepCapacity::bucket(1, 2, MAX_RANK);
    assert!(StepMeta::pack(&long, &lora, BLOCK_SIZE, two_blocks, &[], 0).is_ok());
}

/// `(kind, name)` of every parameter of every `extern "C"` kernel of a `.cu` file, by
/// kernel name without its element-type suffix.
fn kernel_signatures(source: &str) -> HashMap<String, Vec<(&'static str, String)>> {
    let flat = source.replace("\\\n", " ");
    let mut out = HashMap::new();
    for piece in flat.split("__global__ void ").skip(1) {
        let name = piece[..piece.find('(').unwrap()].trim();
        let name = name.trim_end_matches("_##SUFFIX").to_string();
        let params = &piece[piece.find('(').unwrap() + 1..piece.find(')').unwrap()];
        let params = params
            .split(',')
            .map(|p| {
                let p = p.trim();
                let pname = p.rsplit([' ', '*']).next().unwrap().to_string();
                let kind = if p.contains('*') {
                    "ptr"
                } else if p.starts_with("float") {
                    "f32"
                } else {
                    assert!(p.starts_with("int"), "parameter {p}");
                    "i32"
                };
                (kind, pname)
            })
            .collect();
        out.insert(name, params);
    }
    out
}

/// Each planned launch pushes exactly its kernel's parameters, in order, by name.
#[test]
fn planned_launches_match_the_kernel_sources() {
    let attention = kernel_signatures(include_str!("../cuda/paged_attention.cu"));
    let lora = kernel_signatures(include_str!("../../../lora/kernels/sgmv.cu"));
    let decode = kernel_signatures(include_str!("../cuda/decode_attention.cu"));
    let fused = kernel_signatures(include_str!("../cuda/fused.cu"));
    assert_eq!(fused.len(), 2);
    assert_eq!(attention.len(), 3);
    assert_eq!(lora.len(), 4);
    assert_eq!(decode.len(), 2);
    let meta = plan(&random_decode(&mut Xoshiro256::from_seed(1), 20));
    let mut launches = layer_launches(&meta.layout);
    let shape = HeadShape::causal(32, 8, 64);
    // Sequences of up to 64 blocks: two splits, so the merge is launched too.
    let long = MetaLayout::new(StepCapacity::bucket(32, 64, MAX_RANK));
    let split = launch::decode_attention(&long, BLOCK_SIZE, shape, 2).unwrap();
    launches.extend(split.unwrap());
    launches.push(launch::add_rms_norm(20, 2048, 1e-5).unwrap());
    launches.push(launch::gated(20, 8192, true).unwrap());
    let kernels: std::collections::HashSet<_> = launches.iter().map(|l| l.kernel).collect();
    assert_eq!(kernels.len(), 11, "the plan exercises every kernel");
    for l in &launches {
        let table = match l.module {
            Module::Attention => &attention,
            Module::Lora => &lora,
            Module::DecodeAttention => &decode,
            Module::Fused => &fused,
        };
        let params = &table[l.kernel];
        let planned: Vec<(&str, String)> = l
            .args
            .iter()
            .map(|a| {
                let kind = match a {
                    Arg::Bound(_) | Arg::Meta { .. } => "ptr",
                    Arg::I32 { .. } => "i32",
                    Arg::F32 { .. } => "f32",
                };
                (kind, a.name().to_string())
            })
            .collect();
        assert_eq!(&planned, params, "{}", l.kernel);
        assert!(l.args.iter().all(|a| match a {
            Arg::Meta { offset, .. } => *offset < meta.layout.words.max(long.words),
            _ => true,
        }));
    }
}
