//! Frozen image encoders: one file per family, a registry of named specs.
//!
//! Invariant: encoders never touch disk. They are built from tensors a caller
//! loaded (see `weights`) and map a batch of preprocessed images to features.

pub mod backend;
pub mod efficientnet_lite;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::preprocess::{PreprocessConfig, ResizeFilter, ResizePolicy};
use crate::weights::{self, InstalledWeights, WeightsError};

/// Errors at the encoder boundary.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("unknown encoder '{name}'; known encoders: {known}")]
    Unknown { name: String, known: String },
    #[error(
        "no weights installed for '{encoder}'; run `lazarus weights fetch {encoder}` or pass a weights file"
    )]
    NotInstalled { encoder: String },
    #[error("{encoder}: {source}")]
    Weights {
        encoder: String,
        source: Box<WeightsError>,
    },
    /// A missing or mis-shaped tensor: the message names it and both shapes.
    #[error("{encoder}: cannot build from {origin}: {message}")]
    Build {
        encoder: String,
        origin: String,
        message: String,
    },
    #[error("{encoder}: input batch has shape {got:?}, expected [n, 3, {size}, {size}]")]
    Input {
        encoder: String,
        got: Vec<usize>,
        size: usize,
    },
    #[error("{encoder}: forward pass failed: {source}")]
    Forward {
        encoder: String,
        source: candle_core::Error,
    },
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

/// One row of `lazarus encoders list`.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderListing {
    #[serde(flatten)]
    pub spec: EncoderSpec,
    /// Installed weights in the cache, if any.
    pub weights: Option<InstalledWeights>,
}

/// Every encoder with whether its weights are installed.
pub fn list() -> Vec<EncoderListing> {
    registry()
        .into_iter()
        .map(|spec| EncoderListing {
            weights: weights::installed(spec.name),
            spec,
        })
        .collect()
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// [n, feature_dim], f32.
    pub pooled: Tensor,
    /// [n, channels, height, width] as in `EncoderSpec::spatial`, when the encoder has one.
    pub spatial: Option<Tensor>,
}

/// Where an encoder's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSource {
    /// The cache (`lazarus weights fetch`).
    Installed,
    /// A `.safetensors` or legacy `.pth` file.
    File(PathBuf),
    /// Deterministic pseudo-random weights: same seed, same model.
    Random { seed: u64 },
}

/// A frozen encoder: a batch of preprocessed images in, features out.
pub trait Encoder: Send + Sync {
    fn spec(&self) -> &EncoderSpec;
    fn device(&self) -> &Device;
    /// sha256 of the weights file it was built from; None for random weights.
    fn weights_sha256(&self) -> Option<&str>;
    /// `images`: [n, 3, input_size, input_size] f32, normalised by `spec().preprocess`.
    fn forward(&self, images: &Tensor) -> Result<EncoderOutput, EncoderError>;
}

/// Builds `spec`'s encoder on `device` from `source`. Reading files is left to
/// `weights`; the models themselves only see tensors.
pub fn load_encoder(
    spec: &EncoderSpec,
    source: WeightsSource,
    device: &Device,
) -> Result<Box<dyn Encoder>, EncoderError> {
    let weights_error = |source| EncoderError::Weights {
        encoder: spec.name.to_string(),
        source: Box::new(source),
    };
    let (vb, origin, sha256) = match &source {
        WeightsSource::Random { seed } => {
            let backend = backend::RandomTensors { seed: *seed };
            let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
            (vb, format!("random weights (seed {seed})"), None)
        }
        WeightsSource::Installed | WeightsSource::File(_) => {
            let (path, sha256) = match &source {
                WeightsSource::File(path) => {
                    let bytes = std::fs::read(path).map_err(|source| {
                        weights_error(WeightsError::Read {
                            path: path.display().to_string(),
                            source,
                        })
                    })?;
                    (path.clone(), weights::sha256_hex(&bytes))
                }
                _ => {
                    let installed = weights::installed(spec.name).ok_or_else(|| {
                        EncoderError::NotInstalled {
                            encoder: spec.name.to_string(),
                        }
                    })?;
                    (installed.path, installed.sha256)
                }
            };
            let tensors = weights::load_tensors(&path, device).map_err(weights_error)?;
            let backend = backend::StrictTensors(tensors);
            let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
            (vb, path.display().to_string(), Some(sha256))
        }
    };
    let build_error = |err: candle_core::Error| EncoderError::Build {
        encoder: spec.name.to_string(),
        origin: origin.clone(),
        message: err.to_string(),
    };
    let model = Model::build(spec, vb).map_err(build_error)?;
    Ok(Box::new(Loaded {
        spec: spec.clone(),
        device: device.clone(),
        sha256,
        model,
    }))
}

/// The network behind each family.
enum Model {
    Lite(efficientnet_lite::EfficientNetLite),
}

impl Model {
    fn build(spec: &EncoderSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        use efficientnet_lite::{Config, EfficientNetLite};
        Ok(match spec.name {
            "efficientnet-lite0" => Model::Lite(EfficientNetLite::new(Config::lite0(), vb)?),
            "efficientnet-lite1" => Model::Lite(EfficientNetLite::new(Config::lite1(), vb)?),
            "efficientnet-lite2" => Model::Lite(EfficientNetLite::new(Config::lite2(), vb)?),
            "efficientnet-lite3" => Model::Lite(EfficientNetLite::new(Config::lite3(), vb)?),
            "efficientnet-lite4" => Model::Lite(EfficientNetLite::new(Config::lite4(), vb)?),
            other => candle_core::bail!("no model is wired for '{other}'"),
        })
    }

    fn forward(&self, images: &Tensor) -> candle_core::Result<EncoderOutput> {
        match self {
            Model::Lite(model) => {
                let features = model.features(images)?;
                Ok(EncoderOutput {
                    pooled: features.pooled,
                    spatial: Some(features.stride32),
                })
            }
        }
    }
}

struct Loaded {
    spec: EncoderSpec,
    device: Device,
    sha256: Option<String>,
    model: Model,
}

impl Encoder for Loaded {
    fn spec(&self) -> &EncoderSpec {
        &self.spec
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn weights_sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    fn forward(&self, images: &Tensor) -> Result<EncoderOutput, EncoderError> {
        let size = self.spec.input_size as usize;
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != size || dims[3] != size {
            return Err(EncoderError::Input {
                encoder: self.spec.name.to_string(),
                got: dims.to_vec(),
                size,
            });
        }
        let images = images
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&self.device))
            .map_err(|source| EncoderError::Forward {
                encoder: self.spec.name.to_string(),
                source,
            })?;
        self.model
            .forward(&images)
            .map_err(|source| EncoderError::Forward {
                encoder: self.spec.name.to_string(),
                source,
            })
    }
}

/// Builds an EfficientNet-Lite model with its ImageNet classifier, for
/// callers that need the logits (the ImageNet sanity check, `predict`).
pub fn load_lite_classifier(
    name: &str,
    path: &std::path::Path,
    device: &Device,
) -> Result<efficientnet_lite::EfficientNetLite, EncoderError> {
    use efficientnet_lite::{Config, EfficientNetLite};
    let config = match name {
        "efficientnet-lite0" => Config::lite0(),
        "efficientnet-lite1" => Config::lite1(),
        "efficientnet-lite2" => Config::lite2(),
        "efficientnet-lite3" => Config::lite3(),
        "efficientnet-lite4" => Config::lite4(),
        other => {
            return Err(lookup(other).err().unwrap_or(EncoderError::Unknown {
                name: other.to_string(),
                known: "efficientnet-lite0..4".into(),
            }));
        }
    };
    let tensors = weights::load_tensors(path, device).map_err(|source| EncoderError::Weights {
        encoder: name.to_string(),
        source: Box::new(source),
    })?;
    let vb = VarBuilder::from_backend(
        Box::new(backend::StrictTensors(tensors)),
        DType::F32,
        device.clone(),
    );
    EfficientNetLite::new(config, vb).map_err(|err| EncoderError::Build {
        encoder: name.to_string(),
        origin: path.display().to_string(),
        message: err.to_string(),
    })
}
