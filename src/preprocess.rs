//! Image preprocessing, pure and deterministic: decode, to 8-bit RGB,
//! antialiased resize, center crop, normalize, CHW f32.
//!
//! An image that is already `input_size`×`input_size` passes through without
//! resampling, so features can be compared exactly with a reference
//! implementation fed the same pixels.
//!
//! The file pipeline (`preprocess_bytes`) resamples only the center crop it
//! keeps, and keeps 8-bit gray images at one channel until normalisation;
//! its pixels are bit-identical to `image`'s `resize` followed by the crop
//! (`resize_and_crop`), which a unit test checks for every filter and policy.

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
    /// Resize so the longer side is the input size, keeping the aspect
    /// ratio, and center the image on a square of the normalisation's mean
    /// colour (each channel's mean rounded to 8 bits, so the padding
    /// normalises to about 0): nothing is cut off and nothing is distorted.
    Pad,
}

impl ResizePolicy {
    /// The policy as `enqueue --resize` and the runs' `resize` param name it.
    pub fn name(&self) -> &'static str {
        match self {
            ResizePolicy::ShorterSideThenCenterCrop { .. } => "crop",
            ResizePolicy::Stretch => "stretch",
            ResizePolicy::Pad => "pad",
        }
    }
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
    Ok(match decode_dynamic(bytes, path, max_pixels)? {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Decodes `bytes` as they are stored, after the pixel-count guard.
fn decode_dynamic(
    bytes: &[u8],
    path: &Path,
    max_pixels: u64,
) -> Result<DynamicImage, PreprocessError> {
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
    reader_for(bytes, &name)?
        .decode()
        .map_err(|err| PreprocessError::Decode {
            path: name,
            message: err.to_string(),
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
        ResizePolicy::Pad => {
            let (new_width, new_height) = longer_side_size(image.dimensions(), size);
            let resized = if (new_width, new_height) == image.dimensions() {
                image.clone()
            } else {
                image::imageops::resize(image, new_width, new_height, filter)
            };
            let fill = image::Rgb(pad_colour(config));
            let mut square = RgbImage::from_pixel(size, size, fill);
            image::imageops::replace(
                &mut square,
                &resized,
                ((size - new_width) / 2) as i64,
                ((size - new_height) / 2) as i64,
            );
            square
        }
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
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * config.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| config.mean[c] / config.std[c]);
    lazarus_kernels::resample::rgb_to_planes(image.as_raw(), scale, shift)
}

/// The whole pipeline for one encoded image: CHW f32 of length `config.tensor_len()`.
pub fn preprocess_bytes(
    bytes: &[u8],
    path: &Path,
    config: &PreprocessConfig,
) -> Result<Vec<f32>, PreprocessError> {
    Ok(match decode_dynamic(bytes, path, config.max_pixels)? {
        // Nothing to resample from: `resize_and_crop` defines the result.
        image if image.width() == 0 || image.height() == 0 => {
            to_chw_normalized(&resize_and_crop(&image.to_rgb8(), config), config)
        }
        DynamicImage::ImageLuma8(gray) => {
            let (width, height) = gray.dimensions();
            square_chw(&gray, (width, height, 1), config)
        }
        DynamicImage::ImageRgb8(rgb) => square_chw(&rgb, (rgb.width(), rgb.height(), 3), config),
        other => {
            let rgb = other.to_rgb8();
            square_chw(&rgb, (rgb.width(), rgb.height(), 3), config)
        }
    })
}

/// Resize, center crop and normalise 8-bit pixels with 1 (gray, replicated
/// to RGB) or 3 interleaved channels: the same pixels as `resize_and_crop`
/// then `to_chw_normalized`, computing only the kept window.
fn square_chw(
    pixels: &[u8],
    (width, height, channels): (u32, u32, usize),
    config: &PreprocessConfig,
) -> Vec<f32> {
    let size = config.input_size;
    if config.resize == ResizePolicy::Pad && (width, height) != (size, size) {
        return padded_chw(pixels, (width, height, channels), config);
    }
    let (new_width, new_height) = match config.resize {
        // Already the input size: passes through, whatever the policy.
        _ if (width, height) == (size, size) => (size, size),
        ResizePolicy::Stretch | ResizePolicy::Pad => (size, size),
        ResizePolicy::ShorterSideThenCenterCrop { resize_shorter_to } => {
            shorter_side_size((width, height), size, resize_shorter_to)
        }
    };
    let window = Window {
        left: (new_width - size) / 2,
        top: (new_height - size) / 2,
        width: size,
        height: size,
    };
    let source = Source {
        pixels,
        width,
        height,
        channels,
    };
    let square = if (new_width, new_height) == (width, height) {
        source.crop(&window)
    } else {
        source.resample(new_width, new_height, &window, config.filter)
    };
    normalize_chw(&square, channels, config)
}

/// `ResizePolicy::Pad`: the whole image resized to fit, centered on the
/// mean colour (three channels, since the padding is not gray).
fn padded_chw(
    pixels: &[u8],
    (width, height, channels): (u32, u32, usize),
    config: &PreprocessConfig,
) -> Vec<f32> {
    let size = config.input_size;
    let (new_width, new_height) = longer_side_size((width, height), size);
    let source = Source {
        pixels,
        width,
        height,
        channels,
    };
    let whole = Window {
        left: 0,
        top: 0,
        width: new_width,
        height: new_height,
    };
    let resized = if (new_width, new_height) == (width, height) {
        source.crop(&whole)
    } else {
        source.resample(new_width, new_height, &whole, config.filter)
    };
    let fill = pad_colour(config);
    let mut square: Vec<u8> = fill.repeat((size * size) as usize);
    let (left, top) = (
        (size - new_width) as usize / 2,
        (size - new_height) as usize / 2,
    );
    for (y, row) in resized
        .chunks_exact(new_width as usize * channels)
        .enumerate()
    {
        let start = ((top + y) * size as usize + left) * 3;
        for (pixel, value) in square[start..start + new_width as usize * 3]
            .chunks_exact_mut(3)
            .zip(row.chunks_exact(channels))
        {
            for (channel, out) in pixel.iter_mut().enumerate() {
                *out = value[channel.min(channels - 1)];
            }
        }
    }
    normalize_chw(&square, 3, config)
}

/// The padding of `ResizePolicy::Pad`: the normalisation's mean in 8 bits.
fn pad_colour(config: &PreprocessConfig) -> [u8; 3] {
    std::array::from_fn(|c| (config.mean[c] * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// The resized size for `ResizePolicy::Pad`: the longer side becomes `size`,
/// the other keeps the aspect ratio (at least one pixel).
fn longer_side_size((width, height): (u32, u32), size: u32) -> (u32, u32) {
    if width >= height {
        let scaled = (height as f64 * size as f64 / width as f64).round() as u32;
        (size, scaled.clamp(1, size))
    } else {
        let scaled = (width as f64 * size as f64 / height as f64).round() as u32;
        (scaled.clamp(1, size), size)
    }
}

/// The resized size for `ShorterSideThenCenterCrop`: the shorter side becomes
/// `resize_shorter_to` (at least `size`), the other keeps the aspect ratio.
fn shorter_side_size((width, height): (u32, u32), size: u32, resize_shorter_to: u32) -> (u32, u32) {
    let target_short = resize_shorter_to.max(size);
    if width <= height {
        let scaled = (height as f64 * target_short as f64 / width as f64).round() as u32;
        (target_short, scaled.max(size))
    } else {
        let scaled = (width as f64 * target_short as f64 / height as f64).round() as u32;
        (scaled.max(size), target_short)
    }
}

/// The part kept from the resized image.
struct Window {
    left: u32,
    top: u32,
    width: u32,
    height: u32,
}

/// 8-bit pixels, `channels` interleaved values per pixel, row-major.
struct Source<'a> {
    pixels: &'a [u8],
    width: u32,
    height: u32,
    channels: usize,
}

impl Source<'_> {
    fn crop(&self, window: &Window) -> Vec<u8> {
        let (c, w) = (self.channels, self.width as usize);
        let (out_width, out_height) = (window.width as usize, window.height as usize);
        let mut out = Vec::with_capacity(out_width * out_height * c);
        for y in window.top as usize..window.top as usize + out_height {
            let start = (y * w + window.left as usize) * c;
            out.extend_from_slice(&self.pixels[start..start + out_width * c]);
        }
        out
    }

    /// `image::imageops::resize` to `new_width`×`new_height` (a vertical pass
    /// into f32, then a horizontal pass rounded to u8, the same operations in
    /// the same order), restricted to the rows and columns of `window`.
    fn resample(
        &self,
        new_width: u32,
        new_height: u32,
        window: &Window,
        filter: ResizeFilter,
    ) -> Vec<u8> {
        let (c, w) = (self.channels, self.width as usize);
        let rows = filter_taps(
            self.height,
            new_height,
            window.top..window.top + window.height,
            filter,
        );
        let columns = filter_taps(
            self.width,
            new_width,
            window.left..window.left + window.width,
            filter,
        );
        lazarus_kernels::resample::separable(self.pixels, w, c, &rows, &columns)
    }
}

/// For each output position in `window` along one axis of `input` → `output`
/// pixels: the first input position and the normalised filter weights, as
/// `image`'s resampler computes them (support widened by the downscale factor).
fn filter_taps(
    input: u32,
    output: u32,
    window: std::ops::Range<u32>,
    filter: ResizeFilter,
) -> Vec<(usize, Vec<f32>)> {
    let (kernel, support): (fn(f32) -> f32, f32) = match filter {
        ResizeFilter::Bilinear => (triangle, 1.0),
        ResizeFilter::Bicubic => (catmull_rom, 2.0),
        ResizeFilter::Lanczos3 => (lanczos3, 3.0),
    };
    let ratio = input as f32 / output as f32;
    let scale = if ratio < 1.0 { 1.0 } else { ratio };
    let reach = support * scale;
    window
        .map(|position| {
            let center = (position as f32 + 0.5) * ratio;
            let first = ((center - reach).floor() as i64).clamp(0, input as i64 - 1);
            let end = ((center + reach).ceil() as i64).clamp(first + 1, input as i64);
            // Pixel centres are at +0.5: the kernel is evaluated relative to them.
            let center = center - 0.5;
            let mut weights: Vec<f32> = (first..end)
                .map(|i| kernel((i as f32 - center) / scale))
                .collect();
            let total = weights.iter().fold(0.0f32, |sum, &w| sum + w);
            for weight in &mut weights {
                *weight /= total;
            }
            (first as usize, weights)
        })
        .collect()
}

fn triangle(x: f32) -> f32 {
    if x.abs() < 1.0 { 1.0 - x.abs() } else { 0.0 }
}

/// Catmull-Rom: the Mitchell-Netravali cubic with B = 0, C = 1/2 (its
/// coefficients 9, -15, 6 and -3, 15, -24, 12 are exact in f32).
fn catmull_rom(x: f32) -> f32 {
    let a = x.abs();
    let k = if a < 1.0 {
        9.0 * a.powi(3) + -15.0 * a.powi(2) + 6.0
    } else if a < 2.0 {
        -3.0 * a.powi(3) + 15.0 * a.powi(2) + -24.0 * a + 12.0
    } else {
        0.0
    };
    k / 6.0
}

fn sinc(x: f32) -> f32 {
    let a = x * std::f32::consts::PI;
    if x == 0.0 { 1.0 } else { a.sin() / a }
}

fn lanczos3(x: f32) -> f32 {
    if x.abs() < 3.0 {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// `(value / 255 - mean) / std` per channel, CHW; one input channel is
/// replicated to all three.
fn normalize_chw(square: &[u8], channels: usize, config: &PreprocessConfig) -> Vec<f32> {
    let plane = square.len() / channels;
    let mut out = vec![0f32; 3 * plane];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * config.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| config.mean[c] / config.std[c]);
    for (index, pixel) in square.chunks_exact(channels).enumerate() {
        for channel in 0..3 {
            let value = pixel[channel.min(channels - 1)];
            out[channel * plane + index] = value as f32 * scale[channel] - shift[channel];
        }
    }
    out
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

    /// Deterministic pseudo-random bytes (an LCG; any fixed sequence will do).
    fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn windowed_resample_is_bit_identical_to_image_resize_then_crop() {
        // Reference: the plain pipeline, `image::imageops::resize` of the
        // whole image to RGB, `crop_imm`, then `to_chw_normalized`.
        let sizes = [
            (300, 300),
            (37, 81),
            (640, 480),
            (10, 12),
            (14, 14),
            (15, 200),
        ];
        for (index, &(width, height)) in sizes.iter().enumerate() {
            let gray = image::GrayImage::from_raw(
                width,
                height,
                noise((width * height) as usize, index as u32),
            )
            .unwrap();
            let rgb = RgbImage::from_raw(
                width,
                height,
                noise((3 * width * height) as usize, 100 + index as u32),
            )
            .unwrap();
            for filter in [
                ResizeFilter::Bilinear,
                ResizeFilter::Bicubic,
                ResizeFilter::Lanczos3,
            ] {
                for resize in [
                    ResizePolicy::ShorterSideThenCenterCrop {
                        resize_shorter_to: 16,
                    },
                    ResizePolicy::ShorterSideThenCenterCrop {
                        resize_shorter_to: 13,
                    },
                    ResizePolicy::Stretch,
                    ResizePolicy::Pad,
                ] {
                    let config = PreprocessConfig {
                        filter,
                        resize,
                        ..config(14)
                    };
                    for image in [
                        DynamicImage::ImageLuma8(gray.clone()),
                        DynamicImage::ImageRgb8(rgb.clone()),
                    ] {
                        let bytes = encode(&image, ImageFormat::Png);
                        let fast = preprocess_bytes(&bytes, Path::new("n.png"), &config).unwrap();
                        let plain =
                            to_chw_normalized(&resize_and_crop(&image.to_rgb8(), &config), &config);
                        assert!(
                            fast == plain,
                            "{width}x{height} {:?} {filter:?} {resize:?}",
                            image.color()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pad_keeps_the_whole_image_centered_on_the_mean_colour() {
        // A 28 x 14 white image read at 14 with `pad`: 14 x 7 of white in
        // rows 3..10, the mean colour above and below (checked by hand:
        // top = (14 - 7) / 2).
        let white = RgbImage::from_pixel(28, 14, Rgb([255, 255, 255]));
        let config = PreprocessConfig {
            resize: ResizePolicy::Pad,
            ..config(14)
        };
        let bytes = encode(&DynamicImage::ImageRgb8(white), ImageFormat::Png);
        let chw = preprocess_bytes(&bytes, Path::new("w.png"), &config).unwrap();
        let plane = 14 * 14;
        for channel in 0..3 {
            let pad = ((config.mean[channel] * 255.0).round() / 255.0 - config.mean[channel])
                / config.std[channel];
            let white = (1.0 - config.mean[channel]) / config.std[channel];
            for y in 0..14 {
                for x in 0..14 {
                    let value = chw[channel * plane + y * 14 + x];
                    let expected = if (3..10).contains(&y) { white } else { pad };
                    assert!((value - expected).abs() < 1e-5, "({x}, {y}) {value}");
                }
            }
            assert!(pad.abs() < 0.01, "the padding normalises to about 0");
        }
        assert_eq!(ResizePolicy::Pad.name(), "pad");
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
