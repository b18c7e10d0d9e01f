//! Segmentation on spatial features: a per-position head over the
//! encoder's feature maps trained with BCE plus soft Dice (`train`), its
//! model and head file (`model`) and pixel metrics (`metrics`). Masks,
//! tiles, grids and stitching are the `spatial` module's, shared with
//! extraction and anomaly scoring; prediction is `predict::segment`.

pub mod metrics;
pub mod model;
pub mod train;

use std::path::PathBuf;

/// Errors at the segmentation boundary; each names the file or setting.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{path}: {message}")]
    Mask { path: PathBuf, message: String },
    #[error(
        "mask {mask} is {mask_width}x{mask_height} but its image {image} is {image_width}x{image_height}"
    )]
    MaskSize {
        mask: PathBuf,
        mask_width: u32,
        mask_height: u32,
        image: PathBuf,
        image_width: u32,
        image_height: u32,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("no spatial features: {0}")]
    NoFeatures(String),
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error(transparent)]
    Experiments(#[from] crate::experiments::ExperimentsError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Encoder(#[from] crate::encoders::EncoderError),
    #[error(transparent)]
    Spatial(#[from] crate::spatial::SpatialError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot write image: {message}")]
    Image { path: PathBuf, message: String },
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
