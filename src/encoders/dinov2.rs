//! DINOv2 ViT-S/14 and ViT-B/14 from candle-transformers (original / timm
//! naming: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N…`, `norm`).
//!
//! Pooled output: the final-normed class token, [n, embed_dim]. candle's
//! `forward` ends in a 1000-way head over cat(class token, mean patch token);
//! the head is replaced by an identity on its first 1000 inputs, whose first
//! embed_dim outputs are then the class token exactly (embed_dim ≤ 1000).
//! Spatial output: the final-normed patch tokens, [n, embed_dim, H/14, W/14].
//! The position embeddings (trained at 518 px) are resized with nearest
//! neighbour in candle, not bicubic as in the original.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::dinov2::DinoVisionTransformer;

use super::backend::{WithOverrides, identity_linear};

/// candle's DINOv2 head width (ImageNet classes).
const HEAD_CLASSES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    VitSmall14,
    VitBase14,
}

impl Config {
    pub fn embed_dim(self) -> usize {
        match self {
            Config::VitSmall14 => 384,
            Config::VitBase14 => 768,
        }
    }

    fn heads(self) -> usize {
        match self {
            Config::VitSmall14 => 6,
            Config::VitBase14 => 12,
        }
    }
}

pub struct DinoV2 {
    config: Config,
    model: DinoVisionTransformer,
}

impl DinoV2 {
    pub fn new(
        config: Config,
        backend: Box<dyn SimpleBackend>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let dim = config.embed_dim();
        let backend = WithOverrides {
            inner: backend,
            tensors: identity_linear("head", HEAD_CLASSES, 2 * dim)?,
        };
        let vb =
            VarBuilder::from_backend(Box::new(backend), candle_core::DType::F32, device.clone());
        let model = DinoVisionTransformer::new(vb, 12, dim, config.heads())?;
        Ok(Self { config, model })
    }

    /// [n, 3, H, W] → class token [n, embed_dim].
    pub fn pooled(&self, images: &Tensor) -> Result<Tensor> {
        per_image(images, |image| {
            self.model
                .forward(image)?
                .narrow(D::Minus1, 0, self.config.embed_dim())
        })
    }

    /// [n, 3, H, W] → patch tokens [n, embed_dim, H/14, W/14].
    pub fn patch_tokens(&self, images: &Tensor) -> Result<Tensor> {
        let last = 11;
        per_image(images, |image| {
            self.model
                .get_intermediate_layers(image, &[last], true, false, true)?
                .squeeze(0)
        })
    }
}

/// candle's DINOv2 concatenates an unexpanded class token, so it only takes
/// a batch of one: run the images one by one and stack the results.
fn per_image(images: &Tensor, run: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let outputs = (0..images.dim(0)?)
        .map(|i| run(&images.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outputs, 0)
}
