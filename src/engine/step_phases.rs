//! Where an engine step's time goes, in the server's own log: planning (scheduling and
//! building the batch), the model's upload of the step's metadata, its enqueueing of
//! every operation, its wait for the logits (on a GPU: the device time the host did not
//! hide), and sampling. Means over a window of steps are logged at `info` every
//! [`LOG_EVERY`], so a load run's log says how the host and the device split a step.
//!
//! Invariant: recording a step costs a few clock reads and additions; nothing is logged
//! per step.
use crate::model::llama::ForwardPhases;
use std::time::{Duration, Instant};

/// How often the window's means are logged (when steps ran).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One step's phases.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepPhases {
    pub plan: Duration,
    pub model: ForwardPhases,
    pub sample: Duration,
    pub rows: usize,
}

/// The running window of step phases.
pub struct PhaseLog {
    since: Instant,
    steps: u32,
    rows: usize,
    sum: [Duration; 5],
}

impl Default for PhaseLog {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            steps: 0,
            rows: 0,
            sum: [Duration::ZERO; 5],
        }
    }
}

impl PhaseLog {
    /// Adds one step; logs and restarts the window once it is [`LOG_EVERY`] old.
    pub fn record(&mut self, step: StepPhases) {
        let parts = [
            step.plan,
            step.model.upload,
            step.model.enqueue,
            step.model.sync,
            step.sample,
        ];
        for (sum, part) in self.sum.iter_mut().zip(parts) {
            *sum += part;
        }
        self.steps += 1;
        self.rows += step.rows;
        if self.since.elapsed() >= LOG_EVERY {
            if let Some(line) = self.means() {
                tracing::info!(target: "multilora::step_phases", "{line}");
            }
            *self = Self::default();
        }
    }

    /// The window's mean per step, as the log line says it; None before any step.
    pub fn means(&self) -> Option<String> {
        if self.steps == 0 {
            return None;
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(self.steps);
        let [plan, upload, enqueue, sync, sample] = self.sum.map(us);
        let total = plan + upload + enqueue + sync + sample;
        Some(format!(
            "step phases over {} steps (mean us per step, {:.1} rows): plan {plan:.0}, upload {upload:.0}, enqueue {enqueue:.0}, sync {sync:.0}, sample {sample:.0}, total {total:.0}",
            self.steps,
            self.rows as f64 / f64::from(self.steps)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_are_per_step() {
        let mut log = PhaseLog::default();
        assert!(log.means().is_none());
        let ms = Duration::from_millis;
        for _ in 0..2 {
            log.record(StepPhases {
                plan: ms(1),
                model: ForwardPhases {
                    upload: ms(2),
                    enqueue: ms(3),
                    sync: ms(4),
                },
                sample: ms(5),
                rows: 8,
            });
        }
        let line = log.means().unwrap();
        assert!(line.contains("over 2 steps"), "{line}");
        assert!(line.contains("8.0 rows"), "{line}");
        assert!(
            line.contains(
                "plan 1000, upload 2000, enqueue 3000, sync 4000, sample 5000, total 15000"
            ),
            "{line}"
        );
    }
}
