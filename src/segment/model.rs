//! The segmentation model around a per-position head: the fixed bilinear
//! operators, upsampling and concatenation of the maps, standardisation,
//! the loss, and loading a trained head for prediction.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::SegmentError;
use super::tile::TileConfig;
use crate::dataset::MaskKind;
use crate::features::MapShape;
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

/// Map shapes as stored in head and scorer files: [stride, channels,
/// height, width] each, finest first.
pub fn map_arrays(maps: &[MapShape]) -> Vec<[usize; 4]> {
    maps.iter()
        .map(|m| [m.stride, m.channels, m.height, m.width])
        .collect()
}

/// The inverse of `map_arrays`.
pub fn map_shapes(maps: &[[usize; 4]]) -> Vec<MapShape> {
    maps.iter()
        .map(|&[stride, channels, height, width]| MapShape {
            stride,
            channels,
            height,
            width,
        })
        .collect()
}

impl SegmentHeadInfo {
    fn map_shapes(&self) -> Vec<MapShape> {
        map_shapes(&self.maps)
    }

    /// Classes a pixel can take (background included).
    pub fn classes(&self) -> usize {
        self.outputs.max(2)
    }
}

/// Bilinear interpolation weights from `input` to `output` samples, as
/// PyTorch's `interpolate(mode="bilinear", align_corners=False)`:
/// row-major [output, input].
pub fn bilinear_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut matrix = vec![0f32; output * input];
    let scale = input as f64 / output as f64;
    for i in 0..output {
        let source = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let low = (source.floor() as usize).min(input - 1);
        let high = (low + 1).min(input - 1);
        let weight = (source - low as f64) as f32;
        matrix[i * input + low] += 1.0 - weight;
        matrix[i * input + high] += weight;
    }
    matrix
}

/// The transposed 2-D bilinear operator [in_h * in_w, out_h * out_w]: a row
/// of flattened maps times it gives the upsampled map (the Kronecker product
/// of the two 1-D operators, so autodiff sees one matmul).
pub fn upsample_operator(
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
    device: &Device,
) -> Result<Tensor, SegmentError> {
    let rows = bilinear_matrix(in_h, out_h);
    let columns = bilinear_matrix(in_w, out_w);
    let mut operator = vec![0f32; in_h * in_w * out_h * out_w];
    for oy in 0..out_h {
        for ox in 0..out_w {
            let out = oy * out_w + ox;
            for iy in 0..in_h {
                let wy = rows[oy * in_h + iy];
                if wy == 0.0 {
                    continue;
                }
                for ix in 0..in_w {
                    let wx = columns[ox * in_w + ix];
                    if wx != 0.0 {
                        operator[(iy * in_w + ix) * out_h * out_w + out] = wy * wx;
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        operator,
        (in_h * in_w, out_h * out_w),
        device,
    )?)
}

/// The fixed parts of the model around the head: map upsampling,
/// concatenation and standardisation, and the logits' upsampling.
pub struct Geometry {
    maps: Vec<MapShape>,
    /// (height, width) of the finest map.
    pub grid: (usize, usize),
    /// Channels of all maps together: the head's input size.
    pub channels: usize,
    /// [1, channels, 1, 1].
    mean: Tensor,
    inverse_std: Tensor,
    map_upsample: Vec<Option<Tensor>>,
}

impl Geometry {
    pub fn new(
        maps: Vec<MapShape>,
        mean: &[f32],
        std: &[f32],
        device: &Device,
    ) -> Result<Self, SegmentError> {
        let grid = (maps[0].height, maps[0].width);
        let channels = maps.iter().map(|m| m.channels).sum();
        let map_upsample = maps
            .iter()
            .map(|m| {
                if (m.height, m.width) == grid {
                    Ok(None)
                } else {
                    upsample_operator((m.height, m.width), grid, device).map(Some)
                }
            })
            .collect::<Result<_, SegmentError>>()?;
        let inverse: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
        Ok(Geometry {
            grid,
            channels,
            mean: Tensor::from_slice(mean, (1, channels, 1, 1), device)?,
            inverse_std: Tensor::from_vec(inverse, (1, channels, 1, 1), device)?,
            map_upsample,
            maps,
        })
    }

    /// Maps ([n, c, h, w] f32 each, `maps` order) to standardised positions
    /// [n * grid_h * grid_w, channels].
    pub fn positions(&self, maps: &[Tensor]) -> Result<Tensor, SegmentError> {
        let n = maps[0].dim(0)?;
        let (gh, gw) = self.grid;
        let mut parts = Vec::with_capacity(maps.len());
        for ((map, shape), upsample) in maps.iter().zip(&self.maps).zip(&self.map_upsample) {
            parts.push(match upsample {
                None => map.clone(),
                Some(operator) => map
                    .reshape((n * shape.channels, shape.height * shape.width))?
                    .matmul(operator)?
                    .reshape((n, shape.channels, gh, gw))?,
            });
        }
        let x = Tensor::cat(&parts, 1)?
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&self.inverse_std)?;
        Ok(x.permute((0, 2, 3, 1))?
            .reshape((n * gh * gw, self.channels))?)
    }

    /// Head logits per grid cell: [n, outputs, grid_h * grid_w].
    pub fn grid_logits(
        &self,
        head: &Head,
        maps: &[Tensor],
        dtype: DType,
        dropout: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor, SegmentError> {
        let n = maps[0].dim(0)?;
        let (gh, gw) = self.grid;
        let positions = self.positions(maps)?.to_dtype(dtype)?;
        let logits = head.forward(&positions, dtype, dropout)?;
        let outputs = logits.dim(1)?;
        Ok(logits
            .reshape((n, gh * gw, outputs))?
            .transpose(1, 2)?
            .contiguous()?)
    }
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
    let path = run_dir.join("head.safetensors");
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
    fn bilinear_matrix_matches_pytorch_align_corners_false() {
        // torch.nn.functional.interpolate(torch.eye(2)[None], size=4,
        // mode="linear", align_corners=False) gives, per output sample,
        // weights [1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1].
        let matrix = bilinear_matrix(2, 4);
        let expected = [1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0];
        for (got, want) in matrix.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{matrix:?}");
        }
        // Each output row sums to 1 for any ratio.
        let matrix = bilinear_matrix(7, 14);
        for row in matrix.chunks(7) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

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
