//! The registry's side of the journal ([`journal`]): recording runtime operations and
//! replaying them when a server starts.
//!
//! Recorded: every successful [`AdapterRegistry::load`] and [`AdapterRegistry::reload`]
//! (the gRPC `LoadAdapter`, HTTP `load_lora_adapter`, with `load_inplace` too), before
//! the call returns, and [`AdapterRegistry::unload`]; never [`AdapterRegistry::register`]
//! or [`AdapterRegistry::load_now`] or a load on first use (start-up adapters are the
//! operator's configuration).
//! Replayed, after start-up registration: a name the journal last loaded is registered
//! lazily (no file is read until its first use) with its journaled source and version,
//! replacing a start-up registration of that name; a name it last unloaded is removed,
//! even one a start-up folder registered. A journaled source must pass the current
//! source policy ([`SourcePolicy`]), which may have narrowed since: a refused one is
//! left out with a warning, and a start-up registration of that name stays.
//!
//! Invariants: the journal lock is taken before the state lock, and a load is recorded
//! only if its version is still the name's current one when the journal lock is held, so
//! the journal's last word on each name matches the registry's (a later replacement or
//! unload records itself after). After replay every new version is numbered past every
//! journaled one. A failed append is logged and the operation stands: the registry, not
//! the file, is what the server serves.
use super::journal::{Final, Journal, Op, Record};
use super::*;

/// What replaying the journal did at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Names registered with their journaled source and version (loaded on first use).
    pub restored: usize,
    /// Names removed because the journal last unloaded them.
    pub unloaded: usize,
    /// Names whose journaled source the current source policy refuses (or that is
    /// gone); left out.
    pub refused: usize,
    /// Journal lines that did not parse (torn or corrupt); skipped.
    pub skipped_lines: usize,
}

impl AdapterRegistry {
    /// Opens the journal in `dir` (created if missing) and replays it; from now on
    /// runtime loads, replacements and unloads are recorded there. Call once, after the
    /// start-up registrations and before serving. Torn or corrupt lines are skipped with
    /// a warning; only a journal that cannot be read or rewritten is an error.
    pub fn open_journal(&self, dir: &Path) -> anyhow::Result<ReplaySummary> {
        if self.inner.journal.get().is_some() {
            anyhow::bail!("the adapter journal is already open");
        }
        let (journal, folded) = Journal::open(dir)?;
        self.inner
            .next_version
            .fetch_max(folded.max_version.saturating_add(1), Ordering::SeqCst);
        let mut summary = ReplaySummary {
            skipped_lines: folded.skipped,
            ..Default::default()
        };
        for (name, last) in &folded.names {
            match last {
                Final::Loaded { source, version } => match self.restore(name, source, *version) {
                    Ok(()) => summary.restored += 1,
                    Err(e) => {
                        summary.refused += 1;
                        tracing::warn!(
                            adapter = %name, version, error = %e.detail(),
                            "journaled adapter left out"
                        );
                    }
                },
                Final::Unloaded { .. } => {
                    if self.remove(name).is_ok() {
                        summary.unloaded += 1;
                    }
                }
            }
        }
        let path = journal.path().display().to_string();
        if self.inner.journal.set(Mutex::new(journal)).is_err() {
            anyhow::bail!("the adapter journal is already open");
        }
        tracing::info!(
            journal = %path,
            restored = summary.restored,
            unloaded = summary.unloaded,
            refused = summary.refused,
            skipped_lines = summary.skipped_lines,
            "adapter journal replayed"
        );
        Ok(summary)
    }

    /// Registers `name` lazily from a journaled `source` at `version`, if the current
    /// policy admits the source; a start-up registration of `name` is replaced.
    fn restore(&self, name: &str, source: &str, version: u64) -> Result<(), RequestError> {
        validate_name(name).map_err(|e| RequestError::invalid("name", format!("{e:#}")))?;
        let admitted = self.inner.cfg.sources.admit(source)?;
        AdapterSource::parse(&admitted)
            .map_err(|e| RequestError::invalid("source", format!("{e:#}")))?;
        let mut st = self.lock();
        if let Some(e) = st.entries.get(name) {
            if e.source == admitted && e.version == version {
                return Ok(());
            }
        }
        let epoch = self.inner.next_version.fetch_add(1, Ordering::SeqCst);
        let mut entry = Entry::new(epoch, &admitted, false);
        entry.version = version;
        let old = st.entries.insert(name.to_string(), entry);
        drop(st);
        if let Some(old) = old {
            self.retire_entry(name, old);
        }
        self.inner
            .acc
            .emit(EventKind::Registered, name, version, admitted);
        Ok(())
    }

    /// Records that `name` serves `v`, if `v` is still its current version and the
    /// journal does not say so already. Called by the load task (so a load whose caller
    /// has gone is recorded) and by the caller (so it returns once the record is on
    /// disk); the second call finds it written.
    pub(super) fn journal_load(&self, name: &str, v: &AdapterVersion) {
        let Some(journal) = self.inner.journal.get() else {
            return;
        };
        let mut journal = lock_journal(journal);
        let current = self
            .lock()
            .entries
            .get(name)
            .is_some_and(|e| e.version == v.version && e.source == v.source);
        if !current {
            return; // replaced or unloaded since; that records itself after this
        }
        let op = if journal.is_loaded(name) {
            Op::Replace
        } else {
            Op::Load
        };
        let rec = Record {
            op,
            name: name.to_string(),
            source: v.source.clone(),
            version: v.version,
        };
        if let Err(e) = journal.append(rec) {
            tracing::error!(adapter = %name, version = v.version, error = %format!("{e:#}"),
                "adapter load not journaled: a restart will not restore it");
        }
    }

    /// [`Self::unload`], recorded in the journal if one is open.
    pub(super) fn journaled_unload(&self, name: &str) -> Result<Unloaded, RequestError> {
        let Some(journal) = self.inner.journal.get() else {
            return self.remove(name).map(|(u, _)| u);
        };
        let mut journal = lock_journal(journal);
        let (unloaded, version) = self.remove(name)?;
        let rec = Record {
            op: Op::Unload,
            name: name.to_string(),
            source: String::new(),
            version,
        };
        if let Err(e) = journal.append(rec) {
            tracing::error!(adapter = %name, error = %format!("{e:#}"),
                "adapter unload not journaled: a restart may bring it back");
        }
        Ok(unloaded)
    }
}

fn lock_journal(j: &Mutex<Journal>) -> MutexGuard<'_, Journal> {
    // Appends leave the journal consistent or flagged torn; a poisoned lock is usable.
    j.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
