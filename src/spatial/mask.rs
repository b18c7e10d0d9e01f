//! Reading masks: 8- or 16-bit PNG or TIFF (any format the `image` crate
//! decodes), as binary (value > 0) or as class indices.

use std::path::Path;

use image::DynamicImage;

use super::SpatialError;
use crate::dataset::MaskKind;

/// A decoded mask: one class index per pixel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub classes: Vec<u8>,
}

/// Reads a mask. Binary masks map every value above 0 to class 1; index
/// masks keep the stored value (first channel, at its own bit depth), which
/// must be below 256.
pub fn read_mask(path: &Path, kind: MaskKind) -> Result<Mask, SpatialError> {
    let unreadable = |message: String| SpatialError::Mask {
        path: path.to_path_buf(),
        message,
    };
    let image = image::ImageReader::open(path)
        .map_err(|e| unreadable(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| unreadable(e.to_string()))?
        .decode()
        .map_err(|e| unreadable(format!("not a readable mask image: {e}")))?;
    let (width, height) = (image.width(), image.height());
    // First channel at the stored depth: 16-bit masks keep values above 255.
    let values: Vec<u16> = match &image {
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let rgba = image.to_rgba16();
            rgba.pixels().map(|p| p.0[0]).collect()
        }
        _ => {
            let rgba = image.to_rgba8();
            rgba.pixels().map(|p| p.0[0] as u16).collect()
        }
    };
    let classes = match kind {
        MaskKind::Binary => values.iter().map(|&v| u8::from(v > 0)).collect(),
        MaskKind::Index => values
            .iter()
            .map(|&v| {
                u8::try_from(v).map_err(|_| {
                    unreadable(format!(
                        "class index {v} is above 255; index masks hold at most 256 classes"
                    ))
                })
            })
            .collect::<Result<Vec<u8>, _>>()?,
    };
    Ok(Mask {
        width,
        height,
        classes,
    })
}

impl Mask {
    /// The classes inside `tile` ([x, y, width, height]), resampled to
    /// `size` x `size` by nearest neighbour (the tile is stretched, as the
    /// image tile is for the encoder).
    pub fn tile_resized(&self, tile: [u32; 4], size: u32) -> Vec<u8> {
        let [x, y, w, h] = tile;
        let mut out = Vec::with_capacity((size * size) as usize);
        for row in 0..size {
            // Centre of the output pixel mapped into the tile.
            let source_y = y + (((row as f64 + 0.5) * h as f64 / size as f64) as u32).min(h - 1);
            for column in 0..size {
                let source_x =
                    x + (((column as f64 + 0.5) * w as f64 / size as f64) as u32).min(w - 1);
                out.push(self.classes[(source_y * self.width + source_x) as usize]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma};

    #[test]
    fn a_tile_is_resampled_by_nearest_neighbour() {
        // 4 x 2 mask; the right half [2, 0, 2, 2] stretched to 4 x 4 repeats
        // each of its pixels in a 2 x 2 block.
        let mask = Mask {
            width: 4,
            height: 2,
            classes: vec![0, 0, 1, 2, 0, 0, 3, 4],
        };
        assert_eq!(
            mask.tile_resized([2, 0, 2, 2], 4),
            vec![1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]
        );
    }

    #[test]
    fn sixteen_bit_masks_read_as_binary_or_refuse_indices_above_255() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mask.png");
        let values = [0u16, 1, 300, 65535];
        ImageBuffer::<Luma<u16>, Vec<u16>>::from_vec(4, 1, values.to_vec())
            .unwrap()
            .save(&path)
            .unwrap();
        let binary = read_mask(&path, MaskKind::Binary).unwrap();
        assert_eq!(binary.classes, vec![0, 1, 1, 1]);
        let error = read_mask(&path, MaskKind::Index).unwrap_err().to_string();
        assert!(
            error.contains("mask.png") && error.contains("class index 300"),
            "{error}"
        );
    }
}
