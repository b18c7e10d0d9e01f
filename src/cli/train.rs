//! `lazarus train`: arguments to a `TrainConfig`; the work is in `lazarus::train`.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use lazarus::layout::Layout;
use lazarus::train::run::{Activation, EarlyStopping, HeadConfig, Optimizer, TrainConfig};
use lazarus::train::schedule::Schedule;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum HeadKind {
    Linear,
    Mlp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleKind {
    Constant,
    Cosine,
    Step,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActivationKind {
    Relu,
    Gelu,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[arg(long)]
    pub dataset: String,
    /// Encoder name; checked against the shards' `encoder` metadata when present.
    #[arg(long)]
    pub encoder: String,
    /// Feature folder under features/<dataset>/; optional when there is only one.
    #[arg(long)]
    pub fingerprint: Option<String>,
    #[arg(long, value_enum, default_value = "linear")]
    pub head: HeadKind,
    /// MLP hidden sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pub hidden: Vec<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, value_enum, default_value = "relu")]
    pub activation: ActivationKind,
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, value_enum, default_value = "constant")]
    pub schedule: ScheduleKind,
    /// Cosine warmup, in optimiser steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Step schedule: multiply the rate by --step-gamma every N epochs.
    #[arg(long, default_value_t = 10)]
    pub step_epochs: usize,
    #[arg(long, default_value_t = 0.1)]
    pub step_gamma: f64,
    /// Effective batch; split into micro-batches when the memory budget asks.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, default_value = "4GiB")]
    pub memory_budget: String,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Validation metric for early stopping and best-head selection, e.g. val/macro_f1.
    #[arg(long, default_value = "val/accuracy")]
    pub monitor: String,
    /// Stop after this many epochs without improvement of --monitor.
    #[arg(long)]
    pub patience: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Only f32 is built so far.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    #[arg(long)]
    pub json: bool,
}

/// Parses sizes such as `4GiB`, `512MiB`, `1000000`.
fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .with_context(|| format!("memory size {text:?}"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => bail!("unknown memory unit {other:?} in {text:?}: use B, KiB, MiB or GiB"),
    };
    Ok(number * scale)
}

pub fn train(layout: &Layout, args: TrainArgs) -> anyhow::Result<()> {
    if args.precision != "f32" {
        bail!("--precision {} is not built yet: only f32", args.precision);
    }
    let data = lazarus::train::data::load(layout, &args.dataset, args.fingerprint.as_deref())?;
    if let Some(encoder) = data.features.metadata().get("encoder")
        && encoder != &args.encoder
    {
        bail!(
            "features {} were made by encoder {encoder}, not {}",
            data.fingerprint,
            args.encoder
        );
    }
    let config = TrainConfig {
        head: match args.head {
            HeadKind::Linear => HeadConfig::Linear,
            HeadKind::Mlp => HeadConfig::Mlp {
                hidden: args.hidden,
                dropout: args.dropout,
                activation: match args.activation {
                    ActivationKind::Relu => Activation::Relu,
                    ActivationKind::Gelu => Activation::Gelu,
                },
            },
        },
        epochs: args.epochs,
        learning_rate: args.lr,
        weight_decay: args.weight_decay,
        optimizer: match args.optimizer {
            OptimizerKind::Adamw => Optimizer::AdamW,
            OptimizerKind::Sgd => Optimizer::Sgd {
                momentum: args.momentum,
            },
        },
        schedule: match args.schedule {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::Cosine => Schedule::Cosine {
                warmup_steps: args.warmup_steps,
            },
            ScheduleKind::Step => Schedule::Step {
                every_epochs: args.step_epochs,
                gamma: args.step_gamma,
            },
        },
        batch_size: args.batch_size,
        memory_budget_bytes: parse_bytes(&args.memory_budget)?,
        gradient_clip: args.clip_grad_norm,
        label_smoothing: args.label_smoothing,
        early_stopping: args.patience.map(|patience| EarlyStopping {
            metric: args.monitor.clone(),
            patience,
        }),
        seed: args.seed,
    };
    let report = lazarus::train::run::train(layout, &data, &config)?;
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "run {} ({} epochs, best epoch {}): test/accuracy {:.4}, test/macro_f1 {:.4}",
        report.run_id,
        report.epochs_run,
        report.best_epoch + 1,
        report.test["test/accuracy"],
        report.test["test/macro_f1"]
    );
    println!("wrote {}", report.run_dir.display());
    Ok(())
}
