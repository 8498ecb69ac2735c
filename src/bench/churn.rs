//! Adapter churn during a run: LoadAdapter and UnloadAdapter calls at a Poisson rate on
//! adapters of their own (`PREFIX-K`, loaded from a folder of PEFT adapters and
//! unloaded again, one load then one unload), so a run shows what runtime loading
//! costs the traffic being served. Every call is timed and its outcome recorded.
use super::metrics::Percentiles;
use super::runner::authorized;
use super::runner::code_name;
use super::workload::Arrivals;
use crate::lora::peft::folder::list_adapter_folders;
use crate::proto::v1 as pb;
use crate::rng::Xoshiro256;
use anyhow::{bail, Context, Result};
use pb::adapters_client::AdaptersClient;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tokio::sync::watch;
use tonic::transport::Channel;

/// What churn to run.
#[derive(Clone, Debug)]
pub struct ChurnConfig {
    /// Operations (loads and unloads together) per second.
    pub rate: f64,
    /// Adapter folders (paths as the server sees them) loads take in turn.
    pub sources: Vec<String>,
    /// Churned adapters are named `PREFIX-K`.
    pub name_prefix: String,
    /// The API key churn calls send (one that may manage adapters), if any.
    pub api_key: Option<String>,
}

/// What a [`ChurnOp`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChurnKind {
    Load,
    Unload,
}

impl ChurnKind {
    /// `load` or `unload`, as reports write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Unload => "unload",
        }
    }
}

/// One load or unload as the client saw it; times in seconds since the run started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChurnOp {
    pub kind: ChurnKind,
    pub name: String,
    pub start: f64,
    pub end: f64,
    /// The gRPC code name of a failure.
    pub error: Option<String>,
}

/// The churn of a run in figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnSummary {
    pub loads: usize,
    pub unloads: usize,
    /// Operations completed per second of the run.
    pub ops_per_s: f64,
    pub errors: BTreeMap<String, usize>,
    /// Seconds, successful calls only.
    pub load_latency: Percentiles,
    pub unload_latency: Percentiles,
}

/// The adapter folders of `dir`, sorted, as absolute paths.
pub fn list_sources(dir: &Path) -> Result<Vec<String>> {
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("--churn-source {}", dir.display()))?;
    let out: Vec<String> = list_adapter_folders(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .into_iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if out.is_empty() {
        bail!("--churn-source {}: no adapter folders in it", dir.display());
    }
    Ok(out)
}

/// Totals per kind, errors by code and latency percentiles over `duration` seconds.
pub fn summarize_churn(ops: &[ChurnOp], duration: f64) -> ChurnSummary {
    let mut errors = BTreeMap::new();
    for op in ops {
        if let Some(code) = &op.error {
            *errors.entry(code.clone()).or_insert(0) += 1;
        }
    }
    let latency = |kind: ChurnKind| {
        Percentiles::of(
            ops.iter()
                .filter(|o| o.kind == kind && o.error.is_none())
                .map(|o| o.end - o.start),
        )
    };
    ChurnSummary {
        loads: ops.iter().filter(|o| o.kind == ChurnKind::Load).count(),
        unloads: ops.iter().filter(|o| o.kind == ChurnKind::Unload).count(),
        ops_per_s: if duration > 0.0 {
            ops.len() as f64 / duration
        } else {
            0.0
        },
        errors,
        load_latency: latency(ChurnKind::Load),
        unload_latency: latency(ChurnKind::Unload),
    }
}

/// Runs churn from now until `stop` turns true, then unloads what it left loaded
/// (uncounted). Calls are sequential: a call slower than the gap delays the next.
pub async fn run_churn(
    cfg: ChurnConfig,
    mut client: AdaptersClient<Channel>,
    seed: u64,
    t0: Instant,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<ChurnOp>> {
    let arrivals = Arrivals::new(cfg.rate, 1.0)?;
    let mut rng = Xoshiro256::from_seed(seed ^ 0xC4E2_0000_0000_0001);
    let mut ops = Vec::new();
    let mut loaded: Option<String> = None;
    let mut next_at = arrivals.next_gap(&mut rng);
    for k in 0usize.. {
        let at = t0 + std::time::Duration::from_secs_f64(next_at);
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        next_at += arrivals.next_gap(&mut rng);
        let start = t0.elapsed().as_secs_f64();
        let (kind, name, result) = match loaded.take() {
            None => {
                let name = format!("{}-{}", cfg.name_prefix, k / 2);
                let source = cfg.sources[(k / 2) % cfg.sources.len()].clone();
                let request = pb::LoadAdapterRequest {
                    name: name.clone(),
                    source,
                    ..Default::default()
                };
                let result = client
                    .load_adapter(authorized(request, cfg.api_key.as_deref()))
                    .await
                    .map(|_| ());
                if result.is_ok() {
                    loaded = Some(name.clone());
                }
                (ChurnKind::Load, name, result)
            }
            Some(name) => {
                let request = pb::UnloadAdapterRequest {
                    name: name.clone(),
                    drain_timeout_s: None,
                };
                (
                    ChurnKind::Unload,
                    name,
                    client
                        .unload_adapter(authorized(request, cfg.api_key.as_deref()))
                        .await
                        .map(|_| ()),
                )
            }
        };
        ops.push(ChurnOp {
            kind,
            name,
            start,
            end: t0.elapsed().as_secs_f64(),
            error: result.err().map(|s| code_name(s.code())),
        });
    }
    if let Some(name) = loaded {
        let request = pb::UnloadAdapterRequest {
            name,
            drain_timeout_s: None,
        };
        let _ = client
            .unload_adapter(authorized(request, cfg.api_key.as_deref()))
            .await;
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::peft::CONFIG_FILE;

    fn op(kind: ChurnKind, start: f64, end: f64, error: Option<&str>) -> ChurnOp {
        ChurnOp {
            kind,
            name: "churn-0".into(),
            start,
            end,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn summary_counts_kinds_errors_and_latencies() {
        let ops = [
            op(ChurnKind::Load, 0.0, 0.010, None),
            op(ChurnKind::Unload, 0.5, 0.501, None),
            op(ChurnKind::Load, 1.0, 1.030, None),
            op(ChurnKind::Unload, 1.5, 1.503, None),
            op(ChurnKind::Load, 2.0, 2.001, Some("INVALID_ARGUMENT")),
        ];
        let s = summarize_churn(&ops, 2.5);
        assert_eq!((s.loads, s.unloads), (3, 2));
        assert!((s.ops_per_s - 2.0).abs() < 1e-12);
        assert_eq!(s.errors.get("INVALID_ARGUMENT"), Some(&1));
        // Successful loads took 10 and 30 ms: the failed one is not a latency.
        assert_eq!(s.load_latency.count, 2);
        assert!((s.load_latency.p50 - 0.020).abs() < 1e-9);
        assert!((s.unload_latency.max - 0.003).abs() < 1e-9);
    }

    #[test]
    fn sources_are_the_adapter_folders() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b", "a"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join(CONFIG_FILE), "{}").unwrap();
        }
        let got = list_sources(dir.path()).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got[0].ends_with("/a") && got[1].ends_with("/b"));
        assert!(Path::new(&got[0]).is_absolute());
        let empty = tempfile::tempdir().unwrap();
        assert!(list_sources(empty.path()).is_err());
    }
}
