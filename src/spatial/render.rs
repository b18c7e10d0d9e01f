//! Pictures of per-pixel results: class masks, their overlays on the
//! image, and PNG files written atomically.

use std::path::Path;

use image::{GrayImage, Luma, RgbImage};

use super::SpatialError;

/// Colours of classes 1, 2, ... in overlays.
const PALETTE: [[u8; 3]; 6] = [
    [255, 40, 40],
    [40, 200, 255],
    [255, 220, 0],
    [60, 220, 60],
    [220, 60, 255],
    [255, 140, 0],
];

/// A mask picture of one class per pixel (row-major); `binary` masks are
/// written 0/255, so they are visible and read back as binary.
pub fn mask_image(width: u32, height: u32, classes: &[u8], binary: bool) -> GrayImage {
    GrayImage::from_fn(width, height, |x, y| {
        let class = classes[(y * width + x) as usize];
        Luma([if binary && class > 0 { 255 } else { class }])
    })
}

/// The image with each non-background pixel blended half-way to its class colour.
pub fn class_overlay(image: &RgbImage, classes: &[u8]) -> RgbImage {
    let mut out = image.clone();
    for (pixel, &class) in out.pixels_mut().zip(classes) {
        if class > 0 {
            let colour = PALETTE[(class as usize - 1) % PALETTE.len()];
            for (value, tint) in pixel.0.iter_mut().zip(colour) {
                *value = ((*value as u16 + tint as u16) / 2) as u8;
            }
        }
    }
    out
}

/// Encodes `image` as PNG and writes it through `atomic::write_file`.
pub fn write_png(path: &Path, image: &image::DynamicImage) -> Result<(), SpatialError> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| SpatialError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    crate::atomic::write_file(path, &bytes).map_err(|source| SpatialError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_masks_are_drawn_0_255_and_overlays_tint_only_foreground() {
        let classes = [0u8, 1, 0, 1];
        let mask = mask_image(2, 2, &classes, true);
        assert_eq!(mask.as_raw(), &vec![0, 255, 0, 255]);
        let index = mask_image(2, 2, &[0, 2, 3, 0], false);
        assert_eq!(index.as_raw(), &vec![0, 2, 3, 0]);
        let image = RgbImage::from_pixel(2, 2, image::Rgb([100, 100, 100]));
        let overlay = class_overlay(&image, &classes);
        assert_eq!(overlay.get_pixel(0, 0).0, [100, 100, 100]);
        // Half-way to class 1's colour [255, 40, 40].
        assert_eq!(overlay.get_pixel(1, 0).0, [177, 70, 70]);
    }
}
