//! Unit tests of request validation: each field's checks and error, the lengths against
//! the context and the whole pool, and the adapter-dependent fit after the lease.
use super::*;
use crate::lora::peft::LoraSite;
use crate::lora::registry::{AdapterRegistry, RegistryConfig};
use crate::lora::synth::{write_synthetic_adapter, SynthSpec};

fn tokenizer() -> TextTokenizer {
    TextTokenizer::byte_level_for_tests().unwrap()
}

fn limits() -> EngineLimits {
    EngineLimits {
        context_length: 64,
        kv_capacity_tokens: 48,
        vocab_size: 259,
        max_adapter_bytes: 1 << 20,
        block_size: 4,
        kv_block_bytes: 1024,
        mixtures: true,
    }
}

fn prompt(text: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(text.into()),
        ..Default::default()
    }
}

/// The field an invalid request is refused for.
fn refused_field(req: &pb::GenerateRequest) -> String {
    match validate(req, &tokenizer(), &limits()) {
        Err(RequestError::InvalidArgument { field, .. }) => field,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[test]
fn exactly_one_input_is_required() {
    assert_eq!(refused_field(&pb::GenerateRequest::default()), "input");
    let mut two = prompt("hi");
    two.prompt_token_ids = vec![5];
    assert_eq!(refused_field(&two), "input");
    assert_eq!(refused_field(&prompt("")), "prompt");
    let mut bad_role = pb::GenerateRequest::default();
    bad_role.messages.push(pb::ChatMessage::default());
    assert_eq!(refused_field(&bad_role), "messages[0].role");
}

#[test]
fn sampling_and_options_are_range_checked_by_field() {
    let with = |f: &dyn Fn(&mut pb::GenerateRequest)| {
        let mut r = prompt("hi");
        f(&mut r);
        refused_field(&r)
    };
    let sampling = |s: pb::SamplingParams| move |r: &mut pb::GenerateRequest| r.sampling = Some(s);
    let t = sampling(pb::SamplingParams {
        temperature: Some(-1.0),
        ..Default::default()
    });
    assert_eq!(with(&t), "sampling.temperature");
    let nan = sampling(pb::SamplingParams {
        temperature: Some(f32::NAN),
        ..Default::default()
    });
    assert_eq!(with(&nan), "sampling.temperature");
    for top_p in [0.0, 1.5] {
        let p = sampling(pb::SamplingParams {
            top_p: Some(top_p),
            ..Default::default()
        });
        assert_eq!(with(&p), "sampling.top_p");
    }
    let rp = sampling(pb::SamplingParams {
        repetition_penalty: Some(0.0),
        ..Default::default()
    });
    assert_eq!(with(&rp), "sampling.repetition_penalty");
    assert_eq!(with(&|r| r.logprobs = Some(MAX_LOGPROBS + 1)), "logprobs");
    assert_eq!(
        with(&|r| r.stop = vec!["x".into(); MAX_STOP_STRINGS + 1]),
        "stop"
    );
    assert_eq!(
        with(&|r| r.stop = vec!["ok".into(), String::new()]),
        "stop[1]"
    );
    assert_eq!(
        with(&|r| r.request_id = "r".repeat(MAX_REQUEST_ID_CHARS + 1)),
        "request_id"
    );
    assert_eq!(with(&|r| r.max_new_tokens = Some(0)), "max_new_tokens");
}

#[test]
fn token_ids_must_be_in_the_vocabulary() {
    let req = pb::GenerateRequest {
        prompt_token_ids: vec![3, 300, 4],
        ..Default::default()
    };
    assert_eq!(refused_field(&req), "prompt_token_ids[1]");
}

#[test]
fn lengths_are_checked_against_the_context_and_the_whole_pool() {
    // The byte-level tokenizer gives one token per byte.
    assert_eq!(refused_field(&prompt(&"a".repeat(64))), "prompt");
    let v = validate(&prompt("hello"), &tokenizer(), &limits()).unwrap();
    assert_eq!(v.prompt_ids.len(), 5);
    // Default: up to the room left in the pool (48 tokens), at most the default cap.
    assert_eq!(v.params.max_new_tokens, 43);
    let mut past_context = prompt("hello");
    past_context.max_new_tokens = Some(60);
    assert_eq!(refused_field(&past_context), "max_new_tokens");
    let mut past_pool = prompt("hello");
    past_pool.max_new_tokens = Some(44);
    assert_eq!(refused_field(&past_pool), "max_new_tokens");
    assert_eq!(refused_field(&prompt(&"a".repeat(48))), "prompt");
}

#[test]
fn a_valid_request_keeps_every_field() {
    let mut req = prompt("hi");
    req.request_id = "r-1".into();
    req.adapter = "tenant-a".into();
    req.stop = vec!["\n".into()];
    req.ignore_eos = true;
    req.logprobs = Some(3);
    req.max_new_tokens = Some(7);
    let v = validate(&req, &tokenizer(), &limits()).unwrap();
    assert_eq!(v.request_id, "r-1");
    assert_eq!(v.adapters, AdapterChoice::One("tenant-a".into()));
    assert_eq!(v.params.stop, vec!["\n".to_string()]);
    assert!(v.params.ignore_eos);
    assert_eq!(v.params.logprobs, Some(3));
    assert_eq!(v.params.max_new_tokens, 7);
    assert_eq!(
        validate(&prompt("hi"), &tokenizer(), &limits())
            .unwrap()
            .adapters,
        AdapterChoice::Base
    );
    // Without an adapter nothing changes after the (absent) lease.
    let engine = v
        .clone()
        .into_engine_request(RequestAdapters::default(), &limits())
        .unwrap();
    assert_eq!(engine.params, v.params);
    assert_eq!(engine.prompt_ids, v.prompt_ids);
}

#[tokio::test]
async fn the_adapters_share_of_the_pool_is_checked_after_the_lease() {
    let cfg = crate::testing::tiny_config(259);
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        kind: Default::default(),
        rank: 4,
        alpha: 8.0,
        sites: vec![LoraSite::Q],
        seed: 1,
    };
    let path = dir.path().join("a");
    let bytes = write_synthetic_adapter(&path, &cfg.base_shape(), &spec).unwrap();
    let registry = AdapterRegistry::new(RegistryConfig::new(cfg.base_shape()));
    registry.register("a", path.to_str().unwrap()).unwrap();
    let lease = || async { RequestAdapters::single(registry.acquire("a").await.unwrap()) };
    let lim = limits();
    let reserved = lim.adapter_tokens(bytes);
    assert!(reserved < 40, "the test adapter takes {reserved} tokens");
    // The default length shrinks to what is left beside the adapter.
    let v = validate(&prompt("hello"), &tokenizer(), &lim).unwrap();
    let e = v.into_engine_request(lease().await, &lim).unwrap();
    assert_eq!(e.params.max_new_tokens, 48 - reserved - 5);
    // A length that fits the whole pool but not the pool less the adapter is refused.
    let mut req = prompt("hello");
    req.max_new_tokens = Some(43);
    let v = validate(&req, &tokenizer(), &lim).unwrap();
    match v.into_engine_request(lease().await, &lim) {
        Err(RequestError::InvalidArgument { field, .. }) => assert_eq!(field, "max_new_tokens"),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[test]
fn mixtures_are_checked_by_entry() {
    use pb::AdapterWeight;
    let entry = |name: &str, weight: f32| AdapterWeight {
        name: name.into(),
        weight,
    };
    let mut req = prompt("hi");
    req.adapters = vec![entry("a", 0.5), entry("b", -0.25)];
    let v = validate(&req, &tokenizer(), &limits()).unwrap();
    assert_eq!(
        v.adapters,
        AdapterChoice::Mixture(vec![("a".into(), 0.5), ("b".into(), -0.25)])
    );
    let refused =
        |req: &pb::GenerateRequest, needle: &str| match validate(req, &tokenizer(), &limits()) {
            Err(RequestError::InvalidArgument { field, message }) => {
                assert_eq!(field, "adapters");
                assert!(
                    message.contains(needle),
                    "{message:?} should say {needle:?}"
                );
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        };
    let mut both = req.clone();
    both.adapter = "a".into();
    refused(&both, "exclusive with adapter");
    let mut many = req.clone();
    many.adapters = (0..9).map(|i| entry(&format!("a{i}"), 1.0)).collect();
    refused(&many, "at most 8");
    let mut twice = req.clone();
    twice.adapters = vec![entry("a", 1.0), entry("a", 2.0)];
    refused(&twice, "named twice");
    let mut nan = req.clone();
    nan.adapters = vec![entry("a", f32::NAN)];
    refused(&nan, "weight NaN");
    let mut unnamed = req.clone();
    unnamed.adapters = vec![entry("", 1.0)];
    refused(&unnamed, "no name");
    let lim = EngineLimits {
        mixtures: false,
        ..limits()
    };
    match validate(&req, &tokenizer(), &lim) {
        Err(RequestError::InvalidArgument { message, .. }) => {
            assert!(
                message.contains("does not serve adapter mixtures"),
                "{message}"
            )
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}
