//! Bilinear resampling of grids: the 1-D weights (as PyTorch's
//! `interpolate(mode="bilinear", align_corners=False)`), the 2-D operator as
//! one matrix (so autodiff sees a matmul), and the `Stitcher` that puts
//! per-tile grids back together at the image's full resolution.

use candle_core::{Device, Tensor};

use super::SpatialError;

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
) -> Result<Tensor, SpatialError> {
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

/// Stitches per-tile grids back into one image: each tile's grid values
/// (`channels` planes of `grid` cells) are upsampled bilinearly to the
/// tile's pixels and summed; `finish` averages them where tiles overlap.
/// Segmentation prediction stitches logits with it, anomaly heat maps
/// patch scores.
pub struct Stitcher {
    width: usize,
    height: usize,
    channels: usize,
    grid: (usize, usize),
    sums: Vec<f32>,
    counts: Vec<f32>,
}

impl Stitcher {
    pub fn new(width: u32, height: u32, channels: usize, grid: (usize, usize)) -> Self {
        let (width, height) = (width as usize, height as usize);
        Stitcher {
            width,
            height,
            channels,
            grid,
            sums: vec![0f32; channels * width * height],
            counts: vec![0f32; width * height],
        }
    }

    /// Adds one tile ([x, y, width, height]) with its values, `channels`
    /// planes of grid_h x grid_w, row-major.
    pub fn add(&mut self, tile: [u32; 4], values: &[f32]) {
        let (grid_h, grid_w) = self.grid;
        let [x0, y0, tile_w, tile_h] = tile.map(|v| v as usize);
        let rows = bilinear_matrix(grid_h, tile_h);
        let columns = bilinear_matrix(grid_w, tile_w);
        let plane = self.width * self.height;
        for (k, grid) in values.chunks_exact(grid_h * grid_w).enumerate() {
            // Rows first: [tile_h, grid_w], then columns.
            let mut partial = vec![0f32; tile_h * grid_w];
            for y in 0..tile_h {
                for i in 0..grid_h {
                    let weight = rows[y * grid_h + i];
                    if weight != 0.0 {
                        for j in 0..grid_w {
                            partial[y * grid_w + j] += weight * grid[i * grid_w + j];
                        }
                    }
                }
            }
            for y in 0..tile_h {
                let base = k * plane + (y0 + y) * self.width + x0;
                for x in 0..tile_w {
                    let mut value = 0f32;
                    for j in 0..grid_w {
                        value += columns[x * grid_w + j] * partial[y * grid_w + j];
                    }
                    self.sums[base + x] += value;
                }
            }
        }
        for y in 0..tile_h {
            for x in 0..tile_w {
                self.counts[(y0 + y) * self.width + x0 + x] += 1.0;
            }
        }
    }

    /// The averaged planes, `channels` x height x width (pixels no tile
    /// covered are 0).
    pub fn finish(mut self) -> Vec<f32> {
        let plane = self.width * self.height;
        for k in 0..self.channels {
            for (value, count) in self.sums[k * plane..(k + 1) * plane]
                .iter_mut()
                .zip(&self.counts)
            {
                *value /= count.max(1.0);
            }
        }
        self.sums
    }
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
    fn stitched_tiles_average_where_they_overlap() {
        // Two 4x2 tiles of a 6x2 image overlapping in columns 2 and 3; a
        // constant grid upsamples to the same constant, so the overlap is
        // the mean of both tiles' values and the rest keeps its own.
        let mut stitcher = Stitcher::new(6, 2, 1, (1, 2));
        stitcher.add([0, 0, 4, 2], &[1.0, 1.0]);
        stitcher.add([2, 0, 4, 2], &[3.0, 3.0]);
        let out = stitcher.finish();
        assert_eq!(out[..6], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(out[6..], out[..6]);
    }
}
