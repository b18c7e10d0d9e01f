//! ResNet-18/34/50 from candle-transformers (torchvision / timm naming:
//! `conv1`, `bn1`, `layer1.0.conv1`, …; any `fc.*` in the file is ignored).
//! Output: the globally averaged last stage, [n, 512] (18, 34) or [n, 2048] (50).
//! candle's model pools internally, so no spatial map is exposed.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Func, VarBuilder};
use candle_transformers::models::resnet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Resnet18,
    Resnet34,
    Resnet50,
}

impl Config {
    pub fn feature_dim(self) -> usize {
        match self {
            Config::Resnet18 | Config::Resnet34 => 512,
            Config::Resnet50 => 2048,
        }
    }
}

pub struct ResNet {
    model: Func<'static>,
}

impl ResNet {
    pub fn new(config: Config, vb: VarBuilder<'static>) -> Result<Self> {
        let model = match config {
            Config::Resnet18 => resnet::resnet18_no_final_layer(vb)?,
            Config::Resnet34 => resnet::resnet34_no_final_layer(vb)?,
            Config::Resnet50 => resnet::resnet50_no_final_layer(vb)?,
        };
        Ok(Self { model })
    }

    /// [n, 3, H, W] → [n, feature_dim].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.model.forward(images)
    }
}
