//! Command line: `serve` (the server), `bench` (the load harness), `adapters synth`,
//! `model synth` and `download` (fetch a Hub model); wiring only (`serve` in
//! `serve_cmd`).
mod serve_cmd;

use anyhow::{Context, Result};
use candle_core::quantized::GgmlDType;
use clap::{Parser, Subcommand};
use multilora::hub::HubOptions;
use multilora::model::placement::parse_quant_type;
use multilora::model::weights;

/// The default model that `make run` fetches into `models/`.
pub(crate) const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

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
    Serve(Box<serve_cmd::ServeArgs>),
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
pub(crate) struct HubArgs {
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
    pub(crate) fn options(&self) -> HubOptions {
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
        /// The model family the folder is a checkpoint of: llama, mistral, qwen2, qwen3,
        /// gemma2, gemma3 or phi3 (its options on the same shape, in either format).
        #[arg(long, default_value = "llama")]
        arch: String,
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve_cmd::serve(*args),
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
            arch,
            out,
            format,
            quant_type,
            tokenizer_from,
            seed,
        }) => synth_model(
            (&shape, &arch),
            &out,
            (format, quant_type),
            &tokenizer_from,
            seed,
        ),
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
    (shape, arch): (&str, &str),
    out: &std::path::Path,
    (format, quant_type): (SynthFormat, GgmlDType),
    tokenizer_from: &str,
    seed: u64,
) -> Result<()> {
    use multilora::model::synth;
    let source = weights::resolve(tokenizer_from, None)?;
    let tokenizer = weights::load_tokenizer(&source)?;
    let family = multilora::model::arch::Family::from_name(arch)?;
    let cfg = synth::with_family(&synth::shape(shape, tokenizer.vocab_size())?, family)?;
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
        "{}: {shape} {}, {:.3} B parameters, written in {:.1} s",
        out.display(),
        family.name(),
        params as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
