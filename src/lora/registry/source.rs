//! Where adapters come from: a source is a local PEFT folder or a Hub repo id
//! (`owner/name`, optionally `@revision`); `NAME=SOURCE` pairs from `--adapter` and the
//! sub-folders of `--adapter-dir` (listed, not read: registration is lazy); name rules.
use crate::hub::{HubOptions, HubRepo};
use crate::lora::peft::folder::{list_adapter_folders, CONFIG_FILE, WEIGHTS_FILE};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

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
            bail!(
                "adapter source {}: no such folder, and not a Hub repo id (owner/name)",
                super::confine::echo(spec)
            );
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision,
        })
    }

    /// A local folder holding the adapter's files (downloaded, or found in the cache,
    /// for a Hub source, as `hub` says).
    pub fn materialize(&self, hub: &HubOptions) -> Result<PathBuf> {
        match self {
            Self::Local(p) => Ok(p.clone()),
            Self::Hub { repo, revision } => {
                let r = HubRepo::open_with(hub, repo, revision.as_deref())?;
                let config = r.fetch(CONFIG_FILE)?;
                r.fetch(WEIGHTS_FILE)?;
                Ok(config
                    .parent()
                    .context("hf-hub returned a file without a folder")?
                    .to_path_buf())
            }
        }
    }
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
        let entries = list_adapter_folders(dir)
            .with_context(|| format!("--adapter-dir {}", dir.display()))?;
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
        bail!(
            "adapter name {}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.'",
            super::confine::echo(name)
        );
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
            std::fs::write(dir.path().join(n).join(CONFIG_FILE), "{}").unwrap();
        }
        std::fs::create_dir(dir.path().join("not-an-adapter")).unwrap();
        let specs = collect_specs(&["x=/p".into()], &[dir.path().to_path_buf()]).unwrap();
        let names: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["x", "a", "b"]);
        assert!(collect_specs(&["no-equals".into()], &[]).is_err());
    }
}
