//! `predict --task segment`: a segmentation run's (or bundle's) head on new
//! images. An image already in the run's spatial feature cache (same
//! content id) reuses its cached tiles' maps; any other is cut into the
//! run's tiles and run through the run's encoder (same weights sha256, same
//! preprocessing; loaded only when some image needs it), both through
//! [`super::Predictor`]. The head's logits are upsampled bilinearly to each
//! tile's pixels and averaged where tiles overlap; the mask (PNG, original
//! resolution) and an overlay (mask tinted over the image) are written per
//! image.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use super::{Answer, EncoderReference, Outcome, PredictError, Predictor, RawResult};
use crate::features::catalog::FeatureCache;
use crate::segment::SegmentError;
use crate::segment::model::{TrainedSegmentHead, grid_logits};
use crate::spatial::map_tensors;
use crate::spatial::render::{class_overlay, mask_image, write_png};
use crate::spatial::tile::spatial_preprocess;

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
    // Without the folder the tiles' square is the registry's; a head
    // trained on maps of another square (`enqueue --spatial --image-size`)
    // is refused rather than fed maps of another size.
    let side = spec.input_size as usize;
    if let Some([stride, _, height, width]) =
        trained.info.maps.iter().find(|[stride, _, height, width]| {
            *height != side.div_ceil(*stride) || *width != side.div_ceil(*stride)
        })
    {
        return Err(PredictError::Encoder {
            owner: owner.to_string(),
            message: format!(
                "the run's stride-{stride} map is {height}x{width}, not the {0}x{0} of {side} px \
                 tiles: its features were encoded at another --image-size, and their folder \
                 {1} is gone; extract it again to predict",
                side.div_ceil(*stride),
                trained.info.fingerprint
            ),
        });
    }
    Ok(EncoderReference {
        name: trained.info.encoder.clone(),
        weights: trained.info.weights.clone().unwrap_or_default(),
        preprocess: spatial_preprocess(&spec),
        fingerprint: trained.info.fingerprint.clone(),
        feature_dim: trained.geometry.channels,
        layers: crate::encoders::PooledLayers::last(),
        views: crate::encoders::ViewSet::Single,
        maps: head_maps(trained),
    })
}

/// The maps the head was trained on, as `enqueue --maps` names them: the
/// strides its file records (a family whose strides are not Lite's, such as
/// DINOv2's 14, has its own maps only, the default).
fn head_maps(trained: &TrainedSegmentHead) -> crate::encoders::SpatialMaps {
    let strides: Vec<String> = trained
        .info
        .maps
        .iter()
        .map(|[stride, ..]| stride.to_string())
        .collect();
    crate::encoders::SpatialMaps::parse(&strides.join(",")).unwrap_or_default()
}

/// A segmentation model's answer: the mask and the overlay written into
/// `out_dir`, the image's size, tiles and foreground share.
pub(crate) fn segmented(
    predictor: &Predictor,
    trained: &TrainedSegmentHead,
    answer: Answer,
    out_dir: Option<&Path>,
) -> Result<SegmentPrediction, PredictError> {
    let mut prediction = SegmentPrediction {
        path: answer.path.to_path_buf(),
        image_id: answer.image_id,
        features_from: None,
        mask: None,
        overlay: None,
        width: 0,
        height: 0,
        tiles: 0,
        foreground_fraction: None,
        error: None,
    };
    let (features_from, image, tiles, classes) = match answer.outcome {
        Err(error) => {
            prediction.error = Some(error);
            return Ok(prediction);
        }
        Ok(Outcome {
            features_from,
            result:
                RawResult::Mask {
                    image,
                    tiles,
                    classes,
                },
            ..
        }) => (features_from, image, tiles, classes),
        Ok(_) => {
            prediction.error = Some("a result of another task".into());
            return Ok(prediction);
        }
    };
    prediction.features_from = Some(features_from);
    prediction.width = image.width();
    prediction.height = image.height();
    prediction.tiles = tiles;
    let foreground = classes.iter().filter(|&&c| c > 0).count();
    prediction.foreground_fraction = Some(foreground as f64 / classes.len() as f64);
    let Some(out_dir) = out_dir else {
        return Ok(prediction);
    };
    let stem = super::picture_stem(answer.path);
    let mask_path = out_dir.join(format!("{stem}.mask.png"));
    let overlay_path = out_dir.join(format!("{stem}.overlay.png"));
    let binary = trained.info.outputs == 1;
    let mask = mask_image(image.width(), image.height(), &classes, binary);
    let written = write_png(&mask_path, &image::DynamicImage::ImageLuma8(mask)).and_then(|()| {
        write_png(
            &overlay_path,
            &image::DynamicImage::ImageRgb8(class_overlay(&image, &classes)),
        )
    });
    written.map_err(|e| PredictError::Model {
        owner: predictor.owner().to_string(),
        message: e.to_string(),
    })?;
    prediction.mask = Some(mask_path);
    prediction.overlay = Some(overlay_path);
    Ok(prediction)
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
