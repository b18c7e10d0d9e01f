//! Training runs: one head (`lazarus train`) or many at once (`lazarus sweep`)
//! over the same memory-mapped features.
//!
//! Heads that share a data stream (same seed, batch size and sampler, at the
//! same epoch) train in one pass: each batch is gathered from the mapped f16
//! rows and standardised once, then fed to every head of the group. Data
//! order and dropout come from per-epoch RNG streams of the run's seed, and
//! initialisation from stream 0, so a head trained inside a sweep gets the
//! same batches, and the same metrics, as the same config trained alone.
//!
//! # Crash behaviour
//!
//! Every `checkpoint_every` epochs each head publishes a checkpoint
//! (`checkpoint.rs`). A run killed at any point resumes from its newest
//! complete checkpoint at an epoch boundary and ends with the same metrics
//! as an uninterrupted run: the state at an epoch boundary is the weights,
//! the optimiser moments, the loss scale, the plateau and early-stopping
//! counters and the best head, all saved; the RNG streams are derived from
//! (seed, epoch). Final files (`head.safetensors`, `metrics.json`) are
//! written atomically at the end.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::checkpoint;
use super::config::{Sampler, TrainConfig, TrainViews};
use super::data::{SplitRows, Standardisation, TrainData};
use super::host::{FirstLayers, Threads, softmax_rows};
use super::metrics::{Predictions, confusion_matrix, split_metrics};
use super::trainer::{
    Batch, BatchPlan, HeadTrainer, lend_first_layers, plan_batches, return_first_layers,
    train_stacked_batch,
};
use crate::experiments::run_files::RunFolder;
use crate::experiments::run_files::SplitCurves;
use rayon::prelude::*;

/// Rows gathered per evaluation forward pass.
const EVAL_ROWS: usize = 1024;
/// The process itself before any data: binary, candle, allocator (measured
/// at about 30 MiB resident on Linux x86-64; rounded up).
const PROCESS_BASE_BYTES: u64 = 48 << 20;
/// Per feature row: the manifest record while loading, row index, split lists.
const BYTES_PER_ROW: u64 = 320;

/// One head to train into its own run folder.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub config: TrainConfig,
    /// Continue from the newest checkpoint in `run_dir`, if any.
    pub resume: bool,
    /// Start from another run's weights (a checkpoint, when resumed, wins).
    pub init: Option<super::warm::WarmStart>,
}

/// Where and how the heads train.
pub struct FitOptions {
    pub device: Device,
    /// A progress bar per epoch (only drawn on a terminal).
    pub progress: bool,
}

/// Called as runs progress: per-epoch metrics (for the experiments database).
pub trait RunObserver {
    fn epoch(
        &mut self,
        run: usize,
        epoch: usize,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<(), TrainError>;
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub config_hash: String,
    pub plan: BatchPlan,
    pub epochs_run: usize,
    pub best_epoch: usize,
    /// The epoch a resumed run started from (0 for a fresh run).
    pub resumed_from_epoch: usize,
    pub stopped_early: bool,
    /// f16 steps skipped for inf or NaN gradients.
    pub skipped_steps: usize,
    /// Per epoch: `train/*` and `val/*` metrics.
    pub epochs: Vec<BTreeMap<String, f64>>,
    /// Final `test/*` metrics of the kept (best) head.
    pub test: BTreeMap<String, f64>,
    pub test_confusion_matrix: Vec<Vec<u64>>,
    /// Test ROC and precision-recall curves of a binary head (`curves.json`;
    /// not part of `metrics.json`).
    #[serde(skip)]
    pub test_curves: Option<SplitCurves>,
    /// Peak resident memory of the process when the run ended (Linux
    /// `VmHWM`): anonymous memory and mapped feature pages together.
    pub peak_rss_bytes: Option<u64>,
    /// The two apart, and the memory cgroup's peak where the run has a
    /// limited one (`memory::MemoryReport`): what the run needs is
    /// `peak_anonymous_bytes` (plus the resident limit of mapped pages).
    #[serde(default)]
    pub memory: crate::memory::MemoryReport,
    /// What `--blocks-precision auto` took and its timings (fine-tuned
    /// runs under `auto` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_precision: Option<super::auto_precision::ChosenPrecision>,
}

/// Mapped feature pages a run keeps resident before releasing them: large
/// enough that releases are rare (one per ~5,000 rows of 1,280 f16), small
/// enough for any budget that can hold the runtime at all.
pub const RESIDENT_FEATURE_BYTES: u64 = 32 << 20;

/// How to read the data a run trains on.
pub fn load_config(config: &TrainConfig) -> super::data::LoadConfig {
    super::data::LoadConfig {
        resident_limit_bytes: RESIDENT_FEATURE_BYTES,
        label_map: config.label_map.clone(),
        ..Default::default()
    }
}

/// How a resumed run reads its data: the manifest version and coverage it
/// started on, whatever the dataset has become since.
pub fn resume_load_config(inputs: &RunInputs) -> super::data::LoadConfig {
    super::data::LoadConfig {
        version: Some(inputs.dataset_version),
        allow_partial: inputs.images_lacking > 0,
        ..load_config(&inputs.config)
    }
}

/// Fixed memory the runtime needs besides heads and batches.
pub(crate) fn runtime_bytes(data: &TrainData) -> u64 {
    let dim = data.features.feature_dim() as u64;
    let classes = data.class_names.len() as u64;
    PROCESS_BASE_BYTES
        + data.features.len() as u64 * BYTES_PER_ROW
        + RESIDENT_FEATURE_BYTES
        + EVAL_ROWS as u64 * (dim * 4 + classes * 4 * 3)
}

/// Trains every planned run; returns their reports in the same order, or
/// for a head that diverged (`TrainError::Diverged`) why, while the other
/// heads train on. Any other error stops every run.
pub fn fit(
    data: &TrainData,
    runs: &[PlannedRun],
    options: &FitOptions,
    observer: &mut dyn RunObserver,
) -> Result<Vec<Result<RunReport, TrainError>>, TrainError> {
    let dim = data.features.feature_dim();
    let classes = data.class_names.len();
    let mut counts = vec![0usize; classes];
    for &label in &data.train.labels {
        counts[label] += 1;
    }
    let budget = runs
        .iter()
        .map(|r| r.config.memory_budget_bytes)
        .min()
        .unwrap_or(0);
    let runtime = runtime_bytes(data);

    let mut trainers = Vec::with_capacity(runs.len());
    let mut resumed_from = Vec::with_capacity(runs.len());
    for run in runs {
        run.config.validate()?;
        let layer_sizes = run.config.head.layer_sizes(classes);
        let plan = plan_batches(
            run.config.batch_size,
            dim,
            &layer_sizes,
            run.config.memory_budget_bytes,
            runtime,
        )?;
        let mut trainer = HeadTrainer::new(
            run.config.clone(),
            dim,
            classes,
            &counts,
            plan,
            &options.device,
        )?;
        if let Some(init) = &run.init {
            init.apply(&trainer.head)?;
        }
        if run.resume {
            checkpoint::restore_latest(&run.run_dir, &run.config, &mut trainer, &options.device)?;
        }
        resumed_from.push(trainer.state.epochs_done);
        trainers.push(trainer);
    }
    // The heads share one process: together they must fit the budget too.
    let head_bytes = |t: &HeadTrainer| -> u64 {
        let params = t.head.parameter_count();
        params as u64 * 4 * 9
    };
    let fixed_per_head: u64 = trainers.iter().map(head_bytes).sum();
    if runtime + fixed_per_head > budget {
        return Err(TrainError::Invalid(format!(
            "memory budget of {budget} bytes cannot hold {} heads at once \
             ({fixed_per_head} bytes of weights and optimiser state plus {runtime} bytes of runtime)",
            trainers.len()
        )));
    }
    // What the plans leave of the budget goes to keeping mapped feature pages
    // resident: a cache that fits is never released and re-faulted.
    // One gathered batch is in flight at a time (the largest), and every
    // head's micro-batch activations with it: stacked heads step together.
    let batches = trainers
        .iter()
        .map(|t| t.plan.fixed_bytes - runtime - head_bytes(t))
        .max()
        .unwrap_or(0)
        + trainers
            .iter()
            .map(|t| t.plan.micro_batch as u64 * t.plan.per_example_bytes)
            .sum::<u64>();
    let leftover = budget.saturating_sub(runtime + fixed_per_head + batches);
    let resident = RESIDENT_FEATURE_BYTES + leftover;
    let cache_fits = resident >= data.features.mapped_bytes();
    data.features
        .set_resident_limit(if cache_fits { u64::MAX } else { resident });

    loop {
        type GroupKey = (u64, usize, Sampler, usize, TrainViews);
        let mut groups: BTreeMap<GroupKey, Vec<usize>> = BTreeMap::new();
        for (i, t) in trainers.iter().enumerate() {
            if t.is_active() {
                groups
                    .entry((
                        t.config.seed,
                        t.config.batch_size,
                        t.config.sampler,
                        t.state.epochs_done,
                        t.config.train_views,
                    ))
                    .or_default()
                    .push(i);
            }
        }
        if groups.is_empty() {
            break;
        }
        for ((seed, batch_size, sampler, epoch, train_views), members) in groups {
            let stream = EpochStream {
                seed,
                batch_size,
                sampler,
                epoch,
            };
            // Shuffled rows from a cache larger than the pages the run may
            // keep: no read-around (see `FeatureSet::read_randomly`).
            // Evaluation reads its splits in row order.
            if !cache_fits {
                data.features.read_randomly();
            }
            let stepped = run_epoch(data, &stream, train_views, &mut trainers, &members, options);
            data.features.read_in_order();
            stepped?;
            let names = ["train", "val"];
            let splits = [&data.train, &data.val];
            let mut metrics: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); members.len()];
            for (split, name) in splits.into_iter().zip(names) {
                let evaluations =
                    evaluate(data, split, name, &trainers, &members, &options.device)?;
                for ((m, evaluation), &i) in metrics.iter_mut().zip(evaluations).zip(&members) {
                    if !evaluation.finite {
                        let lr = trainers[i].config.learning_rate;
                        trainers[i].diverge(format!(
                            "its outputs on the {name} split stopped being finite after epoch {} \
                             (learning rate {lr}); lower --lr",
                            epoch + 1,
                        ));
                    }
                    m.extend(evaluation.metrics);
                }
            }
            for (&i, values) in members.iter().zip(metrics) {
                // A diverged head's epoch is not a result: nothing is logged
                // or checkpointed, and its run fails below.
                if trainers[i].state.diverged.is_some() {
                    continue;
                }
                let improved = trainers[i].end_epoch(values)?;
                let trainer = &trainers[i];
                let epochs_done = trainer.state.epochs_done;
                observer.epoch(i, epochs_done - 1, &trainer.state.history[epochs_done - 1])?;
                if improved {
                    checkpoint::publish_best(
                        &runs[i].run_dir,
                        &head_file_bytes(data, data.standardisation(), trainer, true)?,
                    )?;
                }
                checkpoint::save_if_due(&runs[i].run_dir, &runs[i].config, trainer)?;
            }
        }
    }

    for trainer in &mut trainers {
        trainer.restore_best()?;
    }
    let converged: Vec<usize> = (0..trainers.len())
        .filter(|&i| trainers[i].state.diverged.is_none())
        .collect();
    let mut tests: Vec<Option<(Evaluation, Option<SplitCurves>)>> =
        (0..trainers.len()).map(|_| None).collect();
    let evaluations: Vec<(Evaluation, Option<SplitCurves>)> =
        split_probabilities(data, &data.test, &trainers, &converged, &options.device)?
            .par_iter()
            .map(|p| {
                Ok((
                    split_evaluation(data, &data.test, "test", p)?,
                    binary_curves(data, &data.test, "test", p),
                ))
            })
            .collect::<Result<_, TrainError>>()?;
    for (evaluation, &i) in evaluations.into_iter().zip(&converged) {
        if !evaluation.0.finite {
            trainers[i].diverge("its outputs on the test split are not finite".to_string());
        }
        tests[i] = Some(evaluation);
    }
    let memory = crate::memory::process_report();
    let peak_rss_bytes = memory.peak_rss_bytes.or_else(peak_rss_bytes);
    let mut reports = Vec::with_capacity(runs.len());
    for (((run, trainer), test), resumed) in runs.iter().zip(&trainers).zip(tests).zip(resumed_from)
    {
        let test = match (trainer.divergence(&run.run_id), test) {
            (Some(diverged), _) => {
                reports.push(Err(diverged));
                continue;
            }
            (None, Some(test)) => test,
            (None, None) => unreachable!("every converged head was tested"),
        };
        let (test, test_curves) = test;
        let report = RunReport {
            run_id: run.run_id.clone(),
            run_dir: run.run_dir.clone(),
            config_hash: run.config.config_hash_at(
                &data.dataset_name,
                data.dataset_version,
                &data.fingerprint,
            ),
            plan: trainer.plan,
            epochs_run: trainer.state.epochs_done,
            best_epoch: trainer.state.best_epoch,
            resumed_from_epoch: resumed,
            stopped_early: trainer.state.stopped_early,
            skipped_steps: trainer.state.skipped_steps,
            epochs: trainer.state.history.clone(),
            test: test.metrics,
            test_confusion_matrix: test.matrix,
            test_curves,
            peak_rss_bytes,
            memory: memory.clone(),
            blocks_precision: None,
        };
        write_run(&run.run_dir, &report, data, data.standardisation(), trainer)?;
        reports.push(Ok(report));
    }
    Ok(reports)
}

/// The ChaCha8 stream of an epoch's data order (seeded with the run's seed).
pub(crate) fn data_order_stream(epoch: usize) -> u64 {
    2 * epoch as u64 + 1
}

/// The ChaCha8 stream of an epoch's dropout masks.
pub(crate) fn dropout_stream(epoch: usize) -> u64 {
    2 * epoch as u64 + 2
}

pub(crate) fn seeded(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// What determines the batches of one epoch (segmentation draws its tiles
/// through it too, labelled by whether they hold foreground).
pub(crate) struct EpochStream {
    pub seed: u64,
    pub batch_size: usize,
    pub sampler: Sampler,
    pub epoch: usize,
}

impl EpochStream {
    /// The (row, label) draws of this epoch in order.
    pub(crate) fn order(&self, train: &SplitRows, classes: usize) -> Vec<(usize, usize)> {
        let mut rng = seeded(self.seed, data_order_stream(self.epoch));
        let pairs: Vec<(usize, usize)> = train
            .rows
            .iter()
            .copied()
            .zip(train.labels.iter().copied())
            .collect();
        match self.sampler {
            Sampler::Uniform => {
                let mut order = pairs;
                order.shuffle(&mut rng);
                order
            }
            Sampler::Balanced => {
                let mut by_class: Vec<Vec<(usize, usize)>> = vec![Vec::new(); classes];
                for pair in &pairs {
                    by_class[pair.1].push(*pair);
                }
                let present: Vec<&Vec<(usize, usize)>> =
                    by_class.iter().filter(|c| !c.is_empty()).collect();
                (0..pairs.len())
                    .map(|_| {
                        let class = present[rng.random_range(0..present.len())];
                        class[rng.random_range(0..class.len())]
                    })
                    .collect()
            }
        }
    }
}

/// The view (0-based, below `views`) an image is trained on in `epoch`:
/// drawn from the run's seed, the epoch, the image (its manifest index) and
/// which of the image's draws in this epoch it is (`occurrence`: 0 for the
/// first; the balanced sampler can draw a minority image several times in
/// one epoch, and each draw gets a view of its own), so it does not depend
/// on the batches or the other images, and a resumed run draws the same
/// (SplitMix64 finalisers chained). The first draw's view is what it was
/// before `occurrence` existed.
pub(crate) fn drawn_view(
    seed: u64,
    epoch: usize,
    image: usize,
    occurrence: usize,
    views: usize,
) -> usize {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    if views <= 1 {
        return 0;
    }
    let mut z = mix(mix(mix(seed) ^ epoch as u64) ^ image as u64);
    if occurrence > 0 {
        z = mix(z ^ occurrence as u64);
    }
    (z % views as u64) as usize
}

fn run_epoch(
    data: &TrainData,
    stream: &EpochStream,
    train_views: TrainViews,
    trainers: &mut [HeadTrainer],
    members: &[usize],
    options: &FitOptions,
) -> Result<(), TrainError> {
    let dim = data.features.feature_dim();
    let mut order = stream.order(&data.train, data.class_names.len());
    // One view per image and epoch: the image's first row moves to its
    // drawn view's row.
    if data.views > 1 && train_views == TrainViews::Sample {
        let images = data.features.image_indices();
        let mut draws: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
        for (row, _) in &mut order {
            let occurrence = draws.entry(*row).or_insert(0);
            let image = images[*row];
            *row += drawn_view(stream.seed, stream.epoch, image, *occurrence, data.views);
            *occurrence += 1;
        }
    }
    let steps_per_epoch = order.len().div_ceil(stream.batch_size);
    let mut dropout: Vec<ChaCha8Rng> = members
        .iter()
        .map(|&i| seeded(trainers[i].config.seed, dropout_stream(stream.epoch)))
        .collect();
    let bar = progress_bar(options.progress, steps_per_epoch, stream, trainers, members);
    let mut heads: Vec<(&mut HeadTrainer, &mut ChaCha8Rng)> = trainers
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| members.contains(i))
        .map(|(_, t)| t)
        .zip(&mut dropout)
        .collect();
    // f32 CPU heads step in stacks whose first layers share matmuls
    // (`plan_stacks`), per micro-batch size; the other heads step one by
    // one on candle.
    let mut by_micro_batch: BTreeMap<usize, Vec<(&mut HeadTrainer, &mut ChaCha8Rng)>> =
        BTreeMap::new();
    let mut candle_heads = Vec::new();
    for (trainer, rng) in heads.drain(..) {
        if trainer.uses_host_path() {
            by_micro_batch
                .entry(trainer.plan.micro_batch)
                .or_default()
                .push((trainer, rng));
        } else {
            candle_heads.push((trainer, rng));
        }
    }
    // Per thread, the stacks it steps: (first layers, their heads).
    type Stack<'a, 'b> = (FirstLayers, Vec<(&'a mut HeadTrainer, &'b mut ChaCha8Rng)>);
    let mut work: Vec<Vec<Stack>> = Vec::new();
    for members in by_micro_batch.into_values() {
        let shapes: Vec<HeadShape> = members.iter().map(|(t, _)| HeadShape::of(t)).collect();
        let plan = plan_stacks(&shapes, rayon::current_num_threads());
        let mut members: Vec<Option<_>> = members.into_iter().map(Some).collect();
        for (thread, stacks) in plan.into_iter().enumerate() {
            if work.len() <= thread {
                work.push(Vec::new());
            }
            for stack in stacks {
                let mut heads: Vec<(&mut HeadTrainer, &mut ChaCha8Rng)> = stack
                    .iter()
                    .map(|&i| members[i].take().expect("each head is in one stack"))
                    .collect();
                let mut trainers: Vec<&mut HeadTrainer> =
                    heads.iter_mut().map(|(t, _)| &mut **t).collect();
                work[thread].push((lend_first_layers(&mut trainers)?, heads));
            }
        }
    }
    let stack_threads = if work.len() > 1 {
        Threads::Caller
    } else {
        Threads::Pool
    };
    // Candle heads run side by side, one per thread; a lone head gives its
    // matmuls the whole pool.
    let candle_threads = if candle_heads.len() > 1 {
        Threads::Caller
    } else {
        Threads::Pool
    };
    let mut values = Vec::new();
    for batch in order.chunks(stream.batch_size) {
        let rows: Vec<usize> = batch.iter().map(|&(r, _)| r).collect();
        let labels: Vec<usize> = batch.iter().map(|&(_, l)| l).collect();
        data.gather_into(&rows, &mut values);
        let tensor = if candle_heads.is_empty() {
            None
        } else {
            Some(Tensor::from_slice(
                &values,
                (rows.len(), dim),
                &options.device,
            )?)
        };
        let input = Batch {
            values: &values,
            dim,
            tensor: tensor.as_ref(),
        };
        work.par_iter_mut().with_max_len(1).try_for_each(|stacks| {
            stacks.iter_mut().try_for_each(|(first, members)| {
                train_stacked_batch(
                    first,
                    members,
                    &input,
                    &labels,
                    steps_per_epoch,
                    stack_threads,
                )
            })
        })?;
        candle_heads
            .par_iter_mut()
            .with_max_len(1)
            .try_for_each(|(trainer, rng)| {
                trainer.train_batch(&input, &labels, steps_per_epoch, rng, candle_threads)
            })?;
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    for (first, mut members) in work.into_iter().flatten() {
        let mut trainers: Vec<&mut HeadTrainer> =
            members.iter_mut().map(|(t, _)| &mut **t).collect();
        return_first_layers(first, &mut trainers)?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// Splits items of the given costs into at most `parts` groups of similar
/// total cost (largest first, each to the lightest group); groups keep
/// their items in input order.
fn balanced_parts(costs: &[usize], parts: usize) -> Vec<Vec<usize>> {
    let parts = parts.clamp(1, costs.len().max(1));
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(costs[i]));
    let mut groups: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); parts];
    for i in order {
        let lightest = groups
            .iter_mut()
            .min_by_key(|(total, _)| *total)
            .expect("at least one group");
        lightest.0 += costs[i];
        lightest.1.push(i);
    }
    groups
        .into_iter()
        .filter(|(_, items)| !items.is_empty())
        .map(|(_, mut items)| {
            items.sort_unstable();
            items
        })
        .collect()
}

/// Heads whose first layer has fewer outputs than this share a stack: a
/// narrow matmul (a 10-class linear head) runs far below gemm's peak, while
/// a wide one (an MLP's 256 hidden units) already runs near it and slows
/// down in a stack whose weights outgrow the cache (measured with faer, the
/// matmul before the kernels crate's, on this project's 2-core AVX-512
/// machine: 10 outputs 61 GFLOP/s, 256 outputs 158, 1,596 outputs 141, per
/// core).
const STACK_BELOW_OUTPUTS: usize = 128;

/// What `plan_stacks` needs of a head.
struct HeadShape {
    first_outputs: usize,
    parameters: usize,
}

impl HeadShape {
    fn of(trainer: &HeadTrainer) -> Self {
        HeadShape {
            first_outputs: trainer.config.head.layer_sizes(trainer.head.classes())[0],
            parameters: trainer.head.parameter_count(),
        }
    }
}

/// Per thread, the stacks of heads (indices into `shapes`) it runs: narrow
/// heads in one stack per thread, wide heads in a stack each, and the
/// stacks spread over the threads by size. Each thread runs its stacks
/// with sequential matmuls: side by side they beat a parallel split of one
/// matmul.
fn plan_stacks(shapes: &[HeadShape], threads: usize) -> Vec<Vec<Vec<usize>>> {
    let (narrow, wide): (Vec<usize>, Vec<usize>) =
        (0..shapes.len()).partition(|&i| shapes[i].first_outputs < STACK_BELOW_OUTPUTS);
    let narrow_costs: Vec<usize> = narrow.iter().map(|&i| shapes[i].parameters).collect();
    let mut stacks: Vec<Vec<usize>> = balanced_parts(&narrow_costs, threads)
        .into_iter()
        .map(|part| part.into_iter().map(|p| narrow[p]).collect())
        .collect();
    stacks.extend(wide.into_iter().map(|i| vec![i]));
    let costs: Vec<usize> = stacks
        .iter()
        .map(|stack| stack.iter().map(|&i| shapes[i].parameters).sum())
        .collect();
    balanced_parts(&costs, threads)
        .into_iter()
        .map(|part| {
            part.into_iter()
                .map(|s| std::mem::take(&mut stacks[s]))
                .collect()
        })
        .collect()
}

fn progress_bar(
    wanted: bool,
    steps: usize,
    stream: &EpochStream,
    trainers: &[HeadTrainer],
    members: &[usize],
) -> Option<indicatif::ProgressBar> {
    if !wanted || !std::io::stderr().is_terminal() {
        return None;
    }
    let epochs = members
        .iter()
        .map(|&i| trainers[i].config.epochs)
        .max()
        .unwrap_or(0);
    let heads = if members.len() == 1 {
        String::new()
    } else {
        format!(", {} heads", members.len())
    };
    Some(batch_bar(
        steps,
        format!(
            "epoch {}/{epochs} (seed {}{heads})",
            stream.epoch + 1,
            stream.seed
        ),
    ))
}

/// An epoch's progress bar of `steps` batches after `prefix` (callers draw
/// it only on a terminal).
pub(crate) fn batch_bar(steps: usize, prefix: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} batches {per_sec} ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Named metrics of one split and its confusion matrix.
pub(crate) struct Evaluation {
    pub(crate) metrics: BTreeMap<String, f64>,
    pub(crate) matrix: Vec<Vec<u64>>,
    /// Every output probability was finite (false: the head diverged).
    pub(crate) finite: bool,
}

/// Scores the given heads on one split; each chunk of rows is gathered once
/// for all of them. Evaluation runs in f32 on the master weights.
fn evaluate(
    data: &TrainData,
    split: &SplitRows,
    name: &str,
    trainers: &[HeadTrainer],
    members: &[usize],
    device: &Device,
) -> Result<Vec<Evaluation>, TrainError> {
    split_probabilities(data, split, trainers, members, device)?
        .par_iter()
        .map(|p| split_evaluation(data, split, name, p))
        .collect()
}

/// Named metrics and the confusion matrix of one head's probabilities on a split.
pub(crate) fn split_evaluation(
    data: &TrainData,
    split: &SplitRows,
    name: &str,
    probabilities: &[f32],
) -> Result<Evaluation, TrainError> {
    let predictions = Predictions {
        probabilities,
        labels: &split.labels,
        class_count: data.class_names.len(),
    };
    Ok(Evaluation {
        metrics: split_metrics(name, &predictions, &data.class_names)?,
        matrix: confusion_matrix(&predictions)?,
        finite: probabilities.iter().all(|v| v.is_finite()),
    })
}

/// ROC and precision-recall curves of a binary head (the second class is
/// the positive one); `None` for other heads.
pub(crate) fn binary_curves(
    data: &TrainData,
    split: &SplitRows,
    name: &str,
    probabilities: &[f32],
) -> Option<SplitCurves> {
    if data.class_names.len() != 2 {
        return None;
    }
    let scores: Vec<f64> = probabilities
        .chunks_exact(2)
        .map(|row| row[1] as f64)
        .collect();
    let positives: Vec<bool> = split.labels.iter().map(|&label| label == 1).collect();
    Some(super::metrics::split_curves(name, &scores, &positives))
}

/// Probability rows (`[rows, classes]`, row-major) of each member head on a split.
fn split_probabilities(
    data: &TrainData,
    split: &SplitRows,
    trainers: &[HeadTrainer],
    members: &[usize],
    device: &Device,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let dim = data.features.feature_dim();
    let classes = data.class_names.len();
    let mut hosts = members
        .iter()
        .map(|&i| trainers[i].evaluation_head())
        .collect::<Result<Vec<_>, _>>()?;
    // Host heads' first layers stacked as in training.
    let host_positions: Vec<usize> = (0..hosts.len()).filter(|&m| hosts[m].is_some()).collect();
    let shapes: Vec<HeadShape> = host_positions
        .iter()
        .map(|&m| HeadShape::of(&trainers[members[m]]))
        .collect();
    let mut work: Vec<Vec<(FirstLayers, Vec<usize>)>> =
        plan_stacks(&shapes, rayon::current_num_threads())
            .into_iter()
            .map(|stacks| {
                stacks
                    .into_iter()
                    .map(|stack| {
                        let positions: Vec<usize> =
                            stack.iter().map(|&p| host_positions[p]).collect();
                        let first = FirstLayers::of_heads(
                            hosts
                                .iter_mut()
                                .enumerate()
                                .filter(|(m, _)| positions.contains(m))
                                .filter_map(|(_, h)| h.as_mut()),
                        );
                        (first, positions)
                    })
                    .collect()
            })
            .collect();
    let stack_threads = if work.len() > 1 {
        Threads::Caller
    } else {
        Threads::Pool
    };
    let candle_members: Vec<usize> = (0..hosts.len()).filter(|&m| hosts[m].is_none()).collect();
    // Every view of each image; each head then keeps the mean over its
    // views or its first (`eval_views`), so metrics count images, not rows.
    let rows = super::data::view_rows(&split.rows, data.views);
    let mut probabilities: Vec<Vec<f32>> =
        vec![Vec::with_capacity(rows.len() * classes); members.len()];
    let mut values = Vec::new();
    for rows in rows.chunks(EVAL_ROWS) {
        data.gather_into(rows, &mut values);
        let values = &values;
        let hosts = &hosts;
        let mut chunk: Vec<(usize, Vec<f32>)> = work
            .par_iter_mut()
            .with_max_len(1)
            .flat_map_iter(|stacks| {
                let mut out = Vec::new();
                for (first, positions) in stacks.iter_mut() {
                    first.forward(values, rows.len(), stack_threads);
                    for (h, &m) in positions.iter().enumerate() {
                        let host = hosts[m].as_ref().expect("stacked heads are host heads");
                        let mut p = host.logits_after_first(first.block(h), stack_threads);
                        softmax_rows(&mut p, classes);
                        out.push((m, p));
                    }
                }
                out
            })
            .collect();
        if !candle_members.is_empty() {
            let x = Tensor::from_slice(values, (rows.len(), dim), device)?;
            for &m in &candle_members {
                let logits = trainers[members[m]].head.forward(&x, DType::F32, None)?;
                let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
                chunk.push((m, p.flatten_all()?.to_vec1::<f32>()?));
            }
        }
        for (m, p) in chunk {
            probabilities[m].extend(p);
        }
    }
    if data.views > 1 {
        for (m, p) in probabilities.iter_mut().enumerate() {
            let used = trainers[members[m]].config.eval_views.rows_used(data.views);
            *p = super::data::average_views(p, classes, data.views, used)
                .into_iter()
                .map(|v| v as f32)
                .collect();
        }
    }
    Ok(probabilities)
}

/// Peak resident set size of this process (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What a run folder records about its inputs (`config.json`): enough to
/// resume it or to use its head on new features.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInputs {
    pub dataset: String,
    /// The manifest version the run trains on (`--resume` reads it again).
    #[serde(default = "first_version")]
    pub dataset_version: u32,
    /// Images of that version without features (`--allow-partial` runs).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub images_lacking: usize,
    pub fingerprint: String,
    pub encoder: Option<String>,
    pub class_names: Vec<String>,
    pub config_hash: String,
    pub config: TrainConfig,
    /// How pooled features were computed (`enqueue --layers`,
    /// `--image-size`, `--resize`); absent for spatial features and in runs
    /// recorded before those options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled: Option<PooledInputs>,
    /// What `--blocks-precision auto` took at the start of a fine-tuned
    /// run, which `--resume` repeats; absent for a fixed precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_precision: Option<super::auto_precision::ChosenPrecision>,
}

/// The extraction options of a pooled feature folder, recorded as the
/// run's params `layers`, `image_size` and `resize` (ablation axes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PooledInputs {
    /// Canonical, as `enqueue --layers` names them (`last`, `1,...,7,head`).
    pub layers: String,
    pub image_size: u32,
    /// `crop`, `stretch` or `pad`.
    pub resize: String,
    /// Views per image (`enqueue --views`: `1`, `flips`, `dihedral`;
    /// absent in runs recorded before it: `1`).
    #[serde(default = "single_view")]
    pub views: String,
}

fn single_view() -> String {
    "1".to_string()
}

impl PooledInputs {
    /// What a pooled folder's shard metadata says; None for spatial
    /// folders or metadata without a readable `preprocess`.
    pub fn of(features: &crate::features::FeatureSet) -> Option<Self> {
        if !features.maps().is_empty() {
            return None;
        }
        let metadata = features.metadata();
        let (layers, input) = crate::features::recorded_options(
            metadata.get("layers").map(String::as_str),
            metadata.get("preprocess").map(String::as_str),
        );
        let (image_size, resize) = input?;
        Some(PooledInputs {
            layers,
            image_size,
            resize: resize.into(),
            views: metadata.get("views").cloned().unwrap_or_else(single_view),
        })
    }
}

/// `config.json` (`experiments::run_files::INPUTS_FILE`).
pub const RUN_INPUTS_FILE: &str = crate::experiments::run_files::INPUTS_FILE;

fn first_version() -> u32 {
    1
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

/// Writes `config.json` at the start of a run, so a killed run can be resumed.
pub fn write_run_inputs(run_dir: &Path, inputs: &RunInputs) -> Result<(), TrainError> {
    let json = serde_json::to_vec_pretty(inputs).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let path = RunFolder::new(run_dir).inputs();
    crate::atomic::write_file(&path, &json).map_err(TrainError::io(&path))?;
    Ok(())
}

pub fn read_run_inputs(run_dir: &Path) -> Result<RunInputs, TrainError> {
    let path = RunFolder::new(run_dir).inputs();
    let bytes = std::fs::read(&path)
        .map_err(|e| TrainError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::Checkpoint(format!("{} is not a run config: {e}", path.display())))
}

/// The head file: layers, the standardisation `input` it was trained with,
/// and `data`'s class names and feature fingerprint as metadata.
fn head_file_bytes(
    data: &TrainData,
    input: Standardisation<'_>,
    trainer: &HeadTrainer,
    best: bool,
) -> Result<Vec<u8>, TrainError> {
    let device = Device::Cpu;
    let mut tensors = vec![
        (
            "input_mean".to_string(),
            Tensor::from_slice(input.mean, input.mean.len(), &device)?,
        ),
        (
            "input_std".to_string(),
            Tensor::from_slice(input.std, input.std.len(), &device)?,
        ),
    ];
    tensors.extend(trainer.head_tensors(best));
    let metadata = HashMap::from([
        (
            "class_names".to_string(),
            serde_json::to_string(&data.class_names).expect("strings serialise"),
        ),
        ("fingerprint".to_string(), data.fingerprint.clone()),
        ("head".to_string(), trainer.config.head.name().to_string()),
    ]);
    checkpoint::safetensors_bytes(&tensors, Some(metadata))
}

pub(crate) fn write_run(
    dir: &Path,
    report: &RunReport,
    data: &TrainData,
    input: Standardisation<'_>,
    trainer: &HeadTrainer,
) -> Result<(), TrainError> {
    let json = serde_json::to_vec_pretty(report).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let folder = RunFolder::new(dir);
    let path = folder.metrics();
    crate::atomic::write_file(&path, &json).map_err(TrainError::io(&path))?;
    // restore_best already put the kept head in place.
    let path = folder.head();
    crate::atomic::write_file(&path, &head_file_bytes(data, input, trainer, false)?)
        .map_err(TrainError::io(&path))?;
    Ok(())
}

/// The inputs record of a run about to train `config` on `data`.
pub fn run_inputs(data: &TrainData, config: &TrainConfig) -> RunInputs {
    RunInputs {
        dataset: data.dataset_name.clone(),
        dataset_version: data.dataset_version,
        images_lacking: data.images_lacking,
        fingerprint: data.fingerprint.clone(),
        encoder: data.features.metadata().get("encoder").cloned(),
        class_names: data.class_names.clone(),
        config_hash: config.config_hash_at(
            &data.dataset_name,
            data.dataset_version,
            &data.fingerprint,
        ),
        config: config.clone(),
        pooled: PooledInputs::of(&data.features),
        blocks_precision: None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn drawn_views_depend_on_seed_epoch_and_image_only_and_cover_every_view() {
        use super::drawn_view;
        // First draws as before occurrences existed (values of 00bbb29's
        // drawn_view, recomputed with a Python SplitMix64): runs without
        // repeated images draw exactly what they drew.
        let pinned: Vec<usize> = (0..10).map(|image| drawn_view(7, 3, image, 0, 8)).collect();
        assert_eq!(pinned, [1, 1, 1, 4, 2, 7, 4, 3, 2, 2]);
        let pinned: Vec<usize> = (0..10)
            .map(|image| drawn_view(11, 0, image, 0, 4))
            .collect();
        assert_eq!(pinned, [3, 0, 0, 2, 2, 2, 2, 1, 1, 3]);
        // An image drawn again in the same epoch (balanced sampling) gets
        // views of its own: 16 draws of one image see most of the 8 views.
        let repeated: std::collections::BTreeSet<usize> = (0..16)
            .map(|occurrence| drawn_view(7, 3, 5, occurrence, 8))
            .collect();
        assert!(repeated.len() >= 5, "16 draws saw only views {repeated:?}");
        // One view: always view 0.
        assert!((0..100).all(|image| drawn_view(7, 3, image, 0, 1) == 0));
        for views in [4, 8] {
            let draws: Vec<usize> = (0..400)
                .map(|image| drawn_view(7, 3, image, 0, views))
                .collect();
            // The same (seed, epoch, image) draws the same view, whatever
            // else was drawn (a resumed run, another batch order).
            assert_eq!(draws[123], drawn_view(7, 3, 123, 0, views));
            // Every view is drawn, about equally often (400 / views each;
            // binomial spread is about sqrt(400 / views)).
            for view in 0..views {
                let count = draws.iter().filter(|&&d| d == view).count();
                let expected = 400 / views;
                assert!(
                    count.abs_diff(expected) < expected / 2,
                    "view {view}: {count}"
                );
            }
            // Another epoch or seed draws otherwise.
            let other_epoch: Vec<usize> = (0..400)
                .map(|image| drawn_view(7, 4, image, 0, views))
                .collect();
            let other_seed: Vec<usize> = (0..400)
                .map(|image| drawn_view(8, 3, image, 0, views))
                .collect();
            assert_ne!(draws, other_epoch);
            assert_ne!(draws, other_seed);
        }
    }

    #[test]
    fn views_average_per_image_in_view_order() {
        use crate::train::data::{average_views, view_rows};
        assert_eq!(view_rows(&[0, 8], 4), [0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(view_rows(&[5], 1), [5]);
        // Two images of 2 views of 2 classes.
        let p = [0.2f32, 0.8, 0.6, 0.4, 1.0, 0.0, 0.5, 0.5];
        let mean = average_views(&p, 2, 2, 2);
        let expected = [0.4, 0.6, 0.75, 0.25];
        for (a, b) in mean.iter().zip(expected) {
            assert!((a - b).abs() < 1e-7, "{mean:?}");
        }
        // `first`: view 0 alone.
        assert_eq!(
            average_views(&p, 2, 2, 1),
            [0.2f32 as f64, 0.8f32 as f64, 1.0, 0.0]
        );
    }

    use super::*;

    /// The issue-8 grid per seed: 6 linear heads (1,280 x 10) and 6 MLPs
    /// (1,280 x 256 x 10) on 2 threads.
    #[test]
    fn narrow_heads_share_stacks_and_wide_heads_spread_over_threads() {
        let linear = || HeadShape {
            first_outputs: 10,
            parameters: 1280 * 10 + 10,
        };
        let mlp = || HeadShape {
            first_outputs: 256,
            parameters: 1280 * 256 + 256 + 256 * 10 + 10,
        };
        let shapes: Vec<HeadShape> = (0..12)
            .map(|i| if i % 2 == 0 { linear() } else { mlp() })
            .collect();
        let plan = plan_stacks(&shapes, 2);
        assert_eq!(plan.len(), 2);
        for stacks in &plan {
            // Three MLPs alone and one stack of three linear heads per thread.
            let mut sizes: Vec<usize> = stacks.iter().map(Vec::len).collect();
            sizes.sort_unstable();
            assert_eq!(sizes, [1, 1, 1, 3], "{plan:?}");
            for stack in stacks {
                let narrow = stack.iter().all(|&i| i % 2 == 0);
                assert!(narrow || stack.len() == 1, "{plan:?}");
            }
        }
        let mut every: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
        every.sort_unstable();
        assert_eq!(every, (0..12).collect::<Vec<_>>());
        // One thread: everything on it; one head: one stack.
        assert_eq!(plan_stacks(&shapes, 1).len(), 1);
        assert_eq!(plan_stacks(&shapes[..1], 2), vec![vec![vec![0]]]);
    }
}
