//! Frozen image encoders: one file per family, a registry of named specs.
//!
//! Invariant: encoders never touch disk. They are built from tensors a caller
//! loaded (see `weights`) and map a batch of preprocessed images to features.

pub mod backend;
pub mod clip;
pub mod convnext;
pub use cpu_kernels::{SIMD_ENV, SimdLevel};
pub(crate) use lazarus_kernels as cpu_kernels;
pub mod dinov2;
pub mod efficientnet;
pub mod efficientnet_lite;
mod input;
pub use input::{InputChoice, InputResize};
mod layers;
pub use layers::PooledLayers;
mod maps;
pub use maps::{LITE_STRIDES, SpatialMaps};
mod views;
pub use views::ViewSet;
pub mod resnet;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
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
    #[error("{encoder}: {reason}")]
    InputChoice { encoder: String, reason: String },
    #[error("--layers '{value}': {reason}")]
    Layers { value: String, reason: String },
    #[error("--maps '{value}': {reason}")]
    Maps { value: String, reason: String },
    #[error("--cache-at {after_block}: {reason}")]
    CacheAt { after_block: usize, reason: String },
    #[error("--views '{value}': unknown views; choose 1, flips or dihedral")]
    Views { value: String },
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
/// The efficientnet-lite-pytorch README shows ImageNet mean/std instead, but
/// its weights are converted from TF: on scikit-image's samples the reference
/// model is clearly more confident with 127/128 (coffee: espresso 0.95 against
/// 0.78; rocket: missile 0.30 against 0.21), so the TF constants stay. The
/// 0.875 center crop below is TF's eval crop (size / (size + 32) at 224).
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

/// CLIP's own normalisation (OpenAI `clip` preprocessing).
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

fn pooled_only(
    name: &'static str,
    family: &'static str,
    input_size: u32,
    feature_dim: usize,
) -> EncoderSpec {
    EncoderSpec {
        name,
        family,
        input_size,
        feature_dim,
        spatial: None,
        preprocess: preprocess(input_size, IMAGENET_MEAN, IMAGENET_STD),
    }
}

fn dinov2(name: &'static str, config: dinov2::Config) -> EncoderSpec {
    let side = 224 / 14;
    EncoderSpec {
        spatial: Some(SpatialShape {
            channels: config.embed_dim(),
            height: side,
            width: side,
        }),
        ..pooled_only(name, "dinov2", 224, config.embed_dim())
    }
}

fn efficientnet_b(name: &'static str, variant: u8) -> EncoderSpec {
    let config = efficientnet::Config { variant };
    pooled_only(
        name,
        "efficientnet",
        config.input_size(),
        config.feature_dim(),
    )
}

/// Every encoder lazarus knows, in display order.
///
/// Spatial maps: EfficientNet-Lite gives the head output (stride 32,
/// 1280 × ⌈size/32⌉²) as `spec.spatial`, and through `forward_maps` the
/// stride-16 map before it; DINOv2 gives its patch tokens (embed_dim ×
/// (224/14)²). The other families expose pooled features only.
pub fn registry() -> Vec<EncoderSpec> {
    vec![
        lite("efficientnet-lite0", 224),
        lite("efficientnet-lite1", 240),
        lite("efficientnet-lite2", 260),
        lite("efficientnet-lite3", 280),
        lite("efficientnet-lite4", 300),
        pooled_only(
            "resnet18",
            "resnet",
            224,
            resnet::Config::Resnet18.feature_dim(),
        ),
        pooled_only(
            "resnet34",
            "resnet",
            224,
            resnet::Config::Resnet34.feature_dim(),
        ),
        pooled_only(
            "resnet50",
            "resnet",
            224,
            resnet::Config::Resnet50.feature_dim(),
        ),
        efficientnet_b("efficientnet-b0", 0),
        efficientnet_b("efficientnet-b1", 1),
        efficientnet_b("efficientnet-b2", 2),
        efficientnet_b("efficientnet-b3", 3),
        efficientnet_b("efficientnet-b4", 4),
        efficientnet_b("efficientnet-b5", 5),
        efficientnet_b("efficientnet-b6", 6),
        efficientnet_b("efficientnet-b7", 7),
        pooled_only(
            "convnext-atto",
            "convnext",
            224,
            convnext::Config::Atto.feature_dim(),
        ),
        pooled_only(
            "convnext-femto",
            "convnext",
            224,
            convnext::Config::Femto.feature_dim(),
        ),
        pooled_only(
            "convnext-pico",
            "convnext",
            224,
            convnext::Config::Pico.feature_dim(),
        ),
        pooled_only(
            "convnext-nano",
            "convnext",
            224,
            convnext::Config::Nano.feature_dim(),
        ),
        pooled_only(
            "convnext-tiny",
            "convnext",
            224,
            convnext::Config::Tiny.feature_dim(),
        ),
        pooled_only(
            "convnext-small",
            "convnext",
            224,
            convnext::Config::Small.feature_dim(),
        ),
        pooled_only(
            "convnext-base",
            "convnext",
            224,
            convnext::Config::Base.feature_dim(),
        ),
        dinov2("dinov2-vits14", dinov2::Config::VitSmall14),
        dinov2("dinov2-vitb14", dinov2::Config::VitBase14),
        EncoderSpec {
            preprocess: PreprocessConfig {
                // OpenAI CLIP resizes the shorter side straight to 224, then crops.
                resize: ResizePolicy::ShorterSideThenCenterCrop {
                    resize_shorter_to: 224,
                },
                ..preprocess(224, CLIP_MEAN, CLIP_STD)
            },
            ..pooled_only("clip-vit-b32", "clip", 224, clip::ClipVision::feature_dim())
        },
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

/// One spatial feature map of a forward pass.
#[derive(Debug, Clone)]
pub struct FeatureMap {
    /// The input pixels per map cell (16 for Lite's stride-16 map, 14 for DINOv2 patches).
    pub stride: usize,
    /// [n, channels, height, width], f32.
    pub values: Tensor,
}

/// What a forward pass for dense tasks (segmentation) returns.
#[derive(Debug, Clone)]
pub struct FeatureMaps {
    /// [n, feature_dim], f32: the same pooled features as `forward_pooled`.
    pub pooled: Tensor,
    /// Every map the family exposes, finest first: Lite's stride-16 and
    /// stride-32 maps, DINOv2's patch tokens.
    pub maps: Vec<FeatureMap>,
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
    /// Returns pooled features and, when the spec has one, the spatial map.
    fn forward(&self, images: &Tensor) -> Result<EncoderOutput, EncoderError>;
    /// Pooled features only (of the layers it was loaded with): skips work
    /// some families need for the spatial map.
    fn forward_pooled(&self, images: &Tensor) -> Result<Tensor, EncoderError>;
    /// Pooled features and the spatial maps `maps` names, finest first
    /// (`SpatialMaps::default()`: every map of the family); an encoder
    /// without spatial maps returns an empty list. Maps the family cannot
    /// give are refused.
    fn forward_maps(
        &self,
        images: &Tensor,
        maps: &SpatialMaps,
    ) -> Result<FeatureMaps, EncoderError>;
}

/// Builds `spec`'s encoder on `device` from `source`. Reading files is left to
/// `weights`; the models themselves only see tensors.
pub fn load_encoder(
    spec: &EncoderSpec,
    source: WeightsSource,
    device: &Device,
) -> Result<Box<dyn Encoder>, EncoderError> {
    load_encoder_layers(spec, source, device, &PooledLayers::last())
}

/// As [`load_encoder`], with pooled features made of `layers`.
pub fn load_encoder_layers(
    spec: &EncoderSpec,
    source: WeightsSource,
    device: &Device,
    layers: &PooledLayers,
) -> Result<Box<dyn Encoder>, EncoderError> {
    layers.check(spec)?;
    let weights_error = |source| EncoderError::Weights {
        encoder: spec.name.to_string(),
        source: Box::new(source),
    };
    let (backend, origin, sha256): (Box<dyn SimpleBackend>, String, Option<String>) = match &source
    {
        WeightsSource::Random { seed } => (
            Box::new(backend::RandomTensors { seed: *seed }),
            format!("random weights (seed {seed})"),
            None,
        ),
        WeightsSource::File(path) => {
            let (tensors, sha256) =
                weights::load_tensors_with_sha256(path, device).map_err(weights_error)?;
            (
                Box::new(backend::StrictTensors(tensors)),
                path.display().to_string(),
                Some(sha256),
            )
        }
        WeightsSource::Installed => {
            let installed =
                weights::installed(spec.name).ok_or_else(|| EncoderError::NotInstalled {
                    encoder: spec.name.to_string(),
                })?;
            let (tensors, actual) = weights::load_tensors_with_sha256(&installed.path, device)
                .map_err(weights_error)?;
            // Features are labelled with this sha256: it must be the file's.
            if actual != installed.sha256 {
                return Err(weights_error(WeightsError::ChecksumMismatch {
                    path: installed.path.display().to_string(),
                    expected: installed.sha256,
                    actual,
                }));
            }
            (
                Box::new(backend::StrictTensors(tensors)),
                installed.path.display().to_string(),
                Some(installed.sha256),
            )
        }
    };
    let build_error = |err: candle_core::Error| EncoderError::Build {
        encoder: spec.name.to_string(),
        origin: origin.clone(),
        message: err.to_string(),
    };
    let model = Model::build(spec, backend, device).map_err(build_error)?;
    Ok(Box::new(Loaded {
        spec: spec.clone(),
        device: device.clone(),
        sha256,
        model,
        layers: layers.clone(),
    }))
}

/// The network behind each family.
enum Model {
    Lite(efficientnet_lite::EfficientNetLite),
    ResNet(resnet::ResNet),
    EfficientNet(efficientnet::EfficientNet),
    ConvNeXt(convnext::ConvNeXt),
    DinoV2(dinov2::DinoV2),
    Clip(clip::ClipVision),
}

impl Model {
    fn build(
        spec: &EncoderSpec,
        backend: Box<dyn SimpleBackend>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        use efficientnet_lite::{Config as Lite, EfficientNetLite};
        let vb = |backend: Box<dyn SimpleBackend>| {
            VarBuilder::from_backend(backend, DType::F32, device.clone())
        };
        Ok(match spec.name {
            name if Lite::for_name(name).is_some() => {
                let config = Lite::for_name(name).expect("checked by the guard");
                Model::Lite(EfficientNetLite::new(config, vb(backend))?)
            }
            "resnet18" => {
                Model::ResNet(resnet::ResNet::new(resnet::Config::Resnet18, vb(backend))?)
            }
            "resnet34" => {
                Model::ResNet(resnet::ResNet::new(resnet::Config::Resnet34, vb(backend))?)
            }
            "resnet50" => {
                Model::ResNet(resnet::ResNet::new(resnet::Config::Resnet50, vb(backend))?)
            }
            name if name.starts_with("efficientnet-b") => {
                let variant = name["efficientnet-b".len()..]
                    .parse::<u8>()
                    .map_err(|_| candle_core::Error::Msg(format!("bad variant in '{name}'")))?;
                let config = efficientnet::Config { variant };
                Model::EfficientNet(efficientnet::EfficientNet::new(config, backend, device)?)
            }
            name if name.starts_with("convnext-") => {
                use convnext::Config as C;
                let config = match &name["convnext-".len()..] {
                    "atto" => C::Atto,
                    "femto" => C::Femto,
                    "pico" => C::Pico,
                    "nano" => C::Nano,
                    "tiny" => C::Tiny,
                    "small" => C::Small,
                    "base" => C::Base,
                    other => candle_core::bail!("unknown convnext size '{other}'"),
                };
                Model::ConvNeXt(convnext::ConvNeXt::new(config, vb(backend))?)
            }
            "dinov2-vits14" => Model::DinoV2(dinov2::DinoV2::new(
                dinov2::Config::VitSmall14,
                backend,
                device,
            )?),
            "dinov2-vitb14" => Model::DinoV2(dinov2::DinoV2::new(
                dinov2::Config::VitBase14,
                backend,
                device,
            )?),
            "clip-vit-b32" => Model::Clip(clip::ClipVision::new(vb(backend))?),
            other => candle_core::bail!("no model is wired for '{other}'"),
        })
    }

    fn forward(
        &self,
        images: &Tensor,
        with_spatial: bool,
        layers: &PooledLayers,
    ) -> candle_core::Result<EncoderOutput> {
        let pooled_only = |pooled| EncoderOutput {
            pooled,
            spatial: None,
        };
        Ok(match self {
            Model::Lite(model) => {
                let features = model.features(images, &[])?;
                EncoderOutput {
                    pooled: lite_pooled(model, &features, layers)?,
                    spatial: with_spatial.then_some(features.stride32),
                }
            }
            Model::ResNet(model) => pooled_only(model.forward(images)?),
            Model::EfficientNet(model) => pooled_only(model.forward(images)?),
            Model::ConvNeXt(model) => pooled_only(model.forward(images)?),
            Model::Clip(model) => pooled_only(model.forward(images)?),
            Model::DinoV2(model) => EncoderOutput {
                pooled: model.pooled(images)?,
                spatial: if with_spatial {
                    Some(model.patch_tokens(images)?)
                } else {
                    None
                },
            },
        })
    }
}

impl Model {
    /// `maps` was checked against the family (`SpatialMaps::check`).
    fn forward_maps(
        &self,
        images: &Tensor,
        maps: &SpatialMaps,
    ) -> candle_core::Result<FeatureMaps> {
        Ok(match self {
            Model::Lite(model) => {
                // The stride-32 map is the head output, always computed.
                let block_strides: Vec<usize> = maps
                    .strides()
                    .iter()
                    .copied()
                    .filter(|&stride| stride != 32)
                    .collect();
                let features = model.features(images, &block_strides)?;
                let mut out: Vec<FeatureMap> = block_strides
                    .into_iter()
                    .zip(features.maps)
                    .map(|(stride, values)| FeatureMap { stride, values })
                    .collect();
                if maps.strides().contains(&32) {
                    out.push(FeatureMap {
                        stride: 32,
                        values: features.stride32,
                    });
                }
                FeatureMaps {
                    pooled: features.pooled,
                    maps: out,
                }
            }
            Model::DinoV2(model) => FeatureMaps {
                pooled: model.pooled(images)?,
                maps: vec![FeatureMap {
                    stride: 14,
                    values: model.patch_tokens(images)?,
                }],
            },
            other => FeatureMaps {
                pooled: other.forward(images, false, &PooledLayers::last())?.pooled,
                maps: Vec::new(),
            },
        })
    }
}

/// A Lite forward pass's pooled features of `layers`: the chosen stages'
/// columns of `features.stages`, then the head's pooled output.
fn lite_pooled(
    model: &efficientnet_lite::EfficientNetLite,
    features: &efficientnet_lite::Features,
    layers: &PooledLayers,
) -> candle_core::Result<Tensor> {
    if layers.is_last() {
        return Ok(features.pooled.clone());
    }
    let channels = model.config().stage_channels();
    let mut parts = layers
        .stage_columns(&channels)
        .into_iter()
        .map(|(offset, width)| features.stages.narrow(1, offset, width))
        .collect::<candle_core::Result<Vec<_>>>()?;
    if layers.head() {
        parts.push(features.pooled.clone());
    }
    Tensor::cat(&parts, 1)
}

struct Loaded {
    spec: EncoderSpec,
    device: Device,
    sha256: Option<String>,
    model: Model,
    layers: PooledLayers,
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
        self.run(images, true)
    }

    fn forward_pooled(&self, images: &Tensor) -> Result<Tensor, EncoderError> {
        Ok(self.run(images, false)?.pooled)
    }

    fn forward_maps(
        &self,
        images: &Tensor,
        maps: &SpatialMaps,
    ) -> Result<FeatureMaps, EncoderError> {
        maps.check(&self.spec)?;
        let images = self.checked_input(images)?;
        self.model
            .forward_maps(&images, maps)
            .map_err(|source| EncoderError::Forward {
                encoder: self.spec.name.to_string(),
                source,
            })
    }
}

impl Loaded {
    fn run(&self, images: &Tensor, with_spatial: bool) -> Result<EncoderOutput, EncoderError> {
        let images = self.checked_input(images)?;
        self.model
            .forward(&images, with_spatial, &self.layers)
            .map_err(|source| EncoderError::Forward {
                encoder: self.spec.name.to_string(),
                source,
            })
    }

    /// The batch as f32 on the encoder's device, after checking its shape.
    fn checked_input(&self, images: &Tensor) -> Result<Tensor, EncoderError> {
        let size = self.spec.input_size as usize;
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != size || dims[3] != size {
            return Err(EncoderError::Input {
                encoder: self.spec.name.to_string(),
                got: dims.to_vec(),
                size,
            });
        }
        images
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&self.device))
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
    let config = Config::for_name(name).ok_or_else(|| EncoderError::Unknown {
        name: name.to_string(),
        known: "efficientnet-lite0 … efficientnet-lite4 (the encoders with an ImageNet classifier)"
            .into(),
    })?;
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
