//! `predict --task segment`: a segmentation run's head on new images. Each
//! image is cut into the run's tiles, run through the run's encoder (same
//! weights sha256, same preprocessing), the head's logits are upsampled
//! bilinearly to each tile's pixels and averaged where tiles overlap; the
//! mask (PNG, original resolution) and an overlay (mask tinted over the
//! image) are written per image.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use serde::Serialize;

use super::SegmentError;
use super::model::{TrainedSegmentHead, load_head};
use crate::encoders::{self, Encoder, WeightsSource};
use crate::experiments::ExperimentsDb;
use crate::layout::Layout;
use crate::train::config::Task;
use crate::train::run::read_run_inputs;

/// Settings of a segmentation prediction.
#[derive(Debug, Clone)]
pub struct SegmentPredictConfig {
    /// Where `STEM.mask.png` and `STEM.overlay.png` go.
    pub out_dir: PathBuf,
    pub device: Device,
    /// Tiles per encoder forward pass.
    pub batch_size: usize,
}

/// The outcome for one image.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentPrediction {
    pub path: PathBuf,
    pub mask: Option<PathBuf>,
    pub overlay: Option<PathBuf>,
    pub width: u32,
    pub height: u32,
    pub tiles: usize,
    /// Share of pixels not in class 0.
    pub foreground_fraction: Option<f64>,
    pub error: Option<String>,
}

/// True when `run_id` is a segmentation run (its config says `task =
/// "segment"`); false for a run without a config, which the classification
/// side then reports as not found.
pub fn is_segment_run(layout: &Layout, run_id: &str) -> Result<bool, SegmentError> {
    let run_dir = layout.experiments_dir().join("runs").join(run_id);
    if !run_dir.join(crate::train::run::RUN_INPUTS_FILE).is_file() {
        return Ok(false);
    }
    let inputs = read_run_inputs(&run_dir)?;
    Ok(inputs.config.task == Task::Segment)
}

/// Colours of classes 1, 2, ... in overlays.
const PALETTE: [[u8; 3]; 6] = [
    [255, 40, 40],
    [40, 200, 255],
    [255, 220, 0],
    [60, 220, 60],
    [220, 60, 255],
    [255, 140, 0],
];

/// Writes a mask and an overlay per image; a bad image gets its own error
/// and the others are still predicted.
pub fn predict(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &SegmentPredictConfig,
) -> Result<Vec<SegmentPrediction>, SegmentError> {
    let db = ExperimentsDb::open(layout)?;
    let run_dir = db.run_dir(run_id);
    let inputs = read_run_inputs(&run_dir)?;
    if inputs.config.task != Task::Segment {
        return Err(SegmentError::Invalid(format!(
            "run {run_id} is a {} run, not a segmentation run",
            inputs.config.task.name()
        )));
    }
    let trained = load_head(&run_dir, &inputs.config, &config.device)?;
    let encoder = load_run_encoder(run_id, &trained, &config.device)?;
    let preprocess = crate::extract::plan::spatial_preprocess(encoder.spec());
    let tiling = trained.info.tiling.unwrap_or_default();
    std::fs::create_dir_all(&config.out_dir).map_err(|source| SegmentError::Io {
        path: config.out_dir.clone(),
        source,
    })?;
    let mut out = Vec::with_capacity(images.len());
    for path in images {
        let mut prediction = SegmentPrediction {
            path: path.clone(),
            mask: None,
            overlay: None,
            width: 0,
            height: 0,
            tiles: 0,
            foreground_fraction: None,
            error: None,
        };
        match super::tile::preprocess_tiles(path, &preprocess, &tiling) {
            Err(err) => prediction.error = Some(err.to_string()),
            Ok((image, tiles)) => {
                prediction.width = image.width();
                prediction.height = image.height();
                prediction.tiles = tiles.len();
                let classes = segment_image(&trained, encoder.as_ref(), &image, tiles, config)?;
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "image".into());
                let mask_path = config.out_dir.join(format!("{stem}.mask.png"));
                let overlay_path = config.out_dir.join(format!("{stem}.overlay.png"));
                let binary = trained.info.outputs == 1;
                let mask = GrayImage::from_fn(image.width(), image.height(), |x, y| {
                    let class = classes[(y * image.width() + x) as usize];
                    // Binary masks as 0/255, so they are visible and read back as binary.
                    image::Luma([if binary && class > 0 { 255 } else { class }])
                });
                write_png(&mask_path, &image::DynamicImage::ImageLuma8(mask))?;
                write_png(
                    &overlay_path,
                    &image::DynamicImage::ImageRgb8(overlay(&image, &classes)),
                )?;
                let foreground = classes.iter().filter(|&&c| c > 0).count();
                prediction.foreground_fraction = Some(foreground as f64 / classes.len() as f64);
                prediction.mask = Some(mask_path);
                prediction.overlay = Some(overlay_path);
            }
        }
        out.push(prediction);
    }
    Ok(out)
}

/// The run's encoder, with the weights that made its features.
fn load_run_encoder(
    run_id: &str,
    trained: &TrainedSegmentHead,
    device: &Device,
) -> Result<Box<dyn Encoder>, SegmentError> {
    let spec = encoders::lookup(&trained.info.encoder)?;
    let weights = trained.info.weights.as_deref().unwrap_or("");
    let source = match weights.strip_prefix("random:") {
        Some(seed) => WeightsSource::Random {
            seed: seed.parse().map_err(|_| {
                SegmentError::Invalid(format!("run {run_id}: bad weights id {weights}"))
            })?,
        },
        None => WeightsSource::Installed,
    };
    let encoder = encoders::load_encoder(&spec, source, device)?;
    if let (Some(sha256), Some(wanted)) =
        (encoder.weights_sha256(), weights.strip_prefix("sha256:"))
        && sha256 != wanted
    {
        return Err(SegmentError::Invalid(format!(
            "run {run_id} was trained on features of {} weights sha256 {wanted}, but the \
             installed weights have sha256 {sha256}",
            spec.name
        )));
    }
    Ok(encoder)
}

/// Class per pixel of the whole image: tile logits upsampled to each tile's
/// pixels, summed and averaged where tiles overlap.
fn segment_image(
    trained: &TrainedSegmentHead,
    encoder: &dyn Encoder,
    image: &RgbImage,
    tiles: Vec<super::tile::PreparedTile>,
    config: &SegmentPredictConfig,
) -> Result<Vec<u8>, SegmentError> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let outputs = trained.info.outputs;
    let size = encoder.spec().input_size as usize;
    let mut stitcher = super::tile::Stitcher::new(
        image.width(),
        image.height(),
        outputs,
        trained.geometry.grid,
    );
    for group in tiles.chunks(config.batch_size.max(1)) {
        let mut flat = Vec::with_capacity(group.len() * 3 * size * size);
        for (_, values) in group {
            flat.extend_from_slice(values);
        }
        let input = Tensor::from_vec(flat, (group.len(), 3, size, size), &config.device)?;
        let maps = encode_maps(encoder, &input)?;
        let logits = trained
            .geometry
            .grid_logits(&trained.head, &maps, DType::F32, None)?
            .to_vec3::<f32>()?;
        for ((tile, _), tile_logits) in group.iter().zip(logits) {
            stitcher.add(*tile, &tile_logits.concat());
        }
    }
    let averaged = stitcher.finish();
    let plane = width * height;
    Ok((0..plane)
        .map(|pixel| {
            if outputs == 1 {
                u8::from(averaged[pixel] > 0.0)
            } else {
                (0..outputs)
                    .max_by(|&a, &b| {
                        averaged[a * plane + pixel].total_cmp(&averaged[b * plane + pixel])
                    })
                    .unwrap_or(0) as u8
            }
        })
        .collect())
}

/// The encoder's maps of a batch of preprocessed tiles, rounded through f16
/// as the feature cache stores them (heads and scorers were fitted on those).
pub fn encode_maps(encoder: &dyn Encoder, input: &Tensor) -> Result<Vec<Tensor>, SegmentError> {
    let output = encoder.forward_maps(input)?;
    Ok(output
        .maps
        .iter()
        .map(|m| m.values.to_dtype(DType::F16)?.to_dtype(DType::F32))
        .collect::<Result<Vec<_>, _>>()?)
}

/// The image with each non-background pixel blended half-way to its class colour.
fn overlay(image: &RgbImage, classes: &[u8]) -> RgbImage {
    let mut out = image.clone();
    for (pixel, &class) in out.pixels_mut().zip(classes) {
        if class > 0 {
            let colour = PALETTE[(class as usize - 1) % PALETTE.len()];
            for (value, tint) in pixel.0.iter_mut().zip(colour) {
                *value = ((*value as u16 + tint as u16) / 2) as u8;
            }
        }
    }
    out
}

pub fn write_png(path: &Path, image: &image::DynamicImage) -> Result<(), SegmentError> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| SegmentError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    crate::atomic::write_file(path, &bytes).map_err(|source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    })
}
