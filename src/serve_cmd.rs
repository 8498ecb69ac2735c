//! The `serve` command: its flags and the wiring from them to the registry, the
//! engine and the servers.
use crate::{HubArgs, DEFAULT_MODEL};
use anyhow::{Context, Result};
use candle_core::quantized::GgmlDType;
use clap::Parser;
use multilora::byte_size::parse_byte_size;
use multilora::engine::EngineConfig;
use multilora::lora::registry::{self, RegistryConfig};
use multilora::model::placement::{
    load_model_on, parse_quant_type, DTypeChoice, DeviceSpec, KvDTypeChoice, Placement,
};
use multilora::server::admission::QueueBounds;
use multilora::server::tenants::Tenants;
use multilora::server::tls::{TlsAcceptors, TlsOptions};
use multilora::server::{self, ServerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
pub(crate) struct ServeArgs {
    /// A local Hugging Face folder, a local .gguf file, or a Hub repo id.
    #[arg(long, env = "MULTILORA_MODEL", default_value = DEFAULT_MODEL)]
    model: String,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    revision: Option<String>,
    #[command(flatten)]
    hub: HubArgs,
    /// Where the base model, its KV cache and the active adapters live: cpu, or cuda[:N]
    /// (builds with the `cuda` feature).
    #[arg(long, env = "MULTILORA_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// How base weights are kept: f32, bf16, f16, quantized (cpu: GGUF blocks computed
    /// on directly, a dense checkpoint quantized to --quant-type) or auto (cpu: what the
    /// file holds; cuda: bf16). Activations are f32 on the CPU.
    #[arg(long, env = "MULTILORA_DTYPE", default_value = "auto")]
    dtype: DTypeChoice,
    /// What --dtype quantized makes of a dense (safetensors) checkpoint: q8_0, q4_0,
    /// q4_1, q4_k, q5_k or q6_k.
    #[arg(long, env = "MULTILORA_QUANT_TYPE", default_value = "q8_0", value_parser = parse_quant_type)]
    quant_type: GgmlDType,
    /// How the paged K/V cache stores values: auto (cpu: f32; cuda: the weights' dtype),
    /// f32, or bf16 (cpu: half the K/V memory, so twice the tokens in --kv-cache-memory).
    #[arg(long, env = "MULTILORA_KV_DTYPE", default_value = "auto")]
    kv_dtype: KvDTypeChoice,
    /// Address to listen on (gRPC).
    #[arg(long, env = "MULTILORA_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (/v1/completions,
    /// /v1/chat/completions, /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter)
    /// and of Prometheus /metrics, or `none` for neither.
    #[arg(long, env = "MULTILORA_HTTP_LISTEN", default_value = "127.0.0.1:8000", value_parser = parse_http_listen)]
    http_listen: HttpListen,
    /// Memory for the paged KV cache; active adapters draw on the same pool. Bytes, or
    /// with a unit: 2GiB, 512MiB (powers of 1024), 1.5GB, 500MB (powers of 1000).
    #[arg(long, default_value = "1GiB", value_parser = parse_byte_size)]
    kv_cache_memory: usize,
    /// Most of the KV pool that active adapters (those a step may read) may hold;
    /// at most half the pool. Bytes or with a unit, as --kv-cache-memory.
    #[arg(long, default_value = "256MiB", value_parser = parse_byte_size)]
    adapter_memory: usize,
    /// Adapters active at once at most (beside --adapter-memory); exported as `max_lora`
    /// in /metrics for the inference gateway's LoRA affinity.
    #[arg(long, env = "MULTILORA_MAX_ACTIVE_ADAPTERS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_active_adapters: u32,
    /// Adapter weights kept in host memory; least recently used adapters with no
    /// request in flight are evicted (back to registered) to make room. Bytes or with a
    /// unit, as --kv-cache-memory.
    #[arg(long, default_value = "4GiB", value_parser = parse_byte_size)]
    adapter_host_memory: usize,
    /// Token slots per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Tokens per engine step (decode tokens and prefill chunks together).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    /// Milliseconds a request waiting for its adapter to load may be passed by later
    /// requests whose adapters are ready; then admission waits for it, so it is never
    /// passed for ever.
    #[arg(long, default_value_t = 2000)]
    adapter_wait_bound_ms: u64,
    /// An adapter to load at start-up, as NAME=PATH (a local PEFT folder) or
    /// NAME=OWNER/REPO[@REVISION] (Hub); repeatable. One that fails is logged and
    /// answers NOT_FOUND with the reason.
    #[arg(long = "adapter", value_name = "NAME=SOURCE")]
    adapters: Vec<String>,
    /// A folder whose sub-folders are PEFT adapters, each registered under its folder
    /// name and loaded on first use; repeatable.
    #[arg(long = "adapter-dir", value_name = "DIR")]
    adapter_dirs: Vec<std::path::PathBuf>,
    /// A folder that runtime loads (LoadAdapter, /v1/load_lora_adapter) may read
    /// adapters from, besides the --adapter-dir folders; repeatable. Sources outside
    /// every root are refused (PERMISSION_DENIED).
    #[arg(long = "adapter-root", value_name = "DIR")]
    adapter_roots: Vec<std::path::PathBuf>,
    /// Lets runtime loads fetch Hub repos (owner/name[@revision]).
    #[arg(long)]
    allow_hub_adapters: bool,
    /// A TOML file of tenants: API keys (as SHA-256 hex digests) and what each may do
    /// (adapters, managing adapters, rate and concurrency limits, fair-share weight).
    /// Without it the server is open to any caller.
    #[arg(long, env = "MULTILORA_TENANTS_FILE", value_name = "FILE")]
    tenants_file: Option<std::path::PathBuf>,
    /// Requests admitted and not yet started, at most; beyond, RESOURCE_EXHAUSTED at
    /// once (HTTP 429).
    #[arg(long, default_value_t = server::DEFAULT_MAX_WAITING_REQUESTS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_waiting_requests: u32,
    /// Prompt tokens of the waiting requests together, at most (default: 4x the KV
    /// cache's token capacity).
    #[arg(long)]
    max_waiting_tokens: Option<usize>,
    /// Milliseconds the engine loop may make no progress with work pending before
    /// health says NOT_SERVING.
    #[arg(long, default_value_t = 5000)]
    engine_stall_timeout_ms: u64,
    /// A folder (created if missing) where runtime adapter loads, replacements and
    /// unloads are journaled, and replayed from at start-up after --adapter and
    /// --adapter-dir have registered, so they survive a restart (replayed adapters load
    /// on first use, with their versions). Unset: they last until the server stops.
    #[arg(long, env = "MULTILORA_STATE_DIR", value_name = "DIR")]
    state_dir: Option<std::path::PathBuf>,
    /// Seconds in-flight streams may run after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// Serve gRPC and HTTP over TLS with this PEM certificate chain (leaf first);
    /// needs --tls-key.
    #[arg(
        long,
        env = "MULTILORA_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "MULTILORA_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by one of these PEM CA
    /// certificates (others cannot connect); needs --tls-cert and --tls-key.
    #[arg(
        long,
        env = "MULTILORA_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
}

impl ServeArgs {
    /// The TLS settings, checked (the files read) before the model loads.
    fn tls(&self) -> Result<Option<TlsOptions>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let tls = TlsOptions {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
        };
        TlsAcceptors::load(&tls).context("--tls-cert, --tls-key or --tls-client-ca")?;
        Ok(Some(tls))
    }
}

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    if args.block_size == 0 || args.max_batch_tokens == 0 || args.max_running == 0 {
        anyhow::bail!("--block-size, --max-batch-tokens and --max-running must be positive");
    }
    let tls = args.tls()?;
    let placement = Placement {
        device: args.device,
        dtype: args.dtype,
        quant_type: args.quant_type,
        kv_dtype: args.kv_dtype,
    };
    let tenants = match &args.tenants_file {
        Some(path) => Tenants::load(path)?,
        None => Tenants::open(),
    };
    let hub = args.hub.options();
    let loaded = load_model_on(&args.model, args.revision.as_deref(), &hub, &placement)?;
    let eager = registry::collect_specs(&args.adapters, &[])?;
    let adapters = adapter_registry(&args, hub, loaded.model.as_ref(), &eager)?;
    let engine_cfg = EngineConfig {
        kv_cache_memory: args.kv_cache_memory,
        adapter_memory: args.adapter_memory,
        block_size: args.block_size,
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running,
        max_active_adapters: args.max_active_adapters as usize,
        adapter_wait_bound: std::time::Duration::from_millis(args.adapter_wait_bound_ms),
        ..Default::default()
    };
    let service = server::start_engine(
        loaded.model,
        loaded.tokenizer,
        adapters.clone(),
        engine_cfg,
        &loaded.source_dtype,
    )
    .context("starting the engine (see --kv-cache-memory and --block-size)")?;
    let kv_tokens = service.engine.limits().kv_capacity_tokens;
    let service = service
        .with_tenants(tenants)
        .with_queue_bounds(QueueBounds {
            max_waiting_requests: args.max_waiting_requests as usize,
            max_waiting_tokens: args.max_waiting_tokens.unwrap_or(4 * kv_tokens),
        });
    for (name, _) in &eager {
        // A failure is logged and answered NOT_FOUND with its reason; the rest serve.
        let _ = adapters.load_now(name);
    }
    let opts = ServerOptions {
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        http_listen: args.http_listen.0,
        engine_stall_timeout: Duration::from_millis(args.engine_stall_timeout_ms.max(1)),
        tls,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let http = match opts.http_listen {
            Some(at) => Some(
                tokio::net::TcpListener::bind(at)
                    .await
                    .with_context(|| format!("binding {at} (--http-listen)"))?,
            ),
            None => None,
        };
        server::serve(listener, http, service, opts, shutdown_signal()).await
    })
}

/// The adapter registry of the flags: runtime loads confined to the adapter roots,
/// `eager` (`--adapter`) and the `--adapter-dir` folders registered, then the journal in
/// `--state-dir` replayed over them.
fn adapter_registry(
    args: &ServeArgs,
    hub: multilora::hub::HubOptions,
    model: &dyn multilora::model::BaseModel,
    eager: &[(String, String)],
) -> Result<registry::AdapterRegistry> {
    let lazy = registry::collect_specs(&[], &args.adapter_dirs)?;
    let roots: Vec<std::path::PathBuf> =
        (args.adapter_dirs.iter().chain(&args.adapter_roots).cloned()).collect();
    let sources = registry::SourcePolicy::confined(&roots, args.allow_hub_adapters)?;
    tracing::info!(roots = ?sources.roots(), hub = args.allow_hub_adapters, "runtime adapter loads confined");
    let adapters = registry::AdapterRegistry::new(RegistryConfig {
        host_memory: args.adapter_host_memory,
        hub,
        sources,
        ..RegistryConfig::for_model(model)
    });
    for (name, source) in eager.iter().chain(&lazy) {
        adapters.register(name, source)?;
    }
    tracing::info!(count = lazy.len(), "adapters registered from --adapter-dir");
    if let Some(dir) = &args.state_dir {
        // After the start-up registrations: runtime replacements and unloads win.
        adapters
            .open_journal(dir)
            .with_context(|| format!("--state-dir {}", dir.display()))?;
    }
    Ok(adapters)
}

/// `--http-listen`: an address, or none.
#[derive(Clone, Copy, Debug)]
struct HttpListen(Option<SocketAddr>);

fn parse_http_listen(s: &str) -> Result<HttpListen, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(HttpListen(None));
    }
    s.parse()
        .map(|a| HttpListen(Some(a)))
        .map_err(|e| format!("{s:?} is not an address (HOST:PORT) or none: {e}"))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use multilora::hub::HubOptions;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let argv = ["serve"].iter().chain(extra).copied();
        ServeArgs::try_parse_from(argv).unwrap()
    }

    #[test]
    fn byte_size_flags_take_units_and_plain_bytes() {
        let d = serve_args(&[]);
        assert_eq!(
            (d.kv_cache_memory, d.adapter_memory, d.adapter_host_memory),
            (1 << 30, 256 << 20, 4 << 30)
        );
        let a = serve_args(&[
            "--kv-cache-memory",
            "2GiB",
            "--adapter-memory",
            "1.5GB",
            "--adapter-host-memory",
            "1048576",
        ]);
        assert_eq!(a.kv_cache_memory, 2 << 30);
        assert_eq!(a.adapter_memory, 1_500_000_000);
        assert_eq!(a.adapter_host_memory, 1 << 20);
        let err = ServeArgs::try_parse_from(["serve", "--kv-cache-memory", "2 parsecs"]);
        assert!(err.is_err());
    }

    #[test]
    fn state_dir_is_optional() {
        assert_eq!(serve_args(&[]).state_dir, None);
        let a = serve_args(&["--state-dir", "/var/lib/multilora"]);
        assert_eq!(a.state_dir, Some("/var/lib/multilora".into()));
    }

    #[test]
    fn tls_flags_come_as_cert_and_key_and_the_client_ca_only_with_them() {
        assert!(serve_args(&[]).tls().unwrap().is_none());
        for partial in [
            &["--tls-cert", "c.pem"][..],
            &["--tls-key", "k.pem"],
            &["--tls-client-ca", "ca.pem"],
            &["--tls-key", "k.pem", "--tls-client-ca", "ca.pem"],
        ] {
            let argv = ["serve"].iter().chain(partial).copied();
            assert!(ServeArgs::try_parse_from(argv).is_err(), "{partial:?}");
        }
        let a = serve_args(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", "k.pem"]);
        let err = format!("{:#}", a.tls().unwrap_err());
        assert!(
            err.contains("--tls-cert") && err.contains("/nonexistent/c.pem"),
            "{err}"
        );
    }

    #[test]
    fn hub_flags_set_the_hub_options() {
        let a = serve_args(&[
            "--hub-endpoint",
            "http://127.0.0.1:9/",
            "--hub-cache",
            "/hf",
        ]);
        assert_eq!(
            a.hub.options(),
            HubOptions {
                endpoint: Some("http://127.0.0.1:9/".into()),
                cache_dir: Some("/hf".into()),
            }
        );
    }
}
