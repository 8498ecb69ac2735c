//! Drives a live server with a planned, seeded workload and records every request as
//! the client saw it (streamed token times, final message or gRPC error). Open loop
//! (arrivals at a rate, optionally capped in concurrency) or closed loop (a fixed
//! number of streams); `verify` first runs every distinct request alone and then checks
//! that each response under load is identical (greedy decoding), so a cross-adapter
//! mix-up under load is caught by the harness itself. Optional adapter churn
//! (`churn`) runs beside the traffic.
use super::churn::{run_churn, summarize_churn, ChurnConfig};
use super::metrics::{fairness_gap, summarize, summarize_by, RequestRecord, Slo};
use super::report::{Report, Setup};
use super::workload::{Arrivals, Length, Popularity};
use crate::proto::v1 as pb;
use crate::rng::Xoshiro256;
use anyhow::{bail, Context, Result};
use pb::adapters_client::AdaptersClient;
use pb::generation_client::GenerationClient;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tonic::transport::Channel;

/// Text the prompts are cut from when no `--prompts` file is given.
pub const BUILTIN_CORPUS: &str = "The harbour town woke before the sun. Fishing boats \
came in one by one, their decks loaded with nets, and the market filled with voices \
bargaining over the morning catch. A baker on the corner pulled the first loaves from \
the oven while a schoolteacher reviewed her lesson on the history of the lighthouse, \
built two hundred years ago after a storm wrecked three ships on the rocks. Travellers \
asked for directions to the museum, the old fort and the cliff path that runs north \
along the coast to a village known for its cheese, its wool and its autumn festival. \
In the afternoon the wind turned, clouds gathered over the bay, and the ferry to the \
islands left early so that it would be back before the weather closed in. Explain, \
summarise, translate, classify, answer questions and write stories about all of it.";

/// How requests are issued.
#[derive(Clone, Copy, Debug)]
pub enum LoadMode {
    /// At the times the arrival process gives, at most `max_concurrency` in flight.
    Open {
        arrivals: Arrivals,
        max_concurrency: Option<usize>,
    },
    /// `concurrency` streams, each sending its next request when the last one ends.
    Closed { concurrency: usize },
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub endpoint: String,
    /// Adapter names requests pick from (by `popularity`); empty: base model only.
    pub adapters: Vec<String>,
    pub popularity: Popularity,
    /// Share of requests (0..=1) that name no adapter.
    pub base_share: f64,
    /// Tenants; adapter i belongs to tenant i mod `tenants`, base requests to "base".
    pub tenants: usize,
    pub mode: LoadMode,
    pub input_len: Length,
    pub output_len: Length,
    pub ignore_eos: bool,
    /// Text prompts are cut from (tokenized by the server).
    pub corpus: String,
    pub requests: usize,
    /// Stop sending new requests after this many seconds.
    pub duration: Option<f64>,
    /// Leading requests left out of the figures.
    pub warmup: usize,
    pub seed: u64,
    pub slo: Option<Slo>,
    pub verify: bool,
    pub progress: bool,
    /// Adapter loads and unloads beside the traffic.
    pub churn: Option<ChurnConfig>,
    /// API keys of an authenticated server: `tenant-K` sends key K (mod the count),
    /// base requests and the corpus tokenization the first. Empty: no key sent.
    pub api_keys: Vec<String>,
    /// A gRPC deadline on every request (the server stops it when it passes).
    pub deadline: Option<Duration>,
}

/// `message` with `authorization: Bearer KEY` when there is a key.
pub fn authorized<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = key.and_then(|k| format!("Bearer {k}").parse().ok()) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The key a planned request of `tenant` sends (see [`BenchConfig::api_keys`]).
fn key_of<'a>(keys: &'a [String], tenant: &str) -> Option<&'a str> {
    if keys.is_empty() {
        return None;
    }
    let k = tenant
        .strip_prefix("tenant-")
        .and_then(|k| k.parse::<usize>().ok())
        .unwrap_or(0);
    Some(keys[k % keys.len()].as_str())
}

/// One planned request.
#[derive(Clone, Debug, Serialize)]
pub struct Planned {
    pub index: usize,
    /// Seconds after the start (open loop).
    pub at: f64,
    pub adapter: String,
    pub tenant: String,
    pub prompt_ids: Vec<u32>,
    pub max_new: u32,
}

/// The requests of a run: arrival times, adapters, tenants and prompt windows.
/// Arrivals, lengths and prompts, and adapter choices each draw from their own stream
/// of the seed, so runs that differ only in their adapters (a sweep over adapter
/// counts, base only included) see the same arrival times and the same requests.
pub fn plan(cfg: &BenchConfig, corpus_ids: &[u32]) -> Result<Vec<Planned>> {
    if corpus_ids.is_empty() {
        bail!("the prompt corpus tokenizes to nothing");
    }
    let mut arrival_rng = Xoshiro256::from_seed(cfg.seed);
    let mut request_rng = Xoshiro256::from_seed(cfg.seed ^ 0x5EED_0000_0000_0002);
    let mut adapter_rng = Xoshiro256::from_seed(cfg.seed ^ 0x5EED_0000_0000_0003);
    let mut picker = cfg.popularity.sampler(cfg.adapters.len());
    let mut at = 0.0;
    let mut out = Vec::with_capacity(cfg.requests);
    for index in 0..cfg.requests {
        if let LoadMode::Open { arrivals, .. } = cfg.mode {
            at += arrivals.next_gap(&mut arrival_rng);
        }
        let n = cfg.input_len.sample(&mut request_rng);
        let from = (request_rng.next_f64() * corpus_ids.len() as f64) as usize;
        let prompt_ids = (0..n)
            .map(|k| corpus_ids[(from + k) % corpus_ids.len()])
            .collect();
        let max_new = cfg
            .output_len
            .sample(&mut request_rng)
            .min(u32::MAX as usize) as u32;
        let base = cfg.adapters.is_empty() || adapter_rng.next_f64() < cfg.base_share;
        let (adapter, tenant) = if base {
            (String::new(), "base".to_string())
        } else {
            let i = picker.pick(&mut adapter_rng);
            (
                cfg.adapters[i].clone(),
                format!("tenant-{}", i % cfg.tenants.max(1)),
            )
        };
        out.push(Planned {
            index,
            at,
            adapter,
            tenant,
            prompt_ids,
            max_new,
        });
    }
    Ok(out)
}

/// The gRPC code name (`NOT_FOUND`) of a status.
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn request_of(p: &Planned, ignore_eos: bool) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: format!("bench-{}", p.index),
        adapter: p.adapter.clone(),
        prompt_token_ids: p.prompt_ids.clone(),
        max_new_tokens: Some(p.max_new),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ignore_eos,
        ..Default::default()
    }
}

/// Counters the progress line reads while a run is going.
#[derive(Default)]
struct Live {
    sent: AtomicUsize,
    done: AtomicUsize,
    errors: AtomicUsize,
    tokens: AtomicUsize,
}

/// How requests are sent: whether EOS is ignored, and the API keys.
#[derive(Clone)]
struct Sending {
    ignore_eos: bool,
    keys: Arc<Vec<String>>,
    deadline: Option<Duration>,
}

impl Sending {
    fn of(cfg: &BenchConfig) -> Self {
        Self {
            ignore_eos: cfg.ignore_eos,
            keys: Arc::new(cfg.api_keys.clone()),
            deadline: cfg.deadline,
        }
    }
}

/// Sends one request and records it; also returns the token ids it produced.
async fn send(
    mut client: GenerationClient<Channel>,
    p: &Planned,
    how: &Sending,
    t0: Instant,
    live: &Live,
) -> (RequestRecord, Vec<u32>) {
    live.sent.fetch_add(1, Ordering::Relaxed);
    let now = || t0.elapsed().as_secs_f64();
    let mut rec = RequestRecord {
        adapter: p.adapter.clone(),
        tenant: p.tenant.clone(),
        start: now(),
        ..Default::default()
    };
    let mut ids = Vec::new();
    let outcome: Result<(), tonic::Status> = async {
        let mut request = authorized(request_of(p, how.ignore_eos), key_of(&how.keys, &p.tenant));
        if let Some(d) = how.deadline {
            request.set_timeout(d);
        }
        let mut stream = client.generate(request).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            match msg.event {
                Some(pb::generate_response::Event::Delta(d)) => {
                    let t = now();
                    live.tokens.fetch_add(d.token_ids.len(), Ordering::Relaxed);
                    rec.token_times.extend(d.token_ids.iter().map(|_| t));
                    ids.extend(d.token_ids);
                }
                Some(pb::generate_response::Event::Final(_)) => return Ok(()),
                None => {}
            }
        }
        Err(tonic::Status::unknown(
            "stream ended without a final message",
        ))
    }
    .await;
    rec.end = now();
    if let Err(s) = outcome {
        rec.error = Some(code_name(s.code()));
        live.errors.fetch_add(1, Ordering::Relaxed);
    }
    live.done.fetch_add(1, Ordering::Relaxed);
    (rec, ids)
}

/// Tokenizes the corpus on the server.
async fn corpus_ids(
    client: &mut GenerationClient<Channel>,
    text: &str,
    key: Option<&str>,
) -> Result<Vec<u32>> {
    let request = authorized(pb::TokenizeRequest { text: text.into() }, key);
    let r = client
        .tokenize(request)
        .await
        .context("tokenizing the prompt corpus")?;
    Ok(r.into_inner().token_ids)
}

type Key = (String, Vec<u32>, u32);

/// Every distinct request alone, one after another (the `verify` reference).
async fn solo_runs(
    client: &GenerationClient<Channel>,
    plan: &[Planned],
    how: &Sending,
) -> HashMap<Key, Vec<u32>> {
    let mut solo = HashMap::new();
    let t0 = Instant::now();
    let live = Live::default();
    for p in plan {
        let key = (p.adapter.clone(), p.prompt_ids.clone(), p.max_new);
        if let std::collections::hash_map::Entry::Vacant(slot) = solo.entry(key) {
            let (rec, ids) = send(client.clone(), p, how, t0, &live).await;
            if rec.error.is_none() {
                slot.insert(ids);
            }
        }
    }
    solo
}

/// Redraws one progress line on stderr every second until every request is done:
/// the bar, requests done, in flight and failed, output tokens per second over the last
/// second, time elapsed and an estimate of the time left.
fn spawn_progress(live: Arc<Live>, total: usize, t0: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_tokens = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let done = live.done.load(Ordering::Relaxed).min(total);
            let in_flight = live.sent.load(Ordering::Relaxed).saturating_sub(done);
            let tokens = live.tokens.load(Ordering::Relaxed);
            let elapsed = t0.elapsed().as_secs_f64();
            eprint!(
                "\r\x1b[K{}",
                progress_line(
                    done,
                    total,
                    in_flight,
                    live.errors.load(Ordering::Relaxed),
                    tokens - last_tokens,
                    elapsed
                )
            );
            last_tokens = tokens;
            if done >= total {
                eprintln!();
                return;
            }
        }
    })
}

/// The text of the progress line.
pub fn progress_line(
    done: usize,
    total: usize,
    in_flight: usize,
    errors: usize,
    tokens_last_second: usize,
    elapsed: f64,
) -> String {
    let width = 24;
    let filled = (width * done).checked_div(total).unwrap_or(width);
    // The rate so far says little before a tenth of the run is done.
    let left = if done * 10 >= total && done < total {
        format!(
            ", ~{:.0} s left",
            elapsed * (total - done) as f64 / done as f64
        )
    } else {
        String::new()
    };
    format!(
        "[{}{}] {done}/{total} done, {in_flight} in flight, {errors} failed | {tokens_last_second} tok/s | {elapsed:.0} s{left}",
        "#".repeat(filled),
        "-".repeat(width - filled),
    )
}

/// Issues the plan and returns (record, output ids) per planned request, in order.
async fn issue(
    cfg: &BenchConfig,
    client: &GenerationClient<Channel>,
    plan: Arc<Vec<Planned>>,
    t0: Instant,
) -> Result<Vec<(RequestRecord, Vec<u32>)>> {
    let live = Arc::new(Live::default());
    let progress = cfg
        .progress
        .then(|| spawn_progress(live.clone(), plan.len(), t0));
    let deadline = cfg.duration.map(|d| t0 + Duration::from_secs_f64(d));
    let how = Sending::of(cfg);
    let mut handles = Vec::with_capacity(plan.len());
    match cfg.mode {
        LoadMode::Open {
            max_concurrency, ..
        } => {
            let cap = Arc::new(Semaphore::new(
                max_concurrency.unwrap_or(Semaphore::MAX_PERMITS),
            ));
            for i in 0..plan.len() {
                let at = t0 + Duration::from_secs_f64(plan[i].at);
                if deadline.is_some_and(|d| at > d) {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let permit = cap
                    .clone()
                    .acquire_owned()
                    .await
                    .context("concurrency cap")?;
                let (c, plan, live, how) =
                    (client.clone(), plan.clone(), live.clone(), how.clone());
                handles.push(tokio::spawn(async move {
                    let r = send(c, &plan[i], &how, t0, &live).await;
                    drop(permit);
                    vec![(i, r)]
                }));
            }
        }
        LoadMode::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..concurrency.max(1) {
                let (c, plan, live, next, how) = (
                    client.clone(),
                    plan.clone(),
                    live.clone(),
                    next.clone(),
                    how.clone(),
                );
                handles.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= plan.len() || deadline.is_some_and(|d| Instant::now() > d) {
                            return out;
                        }
                        out.push((i, send(c.clone(), &plan[i], &how, t0, &live).await));
                    }
                }));
            }
        }
    }
    let mut results: Vec<Option<(RequestRecord, Vec<u32>)>> = vec![None; plan.len()];
    for h in handles {
        for (i, r) in h.await.context("a request task panicked")? {
            results[i] = Some(r);
        }
    }
    // Requests never sent (a duration cut the plan short) count as done for the bar.
    live.done.store(plan.len(), Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.await;
    }
    Ok(results.into_iter().flatten().collect())
}

/// Runs the whole benchmark against `cfg.endpoint`.
pub async fn run(cfg: &BenchConfig) -> Result<Report> {
    let channel = Channel::from_shared(cfg.endpoint.clone())
        .with_context(|| format!("bad endpoint {:?}", cfg.endpoint))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cfg.endpoint))?;
    let mut client = GenerationClient::new(channel.clone());
    let key = cfg.api_keys.first().map(String::as_str);
    let ids = corpus_ids(&mut client, &cfg.corpus, key).await?;
    let plan = Arc::new(plan(cfg, &ids)?);
    let solo = if cfg.verify {
        Some(solo_runs(&client, &plan, &Sending::of(cfg)).await)
    } else {
        None
    };
    let t0 = Instant::now();
    let (stop_churn, stop) = watch::channel(false);
    let churn = cfg.churn.clone().map(|c| {
        let admin = AdaptersClient::new(channel.clone());
        tokio::spawn(run_churn(c, admin, cfg.seed, t0, stop))
    });
    let results = issue(cfg, &client, plan.clone(), t0).await;
    let _ = stop_churn.send(true);
    let churn_ops = match churn {
        Some(task) => task.await.context("the churn task panicked")??,
        None => Vec::new(),
    };
    let results = results?;
    let churn_duration = t0.elapsed().as_secs_f64();
    let verify_mismatches = solo.map(|solo| {
        results
            .iter()
            .zip(plan.iter())
            .filter(|((rec, ids), p)| {
                let key = (p.adapter.clone(), p.prompt_ids.clone(), p.max_new);
                rec.error.is_none() && solo.get(&key).is_some_and(|want| want != ids)
            })
            .count()
    });
    let records: Vec<RequestRecord> = results
        .into_iter()
        .skip(cfg.warmup)
        .map(|(r, _)| r)
        .collect();
    let from = records
        .iter()
        .map(|r| r.start)
        .fold(f64::INFINITY, f64::min);
    let to = records.iter().map(|r| r.end).fold(0.0, f64::max);
    let duration = if records.is_empty() { 0.0 } else { to - from };
    let refs: Vec<&RequestRecord> = records.iter().collect();
    let slo = cfg.slo.as_ref();
    Ok(Report {
        setup: Setup::default(),
        summary: summarize(&refs, duration, slo),
        by_adapter: summarize_by(&records, |r| &r.adapter, duration, slo),
        by_tenant: summarize_by(&records, |r| &r.tenant, duration, slo),
        fairness_gap_tokens: fairness_gap(&records, from, to),
        verify_mismatches,
        churn: cfg
            .churn
            .as_ref()
            .map(|_| summarize_churn(&churn_ops, churn_duration)),
        churn_ops,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_counts_rate_and_time_left() {
        let line = progress_line(40, 160, 12, 1, 250, 10.0);
        assert_eq!(
            line,
            "[######------------------] 40/160 done, 12 in flight, 1 failed | 250 tok/s | 10 s, ~30 s left"
        );
        // No estimate before a tenth is done, nor at the end; an empty plan is full.
        assert!(!progress_line(10, 160, 3, 0, 0, 2.0).contains("left"));
        assert!(progress_line(160, 160, 0, 0, 0, 40.0)
            .starts_with("[########################] 160/160"));
        assert!(progress_line(0, 0, 0, 0, 0, 0.0).starts_with("[########################] 0/0"));
    }

    fn open_loop(adapters: usize) -> BenchConfig {
        BenchConfig {
            endpoint: String::new(),
            adapters: (0..adapters).map(|i| format!("a-{i}")).collect(),
            popularity: Popularity::Uniform,
            base_share: 0.0,
            tenants: 1,
            mode: LoadMode::Open {
                arrivals: Arrivals::new(5.0, 1.0).unwrap(),
                max_concurrency: None,
            },
            input_len: Length::Uniform { lo: 4, hi: 40 },
            output_len: Length::Uniform { lo: 1, hi: 20 },
            ignore_eos: true,
            corpus: String::new(),
            requests: 50,
            duration: None,
            warmup: 0,
            seed: 11,
            slo: None,
            verify: false,
            progress: false,
            churn: None,
            api_keys: vec![],
            deadline: None,
        }
    }

    #[test]
    fn runs_differing_only_in_adapters_get_the_same_requests() {
        let corpus: Vec<u32> = (0..500).collect();
        let base = plan(&open_loop(0), &corpus).unwrap();
        for n in [1, 8, 2048] {
            let other = plan(&open_loop(n), &corpus).unwrap();
            for (a, b) in base.iter().zip(&other) {
                assert_eq!(
                    (a.at, &a.prompt_ids, a.max_new),
                    (b.at, &b.prompt_ids, b.max_new)
                );
                assert!(a.adapter.is_empty() && !b.adapter.is_empty());
            }
        }
        let mut reseeded = open_loop(8);
        reseeded.seed = 12;
        assert_ne!(plan(&reseeded, &corpus).unwrap()[0].at, base[0].at);
    }

    #[test]
    fn code_names_are_grpc_spellings() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }
}
