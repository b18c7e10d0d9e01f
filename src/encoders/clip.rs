//! CLIP ViT-B/32 vision tower from candle-transformers (Hugging Face naming
//! under `vision_model.`: `embeddings.patch_embedding`, `pre_layrnorm`,
//! `encoder.layers.N…`, `post_layernorm`). Output: the post-layernorm class
//! token, [n, 768], before the visual projection. No spatial map is exposed.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};

pub struct ClipVision {
    model: ClipVisionTransformer,
}

impl ClipVision {
    pub fn feature_dim() -> usize {
        ClipVisionConfig::vit_base_patch32().embed_dim
    }

    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            model: ClipVisionTransformer::new(
                vb.pp("vision_model"),
                &ClipVisionConfig::vit_base_patch32(),
            )?,
        })
    }

    /// [n, 3, 224, 224] → [n, 768].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.model.forward(images)
    }
}
