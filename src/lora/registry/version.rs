//! Loaded adapter versions and the leases requests hold on them. A version's weights
//! are immutable; its memory is freed when the last holder (the registry's host tier,
//! a lease, a step) drops it. Invariants: `leases` counts live [`AdapterLease`]s exactly
//! (taken only under the registry lock, released exactly once by `Drop`); the
//! resident-bytes gauge counts every live version once.
use crate::lora::peft::AdapterWeights;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, Notify};

/// What happened to an adapter (the `WatchAdapters` stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Registered,
    Loading,
    Loaded,
    LoadFailed,
    Replaced,
    Evicted,
    Activated,
    Deactivated,
    Unloading,
    Freed,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdapterEvent {
    pub kind: EventKind,
    pub name: String,
    pub version: u64,
    pub detail: String,
    pub at: SystemTime,
}

/// Shared by the registry and every version: the memory gauge, the wake-up for anyone
/// waiting on memory or a drain, and the event channel.
#[derive(Debug)]
pub struct Accounting {
    /// Bytes of every live version (host tier, draining, held by requests).
    pub resident_bytes: AtomicUsize,
    pub live_versions: AtomicUsize,
    /// Notified when a lease ends or a version is freed.
    pub changed: Notify,
    pub events: broadcast::Sender<AdapterEvent>,
}

impl Accounting {
    pub fn new() -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        Arc::new(Self {
            resident_bytes: AtomicUsize::new(0),
            live_versions: AtomicUsize::new(0),
            changed: Notify::new(),
            events,
        })
    }

    pub fn emit(&self, kind: EventKind, name: &str, version: u64, detail: impl Into<String>) {
        // No receiver is fine: nobody is watching.
        let _ = self.events.send(AdapterEvent {
            kind,
            name: name.to_string(),
            version,
            detail: detail.into(),
            at: SystemTime::now(),
        });
    }
}

/// Milliseconds since the Unix epoch, for `last_used`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One immutable loaded version of a named adapter.
#[derive(Debug)]
pub struct AdapterVersion {
    pub name: String,
    /// Unique for the server's lifetime: the engine's key.
    pub id: u64,
    /// What clients see: increasing, new for every replacement, kept when evicted
    /// weights are reloaded from the same source.
    pub version: u64,
    pub source: String,
    pub weights: Arc<AdapterWeights>,
    pub loaded_at: SystemTime,
    pub load_time: Duration,
    leases: AtomicUsize,
    last_used_ms: AtomicU64,
    /// Set by the engine while the version is in its active pool.
    active: AtomicBool,
    /// Unloaded or replaced: no new leases; freed when the last holder drops it.
    retired: AtomicBool,
    acc: Arc<Accounting>,
}

impl AdapterVersion {
    pub fn new(
        name: &str,
        id: u64,
        version: u64,
        source: &str,
        weights: AdapterWeights,
        load_time: Duration,
        acc: Arc<Accounting>,
    ) -> Arc<Self> {
        acc.resident_bytes
            .fetch_add(weights.bytes, Ordering::SeqCst);
        acc.live_versions.fetch_add(1, Ordering::SeqCst);
        Arc::new(Self {
            name: name.to_string(),
            id,
            version,
            source: source.to_string(),
            weights: Arc::new(weights),
            loaded_at: SystemTime::now(),
            load_time,
            leases: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            active: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            acc,
        })
    }

    pub fn bytes(&self) -> usize {
        self.weights.bytes
    }

    pub fn leases(&self) -> usize {
        self.leases.load(Ordering::SeqCst)
    }

    /// Unix milliseconds of the last lease taken or released (0: never used).
    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub fn set_active(&self, active: bool) {
        if self.active.swap(active, Ordering::Relaxed) != active {
            let kind = if active {
                EventKind::Activated
            } else {
                EventKind::Deactivated
            };
            self.acc.emit(kind, &self.name, self.version, "");
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// A new lease. Only the registry calls this, under its lock, on a version it holds
    /// as current, so a version with no leases cannot gain one while being evicted.
    pub(super) fn lease(self: &Arc<Self>) -> AdapterLease {
        self.leases.fetch_add(1, Ordering::SeqCst);
        self.touch();
        AdapterLease {
            version: self.clone(),
        }
    }

    fn touch(&self) {
        self.last_used_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }
}

impl Drop for AdapterVersion {
    fn drop(&mut self) {
        self.acc
            .resident_bytes
            .fetch_sub(self.weights.bytes, Ordering::SeqCst);
        self.acc.live_versions.fetch_sub(1, Ordering::SeqCst);
        self.acc.emit(
            EventKind::Freed,
            &self.name,
            self.version,
            format!("{} bytes", self.weights.bytes),
        );
        self.acc.changed.notify_waiters();
    }
}

/// A request's hold on one adapter version, from admission until the request ends
/// (success, error, cancellation or disconnect). Released exactly once, by `Drop`.
pub struct AdapterLease {
    version: Arc<AdapterVersion>,
}

impl AdapterLease {
    pub fn version(&self) -> &Arc<AdapterVersion> {
        &self.version
    }

    pub fn weights(&self) -> &Arc<AdapterWeights> {
        &self.version.weights
    }

    /// The engine's key for this version.
    pub fn key(&self) -> u64 {
        self.version.id
    }
}

impl Clone for AdapterLease {
    fn clone(&self) -> Self {
        self.version.leases.fetch_add(1, Ordering::SeqCst);
        Self {
            version: self.version.clone(),
        }
    }
}

impl std::fmt::Debug for AdapterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AdapterLease({}@{})",
            self.version.name, self.version.version
        )
    }
}

impl Drop for AdapterLease {
    fn drop(&mut self) {
        self.version.touch();
        if self.version.leases.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.version.acc.changed.notify_waiters();
        }
    }
}
