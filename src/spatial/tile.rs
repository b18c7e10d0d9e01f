//! Tiling: how a large image is cut into overlapping square tiles at
//! extraction, so that prediction can stitch the tiles' logits back
//! (`super::stitch::Stitcher`).

use serde::{Deserialize, Serialize};

use super::SpatialError;
use crate::encoders::EncoderSpec;
use crate::preprocess::{PreprocessConfig, PreprocessError};

/// Tile size and overlap in original-image pixels (`--tile-size`, `--tile-overlap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileConfig {
    pub size: u32,
    pub overlap: u32,
}

impl Default for TileConfig {
    fn default() -> Self {
        TileConfig {
            size: 512,
            overlap: 64,
        }
    }
}

impl TileConfig {
    pub fn validate(&self) -> Result<(), SpatialError> {
        if self.size < 16 {
            return Err(SpatialError::Invalid(format!(
                "tile size {} must be at least 16 pixels",
                self.size
            )));
        }
        if self.overlap >= self.size {
            return Err(SpatialError::Invalid(format!(
                "tile overlap {} must be smaller than the tile size {}",
                self.overlap, self.size
            )));
        }
        Ok(())
    }
}

/// Start positions along one side of `length` pixels: tiles every
/// `size - overlap` pixels, the last one flush with the end.
fn starts(length: u32, config: &TileConfig) -> Vec<u32> {
    if length <= config.size {
        return vec![0];
    }
    let step = config.size - config.overlap;
    let mut out: Vec<u32> = (0..)
        .map(|i| i * step)
        .take_while(|&start| start + config.size < length)
        .collect();
    out.push(length - config.size);
    out
}

/// The tiles of a `width` x `height` image as [x, y, width, height]. A side
/// no longer than the tile size is one tile as long as the side, so an image
/// that fits is a single tile covering it.
pub fn tiles(width: u32, height: u32, config: &TileConfig) -> Vec<[u32; 4]> {
    let tile_width = width.min(config.size);
    let tile_height = height.min(config.size);
    let mut out = Vec::new();
    for y in starts(height, config) {
        for x in starts(width, config) {
            out.push([x, y, tile_width, tile_height]);
        }
    }
    out
}

/// Spatial extraction stretches each tile to the input square (no crop), so
/// every pixel of the image lies in some tile and masks align with the maps.
/// Prediction on new images preprocesses tiles the same way.
pub fn spatial_preprocess(encoder: &EncoderSpec) -> PreprocessConfig {
    PreprocessConfig {
        resize: crate::preprocess::ResizePolicy::Stretch,
        ..encoder.preprocess.clone()
    }
}

/// One preprocessed tile: its place in the image and its CHW f32 pixels.
pub type PreparedTile = ([u32; 4], Vec<f32>);

/// Decodes an image file and cuts it into preprocessed tiles: each tile is
/// stretched to the input square (`preprocess` should be the spatial one,
/// see [`spatial_preprocess`]). Returns the decoded image too.
pub fn preprocess_tiles(
    path: &std::path::Path,
    preprocess: &PreprocessConfig,
    config: &TileConfig,
) -> Result<(image::RgbImage, Vec<PreparedTile>), PreprocessError> {
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Read {
        path: path.display().to_string(),
        source,
    })?;
    preprocess_tile_bytes(&bytes, path, preprocess, config)
}

/// `preprocess_tiles` of a file already read (`path` names it in errors).
pub fn preprocess_tile_bytes(
    bytes: &[u8],
    path: &std::path::Path,
    preprocess: &PreprocessConfig,
    config: &TileConfig,
) -> Result<(image::RgbImage, Vec<PreparedTile>), PreprocessError> {
    let image = crate::preprocess::decode_rgb8(bytes, path, preprocess.max_pixels)?;
    let size = (image.width(), image.height());
    let prepared = tiles(size.0, size.1, config)
        .into_iter()
        .map(|tile| {
            let [x, y, width, height] = tile;
            let square = if tile == [0, 0, size.0, size.1] {
                crate::preprocess::resize_and_crop(&image, preprocess)
            } else {
                let crop = image::imageops::crop_imm(&image, x, y, width, height).to_image();
                crate::preprocess::resize_and_crop(&crop, preprocess)
            };
            (
                tile,
                crate::preprocess::to_chw_normalized(&square, preprocess),
            )
        })
        .collect();
    Ok((image, prepared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_with_the_last_one_flush() {
        let config = TileConfig {
            size: 256,
            overlap: 32,
        };
        assert_eq!(tiles(200, 256, &config), vec![[0, 0, 200, 256]]);
        // 600 wide: starts 0, 224, then 344 flush with the end; 400 high: 0, 144.
        let cut = tiles(600, 400, &config);
        let xs: Vec<u32> = cut.iter().take(3).map(|t| t[0]).collect();
        assert_eq!(xs, vec![0, 224, 344]);
        assert_eq!(cut.len(), 6);
        assert_eq!(cut[5], [344, 144, 256, 256]);
        let mut covered = vec![false; 600 * 400];
        for [x, y, w, h] in cut {
            for row in y..y + h {
                for column in x..x + w {
                    covered[(row * 600 + column) as usize] = true;
                }
            }
        }
        assert!(covered.iter().all(|&c| c));
    }

    #[test]
    fn overlap_must_be_smaller_than_the_tile() {
        let error = TileConfig {
            size: 64,
            overlap: 64,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(error.contains("overlap 64"), "{error}");
    }
}
