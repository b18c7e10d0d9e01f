//! The EfficientNet-Lite forward pass on the CPU, one image at a time.
//!
//! Each inverted-residual block is computed per band of output rows: the
//! expand convolution (or, for the first block, the stem) produces the input
//! rows the band's depthwise windows read into a ring of rows, the depthwise
//! convolution turns them into the band's hidden output, and the projection
//! writes the band's rows of the block output (plus the skip connection).
//! Each hidden row is produced once; the ring and the band are sized to stay
//! in L2, so the expanded activations never travel to memory. Only the
//! narrow block outputs do (two ping-pong buffers per thread).
//!
//! A batch of at least as many images as threads runs one image per task;
//! smaller batches split each block's output rows between the threads (each
//! range recomputes the few hidden rows its windows share with the previous
//! range). Either way each value is computed by the same operations in the
//! same order, so features do not depend on the batch or the thread count.

use std::cell::RefCell;

use pulp::Arch;
use rayon::prelude::*;

use super::depthwise::{DepthwiseRows, DepthwiseWeights, MAX_KERNEL};
use super::gemm::{Activation, PackedPointwise, Pointwise, PointwiseInput, PointwiseOutput};
use super::{SimdLevel, same_padding};

/// A folded convolution in plain arrays, as the model holds it.
#[derive(Debug, Clone)]
pub struct ConvWeights {
    /// Pointwise: [out, in]. Stem: [out, in, k, k].
    pub weight: Vec<f32>,
    /// [out].
    pub bias: Vec<f32>,
    pub relu6: bool,
}

/// A folded depthwise convolution in plain arrays.
#[derive(Debug, Clone)]
pub struct DepthwiseConv {
    /// `[kernel², channels]`, tap-major.
    pub weight: Vec<f32>,
    /// `[channels]`.
    pub bias: Vec<f32>,
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

/// One inverted-residual block's folded weights.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// [hidden, in]; `None` for the first block, which reads the stem.
    pub expand: Option<ConvWeights>,
    pub depthwise: DepthwiseConv,
    /// [out, hidden].
    pub project: ConvWeights,
    pub residual: bool,
}

/// The stem: a full k×k convolution with TF "same" padding.
#[derive(Debug, Clone)]
pub struct StemWeights {
    pub conv: ConvWeights,
    pub in_channels: usize,
    pub kernel: usize,
    pub stride: usize,
}

/// Everything the CPU network is built from.
#[derive(Debug, Clone)]
pub struct NetworkWeights {
    pub stem: StemWeights,
    pub blocks: Vec<BlockWeights>,
    /// [features, last block's channels].
    pub head: ConvWeights,
    /// The last block of each stage: their outputs are pooled into `Outputs::stages`.
    pub stage_ends: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Block {
    expand: Option<PackedPointwise>,
    depthwise: DepthwiseWeights,
    project: PackedPointwise,
    residual: bool,
}

/// The network with its weights packed for one SIMD level.
#[derive(Debug, Clone)]
pub struct CpuNetwork {
    level: SimdLevel,
    arch: Arch,
    /// The stem as a matrix product over im2col patches: k = in · kernel².
    stem: PackedPointwise,
    stem_in: usize,
    stem_kernel: usize,
    stem_stride: usize,
    blocks: Vec<Block>,
    head: PackedPointwise,
    stage_ends: Vec<usize>,
    budget: BandBudget,
}

/// How large a block's ring of hidden rows and its band of depthwise outputs
/// may be (bytes); a band is at least one row whatever the budget.
#[derive(Debug, Clone, Copy)]
struct BandBudget {
    ring_bytes: usize,
    band_bytes: usize,
}

/// Ring of hidden rows at most this large. Larger rings mean fewer bands,
/// so fewer passes over a block's weights; smaller ones stay closer to the
/// core. 384 KiB and 192 KiB measured best on a 1 MiB-L2 EPYC between
/// 128/64 and 2048/1024 KiB (within noise of 512/256 and above).
const RING_BYTES: usize = 384 * 1024;
/// The band of depthwise outputs that feeds the projection, at most.
const BAND_BYTES: usize = 192 * 1024;

/// Features of a batch, NHWC, as flat arrays.
#[derive(Debug)]
pub struct Outputs {
    /// [n, features].
    pub pooled: Vec<f32>,
    /// [n, sum of the stage ends' channels]: each stage's output averaged
    /// over its pixels, first stage first.
    pub stages: Vec<f32>,
    /// The full output of each tapped block, in the order of the taps.
    pub taps: Vec<TapMap>,
    /// [n, h32, w32, features].
    pub stride32: Vec<f32>,
    pub stride32_shape: (usize, usize, usize),
}

/// The output map of one tapped block: [n, h, w, c].
#[derive(Debug)]
pub struct TapMap {
    pub values: Vec<f32>,
    /// (h, w, c).
    pub shape: (usize, usize, usize),
}

fn pack(conv: &ConvWeights, k: usize, lanes: usize) -> PackedPointwise {
    let activation = if conv.relu6 {
        Activation::Relu6
    } else {
        Activation::None
    };
    PackedPointwise::new(
        &conv.weight,
        &conv.bias,
        k,
        conv.bias.len(),
        activation,
        lanes,
    )
}

impl CpuNetwork {
    /// Packs `weights` for `level`. Errors when the CPU lacks `level` or the
    /// network is not shaped like an EfficientNet-Lite (stem then blocks whose
    /// first alone has no expansion).
    pub fn new(weights: &NetworkWeights, level: SimdLevel) -> Result<Self, String> {
        let arch = level
            .arch()
            .ok_or_else(|| format!("this CPU cannot run SIMD level {level}"))?;
        let lanes = level.lanes();
        let stem = &weights.stem;
        let stem_k = stem.in_channels * stem.kernel * stem.kernel;
        if stem.conv.weight.len() != stem.conv.bias.len() * stem_k {
            return Err(format!(
                "stem: {} weights for {} outputs of {stem_k} inputs",
                stem.conv.weight.len(),
                stem.conv.bias.len()
            ));
        }
        let mut channels = stem.conv.bias.len();
        let mut blocks = Vec::with_capacity(weights.blocks.len());
        for (i, block) in weights.blocks.iter().enumerate() {
            if block.expand.is_some() == (i == 0) {
                return Err(format!(
                    "block {i}: only the first block reads the stem without an expansion"
                ));
            }
            let expand = block
                .expand
                .as_ref()
                .map(|conv| pack(conv, channels, lanes));
            let hidden = expand.as_ref().map_or(channels, |e| e.n);
            let dw = &block.depthwise;
            if dw.bias.len() != hidden
                || dw.weight.len() != hidden * dw.kernel * dw.kernel
                || dw.kernel > MAX_KERNEL
                || !(1..=2).contains(&dw.stride)
                || dw.kernel < dw.stride
            {
                return Err(format!(
                    "block {i}: depthwise {}x{} stride {} on {} channels, {hidden} expected",
                    dw.kernel,
                    dw.kernel,
                    dw.stride,
                    dw.bias.len()
                ));
            }
            if !hidden.is_multiple_of(lanes) {
                return Err(format!(
                    "block {i}: {hidden} hidden channels are not whole vectors of {lanes} ({level})"
                ));
            }
            let depthwise = DepthwiseWeights::new(
                &dw.weight,
                &dw.bias,
                (dw.kernel, dw.stride),
                dw.relu6,
                lanes,
            );
            let project = pack(&block.project, hidden, lanes);
            if block.residual && (project.n != channels || dw.stride != 1) {
                return Err(format!(
                    "block {i}: skip connection across a change of shape"
                ));
            }
            channels = project.n;
            blocks.push(Block {
                expand,
                depthwise,
                project,
                residual: block.residual,
            });
        }
        if let Some(&end) = weights.stage_ends.iter().find(|&&end| end >= blocks.len()) {
            return Err(format!("stage end {end} of {} blocks", blocks.len()));
        }
        Ok(Self {
            level,
            arch,
            stem: pack(&stem.conv, stem_k, lanes),
            stem_in: stem.in_channels,
            stem_kernel: stem.kernel,
            stem_stride: stem.stride,
            blocks,
            head: pack(&weights.head, channels, lanes),
            stage_ends: weights.stage_ends.clone(),
            budget: BandBudget {
                ring_bytes: RING_BYTES,
                band_bytes: BAND_BYTES,
            },
        })
    }

    /// The same network with other ring and band sizes (tests: many small
    /// bands and wrapping rings on small images).
    pub fn with_budgets(mut self, ring_bytes: usize, band_bytes: usize) -> Self {
        self.budget = BandBudget {
            ring_bytes,
            band_bytes,
        };
        self
    }

    pub fn level(&self) -> SimdLevel {
        self.level
    }

    /// Runs `n` images `[n, in_channels, height, width]` (NCHW, contiguous),
    /// keeping the full output of each block in `taps` (block indices).
    pub fn run(
        &self,
        images: &[f32],
        n: usize,
        (height, width): (usize, usize),
        taps: &[usize],
    ) -> Result<Outputs, String> {
        if let Some(&tap) = taps.iter().find(|&&tap| tap >= self.blocks.len()) {
            return Err(format!("tapped block {tap} of {}", self.blocks.len()));
        }
        if images.len() != n * self.stem_in * height * width || height == 0 || width == 0 {
            return Err(format!(
                "input of {} values is not [{n}, {}, {height}, {width}]",
                images.len(),
                self.stem_in
            ));
        }
        let plan = self.plan(height, width);
        let image_len = self.stem_in * height * width;
        let features = self.head.n;
        let (h32, w32, _) = plan.blocks.last().expect("at least one block").output;
        let tap_shapes: Vec<(usize, usize, usize)> =
            taps.iter().map(|&tap| plan.blocks[tap].output).collect();
        let tap_lens: Vec<usize> = tap_shapes.iter().map(|(h, w, c)| h * w * c).collect();
        let stride32_len = h32 * w32 * features;
        let stages_len: usize = self
            .stage_ends
            .iter()
            .map(|&end| plan.blocks[end].output.2)
            .sum();
        let mut outputs = Outputs {
            pooled: vec![0.0; n * features],
            stages: vec![0.0; n * stages_len],
            taps: tap_shapes
                .iter()
                .zip(&tap_lens)
                .map(|(&shape, &len)| TapMap {
                    values: vec![0.0; n * len],
                    shape,
                })
                .collect(),
            stride32: vec![0.0; n * stride32_len],
            stride32_shape: (h32, w32, features),
        };
        let threads = rayon::current_num_threads();
        // Each image's slice of every tap map.
        let mut tap_images: Vec<Vec<&mut [f32]>> = (0..n).map(|_| Vec::new()).collect();
        for (tap, &len) in outputs.taps.iter_mut().zip(&tap_lens) {
            for (image, values) in tap_images.iter_mut().zip(tap.values.chunks_mut(len.max(1))) {
                image.push(values);
            }
        }
        let per_image = outputs
            .pooled
            .chunks_mut(features.max(1))
            .zip(outputs.stages.chunks_mut(stages_len.max(1)))
            .zip(tap_images)
            .zip(outputs.stride32.chunks_mut(stride32_len.max(1)))
            .zip(images.chunks(image_len.max(1)));
        if n >= threads {
            per_image.collect::<Vec<_>>().into_par_iter().for_each(
                |((((pooled, stages), tap_maps), stride32), image)| {
                    with_scratch(|activations, workspace| {
                        let out = ImageOutputs {
                            pooled,
                            stages,
                            taps: tap_maps,
                            stride32,
                        };
                        self.image(
                            &plan,
                            image,
                            out,
                            taps,
                            activations,
                            &mut |block, input, output| {
                                let rows = 0..plan.blocks[block].output.0;
                                self.block_rows(&plan, block, input, output, rows, workspace);
                            },
                        );
                    })
                },
            );
        } else {
            for ((((pooled, stages), tap_maps), stride32), image) in per_image {
                let out = ImageOutputs {
                    pooled,
                    stages,
                    taps: tap_maps,
                    stride32,
                };
                let mut activations = Activations::default();
                self.image(
                    &plan,
                    image,
                    out,
                    taps,
                    &mut activations,
                    &mut |block, input, output| {
                        self.block_split(&plan, block, input, output, threads)
                    },
                );
            }
        }
        Ok(outputs)
    }

    /// Every block's sizes and band for an input of `height × width`.
    fn plan(&self, height: usize, width: usize) -> Plan {
        let k = self.stem_kernel;
        let s = self.stem_stride;
        let mut size = (height.div_ceil(s), width.div_ceil(s));
        let mut channels = self.stem.n;
        let stem_padding = (same_padding(height, k, s).0, same_padding(width, k, s).0);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let dw = &block.depthwise;
            let (h, w) = size;
            let (k, s) = (dw.kernel, dw.stride);
            let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
            let hidden = dw.channels();
            let (left, right) = same_padding(w, k, s);
            let padded_width = left + w + right;
            let row_bytes = padded_width * hidden * 4;
            let mut band_rows = ho;
            let ring_rows = |rows: usize| ((rows - 1) * s + k).min(h);
            while band_rows > 1
                && (ring_rows(band_rows) * row_bytes > self.budget.ring_bytes
                    || band_rows * wo * hidden * 4 > self.budget.band_bytes)
            {
                band_rows -= 1;
            }
            blocks.push(BlockPlan {
                input: (h, w, channels),
                hidden,
                output: (ho, wo, block.project.n),
                padding: (same_padding(h, k, s).0, left),
                padded_width,
                band_rows,
                capacity: ring_rows(band_rows),
            });
            size = (ho, wo);
            channels = block.project.n;
        }
        Plan {
            image: (self.stem_in, height, width),
            stem_padding,
            blocks,
        }
    }

    /// One image through every block, the head and the pooling, copying the
    /// output of each block of `taps` into `out.taps`. `run_block` computes
    /// a whole block output from its input.
    fn image(
        &self,
        plan: &Plan,
        image: &[f32],
        mut out: ImageOutputs<'_>,
        taps: &[usize],
        activations: &mut Activations,
        run_block: &mut dyn FnMut(usize, BlockInput<'_>, &mut [f32]),
    ) {
        let largest = plan
            .blocks
            .iter()
            .map(|b| b.output.0 * b.output.1 * b.output.2)
            .max()
            .unwrap_or(0);
        let Activations { current, next } = activations;
        grow(current, largest);
        grow(next, largest);
        let mut current_len = 0;
        let mut stage_offset = 0;
        for (i, block) in plan.blocks.iter().enumerate() {
            let (ho, wo, co) = block.output;
            let output = &mut next[..ho * wo * co];
            let input = if i == 0 {
                BlockInput::Image(image)
            } else {
                BlockInput::Activations(&current[..current_len])
            };
            run_block(i, input, output);
            for (tap, map) in taps.iter().zip(out.taps.iter_mut()) {
                if *tap == i {
                    map.copy_from_slice(output);
                }
            }
            if self.stage_ends.contains(&i) {
                let stage = &mut out.stages[stage_offset..stage_offset + co];
                average_pixels(output, stage);
                stage_offset += co;
            }
            current_len = output.len();
            std::mem::swap(current, next);
        }
        self.arch.dispatch(Pointwise {
            op: &self.head,
            pixels: current_len / self.head.k,
            input: PointwiseInput::Rows(&current[..current_len]),
            output: PointwiseOutput::Rows {
                values: out.stride32,
                residual: None,
            },
        });
        // Global average pooling of the head's output.
        average_pixels(out.stride32, out.pooled);
    }

    /// Block `index` with its output rows split into one range per thread.
    fn block_split(
        &self,
        plan: &Plan,
        index: usize,
        input: BlockInput<'_>,
        output: &mut [f32],
        threads: usize,
    ) {
        let (ho, wo, co) = plan.blocks[index].output;
        let rows_per_task = ho.div_ceil(threads.max(1)).max(1);
        output
            .par_chunks_mut(rows_per_task * wo * co)
            .enumerate()
            .for_each(|(task, output)| {
                let first = task * rows_per_task;
                let rows = first..(first + rows_per_task).min(ho);
                with_scratch(|_, workspace| {
                    self.block_rows(plan, index, input, output, rows, workspace)
                });
            });
    }

    /// Output rows `rows` of block `index` into `output` (those rows only),
    /// band by band.
    fn block_rows(
        &self,
        plan: &Plan,
        index: usize,
        input: BlockInput<'_>,
        output: &mut [f32],
        rows: std::ops::Range<usize>,
        workspace: &mut Workspace,
    ) {
        let block = &self.blocks[index];
        let bp = &plan.blocks[index];
        let (h, w, _) = bp.input;
        let (_, wo, co) = bp.output;
        let (k, s) = (block.depthwise.kernel, block.depthwise.stride);
        let (top, left) = bp.padding;
        let lanes = self.level.lanes();
        let (capacity, padded_width) = (bp.capacity, bp.padded_width);
        let Workspace {
            ring,
            band,
            patches,
        } = workspace;
        // [hidden / lanes][capacity · padded width][lanes].
        let plane = capacity * padded_width;
        grow(ring, bp.hidden * plane);
        grow(band, bp.band_rows * wo * bp.hidden);
        let ring = &mut ring[..bp.hidden * plane];
        // The padding columns of every ring row are zero; the rest is
        // written before it is read.
        for row in ring.chunks_exact_mut(padded_width * lanes) {
            row[..left * lanes].fill(0.0);
            row[(left + w) * lanes..].fill(0.0);
        }
        // Input rows [.., produced) have been produced into the ring.
        let mut produced = 0;
        let mut band_start = rows.start;
        while band_start < rows.end {
            let band_end = (band_start + bp.band_rows).min(rows.end);
            let needed_from = (band_start * s).saturating_sub(top);
            let needed_to = ((band_end - 1) * s + k).saturating_sub(top).min(h);
            debug_assert!(needed_to - needed_from <= capacity);
            produced = produced.max(needed_from);
            while produced < needed_to {
                let slot = produced % capacity;
                let end = needed_to.min(produced + capacity - slot);
                let dest = PointwiseOutput::Blocks {
                    values: &mut *ring,
                    plane,
                    first: slot * padded_width + left,
                    width: w,
                    row_stride: padded_width,
                };
                self.produce(plan, index, input, produced..end, dest, patches);
                produced = end;
            }
            let pixels = (band_end - band_start) * wo;
            let hidden_band = &mut band[..pixels * bp.hidden];
            self.arch.dispatch(DepthwiseRows {
                op: &block.depthwise,
                ring,
                capacity,
                size: (h, padded_width),
                top,
                first_row: band_start,
                output: hidden_band,
            });
            let out_at = (band_start - rows.start) * wo * co;
            let band_output = &mut output[out_at..out_at + pixels * co];
            let residual = match input {
                BlockInput::Activations(x) if block.residual => {
                    Some(&x[band_start * wo * co..band_end * wo * co])
                }
                _ => None,
            };
            self.arch.dispatch(Pointwise {
                op: &block.project,
                pixels,
                input: PointwiseInput::Blocks(hidden_band),
                output: PointwiseOutput::Rows {
                    values: band_output,
                    residual,
                },
            });
            band_start = band_end;
        }
    }

    /// Input rows `rows` of block `index`'s depthwise convolution, into the
    /// ring: the expansion of the block input's rows, or for the first block
    /// the stem over the image (through im2col patches).
    fn produce(
        &self,
        plan: &Plan,
        index: usize,
        input: BlockInput<'_>,
        rows: std::ops::Range<usize>,
        dest: PointwiseOutput<'_>,
        patches: &mut Vec<f32>,
    ) {
        let (_, w, c) = plan.blocks[index].input;
        let pixels = rows.len() * w;
        match (input, &self.blocks[index].expand) {
            (BlockInput::Activations(x), Some(expand)) => self.arch.dispatch(Pointwise {
                op: expand,
                pixels,
                input: PointwiseInput::Rows(&x[rows.start * w * c..rows.end * w * c]),
                output: dest,
            }),
            (BlockInput::Image(image), None) => {
                let k = self.stem.k;
                grow(patches, pixels * k);
                let patches = &mut patches[..pixels * k];
                self.im2col(plan, image, rows, w, patches);
                self.arch.dispatch(Pointwise {
                    op: &self.stem,
                    pixels,
                    input: PointwiseInput::Rows(patches),
                    output: dest,
                });
            }
            _ => unreachable!("checked when the network was built"),
        }
    }

    /// The stem's input patches of output rows `rows` (`out_w` pixels each):
    /// [pixel, (channel, ky, kx)], zero outside the image. One input row
    /// segment at a time: the `k` taps of a kernel row are neighbours.
    fn im2col(
        &self,
        plan: &Plan,
        image: &[f32],
        rows: std::ops::Range<usize>,
        out_w: usize,
        patches: &mut [f32],
    ) {
        let (channels, h, w) = plan.image;
        let (k, s) = (self.stem_kernel, self.stem_stride);
        let (top, left) = plan.stem_padding;
        let patch_len = channels * k * k;
        for (i, y) in rows.enumerate() {
            let row_patches = &mut patches[i * out_w * patch_len..][..out_w * patch_len];
            for channel in 0..channels {
                for ky in 0..k {
                    let tap = (channel * k + ky) * k;
                    let iy = (y * s + ky) as isize - top as isize;
                    let line = (0..h as isize)
                        .contains(&iy)
                        .then(|| &image[(channel * h + iy as usize) * w..][..w]);
                    for (x, patch) in row_patches.chunks_exact_mut(patch_len).enumerate() {
                        let taps = &mut patch[tap..tap + k];
                        let start = (x * s) as isize - left as isize;
                        match line {
                            None => taps.fill(0.0),
                            Some(line) if start >= 0 && start as usize + k <= w => {
                                taps.copy_from_slice(&line[start as usize..start as usize + k])
                            }
                            Some(line) => {
                                for (kx, tap) in taps.iter_mut().enumerate() {
                                    let ix = start + kx as isize;
                                    *tap = if (0..w as isize).contains(&ix) {
                                        line[ix as usize]
                                    } else {
                                        0.0
                                    };
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct BlockPlan {
    /// Rows, columns and channels of the block input (for the first block,
    /// of the stem output).
    input: (usize, usize, usize),
    hidden: usize,
    output: (usize, usize, usize),
    /// Top and left padding of the depthwise convolution.
    padding: (usize, usize),
    /// Columns of a ring row: the input's, with the left and right padding.
    padded_width: usize,
    /// Output rows per band.
    band_rows: usize,
    /// Rows the ring holds.
    capacity: usize,
}

#[derive(Debug)]
struct Plan {
    /// Channels, rows and columns of an input image.
    image: (usize, usize, usize),
    stem_padding: (usize, usize),
    blocks: Vec<BlockPlan>,
}

#[derive(Clone, Copy)]
enum BlockInput<'a> {
    /// The first block's input: the NCHW image the stem reads.
    Image(&'a [f32]),
    /// The previous block's output, [h, w, c].
    Activations(&'a [f32]),
}

/// `mean[c]` = the average of channel c over the pixels of `map` ([pixels, c]).
fn average_pixels(map: &[f32], mean: &mut [f32]) {
    let channels = mean.len();
    mean.fill(0.0);
    for pixel in map.chunks_exact(channels) {
        for (sum, value) in mean.iter_mut().zip(pixel) {
            *sum += value;
        }
    }
    let scale = 1.0 / (map.len() / channels).max(1) as f32;
    for sum in mean.iter_mut() {
        *sum *= scale;
    }
}

struct ImageOutputs<'a> {
    pooled: &'a mut [f32],
    stages: &'a mut [f32],
    /// This image's slice of each tap map.
    taps: Vec<&'a mut [f32]>,
    stride32: &'a mut [f32],
}

/// Block inputs and outputs of one image, reused between images.
#[derive(Default)]
struct Activations {
    current: Vec<f32>,
    next: Vec<f32>,
}

/// Ring, band and im2col patches of one band task, reused between calls.
#[derive(Default)]
struct Workspace {
    ring: Vec<f32>,
    band: Vec<f32>,
    patches: Vec<f32>,
}

/// Grows `buffer` to at least `len` values (zeros only on growth: every value
/// is written before it is read).
fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

thread_local! {
    static SCRATCH: RefCell<(Activations, Workspace)> = RefCell::default();
}

/// Runs `f` with this thread's buffers, or fresh ones if they are in use
/// (a task that waits inside rayon may run another on the same thread).
fn with_scratch<R>(f: impl FnOnce(&mut Activations, &mut Workspace) -> R) -> R {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let (activations, workspace) = &mut *scratch;
            f(activations, workspace)
        }
        Err(_) => f(&mut Activations::default(), &mut Workspace::default()),
    })
}
