//! Learning-rate schedules, evaluated per optimiser step.

use serde::{Deserialize, Serialize};

/// How the learning rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Linear warmup over `warmup_steps`, then cosine decay to zero at the last step.
    Cosine {
        warmup_steps: usize,
    },
    /// Multiply by `gamma` every `every_epochs` epochs.
    Step {
        every_epochs: usize,
        gamma: f64,
    },
    /// Multiply by `factor` when the monitored validation metric has not
    /// improved for `patience` epochs (the trainer keeps that state).
    ReduceOnPlateau {
        patience: usize,
        factor: f64,
    },
}

impl Schedule {
    /// Learning rate at `step` (0-based) of `total_steps`, in `epoch` (0-based).
    /// Reduce-on-plateau returns `base`: the trainer applies its reductions.
    pub fn learning_rate(&self, base: f64, step: usize, total_steps: usize, epoch: usize) -> f64 {
        match *self {
            Schedule::Constant | Schedule::ReduceOnPlateau { .. } => base,
            Schedule::Cosine { warmup_steps } => {
                if step < warmup_steps {
                    return base * (step + 1) as f64 / warmup_steps as f64;
                }
                let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
                let progress = (step - warmup_steps) as f64 / decay_steps as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
            Schedule::Step {
                every_epochs,
                gamma,
            } => base * gamma.powi((epoch / every_epochs.max(1)) as i32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_halves_at_midpoint() {
        let s = Schedule::Cosine { warmup_steps: 10 };
        // Hand-computed: warmup step 4 -> 5/10 of base; decay over 100 steps,
        // step 60 is progress 0.5 -> 0.5 * (1 + cos(pi/2)) = 0.5.
        assert!((s.learning_rate(1.0, 4, 110, 0) - 0.5).abs() < 1e-12);
        assert!((s.learning_rate(1.0, 10, 110, 0) - 1.0).abs() < 1e-12);
        assert!((s.learning_rate(1.0, 60, 110, 0) - 0.5).abs() < 1e-12);
        assert!(s.learning_rate(1.0, 110, 110, 0).abs() < 1e-12);
    }

    #[test]
    fn step_multiplies_every_n_epochs() {
        let s = Schedule::Step {
            every_epochs: 3,
            gamma: 0.1,
        };
        // Epochs 0-2 at base, 3-5 at 0.1 * base, 6 at 0.01 * base.
        assert_eq!(s.learning_rate(2.0, 0, 10, 2), 2.0);
        assert!((s.learning_rate(2.0, 0, 10, 3) - 0.2).abs() < 1e-12);
        assert!((s.learning_rate(2.0, 0, 10, 6) - 0.02).abs() < 1e-12);
        assert_eq!(Schedule::Constant.learning_rate(0.3, 5, 10, 9), 0.3);
    }
}
