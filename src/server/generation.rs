//! The `multilora.v1.Generation` service: thin glue from gRPC to the engine handle.
use super::admission::{Admission, QueueBounds, TenantUsage, Ticket};
use super::caller::Caller;
use super::observe::{ObservedEvents, Protocol, ServerMetrics};
use super::tenants::Tenants;
use super::validate::{validate, AdapterChoice};
use crate::engine::sampler::TokenLogprob;
use crate::engine::sequence::{FinishReason, RequestAdapters, SeqEvent, TokenEvent, Usage};
use crate::engine::{EngineHandle, EngineStats};
use crate::error::RequestError;
use crate::lora::peft::AdapterKind;
use crate::lora::registry::{AdapterRegistry, RegistryStats};
use crate::model::TextTokenizer;
use crate::proto::v1 as pb;
use futures::Stream;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// Shared state of the generation service.
#[derive(Clone)]
pub struct GenerationService {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub adapters: AdapterRegistry,
    pub info: pb::ModelInfo,
    /// Request outcomes and latencies of both fronts.
    pub metrics: Arc<ServerMetrics>,
    /// Who may call, with what (open when there is no tenants file).
    pub tenants: Arc<Tenants>,
    /// Queue bounds and tenant limits at the front door.
    pub admission: Arc<Admission>,
}

impl GenerationService {
    /// Requires API keys of `tenants` (else the server is open).
    pub fn with_tenants(mut self, tenants: Tenants) -> Self {
        self.tenants = Arc::new(tenants);
        self
    }

    /// Bounds the waiting queue (requests admitted and not yet started).
    pub fn with_queue_bounds(mut self, bounds: QueueBounds) -> Self {
        self.admission = Arc::new(Admission::new(bounds));
        self
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl GenerationService {
    /// Checks the caller, validates (tokenizing on a blocking thread), checks the
    /// caller may use the adapters, admits the request (queue bounds and tenant
    /// limits), then takes a lease on the adapter (waiting for it to load if it is
    /// cold, until the caller's deadline; invalid input never starts a load), fits the
    /// request to the pool beside that adapter, and submits it to the engine.
    /// Returns the request's events (measured for `protocol`'s metrics as they are
    /// read) and the adapter version taken (0: none); a refusal is counted here.
    pub(crate) async fn start(
        &self,
        req: pb::GenerateRequest,
        caller: Result<Caller, RequestError>,
        protocol: Protocol,
    ) -> Result<(ObservedEvents, u64), RequestError> {
        let arrived = Instant::now();
        match self.submit(req, caller).await {
            Ok((rx, version, ticket)) => Ok((
                self.metrics.observe(protocol, arrived, rx, Some(ticket)),
                version,
            )),
            Err(e) => {
                self.metrics.rejected(protocol, &e);
                Err(e)
            }
        }
    }

    async fn submit(
        &self,
        req: pb::GenerateRequest,
        caller: Result<Caller, RequestError>,
    ) -> Result<(mpsc::UnboundedReceiver<SeqEvent>, u64, Ticket), RequestError> {
        let caller = caller?;
        let tokenizer = self.tokenizer.clone();
        let limits = self.engine.limits();
        let valid = tokio::task::spawn_blocking(move || validate(&req, &tokenizer, &limits))
            .await
            .map_err(|e| RequestError::Internal(format!("validation task: {e}")))??;
        caller.tenant.check_adapters(valid.adapters.names())?;
        let ticket = self
            .admission
            .admit(&caller.tenant, valid.prompt_ids.len())?;
        let leasing = self.lease(&valid.adapters);
        let adapters = match caller.deadline {
            None => leasing.await?,
            Some(deadline) => tokio::time::timeout_at(deadline.into(), leasing)
                .await
                .map_err(|_| {
                    RequestError::DeadlineExceeded(
                        "the request's deadline passed while its adapter was loading".into(),
                    )
                })??,
        };
        let version = adapters.first_version();
        let mut request = valid.into_engine_request(adapters, &limits)?;
        request.tenant = caller.tenant.share.clone();
        request.deadline = caller.deadline;
        Ok((self.engine.submit(request).await?, version, ticket))
    }

    async fn lease(&self, choice: &AdapterChoice) -> Result<RequestAdapters, RequestError> {
        Ok(match choice {
            AdapterChoice::Base => RequestAdapters::default(),
            AdapterChoice::One(name) => RequestAdapters::single(self.adapters.acquire(name).await?),
            AdapterChoice::Mixture(members) => self.lease_mixture(members).await?,
        })
    }

    /// The caller of a gRPC request (its key and deadline).
    pub(crate) fn grpc_caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, RequestError> {
        Caller::from_grpc(&self.tenants, metadata)
    }

    /// Leases every member of a mixture; each must be a LoRA-family adapter.
    async fn lease_mixture(
        &self,
        members: &[(String, f32)],
    ) -> Result<RequestAdapters, RequestError> {
        let mut leased = Vec::with_capacity(members.len());
        for (name, weight) in members {
            let lease = self.adapters.acquire(name).await?;
            let kind = lease.weights().kind;
            if !kind.mixes() {
                let why = match kind {
                    AdapterKind::Dora => "DoRA's norm is per adapter",
                    _ => "its scales do not add",
                };
                return Err(RequestError::invalid(
                    "adapters",
                    format!(
                        "{name:?} is a {} adapter; mixtures combine LoRA-family adapters only \
                         (LoRA, rsLoRA, AdaLoRA, VeRA): {why}",
                        kind.name()
                    ),
                ));
            }
            leased.push((lease, *weight));
        }
        Ok(RequestAdapters::mixture(leased))
    }
}

fn logprob_to_pb(l: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: l.token_id,
        logprob: l.logprob,
        top: l
            .top
            .into_iter()
            .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
            .collect(),
    }
}

fn reason_to_pb(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

fn usage_to_pb(u: &Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens as u32,
        virtual_tokens: u.virtual_tokens as u32,
        completion_tokens: u.completion_tokens as u32,
        queue_time_s: u.queue_time.as_secs_f64(),
        time_to_first_token_s: u.time_to_first_token.as_secs_f64(),
        total_time_s: u.total_time.as_secs_f64(),
    }
}

fn delta_to_pb(t: TokenEvent) -> pb::TokenDelta {
    pb::TokenDelta {
        text: t.text,
        token_ids: vec![t.token_id],
        logprobs: t.logprob.map(logprob_to_pb).into_iter().collect(),
    }
}

fn engine_vanished() -> Status {
    RequestError::Internal("the engine stopped before the sequence finished".into()).into()
}

/// Maps engine events to responses; ends after the final message or an error.
fn event_stream(request_id: String, adapter_version: u64, rx: ObservedEvents) -> EventStream {
    let stream = futures::stream::unfold(Some(rx), move |state| {
        let request_id = request_id.clone();
        async move {
            let mut rx = state?;
            let item = match rx.recv().await {
                Some(SeqEvent::Token(t)) => Ok(pb::GenerateResponse {
                    request_id,
                    event: Some(pb::generate_response::Event::Delta(delta_to_pb(t))),
                }),
                Some(SeqEvent::Finished {
                    reason,
                    usage,
                    matched_stop,
                }) => {
                    let msg = pb::GenerateResponse {
                        request_id,
                        event: Some(pb::generate_response::Event::Final(pb::GenerateFinal {
                            finish_reason: reason_to_pb(reason) as i32,
                            usage: Some(usage_to_pb(&usage)),
                            matched_stop: matched_stop.unwrap_or_default(),
                            adapter_version,
                        })),
                    };
                    return Some((Ok(msg), None));
                }
                Some(SeqEvent::Error(e)) => return Some((Err(Status::from(e)), None)),
                None => return Some((Err(engine_vanished()), None)),
            };
            Some((item, Some(rx)))
        }
    });
    Box::pin(stream)
}

fn counts_to_pb(by: &BTreeMap<String, usize>) -> HashMap<String, u32> {
    by.iter().map(|(k, v)| (k.clone(), *v as u32)).collect()
}

fn adapter_stats_to_pb(e: &EngineStats, r: &RegistryStats) -> pb::AdapterStats {
    let a = &e.adapters;
    pb::AdapterStats {
        registered: r.registered as u32,
        host_resident: r.host_resident as u32,
        host_bytes: r.host_bytes as u64,
        host_budget_bytes: r.host_budget_bytes as u64,
        resident_bytes: r.resident_bytes as u64,
        draining_versions: r.draining_versions as u32,
        active: a.active as u32,
        active_bytes: a.active_bytes as u64,
        active_budget_bytes: a.budget_bytes as u64,
        active_kv_blocks: a.kv_blocks as u32,
        loads: r.loads,
        load_failures: r.load_failures,
        load_time_total_s: r.load_time_total.as_secs_f64(),
        load_time_max_s: r.load_time_max.as_secs_f64(),
        host_hits: r.host_hits,
        host_misses: r.host_misses,
        host_evictions: r.host_evictions,
        active_hits: a.hits,
        active_misses: a.misses,
        active_evictions: a.evictions,
        waiting_for_load: r.waiting_for_load as u32,
        waiting_by_adapter: counts_to_pb(&e.waiting_by_adapter),
        running_by_adapter: counts_to_pb(&e.running_by_adapter),
    }
}

fn usage_by_tenant_to_pb(usage: BTreeMap<String, TenantUsage>) -> HashMap<String, pb::TenantUsage> {
    usage
        .into_iter()
        .map(|(name, u)| {
            let u = pb::TenantUsage {
                requests: u.requests,
                refused: u.refused,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                in_flight: u.in_flight as u32,
            };
            (name, u)
        })
        .collect()
}

/// The stats a caller sees: `tenants` is every tenant's usage for one that may manage
/// adapters, its own otherwise.
fn stats_to_pb(
    s: EngineStats,
    r: &RegistryStats,
    admission: &Admission,
    tenants: BTreeMap<String, TenantUsage>,
) -> pb::EngineStats {
    let (queued, queued_tokens) = admission.waiting();
    pb::EngineStats {
        tenants: usage_by_tenant_to_pb(tenants),
        refused_requests: admission.refused(),
        queued_requests: queued as u32,
        queued_prompt_tokens: queued_tokens as u64,
        deadline_expired_waiting: s.deadline_expired_waiting,
        deadline_expired_running: s.deadline_expired_running,
        adapters: Some(adapter_stats_to_pb(&s, r)),
        steps: s.steps,
        running_sequences: s.running_sequences as u32,
        waiting_sequences: s.waiting_sequences as u32,
        kv_blocks_total: s.kv_blocks_total as u32,
        kv_blocks_free: s.kv_blocks_free as u32,
        kv_block_size: s.kv_block_size as u32,
        preemptions: s.preemptions,
        aborted_sequences: s.aborted_sequences,
        finished_sequences: s.finished_sequences,
        generated_tokens: s.generated_tokens,
        prompt_tokens: s.prompt_tokens,
    }
}

/// How much earlier than the caller's deadline a unary call answers DEADLINE_EXCEEDED.
const UNARY_DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(5);

/// A unary call's whole answer from its events.
async fn collect_unary(
    request_id: String,
    adapter_version: u64,
    mut rx: ObservedEvents,
) -> Result<Response<pb::GenerateResult>, Status> {
    let mut out = pb::GenerateResult {
        request_id,
        adapter_version,
        ..Default::default()
    };
    loop {
        match rx.recv().await {
            Some(SeqEvent::Token(t)) => {
                out.text.push_str(&t.text);
                out.token_ids.push(t.token_id);
                out.logprobs.extend(t.logprob.map(logprob_to_pb));
            }
            Some(SeqEvent::Finished {
                reason,
                usage,
                matched_stop,
            }) => {
                out.finish_reason = reason_to_pb(reason) as i32;
                out.usage = Some(usage_to_pb(&usage));
                out.matched_stop = matched_stop.unwrap_or_default();
                return Ok(Response::new(out));
            }
            Some(SeqEvent::Error(e)) => return Err(Status::from(e)),
            None => return Err(engine_vanished()),
        }
    }
}

#[tonic::async_trait]
impl pb::generation_server::Generation for GenerationService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let caller = self.grpc_caller(request.metadata());
        let req = request.into_inner();
        let request_id = req.request_id.clone();
        let (rx, version) = self.start(req, caller, Protocol::Grpc).await?;
        Ok(Response::new(event_stream(request_id, version, rx)))
    }

    async fn generate_unary(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResult>, Status> {
        let caller = self.grpc_caller(request.metadata());
        let deadline = caller.as_ref().ok().and_then(|c| c.deadline);
        let req = request.into_inner();
        let request_id = req.request_id.clone();
        let (rx, version) = self.start(req, caller, Protocol::Grpc).await?;
        let collect = collect_unary(request_id, version, rx);
        let Some(deadline) = deadline else {
            return collect.await;
        };
        // Answer DEADLINE_EXCEEDED just before the transport's own timer, which would
        // answer CANCELLED.
        let before = deadline
            .checked_sub(UNARY_DEADLINE_MARGIN)
            .unwrap_or(deadline);
        tokio::time::timeout_at(before.into(), collect)
            .await
            .map_err(|_| {
                Status::from(RequestError::DeadlineExceeded(
                    "the request's deadline passed before it finished".into(),
                ))
            })?
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.grpc_caller(request.metadata())?;
        let text = request.into_inner().text;
        let tokenizer = self.tokenizer.clone();
        let ids = tokio::task::spawn_blocking(move || tokenizer.encode(&text))
            .await
            .map_err(|e| RequestError::Internal(format!("tokenize task: {e}")))?
            .map_err(|e| RequestError::Internal(format!("tokenizer: {e:#}")))?;
        Ok(Response::new(pb::TokenizeResponse { token_ids: ids }))
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        self.grpc_caller(request.metadata())?;
        Ok(Response::new(self.info.clone()))
    }

    async fn get_engine_stats(
        &self,
        request: Request<pb::GetEngineStatsRequest>,
    ) -> Result<Response<pb::EngineStats>, Status> {
        let caller = self.grpc_caller(request.metadata())?;
        let stats = self.engine.stats().await?;
        let mut usage = Admission::usage(&self.tenants);
        if !caller.tenant.spec.manage_adapters {
            usage.retain(|name, _| name == caller.tenant.name());
        }
        let r = self.adapters.stats();
        Ok(Response::new(stats_to_pb(
            stats,
            &r,
            &self.admission,
            usage,
        )))
    }
}
