//! `multilora bench`: its flags, validated into a [`BenchConfig`], and the run that
//! prints the table and writes the JSON report and the plots.
use super::churn::{list_sources, ChurnConfig};
use super::metrics::Slo;
use super::plot::write_run_plots;
use super::report::{render, Setup};
use super::runner::{run, BenchConfig, LoadMode, BUILTIN_CORPUS};
use super::workload::{Arrivals, Length, Popularity};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// Adapter names to draw from (comma-separated), in popularity order.
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
    /// Or: this many adapters named PREFIX-0 .. PREFIX-(N-1) (as `adapters synth` writes).
    #[arg(long, default_value_t = 0)]
    pub num_adapters: usize,
    #[arg(long, default_value = "synth")]
    pub adapter_prefix: String,
    /// uniform, powerlaw:ALPHA, zipf:S, distinct or identical.
    #[arg(long, default_value = "uniform")]
    pub popularity: String,
    /// Share of requests for the base model (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub base_share: f64,
    /// Tenants; adapter i belongs to tenant i mod TENANTS.
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// Open loop at this many requests per second; without it, a closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Coefficient of variation of inter-arrival times (1: Poisson; above 1: bursty).
    #[arg(long, default_value_t = 1.0)]
    pub cv: f64,
    /// Closed loop: streams; open loop: the most requests in flight (0: no cap).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Prompt length in tokens: N, LO-HI or lognormal:MEAN,SIGMA.
    #[arg(long, default_value = "64")]
    pub input_len: String,
    /// Output length in tokens, the same forms.
    #[arg(long, default_value = "64")]
    pub output_len: String,
    /// Generate exactly the output length (ignore end-of-sequence).
    #[arg(long)]
    pub ignore_eos: bool,
    /// A text file prompts are cut from (default: a built-in corpus).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Stop sending new requests after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Leading requests left out of the figures.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Latency targets for goodput, e.g. ttft=500ms,tpot=50ms.
    #[arg(long)]
    pub slo: Option<String>,
    /// Run each distinct request alone first and check every response under load
    /// equals it (greedy decoding).
    #[arg(long)]
    pub verify: bool,
    /// Adapter load/unload operations per second during the run (Poisson), on adapters
    /// of their own loaded from --churn-source and unloaded again.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// A folder of PEFT adapter folders (as `adapters synth` writes) churn loads from;
    /// the server must see the same paths.
    #[arg(long)]
    pub churn_source: Option<PathBuf>,
    /// Churned adapters are named PREFIX-K.
    #[arg(long, default_value = "churn")]
    pub churn_prefix: String,
    /// A file of API keys, one per line, for a server with tenants: tenant K's
    /// requests send line K (modulo the count); base requests, tokenization and churn
    /// send the first line (churn needs a key that may manage adapters).
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// A gRPC deadline (milliseconds) on every request: one still running then is
    /// stopped by the server (DEADLINE_EXCEEDED), as a client timeout would.
    #[arg(long)]
    pub deadline_ms: Option<u64>,
    /// Write the report with per-request records here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write plots (latency CDFs, throughput over time; SVG) into this folder.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// A name for this run (e.g. the model), kept in the JSON report's setup.
    #[arg(long, default_value = "")]
    pub label: String,
}

impl BenchArgs {
    /// The run's parameters as the JSON report's `setup`, with the command line.
    pub fn setup(&self, adapters: usize) -> Setup {
        let command: Vec<String> = std::env::args()
            .map(|a| {
                if a.contains(|c: char| c.is_whitespace() || c == '"') {
                    format!("{a:?}")
                } else {
                    a
                }
            })
            .collect();
        Setup {
            label: self.label.clone(),
            adapters,
            popularity: self.popularity.clone(),
            base_share: self.base_share,
            tenants: self.tenants,
            rate: self.rate,
            cv: self.cv,
            concurrency: self.concurrency,
            input_len: self.input_len.clone(),
            output_len: self.output_len.clone(),
            ignore_eos: self.ignore_eos,
            requests: self.requests,
            duration: self.duration,
            warmup: self.warmup,
            seed: self.seed,
            churn: self.churn,
            command: command.join(" "),
        }
    }

    pub fn config(&self) -> Result<BenchConfig> {
        let mut adapters = self.adapters.clone();
        adapters.extend((0..self.num_adapters).map(|i| format!("{}-{i}", self.adapter_prefix)));
        if !(0.0..=1.0).contains(&self.base_share) {
            bail!("--base-share must be between 0 and 1");
        }
        let mode = match self.rate {
            Some(rate) => LoadMode::Open {
                arrivals: Arrivals::new(rate, self.cv)?,
                max_concurrency: (self.concurrency > 0).then_some(self.concurrency),
            },
            None if self.concurrency == 0 => bail!("--concurrency must be positive without --rate"),
            None => LoadMode::Closed {
                concurrency: self.concurrency,
            },
        };
        let corpus = match &self.prompts {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("--prompts {}", p.display()))?
            }
            None => BUILTIN_CORPUS.to_string(),
        };
        let api_keys = match &self.api_keys {
            Some(path) => read_keys(path)?,
            None => vec![],
        };
        let churn = match (self.churn, &self.churn_source) {
            (0.0, _) => None,
            (r, _) if !(r.is_finite() && r > 0.0) => bail!("--churn must be a positive rate"),
            (_, None) => bail!("--churn needs --churn-source DIR"),
            (rate, Some(dir)) => Some(ChurnConfig {
                rate,
                sources: list_sources(dir)?,
                name_prefix: self.churn_prefix.clone(),
                api_key: api_keys.first().cloned(),
            }),
        };
        Ok(BenchConfig {
            endpoint: self.endpoint.clone(),
            adapters,
            popularity: Popularity::parse(&self.popularity)?,
            base_share: self.base_share,
            tenants: self.tenants.max(1),
            mode,
            input_len: Length::parse(&self.input_len)?,
            output_len: Length::parse(&self.output_len)?,
            ignore_eos: self.ignore_eos,
            corpus,
            requests: self.requests,
            duration: self.duration,
            warmup: self.warmup.min(self.requests),
            seed: self.seed,
            slo: self.slo.as_deref().map(Slo::parse).transpose()?,
            verify: self.verify,
            progress: !self.quiet,
            churn,
            api_keys,
            deadline: self.deadline_ms.map(Duration::from_millis),
        })
    }
}

/// The non-empty lines of an API keys file (`#` starts a comment line).
fn read_keys(path: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--api-keys {}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if keys.is_empty() {
        bail!("--api-keys {}: no key in it", path.display());
    }
    Ok(keys)
}

/// Runs the benchmark, prints the table, writes `--json`; fails if `--verify` found a
/// mismatch.
pub async fn run_cli(args: &BenchArgs) -> Result<()> {
    let cfg = args.config()?;
    let mut report = run(&cfg).await?;
    print!("{}", render(&report));
    report.setup = args.setup(cfg.adapters.len());
    if let Some(path) = &args.json {
        report.write(path)?;
    }
    if let Some(dir) = &args.plot {
        for path in write_run_plots(&report.records, dir)? {
            println!("plot: {}", path.display());
        }
    }
    if report.verify_mismatches.unwrap_or(0) > 0 {
        bail!("--verify: responses under load differ from their solo runs");
    }
    Ok(())
}
