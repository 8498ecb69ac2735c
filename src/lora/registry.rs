//! The adapters this server holds: names, their slots in the step's adapter table and
//! their immutable weights. Built once at start-up from `--adapter NAME=SOURCE` and
//! `--adapter-dir DIR`; a source is a local PEFT folder or a Hub repo id
//! (`owner/name`, optionally `@revision`). Invariant: slot `i` is `adapters()[i]`.
use super::peft::{load_peft_adapter, AdapterLimits, AdapterWeights, BaseShape};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One loaded adapter.
#[derive(Debug)]
pub struct LoadedAdapter {
    pub name: String,
    pub source: String,
    pub weights: Arc<AdapterWeights>,
}

/// Name -> slot, and the weights of every slot.
#[derive(Debug, Default)]
pub struct AdapterRegistry {
    by_name: HashMap<String, usize>,
    adapters: Vec<LoadedAdapter>,
    /// Adapters that were asked for but failed to load, with the reason.
    failed: HashMap<String, String>,
}

/// Where an adapter's files come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterSource {
    Local(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl AdapterSource {
    /// A local folder if it exists, else `owner/name[@revision]` on the Hub.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (spec, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || p.starts_with('.')) {
            bail!("adapter source {spec:?}: no such folder, and not a Hub repo id (owner/name)");
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision,
        })
    }

    /// A local folder holding the adapter's files (downloaded for a Hub source).
    pub fn materialize(&self) -> Result<PathBuf> {
        match self {
            Self::Local(p) => Ok(p.clone()),
            Self::Hub { repo, revision } => {
                use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
                let api = ApiBuilder::new()
                    .with_progress(false)
                    .build()
                    .context("creating the Hub client")?;
                let r = api.repo(Repo::with_revision(
                    repo.clone(),
                    RepoType::Model,
                    revision.clone().unwrap_or_else(|| "main".into()),
                ));
                let config = r
                    .get("adapter_config.json")
                    .with_context(|| format!("fetching adapter_config.json from {repo}"))?;
                r.get("adapter_model.safetensors")
                    .with_context(|| format!("fetching adapter_model.safetensors from {repo}"))?;
                Ok(config
                    .parent()
                    .context("hf-hub returned a file without a folder")?
                    .to_path_buf())
            }
        }
    }
}

impl AdapterRegistry {
    /// Loads and validates every adapter. A bad name or a duplicate is an error; an
    /// adapter whose files are bad fails alone: it is logged, remembered with its
    /// reason (see [`Self::failure`]) and not served, and the others load.
    pub fn load(specs: &[(String, String)], base: &BaseShape) -> Result<Self> {
        let mut reg = Self::default();
        for (name, spec) in specs {
            validate_name(name)?;
            if reg.by_name.contains_key(name) || reg.failed.contains_key(name) {
                bail!("adapter {name:?} is given twice");
            }
            let weights = match load_one(spec, base) {
                Ok(w) => w,
                Err(e) => {
                    let reason = format!("{e:#}");
                    tracing::error!(adapter = %name, error = %reason, "adapter failed to load");
                    reg.failed.insert(name.clone(), reason);
                    continue;
                }
            };
            tracing::info!(
                adapter = %name,
                rank = weights.rank_max,
                bytes = weights.bytes,
                targets = ?weights.target_modules,
                "adapter loaded"
            );
            reg.by_name.insert(name.clone(), reg.adapters.len());
            reg.adapters.push(LoadedAdapter {
                name: name.clone(),
                source: spec.clone(),
                weights: Arc::new(weights),
            });
        }
        Ok(reg)
    }

    /// Why a named adapter failed to load, if it did.
    pub fn failure(&self, name: &str) -> Option<&str> {
        self.failed.get(name).map(String::as_str)
    }

    /// The slot of a named adapter.
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn adapters(&self) -> &[LoadedAdapter] {
        &self.adapters
    }

    /// The weights of every slot, in slot order (what the engine's steps read).
    pub fn slot_weights(&self) -> Vec<Arc<AdapterWeights>> {
        self.adapters.iter().map(|a| a.weights.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}

fn load_one(spec: &str, base: &BaseShape) -> Result<AdapterWeights> {
    let dir = AdapterSource::parse(spec)?.materialize()?;
    load_peft_adapter(&dir, base, &AdapterLimits::default())
        .with_context(|| format!("from {}", dir.display()))
}

/// `NAME=SOURCE` pairs from `--adapter` values and the sub-folders of `--adapter-dir`s.
pub fn collect_specs(
    adapter_args: &[String],
    adapter_dirs: &[PathBuf],
) -> Result<Vec<(String, String)>> {
    let mut specs = Vec::new();
    for arg in adapter_args {
        let (name, source) = arg
            .split_once('=')
            .with_context(|| format!("--adapter {arg:?}: expected NAME=PATH_OR_REPO"))?;
        specs.push((name.to_string(), source.to_string()));
    }
    for dir in adapter_dirs {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("--adapter-dir {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("adapter_config.json").is_file())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .context("adapter folder without a name")?;
            specs.push((name, path.to_string_lossy().to_string()));
        }
    }
    Ok(specs)
}

/// Adapter names: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        bail!("adapter name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            AdapterSource::parse("owner/name@v1").unwrap(),
            AdapterSource::Hub {
                repo: "owner/name".into(),
                revision: Some("v1".into())
            }
        );
        assert!(AdapterSource::parse("/definitely/not/here").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            AdapterSource::parse(dir.path().to_str().unwrap()).unwrap(),
            AdapterSource::Local(dir.path().to_path_buf())
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("alpha-lora_r8.v2").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn specs_from_args_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b", "a"] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
            std::fs::write(dir.path().join(n).join("adapter_config.json"), "{}").unwrap();
        }
        std::fs::create_dir(dir.path().join("not-an-adapter")).unwrap();
        let specs = collect_specs(&["x=/p".into()], &[dir.path().to_path_buf()]).unwrap();
        let names: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["x", "a", "b"]);
        assert!(collect_specs(&["no-equals".into()], &[]).is_err());
    }
}
