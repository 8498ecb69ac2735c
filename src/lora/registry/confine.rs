//! Which sources a runtime adapter load (gRPC `LoadAdapter`, HTTP `load_lora_adapter`)
//! may read: [`SourcePolicy`]. Confined, a local source must resolve, after symlinks,
//! to a folder inside one of the adapter roots (the `--adapter-dir` folders and every
//! `--adapter-root`); a relative source resolves against the roots in order. A Hub repo
//! id is allowed only with `--allow-hub-adapters`. Start-up `--adapter NAME=PATH` is the
//! operator's own choice and never passes through here.
//!
//! Invariants: a refused source is refused before any file outside the roots is opened
//! (a path is checked lexically against the roots before it is resolved, and
//! resolution only stats), and with one message whatever the target is (missing,
//! a file, a folder, a link out of a root), so a caller learns nothing about the host;
//! the message echoes at most [`ECHO_CHARS`] characters of the source.
use crate::error::RequestError;
use anyhow::{Context, Result};
use std::path::{Component, Path, PathBuf};

/// How much of a caller's input an error message repeats.
pub const ECHO_CHARS: usize = 64;

/// The longest source considered at all (longer ones are refused unread).
const MAX_SOURCE_BYTES: usize = 4096;

/// What runtime loads may read.
#[derive(Clone, Debug, Default)]
pub struct SourcePolicy {
    /// `None`: unconfined (registries built in-process by tests and tools); else the
    /// canonical adapter roots.
    roots: Option<Vec<PathBuf>>,
    allow_hub: bool,
}

impl SourcePolicy {
    /// Every source allowed: for registries a program builds for itself.
    pub fn unconfined() -> Self {
        Self::default()
    }

    /// Local sources inside `roots` (each must exist; kept canonical), Hub repos if
    /// `allow_hub`.
    pub fn confined(roots: &[PathBuf], allow_hub: bool) -> Result<Self> {
        let roots = roots
            .iter()
            .map(|r| {
                r.canonicalize()
                    .with_context(|| format!("adapter root {}", r.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            roots: Some(roots),
            allow_hub,
        })
    }

    /// The canonical roots, empty when unconfined.
    pub fn roots(&self) -> &[PathBuf] {
        self.roots.as_deref().unwrap_or(&[])
    }

    /// The source a runtime load of `spec` reads (a canonical folder path, or the Hub
    /// id as given), or PERMISSION_DENIED.
    pub fn admit(&self, spec: &str) -> Result<String, RequestError> {
        let Some(roots) = &self.roots else {
            return Ok(spec.to_string());
        };
        if spec.is_empty() || spec.len() > MAX_SOURCE_BYTES || spec.contains('\0') {
            return Err(self.refusal(spec));
        }
        let path = Path::new(spec);
        let lexically_safe = path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::RootDir));
        if lexically_safe {
            let candidates: Vec<PathBuf> = if path.is_absolute() {
                // Only a path already under a root is looked at.
                let under_a_root = roots.iter().any(|r| path.starts_with(r));
                under_a_root
                    .then(|| path.to_path_buf())
                    .into_iter()
                    .collect()
            } else {
                roots.iter().map(|r| r.join(path)).collect()
            };
            for candidate in candidates {
                if let Some(found) = inside_roots(&candidate, roots) {
                    return Ok(found.to_string_lossy().into_owned());
                }
            }
        }
        if self.allow_hub && is_hub_id(spec) {
            return Ok(spec.to_string());
        }
        Err(self.refusal(spec))
    }

    fn refusal(&self, spec: &str) -> RequestError {
        let hub = if self.allow_hub {
            ", or a Hub repo id (owner/name[@revision])"
        } else {
            ""
        };
        RequestError::PermissionDenied(format!(
            "adapter source {} refused: a runtime load reads only an adapter folder \
             inside this server's adapter roots{hub}",
            echo(spec)
        ))
    }
}

/// `candidate` resolved (symlinks followed; only stats, nothing opened) if it is a
/// folder inside one of `roots`.
fn inside_roots(candidate: &Path, roots: &[PathBuf]) -> Option<PathBuf> {
    let real = candidate.canonicalize().ok()?;
    (roots.iter().any(|r| real.starts_with(r)) && real.is_dir()).then_some(real)
}

/// `owner/name` or `owner/name@revision`, in the Hub's characters.
fn is_hub_id(spec: &str) -> bool {
    let (repo, revision) = match spec.split_once('@') {
        Some((r, rev)) => (r, Some(rev)),
        None => (spec, None),
    };
    let word = |w: &str| {
        !w.is_empty()
            && !w.starts_with('.')
            && w.len() <= 96
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| word(p) && !p.contains(".."))
        && revision.is_none_or(|r| {
            !r.is_empty()
                && r.len() <= 128
                && !r.contains("..")
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        })
}

/// `input` quoted for an error message, cut to [`ECHO_CHARS`] characters.
pub fn echo(input: &str) -> String {
    match input.char_indices().nth(ECHO_CHARS) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &input[..cut], input.len()),
        None => format!("{input:?}"),
    }
}

#[cfg(test)]
#[path = "confine_tests.rs"]
mod tests;
