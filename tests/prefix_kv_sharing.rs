//! Prefix tuning's K/V held once per adapter version and shared read-only.
//!
//! - The model-level oracle: a prefix whose values are the cache that real tokens wrote
//!   acts exactly as those tokens. Two sequences share its whole blocks, each with its
//!   own copy of a partly filled last block. Checked at several block sizes.
//! - Through the engine: a synthetic prefix adapter gives the same tokens at every block
//!   size, concurrently and alone. Its prefix holds `ceil(n / block_size)` blocks of
//!   the pool, and every other block comes back when its requests end.
mod common;

use common::*;
use multilora::engine::block_allocator::{Allocation, BlockAllocator};
use multilora::engine::EngineConfig;
use multilora::lora::peft::{AdapterKind, KvPrefix};
use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
use multilora::model::backend::cpu::kv::KvLayers;
use multilora::model::backend::cpu::CpuKvStore;
use multilora::model::backend::Backend;
use multilora::model::{CpuBackend, ForwardBatch, Llama};
use multilora::proto::v1 as pb;
use multilora::testing::{llama_from, random_weights, tiny_config};

const VOCAB: usize = 97;

fn tiny() -> Llama<CpuBackend> {
    let cfg = tiny_config(VOCAB);
    llama_from(random_weights(&cfg, 3).unwrap(), &cfg).unwrap()
}

/// Logits of every token of each `(tokens, from, table)` chunk, run as one step.
fn step(
    model: &Llama<CpuBackend>,
    kv: &mut CpuKvStore,
    chunks: &[(&[u32], usize, &[u32])],
) -> Vec<Vec<f32>> {
    let mut batch = ForwardBatch::default();
    for (tokens, from, table) in chunks {
        let start = batch.tokens.len();
        batch.push_chunk(tokens, *from, table);
        batch.logit_rows.extend(start..start + tokens.len());
    }
    let logits = model.forward(&batch, kv).unwrap();
    logits.chunks(VOCAB).map(|r| r.to_vec()).collect()
}

/// The K/V `ids` write at positions 0.. as a prefix (rows of `[layer][K, V]` per token).
fn prefix_of(model: &Llama<CpuBackend>, ids: &[u32], block_size: usize) -> KvPrefix {
    let mut kv = model.new_kv(16, block_size).unwrap();
    let table: Vec<u32> = (0..16).collect();
    step(model, &mut kv, &[(ids, 0, &table)]);
    let KvLayers::F32(layers) = kv.layers() else {
        panic!("an f32 cache")
    };
    let width = kv.layout().slot_len();
    let mut values = Vec::new();
    for pos in 0..ids.len() {
        let off = kv.slot_offset(&table, pos);
        for layer in layers {
            values.extend_from_slice(&layer.k[off..off + width]);
            values.extend_from_slice(&layer.v[off..off + width]);
        }
    }
    KvPrefix {
        count: ids.len(),
        kv_width: width,
        values,
    }
}

#[test]
fn a_shared_prefix_acts_as_the_tokens_that_wrote_it() {
    let model = tiny();
    let ids = [5u32, 17, 3, 44, 9];
    let reals: [&[u32]; 2] = [&[8, 2, 61, 30], &[70, 1, 12]];
    let n = ids.len();
    for block_size in [1, 2, 3, 4, 5, 8] {
        let prefix = prefix_of(&model, &ids, block_size);
        let mut kv = model.new_kv(32, block_size).unwrap();
        let mut alloc = BlockAllocator::new(32, block_size);
        let held = alloc.take(n.div_ceil(block_size)).unwrap();
        model
            .backend()
            .write_kv_prefix(&mut kv, &held, &prefix)
            .unwrap();
        let whole = n / block_size;
        let mut tables = Vec::new();
        for real in reals {
            let mut table = alloc.share(&held[..whole]);
            if whole < held.len() {
                assert_eq!(alloc.allocate(&mut table, n), Allocation::Ok);
                let pairs = [(held[whole], table[whole])];
                model.backend().copy_kv_blocks(&mut kv, &pairs).unwrap();
            }
            assert_eq!(alloc.allocate(&mut table, n + real.len()), Allocation::Ok);
            tables.push(table);
        }
        assert!(held[..whole].iter().all(|&b| alloc.ref_count(b) == 3));
        let chunks: Vec<(&[u32], usize, &[u32])> = reals
            .iter()
            .zip(&tables)
            .map(|(real, table)| (*real, n, table.as_slice()))
            .collect();
        let got = step(&model, &mut kv, &chunks);
        let mut row = 0;
        for real in reals {
            let mut kv = model.new_kv(16, block_size).unwrap();
            let table: Vec<u32> = (0..16).collect();
            let all = [&ids[..], real].concat();
            let want = step(&model, &mut kv, &[(&all, 0, &table)]);
            for (i, want) in want[n..].iter().enumerate() {
                assert_eq!(&got[row], want, "block size {block_size}, token {i}");
                row += 1;
            }
        }
    }
}

fn prefix_server(block_size: usize, adapter: &std::path::Path) -> TestServer {
    TestServer::tiny()
        .engine(EngineConfig {
            block_size,
            kv_cache_memory: 4 << 20,
            ..Default::default()
        })
        .adapter("pfx", adapter)
}

fn requests() -> Vec<pb::GenerateRequest> {
    (0..6)
        .map(|i| {
            let mut r = greedy((0..3 + i).map(|t| 10 + 7 * t).collect(), 12);
            r.ignore_eos = true;
            if i % 3 != 2 {
                r.adapter = "pfx".into();
            }
            r
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_requests_give_the_same_tokens_at_every_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        kind: AdapterKind::PrefixTuning,
        rank: 7,
        alpha: 1.0,
        sites: vec![],
        seed: 5,
    };
    write_synthetic_adapter(dir.path(), &TestServer::tiny().base_shape(), &spec).unwrap();
    let mut first: Option<Vec<Collected>> = None;
    for block_size in [16, 4, 1, 7] {
        let started = prefix_server(block_size, dir.path()).start().await;
        let mut client = started.gen.clone();
        let mut alone = Vec::new();
        for r in requests() {
            alone.push(generate(&mut client, r).await.unwrap());
        }
        assert_eq!(alone[0].usage.virtual_tokens, 7);
        let mut on_base = requests().swap_remove(0);
        on_base.adapter.clear();
        let on_base = generate(&mut client, on_base).await.unwrap();
        assert_ne!(
            on_base.token_ids, alone[0].token_ids,
            "the prefix changes nothing"
        );
        assert_concurrent_equal_alone(&client, requests(), &alone, |i| format!("{i}")).await;
        let stats = client
            .get_engine_stats(pb::GetEngineStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        let pool = stats.adapters.clone().unwrap();
        assert_eq!(pool.active_kv_blocks as usize, 7usize.div_ceil(block_size));
        assert_eq!(
            stats.kv_blocks_free + pool.active_kv_blocks,
            stats.kv_blocks_total,
            "block size {block_size}: every block but the prefix's came back"
        );
        match &first {
            None => first = Some(alone),
            Some(want) => {
                for (got, want) in alone.iter().zip(want) {
                    assert_eq!(got.token_ids, want.token_ids, "block size {block_size}");
                }
            }
        }
        started.stop().await;
    }
}
