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
use serde::Serialize;

use super::{EncoderReference, PredictConfig, PredictError};
use crate::encoders::Encoder;
use crate::features::catalog::FeatureCache;
use crate::layout::Layout;
use crate::segment::SegmentError;
use crate::segment::model::{TrainedSegmentHead, grid_logits, load_head};
use crate::spatial::render::{class_overlay, mask_image, write_png};
use crate::spatial::tile::{PreparedTile, preprocess_tile_bytes, spatial_preprocess};
use crate::spatial::{encode_maps, map_tensors};
use crate::train::config::Task;
use crate::train::run::read_run_inputs;

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

/// Per tile of an image: its place [x, y, width, height] and its head
/// logits on the grid, [outputs][grid cells].
pub type TileLogits = Vec<([u32; 4], Vec<Vec<f32>>)>;

/// The run's encoder, loaded (after its weights' sha256 is checked) the
/// first time an image is not in the cache.
struct LazyEncoder<'a> {
    reference: &'a EncoderReference,
    owner: &'a str,
    device: &'a Device,
    encoder: Option<Box<dyn Encoder>>,
}

impl LazyEncoder<'_> {
    fn get(&mut self) -> Result<&dyn Encoder, PredictError> {
        if self.encoder.is_none() {
            self.encoder = Some(self.reference.load(self.device, self.owner)?);
        }
        Ok(self.encoder.as_deref().expect("loaded above"))
    }
}

/// Where an image's tiles come from.
enum TileSource<'a> {
    /// Its rows in the run's spatial cache.
    Cache(&'a FeatureCache, Vec<usize>),
    /// Preprocessed tiles for the encoder.
    Encoder(Vec<PreparedTile>),
}

/// The encoder, weights and tile preprocessing that made the run's
/// features: as the feature folder's shards record them when the folder is
/// there, else as the head file records the encoder and weights, with the
/// spatial preprocessing of that encoder.
pub fn encoder_reference(
    trained: &TrainedSegmentHead,
    cache: Option<&FeatureCache>,
    owner: &str,
) -> Result<EncoderReference, PredictError> {
    if let Some(cache) = cache
        && let Some(reference) =
            EncoderReference::from_features(cache.features(), &trained.info.fingerprint)?
    {
        return Ok(reference);
    }
    let spec =
        crate::encoders::lookup(&trained.info.encoder).map_err(|e| PredictError::Encoder {
            owner: owner.to_string(),
            message: e.to_string(),
        })?;
    Ok(EncoderReference {
        name: trained.info.encoder.clone(),
        weights: trained.info.weights.clone().unwrap_or_default(),
        preprocess: spatial_preprocess(&spec),
        fingerprint: trained.info.fingerprint.clone(),
        feature_dim: trained.geometry.channels,
    })
}

/// Writes a mask and an overlay per image into `out_dir`; a bad image gets
/// its own error and the others are still predicted.
pub fn predict(
    layout: &Layout,
    run_id: &str,
    images: &[PathBuf],
    config: &PredictConfig,
    out_dir: &Path,
) -> Result<Vec<SegmentPrediction>, PredictError> {
    let run_dir = super::run_folder(layout, run_id)?;
    let inputs = read_run_inputs(&run_dir)?;
    if inputs.config.task != Task::Segment {
        return Err(PredictError::Run {
            run: run_id.to_string(),
            message: format!(
                "a {} run, not a segmentation run",
                inputs.config.task.name()
            ),
        });
    }
    let trained = load_head(&run_dir, &inputs.config, &config.device)?;
    // Without its feature folder (removed to save space), every image goes
    // through the encoder, as before the cache was read.
    let cache = FeatureCache::open_if_present(layout, &inputs.fingerprint).map_err(|e| {
        PredictError::Run {
            run: run_id.to_string(),
            message: e.to_string(),
        }
    })?;
    let owner = format!("run {run_id}");
    let reference = encoder_reference(&trained, cache.as_ref(), &owner)?;
    let mut encoder = LazyEncoder {
        reference: &reference,
        owner: &owner,
        device: &config.device,
        encoder: None,
    };
    let preprocess = &reference.preprocess;
    let tiling = trained.info.tiling.unwrap_or_default();
    super::create_out_dir(run_id, out_dir)?;
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
        let super::ImageFile { bytes, sha256, id } = match super::read_image(path) {
            Ok(image) => image,
            Err(e) => {
                prediction.error = Some(e);
                out.push(prediction);
                continue;
            }
        };
        let decoded = match cache
            .as_ref()
            .and_then(|c| Some((c, c.rows(&sha256)?.collect::<Vec<usize>>())))
        {
            Some((cache, rows)) => {
                crate::preprocess::decode_rgb8(&bytes, path, preprocess.max_pixels)
                    .map(|image| (image, TileSource::Cache(cache, rows)))
            }
            None => preprocess_tile_bytes(&bytes, path, preprocess, &tiling)
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
                let mask_path = out_dir.join(format!("{stem}.mask.png"));
                let overlay_path = out_dir.join(format!("{stem}.overlay.png"));
                let binary = trained.info.outputs == 1;
                let mask = mask_image(image.width(), image.height(), &classes, binary);
                write_png(&mask_path, &image::DynamicImage::ImageLuma8(mask))?;
                write_png(
                    &overlay_path,
                    &image::DynamicImage::ImageRgb8(class_overlay(&image, &classes)),
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

/// The columns of a segmentation run's CSV.
const CSV_HEADER: &str =
    "path,image_id,features_from,width,height,tiles,foreground_fraction,mask,overlay,error";

/// Writes predictions as CSV (`CSV_HEADER`), one row per image.
pub fn write_csv(predictions: &[SegmentPrediction], path: &Path) -> std::io::Result<()> {
    let rows = predictions.iter().map(|p| {
        let [file, id, from] = super::image_columns(&p.path, &p.image_id, p.features_from);
        [
            file,
            id,
            from,
            p.width.to_string(),
            p.height.to_string(),
            p.tiles.to_string(),
            p.foreground_fraction
                .map(|f| format!("{f:.6}"))
                .unwrap_or_default(),
            super::path_column(&p.mask),
            super::path_column(&p.overlay),
            p.error.clone().unwrap_or_default(),
        ]
    });
    super::write_table(path, CSV_HEADER, rows)
}

/// Grid logits of an image's cached tiles (rows of the run's spatial set):
/// the maps the head was trained on, f16 as stored.
pub fn cached_logits(
    trained: &TrainedSegmentHead,
    cache: &FeatureCache,
    rows: &[usize],
    device: &Device,
) -> Result<TileLogits, PredictError> {
    let features = cache.features();
    let maps = map_tensors(features, rows, device)?;
    let logits =
        grid_logits(&trained.geometry, &trained.head, &maps, DType::F32, None)?.to_vec3::<f32>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (&row, tile_logits) in rows.iter().zip(logits) {
        let Some(tile) = features.tile(row) else {
            return Err(SegmentError::NoFeatures(format!(
                "row {row} of {} has no tile geometry",
                features.dir().display()
            ))
            .into());
        };
        out.push((tile, tile_logits));
    }
    Ok(out)
}

/// Grid logits of an image's tiles through the run's encoder, batched.
fn encoded_logits(
    trained: &TrainedSegmentHead,
    encoder: &dyn Encoder,
    tiles: Vec<PreparedTile>,
    config: &PredictConfig,
) -> Result<TileLogits, PredictError> {
    let size = encoder.spec().input_size as usize;
    let mut out = Vec::with_capacity(tiles.len());
    for group in tiles.chunks(config.batch_size.max(1)) {
        let mut flat = Vec::with_capacity(group.len() * 3 * size * size);
        for (_, values) in group {
            flat.extend_from_slice(values);
        }
        let input = Tensor::from_vec(flat, (group.len(), 3, size, size), &config.device)?;
        let maps = encode_maps(encoder, &input)?;
        let logits = grid_logits(&trained.geometry, &trained.head, &maps, DType::F32, None)?
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
    let mut stitcher =
        crate::spatial::stitch::Stitcher::new(width, height, outputs, trained.geometry.grid);
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
