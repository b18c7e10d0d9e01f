//! Reading masks: 8- or 16-bit PNG or TIFF (any format the `image` crate
//! decodes), as binary (value > 0) or as class indices.

use std::path::Path;

use image::{DynamicImage, GrayImage, imageops::FilterType};

use super::SegmentError;
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
pub fn read_mask(path: &Path, kind: MaskKind) -> Result<Mask, SegmentError> {
    let unreadable = |message: String| SegmentError::Mask {
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

    /// The mask as an 8-bit image (class index per pixel).
    pub fn to_image(&self) -> GrayImage {
        GrayImage::from_raw(self.width, self.height, self.classes.clone())
            .expect("width x height values")
    }
}

/// Resizes a class-index image with nearest neighbour (no new classes appear).
pub fn resize_classes(image: &GrayImage, width: u32, height: u32) -> GrayImage {
    image::imageops::resize(image, width, height, FilterType::Nearest)
}
