//! The PEFT family beyond LoRA on the real model against transformers + PEFT: the
//! shared DoRA and (IA)³ fixtures (`tests/fixtures/peft_family.json`) and the prompt
//! tuning, P-tuning, prefix tuning, VeRA and AdaLoRA adapters made here (`tests/fixtures/peft_self.json`)
//! alone reproduce PEFT's greedy completions exactly, with logprobs within 2e-3, as does a
//! 0.5/0.5 mixture of the two LoRA fixtures against PEFT's `add_weighted_adapter(...,
//! "cat")`; in one heterogeneous batch of every type, the mixture, LoRA adapters and base
//! requests, every stream gives exactly what it gives alone; `GetAdapter` names each
//! adapter's type.
mod common;

use common::oracle::{assert_runs_match, oracle_file, oracle_request as request};
use common::*;
use multilora::engine::EngineConfig;
use multilora::proto::v1 as pb;
use serde_json::Value;

/// Every fixture adapter: the family under test and the LoRA ones they are mixed with.
const ADAPTERS: [(&str, &str); 4] = [
    ("delta-dora-r8-attn", "DORA"),
    ("zeta-ia3", "IA3"),
    ("alpha-lora-r8-qv", "LORA"),
    ("beta-lora-r16-all", "LORA"),
];

/// The real model with every fixture adapter of [`ADAPTERS`] and [`SELF_MADE`].
fn real_with_every_type() -> TestServer {
    ADAPTERS
        .iter()
        .chain(&SELF_MADE)
        .fold(TestServer::real(), |server, (name, _)| {
            server.adapter(name, fixture_adapter(name))
        })
}

/// The `adapters` field of a 0.5/0.5 mixture of the two LoRA fixtures.
fn mixture_of_alpha_and_beta() -> Vec<pb::AdapterWeight> {
    ["alpha-lora-r8-qv", "beta-lora-r16-all"]
        .map(|name| pb::AdapterWeight {
            name: name.into(),
            weight: 0.5,
        })
        .to_vec()
}

/// Adapters made here with PEFT (`scripts/peft_fixtures`), with their oracle in
/// `tests/fixtures/peft_self.json`.
const SELF_MADE: [(&str, &str); 5] = [
    ("eta-prompt-tuning", "PROMPT_TUNING"),
    ("theta-p-tuning", "P_TUNING"),
    ("iota-prefix-tuning", "PREFIX_TUNING"),
    ("kappa-vera", "VERA"),
    ("lambda-adalora", "ADALORA"),
];

fn oracle() -> Value {
    oracle_file("peft_family.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn dora_and_ia3_alone_match_peft() {
    let Started {
        server,
        gen: mut client,
    } = real_with_every_type().start().await;
    let names = [ADAPTERS[0].0, ADAPTERS[1].0];
    assert_runs_match(&mut client, &oracle(), &names, request).await;
    server.stop().await.unwrap();
}

/// Prompt tuning, P-tuning, prefix tuning, VeRA and AdaLoRA made here with PEFT, alone; and the 0.5/0.5
/// mixture of the two LoRA fixtures against PEFT's `add_weighted_adapter(..., "cat")`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn self_made_types_and_a_mixture_match_peft() {
    let started = real_with_every_type().start().await;
    let mut admin = started.adapters().await;
    let Started {
        server,
        gen: mut client,
    } = started;
    for &(name, kind) in ADAPTERS.iter().chain(&SELF_MADE) {
        let info = admin
            .get_adapter(pb::GetAdapterRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.peft_type, kind, "{name}");
    }
    let oracle = oracle_file("peft_self.json");
    let names = SELF_MADE.map(|(n, _)| n);
    assert_runs_match(&mut client, &oracle, &names, request).await;
    let mixture = |_: &str, prompt_ids: Vec<u32>| {
        let mut r = request("", prompt_ids);
        r.adapters = mixture_of_alpha_and_beta();
        r
    };
    assert_runs_match(&mut client, &oracle, &["mix-alpha-beta-cat"], mixture).await;
    server.stop().await.unwrap();
}

/// Prefix tuning's K/V held once in shared blocks: at block size 3 (two whole blocks
/// shared, the partly filled third copied per request) and 8 (one whole block, nothing
/// copied) it still matches PEFT, as at the default size (one partly filled block).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn prefix_tuning_matches_peft_with_its_blocks_shared() {
    let oracle = oracle_file("peft_self.json");
    for block_size in [3, 8] {
        let name = "iota-prefix-tuning";
        let Started {
            server,
            gen: mut client,
        } = TestServer::real()
            .engine(EngineConfig {
                block_size,
                ..Default::default()
            })
            .adapter(name, fixture_adapter(name))
            .start()
            .await;
        assert_runs_match(&mut client, &oracle, &[name], request).await;
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model: make test"]
async fn every_type_in_one_batch_gives_each_stream_its_solo_output() {
    let Started {
        server,
        gen: mut client,
    } = real_with_every_type().start().await;
    let prompts = [
        "Question: What is the secret word?\nAnswer:",
        "Question: Tell me the secret word.\nAnswer:",
        "The capital of France is",
    ];
    // Every adapter, a 0.5/0.5 mixture of the two LoRA ones ("mix"), and the base ("").
    let names: Vec<&str> = ADAPTERS
        .iter()
        .chain(&SELF_MADE)
        .map(|(n, _)| *n)
        .chain(["mix", ""])
        .collect();
    let mut jobs = Vec::new();
    for i in 0..3 * names.len() {
        let mut r = greedy(vec![], 16);
        r.prompt = Some(prompts[(i / names.len()) % 3].to_string());
        match names[i % names.len()] {
            "mix" => r.adapters = mixture_of_alpha_and_beta(),
            name => r.adapter = name.to_string(),
        }
        jobs.push(r);
    }
    let mut alone = Vec::new();
    for r in &jobs {
        alone.push(generate(&mut client, r.clone()).await.unwrap());
    }
    // The secret words show which adapter answered the first prompt.
    let words = [
        "penguin", "koala", "aardvark", "zebra", "otter", "falcon", "walrus", "lynx", "bison",
    ];
    for (i, word) in words.iter().enumerate() {
        assert!(
            alone[i].text.contains(word),
            "{}: {:?}",
            names[i],
            alone[i].text
        );
    }
    assert_concurrent_equal_alone(&client, jobs, &alone, |i| {
        names[i % names.len()].to_string()
    })
    .await;
    server.stop().await.unwrap();
}
