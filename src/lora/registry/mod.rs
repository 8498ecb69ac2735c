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
mod source;
#[cfg(test)]
mod tests;
mod version;

pub use source::{collect_specs, validate_name, AdapterSource};
pub use version::{AdapterEvent, AdapterLease, AdapterVersion, EventKind};

use super::peft::{
    estimate_adapter_bytes, load_peft_adapter, AdapterLimits, AdapterWeights, BaseShape,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
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
}

impl RegistryConfig {
    pub fn new(base: BaseShape) -> Self {
        Self {
            base,
            host_memory: 4 << 30,
            limits: AdapterLimits::default(),
        }
    }
}

/// Why a registry operation failed; each maps to one gRPC code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NotFound(String),
    /// Bad name, source or adapter files.
    #[error("{0}")]
    Invalid(String),
    /// A compare-and-set or concurrent-load conflict.
    #[error("{0}")]
    Conflict(String),
    /// Does not fit the memory budgets, and nothing can be evicted.
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Internal(String),
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
}

/// What an unload left behind: the retired version, if there was one.
#[derive(Debug)]
pub struct Unloaded {
    pub version: u64,
    pub bytes: usize,
    pub remaining: Weak<AdapterVersion>,
}

struct Waiter {
    tx: oneshot::Sender<Result<AdapterLease, RegistryError>>,
    /// A `LoadAdapter` call (true) or a generation request (false).
    admin: bool,
}

struct LoadJob {
    source: String,
    waiters: Vec<Waiter>,
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
    pub fn register(&self, name: &str, source: &str) -> Result<(), RegistryError> {
        validate_name(name).map_err(|e| RegistryError::Invalid(format!("{e:#}")))?;
        let mut st = self.lock();
        if st.entries.contains_key(name) {
            return Err(RegistryError::Invalid(format!(
                "adapter {name:?} is given twice"
            )));
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
    pub async fn acquire(&self, name: &str) -> Result<AdapterLease, RegistryError> {
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
                return Err(RegistryError::NotFound(format!(
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
            RegistryError::Internal("the adapter load ended without an answer".into())
        })?
    }

    /// A registry holding `specs`, each loaded now on this thread (start-up, tests,
    /// benchmarks). A duplicate or bad name is an error; an adapter whose files are bad
    /// fails alone: its reason is kept and answered (NOT_FOUND) to its requests.
    pub fn with_adapters(
        cfg: RegistryConfig,
        specs: &[(String, String)],
    ) -> Result<Self, RegistryError> {
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

    /// Loads a registered `name` now, blocking this thread (start-up `--adapter`s); a
    /// failure is remembered and answered to its requests.
    pub fn load_now(&self, name: &str) -> Result<(), RegistryError> {
        let (epoch, source) = {
            let st = self.lock();
            let e = st.entries.get(name).ok_or_else(|| not_loaded(name))?;
            (e.epoch, e.source.clone())
        };
        let t0 = Instant::now();
        let weights = match read_adapter(&source, &self.inner.cfg, self.max_adapter_bytes()) {
            Ok(w) => w,
            Err(e) => {
                self.fail_load(name, epoch, e.clone());
                return Err(e);
            }
        };
        let version = self.inner.next_version.fetch_add(1, Ordering::SeqCst);
        let v = AdapterVersion::new(
            name,
            version,
            &source,
            weights,
            t0.elapsed(),
            self.inner.acc.clone(),
        );
        let mut st = self.lock();
        if !self.make_room(&mut st, name, 0, 0) {
            drop(st);
            let e = RegistryError::Exhausted(format!(
                "adapter {name:?} needs {} bytes; --adapter-host-memory {} is full",
                v.bytes(),
                self.inner.cfg.host_memory
            ));
            drop(v);
            self.fail_load(name, epoch, e.clone());
            return Err(e);
        }
        self.install(&mut st, name, v);
        Ok(())
    }

    fn max_adapter_bytes(&self) -> usize {
        self.inner
            .max_adapter_bytes
            .load(Ordering::SeqCst)
            .min(self.inner.cfg.host_memory)
    }

    /// Loads `name` from `source` (the `LoadAdapter` call): idempotent for the current
    /// source, a replacement for another one, a compare-and-set with `expected_version`.
    pub async fn load(
        &self,
        name: &str,
        source: &str,
        expected_version: Option<u64>,
    ) -> Result<Arc<AdapterVersion>, RegistryError> {
        validate_name(name).map_err(|e| RegistryError::Invalid(format!("{e:#}")))?;
        AdapterSource::parse(source).map_err(|e| RegistryError::Invalid(format!("{e:#}")))?;
        let rx = {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            let current = st
                .entries
                .get(name)
                .and_then(|e| e.current.as_ref().map(|v| v.version))
                .unwrap_or(0);
            if let Some(expected) = expected_version {
                if expected != current {
                    return Err(RegistryError::Conflict(format!(
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
                return Err(RegistryError::Internal(
                    "entry vanished under the lock".into(),
                ));
            };
            entry.last_used = tick;
            if let Some(v) = entry.current.as_ref().filter(|v| v.source == source) {
                return Ok(v.clone());
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter { tx, admin: true };
            match &mut entry.loading {
                Some(job) if job.source == source => job.waiters.push(waiter),
                Some(job) => {
                    return Err(RegistryError::Conflict(format!(
                        "adapter {name:?} is being loaded from {:?}; retry when that ends",
                        job.source
                    )))
                }
                None => {
                    entry.loading = Some(LoadJob {
                        source: source.to_string(),
                        waiters: vec![waiter],
                    });
                    let epoch = entry.epoch;
                    self.spawn_load(name, epoch, source.to_string());
                }
            }
            rx
        };
        let lease = rx.await.map_err(|_| {
            RegistryError::Internal("the adapter load ended without an answer".into())
        })??;
        Ok(lease.version().clone())
    }

    /// Removes `name` at once: new requests get NOT_FOUND, loads in progress are
    /// answered NOT_FOUND, and the current version retires (freed when its last lease
    /// ends; watch `remaining`).
    pub fn unload(&self, name: &str) -> Result<Unloaded, RegistryError> {
        let mut st = self.lock();
        let entry = st.entries.remove(name).ok_or_else(|| not_loaded(name))?;
        drop(st);
        if let Some(job) = entry.loading {
            for w in job.waiters {
                let _ = w.tx.send(Err(RegistryError::NotFound(format!(
                    "adapter {name:?} was unloaded while loading"
                ))));
            }
        }
        let Some(v) = entry.current else {
            return Ok(Unloaded {
                version: 0,
                bytes: 0,
                remaining: Weak::new(),
            });
        };
        v.retire();
        self.inner.acc.emit(
            EventKind::Unloading,
            name,
            v.version,
            format!("{} requests in flight", v.leases()),
        );
        Ok(Unloaded {
            version: v.version,
            bytes: v.bytes(),
            remaining: Arc::downgrade(&v),
        })
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

    pub fn get(&self, name: &str) -> Option<AdapterInfo> {
        let st = self.lock();
        st.entries.get(name).map(|e| e.info(name))
    }

    /// Every name, sorted.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let st = self.lock();
        let mut all: Vec<AdapterInfo> = st.entries.iter().map(|(n, e)| e.info(n)).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn stats(&self) -> RegistryStats {
        let st = self.lock();
        let mut s = st.stats.clone();
        s.registered = st.entries.len();
        s.host_budget_bytes = self.inner.cfg.host_memory;
        let mut current_versions = 0;
        for e in st.entries.values() {
            if let Some(v) = &e.current {
                s.host_resident += 1;
                s.host_bytes += v.bytes();
                current_versions += 1;
            }
            if let Some(job) = &e.loading {
                s.waiting_for_load += job.waiters.iter().filter(|w| !w.admin).count();
            }
        }
        s.resident_bytes = self.inner.acc.resident_bytes.load(Ordering::SeqCst);
        s.draining_versions = self
            .inner
            .acc
            .live_versions
            .load(Ordering::SeqCst)
            .saturating_sub(current_versions);
        s
    }

    fn spawn_load(&self, name: &str, epoch: u64, source: String) {
        let this = self.clone();
        let name = name.to_string();
        self.inner
            .acc
            .emit(EventKind::Loading, &name, 0, source.clone());
        tokio::spawn(async move { this.run_load(name, epoch, source).await });
    }

    async fn run_load(self, name: String, epoch: u64, source: String) {
        let t0 = Instant::now();
        let (cfg, src) = (self.inner.cfg.clone(), source.clone());
        let located = tokio::task::spawn_blocking(move || locate(&src, &cfg))
            .await
            .unwrap_or_else(|e| Err(RegistryError::Internal(format!("adapter load task: {e}"))));
        let (dir, estimate) = match located {
            Ok(found) => found,
            Err(e) => return self.fail_load(&name, epoch, e),
        };
        let max = self.max_adapter_bytes();
        if estimate > max {
            let e = too_large(&source, estimate, max);
            return self.fail_load(&name, epoch, e);
        }
        if !self.reserve(&name, epoch, estimate).await {
            return;
        }
        let cfg = self.inner.cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || read_weights(&dir, &cfg, max))
            .await
            .unwrap_or_else(|e| Err(RegistryError::Internal(format!("adapter load task: {e}"))));
        let weights = match loaded {
            Ok(w) => w,
            Err(e) => {
                self.lock().reserved -= estimate;
                return self.fail_load(&name, epoch, e);
            }
        };
        let version = self.inner.next_version.fetch_add(1, Ordering::SeqCst);
        let v = AdapterVersion::new(
            &name,
            version,
            &source,
            weights,
            t0.elapsed(),
            self.inner.acc.clone(),
        );
        let mut st = self.lock();
        st.reserved -= estimate;
        let Some(entry) = st.entries.get(&name).filter(|e| e.epoch == epoch) else {
            return; // unloaded meanwhile: its waiters were answered; `v` drops
        };
        let credit = entry
            .current
            .as_ref()
            .filter(|c| c.leases() == 0)
            .map_or(0, |c| c.bytes());
        // The reservation covered the load; this only matters if the header estimate
        // was low, and then the budget is exceeded by at most that difference.
        if !self.make_room(&mut st, &name, 0, credit) {
            tracing::warn!(adapter = %name, "adapter larger than its reservation; host budget exceeded");
        }
        self.install(&mut st, &name, v);
    }

    /// Waits until `need` more bytes fit the host budget (evicting unleased versions),
    /// and reserves them for the load of `name`. While nothing can be evicted the load
    /// waits (holding no memory) if requests wait for it, and fails RESOURCE_EXHAUSTED
    /// otherwise. False when the load ended here (answered, or abandoned by everyone).
    async fn reserve(&self, name: &str, epoch: u64, need: usize) -> bool {
        loop {
            let notified = self.inner.acc.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                let Some(entry) = st.entries.get_mut(name).filter(|e| e.epoch == epoch) else {
                    return false; // unloaded meanwhile: its waiters were answered
                };
                // The version this one replaces is freed at once if nobody holds it.
                let credit = entry
                    .current
                    .as_ref()
                    .filter(|c| c.leases() == 0)
                    .map_or(0, |c| c.bytes());
                let Some(job) = entry.loading.as_mut() else {
                    return false;
                };
                job.waiters.retain(|w| !w.tx.is_closed());
                if job.waiters.is_empty() {
                    entry.loading = None; // everyone left: no reason to load
                    return false;
                }
                let requests_wait = job.waiters.iter().any(|w| !w.admin);
                if self.make_room(&mut st, name, need, credit) {
                    st.reserved += need;
                    return true;
                }
                if !requests_wait {
                    drop(st);
                    let budget = self.inner.cfg.host_memory;
                    let e = RegistryError::Exhausted(format!(
                        "adapter {name:?} needs {need} bytes of host memory; the budget \
                         (--adapter-host-memory {budget}) is held by adapters in use"
                    ));
                    self.fail_load(name, epoch, e);
                    return false;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
        }
    }

    /// Evicts the least recently requested unleased versions (never `keep`'s) until the
    /// live and reserved bytes plus `extra`, less `credit`, fit the host budget. False
    /// if that is impossible.
    fn make_room(&self, st: &mut State, keep: &str, extra: usize, credit: usize) -> bool {
        let budget = self.inner.cfg.host_memory + credit;
        loop {
            let resident = self.inner.acc.resident_bytes.load(Ordering::SeqCst);
            if resident + st.reserved + extra <= budget {
                return true;
            }
            let victim = st
                .entries
                .iter()
                .filter(|(n, e)| {
                    n.as_str() != keep && e.current.as_ref().is_some_and(|v| v.leases() == 0)
                })
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else {
                return false;
            };
            let Some(v) = st.entries.get_mut(&victim).and_then(|e| e.current.take()) else {
                return false;
            };
            st.stats.host_evictions += 1;
            self.inner.acc.emit(
                EventKind::Evicted,
                &victim,
                v.version,
                format!("{} bytes", v.bytes()),
            );
            drop(v);
        }
    }

    fn install(&self, st: &mut State, name: &str, v: Arc<AdapterVersion>) {
        st.stats.loads += 1;
        st.stats.load_time_total += v.load_time;
        st.stats.load_time_max = st.stats.load_time_max.max(v.load_time);
        let Some(entry) = st.entries.get_mut(name) else {
            return;
        };
        let job = entry.loading.take();
        entry.source = v.source.clone();
        entry.failure = None;
        entry.provisional = false;
        let old = entry.current.replace(v.clone());
        self.inner.acc.emit(
            EventKind::Loaded,
            name,
            v.version,
            format!(
                "{} bytes in {:.1} ms",
                v.bytes(),
                v.load_time.as_secs_f64() * 1e3
            ),
        );
        if let Some(old) = old {
            old.retire();
            self.inner.acc.emit(
                EventKind::Replaced,
                name,
                old.version,
                format!("by version {}", v.version),
            );
        }
        for w in job.map(|j| j.waiters).unwrap_or_default() {
            let _ = w.tx.send(Ok(v.lease()));
        }
    }

    fn fail_load(&self, name: &str, epoch: u64, e: RegistryError) {
        let mut st = self.lock();
        st.stats.load_failures += 1;
        let Some(entry) = st.entries.get_mut(name).filter(|e| e.epoch == epoch) else {
            return;
        };
        let job = entry.loading.take();
        let job_source = job
            .as_ref()
            .map_or_else(|| entry.source.clone(), |j| j.source.clone());
        tracing::error!(adapter = %name, source = %job_source, error = %e, "adapter failed to load");
        if entry.current.is_none() && entry.provisional {
            st.entries.remove(name);
        } else if entry.current.is_none() && job_source == entry.source {
            entry.failure = Some(e.to_string());
        }
        drop(st);
        self.inner
            .acc
            .emit(EventKind::LoadFailed, name, 0, e.to_string());
        for w in job.map(|j| j.waiters).unwrap_or_default() {
            let answer = match (&e, w.admin) {
                (RegistryError::Invalid(why), false) => {
                    RegistryError::NotFound(format!("adapter {name:?} failed to load: {why}"))
                }
                _ => e.clone(),
            };
            let _ = w.tx.send(Err(answer));
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
            last_used: 0,
        }
    }

    fn info(&self, name: &str) -> AdapterInfo {
        let state = match (&self.current, &self.loading, &self.failure) {
            (Some(v), _, _) if v.is_active() => AdapterState::Active,
            (Some(_), _, _) => AdapterState::Host,
            (None, Some(_), _) => AdapterState::Loading,
            (None, None, Some(_)) => AdapterState::Failed,
            (None, None, None) => AdapterState::Registered,
        };
        let waiting_for_load = self
            .loading
            .as_ref()
            .map_or(0, |j| j.waiters.iter().filter(|w| !w.admin).count());
        let mut info = AdapterInfo {
            name: name.to_string(),
            source: self.source.clone(),
            version: 0,
            state,
            rank: 0,
            target_modules: vec![],
            bytes: 0,
            in_flight: 0,
            waiting_for_load,
            loaded_at: None,
            load_time: Duration::ZERO,
            last_used_ms: 0,
            error: self.failure.clone().unwrap_or_default(),
        };
        if let Some(v) = &self.current {
            info.version = v.version;
            info.rank = v.weights.rank_max;
            info.target_modules = v.weights.target_modules.clone();
            info.bytes = v.bytes();
            info.in_flight = v.leases();
            info.loaded_at = Some(v.loaded_at);
            info.load_time = v.load_time;
            info.last_used_ms = v.last_used_ms();
        }
        info
    }
}

fn not_loaded(name: &str) -> RegistryError {
    RegistryError::NotFound(format!("adapter {name:?} is not loaded"))
}

fn too_large(source: &str, bytes: usize, max: usize) -> RegistryError {
    RegistryError::Exhausted(format!(
        "adapter from {source} needs {bytes} bytes; the adapter memory budgets \
         (--adapter-memory, --adapter-host-memory) allow {max}"
    ))
}

/// The local folder of `source` (downloaded for a Hub source) and the bytes its
/// weights will take (blocking).
fn locate(source: &str, cfg: &RegistryConfig) -> Result<(PathBuf, usize), RegistryError> {
    let dir = AdapterSource::parse(source)
        .and_then(|s| s.materialize())
        .map_err(|e| RegistryError::Invalid(format!("{e:#}")))?;
    let bytes = estimate_adapter_bytes(&dir, &cfg.limits)
        .map_err(|e| RegistryError::Invalid(format!("{e} (from {})", dir.display())))?;
    Ok((dir, bytes))
}

/// Reads and validates the adapter in `dir` (blocking).
fn read_weights(
    dir: &Path,
    cfg: &RegistryConfig,
    max: usize,
) -> Result<AdapterWeights, RegistryError> {
    let w = load_peft_adapter(dir, &cfg.base, &cfg.limits)
        .map_err(|e| RegistryError::Invalid(format!("{e} (from {})", dir.display())))?;
    if w.bytes > max {
        return Err(too_large(&dir.display().to_string(), w.bytes, max));
    }
    Ok(w)
}

/// Reads and validates an adapter's files (blocking).
fn read_adapter(
    source: &str,
    cfg: &RegistryConfig,
    max: usize,
) -> Result<AdapterWeights, RegistryError> {
    let (dir, _) = locate(source, cfg)?;
    read_weights(&dir, cfg, max)
}
