//! Server assembly: the gRPC generation and adapters services, `grpc.health.v1`,
//! reflection, the OpenAI-compatible HTTP front (`openai`) on its own port, and graceful
//! shutdown of both (stop accepting, drain in-flight streams up to a deadline, then
//! cancel them).
pub mod adapters;
pub mod admission;
pub mod caller;
pub mod exposition;
pub mod generation;
mod idle_trim;
pub mod observe;
pub mod openai;
pub mod tenants;
pub mod tls;
pub mod validate;

use crate::engine::sequence::{EngineRequest, GenerationParams, SeqEvent};
use crate::engine::{self, sampler::SamplingParams, EngineConfig, EngineHandle};
use crate::lora::registry::AdapterRegistry;
use crate::model::{BaseModel, TextTokenizer};
use crate::proto::v1 as pb;
use admission::{Admission, QueueBounds};
use anyhow::{bail, ensure, Context, Result};
use generation::GenerationService;
use pb::adapters_server::AdaptersServer;
use pb::generation_server::GenerationServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tenants::Tenants;
use tls::{TlsAcceptors, TlsListener, TlsOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic_health::server::HealthReporter;

/// How the server behaves at shutdown.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// How long in-flight streams may run after a shutdown signal before they are cancelled.
    pub drain_timeout: Duration,
    /// Where [`RunningServer::start`] serves the OpenAI-compatible HTTP front (port 0:
    /// any free one); None: no HTTP front.
    pub http_listen: Option<SocketAddr>,
    /// How long the engine loop may make no progress with work pending before health
    /// says NOT_SERVING.
    pub engine_stall_timeout: Duration,
    /// TLS (mutual TLS with a client CA) on both fronts; None: plaintext.
    pub tls: Option<TlsOptions>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            http_listen: None,
            engine_stall_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// Requests admitted and not yet started, at most, unless configured otherwise.
pub const DEFAULT_MAX_WAITING_REQUESTS: usize = 1024;

/// Starts the engine thread for a loaded model, tells the adapter registry how large an
/// adapter the active pool can hold, and builds the service over both: open (no
/// tenants), with the default queue bounds ([`DEFAULT_MAX_WAITING_REQUESTS`], and 4x the
/// KV cache's tokens); see [`GenerationService::with_tenants`] and
/// [`GenerationService::with_queue_bounds`].
pub fn start_engine(
    model: Box<dyn BaseModel>,
    tokenizer: TextTokenizer,
    adapters: AdapterRegistry,
    engine_cfg: EngineConfig,
    dtype_note: &str,
) -> Result<GenerationService> {
    let cfg = model.config().clone();
    let (stored, wanted) = (adapters.config().adapter_dtype, model.adapter_dtype());
    ensure!(
        stored == wanted,
        "the adapter registry stores adapters as {} but this {} base wants {} \
         (build its config with RegistryConfig::for_model)",
        stored.name(),
        model.dtype_name(),
        wanted.name()
    );
    let device = model.device_name();
    let dtype = format!("{} ({dtype_note})", model.dtype_name());
    let tokenizer = Arc::new(tokenizer);
    let engine = engine::spawn(model, tokenizer.clone(), engine_cfg)?;
    adapters.set_max_adapter_bytes(engine.limits().max_adapter_bytes);
    let info = pb::ModelInfo {
        model_name: cfg.name.clone(),
        architecture: cfg.arch.family.name().into(),
        context_length: cfg.max_position_embeddings as u32,
        vocab_size: cfg.vocab_size as u32,
        dtype,
        device,
        num_layers: cfg.num_layers as u32,
        hidden_size: cfg.hidden_size as u32,
    };
    let bounds = QueueBounds {
        max_waiting_requests: DEFAULT_MAX_WAITING_REQUESTS,
        max_waiting_tokens: 4 * engine.limits().kv_capacity_tokens,
    };
    Ok(GenerationService {
        engine,
        tokenizer,
        adapters,
        info,
        metrics: Default::default(),
        tenants: Default::default(),
        admission: Arc::new(Admission::new(bounds)),
    })
}

/// Runs one short greedy generation so the first real request does not pay for
/// first-touch costs; fails if the engine cannot generate.
pub async fn warm_up(engine: &EngineHandle) -> Result<()> {
    let req = EngineRequest {
        request_id: "warm-up".into(),
        adapters: Default::default(),
        tenant: Default::default(),
        deadline: None,
        prompt_ids: vec![0, 1, 2, 3],
        params: GenerationParams {
            max_new_tokens: 2,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: vec![],
            ignore_eos: true,
            logprobs: None,
        },
    };
    let mut rx = engine.submit(req).await?;
    while let Some(ev) = rx.recv().await {
        match ev {
            SeqEvent::Token(_) => {}
            SeqEvent::Finished { .. } => return Ok(()),
            SeqEvent::Error(e) => bail!("warm-up failed: {e}"),
        }
    }
    bail!("warm-up: the engine stopped")
}

/// Sets the health of the generation service and of the server as a whole ("").
async fn set_health(reporter: &HealthReporter, status: tonic_health::ServingStatus) {
    reporter
        .set_service_status(
            <GenerationServer<GenerationService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter.set_service_status("", status).await;
}

/// Lets through only callers that may manage adapters (the Adapters service).
fn manage_adapters_only(
    tenants: Arc<Tenants>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |request| {
        let caller = caller::Caller::from_grpc(&tenants, request.metadata())?;
        caller.tenant.check_manage()?;
        Ok(request)
    }
}

/// Health from the engine: NOT_SERVING as soon as its thread dies, or while its loop
/// makes no progress for `stall` with work pending (SERVING again once it does),
/// unless the server is draining (`draining`), which keeps it NOT_SERVING.
fn watch_engine(
    engine: EngineHandle,
    reporter: HealthReporter,
    stall: Duration,
    draining: Arc<AtomicBool>,
) {
    tokio::spawn(async move {
        let poll = (stall / 4).clamp(Duration::from_millis(10), Duration::from_millis(200));
        let (mut beats, mut since) = (engine.progress().beats(), Instant::now());
        let mut stalled = false;
        while engine.is_alive() {
            tokio::time::sleep(poll).await;
            let now_beats = engine.progress().beats();
            if now_beats != beats {
                (beats, since) = (now_beats, Instant::now());
            }
            let stuck = engine.progress().is_busy() && since.elapsed() >= stall;
            if stuck != stalled && !draining.load(Ordering::Acquire) {
                stalled = stuck;
                let status = if stuck {
                    tracing::error!(
                        ?stall,
                        "the engine loop made no progress with work pending; health NOT_SERVING"
                    );
                    tonic_health::ServingStatus::NotServing
                } else {
                    tracing::warn!("the engine loop made progress again; health SERVING");
                    tonic_health::ServingStatus::Serving
                };
                set_health(&reporter, status).await;
            }
        }
        tracing::error!("engine thread is gone; health NOT_SERVING");
        set_health(&reporter, tonic_health::ServingStatus::NotServing).await;
    });
}

/// The gRPC services: generation, adapters, health and reflection (v1 and v1alpha).
fn grpc_router(
    service: GenerationService,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<tonic::transport::server::Router> {
    // Both reflection versions: current grpcurl speaks v1, older tools v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .context("building the v1alpha reflection service")?;
    let tenants = service.tenants.clone();
    if tenants.is_open() {
        tracing::warn!(
            "no tenants file: the server is open, any caller may use any adapter and \
             manage adapters (fine for local use; not for exposing it)"
        );
    } else {
        tracing::info!(tenants = tenants.all().len(), "API keys required");
    }
    let adapters_service = adapters::AdaptersService {
        registry: service.adapters.clone(),
        engine: service.engine.clone(),
    };
    Ok(tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(GenerationServer::new(service))
        .add_service(AdaptersServer::with_interceptor(
            adapters_service,
            manage_adapters_only(tenants),
        )))
}

/// Serves the OpenAI front on `http` (over TLS with `tls`) in a task of its own until
/// `stopped` resolves.
fn spawn_http(
    http: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: GenerationService,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let http_addr = http.local_addr()?;
    tracing::info!(%http_addr, tls = tls.is_some(), "serving the OpenAI-compatible HTTP API");
    Ok(tokio::spawn(openai::serve(http, tls, service, stopped)))
}

/// Once shutdown has `fired`, waits `drain`, then cancels the sequences still running.
fn cancel_after_drain(engine: EngineHandle, fired: oneshot::Receiver<()>, drain: Duration) {
    tokio::spawn(async move {
        if fired.await.is_ok() {
            tokio::time::sleep(drain).await;
            tracing::warn!("drain deadline reached; cancelling remaining sequences");
            let _ = engine.cancel_all().await;
        }
    });
}

/// Serves gRPC on `listener` (and the OpenAI front on `http`, if given; both over TLS
/// where `opts.tls` says) until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    http: Option<TcpListener>,
    service: GenerationService,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tls = opts.tls.as_ref().map(TlsAcceptors::load).transpose()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, tonic_health::ServingStatus::NotServing).await;
    let engine = service.engine.clone();
    let addr = listener.local_addr()?;

    let (fired_tx, fired_rx) = oneshot::channel::<()>();
    let (stop_http, mut http_stopped) = tokio::sync::watch::channel(false);
    let drain_reporter = reporter.clone();
    let draining = Arc::new(AtomicBool::new(false));
    let draining_flag = draining.clone();
    let signal = async move {
        shutdown.await;
        draining_flag.store(true, Ordering::Release);
        tracing::info!("shutdown requested: no new connections; draining in-flight streams");
        set_health(&drain_reporter, tonic_health::ServingStatus::NotServing).await;
        let _ = stop_http.send(true);
        let _ = fired_tx.send(());
    };
    let http_task = match http {
        Some(http) => {
            let stopped = async move {
                let _ = http_stopped.wait_for(|stop| *stop).await;
            };
            let http_tls = tls.as_ref().map(|t| t.http.clone());
            Some(spawn_http(http, http_tls, service.clone(), stopped)?)
        }
        None => None,
    };
    cancel_after_drain(engine.clone(), fired_rx, opts.drain_timeout);

    let router = grpc_router(service, health)?;
    let server = match &tls {
        Some(tls) => {
            let incoming = TlsListener::new(listener, tls.grpc.clone()).into_incoming();
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        }
        None => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        }
    };

    warm_up(&engine).await.context("warming up the model")?;
    set_health(&reporter, tonic_health::ServingStatus::Serving).await;
    idle_trim::trim_when_idle(engine.clone());
    watch_engine(engine, reporter, opts.engine_stall_timeout, draining);
    tracing::info!(%addr, tls = tls.is_some(), "serving");
    server
        .await
        .context("server task")?
        .context("gRPC server")?;
    if let Some(http) = http_task {
        http.await
            .context("HTTP server task")?
            .context("HTTP server")?;
    }
    tracing::info!("server stopped");
    Ok(())
}

/// A server running in the background of this process (tests, benchmarks, examples).
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The OpenAI-compatible HTTP front's address, when `ServerOptions::http_listen`.
    pub http_addr: Option<SocketAddr>,
    pub engine: EngineHandle,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningServer {
    /// Binds 127.0.0.1 on an ephemeral port (and the HTTP front where
    /// `opts.http_listen` says) and serves `service` there; returns once the ports
    /// accept connections (warm-up may still be running).
    pub async fn start(service: GenerationService, opts: ServerOptions) -> Result<Self> {
        if let Some(tls) = &opts.tls {
            TlsAcceptors::load(tls)?; // fail here rather than in the background task
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = match opts.http_listen {
            Some(at) => Some(TcpListener::bind(at).await?),
            None => None,
        };
        let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
        let engine = service.engine.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, http, service, opts, async {
            let _ = rx.await;
        }));
        Ok(Self {
            addr,
            http_addr,
            engine,
            shutdown: Some(tx),
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.context("server task")?
    }
}
