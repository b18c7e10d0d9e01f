//! EfficientNet-Lite0..4, inference only, mirroring `efficientnet-lite-pytorch`
//! (itself a port of TF `efficientnet/lite`): TF "same" padding, ReLU6, no
//! squeeze-excitation, stem (32) and head (1280) not scaled with width.
//!
//! BatchNorm is folded into the preceding convolution when the model is built:
//! `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * gamma / sqrt(var + eps)`,
//! so a forward pass is convolutions, bias adds and clamps only. The tensors
//! are plain (not `Var`s): the encoder is frozen.
//!
//! Weight names follow the reference state dict: `_conv_stem.weight`, `_bn0.*`,
//! `_blocks.N._expand_conv.weight`, `_blocks.N._bn0.*`, `_blocks.N._depthwise_conv.weight`,
//! `_blocks.N._bn1.*`, `_blocks.N._project_conv.weight`, `_blocks.N._bn2.*`,
//! `_conv_head.weight`, `_bn1.*`, `_fc.weight`, `_fc.bias`.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder, init};

use super::cpu_kernels::network::{
    BlockWeights, ConvWeights, CpuNetwork, DepthwiseConv, NetworkWeights, Outputs, StemWeights,
};
use super::cpu_kernels::{SimdLevel, same_padding};

/// Width and depth multipliers of one Lite variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub width: f64,
    pub depth: f64,
    /// The resolution the variant was trained at.
    pub image_size: usize,
    /// BatchNorm epsilon of the reference (`batch_norm_epsilon=1e-3`).
    pub batch_norm_eps: f64,
    pub num_classes: usize,
}

impl Config {
    fn lite(width: f64, depth: f64, image_size: usize) -> Self {
        Self {
            width,
            depth,
            image_size,
            batch_norm_eps: 1e-3,
            num_classes: 1000,
        }
    }
    pub fn lite0() -> Self {
        Self::lite(1.0, 1.0, 224)
    }
    pub fn lite1() -> Self {
        Self::lite(1.0, 1.1, 240)
    }
    pub fn lite2() -> Self {
        Self::lite(1.1, 1.2, 260)
    }
    pub fn lite3() -> Self {
        Self::lite(1.2, 1.4, 280)
    }
    pub fn lite4() -> Self {
        Self::lite(1.4, 1.8, 300)
    }

    /// The variant registered as `name` (`efficientnet-lite0` … `efficientnet-lite4`).
    pub fn for_name(name: &str) -> Option<Self> {
        Some(match name {
            "efficientnet-lite0" => Self::lite0(),
            "efficientnet-lite1" => Self::lite1(),
            "efficientnet-lite2" => Self::lite2(),
            "efficientnet-lite3" => Self::lite3(),
            "efficientnet-lite4" => Self::lite4(),
            _ => return None,
        })
    }

    /// Channels of the stride-16 map (output of the fifth stage, 112 × width).
    pub fn stride16_channels(&self) -> usize {
        round_filters(112, self.width)
    }

    /// Channels of the map of `stride` (4, 8, 16: the outputs of the
    /// second, third and fifth stages; 32: the head's 1280), None for other
    /// strides.
    pub fn map_channels(&self, stride: usize) -> Option<usize> {
        match stride {
            32 => Some(1280),
            _ => map_stage(stride).map(|stage| self.stage_channels()[stage]),
        }
    }

    /// The maps a spatial folder can cache that are one block's output,
    /// finest first: (stride, K) where the stride map is block K's output
    /// (lite0: (4, 2), (8, 4), (16, 10); `enqueue --cache-at K`, `train
    /// --unfreeze-from K`).
    pub fn block_maps(&self) -> Vec<(usize, usize)> {
        [4, 8, 16]
            .into_iter()
            .filter_map(|stride| Some((stride, self.map_block(stride)?)))
            .collect()
    }

    /// Index of the block whose output is the map of `stride` (4, 8 or 16):
    /// the last block of its stage; None for other strides.
    pub fn map_block(&self, stride: usize) -> Option<usize> {
        let stage = map_stage(stride)?;
        self.blocks().iter().rposition(|block| block.stage == stage)
    }

    /// The stride of the map that is block `after_block`'s output, or a
    /// sentence listing the blocks that have one.
    pub fn map_after_block(&self, after_block: usize) -> std::result::Result<usize, String> {
        let maps = self.block_maps();
        maps.iter()
            .find(|(_, block)| *block == after_block)
            .map(|(stride, _)| *stride)
            .ok_or_else(|| {
                let listed: Vec<String> = maps
                    .iter()
                    .map(|(stride, block)| format!("{block} (the stride-{stride} map)"))
                    .collect();
                format!(
                    "block {after_block}'s output is not a cached map: K must be {}",
                    listed.join(", ")
                )
            })
    }

    /// Output channels of each of the seven stages, first stage first (the
    /// stage outputs `--layers` pools).
    pub fn stage_channels(&self) -> Vec<usize> {
        let mut channels: Vec<usize> = Vec::new();
        for block in self.blocks() {
            if channels.len() == block.stage {
                channels.push(block.output);
            }
        }
        channels
    }

    /// The blocks in order, after width and depth scaling.
    fn blocks(&self) -> Vec<BlockConfig> {
        // (repeats, kernel, stride, expand, input, output): TF's lite block strings.
        const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
            (1, 3, 1, 1, 32, 16),
            (2, 3, 2, 6, 16, 24),
            (2, 5, 2, 6, 24, 40),
            (3, 3, 2, 6, 40, 80),
            (3, 5, 1, 6, 80, 112),
            (4, 5, 2, 6, 112, 192),
            (1, 3, 1, 6, 192, 320),
        ];
        let mut blocks = Vec::new();
        for (i, &(repeats, kernel, stride, expand, input, output)) in STAGES.iter().enumerate() {
            let fixed = i == 0 || i == STAGES.len() - 1;
            // The stem is fixed at 32 channels, so the first stage's input is too.
            let input = if i == 0 {
                32
            } else {
                round_filters(input, self.width)
            };
            let output = round_filters(output, self.width);
            let repeats = if fixed {
                repeats
            } else {
                (self.depth * repeats as f64).ceil() as usize
            };
            for r in 0..repeats {
                blocks.push(BlockConfig {
                    kernel,
                    stride: if r == 0 { stride } else { 1 },
                    expand,
                    input: if r == 0 { input } else { output },
                    output,
                    stage: i,
                });
            }
        }
        blocks
    }

    /// Channels of the last block, the input of the head convolution.
    fn last_block_channels(&self) -> usize {
        round_filters(320, self.width)
    }
}

/// `round_filters` of the reference: scale, round to a multiple of 8, never
/// more than 10% below the scaled value.
fn round_filters(filters: usize, width: f64) -> usize {
    let divisor = 8usize;
    let scaled = filters as f64 * width;
    let mut rounded = divisor.max((scaled + divisor as f64 / 2.0) as usize / divisor * divisor);
    if (rounded as f64) < 0.9 * scaled {
        rounded += divisor;
    }
    rounded
}

#[derive(Debug, Clone, Copy)]
struct BlockConfig {
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
    stage: usize,
}

fn pad_same(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = same_padding(h, kernel, stride);
    let (left, right) = same_padding(w, kernel, stride);
    x.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)
}

/// Loads a BatchNorm's four tensors and returns (scale, shift) per channel.
fn batch_norm(vb: &VarBuilder, channels: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let gamma = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
    let beta = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
    let mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
    let var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
    let scale = gamma.div(&(var + eps)?.sqrt()?)?;
    let shift = beta.sub(&mean.mul(&scale)?)?;
    Ok((scale, shift))
}

/// The shape a convolution weight has, and how it is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ConvKind {
    /// 1×1, groups 1: a matrix product over channels.
    Pointwise,
    /// k×k, groups = channels.
    Depthwise,
    /// k×k, groups 1 (the stem).
    Full,
}

/// A convolution with its BatchNorm folded in, and an optional ReLU6.
#[derive(Debug, Clone)]
struct ConvBn {
    kind: ConvKind,
    /// Pointwise: [out, in]. Depthwise: [channels, k, k]. Full: [out, in, k, k].
    weight: Tensor,
    /// [1, out, 1, 1].
    bias: Tensor,
    kernel: usize,
    stride: usize,
    relu6: bool,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: &VarBuilder,
        conv: &str,
        bn: &str,
        kind: ConvKind,
        input: usize,
        output: usize,
        kernel: usize,
        stride: usize,
        relu6: bool,
        eps: f64,
    ) -> Result<Self> {
        let in_per_group = if kind == ConvKind::Depthwise {
            1
        } else {
            input
        };
        let weight = vb.pp(conv).get_with_hints(
            (output, in_per_group, kernel, kernel),
            "weight",
            init::DEFAULT_KAIMING_NORMAL,
        )?;
        let (scale, shift) = batch_norm(&vb.pp(bn), output, eps)?;
        let weight = weight.broadcast_mul(&scale.reshape((output, 1, 1, 1))?)?;
        let weight = match kind {
            ConvKind::Pointwise => weight.reshape((output, input))?,
            ConvKind::Depthwise => weight.reshape((output, kernel, kernel))?,
            ConvKind::Full => weight,
        };
        let bias = shift.reshape((1, output, 1, 1))?;
        Ok(Self {
            kind,
            weight,
            bias,
            kernel,
            stride,
            relu6,
        })
    }

    /// Device-generic candle ops in NCHW: used on GPUs and for other dtypes.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.linear_part(x)?.broadcast_add(&self.bias)?;
        if self.relu6 { relu6(&y) } else { Ok(y) }
    }

    /// The convolution without bias or activation (pointwise and full kinds).
    fn linear_part(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            ConvKind::Pointwise => {
                let (n, c, h, w) = x.dims4()?;
                self.weight
                    .broadcast_matmul(&x.reshape((n, c, h * w))?)?
                    .reshape((n, (), h, w))
            }
            ConvKind::Full => {
                pad_same(x, self.kernel, self.stride)?.conv2d(&self.weight, 0, self.stride, 1, 1)
            }
            ConvKind::Depthwise => self.depthwise(x),
        }
    }

    /// Depthwise convolution as a sum of k² shifted, per-channel scaled copies
    /// of the padded input: exact, device-generic, and much faster on CPU than
    /// a grouped convolution with one group per channel.
    fn depthwise(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (k, s) = (self.kernel, self.stride);
        let (out_h, out_w) = (h.div_ceil(s), w.div_ceil(s));
        let padded = pad_same(x, k, s)?;
        let mut sum: Option<Tensor> = None;
        for dy in 0..k {
            let rows = take_strided(&padded, 2, dy, out_h, s)?;
            for dx in 0..k {
                let window = take_strided(&rows, 3, dx, out_w, s)?;
                let tap = self.weight.narrow(1, dy, 1)?.narrow(2, dx, 1)?;
                let term = window.broadcast_mul(&tap.reshape((1, c, 1, 1))?)?;
                sum = Some(match sum {
                    None => term,
                    Some(acc) => (acc + term)?,
                });
            }
        }
        let sum = sum.expect("kernel is at least 1x1");
        debug_assert_eq!(sum.dims4()?, (n, c, out_h, out_w));
        Ok(sum)
    }
}

/// min(max(x, 0), 6) as relu(x) - relu(x - 6): two unary ops, far faster on
/// CPU than candle's `clamp` (a broadcast binary op). Exact for x ≤ 12; above,
/// off by at most half an ulp of x.
fn relu6(x: &Tensor) -> Result<Tensor> {
    x.relu()? - (x - 6.0)?.relu()?
}

/// Elements `start, start + stride, …` (`count` of them) along `dim`.
fn take_strided(
    x: &Tensor,
    dim: usize,
    start: usize,
    count: usize,
    stride: usize,
) -> Result<Tensor> {
    if stride == 1 {
        return x.narrow(dim, start, count);
    }
    // Take `count * stride` elements (zero-extended at the end if needed),
    // split the axis into (count, stride) and keep phase 0.
    let available = x.dim(dim)? - start;
    let wanted = count * stride;
    let slice = x.narrow(dim, start, available.min(wanted))?;
    let slice = if available < wanted {
        slice.pad_with_zeros(dim, 0, wanted - available)?
    } else {
        slice
    };
    let mut dims = slice.dims().to_vec();
    dims[dim] = count;
    dims.insert(dim + 1, stride);
    slice.reshape(dims)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
    stage: usize,
}

impl MbConv {
    fn new(vb: &VarBuilder, cfg: &BlockConfig, eps: f64) -> Result<Self> {
        let hidden = cfg.input * cfg.expand;
        let expand = if cfg.expand != 1 {
            Some(ConvBn::new(
                vb,
                "_expand_conv",
                "_bn0",
                ConvKind::Pointwise,
                cfg.input,
                hidden,
                1,
                1,
                true,
                eps,
            )?)
        } else {
            None
        };
        let depthwise = ConvBn::new(
            vb,
            "_depthwise_conv",
            "_bn1",
            ConvKind::Depthwise,
            hidden,
            hidden,
            cfg.kernel,
            cfg.stride,
            true,
            eps,
        )?;
        let project = ConvBn::new(
            vb,
            "_project_conv",
            "_bn2",
            ConvKind::Pointwise,
            hidden,
            cfg.output,
            1,
            1,
            false,
            eps,
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            // id_skip is on for every Lite block; drop-connect is training only.
            residual: cfg.stride == 1 && cfg.input == cfg.output,
            stage: cfg.stage,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.expand {
            Some(expand) => expand.forward(x)?,
            None => x.clone(),
        };
        y = self.depthwise.forward(&y)?;
        y = self.project.forward(&y)?;
        if self.residual { y + x } else { Ok(y) }
    }
}

/// A folded convolution's weight and bias as plain f32 arrays.
fn conv_weights(conv: &ConvBn) -> Result<ConvWeights> {
    Ok(ConvWeights {
        weight: conv.weight.flatten_all()?.to_vec1::<f32>()?,
        bias: conv.bias.flatten_all()?.to_vec1::<f32>()?,
        relu6: conv.relu6,
    })
}

/// A folded depthwise convolution's weights, tap-major.
fn depthwise_weights(conv: &ConvBn) -> Result<DepthwiseConv> {
    let (c, k, _) = conv.weight.dims3()?;
    Ok(DepthwiseConv {
        // [c, k, k] to tap-major [k·k, c].
        weight: conv
            .weight
            .reshape((c, k * k))?
            .t()?
            .flatten_all()?
            .to_vec1::<f32>()?,
        bias: conv.bias.flatten_all()?.to_vec1::<f32>()?,
        kernel: conv.kernel,
        stride: conv.stride,
        relu6: conv.relu6,
    })
}

/// The folded weights in the CPU network's plain arrays, when they are f32 on
/// the CPU.
fn network_weights(
    stem: &ConvBn,
    blocks: &[MbConv],
    head: &ConvBn,
    stage_ends: Vec<usize>,
) -> Result<Option<NetworkWeights>> {
    if !stem.weight.device().is_cpu() || stem.weight.dtype() != DType::F32 {
        return Ok(None);
    }
    let (_, in_channels, _, _) = stem.weight.dims4()?;
    Ok(Some(NetworkWeights {
        stem: StemWeights {
            conv: conv_weights(stem)?,
            in_channels,
            kernel: stem.kernel,
            stride: stem.stride,
        },
        blocks: blocks
            .iter()
            .map(|block| {
                Ok(BlockWeights {
                    expand: block.expand.as_ref().map(conv_weights).transpose()?,
                    depthwise: depthwise_weights(&block.depthwise)?,
                    project: conv_weights(&block.project)?,
                    residual: block.residual,
                })
            })
            .collect::<Result<_>>()?,
        head: conv_weights(head)?,
        stage_ends,
    }))
}

/// The stage (0-based) whose output is the map of `stride` (4, 8 or 16).
fn map_stage(stride: usize) -> Option<usize> {
    match stride {
        4 => Some(1),
        8 => Some(2),
        16 => Some(4),
        _ => None,
    }
}

/// Index of `model`'s block whose output is the map of `stride` (4, 8 or
/// 16), as its config places it.
fn map_block(model: &EfficientNetLite, stride: usize) -> candle_core::Result<usize> {
    model.config.map_block(stride).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "efficientnet-lite has block maps of stride 4, 8 and 16, not {stride}"
        ))
    })
}

/// Index of the last block of each stage, first stage first.
fn stage_ends(blocks: &[MbConv]) -> Vec<usize> {
    (0..blocks.len())
        .filter(|&i| i + 1 == blocks.len() || blocks[i + 1].stage != blocks[i].stage)
        .collect()
}

/// The CPU network's NHWC arrays as tensors; the maps are NCHW views.
fn cpu_features(outputs: Outputs, n: usize, device: &candle_core::Device) -> Result<Features> {
    let Outputs {
        pooled,
        stages,
        taps,
        stride32,
        stride32_shape: (h32, w32, c32),
    } = outputs;
    let features = pooled.len() / n.max(1);
    let stage_features = stages.len() / n.max(1);
    Ok(Features {
        pooled: Tensor::from_vec(pooled, (n, features), device)?,
        stages: Tensor::from_vec(stages, (n, stage_features), device)?,
        maps: taps
            .into_iter()
            .map(|tap| {
                let (h, w, c) = tap.shape;
                Tensor::from_vec(tap.values, (n, h, w, c), device)?.permute((0, 3, 1, 2))
            })
            .collect::<Result<_>>()?,
        stride32: Tensor::from_vec(stride32, (n, h32, w32, c32), device)?.permute((0, 3, 1, 2))?,
    })
}

/// What one forward pass yields.
#[derive(Debug, Clone)]
pub struct Features {
    /// [n, 1280]: the head output averaged over H and W.
    pub pooled: Tensor,
    /// [n, sum of `Config::stage_channels`]: each stage's output averaged
    /// over H and W, first stage first.
    pub stages: Tensor,
    /// The block maps asked for, in the order of their strides (4: output of
    /// the second stage, [n, 24 × width, ⌈H/4⌉, ⌈W/4⌉]; 8: of the third,
    /// 40 × width; 16: of the fifth, 112 × width).
    pub maps: Vec<Tensor>,
    /// [n, 1280, ⌈H/32⌉, ⌈W/32⌉]: output of the head (conv, BN, ReLU6).
    pub stride32: Tensor,
}

#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    config: Config,
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    classifier: candle_nn::Linear,
    /// The folded weights for the CPU kernels, when they are f32 on the CPU.
    cpu_weights: Option<Box<NetworkWeights>>,
    /// Those weights packed for the SIMD level in force.
    cpu: Option<Box<CpuNetwork>>,
}

impl EfficientNetLite {
    pub fn new(config: Config, vb: VarBuilder) -> Result<Self> {
        let eps = config.batch_norm_eps;
        let stem = ConvBn::new(
            &vb,
            "_conv_stem",
            "_bn0",
            ConvKind::Full,
            3,
            32,
            3,
            2,
            true,
            eps,
        )?;
        let blocks = config
            .blocks()
            .iter()
            .enumerate()
            .map(|(i, block)| MbConv::new(&vb.pp("_blocks").pp(i), block, eps))
            .collect::<Result<Vec<_>>>()?;
        let head = ConvBn::new(
            &vb,
            "_conv_head",
            "_bn1",
            ConvKind::Pointwise,
            config.last_block_channels(),
            1280,
            1,
            1,
            true,
            eps,
        )?;
        let fc = vb.pp("_fc");
        let classifier = candle_nn::Linear::new(
            fc.get_with_hints(
                (config.num_classes, 1280),
                "weight",
                init::DEFAULT_KAIMING_NORMAL,
            )?,
            Some(fc.get_with_hints(config.num_classes, "bias", Init::Const(0.0))?),
        );
        let cpu_weights =
            network_weights(&stem, &blocks, &head, stage_ends(&blocks))?.map(Box::new);
        let mut model = Self {
            config,
            stem,
            blocks,
            head,
            classifier,
            cpu_weights,
            cpu: None,
        };
        if model.cpu_weights.is_some() {
            model =
                model.with_simd_level(SimdLevel::from_env().map_err(candle_core::Error::Msg)?)?;
        }
        Ok(model)
    }

    /// The same model with its CPU kernels at `level` (an error when this CPU
    /// lacks it). Without CPU kernels (weights not f32 on the CPU) unchanged.
    pub fn with_simd_level(mut self, level: SimdLevel) -> Result<Self> {
        if let Some(weights) = &self.cpu_weights {
            self.cpu = Some(Box::new(
                CpuNetwork::new(weights, level).map_err(candle_core::Error::Msg)?,
            ));
        }
        Ok(self)
    }

    /// The SIMD level of the CPU kernels, if the model has them.
    pub fn simd_level(&self) -> Option<SimdLevel> {
        self.cpu.as_ref().map(|cpu| cpu.level())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The folded weights as plain f32 arrays (BatchNorm as a per-channel
    /// affine), when the model is f32 on the CPU: the starting point of the
    /// trainable top blocks (`train::blocks`).
    pub(crate) fn folded_weights(&self) -> Option<&NetworkWeights> {
        self.cpu_weights.as_deref()
    }

    /// Index (0-based) of the block whose output is the map of `stride`
    /// (4, 8 or 16): the last block of its stage. Lite0's stride-16 map is
    /// block 10's output.
    pub fn map_block_index(&self, stride: usize) -> Result<usize> {
        map_block(self, stride)
    }

    /// The number of inverted-residual blocks (Lite0: 16).
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Runs the network on a normalised batch [n, 3, H, W], keeping the
    /// block maps of `strides` (each 4, 8 or 16; none costs nothing).
    ///
    /// On the CPU with f32 weights: the fused NHWC kernels of `cpu_kernels`,
    /// one image per thread (see `cpu_kernels::network`). Elsewhere: the
    /// device-generic candle ops.
    pub fn features(&self, images: &Tensor, strides: &[usize]) -> Result<Features> {
        let taps = strides
            .iter()
            .map(|&stride| map_block(self, stride))
            .collect::<Result<Vec<_>>>()?;
        let Some(cpu) = self.cpu.as_ref().filter(|_| images.device().is_cpu()) else {
            return self.features_generic(images, &taps);
        };
        let (n, _, h, w) = images.dims4()?;
        let images = images.to_dtype(DType::F32)?.contiguous()?;
        let outputs = {
            let (storage, layout) = images.storage_and_layout();
            let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
                candle_core::bail!("efficientnet-lite: CPU input is not f32")
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("efficientnet-lite: CPU input is not contiguous")
            };
            cpu.run(&data[start..end], n, (h, w), &taps)
                .map_err(candle_core::Error::Msg)?
        };
        cpu_features(outputs, n, images.device())
    }

    /// The device-generic forward pass in NCHW (GPUs, other dtypes),
    /// keeping the outputs of the blocks `taps`.
    fn features_generic(&self, images: &Tensor, taps: &[usize]) -> Result<Features> {
        let mut x = self.stem.forward(images)?;
        let mut maps: Vec<Option<Tensor>> = vec![None; taps.len()];
        let stage_ends = stage_ends(&self.blocks);
        let mut stages = Vec::with_capacity(stage_ends.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x)?;
            for (tap, map) in taps.iter().zip(maps.iter_mut()) {
                if *tap == i {
                    *map = Some(x.clone());
                }
            }
            if stage_ends.contains(&i) {
                stages.push(x.mean(D::Minus1)?.mean(D::Minus1)?);
            }
        }
        let stride32 = self.head.forward(&x)?;
        let pooled = stride32.mean(D::Minus1)?.mean(D::Minus1)?;
        Ok(Features {
            pooled,
            stages: Tensor::cat(&stages, 1)?,
            maps: maps
                .into_iter()
                .zip(taps)
                .map(|(map, tap)| {
                    map.ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "tapped block {tap} of {}",
                            self.blocks.len()
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            stride32,
        })
    }

    /// ImageNet logits [n, 1000] from pooled features (`_fc`; dropout is training only).
    pub fn logits(&self, pooled: &Tensor) -> Result<Tensor> {
        self.classifier.forward(pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoders::cpu_kernels::depthwise::{DepthwiseRows, DepthwiseWeights};

    #[test]
    fn round_filters_matches_the_reference() {
        // Values from efficientnet-lite-pytorch's round_filters (depth_divisor 8).
        assert_eq!(round_filters(320, 1.0), 320);
        assert_eq!(round_filters(112, 1.1), 120);
        assert_eq!(round_filters(320, 1.2), 384);
        assert_eq!(round_filters(24, 1.4), 32);
        assert_eq!(round_filters(112, 1.4), 160);
    }

    #[test]
    fn stage_channels_follow_the_width() {
        // Lite0: TF's block strings; Lite2 (width 1.1): round_filters of each.
        assert_eq!(
            Config::lite0().stage_channels(),
            [16, 24, 40, 80, 112, 192, 320]
        );
        assert_eq!(
            Config::lite2().stage_channels(),
            [16, 24, 48, 88, 120, 208, 352]
        );
        let model = random_lite0();
        assert_eq!(stage_ends(&model.blocks), [0, 2, 4, 7, 10, 14, 15]);
    }

    #[test]
    fn lite0_has_16_blocks_and_lite4_has_30() {
        assert_eq!(Config::lite0().blocks().len(), 16);
        assert_eq!(Config::lite0().block_maps(), [(4, 2), (8, 4), (16, 10)]);
        assert_eq!(Config::lite0().map_after_block(4), Ok(8));
        let refused = Config::lite0().map_after_block(9).unwrap_err();
        assert!(
            refused.contains(
                "K must be 2 (the stride-4 map), 4 (the stride-8 map), 10 (the stride-16 map)"
            ),
            "{refused}"
        );
        // Deeper variants end their stages later: lite2 repeats its stages
        // 1, 3, 3, 4, 4, 5, 1 times (ceil(1.2 x 2, 2, 3, 3, 4); the first
        // and last fixed), so stages 2, 3 and 5 end at blocks 3, 6 and 14.
        assert_eq!(Config::lite2().block_maps(), [(4, 3), (8, 6), (16, 14)]);
        // lite4: stages 1 and 7 fixed (1 each), others ceil(1.8 * r): 4+4+6+6+8.
        assert_eq!(Config::lite4().blocks().len(), 30);
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn random_conv(kind: ConvKind, input: usize, output: usize, k: usize, s: usize) -> ConvBn {
        let dev = candle_core::Device::Cpu;
        let weight = match kind {
            ConvKind::Pointwise => Tensor::randn(0f32, 1.0, (output, input), &dev),
            ConvKind::Depthwise => Tensor::randn(0f32, 1.0, (output, k, k), &dev),
            ConvKind::Full => Tensor::randn(0f32, 1.0, (output, input, k, k), &dev),
        }
        .unwrap();
        ConvBn {
            kind,
            weight,
            bias: Tensor::randn(0f32, 1.0, (1, output, 1, 1), &dev).unwrap(),
            kernel: k,
            stride: s,
            relu6: false,
        }
    }

    /// Candle's grouped convolution plus bias and clamp: the plain reference.
    fn grouped_reference(conv: &ConvBn, x: &Tensor) -> Tensor {
        let (c, k, _) = conv.weight.dims3().unwrap();
        let w = conv.weight.reshape((c, 1, k, k)).unwrap();
        let y = pad_same(x, k, conv.stride)
            .unwrap()
            .conv2d(&w, 0, conv.stride, 1, c)
            .unwrap()
            .broadcast_add(&conv.bias)
            .unwrap();
        if conv.relu6 {
            y.clamp(0f32, 6f32).unwrap()
        } else {
            y
        }
    }

    /// The depthwise kernel over whole images: the ring holds every row, in
    /// channel blocks, with the padding columns.
    fn depthwise_kernel(conv: &ConvBn, x: &Tensor, level: SimdLevel) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let lanes = level.lanes();
        let conv = depthwise_weights(conv).unwrap();
        let (k, s) = (conv.kernel, conv.stride);
        let op = DepthwiseWeights::new(&conv.weight, &conv.bias, (k, s), conv.relu6, lanes);
        let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
        let (left, right) = same_padding(w, k, s);
        let padded = left + w + right;
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut y = vec![0f32; n * c * ho * wo];
        for image in 0..n {
            // [c / lanes][h · padded][lanes]
            let mut ring = vec![0f32; c * h * padded];
            for ch in 0..c {
                for row in 0..h {
                    for col in 0..w {
                        let at = ((ch / lanes) * h * padded + row * padded + left + col) * lanes;
                        ring[at + ch % lanes] = x[((image * c + ch) * h + row) * w + col];
                    }
                }
            }
            let mut out = vec![f32::NAN; c * ho * wo];
            level.arch().unwrap().dispatch(DepthwiseRows {
                op: &op,
                ring: &ring,
                capacity: h,
                size: (h, padded),
                top: same_padding(h, k, s).0,
                first_row: 0,
                output: &mut out,
            });
            for ch in 0..c {
                for p in 0..ho * wo {
                    y[(image * c + ch) * ho * wo + p] =
                        out[((ch / lanes) * ho * wo + p) * lanes + ch % lanes];
                }
            }
        }
        Tensor::from_vec(y, (n, c, ho, wo), &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn depthwise_paths_equal_grouped_conv() {
        let dev = candle_core::Device::Cpu;
        // Odd and even sizes, non-square, smaller than the kernel, rows of
        // whole blocks of 8 outputs and of every remainder; channel counts of
        // one or more whole vectors at every level (the kernel takes only
        // those; the scalar level takes any).
        for (h, w, c) in [
            (9, 9, 16),
            (7, 10, 48),
            (4, 3, 80),
            (2, 2, 16),
            (1, 5, 32),
            (9, 9, 32),
            (6, 11, 96),
            (5, 29, 16),
            (3, 24, 48),
            (4, 37, 32),
        ] {
            let x = Tensor::randn(0f32, 3.0, (2, c, h, w), &dev).unwrap();
            for (k, s) in [(3, 1), (3, 2), (5, 2), (5, 1), (7, 1)] {
                for relu6 in [false, true] {
                    let mut conv = random_conv(ConvKind::Depthwise, c, c, k, s);
                    conv.relu6 = relu6;
                    let reference = grouped_reference(&conv, &x);
                    let diff = max_abs_diff(&conv.forward(&x).unwrap(), &reference);
                    assert!(diff < 1e-4, "generic {h}x{w}x{c} k={k} s={s}: {diff}");
                    for level in SimdLevel::available() {
                        let diff = max_abs_diff(&depthwise_kernel(&conv, &x, level), &reference);
                        assert!(
                            diff < 1e-4,
                            "{level} kernel {h}x{w}x{c} k={k} s={s} relu6={relu6}: {diff}"
                        );
                    }
                }
            }
        }
    }

    fn random_lite0() -> EfficientNetLite {
        let dev = candle_core::Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        EfficientNetLite::new(Config::lite0(), vb).unwrap()
    }

    fn assert_close(name: &str, a: &Tensor, b: &Tensor) {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(a, b);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{name}: {diff} (scale {scale})"
        );
    }

    /// Every block map a segmentation folder can hold.
    const STRIDES: [usize; 3] = [4, 8, 16];

    fn taps(model: &EfficientNetLite, strides: &[usize]) -> Vec<usize> {
        strides
            .iter()
            .map(|&s| map_block(model, s).unwrap())
            .collect()
    }

    /// Each map of `fast` against `reference`, with its shape: ⌈size/stride⌉
    /// and the stage's channels.
    fn assert_maps_close(
        name: &str,
        fast: &Features,
        reference: &Features,
        (h, w): (usize, usize),
    ) {
        let config = Config::lite0();
        assert_eq!(fast.maps.len(), STRIDES.len(), "{name}");
        for ((stride, a), b) in STRIDES.iter().zip(&fast.maps).zip(&reference.maps) {
            assert_eq!(
                a.dims4().unwrap(),
                (
                    a.dim(0).unwrap(),
                    config.map_channels(*stride).unwrap(),
                    h.div_ceil(*stride),
                    w.div_ceil(*stride)
                ),
                "{name} stride {stride}"
            );
            assert_close(&format!("{name} stride {stride}"), a, b);
        }
    }

    #[test]
    fn map_channels_of_lite0() {
        // TF's lite0 block strings: stage 2 ends at 24, stage 3 at 40, stage 5 at 112.
        let config = Config::lite0();
        let channels: Vec<_> = [4, 8, 16, 32]
            .iter()
            .map(|&s| config.map_channels(s))
            .collect();
        assert_eq!(channels, [Some(24), Some(40), Some(112), Some(1280)]);
        assert_eq!(config.map_channels(2), None);
        assert_eq!(config.map_channels(16), Some(config.stride16_channels()));
    }

    #[test]
    fn cpu_kernels_equal_the_generic_network() {
        let dev = candle_core::Device::Cpu;
        // Square and odd sizes: TF padding on both sides, edge and interior
        // pixels of every depthwise layer, stride-2 layers on odd inputs.
        for (h, w) in [(64, 64), (57, 43)] {
            let images = Tensor::randn(0f32, 1.0, (3, 3, h, w), &dev).unwrap();
            for level in SimdLevel::available() {
                let model = random_lite0().with_simd_level(level).unwrap();
                assert_eq!(model.simd_level(), Some(level));
                let fast = model.features(&images, &STRIDES).unwrap();
                let generic = model
                    .features_generic(&images, &taps(&model, &STRIDES))
                    .unwrap();
                for (name, a, b) in [
                    ("pooled", &fast.pooled, &generic.pooled),
                    ("stages", &fast.stages, &generic.stages),
                    ("stride32", &fast.stride32, &generic.stride32),
                ] {
                    assert_close(&format!("{level} {h}x{w} {name}"), a, b);
                }
                assert_maps_close(&format!("{level} {h}x{w}"), &fast, &generic, (h, w));
                // No taps: no maps, the same pooled features.
                let untapped = model.features(&images, &[]).unwrap();
                assert!(untapped.maps.is_empty());
                assert_eq!(max_abs_diff(&untapped.pooled, &fast.pooled), 0.0);
            }
        }
    }

    #[test]
    fn small_bands_and_ring_wraps_give_the_same_features() {
        // Bands of one or two rows and rings of a few rows: every block
        // produces its hidden rows in several runs that wrap around the ring.
        let dev = candle_core::Device::Cpu;
        let images = Tensor::randn(0f32, 1.0, (2, 3, 96, 80), &dev).unwrap();
        let model = random_lite0();
        let cpu = model.cpu.as_ref().unwrap();
        let taps = taps(&model, &STRIDES);
        let reference = model.features_generic(&images, &taps).unwrap();
        let data = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (ring_bytes, band_bytes) in [(1, 1), (20_000, 6_000)] {
            let small = (**cpu).clone().with_budgets(ring_bytes, band_bytes);
            let fast =
                cpu_features(small.run(&data, 2, (96, 80), &taps).unwrap(), 2, &dev).unwrap();
            assert_close("pooled", &fast.pooled, &reference.pooled);
            assert_close("stages", &fast.stages, &reference.stages);
            assert_maps_close("small bands", &fast, &reference, (96, 80));
            assert_close("stride32", &fast.stride32, &reference.stride32);
        }
    }

    #[test]
    fn features_do_not_depend_on_the_batch() {
        // One image alone (its rows split between threads) and the same image
        // inside a batch (one image per thread): the same bits.
        let dev = candle_core::Device::Cpu;
        let model = random_lite0();
        let batch = Tensor::randn(0f32, 1.0, (5, 3, 64, 64), &dev).unwrap();
        let together = model.features(&batch, &STRIDES).unwrap();
        for i in [0, 4] {
            let alone = model
                .features(&batch.narrow(0, i, 1).unwrap(), &STRIDES)
                .unwrap();
            for (name, a, b) in [
                ("pooled", &alone.pooled, &together.pooled),
                ("stages", &alone.stages, &together.stages),
                ("stride4", &alone.maps[0], &together.maps[0]),
                ("stride8", &alone.maps[1], &together.maps[1]),
                ("stride16", &alone.maps[2], &together.maps[2]),
                ("stride32", &alone.stride32, &together.stride32),
            ] {
                let b = b.narrow(0, i, 1).unwrap();
                assert_eq!(max_abs_diff(a, &b), 0.0, "image {i} {name}");
            }
        }
    }
}
