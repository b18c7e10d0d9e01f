//! Frozen image encoders: one file per family, a registry of named specs.
//!
//! Invariant: encoders never touch disk. They are built from tensors a caller
//! loaded (see `weights`) and map a batch of preprocessed images to features.

use serde::Serialize;

use crate::preprocess::{PreprocessConfig, ResizeFilter, ResizePolicy};

/// Errors at the encoder boundary.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("unknown encoder '{name}'; known encoders: {known}")]
    Unknown { name: String, known: String },
}

/// Shape of an encoder's spatial feature map for a square input of `input_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpatialShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// What a user needs to know about a named encoder before any weights are loaded.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderSpec {
    pub name: &'static str,
    pub family: &'static str,
    pub input_size: u32,
    pub feature_dim: usize,
    pub spatial: Option<SpatialShape>,
    pub preprocess: PreprocessConfig,
}

/// TF EfficientNet-Lite normalises with mean 127 and std 128 on 0..255 pixels.
const LITE_MEAN: [f32; 3] = [127.0 / 255.0; 3];
const LITE_STD: [f32; 3] = [128.0 / 255.0; 3];
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn preprocess(input_size: u32, mean: [f32; 3], std: [f32; 3]) -> PreprocessConfig {
    // The usual ImageNet evaluation crop: resize the shorter side to size / 0.875.
    let resize_shorter_to = (input_size as f32 / 0.875).round() as u32;
    PreprocessConfig {
        input_size,
        resize: ResizePolicy::ShorterSideThenCenterCrop { resize_shorter_to },
        filter: ResizeFilter::Bicubic,
        mean,
        std,
        max_pixels: PreprocessConfig::DEFAULT_MAX_PIXELS,
    }
}

fn lite(name: &'static str, input_size: u32) -> EncoderSpec {
    let side = (input_size as usize).div_ceil(32);
    EncoderSpec {
        name,
        family: "efficientnet-lite",
        input_size,
        feature_dim: 1280,
        spatial: Some(SpatialShape {
            channels: 1280,
            height: side,
            width: side,
        }),
        preprocess: preprocess(input_size, LITE_MEAN, LITE_STD),
    }
}

/// Every encoder lazarus knows, in display order.
pub fn registry() -> Vec<EncoderSpec> {
    vec![
        lite("efficientnet-lite0", 224),
        lite("efficientnet-lite1", 240),
        lite("efficientnet-lite2", 260),
        lite("efficientnet-lite3", 280),
        lite("efficientnet-lite4", 300),
    ]
}

/// The spec of a named encoder, or an error listing the known names.
pub fn lookup(name: &str) -> Result<EncoderSpec, EncoderError> {
    let all = registry();
    all.iter()
        .find(|spec| spec.name == name)
        .cloned()
        .ok_or_else(|| EncoderError::Unknown {
            name: name.to_string(),
            known: all.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        })
}

// Silences the unused-import lint until the CNN families use the ImageNet constants.
#[allow(dead_code)]
const _IMAGENET: ([f32; 3], [f32; 3]) = (IMAGENET_MEAN, IMAGENET_STD);
