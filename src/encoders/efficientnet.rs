//! EfficientNet-B0..B7 from candle-transformers (torchvision naming:
//! `features.N.M.block…`). candle's model ends in its classifier; it is built
//! here with `classifier.1` replaced by an identity, so `forward` returns the
//! pooled features exactly, [n, 4 × last block channels]. Weights' own
//! classifier tensors are ignored. No spatial map is exposed.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::efficientnet::{EfficientNet as Model, MBConvConfig};

use super::backend::{WithOverrides, identity_linear};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// 0 for B0 … 7 for B7.
    pub variant: u8,
}

impl Config {
    /// Pooled feature width: 4 × the last block's output channels.
    pub fn feature_dim(self) -> usize {
        [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560][self.variant as usize]
    }

    /// The resolution each variant was trained at.
    pub fn input_size(self) -> u32 {
        [224, 240, 260, 300, 380, 456, 528, 600][self.variant as usize]
    }

    fn blocks(self) -> Vec<MBConvConfig> {
        match self.variant {
            0 => MBConvConfig::b0(),
            1 => MBConvConfig::b1(),
            2 => MBConvConfig::b2(),
            3 => MBConvConfig::b3(),
            4 => MBConvConfig::b4(),
            5 => MBConvConfig::b5(),
            6 => MBConvConfig::b6(),
            _ => MBConvConfig::b7(),
        }
    }
}

pub struct EfficientNet {
    model: Model,
}

impl EfficientNet {
    /// Builds from a tensor backend (the classifier is overridden, so this
    /// takes the backend rather than a `VarBuilder`).
    pub fn new(
        config: Config,
        backend: Box<dyn SimpleBackend>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let dim = config.feature_dim();
        let backend = WithOverrides {
            inner: backend,
            tensors: identity_linear("classifier.1", dim, dim)?,
        };
        let vb =
            VarBuilder::from_backend(Box::new(backend), candle_core::DType::F32, device.clone());
        Ok(Self {
            model: Model::new(vb, config.blocks(), dim)?,
        })
    }

    /// [n, 3, H, W] → [n, feature_dim].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.model.forward(images)
    }
}
