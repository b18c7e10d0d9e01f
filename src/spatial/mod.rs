//! Image geometry shared by extraction, segmentation and anomaly scoring:
//! cutting an image into overlapping tiles (`tile`), reading masks
//! (`mask`), bilinear resampling and stitching per-tile grids back into
//! one image (`stitch`), the feature maps of a tile as one standardised
//! grid of positions (`grid`), and pictures of per-pixel results (`render`).
//!
//! Nothing here knows a task or a run: extraction cuts tiles with it,
//! segmentation heads and patch-level anomaly scorers read maps and stitch
//! grids through it. It imports only modules below it (features, encoders,
//! preprocess, dataset, atomic).

pub mod grid;
pub mod mask;
pub mod render;
pub mod stitch;
pub mod tile;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::encoders::{Encoder, SpatialMaps};
use crate::features::{FeatureSet, MapShape};

/// Errors at the spatial boundary; each names the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum SpatialError {
    #[error("{path}: {message}")]
    Mask { path: PathBuf, message: String },
    /// A tiling or geometry setting that cannot work.
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: cannot write image: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Encoder(Box<crate::encoders::EncoderError>),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl From<crate::encoders::EncoderError> for SpatialError {
    fn from(error: crate::encoders::EncoderError) -> Self {
        SpatialError::Encoder(Box::new(error))
    }
}

/// Map shapes as stored in head and scorer files: [stride, channels,
/// height, width] each, finest first.
pub fn map_arrays(maps: &[MapShape]) -> Vec<[usize; 4]> {
    maps.iter()
        .map(|m| [m.stride, m.channels, m.height, m.width])
        .collect()
}

/// The inverse of `map_arrays`.
pub fn map_shapes(maps: &[[usize; 4]]) -> Vec<MapShape> {
    maps.iter()
        .map(|&[stride, channels, height, width]| MapShape {
            stride,
            channels,
            height,
            width,
        })
        .collect()
}

/// Per-row maps as f32 tensors [rows, c, h, w], one per map, from the
/// mapped f16 cache (segmentation rows and anomaly patch rows alike).
pub fn map_tensors(
    features: &FeatureSet,
    rows: &[usize],
    device: &Device,
) -> Result<Vec<Tensor>, SpatialError> {
    features
        .maps()
        .iter()
        .enumerate()
        .map(|(m, shape)| {
            let mut values =
                Vec::with_capacity(rows.len() * shape.channels * shape.height * shape.width);
            for &row in rows {
                values.extend(features.map(row, m).iter().map(|v| v.to_f32()));
            }
            Ok(Tensor::from_vec(
                values,
                (rows.len(), shape.channels, shape.height, shape.width),
                device,
            )?)
        })
        .collect()
}

/// The encoder's maps of a batch of preprocessed tiles, rounded through f16
/// as the feature cache stores them (heads and scorers were fitted on those).
pub fn encode_maps(
    encoder: &dyn Encoder,
    input: &Tensor,
    maps: &SpatialMaps,
) -> Result<Vec<Tensor>, SpatialError> {
    let output = encoder.forward_maps(input, maps)?;
    Ok(output
        .maps
        .iter()
        .map(|m| m.values.to_dtype(DType::F16)?.to_dtype(DType::F32))
        .collect::<Result<Vec<_>, _>>()?)
}
