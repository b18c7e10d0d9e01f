//! ConvNeXt atto … base from candle-transformers (timm naming: `stem.0`,
//! `stages.N.blocks.M…`; `head.*` is ignored). Output: the last stage averaged
//! over H and W, before timm's head LayerNorm. No spatial map is exposed.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Func, VarBuilder};
use candle_transformers::models::convnext;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Atto,
    Femto,
    Pico,
    Nano,
    Tiny,
    Small,
    Base,
}

impl Config {
    /// Channels of the last stage.
    pub fn feature_dim(self) -> usize {
        match self {
            Config::Atto => 320,
            Config::Femto => 384,
            Config::Pico => 512,
            Config::Nano => 640,
            Config::Tiny | Config::Small => 768,
            Config::Base => 1024,
        }
    }

    fn candle(self) -> convnext::Config {
        match self {
            Config::Atto => convnext::Config::atto(),
            Config::Femto => convnext::Config::femto(),
            Config::Pico => convnext::Config::pico(),
            Config::Nano => convnext::Config::nano(),
            Config::Tiny => convnext::Config::tiny(),
            Config::Small => convnext::Config::small(),
            Config::Base => convnext::Config::base(),
        }
    }
}

pub struct ConvNeXt {
    model: Func<'static>,
}

impl ConvNeXt {
    pub fn new(config: Config, vb: VarBuilder<'static>) -> Result<Self> {
        Ok(Self {
            model: convnext::convnext_no_final_layer(&config.candle(), vb)?,
        })
    }

    /// [n, 3, H, W] → [n, feature_dim].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.model.forward(images)
    }
}
