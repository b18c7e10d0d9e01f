//! The two passes of a separable image resize on interleaved u8 pixels, with
//! filter taps computed by the caller (`lazarus::preprocess`): a vertical
//! pass into f32, then a horizontal pass rounded to u8, the operations and
//! their order of `image::imageops::resize`. Here because decoding and
//! resizing are the part of extraction the encoder kernels do not cover.

/// Per output row (or column): the first input row (or column) it reads and
/// the normalised weights of that one and the next ones.
pub type Taps = [(usize, Vec<f32>)];

/// Resamples `pixels` (`[height, width, channels]` row-major) to
/// `rows.len()` × `columns.len()` pixels.
pub fn separable(
    pixels: &[u8],
    width: usize,
    channels: usize,
    rows: &Taps,
    columns: &Taps,
) -> Vec<u8> {
    let (c, w) = (channels, width);
    let (out_width, out_height) = (columns.len(), rows.len());
    let mut vertical = vec![0f32; out_height * w * c];
    for ((first, weights), out) in rows.iter().zip(vertical.chunks_exact_mut(w * c)) {
        for (i, &weight) in weights.iter().enumerate() {
            let row = &pixels[(first + i) * w * c..(first + i + 1) * w * c];
            for (sum, &value) in out.iter_mut().zip(row) {
                *sum += value as f32 * weight;
            }
        }
    }
    let mut out = vec![0u8; out_width * out_height * c];
    for (row, out_row) in vertical
        .chunks_exact(w * c)
        .zip(out.chunks_exact_mut(out_width * c))
    {
        for ((first, weights), out_pixel) in columns.iter().zip(out_row.chunks_exact_mut(c)) {
            for (channel, out) in out_pixel.iter_mut().enumerate() {
                let mut sum = 0f32;
                for (i, &weight) in weights.iter().enumerate() {
                    sum += row[(first + i) * c + channel] * weight;
                }
                *out = round_to_u8(sum);
            }
        }
    }
    out
}

/// Clamp to 0..=255, then round half away from zero, as `image` stores a
/// resampled value (`f32::round` without its libm call: for 0 ≤ v ≤ 255 the
/// truncation `v as u32` is exact, and so is `v - truncation`).
pub fn round_to_u8(value: f32) -> u8 {
    let value = value.clamp(0.0, 255.0);
    let whole = value as u32;
    (if value - whole as f32 >= 0.5 {
        whole + 1
    } else {
        whole
    }) as u8
}

/// Interleaved RGB u8 pixels to three f32 planes (CHW), each value
/// `v · scale[c] - shift[c]` (normalisation by mean and std folded in).
pub fn rgb_to_planes(rgb: &[u8], scale: [f32; 3], shift: [f32; 3]) -> Vec<f32> {
    let plane = rgb.len() / 3;
    let mut out = vec![0f32; 3 * plane];
    for (index, pixel) in rgb.chunks_exact(3).enumerate() {
        for channel in 0..3 {
            out[channel * plane + index] = pixel[channel] as f32 * scale[channel] - shift[channel];
        }
    }
    out
}
