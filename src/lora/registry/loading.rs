//! Loading adapters into the host tier: locating the files, reserving host memory
//! (evicting least recently requested unleased versions), reading on a blocking thread,
//! installing the new version and answering every waiter exactly once.
use super::*;

impl AdapterRegistry {
    /// The loaded weights of `entry` from `source`. A reload of the source it held
    /// before an eviction keeps that version number; any other load gets a new one.
    fn new_version(
        &self,
        entry: &Entry,
        name: &str,
        source: &str,
        weights: AdapterWeights,
        load_time: Duration,
    ) -> Arc<AdapterVersion> {
        let id = self.inner.next_version.fetch_add(1, Ordering::SeqCst);
        let reload = entry.current.is_none() && entry.version != 0 && entry.source == source;
        let version = if reload { entry.version } else { id };
        AdapterVersion::new(
            name,
            id,
            version,
            source,
            weights,
            load_time,
            self.inner.acc.clone(),
        )
    }

    /// Loads a registered `name` now, blocking this thread (start-up `--adapter`s); a
    /// failure is remembered and answered to its requests.
    pub fn load_now(&self, name: &str) -> Result<(), RequestError> {
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
        let mut st = self.lock();
        let Some(entry) = st.entries.get(name).filter(|e| e.epoch == epoch) else {
            return Err(not_loaded(name));
        };
        let v = self.new_version(entry, name, &source, weights, t0.elapsed());
        if !self.make_room(&mut st, name, 0, 0) {
            drop(st);
            let e = RequestError::ResourceExhausted(format!(
                "adapter {name:?} needs {} bytes; the adapter host memory budget of {} bytes is full",
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

    /// Holds every runtime load (one started after or waiting when this returns) just
    /// before it reads its weights, until the guard is dropped: for tests of what goes
    /// on while a load is in progress. Nothing else takes the hold exclusively, so
    /// without it a load never waits there.
    #[doc(hidden)]
    pub async fn hold_loads(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.inner.load_hold.clone().write_owned().await
    }

    pub(super) fn max_adapter_bytes(&self) -> usize {
        self.inner
            .max_adapter_bytes
            .load(Ordering::SeqCst)
            .min(self.inner.cfg.host_memory)
    }

    pub(super) fn spawn_load(&self, name: &str, epoch: u64, source: String) {
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
            .unwrap_or_else(|e| Err(RequestError::Internal(format!("adapter load task: {e}"))));
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
        drop(self.inner.load_hold.read().await);
        let cfg = self.inner.cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || read_weights(&dir, &cfg, max))
            .await
            .unwrap_or_else(|e| Err(RequestError::Internal(format!("adapter load task: {e}"))));
        let weights = match loaded {
            Ok(w) => w,
            Err(e) => {
                self.lock().reserved -= estimate;
                return self.fail_load(&name, epoch, e);
            }
        };
        let mut st = self.lock();
        st.reserved -= estimate;
        let Some(entry) = st.entries.get(&name).filter(|e| e.epoch == epoch) else {
            return; // unloaded meanwhile: its waiters were answered
        };
        let v = self.new_version(entry, &name, &source, weights, t0.elapsed());
        let admin = entry.loading.as_ref().is_some_and(|j| j.admin);
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
        self.install(&mut st, &name, v.clone());
        drop(st);
        if admin {
            // Here, not in the caller's future: a caller that has gone still changed
            // what the name serves.
            self.journal_load(&name, &v);
        }
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
                    let e = RequestError::ResourceExhausted(format!(
                        "adapter {name:?} needs {need} bytes of host memory; the adapter host \
                         memory budget ({budget} bytes) is held by adapters in use"
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
        self.inner.load_seconds.observe(v.load_time.as_secs_f64());
        let Some(entry) = st.entries.get_mut(name) else {
            return;
        };
        let job = entry.loading.take();
        entry.source = v.source.clone();
        entry.version = v.version;
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

    fn fail_load(&self, name: &str, epoch: u64, e: RequestError) {
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
            entry.failure = Some(e.detail().to_string());
        }
        drop(st);
        self.inner
            .acc
            .emit(EventKind::LoadFailed, name, 0, e.detail().to_string());
        for w in job.map(|j| j.waiters).unwrap_or_default() {
            let answer = match (&e, w.admin) {
                (RequestError::InvalidArgument { message, .. }, false) => {
                    RequestError::NotFound(format!("adapter {name:?} failed to load: {message}"))
                }
                _ => e.clone(),
            };
            let _ = w.tx.send(Err(answer));
        }
    }
}

fn too_large(source: &str, bytes: usize, max: usize) -> RequestError {
    RequestError::ResourceExhausted(format!(
        "adapter from {source} needs {bytes} bytes; the adapter memory budgets \
         (active and host) allow {max}"
    ))
}

/// The local folder of `source` (downloaded for a Hub source) and the bytes its
/// weights will take (blocking).
fn locate(source: &str, cfg: &RegistryConfig) -> Result<(PathBuf, usize), RequestError> {
    let dir = AdapterSource::parse(source)
        .and_then(|s| s.materialize(&cfg.hub))
        .map_err(|e| RequestError::invalid("source", format!("{e:#}")))?;
    let bytes = estimate_adapter_bytes(&dir, &cfg.limits, cfg.adapter_dtype)
        .map_err(|e| RequestError::invalid("source", format!("{e} (from {})", dir.display())))?;
    Ok((dir, bytes))
}

/// Reads and validates the adapter in `dir` (blocking).
fn read_weights(
    dir: &Path,
    cfg: &RegistryConfig,
    max: usize,
) -> Result<AdapterWeights, RequestError> {
    let served = cfg.served.as_deref();
    let w = load_peft_adapter_served(dir, &cfg.base, &cfg.limits, cfg.adapter_dtype, served)
        .map_err(|e| RequestError::invalid("source", format!("{e} (from {})", dir.display())))?;
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
) -> Result<AdapterWeights, RequestError> {
    let (dir, _) = locate(source, cfg)?;
    read_weights(&dir, cfg, max)
}
