//! Tenants: who may call this server, and with what. A tenants file (TOML) maps API keys,
//! stored only as SHA-256 hex digests, to tenants: the adapters each may use (exact names,
//! or prefixes ending in `*`), whether it may run the base model alone and manage
//! adapters, its rate and concurrency limits (enforced by `admission`) and its fair-share
//! weight (the engine's scheduler). Callers send `authorization: Bearer KEY` (gRPC
//! metadata or the HTTP header). Without a file the server is open: every caller is the
//! one anonymous tenant, allowed everything.
//! Invariants: a key is never stored or logged, only its digest; a missing or unknown
//! key is UNAUTHENTICATED; a tenant asking for an adapter it may not use is
//! PERMISSION_DENIED, with one message whether the adapter exists or not, and is never
//! served by the base model instead.
use super::admission::TenantGate;
use crate::engine::sequence::TenantShare;
use crate::error::RequestError;
use crate::lora::registry::echo;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// The file: `[[tenant]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(rename = "tenant", default)]
    tenants: Vec<TenantSpec>,
}

/// One `[[tenant]]` table of the tenants file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    /// SHA-256 digests (64 hex digits) of the tenant's API keys.
    pub api_key_sha256: Vec<String>,
    /// Adapters it may use: exact names, prefixes ending in `*`, or `*` for all.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// Whether it may run the base model with no adapter.
    #[serde(default = "yes")]
    pub base_model: bool,
    /// Whether it may load, replace and unload adapters (the Adapters service and the
    /// HTTP load/unload routes).
    #[serde(default)]
    pub manage_adapters: bool,
    pub requests_per_minute: Option<u32>,
    /// Prompt and generated tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight (queued or running) at once.
    pub max_concurrent_requests: Option<u32>,
    /// Relative share of served tokens when tenants compete.
    #[serde(default = "one")]
    pub weight: f64,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

/// An authenticated caller: its policy, its share for the scheduler and its admission
/// state (limits and usage).
#[derive(Debug)]
pub struct Tenant {
    pub spec: TenantSpec,
    pub share: TenantShare,
    pub gate: TenantGate,
}

impl Tenant {
    fn new(spec: TenantSpec) -> Self {
        let share = TenantShare {
            tenant: Arc::from(spec.name.as_str()),
            weight: spec.weight,
        };
        let gate = TenantGate::new(&spec);
        Self { spec, share, gate }
    }

    /// The open server's caller: every adapter, no limits, weight 1.
    fn anonymous() -> Self {
        Self::new(TenantSpec {
            name: String::new(),
            api_key_sha256: vec![],
            adapters: vec!["*".into()],
            base_model: true,
            manage_adapters: true,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent_requests: None,
            weight: 1.0,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn may_use_adapter(&self, adapter: &str) -> bool {
        self.spec
            .adapters
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => adapter.starts_with(prefix),
                None => p == adapter,
            })
    }

    /// PERMISSION_DENIED unless it may use every one of `adapters` (none: the base model).
    pub fn check_adapters<'a>(
        &self,
        adapters: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), RequestError> {
        let mut any = false;
        for name in adapters {
            any = true;
            if !self.may_use_adapter(name) {
                return Err(RequestError::PermissionDenied(format!(
                    "this API key may not use adapter {}",
                    echo(name)
                )));
            }
        }
        if !any && !self.spec.base_model {
            return Err(RequestError::PermissionDenied(
                "this API key may not use the base model without an adapter".into(),
            ));
        }
        Ok(())
    }

    /// PERMISSION_DENIED unless it may manage adapters.
    pub fn check_manage(&self) -> Result<(), RequestError> {
        if self.spec.manage_adapters {
            Ok(())
        } else {
            Err(RequestError::PermissionDenied(
                "this API key may not load, replace or unload adapters".into(),
            ))
        }
    }
}

/// Every tenant, by key digest; or the open server's anonymous tenant.
#[derive(Debug)]
pub struct Tenants {
    by_digest: HashMap<String, Arc<Tenant>>,
    all: Vec<Arc<Tenant>>,
    /// Set when there is no tenants file.
    anonymous: Option<Arc<Tenant>>,
}

impl Default for Tenants {
    fn default() -> Self {
        Self::open()
    }
}

/// The SHA-256 hex digest of an API key, as the tenants file stores it.
pub fn key_digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Tenants {
    /// No tenants file: every caller is anonymous and may do everything.
    pub fn open() -> Self {
        let anonymous = Arc::new(Tenant::anonymous());
        Self {
            by_digest: HashMap::new(),
            all: vec![anonymous.clone()],
            anonymous: Some(anonymous),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the tenants file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let file: TenantsFile = toml::from_str(text).context("parsing the tenants file")?;
        ensure!(
            !file.tenants.is_empty(),
            "the tenants file has no [[tenant]]"
        );
        let mut names = HashSet::new();
        let mut by_digest = HashMap::new();
        let mut all = Vec::new();
        for spec in file.tenants {
            check_spec(&spec)?;
            ensure!(
                names.insert(spec.name.clone()),
                "tenant {:?} appears twice",
                spec.name
            );
            let tenant = Arc::new(Tenant::new(spec));
            for digest in &tenant.spec.api_key_sha256 {
                let digest = digest.to_ascii_lowercase();
                if by_digest.insert(digest, tenant.clone()).is_some() {
                    bail!(
                        "an API key digest of tenant {:?} is used twice",
                        tenant.name()
                    );
                }
            }
            all.push(tenant);
        }
        Ok(Self {
            by_digest,
            all,
            anonymous: None,
        })
    }

    /// Whether anyone may call (no tenants file).
    pub fn is_open(&self) -> bool {
        self.anonymous.is_some()
    }

    /// Every tenant (the anonymous one when open).
    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }

    /// The caller of an `authorization` value (`Bearer KEY`).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Tenant>, RequestError> {
        if let Some(anonymous) = &self.anonymous {
            return Ok(anonymous.clone());
        }
        let value = authorization.ok_or_else(|| {
            RequestError::Unauthenticated(
                "an API key is required: send `authorization: Bearer <key>`".into(),
            )
        })?;
        let key = std::str::from_utf8(value)
            .ok()
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                RequestError::Unauthenticated(
                    "the authorization value is not `Bearer <key>`".into(),
                )
            })?;
        self.by_digest
            .get(&key_digest(key))
            .cloned()
            .ok_or_else(|| RequestError::Unauthenticated("invalid API key".into()))
    }
}

fn check_spec(spec: &TenantSpec) -> Result<()> {
    ensure!(!spec.name.is_empty(), "a tenant has an empty name");
    ensure!(
        !spec.api_key_sha256.is_empty(),
        "tenant {:?} has no api_key_sha256",
        spec.name
    );
    for d in &spec.api_key_sha256 {
        ensure!(
            d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()),
            "tenant {:?}: {:?} is not a SHA-256 hex digest (64 hex digits; \
             `printf %s KEY | sha256sum` makes one)",
            spec.name,
            echo(d)
        );
    }
    ensure!(
        spec.weight.is_finite() && spec.weight > 0.0,
        "tenant {:?}: weight must be a positive number, got {}",
        spec.name,
        spec.weight
    );
    ensure!(
        spec.adapters.iter().all(|p| !p.is_empty()),
        "tenant {:?}: an empty adapter pattern",
        spec.name
    );
    ensure!(
        spec.requests_per_minute != Some(0)
            && spec.tokens_per_minute != Some(0)
            && spec.max_concurrent_requests != Some(0),
        "tenant {:?}: a limit of 0 would refuse everything (leave it out for no limit)",
        spec.name
    );
    Ok(())
}

#[cfg(test)]
#[path = "tenants_tests.rs"]
mod tests;
