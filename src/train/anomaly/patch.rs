//! Patch-level anomaly scoring on spatial features (`train --task anomaly
//! --spatial`), as PatchCore and PaDiM do it.
//!
//! A patch is one position of the finest map (stride 16 for Lite0), its
//! features the finest map's channels with every coarser map bilinearly
//! upsampled to that grid and concatenated (`spatial::grid::Geometry`, as
//! segmentation heads read them), optionally a seeded random subset of the
//! channels (PaDiM), standardised per channel over the normal training
//! patches.
//!
//! - `knn` (PatchCore): a memory bank of the normal training patches (greedy
//!   k-center coreset optional); a patch scores the mean distance to its `k`
//!   nearest bank patches.
//! - `mahalanobis` (PaDiM): one Ledoit-Wolf Gaussian per grid position over
//!   the normal training tiles; a patch scores its Mahalanobis distance.
//!
//! An image scores the largest patch score of its tiles. Its heat map is the
//! patch scores upsampled bilinearly to each tile's pixels, averaged where
//! tiles overlap (`spatial::stitch::Stitcher`), then Gaussian-smoothed.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::scorer::{Gaussian, MemoryBank, QUERY_BLOCK, Standardiser, gaussian_fit_bytes};
use super::{MemoryPlan, Scorer};
use crate::features::{FeatureSet, MapShape};
use crate::spatial::grid::Geometry;
use crate::spatial::stitch::Stitcher;
use crate::spatial::tile::TileConfig;
use crate::train::TrainError;

/// Neighbours of a patch's k-NN score unless `--k` says otherwise
/// (PatchCore scores a patch by its nearest bank patch).
pub const DEFAULT_PATCH_K: usize = 1;
/// Channels PaDiM keeps by default (its choice for ResNet-18's 448).
pub const DEFAULT_GAUSSIAN_CHANNELS: usize = 100;
/// Heat-map smoothing, sigma in image pixels (PatchCore smooths with 4).
pub const DEFAULT_HEATMAP_SIGMA: f64 = 4.0;
/// Channels kept unless asked otherwise: all for k-NN (PatchCore keeps
/// every channel), PaDiM's 100 for the per-position Gaussians (a Gaussian
/// of all 1392 Lite0 channels per position costs minutes to fit).
pub fn default_channels(scorer: &Scorer) -> Option<usize> {
    match scorer {
        Scorer::Knn { .. } => None,
        Scorer::Mahalanobis => Some(DEFAULT_GAUSSIAN_CHANNELS),
    }
}

/// Tiles whose maps are gathered and scored together.
const TILE_BATCH: usize = 32;
/// RNG stream of the channel subset (the coreset uses the seed itself).
const CHANNEL_STREAM: u64 = 11;

/// How patch features are built and heat maps drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchConfig {
    /// Keep a seeded random subset of this many channels; None: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Gaussian smoothing of heat maps, sigma in image pixels (0: none).
    pub heatmap_sigma: f64,
}

impl PatchConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.channels == Some(0) {
            return Err(TrainError::Invalid("channels must be at least 1".into()));
        }
        if !(self.heatmap_sigma.is_finite() && self.heatmap_sigma >= 0.0) {
            return Err(TrainError::Invalid(format!(
                "heat-map sigma {} must be zero or positive",
                self.heatmap_sigma
            )));
        }
        Ok(())
    }
}

/// What turns maps into patch features and patch scores into heat maps
/// (scorer file metadata `patch`, as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchInfo {
    pub encoder: String,
    pub weights: Option<String>,
    /// [stride, channels, height, width] of each map, finest first.
    pub maps: Vec<[usize; 4]>,
    pub tiling: Option<TileConfig>,
    /// Channels of the concatenated maps that patches keep, ascending.
    pub channel_index: Vec<usize>,
    pub heatmap_sigma: f64,
    /// Patch scores at the two ends of the heat maps' colour scale: the
    /// lowest validation patch score and the highest validation image score.
    pub heat_range: [f64; 2],
}

/// Maps to raw patch rows: the segmentation geometry without
/// standardisation, then the kept channels.
pub struct PatchGeometry {
    geometry: Geometry,
    channel_index: Tensor,
    dim: usize,
}

impl PatchGeometry {
    pub fn new(
        maps: Vec<MapShape>,
        channel_index: &[usize],
        device: &Device,
    ) -> Result<Self, TrainError> {
        let channels: usize = maps.iter().map(|m| m.channels).sum();
        let geometry = Geometry::new(maps, &vec![0.0; channels], &vec![1.0; channels], device)?;
        let index: Vec<u32> = channel_index.iter().map(|&c| c as u32).collect();
        Ok(PatchGeometry {
            geometry,
            channel_index: Tensor::from_vec(index, channel_index.len(), device)?,
            dim: channel_index.len(),
        })
    }

    /// Patches per tile (finest grid cells).
    pub fn positions(&self) -> usize {
        self.geometry.grid.0 * self.geometry.grid.1
    }

    pub fn grid(&self) -> (usize, usize) {
        self.geometry.grid
    }

    /// Raw patch rows of a batch of tiles' maps ([n, c, h, w] each):
    /// [n * positions, dim], tile by tile, row-major over the grid.
    pub fn rows(&self, maps: &[Tensor]) -> Result<Vec<f32>, TrainError> {
        let positions = self.geometry.positions(maps)?;
        Ok(positions
            .index_select(&self.channel_index, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// Raw patch rows of cached feature rows (tiles).
    pub fn cached_rows(
        &self,
        features: &FeatureSet,
        rows: &[usize],
        device: &Device,
    ) -> Result<Vec<f32>, TrainError> {
        let maps = crate::spatial::map_tensors(features, rows, device)?;
        let out = self.rows(&maps)?;
        features.enforce_resident_limit();
        Ok(out)
    }
}

/// The fitted patch model.
enum PatchFitted {
    Knn {
        bank: MemoryBank,
        k: usize,
    },
    /// One per grid position.
    Gaussians(Vec<Gaussian>),
}

/// A fitted patch scorer: features, standardisation and model.
pub struct PatchScorer {
    pub info: PatchInfo,
    geometry: PatchGeometry,
    standardiser: Standardiser,
    fitted: PatchFitted,
}

/// The named tensors of `scorer.safetensors` and its string metadata.
pub type ScorerFile = (Vec<(String, Tensor)>, HashMap<String, String>);

/// One scored image: its score (largest patch score) and each tile's patch
/// scores on the grid.
#[derive(Debug, Clone)]
pub struct ScoredImage {
    pub score: f64,
    pub tiles: Vec<([u32; 4], Vec<f32>)>,
}

/// What fitting counted, for the run's metrics.
pub struct PatchFitStats {
    /// Normal training patches (tiles x positions).
    pub patches: usize,
    pub channels: usize,
    /// Mean Ledoit-Wolf shrinkage over the positions (Mahalanobis).
    pub mean_shrinkage: Option<f64>,
}

/// The tile rows of the image whose first row is `first`.
pub fn image_tile_rows(features: &FeatureSet, first: usize) -> std::ops::Range<usize> {
    let indices = features.image_indices();
    let image = indices[first];
    let end = indices[first..]
        .iter()
        .position(|&i| i != image)
        .map_or(indices.len(), |n| first + n);
    first..end
}

/// The seeded channel subset: `count` channels of the concatenated maps
/// (`map_channels` each, finest first), ascending; all of them when `count`
/// is None. The count is shared equally between the maps (a map with fewer
/// channels than its share gives the rest to the others), then each map's
/// channels are drawn at random: a uniform draw over Lite0's 112 + 1280
/// channels would keep almost only the coarse stride-32 map and lose the
/// localisation the stride-16 map gives.
fn channel_subset(
    map_channels: &[usize],
    count: Option<usize>,
    seed: u64,
) -> Result<Vec<usize>, TrainError> {
    let total: usize = map_channels.iter().sum();
    let Some(count) = count else {
        return Ok((0..total).collect());
    };
    if count > total {
        return Err(TrainError::Invalid(format!(
            "channels = {count} is more than the {total} channels of the concatenated maps"
        )));
    }
    // Shares: maps in order of size, each taking an equal part of what is left.
    let mut shares = vec![0usize; map_channels.len()];
    let mut order: Vec<usize> = (0..map_channels.len()).collect();
    order.sort_by_key(|&m| map_channels[m]);
    let mut left = count;
    for (position, &m) in order.iter().enumerate() {
        let share = left.div_ceil(order.len() - position).min(map_channels[m]);
        shares[m] = share;
        left -= share;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(CHANNEL_STREAM);
    let mut chosen = Vec::with_capacity(count);
    let mut offset = 0;
    for (&channels, &share) in map_channels.iter().zip(&shares) {
        chosen.extend(
            rand::seq::index::sample(&mut rng, channels, share)
                .into_iter()
                .map(|c| offset + c),
        );
        offset += channels;
    }
    chosen.sort_unstable();
    Ok(chosen)
}

/// Centres each kept channel on its normal-patch mean and divides every
/// channel of a map by that map's total standard deviation (the root of its
/// channels' summed variances), so each map weighs about the same in a
/// distance whatever its channel count. Per-channel scaling would blow up
/// the many ReLU6 channels of the stride-32 map that are almost never
/// active on normal patches (their std is near 0), and the one hot patch
/// of a normal image's border would outscore a defect.
fn map_standardiser(values: &[f32], channel_index: &[usize], shapes: &[MapShape]) -> Standardiser {
    let dim = channel_index.len();
    let mut sum = vec![0f64; dim];
    let mut sum_sq = vec![0f64; dim];
    for row in values.chunks(dim) {
        for (d, &v) in row.iter().enumerate() {
            sum[d] += v as f64;
            sum_sq[d] += v as f64 * v as f64;
        }
    }
    let n = (values.len() / dim).max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let map_of = |channel: usize| {
        let mut end = 0;
        shapes
            .iter()
            .position(|m| {
                end += m.channels;
                channel < end
            })
            .unwrap_or(0)
    };
    let mut variance = vec![0f64; shapes.len()];
    for (d, &channel) in channel_index.iter().enumerate() {
        variance[map_of(channel)] += (sum_sq[d] / n - mean[d] * mean[d]).max(0.0);
    }
    let scale: Vec<f32> = variance
        .iter()
        .map(|v| if *v > 1e-12 { v.sqrt() as f32 } else { 1.0 })
        .collect();
    Standardiser::from_parts(
        mean.into_iter().map(|m| m as f32).collect(),
        channel_index.iter().map(|&c| scale[map_of(c)]).collect(),
    )
}

/// Side of the random projection the coreset is chosen in (PatchCore
/// selects its coreset in 128 random dimensions, which keeps distances
/// within a few percent and cuts the greedy passes' cost by dim / 128).
const CORESET_PROJECTION: usize = 128;

/// Greedy k-center selection of `count` rows, in a seeded Gaussian random
/// projection to `CORESET_PROJECTION` dimensions when the rows are wider.
fn projected_coreset(
    values: &[f32],
    dim: usize,
    count: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<usize>, TrainError> {
    if dim <= CORESET_PROJECTION {
        return Ok(super::scorer::greedy_coreset(values, dim, count, seed));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(CHANNEL_STREAM + 1);
    let scale = 1.0 / (CORESET_PROJECTION as f32).sqrt();
    let projection: Vec<f32> = (0..dim * CORESET_PROJECTION)
        .map(|_| standard_normal(&mut rng) * scale)
        .collect();
    let rows = values.len() / dim;
    let x = Tensor::from_slice(values, (rows, dim), device)?;
    let p = Tensor::from_vec(projection, (dim, CORESET_PROJECTION), device)?;
    let projected = x.matmul(&p)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(super::scorer::greedy_coreset(
        &projected,
        CORESET_PROJECTION,
        count,
        seed,
    ))
}

/// A standard normal draw (Box-Muller).
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    use rand::Rng;
    let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: the log is finite
    let v: f64 = rng.random();
    ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
}

/// What fitting is given: the normal training images (first rows), the
/// scorer and patch settings, seed, budget and runtime bytes.
pub struct PatchFit<'a> {
    pub features: &'a FeatureSet,
    pub normal_images: &'a [usize],
    pub scorer: &'a Scorer,
    pub patch: &'a PatchConfig,
    pub seed: u64,
    pub budget: u64,
    pub runtime_bytes: u64,
}

fn over_budget(what: String, needed: u64, budget: u64) -> TrainError {
    TrainError::Invalid(format!(
        "memory budget of {budget} bytes cannot hold {what} ({needed} bytes with the runtime); \
         raise --memory-budget, keep fewer --channels or use a --coreset"
    ))
}

/// Fits a patch scorer on the normal training images' tiles only.
pub fn fit(
    fit: &PatchFit<'_>,
    device: &Device,
) -> Result<(PatchScorer, MemoryPlan, PatchFitStats), TrainError> {
    let features = fit.features;
    let shapes = features.maps().to_vec();
    let total: usize = shapes.iter().map(|m| m.channels).sum();
    let map_channels: Vec<usize> = shapes.iter().map(|m| m.channels).collect();
    let channel_index = channel_subset(&map_channels, fit.patch.channels, fit.seed)?;
    let dim = channel_index.len();
    let geometry = PatchGeometry::new(shapes.clone(), &channel_index, device)?;
    let positions = geometry.positions();
    let tiles: Vec<usize> = fit
        .normal_images
        .iter()
        .flat_map(|&first| image_tile_rows(features, first))
        .collect();
    let patches = tiles.len() * positions;
    let held = (patches * dim * 4) as u64;
    // One gathered batch of maps and positions besides.
    let raw_per_tile: usize = shapes.iter().map(|m| m.channels * m.height * m.width).sum();
    let batch_bytes = (TILE_BATCH * (raw_per_tile + 2 * positions * total) * 4) as u64;
    let fixed = fit.runtime_bytes + held + batch_bytes;
    if fixed > fit.budget {
        return Err(over_budget(
            format!("the {patches} normal training patches of {dim} channels"),
            fixed,
            fit.budget,
        ));
    }
    let mut values = Vec::with_capacity(patches * dim);
    for batch in tiles.chunks(TILE_BATCH) {
        values.extend(geometry.cached_rows(features, batch, device)?);
    }
    let standardiser = map_standardiser(&values, &channel_index, &shapes);
    standardiser.standardise_in_place(&mut values);
    let (fitted, plan, mean_shrinkage) = match fit.scorer {
        Scorer::Knn { k, coreset } => {
            let bank_rows = coreset.map_or(patches, |c| c.rows(patches));
            if *k > bank_rows {
                return Err(TrainError::Invalid(format!(
                    "k = {k} is larger than the memory bank ({bank_rows} normal training patches)"
                )));
            }
            // A coreset copies the rows it keeps; the greedy pass keeps one
            // distance per patch.
            let kept = if coreset.is_some() {
                (bank_rows * dim * 4 + patches * 4) as u64
            } else {
                0
            };
            let per_bank_row = (QUERY_BLOCK * 4 * 2) as u64;
            let fixed = fixed + kept + (QUERY_BLOCK * dim * 4) as u64;
            if fixed + per_bank_row > fit.budget {
                return Err(over_budget(
                    format!("a memory bank of {bank_rows} patches and one distance block"),
                    fixed + per_bank_row,
                    fit.budget,
                ));
            }
            let bank_block = (((fit.budget - fixed) / per_bank_row) as usize).min(bank_rows);
            let values = match coreset {
                None => values,
                Some(_) => {
                    let chosen = projected_coreset(&values, dim, bank_rows, fit.seed, device)?;
                    chosen
                        .iter()
                        .flat_map(|&i| values[i * dim..(i + 1) * dim].iter().copied())
                        .collect()
                }
            };
            let bank = MemoryBank::new(values, dim, device)?;
            (
                PatchFitted::Knn { bank, k: *k },
                MemoryPlan {
                    bank_block,
                    fixed_bytes: fixed,
                    per_bank_row_bytes: per_bank_row,
                },
                None,
            )
        }
        Scorer::Mahalanobis => {
            // The Gaussians are kept (mean and whitening per position); one
            // fit's scatter, factor and inverse exist at a time.
            let kept = (positions * (dim * dim + dim) * 4) as u64;
            let needed = fixed + kept + gaussian_fit_bytes(dim) + (tiles.len() * dim * 4) as u64;
            if needed > fit.budget {
                return Err(over_budget(
                    format!("{positions} Gaussians of {dim} channels"),
                    needed,
                    fit.budget,
                ));
            }
            let mut gaussians = Vec::with_capacity(positions);
            let mut at_position = vec![0f32; tiles.len() * dim];
            for position in 0..positions {
                for (tile, row) in at_position.chunks_mut(dim).enumerate() {
                    let start = (tile * positions + position) * dim;
                    row.copy_from_slice(&values[start..start + dim]);
                }
                gaussians.push(Gaussian::fit_rows(&at_position, dim, device)?);
            }
            let mean = gaussians.iter().map(|g| g.shrinkage).sum::<f64>() / positions as f64;
            (
                PatchFitted::Gaussians(gaussians),
                MemoryPlan {
                    bank_block: 0,
                    fixed_bytes: needed,
                    per_bank_row_bytes: 0,
                },
                Some(mean),
            )
        }
    };
    let info = PatchInfo {
        encoder: features
            .metadata()
            .get("encoder")
            .cloned()
            .unwrap_or_default(),
        weights: features.metadata().get("weights").cloned(),
        maps: crate::spatial::map_arrays(&shapes),
        tiling: features
            .metadata()
            .get("tiling")
            .and_then(|text| serde_json::from_str(text).ok()),
        channel_index,
        heatmap_sigma: fit.patch.heatmap_sigma,
        heat_range: [0.0, 1.0],
    };
    let stats = PatchFitStats {
        patches,
        channels: dim,
        mean_shrinkage,
    };
    Ok((
        PatchScorer {
            info,
            geometry,
            standardiser,
            fitted,
        },
        plan,
        stats,
    ))
}

impl PatchScorer {
    pub fn grid(&self) -> (usize, usize) {
        self.geometry.grid()
    }

    pub fn geometry(&self) -> &PatchGeometry {
        &self.geometry
    }

    /// Rows of the k-NN memory bank; None for Gaussians.
    pub fn memory_bank_rows(&self) -> Option<usize> {
        match &self.fitted {
            PatchFitted::Knn { bank, .. } => Some(bank.len()),
            PatchFitted::Gaussians(_) => None,
        }
    }

    /// Patch scores of raw patch rows (`tiles x positions` rows of `dim`).
    pub fn patch_scores(
        &self,
        mut rows: Vec<f32>,
        plan: &MemoryPlan,
        device: &Device,
    ) -> Result<Vec<f32>, TrainError> {
        let dim = self.geometry.dim;
        self.standardiser.standardise_in_place(&mut rows);
        match &self.fitted {
            PatchFitted::Knn { bank, k } => {
                let mut out = Vec::with_capacity(rows.len() / dim);
                for block in rows.chunks(QUERY_BLOCK * dim) {
                    out.extend(
                        bank.knn_scores(block, dim, *k, plan.bank_block)?
                            .into_iter()
                            .map(|s| s as f32),
                    );
                }
                Ok(out)
            }
            PatchFitted::Gaussians(gaussians) => {
                let positions = gaussians.len();
                let tiles = rows.len() / (positions * dim);
                let mut out = vec![0f32; tiles * positions];
                let mut at_position = vec![0f32; tiles * dim];
                for (position, gaussian) in gaussians.iter().enumerate() {
                    for (tile, row) in at_position.chunks_mut(dim).enumerate() {
                        let start = (tile * positions + position) * dim;
                        row.copy_from_slice(&rows[start..start + dim]);
                    }
                    for (tile, score) in gaussian.scores(&at_position, device)?.iter().enumerate() {
                        out[tile * positions + position] = *score as f32;
                    }
                }
                Ok(out)
            }
        }
    }

    /// Scores cached images (their first rows): the largest patch score and
    /// each tile's patch-score grid.
    pub fn score_images(
        &self,
        features: &FeatureSet,
        images: &[usize],
        plan: &MemoryPlan,
        device: &Device,
    ) -> Result<Vec<ScoredImage>, TrainError> {
        let positions = self.geometry.positions();
        let mut out = Vec::with_capacity(images.len());
        let mut pending: Vec<Vec<usize>> = Vec::new();
        let flush = |pending: &mut Vec<Vec<usize>>,
                     out: &mut Vec<ScoredImage>|
         -> Result<(), TrainError> {
            let rows: Vec<usize> = pending.iter().flatten().copied().collect();
            if rows.is_empty() {
                return Ok(());
            }
            let values = self.geometry.cached_rows(features, &rows, device)?;
            let scores = self.patch_scores(values, plan, device)?;
            let mut grids = scores.chunks(positions).zip(&rows);
            for image in pending.drain(..) {
                let tiles: Vec<([u32; 4], Vec<f32>)> = grids
                    .by_ref()
                    .take(image.len())
                    .map(|(grid, &row)| (features.tile(row).unwrap_or([0, 0, 0, 0]), grid.to_vec()))
                    .collect();
                out.push(ScoredImage::new(tiles));
            }
            Ok(())
        };
        for &first in images {
            pending.push(image_tile_rows(features, first).collect());
            if pending.iter().map(Vec::len).sum::<usize>() >= TILE_BATCH {
                flush(&mut pending, &mut out)?;
            }
        }
        flush(&mut pending, &mut out)?;
        Ok(out)
    }

    /// The tensors of `scorer.safetensors` and the `patch` metadata.
    pub fn tensors(&self) -> Result<ScorerFile, TrainError> {
        let cpu = Device::Cpu;
        let dim = self.geometry.dim;
        let mut tensors = vec![
            (
                "input_mean".to_string(),
                Tensor::from_slice(&self.standardiser.mean, dim, &cpu)?,
            ),
            (
                "input_std".to_string(),
                Tensor::from_slice(&self.standardiser.std, dim, &cpu)?,
            ),
        ];
        let mut metadata = HashMap::from([(
            "patch".to_string(),
            serde_json::to_string(&self.info).expect("patch info serialises"),
        )]);
        match &self.fitted {
            PatchFitted::Knn { bank, k } => {
                tensors.push(("memory_bank".to_string(), bank.to_cpu_tensor()?));
                metadata.insert("k".into(), k.to_string());
            }
            PatchFitted::Gaussians(gaussians) => {
                let positions = gaussians.len();
                let means: Vec<f32> = gaussians.iter().flat_map(|g| g.mean.clone()).collect();
                let whitening: Vec<f32> =
                    gaussians.iter().flat_map(|g| g.whitening.clone()).collect();
                let shrinkage: Vec<f32> = gaussians.iter().map(|g| g.shrinkage as f32).collect();
                tensors.push((
                    "gaussian_mean".to_string(),
                    Tensor::from_vec(means, (positions, dim), &cpu)?,
                ));
                tensors.push((
                    "whitening".to_string(),
                    Tensor::from_vec(whitening, (positions, dim, dim), &cpu)?,
                ));
                tensors.push((
                    "shrinkage".to_string(),
                    Tensor::from_vec(shrinkage, positions, &cpu)?,
                ));
            }
        }
        Ok((tensors, metadata))
    }

    /// Reads a patch scorer back from `scorer.safetensors`'s tensors and metadata.
    pub fn load(
        tensors: &HashMap<String, Tensor>,
        info: PatchInfo,
        scorer: &Scorer,
        path: &std::path::Path,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let vector = |name: &str| -> Result<Vec<f32>, TrainError> {
            Ok(tensors
                .get(name)
                .ok_or_else(|| {
                    TrainError::Checkpoint(format!("{} has no tensor {name}", path.display()))
                })?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let mean = vector("input_mean")?;
        let std = vector("input_std")?;
        let dim = mean.len();
        if dim != info.channel_index.len() {
            return Err(TrainError::Checkpoint(format!(
                "{}: {dim} standardisation values for {} kept channels",
                path.display(),
                info.channel_index.len()
            )));
        }
        let geometry = PatchGeometry::new(
            crate::spatial::map_shapes(&info.maps),
            &info.channel_index,
            device,
        )?;
        let positions = geometry.positions();
        let fitted = match scorer {
            Scorer::Knn { k, .. } => PatchFitted::Knn {
                bank: MemoryBank::new(vector("memory_bank")?, dim, device)?,
                k: *k,
            },
            Scorer::Mahalanobis => {
                let means = vector("gaussian_mean")?;
                let whitening = vector("whitening")?;
                let shrinkage = vector("shrinkage")?;
                if means.len() != positions * dim || whitening.len() != positions * dim * dim {
                    return Err(TrainError::Checkpoint(format!(
                        "{}: Gaussians do not match {positions} positions of {dim} channels",
                        path.display()
                    )));
                }
                PatchFitted::Gaussians(
                    (0..positions)
                        .map(|p| {
                            Gaussian::from_parts(
                                means[p * dim..(p + 1) * dim].to_vec(),
                                whitening[p * dim * dim..(p + 1) * dim * dim].to_vec(),
                                shrinkage.get(p).copied().unwrap_or(0.0) as f64,
                            )
                        })
                        .collect(),
                )
            }
        };
        Ok(PatchScorer {
            info,
            geometry,
            standardiser: Standardiser::from_parts(mean, std),
            fitted,
        })
    }

    /// The heat map of a scored image at `width` x `height`: patch scores
    /// stitched over the tiles, then smoothed.
    pub fn heat_map(&self, image: &ScoredImage, width: u32, height: u32) -> Vec<f32> {
        let mut stitcher = Stitcher::new(width, height, 1, self.grid());
        for (tile, grid) in &image.tiles {
            // A row without tile geometry covers the whole image.
            let tile = if tile[2] == 0 {
                [0, 0, width, height]
            } else {
                *tile
            };
            stitcher.add(tile, grid);
        }
        let heat = stitcher.finish();
        gaussian_blur(
            &heat,
            width as usize,
            height as usize,
            self.info.heatmap_sigma,
        )
    }
}

impl ScoredImage {
    pub fn new(tiles: Vec<([u32; 4], Vec<f32>)>) -> Self {
        let score = tiles
            .iter()
            .flat_map(|(_, grid)| grid.iter())
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        ScoredImage { score, tiles }
    }
}

/// Separable Gaussian blur (kernel cut at 3 sigma, edges clamped); sigma 0
/// returns the input.
pub fn gaussian_blur(values: &[f32], width: usize, height: usize, sigma: f64) -> Vec<f32> {
    if sigma <= 0.0 {
        return values.to_vec();
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|w| *w /= total);
    let pass = |input: &[f32], along_rows: bool| -> Vec<f32> {
        let mut out = vec![0f32; input.len()];
        for y in 0..height {
            for x in 0..width {
                let mut sum = 0f32;
                for (j, w) in kernel.iter().enumerate() {
                    let offset = j as isize - radius;
                    let (sx, sy) = if along_rows {
                        (
                            (x as isize + offset).clamp(0, width as isize - 1) as usize,
                            y,
                        )
                    } else {
                        (
                            x,
                            (y as isize + offset).clamp(0, height as isize - 1) as usize,
                        )
                    };
                    sum += w * input[sy * width + sx];
                }
                out[y * width + x] = sum;
            }
        }
        out
    };
    pass(&pass(values, true), false)
}

/// The pixel with the largest value: (x, y).
pub fn peak(values: &[f32], width: usize) -> (usize, usize) {
    let at = values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0;
    (at % width, at / width)
}

/// A score scaled to [0, 1] over the heat range.
fn scaled(value: f32, [low, high]: [f64; 2]) -> f32 {
    let span = (high - low).max(1e-12);
    ((value as f64 - low) / span).clamp(0.0, 1.0) as f32
}

/// Blue (low) to red (high) through cyan, yellow: a jet-like scale.
fn colour(t: f32) -> [u8; 3] {
    let channel = |centre: f32| ((1.5 - (4.0 * t - centre).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// The heat map as an 8-bit gray image (0 at the low end of the range, 255
/// at the high end) and as a colour overlay on the image (half image, half
/// colour scale).
pub fn render(image: &RgbImage, heat: &[f32], range: [f64; 2]) -> (GrayImage, RgbImage) {
    let (width, height) = image.dimensions();
    let gray = GrayImage::from_fn(width, height, |x, y| {
        let t = scaled(heat[(y * width + x) as usize], range);
        Luma([(t * 255.0).round() as u8])
    });
    let overlay = RgbImage::from_fn(width, height, |x, y| {
        let tint = colour(scaled(heat[(y * width + x) as usize], range));
        let pixel = image.get_pixel(x, y).0;
        Rgb(std::array::from_fn(|c| {
            ((pixel[c] as u16 + tint[c] as u16) / 2) as u8
        }))
    });
    (gray, overlay)
}

/// An image as PNG bytes (written atomically by the caller).
pub fn png_bytes(image: &image::DynamicImage) -> Result<Vec<u8>, TrainError> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| TrainError::Invalid(format!("encoding a heat map as PNG: {e}")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blur_keeps_the_sum_and_the_peak_of_a_centred_spike() {
        let (width, height) = (21, 21);
        let mut values = vec![0f32; width * height];
        values[10 * width + 10] = 1.0;
        let blurred = gaussian_blur(&values, width, height, 2.0);
        let sum: f32 = blurred.iter().sum();
        // Far from the edges, nothing is clamped: the mass is kept.
        assert!((sum - 1.0).abs() < 1e-4, "{sum}");
        assert_eq!(peak(&blurred, width), (10, 10));
        // A 1-D Gaussian of sigma 2 has 1 / (2 pi sigma^2) at the centre in 2-D
        // (0.0398); the kernel cut at 3 sigma renormalises it slightly up.
        let centre = blurred[10 * width + 10];
        assert!((centre - 0.0398).abs() < 0.002, "{centre}");
        assert_eq!(gaussian_blur(&values, width, height, 0.0), values);
    }

    #[test]
    fn channel_subsets_are_seeded_sorted_and_bounded() {
        let a = channel_subset(&[50], Some(10), 3).unwrap();
        assert_eq!(a, channel_subset(&[50], Some(10), 3).unwrap());
        assert_ne!(a, channel_subset(&[50], Some(10), 4).unwrap());
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.len() == 10);
        assert_eq!(channel_subset(&[2, 2], None, 0).unwrap(), vec![0, 1, 2, 3]);
        // Lite0's maps: 100 channels are 50 of the 112 and 50 of the 1280;
        // with 300, the small map gives all 112 and the large one 188.
        for (count, fine) in [(100, 50), (300, 112)] {
            let chosen = channel_subset(&[112, 1280], Some(count), 0).unwrap();
            assert_eq!(chosen.len(), count);
            assert_eq!(chosen.iter().filter(|&&c| c < 112).count(), fine);
        }
        let error = channel_subset(&[2, 2], Some(5), 0).unwrap_err().to_string();
        assert!(
            error.contains("channels = 5") && error.contains("4 channels"),
            "{error}"
        );
    }

    #[test]
    fn an_image_scores_its_largest_patch() {
        let image = ScoredImage::new(vec![
            ([0, 0, 4, 4], vec![0.1, 0.5]),
            ([2, 0, 4, 4], vec![0.7, 0.2]),
        ]);
        assert!((image.score - 0.7).abs() < 1e-6);
    }
}
