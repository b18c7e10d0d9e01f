//! `predict --task segment`: a segmentation run's head on new images. An
//! image already in the run's spatial feature cache (same content id in its
//! dataset) reuses its cached tiles' maps; any other is cut into the run's
//! tiles and run through the run's encoder (same weights sha256, same
//! preprocessing; loaded only when some image needs it). The head's logits
//! are upsampled bilinearly to each tile's pixels and averaged where tiles
//! overlap; the mask (PNG, original resolution) and an overlay (mask tinted
//! over the image) are written per image.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use serde::Serialize;

use super::SegmentError;
use super::model::{TrainedSegmentHead, load_head};
use crate::encoders::{self, Encoder, WeightsSource};
use crate::layout::Layout;
use crate::predict::FeatureCache;
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
    pub image_id: Option<String>,
    /// "cache" when the run's cached spatial features were reused, "encoder" otherwise.
    pub features_from: Option<&'static str>,
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
    let run_dir = match crate::experiments::recorded_run_dir(layout, run_id) {
        Ok(dir) => dir,
        // The classification side reports the unknown run.
        Err(crate::experiments::ExperimentsError::UnknownRun { .. }) => return Ok(false),
        Err(other) => return Err(other.into()),
    };
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

/// Per tile of an image: its place [x, y, width, height] and its head
/// logits on the grid, [outputs][grid cells].
pub type TileLogits = Vec<([u32; 4], Vec<Vec<f32>>)>;

/// The run's encoder, loaded the first time an image is not in the cache.
struct LazyEncoder<'a> {
    run_id: &'a str,
    trained: &'a TrainedSegmentHead,
    device: &'a Device,
    encoder: Option<Box<dyn Encoder>>,
}

impl LazyEncoder<'_> {
    fn get(&mut self) -> Result<&dyn Encoder, SegmentError> {
        if self.encoder.is_none() {
            self.encoder = Some(load_run_encoder(self.run_id, self.trained, self.device)?);
        }
        Ok(self.encoder.as_deref().expect("loaded above"))
    }
}

/// Where an image's tiles come from.
enum TileSource<'a> {
    /// Its rows in the run's spatial cache.
    Cache(&'a FeatureCache, Vec<usize>),
    /// Preprocessed tiles for the encoder.
    Encoder(Vec<super::tile::PreparedTile>),
}

/// Writes a mask and an overlay per image; a bad image gets its own error
/// and the others are still predicted.
pub fn predict(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &SegmentPredictConfig,
) -> Result<Vec<SegmentPrediction>, SegmentError> {
    let run_dir = crate::experiments::recorded_run_dir(layout, run_id)?;
    let inputs = read_run_inputs(&run_dir)?;
    if inputs.config.task != Task::Segment {
        return Err(SegmentError::Invalid(format!(
            "run {run_id} is a {} run, not a segmentation run",
            inputs.config.task.name()
        )));
    }
    let trained = load_head(&run_dir, &inputs.config, &config.device)?;
    // Without its feature folder (removed to save space), every image goes
    // through the encoder, as before the cache was read.
    let cache = FeatureCache::open_if_present(layout, &inputs.fingerprint)
        .map_err(|e| SegmentError::Invalid(format!("run {run_id}: {e}")))?;
    let mut encoder = LazyEncoder {
        run_id,
        trained: &trained,
        device: &config.device,
        encoder: None,
    };
    let spec = encoders::lookup(&trained.info.encoder)?;
    let preprocess = crate::extract::plan::spatial_preprocess(&spec);
    let tiling = trained.info.tiling.unwrap_or_default();
    std::fs::create_dir_all(&config.out_dir).map_err(|source| SegmentError::Io {
        path: config.out_dir.clone(),
        source,
    })?;
    let mut out = Vec::with_capacity(images.len());
    for path in images {
        let mut prediction = SegmentPrediction {
            path: path.clone(),
            image_id: None,
            features_from: None,
            mask: None,
            overlay: None,
            width: 0,
            height: 0,
            tiles: 0,
            foreground_fraction: None,
            error: None,
        };
        let bytes = match crate::files::read_regular_file(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                prediction.error = Some(format!("cannot read {}: {e}", path.display()));
                out.push(prediction);
                continue;
            }
        };
        let sha256 = crate::digest::sha256(&bytes);
        let id = hex::encode(sha256);
        let decoded = match cache
            .as_ref()
            .and_then(|c| Some((c, c.rows(&sha256)?.collect::<Vec<usize>>())))
        {
            Some((cache, rows)) => {
                crate::preprocess::decode_rgb8(&bytes, path, preprocess.max_pixels)
                    .map(|image| (image, TileSource::Cache(cache, rows)))
            }
            None => super::tile::preprocess_tile_bytes(&bytes, path, &preprocess, &tiling)
                .map(|(image, tiles)| (image, TileSource::Encoder(tiles))),
        };
        prediction.image_id = Some(id);
        match decoded {
            Err(err) => prediction.error = Some(err.to_string()),
            Ok((image, source)) => {
                let logits = match source {
                    TileSource::Cache(cache, rows) => {
                        prediction.features_from = Some("cache");
                        cached_logits(&trained, cache, &rows, &config.device)?
                    }
                    TileSource::Encoder(tiles) => {
                        prediction.features_from = Some("encoder");
                        encoded_logits(&trained, encoder.get()?, tiles, config)?
                    }
                };
                prediction.width = image.width();
                prediction.height = image.height();
                prediction.tiles = logits.len();
                let classes = stitch(&trained, image.width(), image.height(), &logits);
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
pub fn load_run_encoder(
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

/// Grid logits of an image's cached tiles (rows of the run's spatial set):
/// the maps the head was trained on, f16 as stored.
pub fn cached_logits(
    trained: &TrainedSegmentHead,
    cache: &FeatureCache,
    rows: &[usize],
    device: &Device,
) -> Result<TileLogits, SegmentError> {
    let features = cache.features();
    let maps = super::train::map_tensors(features, rows, device)?;
    let logits = trained
        .geometry
        .grid_logits(&trained.head, &maps, DType::F32, None)?
        .to_vec3::<f32>()?;
    rows.iter()
        .zip(logits)
        .map(|(&row, tile_logits)| {
            let tile = features.tile(row).ok_or_else(|| {
                SegmentError::Invalid(format!(
                    "row {row} of {} has no tile geometry",
                    features.dir().display()
                ))
            })?;
            Ok((tile, tile_logits))
        })
        .collect()
}

/// Grid logits of an image's tiles through the run's encoder, batched.
fn encoded_logits(
    trained: &TrainedSegmentHead,
    encoder: &dyn Encoder,
    tiles: Vec<super::tile::PreparedTile>,
    config: &SegmentPredictConfig,
) -> Result<TileLogits, SegmentError> {
    let size = encoder.spec().input_size as usize;
    let mut out = Vec::with_capacity(tiles.len());
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
        out.extend(group.iter().map(|(tile, _)| *tile).zip(logits));
    }
    Ok(out)
}

/// Class per pixel of the whole image: tile logits upsampled to each tile's
/// pixels, averaged where tiles overlap.
pub fn stitch(
    trained: &TrainedSegmentHead,
    width: u32,
    height: u32,
    tiles: &TileLogits,
) -> Vec<u8> {
    let outputs = trained.info.outputs;
    let mut stitcher = super::tile::Stitcher::new(width, height, outputs, trained.geometry.grid);
    for (tile, tile_logits) in tiles {
        stitcher.add(*tile, &tile_logits.concat());
    }
    let averaged = stitcher.finish();
    let plane = width as usize * height as usize;
    (0..plane)
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
        .collect()
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
