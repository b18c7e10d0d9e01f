//! Partial fine-tuning (issue 22) as a library trainer: a classification
//! head trained together with an EfficientNet-Lite's top blocks
//! (`blocks::TopBlocks`) on a spatial folder whose stride-16 map is the
//! output of the block the trainable blocks follow.
//!
//! Each step gathers the batch's cached maps (f16 `[C, H, W]` rows, turned
//! channels-last once), runs the blocks and the head convolution, mean-pools,
//! standardises with the training split's statistics of the folder's pooled
//! rows (the pretrained blocks' own output, kept fixed so the head's inputs
//! keep their scale while the blocks move), and applies the head. The head is
//! `host`'s f32 step (linear or MLP, AdamW); its input gradient flows back
//! into the blocks, updated by their own AdamW with their own rate and decay.
//! Both rates warm up linearly, then follow a cosine.

use faer::Accum;
use rand::seq::SliceRandom;

use super::TrainError;
use super::blocks::{
    BlockGradients, BlocksOptimizer, BlocksStep, InputGradient, MapSize, TopBlocks,
    append_channels_last,
};
use super::config::{HeadConfig, Optimizer};
use super::data::{SplitRows, TrainData};
use super::head::Head;
use super::host::{
    FirstLayers, HostHead, HostTrainer, Product, Threads, UpdateStep, row_major, softmax_rows,
};
use super::metrics::{Predictions, split_metrics};
use super::run::{data_order_stream, dropout_stream, seeded};
use super::schedule::Schedule;
use crate::encoders::efficientnet_lite::EfficientNetLite;

/// The stride of the cached map the trainable blocks read.
pub const FINETUNE_STRIDE: usize = 16;

/// What a fine-tuning run trains and how.
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    /// The blocks after this one are trained (`--unfreeze-from K`); it must
    /// be the block whose output is the folder's stride-16 map.
    pub after_block: usize,
    pub head: HeadConfig,
    pub epochs: usize,
    pub batch_size: usize,
    /// The head's AdamW rate and decoupled weight decay.
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// The blocks' AdamW rate and decoupled weight decay.
    pub blocks_learning_rate: f64,
    pub blocks_weight_decay: f64,
    /// Linear warm-up of both rates over this many steps, then a cosine.
    pub warmup_steps: usize,
    pub seed: u64,
}

/// One finished epoch.
#[derive(Debug, Clone)]
pub struct FinetuneEpoch {
    pub epoch: usize,
    /// Mean training cross-entropy over the epoch's batches.
    pub train_loss: f64,
    pub val_accuracy: f64,
    pub val_macro_f1: f64,
    /// Wall-clock seconds of the epoch's training steps and its validation.
    pub seconds: f64,
}

/// A finished fine-tuning: the epochs, the best epoch by validation
/// accuracy, and the test metrics of the blocks and head of that epoch.
#[derive(Debug)]
pub struct FinetuneReport {
    pub epochs: Vec<FinetuneEpoch>,
    pub best_epoch: usize,
    pub test_accuracy: f64,
    pub test_macro_f1: f64,
    pub blocks: TopBlocks,
}

/// The encoder whose blocks are fine-tuned, and what identifies it in a
/// feature folder's metadata: the folder's maps must come from the same
/// weights, or the blocks would continue another network.
#[derive(Clone, Copy)]
pub struct FinetuneEncoder<'a> {
    pub model: &'a EfficientNetLite,
    /// The registry name (`efficientnet-lite0`).
    pub name: &'a str,
    /// sha256 (hex) of the weights file the model was built from.
    pub weights_sha256: &'a str,
}

/// Index (into `FeatureSet::maps`) of the map the blocks after
/// `after_block` read, after checking the folder and the block: made by
/// `encoder`'s weights, the map of stride 16, which is block
/// `encoder.map_block_index(16)`'s output, one row per image (no views, no
/// tiles).
pub fn check_folder(
    data: &TrainData,
    encoder: FinetuneEncoder,
    after_block: usize,
) -> Result<usize, TrainError> {
    let features = &data.features;
    let folder = features.dir().display();
    let maps = features.recorded_maps();
    let recorded = |key: &str| {
        features
            .metadata()
            .get(key)
            .map_or("nothing", String::as_str)
    };
    let weights = format!("sha256:{}", encoder.weights_sha256);
    if recorded("encoder") != encoder.name || recorded("weights") != weights {
        return Err(TrainError::Invalid(format!(
            "folder {folder} was extracted by {} with weights {}; the blocks to fine-tune \
             are {} with weights {weights}",
            recorded("encoder"),
            recorded("weights"),
            encoder.name
        )));
    }
    let encoder = encoder.model;
    let cached_block = encoder.map_block_index(FINETUNE_STRIDE)?;
    if after_block != cached_block {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} caches the maps {maps}; the \
             blocks after block K are trained from the cached output of block K, and the \
             stride-16 map is block {cached_block}'s output, so K must be {cached_block}"
        )));
    }
    let Some(index) = features
        .maps()
        .iter()
        .position(|shape| shape.stride == FINETUNE_STRIDE)
    else {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} holds the maps {maps}, not the \
             stride-16 map (block {after_block}'s output); extract it with enqueue \
             --spatial --maps 16"
        )));
    };
    if data.views != 1 {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} holds {} views per image; \
             fine-tuning reads one map per image",
            data.views
        )));
    }
    let indices = features.image_indices();
    if let Some(pair) = indices.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(TrainError::Invalid(format!(
            "--unfreeze-from {after_block}: folder {folder} cut image {} into several tiles; \
             fine-tuning classifies one map per image (images up to the tile size)",
            pair[0]
        )));
    }
    Ok(index)
}

/// Gathers the maps of `rows` channels-last (`[rows, h, w, c]`, f32).
fn gather_maps(data: &TrainData, map: usize, rows: &[usize]) -> (Vec<f32>, MapSize) {
    let shape = data.features.maps()[map];
    let size = MapSize {
        height: shape.height,
        width: shape.width,
    };
    let mut input = Vec::with_capacity(rows.len() * shape.channels * size.pixels());
    for &row in rows {
        append_channels_last(
            data.features.map(row, map),
            shape.channels,
            size,
            &mut input,
        );
    }
    data.features.enforce_resident_limit();
    (input, size)
}

/// The head's input: pooled features standardised with the folder's
/// training statistics.
fn standardise(pooled: &mut [f32], data: &TrainData) {
    for row in pooled.chunks_exact_mut(data.mean.len()) {
        for ((v, mean), std) in row.iter_mut().zip(&data.mean).zip(&data.std) {
            *v = (*v - mean) / std;
        }
    }
}

/// Blocks and a head with its weights in place, for evaluation.
#[derive(Clone)]
struct Snapshot {
    blocks: TopBlocks,
    head: HostHead,
}

impl Snapshot {
    /// Class probabilities of `rows` (no dropout), in batches.
    fn probabilities(
        &self,
        data: &TrainData,
        map: usize,
        rows: &[usize],
        batch_size: usize,
    ) -> Result<Vec<f32>, TrainError> {
        let classes = data.class_names.len();
        let mut out = Vec::with_capacity(rows.len() * classes);
        for batch in rows.chunks(batch_size) {
            let (input, size) = gather_maps(data, map, batch);
            let mut pooled = self.blocks.forward(input, batch.len(), size)?.into_pooled();
            standardise(&mut pooled, data);
            let mut logits = self.head.logits(&pooled, batch.len(), Threads::Pool);
            softmax_rows(&mut logits, classes);
            out.extend(logits);
        }
        Ok(out)
    }

    /// Accuracy and macro-F1 of a split.
    fn score(
        &self,
        data: &TrainData,
        map: usize,
        (name, rows): (&str, &SplitRows),
        batch_size: usize,
    ) -> Result<(f64, f64), TrainError> {
        let probabilities = self.probabilities(data, map, &rows.rows, batch_size)?;
        let metrics = split_metrics(
            name,
            &Predictions {
                probabilities: &probabilities,
                labels: &rows.labels,
                class_count: data.class_names.len(),
            },
            &data.class_names,
        )?;
        Ok((
            metrics[&format!("{name}/accuracy")],
            metrics[&format!("{name}/macro_f1")],
        ))
    }
}

/// Mean cross-entropy of a batch from its first-layer product, without dropout.
fn batch_loss(head: &HostHead, product: &[f32], labels: &[usize], classes: usize) -> f64 {
    let mut probabilities = head.logits_after_first(product.to_vec(), Threads::Pool);
    softmax_rows(&mut probabilities, classes);
    let total: f64 = probabilities
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &label)| -f64::from(row[label].max(1e-12)).ln())
        .sum();
    total / labels.len() as f64
}

fn validate(config: &FinetuneConfig) -> Result<(), TrainError> {
    let rates = [
        ("learning rate", config.learning_rate),
        ("blocks learning rate", config.blocks_learning_rate),
    ];
    for (name, rate) in rates {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(TrainError::Invalid(format!(
                "{name} {rate} must be positive"
            )));
        }
    }
    let decays = [
        ("weight decay", config.weight_decay),
        ("blocks weight decay", config.blocks_weight_decay),
    ];
    for (name, decay) in decays {
        if !(decay.is_finite() && decay >= 0.0) {
            return Err(TrainError::Invalid(format!(
                "{name} {decay} must be zero or more"
            )));
        }
    }
    if config.epochs == 0 || config.batch_size == 0 {
        return Err(TrainError::Invalid(format!(
            "{} epochs of batches of {}: both must be at least 1",
            config.epochs, config.batch_size
        )));
    }
    Ok(())
}

/// Trains `config.head` together with the blocks after `config.after_block`
/// of `encoder` on `data` (a spatial folder, see `check_folder`), keeps the
/// epoch with the best validation accuracy and scores it on the test split.
pub fn fit(
    data: &TrainData,
    encoder: FinetuneEncoder,
    config: &FinetuneConfig,
) -> Result<FinetuneReport, TrainError> {
    validate(config)?;
    let map = check_folder(data, encoder, config.after_block)?;
    let blocks = TopBlocks::from_encoder(encoder.model, config.after_block)?;
    let map_channels = data.features.maps()[map].channels;
    if map_channels != blocks.in_channels() {
        return Err(TrainError::Invalid(format!(
            "folder {}: its stride-16 map has {map_channels} channels; block {} reads {}",
            data.features.dir().display(),
            config.after_block + 1,
            blocks.in_channels()
        )));
    }
    if blocks.feature_dim() != data.features.feature_dim() {
        return Err(TrainError::Invalid(format!(
            "folder {} holds {} pooled features per row; the head convolution after block {} \
             gives {}",
            data.features.dir().display(),
            data.features.feature_dim(),
            config.after_block,
            blocks.feature_dim()
        )));
    }
    let classes = data.class_names.len();
    let device = candle_core::Device::Cpu;
    let head = Head::new(
        &config.head,
        blocks.feature_dim(),
        classes,
        config.seed,
        &device,
    )?;
    let zeros: Vec<candle_core::Tensor> = head
        .parameters()
        .iter()
        .map(|p| p.as_tensor().zeros_like())
        .collect::<Result<_, _>>()?;
    let mut host = HostTrainer::load(&head, &config.head, &zeros, &zeros)?;
    let mut first = FirstLayers::lend(&mut [&mut host]);
    let mut blocks = blocks;
    let features = blocks.feature_dim();
    let mut block_gradients: BlockGradients = blocks.zero_gradients();
    let mut blocks_optimizer = BlocksOptimizer::new(&blocks);
    let schedule = Schedule::Cosine {
        warmup_steps: config.warmup_steps,
    };
    let steps_per_epoch = data.train.rows.len().div_ceil(config.batch_size);
    let total_steps = steps_per_epoch * config.epochs;
    let mut step = 0usize;
    let mut epochs = Vec::with_capacity(config.epochs);
    let mut best: Option<(f64, usize, Snapshot)> = None;
    for epoch in 0..config.epochs {
        let mut order: Vec<usize> = (0..data.train.rows.len()).collect();
        order.shuffle(&mut seeded(config.seed, data_order_stream(epoch)));
        let mut dropout_rng = seeded(config.seed, dropout_stream(epoch));
        let mut loss_sum = 0f64;
        let started = std::time::Instant::now();
        for batch in order.chunks(config.batch_size) {
            let rows: Vec<usize> = batch.iter().map(|&i| data.train.rows[i]).collect();
            let labels: Vec<usize> = batch.iter().map(|&i| data.train.labels[i]).collect();
            let n = rows.len();
            let (input, size) = gather_maps(data, map, &rows);
            let forward = blocks.forward(input, n, size)?;
            let mut x = forward.pooled().to_vec();
            standardise(&mut x, data);
            first.forward(&x, n, Threads::Pool);
            let product = first.block(0);
            loss_sum += batch_loss(&host.head, &product, &labels, classes);
            let mut targets = vec![0f32; n * classes];
            for (row, &label) in targets.chunks_exact_mut(classes).zip(&labels) {
                row[label] = 1.0;
            }
            host.zero_gradients();
            first.zero_gradients();
            let delta = host.accumulate_after_first(
                product,
                &targets,
                1.0 / n as f32,
                &mut dropout_rng,
                Threads::Pool,
            );
            first.accumulate(std::slice::from_ref(&delta), &x, n, Threads::Pool);
            // d loss / d pooled = (delta W1) / std: back through the first
            // layer and the standardisation.
            let outputs = delta.len() / n;
            let mut pooled_gradient = vec![0f32; n * features];
            Product {
                a: row_major(&delta, n, outputs),
                b: row_major(first.split_mut()[0].weight, outputs, features),
            }
            .into(&mut pooled_gradient, Accum::Replace, Threads::Pool);
            for row in pooled_gradient.chunks_exact_mut(features) {
                for (g, std) in row.iter_mut().zip(&data.std) {
                    *g /= std;
                }
            }
            block_gradients.zero();
            blocks.backward(
                &forward,
                &pooled_gradient,
                &mut block_gradients,
                InputGradient::Skip,
            )?;
            drop(forward);
            let head_lr = schedule.learning_rate(config.learning_rate, step, total_steps, epoch);
            let blocks_lr =
                schedule.learning_rate(config.blocks_learning_rate, step, total_steps, epoch);
            step += 1;
            host.update(
                first.split_mut().remove(0),
                UpdateStep {
                    optimizer: Optimizer::AdamW,
                    lr: head_lr,
                    weight_decay: config.weight_decay,
                    updates: step as i32,
                    scale: 1.0,
                },
            );
            blocks_optimizer.update(
                &mut blocks,
                &block_gradients,
                BlocksStep {
                    lr: blocks_lr,
                    weight_decay: config.blocks_weight_decay,
                    scale: 1.0,
                },
            );
        }
        let mut head = host.head.clone();
        head.layers[0].weight = first.split_mut()[0].weight.to_vec();
        let snapshot = Snapshot {
            blocks: blocks.clone(),
            head,
        };
        let (val_accuracy, val_macro_f1) =
            snapshot.score(data, map, ("val", &data.val), config.batch_size)?;
        epochs.push(FinetuneEpoch {
            epoch,
            train_loss: loss_sum / steps_per_epoch as f64,
            val_accuracy,
            val_macro_f1,
            seconds: started.elapsed().as_secs_f64(),
        });
        if best
            .as_ref()
            .is_none_or(|(score, ..)| val_accuracy > *score)
        {
            best = Some((val_accuracy, epoch, snapshot));
        }
    }
    let (_, best_epoch, best) = best.expect("at least one epoch");
    let (test_accuracy, test_macro_f1) =
        best.score(data, map, ("test", &data.test), config.batch_size)?;
    Ok(FinetuneReport {
        epochs,
        best_epoch,
        test_accuracy,
        test_macro_f1,
        blocks: best.blocks,
    })
}
