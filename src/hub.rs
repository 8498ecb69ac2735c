//! The Hugging Face Hub: one place that opens a model repository at a revision (the
//! base model's `--model` and adapters' `owner/name[@revision]` sources both go
//! through it) and fetches files into hf-hub's local cache. Where it asks and where it
//! caches are [`HubOptions`] (`serve --hub-endpoint` / `--hub-cache`); an unset option
//! falls back to the environment as hf-hub reads it (`HF_ENDPOINT`, `HF_HOME`), then to
//! hf-hub's defaults (the public Hub, `~/.cache/huggingface`).
//!
//! hf-hub answers a file already in the cache for the repo at the revision (a branch or
//! tag name included: the cache maps it to the commit it last resolved to) without any
//! request; otherwise it asks the endpoint's file-resolve API and downloads. The Hub's
//! answers are turned into errors that say what is missing: the repo, the revision or
//! the file.
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

/// The environment variable hf-hub reads the endpoint from.
const ENDPOINT_ENV: &str = "HF_ENDPOINT";

/// Where Hub files come from and where they are cached. `None` takes the environment's
/// value (`HF_ENDPOINT`, `HF_HOME`), else hf-hub's default; set both for a client that
/// does not depend on the process environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub's base URL, e.g. `http://127.0.0.1:8080` for a mirror.
    pub endpoint: Option<String>,
    /// The Hugging Face home folder, as `HF_HOME`: files are cached under its `hub/`
    /// (`hub/models--OWNER--NAME/{blobs,refs,snapshots}`), an access token is read from
    /// its `token` file.
    pub cache_dir: Option<PathBuf>,
}

impl HubOptions {
    /// A client builder for these options (no progress bars).
    fn builder(&self) -> ApiBuilder {
        let cache = match &self.cache_dir {
            Some(home) => Cache::new(home.join("hub")),
            None => Cache::from_env(),
        };
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| std::env::var(ENDPOINT_ENV).ok());
        // `from_cache` also reads the token of that cache's home.
        let builder = ApiBuilder::from_cache(cache).with_progress(false);
        match endpoint {
            // hf-hub appends `/{repo}/resolve/...` as is.
            Some(url) => builder.with_endpoint(url.trim_end_matches('/').to_string()),
            None => builder,
        }
    }
}

/// A model repository on the Hub at `revision` (default `main`).
pub struct HubRepo {
    id: String,
    revision: String,
    repo: ApiRepo,
}

/// Why a file could not be had.
enum Failure {
    /// The Hub answered that the repo has no such file at this revision.
    NoSuchFile,
    /// The endpoint could not be reached or dropped the connection before answering.
    Unreachable(anyhow::Error),
    /// Any other failure: an error answer, a broken download, the local cache.
    Other(anyhow::Error),
}

impl HubRepo {
    /// `id` at `revision`, with the endpoint and cache of the environment.
    pub fn open(id: &str, revision: Option<&str>) -> Result<Self> {
        Self::open_with(&HubOptions::default(), id, revision)
    }

    /// `id` at `revision`, with the endpoint and cache of `options`.
    pub fn open_with(options: &HubOptions, id: &str, revision: Option<&str>) -> Result<Self> {
        let api = options
            .builder()
            .build()
            .context("creating the Hub client")?;
        let revision = revision.unwrap_or("main").to_string();
        let repo = api.repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            revision.clone(),
        ));
        Ok(Self {
            id: id.to_string(),
            revision,
            repo,
        })
    }

    /// The local path of `file`, downloaded first if it is not cached.
    pub fn fetch(&self, file: &str) -> Result<PathBuf> {
        match self.get(file) {
            Ok(path) => Ok(path),
            Err(Failure::NoSuchFile) => bail!(
                "Hub repo {} has no file {file} at revision {} ({})",
                self.id,
                self.revision,
                self.repo.url(file)
            ),
            Err(Failure::Unreachable(e) | Failure::Other(e)) => Err(self.context(e, file)),
        }
    }

    /// As [`Self::fetch`], for a file the repo may not have: `None` when the Hub says
    /// it has none, or when the endpoint cannot be reached (so that a model cached
    /// earlier loads offline: hf-hub does not remember which files a repo lacks).
    pub fn fetch_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        match self.get(file) {
            Ok(path) => Ok(Some(path)),
            Err(Failure::NoSuchFile) => Ok(None),
            Err(Failure::Unreachable(e)) => {
                tracing::warn!(
                    repo = %self.id,
                    revision = %self.revision,
                    "optional file {file} not fetched: {:#}",
                    self.context(e, file)
                );
                Ok(None)
            }
            Err(Failure::Other(e)) => Err(self.context(e, file)),
        }
    }

    fn context(&self, e: anyhow::Error, file: &str) -> anyhow::Error {
        e.context(format!(
            "fetching {file} from Hub repo {} at revision {}",
            self.id, self.revision
        ))
    }

    fn get(&self, file: &str) -> Result<PathBuf, Failure> {
        self.repo.get(file).map_err(|e| self.classify(e))
    }

    /// What a failed hf-hub call means, from the Hub's status and `X-Error-Code`.
    fn classify(&self, err: ApiError) -> Failure {
        let ApiError::RequestError(request) = err else {
            // Its message already ends with its source's.
            return Failure::Other(anyhow!("{err}"));
        };
        let text = request.to_string();
        let Some(response) = (*request).into_response() else {
            // No HTTP answer: refused, reset, closed before the status line.
            return Failure::Unreachable(anyhow!("request error: {text}"));
        };
        let status = response.status();
        let code = response.header("x-error-code").unwrap_or_default();
        let message = response
            .header("x-error-message")
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        let (id, revision) = (&self.id, &self.revision);
        Failure::Other(match (status, code) {
            (_, "EntryNotFound") | (404, "") => return Failure::NoSuchFile,
            (_, "RevisionNotFound") => {
                anyhow!("Hub repo {id} has no revision {revision:?}{message}")
            }
            (_, "RepoNotFound") => anyhow!(
                "no Hub repo {id}, or it is private and no token grants it \
                 (HTTP {status}){message}"
            ),
            (_, "GatedRepo") => anyhow!(
                "Hub repo {id} is gated: accept its conditions and use a token that may \
                 read it (HTTP {status}){message}"
            ),
            _ => anyhow!("HTTP {status} from {}{message}", response.get_url()),
        })
    }
}
