//! Gives the heap's free memory back to the operating system once the engine goes
//! quiet after work ([`crate::heap::release_freed_memory`]). Each new peak of concurrent
//! requests leaves glibc's arenas holding that peak's freed buffers (prompts, events,
//! responses, per-step tensors), so without this the resident memory of a server only
//! ever climbs in steps, though nothing is kept.
//!
//! Invariants: a trim runs only after the engine has been idle (no sequence running or
//! waiting, no loop turn) for a whole poll, at most once per quiet period, and never
//! more often than [`MIN_GAP`]; it runs on a blocking thread, off the async workers.

use crate::engine::EngineHandle;
use std::time::{Duration, Instant};

/// How often the engine's heartbeat is looked at; a quiet period must last this long.
const POLL: Duration = Duration::from_secs(1);
/// The least time between two trims (a trim costs the next requests page faults).
const MIN_GAP: Duration = Duration::from_secs(10);

/// When to trim, from the heartbeat seen at each poll.
#[derive(Debug)]
struct TrimClock {
    /// Loop turns at the previous poll.
    last_seen: u64,
    /// Loop turns at the last trim (or at the start).
    trimmed_at: u64,
    last_trim: Option<Instant>,
}

impl TrimClock {
    fn new(beats: u64) -> Self {
        Self {
            last_seen: beats,
            trimmed_at: beats,
            last_trim: None,
        }
    }

    /// One poll: whether to trim now (the engine made no turn since the last poll and
    /// has nothing pending, it worked since the last trim, and `MIN_GAP` has passed).
    fn poll(&mut self, beats: u64, busy: bool, now: Instant) -> bool {
        let quiet = beats == self.last_seen && !busy;
        self.last_seen = beats;
        let worked = beats != self.trimmed_at;
        let spaced = self.last_trim.is_none_or(|t| now - t >= MIN_GAP);
        if !(quiet && worked && spaced) {
            return false;
        }
        (self.trimmed_at, self.last_trim) = (beats, Some(now));
        true
    }
}

/// Spawns the trimmer; it ends with the engine thread.
pub fn trim_when_idle(engine: EngineHandle) {
    tokio::spawn(async move {
        let mut clock = TrimClock::new(engine.progress().beats());
        while engine.is_alive() {
            tokio::time::sleep(POLL).await;
            let progress = engine.progress();
            if !clock.poll(progress.beats(), progress.is_busy(), Instant::now()) {
                continue;
            }
            let trim = tokio::task::spawn_blocking(|| {
                let (before, started) = (crate::heap::resident_bytes(), Instant::now());
                let released = crate::heap::release_freed_memory();
                (
                    before,
                    crate::heap::resident_bytes(),
                    released,
                    started.elapsed(),
                )
            });
            if let Ok((before, after, released, took)) = trim.await {
                let mib = |b: Option<u64>| b.map(|b| b as f64 / 1_048_576.0);
                tracing::debug!(
                    resident_mib_before = mib(before),
                    resident_mib_after = mib(after),
                    released,
                    ?took,
                    "engine idle: freed heap memory handed back"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_quiet_period_after_work_and_never_while_busy() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut clock = TrimClock::new(5);
        // Idle from the start, no work: nothing to give back.
        assert!(!clock.poll(5, false, at(1)));
        // Work: turns between polls, or sequences pending, are not quiet.
        assert!(!clock.poll(9, true, at(2)));
        assert!(!clock.poll(12, false, at(3)));
        assert!(!clock.poll(12, true, at(4)));
        // A whole poll with no turn and nothing pending after work: one trim.
        assert!(clock.poll(12, false, at(5)));
        assert!(!clock.poll(12, false, at(6)));
        // More work, quiet again, but within MIN_GAP of the last trim: wait.
        assert!(!clock.poll(14, false, at(7)));
        assert!(!clock.poll(14, false, at(8)));
        assert!(!clock.poll(14, false, at(14)));
        assert!(clock.poll(14, false, at(15)));
        assert!(!clock.poll(14, false, at(16)));
    }
}
