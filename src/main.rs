//! Command line: `serve` (the server), `bench` (the load harness), `adapters synth`,
//! `model synth` and `download` (fetch a Hub model); wiring only.
use anyhow::{Context, Result};
use candle_core::quantized::GgmlDType;
use clap::{Parser, Subcommand};
use multilora::byte_size::parse_byte_size;
use multilora::engine::EngineConfig;
use multilora::hub::HubOptions;
use multilora::lora::registry::{self, RegistryConfig};
use multilora::model::placement::{
    load_model_on, parse_quant_type, DTypeChoice, DeviceSpec, KvDTypeChoice, Placement,
};
use multilora::model::weights;
use multilora::server::{self, ServerOptions};
use std::net::SocketAddr;
use std::time::Duration;

/// The default model that `make run` fetches into `models/`.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "multilora",
    version,
    about = "Many adapters, one resident base model, one batch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the model and serve gRPC.
    Serve(ServeArgs),
    /// Adapter tools.
    #[command(subcommand)]
    Adapters(AdaptersCommand),
    /// Base-model tools.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Load-test a running server with multi-tenant, multi-adapter traffic.
    Bench(Box<multilora::bench::cli::BenchArgs>),
    /// Turn the JSON reports of a sweep of `bench` runs into a markdown table
    /// (results.md) and plots.
    BenchSummary {
        /// The folder to write into.
        #[arg(long)]
        out: std::path::PathBuf,
        /// `bench --json` reports (with --label set to the model).
        #[arg(required = true)]
        reports: Vec<std::path::PathBuf>,
    },
    /// Download a Hugging Face Hub model into the local cache and print its folder.
    Download {
        /// Hub repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.
        repo: String,
        #[arg(long)]
        revision: Option<String>,
        #[command(flatten)]
        hub: HubArgs,
    },
}

// Where Hub repo ids (`--model`, `--adapter NAME=OWNER/REPO[@REVISION]`) are fetched
// from and cached. (A plain comment: a flattened struct's doc would become the help
// text of the command it is flattened into.)
#[derive(clap::Args)]
struct HubArgs {
    /// The Hugging Face Hub (or a mirror) to fetch repo ids from [default: the public
    /// Hub].
    #[arg(long, env = "HF_ENDPOINT", value_name = "URL")]
    hub_endpoint: Option<String>,
    /// The Hugging Face home folder, as HF_HOME: downloads are cached in DIR/hub, and
    /// files found there for a repo and revision are used without asking the Hub
    /// [default: ~/.cache/huggingface].
    #[arg(long, env = "HF_HOME", value_name = "DIR")]
    hub_cache: Option<std::path::PathBuf>,
}

impl HubArgs {
    fn options(&self) -> HubOptions {
        HubOptions {
            endpoint: self.hub_endpoint.clone(),
            cache_dir: self.hub_cache.clone(),
        }
    }
}

#[derive(Subcommand)]
enum AdaptersCommand {
    /// Write synthetic PEFT adapters (seeded random weights) for a base model.
    Synth {
        /// The base model (as for `serve --model`) whose shapes the adapters fit.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// Folder to write into; adapter i goes to OUT/PREFIX-i.
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value = "synth")]
        prefix: String,
        /// Ranks, used in turn (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "16")]
        ranks: Vec<usize>,
        /// PEFT types, used in turn (comma-separated, from lora, dora, ia3, adalora,
        /// vera, prompt_tuning, p_tuning and prefix_tuning; the last three take the rank
        /// as their number of virtual tokens).
        #[arg(long = "type", value_delimiter = ',', default_value = "lora")]
        types: Vec<String>,
        /// Target modules (comma-separated, from q,k,v,o,gate,up,down).
        #[arg(long, value_delimiter = ',', default_value = "q,k,v,o")]
        targets: Vec<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write only this many distinct weight files (a multiple of the number of
        /// ranks); adapter i hard-links adapter (i mod N)'s weights. The server still
        /// loads every adapter on its own; this only saves disk in scale runs. 0: all
        /// distinct.
        #[arg(long, default_value_t = 0)]
        distinct: usize,
    },
}

/// `model synth --format`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SynthFormat {
    Safetensors,
    Gguf,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a random-weight Llama of a named shape (a Hugging Face folder in bf16, or a
    /// quantized GGUF file), for scale runs at realistic sizes without a download.
    Synth {
        /// tiny, 135m (SmolLM2-135M) or 1b (Llama-3.2-1B's layout).
        #[arg(long, default_value = "1b")]
        shape: String,
        /// The folder to write (safetensors) or the file (gguf).
        #[arg(long)]
        out: std::path::PathBuf,
        /// safetensors (a Hugging Face folder, bf16) or gguf (one file; its tokenizer is
        /// copied from --tokenizer-from, which must then be a GGUF).
        #[arg(long, default_value = "safetensors")]
        format: SynthFormat,
        /// What --format gguf quantizes the matrices to: q4_k, q8_0, q4_0, q4_1, q5_k,
        /// q6_k (k-quants need rows that are multiples of 256).
        #[arg(long, default_value = "q4_k", value_parser = parse_quant_type)]
        quant_type: GgmlDType,
        /// The model whose tokenizer (and so vocabulary) the synthetic model uses.
        #[arg(long, default_value = DEFAULT_MODEL)]
        tokenizer_from: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Parser)]
struct ServeArgs {
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
    /// Seconds in-flight streams may run after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(multilora::bench::cli::run_cli(&args)),
        Command::BenchSummary { out, reports } => {
            for path in multilora::bench::sweep::summarize_files(&reports, &out)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::Adapters(AdaptersCommand::Synth {
            model,
            out,
            count,
            prefix,
            ranks,
            types,
            targets,
            seed,
            distinct,
        }) => synth_adapters(
            &model,
            &out,
            AdapterSet {
                count,
                prefix: &prefix,
                ranks: &ranks,
                types: &types,
                distinct,
            },
            &targets,
            seed,
        ),
        Command::Model(ModelCommand::Synth {
            shape,
            out,
            format,
            quant_type,
            tokenizer_from,
            seed,
        }) => synth_model(&shape, &out, (format, quant_type), &tokenizer_from, seed),
        Command::Download {
            repo,
            revision,
            hub,
        } => {
            let source = weights::download_from_hub(&repo, revision.as_deref(), &hub.options())?;
            if let weights::ModelSource::HfDir(dir) = source {
                println!("{}", dir.display());
            }
            Ok(())
        }
    }
}

/// Which adapters `adapters synth` writes.
struct AdapterSet<'a> {
    count: usize,
    prefix: &'a str,
    ranks: &'a [usize],
    types: &'a [String],
    distinct: usize,
}

fn synth_adapters(
    model: &str,
    out: &std::path::Path,
    set: AdapterSet,
    targets: &[String],
    seed: u64,
) -> Result<()> {
    let AdapterSet {
        count,
        prefix,
        ranks,
        types,
        distinct,
    } = set;
    use multilora::lora::peft::{AdapterKind, LoraSite};
    use multilora::lora::synth::{write_synthetic_adapter, SynthSpec};
    let base = weights::read_config(&weights::resolve(model, None)?)?.base_shape();
    let sites = targets
        .iter()
        .map(|t| {
            LoraSite::ALL
                .into_iter()
                .find(|s| s.module_name() == format!("{t}_proj") || s.module_name() == t)
                .with_context(|| format!("--targets: unknown module {t:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ranks.is_empty() || ranks.contains(&0) {
        anyhow::bail!("--ranks: give one or more positive ranks");
    }
    if !distinct.is_multiple_of(ranks.len()) {
        anyhow::bail!("--distinct must be a multiple of the number of --ranks");
    }
    let kinds = types
        .iter()
        .map(|t| {
            AdapterKind::from_name(t).with_context(|| {
                let names: Vec<String> = AdapterKind::ALL
                    .iter()
                    .map(|k| k.name().to_lowercase())
                    .collect();
                format!("--type: unknown type {t:?} (one of {})", names.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if kinds.is_empty() || !distinct.is_multiple_of(kinds.len()) {
        anyhow::bail!(
            "--type: give one or more types; --distinct must be a multiple of their number"
        );
    }
    for i in 0..count {
        let rank = ranks[i % ranks.len()];
        let kind = kinds[i % kinds.len()];
        let dir = out.join(format!("{prefix}-{i}"));
        if distinct > 0 && i >= distinct {
            link_adapter(&out.join(format!("{prefix}-{}", i % distinct)), &dir)?;
            continue;
        }
        let spec = SynthSpec {
            kind,
            rank,
            alpha: 2.0 * rank as f32,
            sites: sites.clone(),
            seed: seed.wrapping_add(i as u64),
        };
        let bytes = write_synthetic_adapter(&dir, &base, &spec)?;
        println!(
            "{} {} rank {rank} {bytes} bytes",
            dir.display(),
            kind.name()
        );
    }
    Ok(())
}

/// A copy of adapter folder `from` at `to` whose weights file is a hard link.
fn link_adapter(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for file in multilora::lora::peft::folder::FILES {
        let target = to.join(file);
        if target.exists() {
            std::fs::remove_file(&target)
                .with_context(|| format!("replacing {}", target.display()))?;
        }
        std::fs::hard_link(from.join(file), &target)
            .with_context(|| format!("linking {} to {}", target.display(), from.display()))?;
    }
    Ok(())
}

fn synth_model(
    shape: &str,
    out: &std::path::Path,
    (format, quant_type): (SynthFormat, GgmlDType),
    tokenizer_from: &str,
    seed: u64,
) -> Result<()> {
    use multilora::model::synth;
    let source = weights::resolve(tokenizer_from, None)?;
    let tokenizer = weights::load_tokenizer(&source)?;
    let cfg = synth::shape(shape, tokenizer.vocab_size())?;
    let start = std::time::Instant::now();
    let params = match (format, &source) {
        (SynthFormat::Safetensors, _) => synth::write_synthetic_model(out, &cfg, &tokenizer, seed)?,
        (SynthFormat::Gguf, weights::ModelSource::Gguf(path)) => {
            synth::write_synthetic_gguf(out, &cfg, path, quant_type, seed)?
        }
        (SynthFormat::Gguf, _) => anyhow::bail!(
            "--format gguf copies the tokenizer from a GGUF file; {tokenizer_from} is not one"
        ),
    };
    println!(
        "{}: {shape} Llama, {:.3} B parameters, written in {:.1} s",
        out.display(),
        params as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    if args.block_size == 0 || args.max_batch_tokens == 0 || args.max_running == 0 {
        anyhow::bail!("--block-size, --max-batch-tokens and --max-running must be positive");
    }
    let placement = Placement {
        device: args.device,
        dtype: args.dtype,
        quant_type: args.quant_type,
        kv_dtype: args.kv_dtype,
    };
    let hub = args.hub.options();
    let loaded = load_model_on(&args.model, args.revision.as_deref(), &hub, &placement)?;
    let eager = registry::collect_specs(&args.adapters, &[])?;
    let lazy = registry::collect_specs(&[], &args.adapter_dirs)?;
    let roots: Vec<std::path::PathBuf> =
        (args.adapter_dirs.iter().chain(&args.adapter_roots).cloned()).collect();
    let sources = registry::SourcePolicy::confined(&roots, args.allow_hub_adapters)?;
    tracing::info!(roots = ?sources.roots(), hub = args.allow_hub_adapters, "runtime adapter loads confined");
    let adapters = registry::AdapterRegistry::new(RegistryConfig {
        host_memory: args.adapter_host_memory,
        hub,
        sources,
        ..RegistryConfig::for_model(loaded.model.as_ref())
    });
    for (name, source) in eager.iter().chain(&lazy) {
        adapters.register(name, source)?;
    }
    tracing::info!(count = lazy.len(), "adapters registered from --adapter-dir");
    let engine_cfg = EngineConfig {
        kv_cache_memory: args.kv_cache_memory,
        adapter_memory: args.adapter_memory,
        block_size: args.block_size,
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running,
        max_active_adapters: args.max_active_adapters as usize,
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
    for (name, _) in &eager {
        // A failure is logged and answered NOT_FOUND with its reason; the rest serve.
        let _ = adapters.load_now(name);
    }
    let opts = ServerOptions {
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        http_listen: args.http_listen.0,
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

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let argv = ["multilora", "serve"].iter().chain(extra).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => args,
            _ => panic!("not serve"),
        }
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
        let err = Cli::try_parse_from(["multilora", "serve", "--kv-cache-memory", "2 parsecs"]);
        assert!(err.is_err());
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
