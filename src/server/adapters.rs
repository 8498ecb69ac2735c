//! The `multilora.v1.Adapters` service: thin glue from gRPC to the adapter registry
//! (load, replace, unload, inspect, watch) and, for an unload's drain deadline, to the
//! engine.
use crate::engine::EngineHandle;
use crate::error::RequestError;
use crate::lora::registry::{AdapterEvent, AdapterInfo, AdapterRegistry, AdapterState, EventKind};
use crate::proto::v1 as pb;
use futures::Stream;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

/// How long an unload waits, after cancelling at its deadline, for the cancelled
/// requests to let go of the version.
const AFTER_CANCEL_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AdaptersService {
    pub registry: AdapterRegistry,
    pub engine: EngineHandle,
}

fn unix_s(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn state_to_pb(s: AdapterState) -> pb::AdapterState {
    match s {
        AdapterState::Registered => pb::AdapterState::Registered,
        AdapterState::Loading => pb::AdapterState::Loading,
        AdapterState::Host => pb::AdapterState::Host,
        AdapterState::Active => pb::AdapterState::Active,
        AdapterState::Failed => pb::AdapterState::Failed,
        AdapterState::Draining => pb::AdapterState::Draining,
        AdapterState::Unloaded => pb::AdapterState::Unloaded,
    }
}

fn kind_to_pb(k: EventKind) -> pb::AdapterEventKind {
    match k {
        EventKind::Registered => pb::AdapterEventKind::Registered,
        EventKind::Loading => pb::AdapterEventKind::Loading,
        EventKind::Loaded => pb::AdapterEventKind::Loaded,
        EventKind::LoadFailed => pb::AdapterEventKind::LoadFailed,
        EventKind::Replaced => pb::AdapterEventKind::Replaced,
        EventKind::Evicted => pb::AdapterEventKind::Evicted,
        EventKind::Activated => pb::AdapterEventKind::Activated,
        EventKind::Deactivated => pb::AdapterEventKind::Deactivated,
        EventKind::Unloading => pb::AdapterEventKind::Unloading,
        EventKind::Freed => pb::AdapterEventKind::Freed,
    }
}

/// `waiting_in_queue`: this adapter's sequences queued in the engine.
fn info_to_pb(i: AdapterInfo, waiting_in_queue: usize) -> pb::AdapterInfo {
    pb::AdapterInfo {
        name: i.name,
        source: i.source,
        version: i.version,
        state: state_to_pb(i.state) as i32,
        rank: i.rank as u32,
        target_modules: i.target_modules,
        bytes: i.bytes as u64,
        in_flight_requests: i.in_flight as u32,
        waiting_requests: (i.waiting_for_load + waiting_in_queue) as u32,
        loaded_at_s: i.loaded_at.map_or(0.0, unix_s),
        load_time_s: i.load_time.as_secs_f64(),
        last_used_s: i.last_used_ms as f64 / 1e3,
        error: i.error,
        peft_type: i.kind.map_or("", |k| k.name()).to_string(),
    }
}

fn event_to_pb(e: AdapterEvent) -> pb::AdapterEvent {
    pb::AdapterEvent {
        kind: kind_to_pb(e.kind) as i32,
        name: e.name,
        version: e.version,
        detail: e.detail,
        at_s: unix_s(e.at),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AdapterEvent, Status>> + Send>>;

impl AdaptersService {
    async fn queued_by_adapter(&self) -> Result<BTreeMap<String, usize>, RequestError> {
        Ok(self.engine.stats().await?.waiting_by_adapter)
    }

    /// Waits for an unloaded version to be freed by `timeout`, then cancels its
    /// requests and waits for them to let go. Returns (freed, cancelled).
    async fn drain(
        &self,
        unloaded: &crate::lora::registry::Unloaded,
        timeout: Duration,
    ) -> Result<(bool, usize), RequestError> {
        let reg = &self.registry;
        if reg
            .wait_freed(&unloaded.remaining, Instant::now() + timeout)
            .await
        {
            return Ok((true, 0));
        }
        let cancelled = self.engine.cancel_adapter(unloaded.id).await?;
        let freed = reg
            .wait_freed(&unloaded.remaining, Instant::now() + AFTER_CANCEL_WAIT)
            .await;
        Ok((freed, cancelled))
    }
}

#[tonic::async_trait]
impl pb::adapters_server::Adapters for AdaptersService {
    type WatchAdaptersStream = EventStream;

    async fn load_adapter(
        &self,
        request: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::AdapterInfo>, Status> {
        let req = request.into_inner();
        let source = match &req.revision {
            Some(rev) if !rev.is_empty() => format!("{}@{rev}", req.source),
            _ => req.source.clone(),
        };
        if source.is_empty() {
            return Err(RequestError::invalid("source", "is empty").into());
        }
        let version = self
            .registry
            .load(&req.name, &source, req.expected_version)
            .await?;
        // Report the version this call produced or found, even if another call has
        // replaced it since.
        let info = match self.registry.get(&req.name) {
            Some(i) if i.version == version.version => i,
            _ => AdapterInfo {
                name: req.name.clone(),
                source: version.source.clone(),
                version: version.version,
                state: if version.is_retired() {
                    AdapterState::Draining
                } else {
                    AdapterState::Host
                },
                kind: Some(version.weights.kind),
                rank: version.weights.rank_max,
                target_modules: version.weights.target_modules.clone(),
                bytes: version.bytes(),
                in_flight: version.leases(),
                waiting_for_load: 0,
                loaded_at: Some(version.loaded_at),
                load_time: version.load_time,
                last_used_ms: version.last_used_ms(),
                error: String::new(),
            },
        };
        Ok(Response::new(info_to_pb(info, 0)))
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let req = request.into_inner();
        let timeout = match req.drain_timeout_s {
            None => None,
            Some(t) if t.is_finite() && (0.0..=86_400.0).contains(&t) => {
                Some(Duration::from_secs_f64(t))
            }
            Some(t) => {
                return Err(RequestError::invalid(
                    "drain_timeout_s",
                    format!("must be between 0 and 86400 seconds, got {t}"),
                )
                .into())
            }
        };
        let unloaded = self.registry.unload(&req.name)?;
        let (freed, cancelled) = match timeout {
            None => (unloaded.remaining.strong_count() == 0, 0),
            Some(t) => self.drain(&unloaded, t).await?,
        };
        Ok(Response::new(pb::UnloadAdapterResponse {
            name: req.name,
            version: unloaded.version,
            state: if freed {
                pb::AdapterState::Unloaded
            } else {
                pb::AdapterState::Draining
            } as i32,
            cancelled_requests: cancelled as u32,
            bytes_freed: if freed { unloaded.bytes as u64 } else { 0 },
        }))
    }

    async fn list_adapters(
        &self,
        _request: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        let queued = self.queued_by_adapter().await?;
        let adapters = self
            .registry
            .list()
            .into_iter()
            .map(|i| {
                let q = queued.get(&i.name).copied().unwrap_or(0);
                info_to_pb(i, q)
            })
            .collect();
        Ok(Response::new(pb::ListAdaptersResponse { adapters }))
    }

    async fn get_adapter(
        &self,
        request: Request<pb::GetAdapterRequest>,
    ) -> Result<Response<pb::AdapterInfo>, Status> {
        let name = request.into_inner().name;
        let info = self
            .registry
            .get(&name)
            .ok_or_else(|| RequestError::NotFound(format!("adapter {name:?} is not registered")))?;
        let q = self.queued_by_adapter().await?.get(&name).copied();
        Ok(Response::new(info_to_pb(info, q.unwrap_or(0))))
    }

    async fn watch_adapters(
        &self,
        _request: Request<pb::WatchAdaptersRequest>,
    ) -> Result<Response<Self::WatchAdaptersStream>, Status> {
        let rx = self.registry.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let ev = match rx.recv().await {
                Ok(e) => event_to_pb(e),
                Err(broadcast::error::RecvError::Lagged(n)) => pb::AdapterEvent {
                    kind: pb::AdapterEventKind::Lagged as i32,
                    detail: n.to_string(),
                    at_s: unix_s(SystemTime::now()),
                    ..Default::default()
                },
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(ev), rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
