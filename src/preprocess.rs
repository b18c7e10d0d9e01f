//! Image preprocessing, pure and deterministic: decode, to 8-bit RGB,
//! antialiased resize, center crop, normalize, CHW f32.
//!
//! An image that is already `input_size`×`input_size` passes through without
//! resampling, so features can be compared exactly with a reference
//! implementation fed the same pixels.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageReader, RgbImage, imageops::FilterType};
use serde::{Deserialize, Serialize};

/// Errors while turning one file into an encoder input. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: empty file (0 bytes)")]
    Empty { path: String },
    #[error("{path}: not a recognised image format (JPEG, PNG, TIFF, BMP, WebP)")]
    UnknownFormat { path: String },
    #[error(
        "{path}: {width}x{height} = {pixels} pixels exceeds the limit of {limit} pixels (decompression-bomb guard; raise max_pixels to allow it)"
    )]
    TooLarge {
        path: String,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("{path}: cannot decode image: {message}")]
    Decode { path: String, message: String },
}

/// How an image of any shape becomes a square encoder input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Resize so the shorter side is `resize_shorter_to`, then crop the center square.
    ShorterSideThenCenterCrop { resize_shorter_to: u32 },
    /// Resize both sides to the input size, ignoring the aspect ratio.
    Stretch,
}

/// Resampling filter; every filter is antialiased when downscaling
/// (its support widens with the scale factor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    Bilinear,
    Bicubic,
    Lanczos3,
}

impl ResizeFilter {
    fn filter_type(self) -> FilterType {
        match self {
            ResizeFilter::Bilinear => FilterType::Triangle,
            ResizeFilter::Bicubic => FilterType::CatmullRom,
            ResizeFilter::Lanczos3 => FilterType::Lanczos3,
        }
    }
}

/// Per-encoder preprocessing settings. Serialised into feature fingerprints,
/// so any change here produces new features rather than reusing stale ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    pub input_size: u32,
    pub resize: ResizePolicy,
    pub filter: ResizeFilter,
    /// Per-channel mean and std on pixels scaled to 0..1.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Images with more pixels than this are refused before decoding.
    pub max_pixels: u64,
}

impl PreprocessConfig {
    /// About 179 megapixels, the same default as Pillow's bomb guard.
    pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

    /// Number of f32 values one preprocessed image occupies (3 × size × size).
    pub fn tensor_len(&self) -> usize {
        3 * self.input_size as usize * self.input_size as usize
    }
}

/// Reads the image header only: (width, height), or an error naming the file.
pub fn probe_dimensions(bytes: &[u8], path: &Path) -> Result<(u32, u32), PreprocessError> {
    let name = path.display().to_string();
    if bytes.is_empty() {
        return Err(PreprocessError::Empty { path: name });
    }
    let reader = reader_for(bytes, &name)?;
    reader
        .into_dimensions()
        .map_err(|err| PreprocessError::Decode {
            path: name,
            message: err.to_string(),
        })
}

fn reader_for<'a>(
    bytes: &'a [u8],
    name: &str,
) -> Result<ImageReader<Cursor<&'a [u8]>>, PreprocessError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| PreprocessError::Read {
            path: name.to_string(),
            source,
        })?;
    if reader.format().is_none() {
        return Err(PreprocessError::UnknownFormat {
            path: name.to_string(),
        });
    }
    Ok(reader)
}

/// Decodes `bytes` to 8-bit RGB. Grayscale is replicated, 16-bit is scaled
/// to 8-bit, alpha is dropped. Refuses images above `max_pixels` before
/// allocating their pixels.
pub fn decode_rgb8(
    bytes: &[u8],
    path: &Path,
    max_pixels: u64,
) -> Result<RgbImage, PreprocessError> {
    let name = path.display().to_string();
    let (width, height) = probe_dimensions(bytes, path)?;
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(PreprocessError::TooLarge {
            path: name,
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    let image: DynamicImage =
        reader_for(bytes, &name)?
            .decode()
            .map_err(|err| PreprocessError::Decode {
                path: name,
                message: err.to_string(),
            })?;
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Resizes and crops an RGB image to the square input the encoder expects.
pub fn resize_and_crop(image: &RgbImage, config: &PreprocessConfig) -> RgbImage {
    let size = config.input_size;
    if image.width() == size && image.height() == size {
        return image.clone();
    }
    let filter = config.filter.filter_type();
    match config.resize {
        ResizePolicy::Stretch => image::imageops::resize(image, size, size, filter),
        ResizePolicy::ShorterSideThenCenterCrop { resize_shorter_to } => {
            let target_short = resize_shorter_to.max(size);
            let (width, height) = (image.width(), image.height());
            let (new_width, new_height) = if width <= height {
                let scaled = (height as f64 * target_short as f64 / width as f64).round() as u32;
                (target_short, scaled.max(size))
            } else {
                let scaled = (width as f64 * target_short as f64 / height as f64).round() as u32;
                (scaled.max(size), target_short)
            };
            let resized = if (new_width, new_height) == (width, height) {
                image.clone()
            } else {
                image::imageops::resize(image, new_width, new_height, filter)
            };
            let left = (new_width - size) / 2;
            let top = (new_height - size) / 2;
            image::imageops::crop_imm(&resized, left, top, size, size).to_image()
        }
    }
}

/// Normalises a square RGB image into CHW f32: `(pixel / 255 - mean) / std`.
pub fn to_chw_normalized(image: &RgbImage, config: &PreprocessConfig) -> Vec<f32> {
    let plane = (image.width() * image.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * config.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| config.mean[c] / config.std[c]);
    for (index, pixel) in image.pixels().enumerate() {
        for channel in 0..3 {
            out[channel * plane + index] = pixel[channel] as f32 * scale[channel] - shift[channel];
        }
    }
    out
}

/// The whole pipeline for one encoded image: CHW f32 of length `config.tensor_len()`.
pub fn preprocess_bytes(
    bytes: &[u8],
    path: &Path,
    config: &PreprocessConfig,
) -> Result<Vec<f32>, PreprocessError> {
    let rgb = decode_rgb8(bytes, path, config.max_pixels)?;
    let square = resize_and_crop(&rgb, config);
    Ok(to_chw_normalized(&square, config))
}

/// Reads and preprocesses one file.
pub fn preprocess_file(
    path: &Path,
    config: &PreprocessConfig,
) -> Result<Vec<f32>, PreprocessError> {
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Read {
        path: path.display().to_string(),
        source,
    })?;
    preprocess_bytes(&bytes, path, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Luma, Rgb, Rgba};

    fn config(size: u32) -> PreprocessConfig {
        PreprocessConfig {
            input_size: size,
            resize: ResizePolicy::ShorterSideThenCenterCrop {
                resize_shorter_to: size + size / 7,
            },
            filter: ResizeFilter::Bilinear,
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 1.0],
            max_pixels: PreprocessConfig::DEFAULT_MAX_PIXELS,
        }
    }

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    }

    #[test]
    fn input_sized_image_passes_through_exactly() {
        let rgb = RgbImage::from_fn(8, 8, |x, y| Rgb([(x * 30) as u8, (y * 30) as u8, 7]));
        let bytes = encode(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Png);
        let out = preprocess_bytes(&bytes, Path::new("a.png"), &config(8)).unwrap();
        assert_eq!(out.len(), 3 * 64);
        // Pixel (x=3, y=2): red = 90, green = 60, blue = 7, checked by hand.
        let index = 2 * 8 + 3;
        assert!((out[index] - (90.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        assert!((out[64 + index] - (60.0 / 255.0 - 0.25) / 0.25).abs() < 1e-6);
        assert!((out[128 + index] - 7.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn gray16_and_rgba_become_rgb8() {
        let gray16 = image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(4, 4, Luma([65535]));
        let bytes = encode(&DynamicImage::ImageLuma16(gray16), ImageFormat::Png);
        let rgb = decode_rgb8(&bytes, Path::new("g.png"), 100).unwrap();
        assert_eq!(rgb.get_pixel(1, 1), &Rgb([255, 255, 255]));

        let rgba = image::RgbaImage::from_pixel(4, 4, Rgba([10, 20, 30, 0]));
        let bytes = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        let rgb = decode_rgb8(&bytes, Path::new("a.png"), 100).unwrap();
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([10, 20, 30]));
    }

    #[test]
    fn resize_keeps_aspect_then_crops_center() {
        // Left half black, right half white, 40x20: after the crop the center stays split.
        let rgb = RgbImage::from_fn(
            40,
            20,
            |x, _| if x < 20 { Rgb([0; 3]) } else { Rgb([255; 3]) },
        );
        let out = resize_and_crop(&rgb, &config(14));
        assert_eq!((out.width(), out.height()), (14, 14));
        assert_eq!(out.get_pixel(0, 7)[0], 0);
        assert_eq!(out.get_pixel(13, 7)[0], 255);
    }

    #[test]
    fn pixel_limit_refuses_before_decoding() {
        let rgb = RgbImage::from_pixel(100, 100, Rgb([1, 2, 3]));
        let bytes = encode(&DynamicImage::ImageRgb8(rgb), ImageFormat::Png);
        let err = decode_rgb8(&bytes, Path::new("big.png"), 9_999).unwrap_err();
        assert_eq!(
            err.to_string(),
            "big.png: 100x100 = 10000 pixels exceeds the limit of 9999 pixels (decompression-bomb guard; raise max_pixels to allow it)"
        );
    }

    #[test]
    fn not_an_image_and_empty_file_are_named() {
        let err = probe_dimensions(b"hello world, not an image", Path::new("x.jpg")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("x.jpg: not a recognised image format"),
            "{err}"
        );
        let err = probe_dimensions(b"", Path::new("z.png")).unwrap_err();
        assert_eq!(err.to_string(), "z.png: empty file (0 bytes)");
    }

    #[test]
    fn every_supported_format_decodes() {
        let rgb = RgbImage::from_fn(6, 5, |x, y| Rgb([(x * 40) as u8, (y * 40) as u8, 100]));
        let dynamic = DynamicImage::ImageRgb8(rgb);
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Tiff,
            ImageFormat::Bmp,
            ImageFormat::WebP,
        ] {
            let bytes = encode(&dynamic, format);
            let decoded = decode_rgb8(&bytes, Path::new("f"), 1000).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (6, 5), "{format:?}");
        }
    }
}
