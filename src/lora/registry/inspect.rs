//! Snapshots of the registry: one name ([`AdapterRegistry::get`]), every name
//! ([`AdapterRegistry::list`]), counters and gauges ([`AdapterRegistry::stats`]). Each
//! is taken under the state lock and keeps no reference to any weights.
use super::*;

impl AdapterRegistry {
    /// A snapshot of `name`, if it is registered.
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

    /// How long successful loads took.
    pub fn load_seconds(&self) -> HistogramSnapshot {
        self.inner.load_seconds.snapshot()
    }

    /// The registry's counters and gauges now.
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
        for (name, e) in &st.entries {
            let waiting = e
                .loading
                .as_ref()
                .map_or(0, |job| job.waiters.iter().filter(|w| !w.admin).count());
            if waiting > 0 {
                s.waiting_for_load_by_adapter.insert(name.clone(), waiting);
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
}

impl Entry {
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
            version: self.version,
            state,
            kind: None,
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
            info.kind = Some(v.weights.kind);
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
