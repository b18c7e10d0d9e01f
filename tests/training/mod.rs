//! Runs of every task: heads, options, sweeps, warm starts, diverged heads,
//! anomaly scorers, segmentation, and what experiments.db, its report and the
//! MLflow export record of them.

mod anomaly;
mod anomaly_patch;
mod diverged_heads;
mod experiments_db;
mod experiments_report;
mod finetune;
mod mlflow_export;
mod segment;
mod segment_fine_maps;
mod segment_nuclei;
mod sweep;
mod train_head;
mod train_options;
mod warm_start;
