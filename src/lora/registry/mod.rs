//! The adapter registry: names, sources, versions, leases and the host-memory tier.
//!
//! A name is *registered* (source known, nothing in memory), *loading*, or has a current
//! version in host memory (the engine may also hold it in its active pool). Loads run on
//! a background task (the file reading on a blocking thread), and concurrent requests
//! for one name share one load. A request takes an [`AdapterLease`] on the current
//! version and keeps that version until it ends; a replacement or an unload retires the
//! old version, which is freed when its last lease drops. Host memory is a byte budget
//! over every live version; to make room the least recently requested versions with no
//! lease are evicted back to *registered*. Invariants: leases are created only under the
//! state lock and only on a current version, so an unleased version being evicted cannot
//! gain one; a failed load registers nothing new; every waiter gets exactly one answer.
//! With a journal open ([`AdapterRegistry::open_journal`]), runtime loads, replacements
//! and unloads are recorded in it and replayed by the next server (`persist.rs`).
mod confine;
mod inspect;
mod journal;
mod loading;
mod persist;
mod source;
#[cfg(test)]
mod tests;
mod version;

pub use confine::{echo, SourcePolicy};
pub use journal::JOURNAL_FILE;
pub use persist::ReplaySummary;
pub use source::{collect_specs, validate_name, AdapterSource};
pub use version::{AdapterEvent, AdapterLease, AdapterVersion, EventKind};

use super::peft::{
    estimate_adapter_bytes, load_peft_adapter_served, AdapterKind, AdapterLimits, AdapterWeights,
    BaseShape, ServedBase,
};
use crate::error::RequestError;
use crate::hub::HubOptions;
use crate::lora::values::AdapterDType;
use crate::metrics::{Histogram, HistogramSnapshot, LATENCY_BUCKETS};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, oneshot};
use version::Accounting;

/// Registry sizing, fixed at start-up.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub base: BaseShape,
    /// Bytes of adapter weights kept in host memory (every live version counts).
    pub host_memory: usize,
    pub limits: AdapterLimits,
    /// How adapter matrices are stored: the base model's choice
    /// ([`crate::model::BaseModel::adapter_dtype`]).
    pub adapter_dtype: AdapterDType,
    /// The base weights as served ([`crate::model::BaseModel::served_base`]): DoRA
    /// needs them, and they say which adapter kinds the backend applies. Without them
    /// DoRA is refused.
    pub served: Option<Arc<dyn ServedBase>>,
    /// Where `owner/name[@revision]` sources are fetched from and cached
    /// (`--hub-endpoint`, `--hub-cache`; unset: the environment's).
    pub hub: HubOptions,
    /// What runtime loads ([`AdapterRegistry::load`]) may read; `serve` confines them
    /// to the adapter roots, a registry built in-process is unconfined by default.
    pub sources: SourcePolicy,
}

impl RegistryConfig {
    /// Defaults for a base of this shape, adapters in f32.
    pub fn new(base: BaseShape) -> Self {
        Self {
            base,
            host_memory: 4 << 30,
            limits: AdapterLimits::default(),
            adapter_dtype: AdapterDType::F32,
            served: None,
            hub: HubOptions::default(),
            sources: SourcePolicy::unconfined(),
        }
    }

    /// Defaults for serving on `model`: its shape and its adapter storage type.
    pub fn for_model(model: &dyn crate::model::BaseModel) -> Self {
        Self {
            adapter_dtype: model.adapter_dtype(),
            served: model.served_base(),
            ..Self::new(model.base_shape())
        }
    }
}

/// Where a name stands, as `GetAdapter` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterState {
    Registered,
    Loading,
    Host,
    Active,
    Failed,
    Draining,
    Unloaded,
}

/// A snapshot of one name (no reference to its weights is kept).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub source: String,
    pub version: u64,
    pub state: AdapterState,
    /// The PEFT method of the loaded version (None while none is loaded).
    pub kind: Option<AdapterKind>,
    pub rank: usize,
    pub target_modules: Vec<String>,
    pub bytes: usize,
    pub in_flight: usize,
    pub waiting_for_load: usize,
    pub loaded_at: Option<SystemTime>,
    pub load_time: Duration,
    /// Unix milliseconds; 0 if never used.
    pub last_used_ms: u64,
    pub error: String,
}

/// Counters and gauges of the registry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegistryStats {
    pub registered: usize,
    pub host_resident: usize,
    pub host_bytes: usize,
    pub host_budget_bytes: usize,
    pub resident_bytes: usize,
    pub draining_versions: usize,
    pub loads: u64,
    pub load_failures: u64,
    pub load_time_total: Duration,
    pub load_time_max: Duration,
    pub host_hits: u64,
    pub host_misses: u64,
    pub host_evictions: u64,
    pub waiting_for_load: usize,
    /// Generation requests waiting for a load, per adapter name.
    pub waiting_for_load_by_adapter: BTreeMap<String, usize>,
}

/// What an unload left behind: the retired version, if there was one.
#[derive(Debug)]
pub struct Unloaded {
    pub version: u64,
    /// The engine's key for that version.
    pub id: u64,
    pub bytes: usize,
    pub remaining: Weak<AdapterVersion>,
}

struct Waiter {
    tx: oneshot::Sender<Result<AdapterLease, RequestError>>,
    /// A `LoadAdapter` call (true) or a generation request (false).
    admin: bool,
}

struct LoadJob {
    source: String,
    waiters: Vec<Waiter>,
    /// Started or joined by a `LoadAdapter` call: its result is journaled, even if
    /// that caller has gone by the time it is installed.
    admin: bool,
}

struct Entry {
    /// Identifies this registration; a load that finishes for an older one is dropped.
    epoch: u64,
    source: String,
    current: Option<Arc<AdapterVersion>>,
    loading: Option<LoadJob>,
    /// Why the registered source failed to load (sticky until a new load).
    failure: Option<String>,
    /// Created by a `LoadAdapter` of a new name: removed again if that load fails.
    provisional: bool,
    /// The version number of `source`'s weights (0: never loaded); kept while they are
    /// evicted, so reloading them does not look like a replacement.
    version: u64,
    /// Registry tick of the last request, for LRU eviction.
    last_used: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    tick: u64,
    /// Host bytes held for loads in progress.
    reserved: usize,
    stats: RegistryStats,
}

struct Inner {
    cfg: RegistryConfig,
    state: Mutex<State>,
    next_version: AtomicU64,
    /// The largest adapter the engine's active pool can hold; larger loads are refused.
    max_adapter_bytes: AtomicUsize,
    acc: Arc<Accounting>,
    /// Seconds each successful load took (Prometheus).
    load_seconds: Histogram,
    /// Where runtime operations are recorded, once opened. Lock order: this lock
    /// before the state lock.
    journal: OnceLock<Mutex<journal::Journal>>,
    /// Taken (shared) by each runtime load before it reads weights; only
    /// [`AdapterRegistry::hold_loads`] takes it exclusively.
    load_hold: Arc<tokio::sync::RwLock<()>>,
}

/// The shared registry; cheap to clone.
#[derive(Clone)]
pub struct AdapterRegistry {
    inner: Arc<Inner>,
}

impl AdapterRegistry {
    pub fn new(cfg: RegistryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State::default()),
                next_version: AtomicU64::new(1),
                max_adapter_bytes: AtomicUsize::new(usize::MAX),
                acc: Accounting::new(),
                load_seconds: Histogram::new(LATENCY_BUCKETS),
                journal: OnceLock::new(),
                load_hold: Arc::default(),
            }),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.cfg
    }

    /// Set once the engine knows its active pool: adapters larger are refused.
    pub fn set_max_adapter_bytes(&self, bytes: usize) {
        self.inner.max_adapter_bytes.store(bytes, Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a
        // single assignment), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Lifecycle events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AdapterEvent> {
        self.inner.acc.events.subscribe()
    }

    /// Registers `name` lazily: its files are read on first use.
    pub fn register(&self, name: &str, source: &str) -> Result<(), RequestError> {
        validate_name(name).map_err(|e| RequestError::invalid("name", format!("{e:#}")))?;
        let mut st = self.lock();
        if st.entries.contains_key(name) {
            return Err(RequestError::invalid(
                "name",
                format!("adapter {name:?} is given twice"),
            ));
        }
        let epoch = self.inner.next_version.fetch_add(1, Ordering::SeqCst);
        st.entries
            .insert(name.to_string(), Entry::new(epoch, source, false));
        drop(st);
        self.inner
            .acc
            .emit(EventKind::Registered, name, 0, source.to_string());
        Ok(())
    }

    /// A lease on `name`'s current version, loading it first if it is only registered
    /// (the caller waits; the engine does not). NOT_FOUND for unknown or failed names.
    pub async fn acquire(&self, name: &str) -> Result<AdapterLease, RequestError> {
        let rx = {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            let Some(entry) = st.entries.get_mut(name) else {
                return Err(not_loaded(name));
            };
            entry.last_used = tick;
            if let Some(v) = &entry.current {
                let lease = v.lease();
                st.stats.host_hits += 1;
                return Ok(lease);
            }
            if let Some(why) = &entry.failure {
                return Err(RequestError::NotFound(format!(
                    "adapter {name:?} failed to load: {why}"
                )));
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter { tx, admin: false };
            let start = match &mut entry.loading {
                Some(job) => {
                    job.waiters.push(waiter);
                    None
                }
                None => {
                    let source = entry.source.clone();
                    entry.loading = Some(LoadJob {
                        source: source.clone(),
                        waiters: vec![waiter],
                        admin: false,
                    });
                    Some((entry.epoch, source))
                }
            };
            st.stats.host_misses += 1;
            if let Some((epoch, source)) = start {
                self.spawn_load(name, epoch, source);
            }
            rx
        };
        rx.await.map_err(|_| {
            RequestError::Internal("the adapter load ended without an answer".into())
        })?
    }

    /// A registry holding `specs`, each loaded now on this thread (start-up, tests,
    /// benchmarks). A duplicate or bad name is an error; an adapter whose files are bad
    /// fails alone: its reason is kept and answered (NOT_FOUND) to its requests.
    pub fn with_adapters(
        cfg: RegistryConfig,
        specs: &[(String, String)],
    ) -> Result<Self, RequestError> {
        let reg = Self::new(cfg);
        for (name, source) in specs {
            reg.register(name, source)?;
        }
        for (name, _) in specs {
            // A failure is logged and kept with the name by `load_now`.
            let _ = reg.load_now(name);
        }
        Ok(reg)
    }

    /// Loads `name` from `source` (the `LoadAdapter` call): idempotent for the current
    /// source, a replacement for another one, a compare-and-set with `expected_version`.
    pub async fn load(
        &self,
        name: &str,
        source: &str,
        expected_version: Option<u64>,
    ) -> Result<Arc<AdapterVersion>, RequestError> {
        let v = self
            .load_from(name, source, expected_version, false)
            .await?;
        // Also journaled by the load task; the caller waits until it is on disk.
        self.journal_load(name, &v);
        Ok(v)
    }

    /// As [`Self::load`], but reads `source` again even if the current version came from
    /// it (its files changed in place: vLLM's `load_inplace`).
    pub async fn reload(
        &self,
        name: &str,
        source: &str,
    ) -> Result<Arc<AdapterVersion>, RequestError> {
        let v = self.load_from(name, source, None, true).await?;
        self.journal_load(name, &v);
        Ok(v)
    }

    async fn load_from(
        &self,
        name: &str,
        source: &str,
        expected_version: Option<u64>,
        fresh: bool,
    ) -> Result<Arc<AdapterVersion>, RequestError> {
        validate_name(name).map_err(|e| RequestError::invalid("name", format!("{e:#}")))?;
        let admitted = self.inner.cfg.sources.admit(source)?;
        let source = admitted.as_str();
        AdapterSource::parse(source)
            .map_err(|e| RequestError::invalid("source", format!("{e:#}")))?;
        let rx = {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            // An evicted version still counts: reloading it is not a replacement.
            let current = st.entries.get(name).map_or(0, |e| e.version);
            if let Some(expected) = expected_version {
                if expected != current {
                    return Err(RequestError::Aborted(format!(
                        "adapter {name:?}: expected version {expected}, current is {current}"
                    )));
                }
            }
            if !st.entries.contains_key(name) {
                let epoch = self.inner.next_version.fetch_add(1, Ordering::SeqCst);
                st.entries
                    .insert(name.to_string(), Entry::new(epoch, source, true));
                self.inner
                    .acc
                    .emit(EventKind::Registered, name, 0, source.to_string());
            }
            let Some(entry) = st.entries.get_mut(name) else {
                return Err(RequestError::Internal(
                    "entry vanished under the lock".into(),
                ));
            };
            entry.last_used = tick;
            let same = entry
                .current
                .as_ref()
                .filter(|v| !fresh && v.source == source);
            if let Some(v) = same {
                return Ok(v.clone());
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter { tx, admin: true };
            match &mut entry.loading {
                Some(job) if job.source == source => {
                    job.waiters.push(waiter);
                    job.admin = true;
                }
                Some(job) => {
                    return Err(RequestError::Aborted(format!(
                        "adapter {name:?} is being loaded from {:?}; retry when that ends",
                        job.source
                    )))
                }
                None => {
                    entry.loading = Some(LoadJob {
                        source: source.to_string(),
                        waiters: vec![waiter],
                        admin: true,
                    });
                    let epoch = entry.epoch;
                    self.spawn_load(name, epoch, source.to_string());
                }
            }
            rx
        };
        let lease = rx.await.map_err(|_| {
            RequestError::Internal("the adapter load ended without an answer".into())
        })??;
        Ok(lease.version().clone())
    }

    /// Removes `name` at once: new requests get NOT_FOUND, loads in progress are
    /// answered NOT_FOUND, and the current version retires (freed when its last lease
    /// ends; watch `remaining`).
    pub fn unload(&self, name: &str) -> Result<Unloaded, RequestError> {
        self.journaled_unload(name)
    }

    /// Removes `name` (unrecorded): its [`Unloaded`] and the version number it had.
    fn remove(&self, name: &str) -> Result<(Unloaded, u64), RequestError> {
        let mut st = self.lock();
        let entry = st.entries.remove(name).ok_or_else(|| not_loaded(name))?;
        drop(st);
        let version = entry.version;
        Ok((self.retire_entry(name, entry), version))
    }

    /// Ends a removed entry: its load's waiters are answered NOT_FOUND and its current
    /// version retires.
    fn retire_entry(&self, name: &str, entry: Entry) -> Unloaded {
        if let Some(job) = entry.loading {
            for w in job.waiters {
                let _ = w.tx.send(Err(RequestError::NotFound(format!(
                    "adapter {name:?} was unloaded while loading"
                ))));
            }
        }
        let Some(v) = entry.current else {
            return Unloaded {
                version: 0,
                id: 0,
                bytes: 0,
                remaining: Weak::new(),
            };
        };
        v.retire();
        self.inner.acc.emit(
            EventKind::Unloading,
            name,
            v.version,
            format!("{} requests in flight", v.leases()),
        );
        Unloaded {
            version: v.version,
            id: v.id,
            bytes: v.bytes(),
            remaining: Arc::downgrade(&v),
        }
    }

    /// Waits until `version` is freed, or `deadline` passes (false).
    pub async fn wait_freed(&self, version: &Weak<AdapterVersion>, deadline: Instant) -> bool {
        loop {
            let notified = self.inner.acc.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if version.strong_count() == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // The timeout also covers a holder that drops without notifying (a step's
            // batch), so this never waits on a missed wake-up.
            let nap = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }
}

impl Entry {
    fn new(epoch: u64, source: &str, provisional: bool) -> Self {
        Self {
            epoch,
            source: source.to_string(),
            current: None,
            loading: None,
            failure: None,
            provisional,
            version: 0,
            last_used: 0,
        }
    }
}

fn not_loaded(name: &str) -> RequestError {
    RequestError::NotFound(format!("adapter {name:?} is not loaded"))
}
