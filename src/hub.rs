//! The Hugging Face Hub: one place that opens a model repository at a revision (the
//! base model's `--model` and adapters' `owner/name[@revision]` sources both go
//! through it) and fetches files into hf-hub's local cache.
use anyhow::{Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};
use std::path::PathBuf;

/// A model repository on the Hub at `revision` (default `main`).
pub struct HubRepo {
    id: String,
    repo: ApiRepo,
}

impl HubRepo {
    pub fn open(id: &str, revision: Option<&str>) -> Result<Self> {
        let api = ApiBuilder::new()
            .with_progress(false)
            .build()
            .context("creating the Hub client")?;
        let repo = api.repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            revision.unwrap_or("main").to_string(),
        ));
        Ok(Self {
            id: id.to_string(),
            repo,
        })
    }

    /// The local path of `file`, downloaded first if it is not cached.
    pub fn fetch(&self, file: &str) -> Result<PathBuf> {
        self.repo
            .get(file)
            .with_context(|| format!("fetching {file} from Hub repo {}", self.id))
    }

    /// As [`Self::fetch`], for a file the repo may not have.
    pub fn fetch_optional(&self, file: &str) -> Option<PathBuf> {
        self.repo.get(file).ok()
    }
}
