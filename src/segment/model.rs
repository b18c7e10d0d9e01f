//! The segmentation model around a per-position head: its logits on the
//! maps' grid (`crate::spatial::grid::Geometry` upsamples, concatenates and
//! standardises the maps), the loss, and loading a trained head for
//! prediction.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::SegmentError;
use crate::dataset::MaskKind;
use crate::features::MapShape;
use crate::spatial::grid::Geometry;
use crate::spatial::tile::TileConfig;
use crate::train::config::TrainConfig;
use crate::train::head::Head;

/// The head file's metadata key holding `SegmentHeadInfo` as JSON.
pub const HEAD_INFO_KEY: &str = "segment";

/// Everything `predict` needs besides the head's tensors (head file metadata `segment`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentHeadInfo {
    pub encoder: String,
    pub fingerprint: String,
    /// [stride, channels, height, width] of each map, finest first.
    pub maps: Vec<[usize; 4]>,
    /// Head outputs: 1 (binary, sigmoid) or the number of classes (softmax).
    pub outputs: usize,
    pub mask_kind: MaskKind,
    /// Side of the mask a tile's logits were trained against.
    pub resolution: usize,
    pub tiling: Option<TileConfig>,
    pub weights: Option<String>,
}

impl SegmentHeadInfo {
    fn map_shapes(&self) -> Vec<MapShape> {
        crate::spatial::map_shapes(&self.maps)
    }

    /// Classes a pixel can take (background included).
    pub fn classes(&self) -> usize {
        self.outputs.max(2)
    }
}

/// Head logits per grid cell: [n, outputs, grid_h * grid_w].
pub fn grid_logits(
    geometry: &Geometry,
    head: &Head,
    maps: &[Tensor],
    dtype: DType,
    dropout: Option<&mut ChaCha8Rng>,
) -> Result<Tensor, SegmentError> {
    let n = maps[0].dim(0)?;
    let (gh, gw) = geometry.grid;
    let positions = geometry.positions(maps)?.to_dtype(dtype)?;
    let logits = head.forward(&positions, dtype, dropout)?;
    let outputs = logits.dim(1)?;
    Ok(logits
        .reshape((n, gh * gw, outputs))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Loss of logits [n, outputs, pixels] against targets: [n, pixels] of 0/1
/// (binary) or one-hot [n, classes, pixels]. BCE (or cross-entropy) over
/// every pixel plus 1 - soft Dice averaged over images (and classes). With
/// `pixel_weights` ([n, pixels]), each pixel's BCE or cross-entropy term is
/// multiplied by its weight before the mean (class weighting); Dice is not.
pub fn loss(
    logits: &Tensor,
    targets: &Tensor,
    pixel_weights: Option<&Tensor>,
) -> Result<Tensor, SegmentError> {
    let weighted_mean = |per_pixel: Tensor| -> Result<Tensor, SegmentError> {
        Ok(match pixel_weights {
            None => per_pixel.mean_all()?,
            Some(weights) => (per_pixel * weights)?.mean_all()?,
        })
    };
    if logits.dim(1)? == 1 {
        let z = logits.squeeze(1)?;
        // max(z, 0) - z y + log(1 + exp(-|z|)): stable for any z.
        let bce = weighted_mean(
            ((z.relu()? - (&z * targets)?)? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?,
        )?;
        let p = candle_nn::ops::sigmoid(&z)?;
        let overlap = (&p * targets)?.sum(1)?;
        let dice = ((overlap * 2.0)? + 1.0)?.div(&((p.sum(1)? + targets.sum(1)?)? + 1.0)?)?;
        Ok((bce + dice.mean_all()?.affine(-1.0, 1.0)?)?)
    } else {
        let log_p = candle_nn::ops::log_softmax(logits, 1)?;
        let cross_entropy = weighted_mean((&log_p * targets)?.sum(1)?)?.neg()?;
        let p = log_p.exp()?;
        let overlap = (&p * targets)?.sum(2)?;
        let dice = ((overlap * 2.0)? + 1.0)?.div(&((p.sum(2)? + targets.sum(2)?)? + 1.0)?)?;
        Ok((cross_entropy + dice.mean_all()?.affine(-1.0, 1.0)?)?)
    }
}

/// The class of each pixel: logit above 0 (binary) or the largest logit.
pub fn predicted_classes(logits: &Tensor) -> Result<Vec<Vec<u8>>, SegmentError> {
    if logits.dim(1)? == 1 {
        let z = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(z.into_iter()
            .map(|row| row.into_iter().map(|v| u8::from(v > 0.0)).collect())
            .collect())
    } else {
        let classes = logits.argmax(1)?.to_vec2::<u32>()?;
        Ok(classes
            .into_iter()
            .map(|row| row.into_iter().map(|c| c as u8).collect())
            .collect())
    }
}

/// A finished segmentation run's head, ready for new feature maps.
pub struct TrainedSegmentHead {
    pub info: SegmentHeadInfo,
    pub head: Head,
    pub geometry: Geometry,
}

/// Loads `head.safetensors` of a segmentation run.
pub fn load_head(
    run_dir: &Path,
    config: &TrainConfig,
    device: &Device,
) -> Result<TrainedSegmentHead, SegmentError> {
    let path = crate::experiments::run_files::RunFolder::new(run_dir).head();
    let info: SegmentHeadInfo = crate::train::checkpoint::header_json(&path, HEAD_INFO_KEY)?
        .ok_or_else(|| {
            SegmentError::Invalid(format!(
                "{} is not a segmentation head (no '{HEAD_INFO_KEY}' metadata)",
                path.display()
            ))
        })?;
    let tensors = crate::train::checkpoint::load_tensors(&path, device)?;
    let vector = |name: &str| -> Result<Vec<f32>, SegmentError> {
        Ok(tensors
            .get(name)
            .ok_or_else(|| {
                SegmentError::Invalid(format!("{} has no tensor {name}", path.display()))
            })?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    };
    let mean = vector("input_mean")?;
    let std = vector("input_std")?;
    let head = Head::from_tensors(&config.head, &tensors, mean.len())?;
    let geometry = Geometry::new(info.map_shapes(), &mean, &std, device)?;
    Ok(TrainedSegmentHead {
        info,
        head,
        geometry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_small_for_confident_correct_logits_and_large_for_wrong_ones() {
        let device = Device::Cpu;
        let targets = Tensor::new(&[[1f32, 1.0, 0.0, 0.0]], &device).unwrap();
        let right = Tensor::new(&[[[20f32, 20.0, -20.0, -20.0]]], &device).unwrap();
        let wrong = right.neg().unwrap();
        let right = loss(&right, &targets, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let wrong = loss(&wrong, &targets, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(right < 0.01, "{right}");
        // BCE of 20 per pixel; soft Dice: no overlap, sum p = 2 (the two
        // background pixels), sum y = 2, so 1 - 1 / (2 + 2 + 1) = 0.8.
        assert!((wrong - 20.8).abs() < 0.01, "{wrong}");

        // Index masks: one-hot targets [1, 3 classes, 2 pixels] (classes 2, 0).
        let one_hot = Tensor::new(&[[[0f32, 1.0], [0.0, 0.0], [1.0, 0.0]]], &device).unwrap();
        let right =
            Tensor::new(&[[[-20f32, 20.0], [-20.0, -20.0], [20.0, -20.0]]], &device).unwrap();
        let right = loss(&right, &one_hot, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(right < 0.01, "{right}");
        // Uniform logits: cross-entropy ln 3; soft Dice per class (2/3 + 1) /
        // (2/3 + 1 + 1) = 5/8 for the two present classes and 1 / (2/3 + 1)
        // = 3/5 for the absent one.
        let uniform = Tensor::zeros((1, 3, 2), DType::F32, &device).unwrap();
        let uniform = loss(&uniform, &one_hot, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let dice = (5.0 / 8.0 + 5.0 / 8.0 + 3.0 / 5.0) / 3.0;
        assert!(
            (uniform - (3f32.ln() + 1.0 - dice)).abs() < 1e-4,
            "{uniform}"
        );
    }

    #[test]
    fn pixel_weights_scale_the_bce_term_only() {
        let device = Device::Cpu;
        // Logits 0: BCE ln 2 per pixel; p = 0.5, so soft Dice is
        // (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3 and its term 1/3.
        let targets = Tensor::new(&[[1f32, 0.0]], &device).unwrap();
        let logits = Tensor::zeros((1, 1, 2), DType::F32, &device).unwrap();
        let plain = loss(&logits, &targets, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((plain - (2f32.ln() + 1.0 / 3.0)).abs() < 1e-5, "{plain}");
        // Weights 3 and 1: (3 ln 2 + ln 2) / 2 = 2 ln 2.
        let weights = Tensor::new(&[[3f32, 1.0]], &device).unwrap();
        let weighted = loss(&logits, &targets, Some(&weights))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (weighted - (2.0 * 2f32.ln() + 1.0 / 3.0)).abs() < 1e-5,
            "{weighted}"
        );
        // Index masks: uniform logits over 3 classes, cross-entropy ln 3 per
        // pixel; weights 2 and 0 give (2 ln 3 + 0) / 2 = ln 3 again.
        let one_hot = Tensor::new(&[[[0f32, 1.0], [0.0, 0.0], [1.0, 0.0]]], &device).unwrap();
        let uniform = Tensor::zeros((1, 3, 2), DType::F32, &device).unwrap();
        let plain = loss(&uniform, &one_hot, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let weights = Tensor::new(&[[2f32, 0.0]], &device).unwrap();
        let weighted = loss(&uniform, &one_hot, Some(&weights))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((plain - weighted).abs() < 1e-5, "{plain} {weighted}");
        let weights = Tensor::new(&[[4f32, 0.0]], &device).unwrap();
        let doubled = loss(&uniform, &one_hot, Some(&weights))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((doubled - plain - 3f32.ln()).abs() < 1e-5, "{doubled}");
    }
}
