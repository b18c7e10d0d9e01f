//! The feature maps of a batch of tiles as one grid of positions (Lite0:
//! stride 32 upsampled onto stride 16, 1280 + 112 channels). Segmentation
//! heads and patch-level anomaly scorers both read positions through it.

use candle_core::{Device, Tensor};

use super::SpatialError;
use super::stitch::upsample_operator;
use crate::features::MapShape;

/// The fixed parts around a per-position model: every coarser map
/// upsampled bilinearly to the finest map's grid, concatenated along
/// channels and standardised per channel (zeros and ones: no
/// standardisation, as patch-level anomaly scorers read it).
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
    ) -> Result<Self, SpatialError> {
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
            .collect::<Result<_, SpatialError>>()?;
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
    pub fn positions(&self, maps: &[Tensor]) -> Result<Tensor, SpatialError> {
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
}
