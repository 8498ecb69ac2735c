//! `GET /metrics`: the Prometheus text the inference gateway's endpoint picker and
//! operators scrape, built on request from the engine's and the registry's counters and
//! the fronts' request metrics.
//! - The model-server protocol, as vLLM exports it: `vllm:num_requests_waiting`,
//!   `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (0 to 1) and
//!   `vllm:lora_requests_info` (value: the Unix time; labels `max_lora`,
//!   `running_lora_adapters`, `waiting_lora_adapters`, comma-separated names; only the
//!   current label set is written).
//! - Our own `multilora_*` series. Adapter names appear only in the info gauge's labels
//!   (names are unbounded); per-adapter figures stay in `GetEngineStats`.
use super::generation::GenerationService;
use crate::engine::EngineStats;
use crate::error::RequestError;
use crate::lora::registry::RegistryStats;
use crate::metrics::TextWriter;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// The whole exposition.
pub async fn render(service: &GenerationService) -> Result<String, RequestError> {
    let engine = service.engine.stats().await?;
    let registry = service.adapters.stats();
    let mut w = TextWriter::default();
    write_protocol(&mut w, &engine, &registry);
    service.metrics.write(&mut w);
    write_engine(&mut w, &engine, &registry);
    write_adapters(&mut w, &engine, &registry);
    write_admission(&mut w, service, &engine);
    w.histogram(
        "multilora_adapter_load_seconds",
        "How long successful adapter loads took (read, convert, place in host memory).",
        &service.adapters.load_seconds(),
    );
    Ok(w.finish())
}

/// The front door's queue and refusals, deadlines, and usage by tenant (tenant names
/// are the operator's, so a bounded label set).
fn write_admission(w: &mut TextWriter, service: &GenerationService, e: &EngineStats) {
    let (queued, queued_tokens) = service.admission.waiting();
    w.gauge(
        "multilora_requests_queued",
        "Requests admitted and not yet started (bounded by --max-waiting-requests).",
        &[(&[], queued as f64)],
    );
    w.gauge(
        "multilora_queued_prompt_tokens",
        "Prompt tokens of the queued requests (bounded by --max-waiting-tokens).",
        &[(&[], queued_tokens as f64)],
    );
    w.counter(
        "multilora_requests_refused",
        "Requests refused at once for a queue bound or a tenant's limit.",
        &[(&[], service.admission.refused() as f64)],
    );
    w.counter(
        "multilora_deadline_expired",
        "Sequences stopped by their deadline: before they started, or while running.",
        &[
            (&[("when", "waiting")], e.deadline_expired_waiting as f64),
            (&[("when", "running")], e.deadline_expired_running as f64),
        ],
    );
    let usage = super::admission::Admission::usage(&service.tenants);
    let tokens: Vec<([(&str, &str); 2], f64)> = usage
        .iter()
        .flat_map(|(t, u)| {
            [
                (
                    [("tenant", t.as_str()), ("kind", "prompt")],
                    u.prompt_tokens as f64,
                ),
                (
                    [("tenant", t.as_str()), ("kind", "generated")],
                    u.completion_tokens as f64,
                ),
            ]
        })
        .collect();
    let tokens: Vec<_> = tokens.iter().map(|(l, n)| (&l[..], *n)).collect();
    w.counter(
        "multilora_tenant_tokens",
        "Tokens by tenant (\"\" is the open server's anonymous caller) and kind.",
        &tokens,
    );
}

/// Requests the gateway counts as waiting: queued in the engine, or waiting for their
/// adapter to load.
fn waiting_requests(e: &EngineStats, r: &RegistryStats) -> usize {
    e.waiting_sequences + r.waiting_for_load
}

/// Names with a positive count, comma-separated.
fn names(counts: &[&BTreeMap<String, usize>]) -> String {
    let mut all: Vec<&str> = counts
        .iter()
        .flat_map(|m| m.iter().filter(|(_, n)| **n > 0).map(|(k, _)| k.as_str()))
        .collect();
    all.sort_unstable();
    all.dedup();
    all.join(",")
}

/// Fraction of the KV pool in use (blocks lent to active adapters included).
pub fn kv_usage(e: &EngineStats) -> f64 {
    if e.kv_blocks_total == 0 {
        return 0.0;
    }
    1.0 - e.kv_blocks_free as f64 / e.kv_blocks_total as f64
}

fn write_protocol(w: &mut TextWriter, e: &EngineStats, r: &RegistryStats) {
    w.gauge(
        "vllm:num_requests_waiting",
        "Requests waiting to be processed (queued, or waiting for their adapter to load).",
        &[(&[], waiting_requests(e, r) as f64)],
    );
    w.gauge(
        "vllm:num_requests_running",
        "Requests in the running batch.",
        &[(&[], e.running_sequences as f64)],
    );
    w.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage: 1 means 100 percent (blocks lent to active adapters count as used).",
        &[(&[], kv_usage(e))],
    );
    let max_lora = e.adapters.max_active.to_string();
    let running = names(&[&e.running_by_adapter]);
    let waiting = names(&[&e.waiting_by_adapter, &r.waiting_for_load_by_adapter]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    w.gauge(
        "vllm:lora_requests_info",
        "Running stats on LoRA requests; the value is the Unix time of the scrape.",
        &[(
            &[
                ("max_lora", max_lora.as_str()),
                ("running_lora_adapters", running.as_str()),
                ("waiting_lora_adapters", waiting.as_str()),
            ],
            now,
        )],
    );
}

fn write_engine(w: &mut TextWriter, e: &EngineStats, r: &RegistryStats) {
    let count = |n: u64| [(&[][..], n as f64)];
    w.counter(
        "multilora_prompt_tokens",
        "Prompt tokens of requests admitted to the engine.",
        &count(e.prompt_tokens),
    );
    w.counter(
        "multilora_generation_tokens",
        "Tokens generated.",
        &count(e.generated_tokens),
    );
    w.counter(
        "multilora_preemptions",
        "Sequences preempted (their KV blocks freed, to be recomputed).",
        &count(e.preemptions),
    );
    w.counter(
        "multilora_engine_steps",
        "Engine steps run.",
        &count(e.steps),
    );
    w.gauge(
        "multilora_queue_depth",
        "Sequences queued in the engine, not yet running.",
        &[(&[], e.waiting_sequences as f64)],
    );
    w.gauge(
        "multilora_requests_running",
        "Sequences in the running batch.",
        &[(&[], e.running_sequences as f64)],
    );
    w.gauge(
        "multilora_requests_waiting_for_adapter",
        "Generation requests waiting for their adapter to load.",
        &[(&[], r.waiting_for_load as f64)],
    );
    let adapters = e.adapters.kv_blocks;
    let sequences = e
        .kv_blocks_total
        .saturating_sub(e.kv_blocks_free + adapters);
    w.gauge(
        "multilora_kv_blocks",
        "KV blocks of the one pool by use: free, lent to active adapters, held by sequences.",
        &[
            (&[("state", "free")], e.kv_blocks_free as f64),
            (&[("state", "adapters")], adapters as f64),
            (&[("state", "sequences")], sequences as f64),
        ],
    );
}

fn write_adapters(w: &mut TextWriter, e: &EngineStats, r: &RegistryStats) {
    let a = &e.adapters;
    w.counter(
        "multilora_adapter_loads",
        "Adapter versions loaded into host memory.",
        &[(&[], r.loads as f64)],
    );
    w.counter(
        "multilora_adapter_load_failures",
        "Adapter loads that failed.",
        &[(&[], r.load_failures as f64)],
    );
    w.counter(
        "multilora_adapter_evictions",
        "Adapters evicted, by tier (host: back to registered; active: out of the step's pool).",
        &[
            (&[("tier", "host")], r.host_evictions as f64),
            (&[("tier", "active")], a.evictions as f64),
        ],
    );
    w.gauge(
        "multilora_adapter_bytes",
        "Adapter bytes held, by tier.",
        &[
            (&[("tier", "host")], r.host_bytes as f64),
            (&[("tier", "active")], a.active_bytes as f64),
        ],
    );
    w.gauge(
        "multilora_adapter_budget_bytes",
        "Adapter byte budget, by tier.",
        &[
            (&[("tier", "host")], r.host_budget_bytes as f64),
            (&[("tier", "active")], a.budget_bytes as f64),
        ],
    );
    w.gauge(
        "multilora_adapters",
        "Adapters by state: registered (every name), host (loaded), active (a step may read it).",
        &[
            (&[("state", "registered")], r.registered as f64),
            (&[("state", "host")], r.host_resident as f64),
            (&[("state", "active")], a.active as f64),
        ],
    );
}
