//! The trainable top of an EfficientNet-Lite (issue 22, partial
//! fine-tuning): the inverted-residual blocks after block K and the head
//! convolution, trained from a cached block-K map together with a head.
//!
//! The early blocks run once at extraction (their output is the spatial
//! folder's stride-4, -8 or -16 map); the blocks after it run forward and backward
//! every epoch, here, on flat f32 buffers in channels-last order
//! (`[images, height, width, channels]`), so every 1×1 convolution is one
//! `[pixels, in] × [in, out]` matmul without a transpose and the
//! depthwise loops run over contiguous channels. The cache stores
//! `[channels, height, width]` per row: `append_channels_last` transposes a
//! map once when it is loaded.
//!
//! BatchNorm stays folded into each convolution's weight and bias as at
//! extraction (`EfficientNetLite::folded_weights`): a per-channel affine with
//! the pretrained running statistics, trained as part of the weight and
//! bias. Freezing the statistics is the usual choice for fine-tuning with
//! small batches, whose own statistics would be noise.
//!
//! Every sum is taken in an order fixed by the shapes alone (the depthwise
//! weight gradient sums per-image partials in image order), so results do
//! not depend on the thread count.
//!
//! `with_precision(BlocksPrecision::Bf16)` (`--blocks-precision bf16`) runs
//! the 1×1 convolutions' products, forward and backward, on operands
//! rounded to bf16 with f32 sums (`lazarus_kernels::bf16`); everything else
//! stays f32. `with_pooling(BlocksPooling::MeanMax)` (`--blocks-pool
//! mean-max`) gives the head each channel's maximum over the map beside its
//! mean; the maximum's gradient goes to its pixel (the first, on ties).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::TrainError;
use super::config::{BlocksPooling, BlocksPrecision};
use super::host::{Accumulate, AdamWStep, Product, Threads, row_major};
use crate::encoders::cpu_kernels::matmul::PackedRight;
use crate::encoders::cpu_kernels::network::{
    BlockWeights, ConvWeights, DepthwiseConv, NetworkWeights,
};
use crate::encoders::cpu_kernels::scratch;
use crate::encoders::cpu_kernels::training::{self, Wanted};
use crate::encoders::efficientnet_lite::EfficientNetLite;

pub use lazarus_kernels::training::MapSize;

/// A 1×1 convolution: weight `[outputs, inputs]`, bias `[outputs]`.
#[derive(Debug, Clone)]
struct Pointwise {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    relu6: bool,
}

/// A k×k depthwise convolution with TF "same" padding: weight
/// `[kernel², channels]` tap-major (tap = dy · kernel + dx), bias `[channels]`.
#[derive(Debug, Clone)]
struct Depthwise {
    weight: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
    kernel: usize,
    stride: usize,
    relu6: bool,
}

impl Depthwise {
    fn kernel(&self) -> training::DepthwiseKernel<'_> {
        training::DepthwiseKernel {
            weight: &self.weight,
            bias: &self.bias,
            channels: self.channels,
            kernel: self.kernel,
            stride: self.stride,
            relu6: self.relu6,
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    residual: bool,
}

/// What rebuilds `TopBlocks` from its named tensors without the encoder
/// (the metadata of a run's blocks file): per block, whether it expands,
/// its depthwise kernel and stride, the skip connection and where ReLU6
/// applies. Channel counts come from the tensors' shapes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlocksLayout {
    pub after_block: usize,
    pub in_channels: usize,
    pub blocks: Vec<BlockLayout>,
    pub head_relu6: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockLayout {
    /// Some(ReLU6 after it) when the block has an expansion convolution.
    pub expand_relu6: Option<bool>,
    pub kernel: usize,
    pub stride: usize,
    pub depthwise_relu6: bool,
    pub project_relu6: bool,
    pub residual: bool,
}

/// The blocks after block `after_block` and the head convolution, with
/// their parameters as flat f32 arrays.
#[derive(Debug, Clone)]
pub struct TopBlocks {
    after_block: usize,
    in_channels: usize,
    blocks: Vec<Block>,
    head: Pointwise,
    /// The 1×1 convolutions' matrix products, forward and backward.
    precision: BlocksPrecision,
    /// How the head convolution's map becomes the pooled features.
    pooling: BlocksPooling,
}

fn pointwise(conv: &ConvWeights, inputs: usize, name: &str) -> Result<Pointwise, TrainError> {
    let outputs = conv.bias.len();
    if conv.weight.len() != outputs * inputs {
        return Err(TrainError::Invalid(format!(
            "{name}: {} weights for {outputs} outputs of {inputs} inputs",
            conv.weight.len()
        )));
    }
    Ok(Pointwise {
        weight: conv.weight.clone(),
        bias: conv.bias.clone(),
        inputs,
        outputs,
        relu6: conv.relu6,
    })
}

impl TopBlocks {
    /// The blocks after `after_block` of `encoder` and its head convolution,
    /// from its folded weights. The encoder must hold f32 weights on the CPU.
    pub fn from_encoder(
        encoder: &EfficientNetLite,
        after_block: usize,
    ) -> Result<Self, TrainError> {
        let weights = encoder.folded_weights().ok_or_else(|| {
            TrainError::Invalid(
                "efficientnet-lite: fine-tuning needs f32 weights on the CPU".to_string(),
            )
        })?;
        Self::from_network(weights, after_block)
    }

    pub(crate) fn from_network(
        weights: &NetworkWeights,
        after_block: usize,
    ) -> Result<Self, TrainError> {
        let n_blocks = weights.blocks.len();
        if after_block + 1 >= n_blocks {
            return Err(TrainError::Invalid(format!(
                "efficientnet-lite has blocks 0..={}: no block after block {after_block} to train",
                n_blocks.saturating_sub(1)
            )));
        }
        let in_channels = weights.blocks[after_block].project.bias.len();
        Self::new(
            after_block,
            in_channels,
            &weights.blocks[after_block + 1..],
            &weights.head,
        )
    }

    /// Blocks `after_block + 1 ..` from their folded weights, reading
    /// `in_channels` channels; `head` is the 1×1 head convolution.
    pub(crate) fn new(
        after_block: usize,
        in_channels: usize,
        blocks: &[BlockWeights],
        head: &ConvWeights,
    ) -> Result<Self, TrainError> {
        let mut channels = in_channels;
        let mut built = Vec::with_capacity(blocks.len());
        for (offset, block) in blocks.iter().enumerate() {
            let name = format!("block {}", after_block + 1 + offset);
            let expand = block
                .expand
                .as_ref()
                .map(|conv| pointwise(conv, channels, &format!("{name} expand")))
                .transpose()?;
            let hidden = expand.as_ref().map_or(channels, |e| e.outputs);
            let dw = &block.depthwise;
            if dw.bias.len() != hidden
                || dw.weight.len() != hidden * dw.kernel * dw.kernel
                || dw.stride == 0
                || dw.kernel == 0
            {
                return Err(TrainError::Invalid(format!(
                    "{name}: depthwise {}x{} stride {} with {} weights on {} channels, {hidden} expected",
                    dw.kernel,
                    dw.kernel,
                    dw.stride,
                    dw.weight.len(),
                    dw.bias.len()
                )));
            }
            let project = pointwise(&block.project, hidden, &format!("{name} project"))?;
            if block.residual && (project.outputs != channels || dw.stride != 1) {
                return Err(TrainError::Invalid(format!(
                    "{name}: skip connection from {channels} channels to {} at stride {}",
                    project.outputs, dw.stride
                )));
            }
            channels = project.outputs;
            built.push(Block {
                expand,
                depthwise: Depthwise {
                    weight: dw.weight.clone(),
                    bias: dw.bias.clone(),
                    channels: hidden,
                    kernel: dw.kernel,
                    stride: dw.stride,
                    relu6: dw.relu6,
                },
                project,
                residual: block.residual,
            });
        }
        let head = pointwise(head, channels, "head convolution")?;
        Ok(TopBlocks {
            after_block,
            in_channels,
            blocks: built,
            head,
            precision: BlocksPrecision::F32,
            pooling: BlocksPooling::Mean,
        })
    }

    /// What `from_layout` needs besides the tensors.
    pub fn layout(&self) -> BlocksLayout {
        BlocksLayout {
            after_block: self.after_block,
            in_channels: self.in_channels,
            blocks: self
                .blocks
                .iter()
                .map(|block| BlockLayout {
                    expand_relu6: block.expand.as_ref().map(|e| e.relu6),
                    kernel: block.depthwise.kernel,
                    stride: block.depthwise.stride,
                    depthwise_relu6: block.depthwise.relu6,
                    project_relu6: block.project.relu6,
                    residual: block.residual,
                })
                .collect(),
            head_relu6: self.head.relu6,
        }
    }

    /// The blocks `layout` describes with the parameters of `tensors` (the
    /// names of `tensors(prefix)`); `source` names the file in errors. Every
    /// tensor's shape is checked as `new` checks the encoder's.
    pub fn from_layout(
        layout: &BlocksLayout,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        source: &Path,
    ) -> Result<Self, TrainError> {
        let read = |name: &str| -> Result<Vec<f32>, TrainError> {
            let key = format!("{prefix}{name}");
            let tensor = tensors.get(&key).ok_or_else(|| {
                TrainError::Checkpoint(format!("{}: no tensor {key}", source.display()))
            })?;
            Ok(tensor
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let conv = |name: &str, relu6: bool| -> Result<ConvWeights, TrainError> {
            Ok(ConvWeights {
                weight: read(&format!("{name}.weight"))?,
                bias: read(&format!("{name}.bias"))?,
                relu6,
            })
        };
        let mut blocks = Vec::with_capacity(layout.blocks.len());
        for (offset, block) in layout.blocks.iter().enumerate() {
            let name = format!("block{}", layout.after_block + 1 + offset);
            blocks.push(BlockWeights {
                expand: block
                    .expand_relu6
                    .map(|relu6| conv(&format!("{name}.expand"), relu6))
                    .transpose()?,
                depthwise: DepthwiseConv {
                    weight: read(&format!("{name}.depthwise.weight"))?,
                    bias: read(&format!("{name}.depthwise.bias"))?,
                    kernel: block.kernel,
                    stride: block.stride,
                    relu6: block.depthwise_relu6,
                },
                project: conv(&format!("{name}.project"), block.project_relu6)?,
                residual: block.residual,
            });
        }
        let head = conv("head", layout.head_relu6)?;
        Self::new(layout.after_block, layout.in_channels, &blocks, &head)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", source.display())))
    }

    /// These blocks with their 1×1 convolutions' products at `precision`
    /// (f32 when built).
    pub fn with_precision(mut self, precision: BlocksPrecision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> BlocksPrecision {
        self.precision
    }

    /// These blocks with the head convolution's map pooled by `pooling`
    /// (the mean when built).
    pub fn with_pooling(mut self, pooling: BlocksPooling) -> Self {
        self.pooling = pooling;
        self
    }

    pub fn pooling(&self) -> BlocksPooling {
        self.pooling
    }

    /// Channels of the head convolution's output.
    pub fn head_channels(&self) -> usize {
        self.head.outputs
    }

    /// The block whose output these blocks read.
    pub fn after_block(&self) -> usize {
        self.after_block
    }

    /// Channels of the map these blocks read.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Length of the pooled features: the head convolution's outputs, once
    /// per part of the pooling (means, then maxima under `mean-max`).
    pub fn feature_dim(&self) -> usize {
        self.head.outputs * self.pooling.parts()
    }

    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Parameter names, in the order of `parameters`, `parameters_mut` and
    /// `BlockGradients::values`: `block11.expand.weight`, …, `head.bias`.
    pub fn parameter_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (offset, block) in self.blocks.iter().enumerate() {
            let index = self.after_block + 1 + offset;
            let mut layers = Vec::new();
            if block.expand.is_some() {
                layers.push("expand");
            }
            layers.extend(["depthwise", "project"]);
            for layer in layers {
                for part in ["weight", "bias"] {
                    names.push(format!("block{index}.{layer}.{part}"));
                }
            }
        }
        names.extend(["head.weight".to_string(), "head.bias".to_string()]);
        names
    }

    /// Every parameter as a flat array (see `parameter_names`).
    pub fn parameters(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = Vec::new();
        for block in &self.blocks {
            if let Some(expand) = &block.expand {
                out.extend([expand.weight.as_slice(), expand.bias.as_slice()]);
            }
            out.extend([
                block.depthwise.weight.as_slice(),
                block.depthwise.bias.as_slice(),
                block.project.weight.as_slice(),
                block.project.bias.as_slice(),
            ]);
        }
        out.extend([self.head.weight.as_slice(), self.head.bias.as_slice()]);
        out
    }

    /// Every parameter, mutable, in the order of `parameters`.
    pub fn parameters_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out: Vec<&mut [f32]> = Vec::new();
        for block in &mut self.blocks {
            if let Some(expand) = &mut block.expand {
                out.push(&mut expand.weight);
                out.push(&mut expand.bias);
            }
            out.push(&mut block.depthwise.weight);
            out.push(&mut block.depthwise.bias);
            out.push(&mut block.project.weight);
            out.push(&mut block.project.bias);
        }
        out.push(&mut self.head.weight);
        out.push(&mut self.head.bias);
        out
    }

    /// The shape of each parameter, in the order of `parameters`: pointwise
    /// weights `[outputs, inputs]`, depthwise weights `[kernel², channels]`,
    /// biases `[outputs]`.
    pub fn parameter_shapes(&self) -> Vec<Vec<usize>> {
        let pointwise = |conv: &Pointwise| [vec![conv.outputs, conv.inputs], vec![conv.outputs]];
        let mut shapes = Vec::new();
        for block in &self.blocks {
            if let Some(expand) = &block.expand {
                shapes.extend(pointwise(expand));
            }
            let dw = &block.depthwise;
            shapes.extend([vec![dw.kernel * dw.kernel, dw.channels], vec![dw.channels]]);
            shapes.extend(pointwise(&block.project));
        }
        shapes.extend(pointwise(&self.head));
        shapes
    }

    /// The parameters as named CPU tensors (`parameter_names` after
    /// `prefix`), for checkpoints and model files.
    pub fn tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>, TrainError> {
        named_tensors(
            prefix,
            &self.parameter_names(),
            &self.parameter_shapes(),
            self.parameters(),
        )
    }

    /// Replaces every parameter with the tensor of its name (after
    /// `prefix`) in `tensors`; `source` names where they were read, for
    /// errors. Refuses a missing tensor or one of another shape, changing
    /// nothing.
    pub fn load_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        source: &Path,
    ) -> Result<(), TrainError> {
        let values = read_named(
            tensors,
            prefix,
            &self.parameter_names(),
            &self.parameter_shapes(),
            source,
        )?;
        for (parameter, values) in self.parameters_mut().into_iter().zip(values) {
            parameter.copy_from_slice(&values);
        }
        Ok(())
    }

    /// Zeroed gradient buffers shaped like the parameters.
    pub fn zero_gradients(&self) -> BlockGradients {
        BlockGradients {
            values: self
                .parameters()
                .iter()
                .map(|p| vec![0f32; p.len()])
                .collect(),
        }
    }

    /// Runs the blocks and the head convolution on `input`
    /// (`[n_images, size.height, size.width, in_channels]`, channels last)
    /// and pools the head's output (`with_pooling`), keeping what `backward`
    /// needs.
    pub fn forward(
        &self,
        input: Vec<f32>,
        n_images: usize,
        size: MapSize,
    ) -> Result<Forward, TrainError> {
        self.forward_scaled(input, n_images, size, None, Pass::Training)
    }

    /// The blocks ready for forward passes that keep nothing for a backward
    /// pass (evaluation, prediction): see [`EvaluationBlocks`]. Packs the
    /// weights (a few ms for Lite0's top); `with_packing` reuses a packing.
    pub fn for_evaluation(&self) -> EvaluationBlocks<'_> {
        EvaluationBlocks {
            blocks: self,
            packing: Packing::Owned(self.pack_for_evaluation()),
        }
    }

    /// The weights packed for [`EvaluationBlocks`], for whoever evaluates
    /// these same blocks many times (a run's answers, request after
    /// request): pass it to `with_packing`.
    pub fn pack_for_evaluation(&self) -> EvaluationPacking {
        let packed = (self.precision == BlocksPrecision::F32).then(|| {
            let pack = |conv: &Pointwise| {
                PackedRight::new(row_major(&conv.weight, conv.outputs, conv.inputs).transpose())
            };
            PackedConvolutions {
                expand: self
                    .blocks
                    .iter()
                    .map(|block| block.expand.as_ref().map(pack))
                    .collect(),
                project: self
                    .blocks
                    .iter()
                    .map(|block| pack(&block.project))
                    .collect(),
                head: pack(&self.head),
            }
        });
        EvaluationPacking { packed }
    }

    /// `for_evaluation` with `packing`, which must be
    /// `self.pack_for_evaluation()` of these blocks as they are now (the
    /// caller keeps it beside them: `FineTunedBlocks`).
    pub(super) fn with_packing<'a>(
        &'a self,
        packing: &'a EvaluationPacking,
    ) -> EvaluationBlocks<'a> {
        EvaluationBlocks {
            blocks: self,
            packing: Packing::Borrowed(packing),
        }
    }

    /// `forward` for a training step with stochastic depth: each residual
    /// block's branch is scaled per image by `drop_path`'s draw (0 when the
    /// image skips it, 1 / keep otherwise); `backward` scales its gradient
    /// alike.
    pub fn forward_with_drop_path(
        &self,
        input: Vec<f32>,
        n_images: usize,
        size: MapSize,
        drop_path: &DropPathDraw,
    ) -> Result<Forward, TrainError> {
        if drop_path.scales.len() != self.blocks.len()
            || drop_path
                .scales
                .iter()
                .flatten()
                .any(|s| s.len() != n_images)
        {
            return Err(TrainError::Invalid(format!(
                "top blocks after block {}: a drop-path draw for other blocks or images than \
                 {} blocks of {n_images} images",
                self.after_block,
                self.blocks.len()
            )));
        }
        self.forward_scaled(input, n_images, size, Some(drop_path), Pass::Training)
    }

    /// Stochastic depth for one micro-batch (EfficientNet's drop connect):
    /// block `i` of the encoder (counted from 0 over all its blocks) skips
    /// its residual branch for an image with probability `rate * i / n`,
    /// `n` the encoder's block count, as the network was trained; blocks
    /// without a skip connection always run.
    pub fn draw_drop_path(
        &self,
        rate: f64,
        n_images: usize,
        rng: &mut impl rand::Rng,
    ) -> DropPathDraw {
        let n_encoder_blocks = self.after_block + 1 + self.blocks.len();
        let keeps: Vec<Option<f64>> = self
            .blocks
            .iter()
            .enumerate()
            .map(|(index, block)| {
                let encoder_index = self.after_block + 1 + index;
                let drop = rate * encoder_index as f64 / n_encoder_blocks as f64;
                (block.residual && drop > 0.0).then_some(1.0 - drop)
            })
            .collect();
        let mut scales: Vec<Option<Vec<f32>>> = keeps
            .iter()
            .map(|keep| keep.map(|_| Vec::with_capacity(n_images)))
            .collect();
        // Image by image, so a batch split into micro-batches draws as a whole.
        for _ in 0..n_images {
            for (keep, block_scales) in keeps.iter().zip(&mut scales) {
                if let (Some(keep), Some(block_scales)) = (keep, block_scales) {
                    let kept = rng.random::<f64>() < *keep;
                    block_scales.push(if kept { (1.0 / keep) as f32 } else { 0.0 });
                }
            }
        }
        DropPathDraw { scales }
    }

    /// Refuses an input that is not `n_images` channels-last maps of `size`.
    fn check_input(&self, values: usize, n_images: usize, size: MapSize) -> Result<(), TrainError> {
        if values == n_images * size.pixels() * self.in_channels {
            return Ok(());
        }
        Err(TrainError::Invalid(format!(
            "top blocks after block {}: {values} input values for {n_images} maps of {}x{}x{}",
            self.after_block, self.in_channels, size.height, size.width
        )))
    }

    fn forward_scaled(
        &self,
        input: Vec<f32>,
        n_images: usize,
        size: MapSize,
        drop_path: Option<&DropPathDraw>,
        pass: Pass<'_>,
    ) -> Result<Forward, TrainError> {
        self.check_input(input.len(), n_images, size)?;
        let mut x = input;
        let mut size = size;
        let mut steps = Vec::with_capacity(self.blocks.len());
        for (index, block) in self.blocks.iter().enumerate() {
            let pixels = n_images * size.pixels();
            let branch_scale = drop_path.and_then(|draw| draw.scales[index].clone());
            let (expand_packed, project_packed) = match pass {
                Pass::Training => (None, None),
                Pass::Evaluation(packed) => {
                    (packed.expand[index].as_ref(), Some(&packed.project[index]))
                }
            };
            let expanded = block
                .expand
                .as_ref()
                .map(|conv| pointwise_forward(conv, expand_packed, &x, pixels, self.precision));
            let (depthwise, output_size) = training::depthwise_forward(
                block.depthwise.kernel(),
                expanded.as_deref().unwrap_or(&x),
                n_images,
                size,
            );
            let mut output = pointwise_forward(
                &block.project,
                project_packed,
                &depthwise,
                n_images * output_size.pixels(),
                self.precision,
            );
            if let Some(scales) = &branch_scale {
                training::scale_parts(&mut output, scales);
            }
            if block.residual {
                training::add_assign(&mut output, &x);
            }
            if let Pass::Evaluation(_) = pass {
                // Nothing kept: the buffers go back to the pool for the
                // next block's, while they are still in the core's cache.
                scratch::recycle(std::mem::replace(&mut x, output));
                if let Some(expanded) = expanded {
                    scratch::recycle(expanded);
                }
                scratch::recycle(depthwise);
                size = output_size;
                continue;
            }
            steps.push(BlockActivations {
                input: std::mem::replace(&mut x, output),
                size,
                expanded,
                depthwise,
                output_size,
                branch_scale,
            });
            size = output_size;
        }
        let head_packed = match pass {
            Pass::Training => None,
            Pass::Evaluation(packed) => Some(&packed.head),
        };
        let head_output = pointwise_forward(
            &self.head,
            head_packed,
            &x,
            n_images * size.pixels(),
            self.precision,
        );
        let (pooled, max_at) = pool(&head_output, size.pixels(), self.head.outputs, self.pooling);
        Ok(Forward {
            n_images,
            steps,
            head_input: x,
            head_size: size,
            head_output,
            pooled,
            max_at,
        })
    }

    /// Adds the gradients of every parameter, given d loss / d pooled
    /// features (`[n_images, feature_dim]`), to `gradients`. Returns
    /// d loss / d input (channels last) when `input` asks for it. Consumes
    /// `forward`: its activations go to the scratch pool as the pass
    /// leaves them behind, so a step's deltas reuse them.
    pub fn backward(
        &self,
        forward: Forward,
        pooled_gradient: &[f32],
        gradients: &mut BlockGradients,
        input: InputGradient,
    ) -> Result<Option<Vec<f32>>, TrainError> {
        let n_images = forward.n_images;
        let features = self.feature_dim();
        if pooled_gradient.len() != n_images * features {
            return Err(TrainError::Invalid(format!(
                "top blocks: {} pooled gradients for {n_images} images of {features} features",
                pooled_gradient.len()
            )));
        }
        if gradients.values.len() != self.parameters().len() {
            return Err(TrainError::Invalid(format!(
                "top blocks: {} gradient buffers for {} parameters",
                gradients.values.len(),
                self.parameters().len()
            )));
        }
        let Forward {
            n_images,
            steps,
            head_input,
            head_size,
            head_output,
            pooled,
            max_at,
        } = forward;
        scratch::recycle(pooled);
        // An image the head is sure of sends back a gradient of 1e-30 and
        // less, which underflows to subnormals on its way down and slows
        // every product it enters (`training::flush_subnormals`); below
        // `NEGLIGIBLE_GRADIENT` it changes no parameter's f32 gradient sum
        // beside the batch's other images, so it is dropped whole.
        let mut kept_gradient = scratch::copied(pooled_gradient);
        for image in kept_gradient.chunks_exact_mut(features) {
            if image.iter().all(|g| g.abs() < NEGLIGIBLE_GRADIENT) {
                image.fill(0.0);
            }
        }
        let mut head_delta = pool_backward(
            &kept_gradient,
            &max_at,
            head_size.pixels(),
            self.head.outputs,
            self.pooling,
        );
        scratch::recycle(kept_gradient);
        // Subnormal deltas are zeroed wherever they can arise (the masks
        // do it in their pass): `training::flush_subnormals` says why.
        if self.head.relu6 {
            training::relu6_mask(&mut head_delta, &head_output);
        } else {
            training::flush_subnormals(&mut head_delta);
        }
        scratch::recycle(head_output);
        let mut slots = gradients.values.iter_mut().rev();
        let mut next = |name: &str| -> &mut Vec<f32> {
            slots
                .next()
                .unwrap_or_else(|| panic!("a gradient buffer for {name}"))
        };
        let (head_bias, head_weight) = (next("head bias"), next("head weight"));
        let mut delta = pointwise_backward(
            &self.head,
            &head_input,
            &head_delta,
            (head_weight, head_bias),
            Wanted::Yes,
            self.precision,
        )
        .expect("the head's input gradient was asked for");
        scratch::recycle(head_delta);
        scratch::recycle(head_input);
        for (index, (block, step)) in self.blocks.iter().zip(steps).enumerate().rev() {
            let BlockActivations {
                input: block_input,
                size,
                expanded,
                depthwise,
                output_size,
                branch_scale,
            } = step;
            let first = index == 0;
            let wanted = if first && input == InputGradient::Skip {
                Wanted::No
            } else {
                Wanted::Yes
            };
            let (project_bias, project_weight) = (next("project bias"), next("project weight"));
            let branch_delta = branch_scale.as_ref().map(|scales| {
                let mut scaled = scratch::copied(&delta);
                training::scale_parts(&mut scaled, scales);
                scaled
            });
            let mut hidden_delta = pointwise_backward(
                &block.project,
                &depthwise,
                branch_delta.as_deref().unwrap_or(&delta),
                (project_weight, project_bias),
                Wanted::Yes,
                self.precision,
            )
            .expect("the projection's input gradient was asked for");
            if let Some(branch_delta) = branch_delta {
                scratch::recycle(branch_delta);
            }
            if block.depthwise.relu6 {
                training::relu6_mask(&mut hidden_delta, &depthwise);
            } else {
                training::flush_subnormals(&mut hidden_delta);
            }
            // Each activation goes back to the pool as soon as the pass is
            // done with it, for the deltas of this block and those below.
            scratch::recycle(depthwise);
            let (depthwise_bias, depthwise_weight) =
                (next("depthwise bias"), next("depthwise weight"));
            let depthwise_wanted = if block.expand.is_some() {
                Wanted::Yes
            } else {
                wanted
            };
            let below = training::depthwise_backward(
                block.depthwise.kernel(),
                training::DepthwiseTrace {
                    input: expanded.as_deref().unwrap_or(&block_input),
                    n_images,
                    size,
                    output_size,
                },
                &hidden_delta,
                (depthwise_weight, depthwise_bias),
                depthwise_wanted,
            );
            scratch::recycle(hidden_delta);
            let input_delta = match (&block.expand, below, expanded) {
                (Some(expand), Some(mut expanded_delta), Some(expanded)) => {
                    if expand.relu6 {
                        training::relu6_mask(&mut expanded_delta, &expanded);
                    } else {
                        training::flush_subnormals(&mut expanded_delta);
                    }
                    scratch::recycle(expanded);
                    let (expand_bias, expand_weight) = (next("expand bias"), next("expand weight"));
                    let input_delta = pointwise_backward(
                        expand,
                        &block_input,
                        &expanded_delta,
                        (expand_weight, expand_bias),
                        wanted,
                        self.precision,
                    );
                    scratch::recycle(expanded_delta);
                    input_delta
                }
                (Some(_), _, None) => panic!("block {index} expands but kept no expanded map"),
                // No expansion: the depthwise input gradient is the block's.
                (_, below, _) => below,
            };
            scratch::recycle(block_input);
            match input_delta {
                Some(mut input_delta) => {
                    training::flush_subnormals(&mut input_delta);
                    if block.residual {
                        training::add_assign(&mut input_delta, &delta);
                    }
                    scratch::recycle(std::mem::replace(&mut delta, input_delta));
                }
                None => {
                    scratch::recycle(delta);
                    return Ok(None);
                }
            }
        }
        Ok(Some(delta))
    }
}

/// d loss / d pooled features below which an image's whole gradient is
/// dropped in `TopBlocks::backward`: 2^-80 (8e-25). Its contributions to
/// the weight gradients are under 1e-20 (activations at most 6, at most a
/// few thousand pixels), 14 orders below the gradients of the images
/// beside it (1e-6 and up): nothing in an f32 sum. A fixed threshold, so
/// that splitting a batch into micro-batches drops the same images.
const NEGLIGIBLE_GRADIENT: f32 = 1.0 / (1u128 << 80) as f32;

/// Whether `TopBlocks::backward` computes d loss / d input (the cached map
/// is frozen, so training skips the first block's input gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputGradient {
    Skip,
    Compute,
}

/// What a forward pass is for.
#[derive(Clone, Copy)]
enum Pass<'a> {
    /// A training step: batch-wide products on the pool, every activation
    /// kept for `backward`.
    Training,
    /// Pooled features only, through weights packed once.
    Evaluation(&'a PackedConvolutions),
}

/// The f32 weights of every 1×1 convolution, packed.
#[derive(Debug)]
struct PackedConvolutions {
    /// Per block (`None` without an expansion).
    expand: Vec<Option<PackedRight>>,
    project: Vec<PackedRight>,
    head: PackedRight,
}

/// [`TopBlocks`] for forward passes that keep nothing for a backward pass
/// (`TopBlocks::for_evaluation`): validation, test and prediction.
///
/// With f32 products, [`EvaluationBlocks::pooled`] runs each image through
/// every block alone on one thread, through weights packed once: an image's
/// activations stay in the core's cache, where a batch's (tens of MB) go to
/// memory and back between every two layers. Every value is computed by the
/// same operations in the same order as in `TopBlocks::forward`, so the
/// features are the same bit for bit. bf16 products run the batch's forward.
#[derive(Debug)]
pub struct EvaluationBlocks<'a> {
    blocks: &'a TopBlocks,
    packing: Packing<'a>,
}

/// The 1×1 convolutions' weights packed for [`EvaluationBlocks`]
/// (`TopBlocks::pack_for_evaluation`); nothing under bf16 products, which
/// run the batch's forward.
#[derive(Debug)]
pub struct EvaluationPacking {
    packed: Option<PackedConvolutions>,
}

#[derive(Debug)]
enum Packing<'a> {
    Owned(EvaluationPacking),
    Borrowed(&'a EvaluationPacking),
}

impl EvaluationBlocks<'_> {
    /// `[n_images, feature_dim]`: what `TopBlocks::forward(input, n_images,
    /// size).pooled()` gives.
    pub fn pooled(
        &self,
        input: Vec<f32>,
        n_images: usize,
        size: MapSize,
    ) -> Result<Vec<f32>, TrainError> {
        let blocks = self.blocks;
        let packing = match &self.packing {
            Packing::Owned(packing) => packing,
            Packing::Borrowed(packing) => *packing,
        };
        let Some(packed) = &packing.packed else {
            return Ok(blocks.forward(input, n_images, size)?.into_pooled());
        };
        blocks.check_input(input.len(), n_images, size)?;
        let image_len = size.pixels() * blocks.in_channels;
        let features = blocks.feature_dim();
        let mut pooled = vec![0f32; n_images * features];
        pooled
            .par_chunks_mut(features)
            .zip(input.par_chunks(image_len.max(1)))
            .try_for_each(|(pooled, image)| {
                let forward = blocks.forward_scaled(
                    scratch::copied(image),
                    1,
                    size,
                    None,
                    Pass::Evaluation(packed),
                )?;
                pooled.copy_from_slice(forward.pooled());
                forward.recycle();
                Ok::<_, TrainError>(())
            })?;
        scratch::recycle(input);
        Ok(pooled)
    }
}

/// What one block's forward pass keeps for the backward pass.
#[derive(Debug)]
struct BlockActivations {
    /// The block's input, channels last.
    input: Vec<f32>,
    size: MapSize,
    /// The expansion's output (after ReLU6), when the block has one.
    expanded: Option<Vec<f32>>,
    /// The depthwise convolution's output (after ReLU6).
    depthwise: Vec<f32>,
    output_size: MapSize,
    /// Per image, what the residual branch was scaled by (stochastic depth).
    branch_scale: Option<Vec<f32>>,
}

/// One micro-batch's stochastic-depth draw
/// (`TopBlocks::draw_drop_path`): per block, the per-image scales of its
/// residual branch, or `None` where the block always runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DropPathDraw {
    scales: Vec<Option<Vec<f32>>>,
}

/// `[n_images, channels × pooling.parts()]` features of the head
/// convolution's output (`[n_images, pixels, channels]`): per image the
/// channels' means, then under `mean-max` their maxima; and the pixels of
/// the maxima (empty under `mean`).
fn pool(
    head_output: &[f32],
    pixels: usize,
    channels: usize,
    pooling: BlocksPooling,
) -> (Vec<f32>, Vec<u32>) {
    let means = training::mean_pool(head_output, pixels, channels);
    match pooling {
        BlocksPooling::Mean => (means, Vec::new()),
        BlocksPooling::MeanMax => {
            let (maxima, max_at) = training::max_pool(head_output, pixels, channels);
            let mut pooled = scratch::with_capacity(means.len() + maxima.len());
            for (mean, max) in means
                .chunks_exact(channels)
                .zip(maxima.chunks_exact(channels))
            {
                pooled.extend_from_slice(mean);
                pooled.extend_from_slice(max);
            }
            scratch::recycle(means);
            scratch::recycle(maxima);
            (pooled, max_at)
        }
    }
}

/// d loss / d head convolution output from d loss / d `pool`'s features.
fn pool_backward(
    pooled_gradient: &[f32],
    max_at: &[u32],
    pixels: usize,
    channels: usize,
    pooling: BlocksPooling,
) -> Vec<f32> {
    match pooling {
        BlocksPooling::Mean => training::mean_pool_backward(pooled_gradient, pixels, channels),
        BlocksPooling::MeanMax => {
            let n_images = pooled_gradient.len() / (2 * channels);
            let mut mean_gradient = scratch::with_capacity(n_images * channels);
            let mut max_gradient = scratch::with_capacity(n_images * channels);
            for image in pooled_gradient.chunks_exact(2 * channels) {
                mean_gradient.extend_from_slice(&image[..channels]);
                max_gradient.extend_from_slice(&image[channels..]);
            }
            let mut delta = training::mean_pool_backward(&mean_gradient, pixels, channels);
            training::max_pool_backward(&mut delta, &max_gradient, max_at, pixels, channels);
            scratch::recycle(mean_gradient);
            scratch::recycle(max_gradient);
            delta
        }
    }
}

/// A forward pass: the pooled features and what the backward pass needs.
#[derive(Debug)]
pub struct Forward {
    n_images: usize,
    steps: Vec<BlockActivations>,
    head_input: Vec<f32>,
    head_size: MapSize,
    head_output: Vec<f32>,
    pooled: Vec<f32>,
    /// Under `mean-max`, the pixel of each image's and channel's maximum
    /// (`[n_images, channels]`); empty under `mean`.
    max_at: Vec<u32>,
}

impl Forward {
    /// `[n_images, feature_dim]`: the head convolution's output averaged
    /// over its pixels (and under `mean-max`, its maxima after the means).
    pub fn pooled(&self) -> &[f32] {
        &self.pooled
    }

    pub fn into_pooled(self) -> Vec<f32> {
        self.pooled
    }

    /// Gives the activations to the scratch pool for the next step's
    /// (training and evaluation loops, which ask for the same sizes again;
    /// a one-off prediction just drops them).
    pub fn recycle(self) {
        for step in self.steps {
            scratch::recycle(step.input);
            if let Some(expanded) = step.expanded {
                scratch::recycle(expanded);
            }
            scratch::recycle(step.depthwise);
        }
        scratch::recycle(self.head_input);
        scratch::recycle(self.head_output);
        scratch::recycle(self.pooled);
    }

    /// Bytes this pass keeps for `backward` (memory planning).
    pub fn stored_bytes(&self) -> u64 {
        let mut floats =
            self.head_input.len() + self.head_output.len() + self.pooled.len() + self.max_at.len();
        for step in &self.steps {
            floats += step.input.len()
                + step.expanded.as_ref().map_or(0, Vec::len)
                + step.depthwise.len();
        }
        floats as u64 * 4
    }
}

/// `values[i]` as a tensor of `shapes[i]` named `prefix` + `names[i]`
/// (the blocks' and the fine-tuned head's checkpoint tensors).
pub(super) fn named_tensors(
    prefix: &str,
    names: &[String],
    shapes: &[Vec<usize>],
    values: Vec<&[f32]>,
) -> Result<Vec<(String, Tensor)>, TrainError> {
    names
        .iter()
        .zip(shapes)
        .zip(values)
        .map(|((name, shape), values)| {
            Ok((
                format!("{prefix}{name}"),
                Tensor::from_slice(values, shape.as_slice(), &Device::Cpu)?,
            ))
        })
        .collect()
}

/// The values of the tensors `prefix` + `names[i]` of `tensors`, each
/// checked against `shapes[i]`.
pub(super) fn read_named(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    names: &[String],
    shapes: &[Vec<usize>],
    source: &Path,
) -> Result<Vec<Vec<f32>>, TrainError> {
    names
        .iter()
        .zip(shapes)
        .map(|(name, shape)| {
            let key = format!("{prefix}{name}");
            let tensor = tensors.get(&key).ok_or_else(|| {
                TrainError::Checkpoint(format!("{}: no tensor {key}", source.display()))
            })?;
            if tensor.dims() != shape.as_slice() {
                return Err(TrainError::Checkpoint(format!(
                    "{}: tensor {key} is {:?}, where {shape:?} is expected",
                    source.display(),
                    tensor.dims()
                )));
            }
            Ok(tensor
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        })
        .collect()
}

/// Accumulated gradients, one buffer per parameter in the order of
/// `TopBlocks::parameters`.
#[derive(Debug, Clone)]
pub struct BlockGradients {
    pub values: Vec<Vec<f32>>,
}

impl BlockGradients {
    /// Zeros every buffer, on the pool (13 MB for Lite0's blocks after
    /// block 4, every step).
    pub fn zero(&mut self) {
        self.values.par_iter_mut().for_each(|g| g.fill(0.0));
    }

    /// Squared L2 norm of the gradients times `scale`: each buffer's on the
    /// pool, added in order (the same sum whatever the threads).
    pub fn norm_sq(&self, scale: f32) -> f64 {
        let norms: Vec<f64> = self
            .values
            .par_iter()
            .map(|g| training::scaled_norm_sq_f64(g, scale))
            .collect();
        norms.iter().sum()
    }
}

/// Appends `map` (`[channels, height, width]`, as the cache stores a row's
/// map, f16 or f32) to `out` in channels-last order.
pub fn append_channels_last<T: Copy>(map: &[T], channels: usize, size: MapSize, out: &mut Vec<f32>)
where
    f32: From<T>,
{
    let pixels = size.pixels();
    debug_assert_eq!(map.len(), channels * pixels);
    let start = out.len();
    out.resize(start + map.len(), 0.0);
    let target = &mut out[start..];
    for (channel, plane) in map.chunks_exact(pixels).enumerate() {
        for (pixel, &v) in plane.iter().enumerate() {
            target[pixel * channels + channel] = f32::from(v);
        }
    }
}

/// A 1×1 convolution's output, its bias and ReLU6: the product through
/// `packed` (the weights packed once, on this thread) when given, else on
/// the pool in `precision`.
fn pointwise_forward(
    conv: &Pointwise,
    packed: Option<&PackedRight>,
    input: &[f32],
    pixels: usize,
    precision: BlocksPrecision,
) -> Vec<f32> {
    // Both products write every element.
    let mut output = scratch::overwritten(pixels * conv.outputs);
    match packed {
        Some(packed) => packed.product(input, &mut output),
        None => Product {
            a: row_major(input, pixels, conv.inputs),
            b: row_major(&conv.weight, conv.outputs, conv.inputs).transpose(),
        }
        .into_at(&mut output, Accumulate::Replace, Threads::Pool, precision),
    }
    training::add_bias_relu6(&mut output, &conv.bias, conv.relu6);
    output
}

/// Adds d loss / d weight and d loss / d bias of a pointwise convolution to
/// `grads`, given d loss / d output (`delta`, activation already undone);
/// returns d loss / d input when wanted.
fn pointwise_backward(
    conv: &Pointwise,
    input: &[f32],
    delta: &[f32],
    (weight_gradient, bias_gradient): (&mut Vec<f32>, &mut Vec<f32>),
    wanted: Wanted,
    precision: BlocksPrecision,
) -> Option<Vec<f32>> {
    let pixels = delta.len() / conv.outputs;
    // dW[out, in] += delta^T[out, pixels] x input[pixels, in]
    Product {
        a: row_major(delta, pixels, conv.outputs).transpose(),
        b: row_major(input, pixels, conv.inputs),
    }
    .into_at(weight_gradient, Accumulate::Add, Threads::Pool, precision);
    training::add_column_sums(bias_gradient, delta);
    (wanted == Wanted::Yes).then(|| {
        // d input[pixels, in] = delta[pixels, out] x W[out, in]
        // `Accumulate::Replace` writes every element.
        let mut below = scratch::overwritten(pixels * conv.inputs);
        Product {
            a: row_major(delta, pixels, conv.outputs),
            b: row_major(&conv.weight, conv.outputs, conv.inputs),
        }
        .into_at(&mut below, Accumulate::Replace, Threads::Pool, precision);
        below
    })
}

/// AdamW on the top blocks, with its own learning rate and weight decay
/// (the same update as the heads' `host::HostTrainer::update`).
#[derive(Debug, Clone)]
pub struct BlocksOptimizer {
    first_moments: Vec<Vec<f32>>,
    second_moments: Vec<Vec<f32>>,
    updates: i32,
}

/// One optimiser update of the blocks: the rate, the decoupled weight decay
/// and the factor on the accumulated gradients (loss-scale removal times
/// clipping).
#[derive(Debug, Clone, Copy)]
pub struct BlocksStep {
    pub lr: f64,
    pub weight_decay: f64,
    pub scale: f32,
}

impl BlocksOptimizer {
    pub fn new(blocks: &TopBlocks) -> Self {
        let zeros: Vec<Vec<f32>> = blocks
            .parameters()
            .iter()
            .map(|p| vec![0f32; p.len()])
            .collect();
        BlocksOptimizer {
            first_moments: zeros.clone(),
            second_moments: zeros,
            updates: 0,
        }
    }

    /// Updates applied so far.
    pub fn updates(&self) -> i32 {
        self.updates
    }

    /// The moments as named tensors (`first_moment.` and `second_moment.`
    /// after `prefix`, then the parameter's name) and the update count, for
    /// checkpoints of `blocks`.
    pub fn tensors(
        &self,
        blocks: &TopBlocks,
        prefix: &str,
    ) -> Result<Vec<(String, Tensor)>, TrainError> {
        let (names, shapes) = (blocks.parameter_names(), blocks.parameter_shapes());
        let mut out = named_tensors(
            &format!("{prefix}first_moment."),
            &names,
            &shapes,
            self.first_moments.iter().map(Vec::as_slice).collect(),
        )?;
        out.extend(named_tensors(
            &format!("{prefix}second_moment."),
            &names,
            &shapes,
            self.second_moments.iter().map(Vec::as_slice).collect(),
        )?);
        Ok(out)
    }

    /// The optimiser of `blocks` from its checkpointed moments (see
    /// `tensors`) after `updates` updates.
    pub fn from_tensors(
        blocks: &TopBlocks,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        updates: i32,
        source: &Path,
    ) -> Result<Self, TrainError> {
        let (names, shapes) = (blocks.parameter_names(), blocks.parameter_shapes());
        Ok(BlocksOptimizer {
            first_moments: read_named(
                tensors,
                &format!("{prefix}first_moment."),
                &names,
                &shapes,
                source,
            )?,
            second_moments: read_named(
                tensors,
                &format!("{prefix}second_moment."),
                &names,
                &shapes,
                source,
            )?,
            updates,
        })
    }

    pub fn update(&mut self, blocks: &mut TopBlocks, gradients: &BlockGradients, step: BlocksStep) {
        self.updates += 1;
        let adamw = AdamWStep::new(step.lr, step.weight_decay, self.updates, step.scale);
        blocks
            .parameters_mut()
            .into_par_iter()
            .zip(&gradients.values)
            .zip(&mut self.first_moments)
            .zip(&mut self.second_moments)
            .for_each(|(((weights, gradients), first), second)| {
                adamw.apply(weights, gradients, first, second);
            });
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Tensor, Var};
    use candle_nn::VarBuilder;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::encoders::cpu_kernels::network::DepthwiseConv;
    use crate::encoders::cpu_kernels::same_padding;
    use crate::encoders::efficientnet_lite::Config;

    fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn conv(rng: &mut ChaCha8Rng, inputs: usize, outputs: usize, relu6: bool) -> ConvWeights {
        // Weights of about unit gain, biases that push some units past 0 and 6.
        let scale = (3.0 / inputs as f32).sqrt() * 1.5;
        ConvWeights {
            weight: uniform(rng, outputs * inputs, scale),
            bias: uniform(rng, outputs, 1.0),
            relu6,
        }
    }

    fn block(
        rng: &mut ChaCha8Rng,
        (inputs, hidden, outputs): (usize, usize, usize),
        (kernel, stride): (usize, usize),
    ) -> BlockWeights {
        BlockWeights {
            expand: Some(conv(rng, inputs, hidden, true)),
            depthwise: DepthwiseConv {
                weight: uniform(rng, kernel * kernel * hidden, 3.0 / kernel as f32),
                bias: uniform(rng, hidden, 1.0),
                kernel,
                stride,
                relu6: true,
            },
            project: conv(rng, hidden, outputs, false),
            residual: stride == 1 && inputs == outputs,
        }
    }

    /// A small top shaped like Lite0's blocks 11 and 12 and its head: a
    /// kernel-5 stride-2 block that widens, then a kernel-3 residual block.
    fn small_blocks(rng: &mut ChaCha8Rng) -> TopBlocks {
        let blocks = [
            block(rng, (8, 24, 12), (5, 2)),
            block(rng, (12, 36, 12), (3, 1)),
        ];
        let head = conv(rng, 12, 20, true);
        let top = TopBlocks::new(3, 8, &blocks, &head).unwrap();
        assert!(top.blocks[1].residual && !top.blocks[0].residual);
        top
    }

    /// `small_blocks` and `n_images` random maps of `height × width`
    /// (channels last), drawn from `seed`; the generator goes on for the
    /// test's own draws.
    fn small_case(
        seed: u64,
        n_images: usize,
        (height, width): (usize, usize),
    ) -> (ChaCha8Rng, TopBlocks, MapSize, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let top = small_blocks(&mut rng);
        let size = MapSize { height, width };
        let input = uniform(&mut rng, n_images * size.pixels() * top.in_channels, 2.0);
        (rng, top, size, input)
    }

    fn max_abs(values: &[f32]) -> f32 {
        values.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    /// `|a - b| <= tolerance · max(1, max |b|)` element by element.
    fn assert_close(name: &str, a: &[f32], b: &[f32], tolerance: f32) {
        assert_eq!(a.len(), b.len(), "{name}: lengths");
        let scale = max_abs(b).max(1.0);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= tolerance * scale,
            "{name}: max difference {diff} (scale {scale})"
        );
    }

    fn random_lite0() -> EfficientNetLite {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        EfficientNetLite::new(Config::lite0(), vb).unwrap()
    }

    #[test]
    fn top_blocks_reproduce_the_encoders_pooled_features() {
        // Reference: the encoder's own forward pass (its CPU kernels), from
        // the same images, fed the f32 map of each cacheable stride (not
        // rounded to f16).
        let model = random_lite0();
        let (n_images, height, width) = (3, 96, 80);
        let images = Tensor::randn(0f32, 1.0, (n_images, 3, height, width), &Device::Cpu).unwrap();
        let features = model.features(&images, &[4, 8, 16]).unwrap();
        let expected = features
            .pooled
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Pooled features that vary, so the comparison says something.
        let spread = expected.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v))
            - expected.iter().fold(f32::INFINITY, |m, v| m.min(*v));
        assert!(spread > 0.1, "pooled features span only {spread}");
        // Lite0: (stride, block K whose output it is, blocks after K, channels).
        for (level, (stride, after_block, n_blocks, channels)) in
            [(4, 2, 13, 24), (8, 4, 11, 40), (16, 10, 5, 112)]
                .into_iter()
                .enumerate()
        {
            assert_eq!(model.map_block_index(stride).unwrap(), after_block);
            let map = features.maps[level].contiguous().unwrap();
            let (_, map_channels, map_height, map_width) = map.dims4().unwrap();
            let size = MapSize {
                height: map_height,
                width: map_width,
            };
            assert_eq!(
                (map_channels, size.height, size.width),
                (channels, height / stride, width / stride)
            );
            let values = map.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut input = Vec::new();
            for image in values.chunks_exact(channels * size.pixels()) {
                append_channels_last(image, channels, size, &mut input);
            }
            let top = TopBlocks::from_encoder(&model, after_block).unwrap();
            assert_eq!(
                (top.n_blocks(), top.in_channels(), top.feature_dim()),
                (n_blocks, channels, 1280)
            );
            let forward = top.forward(input.clone(), n_images, size).unwrap();
            assert_close(
                &format!("pooled from stride {stride}"),
                forward.pooled(),
                &expected,
                1e-4,
            );
            // Evaluation (image by image, weights packed once) gives the
            // batch forward's features bit for bit, in both precisions.
            for precision in [BlocksPrecision::F32, BlocksPrecision::Bf16] {
                let top = top.clone().with_precision(precision);
                let batch = top.forward(input.clone(), n_images, size).unwrap();
                let evaluation = top.for_evaluation();
                let pooled = evaluation.pooled(input.clone(), n_images, size).unwrap();
                assert_eq!(pooled.len(), batch.pooled().len());
                for (index, (a, b)) in pooled.iter().zip(batch.pooled()).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "stride {stride}, {precision:?}: feature {index}: {a} vs {b}"
                    );
                }
                let short = evaluation
                    .pooled(input[1..].to_vec(), n_images, size)
                    .unwrap_err()
                    .to_string();
                assert!(short.contains("input values"), "{short}");
            }
        }
    }

    #[test]
    fn refuses_a_block_without_blocks_after_it() {
        let model = random_lite0();
        let err = TopBlocks::from_encoder(&model, 15).unwrap_err().to_string();
        assert!(
            err.contains("after block 15") && err.contains("0..=15"),
            "{err}"
        );
    }

    /// Elements `start, start + stride, …` (`count` of them) along `dim`,
    /// zero-extended past the end: the encoder's candle depthwise path.
    fn take_strided(x: &Tensor, dim: usize, start: usize, count: usize, stride: usize) -> Tensor {
        if stride == 1 {
            return x.narrow(dim, start, count).unwrap();
        }
        let available = x.dim(dim).unwrap() - start;
        let wanted = count * stride;
        let mut slice = x.narrow(dim, start, available.min(wanted)).unwrap();
        if available < wanted {
            slice = slice.pad_with_zeros(dim, 0, wanted - available).unwrap();
        }
        let mut dims = slice.dims().to_vec();
        dims[dim] = count;
        dims.insert(dim + 1, stride);
        slice
            .reshape(dims)
            .unwrap()
            .narrow(dim + 1, 0, 1)
            .unwrap()
            .squeeze(dim + 1)
            .unwrap()
    }

    fn candle_relu6(x: Tensor, relu6: bool) -> Tensor {
        if relu6 {
            (x.relu().unwrap() - (x - 6.0).unwrap().relu().unwrap()).unwrap()
        } else {
            x
        }
    }

    /// 1×1 convolution on NCHW.
    fn candle_pointwise(x: &Tensor, conv: &Pointwise, weight: &Var, bias: &Var) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let y = weight
            .as_tensor()
            .reshape((conv.outputs, conv.inputs))
            .unwrap()
            .broadcast_matmul(&x.reshape((n, c, h * w)).unwrap())
            .unwrap()
            .broadcast_add(&bias.as_tensor().reshape((1, conv.outputs, 1)).unwrap())
            .unwrap()
            .reshape((n, conv.outputs, h, w))
            .unwrap();
        candle_relu6(y, conv.relu6)
    }

    /// Depthwise convolution on NCHW as a sum of shifted, strided slices of
    /// the padded input times per-channel tap weights.
    fn candle_depthwise(x: &Tensor, conv: &Depthwise, weight: &Var, bias: &Var) -> Tensor {
        let (_, c, h, w) = x.dims4().unwrap();
        let (k, s) = (conv.kernel, conv.stride);
        let (top, bottom) = same_padding(h, k, s);
        let (left, right) = same_padding(w, k, s);
        let padded = x
            .pad_with_zeros(2, top, bottom)
            .unwrap()
            .pad_with_zeros(3, left, right)
            .unwrap();
        let (out_h, out_w) = (h.div_ceil(s), w.div_ceil(s));
        let weight = weight.as_tensor().reshape((k * k, c)).unwrap();
        let mut sum = bias.as_tensor().reshape((1, c, 1, 1)).unwrap();
        for dy in 0..k {
            let rows = take_strided(&padded, 2, dy, out_h, s);
            for dx in 0..k {
                let window = take_strided(&rows, 3, dx, out_w, s);
                let tap = weight
                    .narrow(0, dy * k + dx, 1)
                    .unwrap()
                    .reshape((1, c, 1, 1))
                    .unwrap();
                sum = sum
                    .broadcast_add(&window.broadcast_mul(&tap).unwrap())
                    .unwrap();
            }
        }
        candle_relu6(sum, conv.relu6)
    }

    /// Candle autograd's gradients of `sum(pooled · upstream)` for every
    /// parameter (in `parameters` order) and for the channels-last input.
    fn candle_gradients(
        top: &TopBlocks,
        input: &[f32],
        n_images: usize,
        size: MapSize,
        upstream: &[f32],
        drop_path: Option<&DropPathDraw>,
    ) -> (Vec<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let dev = Device::Cpu;
        let vars: Vec<Var> = top
            .parameters()
            .iter()
            .map(|p| Var::from_slice(p, p.len(), &dev).unwrap())
            .collect();
        let input_var = Var::from_slice(
            input,
            (n_images, size.height, size.width, top.in_channels),
            &dev,
        )
        .unwrap();
        let mut x = input_var
            .as_tensor()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap();
        let mut next = vars.iter();
        for (index, block) in top.blocks.iter().enumerate() {
            let block_input = x.clone();
            if let Some(expand) = &block.expand {
                x = candle_pointwise(&x, expand, next.next().unwrap(), next.next().unwrap());
            }
            x = candle_depthwise(
                &x,
                &block.depthwise,
                next.next().unwrap(),
                next.next().unwrap(),
            );
            x = candle_pointwise(
                &x,
                &block.project,
                next.next().unwrap(),
                next.next().unwrap(),
            );
            if let Some(scales) = drop_path.and_then(|draw| draw.scales[index].as_ref()) {
                let scales = Tensor::from_slice(scales, (n_images, 1, 1, 1), &dev).unwrap();
                x = x.broadcast_mul(&scales).unwrap();
            }
            if block.residual {
                x = (x + block_input).unwrap();
            }
        }
        x = candle_pointwise(&x, &top.head, next.next().unwrap(), next.next().unwrap());
        assert!(next.next().is_none());
        let mean = x.mean(D::Minus1).unwrap().mean(D::Minus1).unwrap();
        let pooled = match top.pooling {
            BlocksPooling::Mean => mean,
            BlocksPooling::MeanMax => {
                let max = x.flatten_from(2).unwrap().max(D::Minus1).unwrap();
                Tensor::cat(&[&mean, &max], 1).unwrap()
            }
        };
        let upstream = Tensor::from_slice(upstream, pooled.dims(), &dev).unwrap();
        let loss = (&pooled * upstream).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (
            vars.iter()
                .map(|v| flat(grads.get(v.as_tensor()).expect("a gradient per parameter")))
                .collect(),
            flat(grads.get(input_var.as_tensor()).expect("an input gradient")),
            flat(&pooled),
        )
    }

    /// Runs `backward` of `forward` (of `input`: values, images, size) and
    /// checks the pooled features and every gradient against
    /// `candle_gradients`; returns ours and candle's parameter gradients.
    fn backward_matches_candle(
        top: &TopBlocks,
        forward: Forward,
        (input, n_images, size): (&[f32], usize, MapSize),
        upstream: &[f32],
        drop_path: Option<&DropPathDraw>,
    ) -> (BlockGradients, Vec<Vec<f32>>) {
        let mut gradients = top.zero_gradients();
        let pooled = forward.pooled().to_vec();
        let input_gradient = top
            .backward(forward, upstream, &mut gradients, InputGradient::Compute)
            .unwrap()
            .expect("asked for the input gradient");
        let (expected, expected_input, expected_pooled) =
            candle_gradients(top, input, n_images, size, upstream, drop_path);
        assert_close("pooled", &pooled, &expected_pooled, 1e-5);
        for ((name, ours), theirs) in top
            .parameter_names()
            .iter()
            .zip(&gradients.values)
            .zip(&expected)
        {
            assert!(max_abs(theirs) > 0.0, "{name}: zero reference gradient");
            assert_close(name, ours, theirs, 1e-4);
        }
        assert_close("input", &input_gradient, &expected_input, 1e-4);
        (gradients, expected)
    }

    #[test]
    fn gradients_equal_candle_autograd() {
        // Reference: candle's autograd through the same computation built
        // from candle ops (matmul, pad, strided slices, broadcast multiply,
        // relu), on odd map sizes so TF padding is uneven.
        let n_images = 3;
        let (mut rng, top, size, input) = small_case(22, n_images, (9, 7));
        let upstream = uniform(&mut rng, n_images * top.feature_dim(), 1.0);
        let forward = top.forward(input.clone(), n_images, size).unwrap();
        // Every regime of ReLU6 occurs: clipped at 0, clipped at 6, linear.
        let expanded = forward.steps[0].expanded.as_ref().unwrap();
        assert!(expanded.contains(&0.0) && expanded.contains(&6.0));
        assert!(expanded.iter().any(|v| *v > 0.0 && *v < 6.0));
        assert_eq!(
            forward.steps[0].output_size,
            MapSize {
                height: 5,
                width: 4
            }
        );
        let (mut gradients, expected) =
            backward_matches_candle(&top, forward, (&input, n_images, size), &upstream, None);

        // Skipping the input gradient changes no parameter gradient, and
        // backward accumulates: a second pass (of the same forward pass,
        // run again: backward consumes it) doubles them.
        let forward = top.forward(input.clone(), n_images, size).unwrap();
        let skipped = top
            .backward(forward, &upstream, &mut gradients, InputGradient::Skip)
            .unwrap();
        assert!(skipped.is_none());
        for ((name, twice), once) in top
            .parameter_names()
            .iter()
            .zip(&gradients.values)
            .zip(&expected)
        {
            let doubled: Vec<f32> = once.iter().map(|v| 2.0 * v).collect();
            assert_close(name, twice, &doubled, 2e-4);
        }
    }

    #[test]
    fn mean_max_pooling_gradients_equal_candle_autograd() {
        // Reference: candle's autograd of the means and the maxima over
        // each channel's pixels side by side (`Tensor::max`, whose gradient
        // goes to the maximum's pixel).
        let n_images = 3;
        let (mut rng, top, size, input) = small_case(24, n_images, (9, 9));
        let top = top.with_pooling(BlocksPooling::MeanMax);
        assert_eq!(top.feature_dim(), 2 * top.head_channels());
        let upstream = uniform(&mut rng, n_images * top.feature_dim(), 1.0);
        let forward = top.forward(input.clone(), n_images, size).unwrap();
        let pooled = forward.pooled().to_vec();
        // The maxima are not the means.
        let channels = top.head_channels();
        assert!(pooled.chunks_exact(2 * channels).all(|image| {
            image[..channels]
                .iter()
                .zip(&image[channels..])
                .any(|(mean, max)| max > mean)
        }));
        backward_matches_candle(&top, forward, (&input, n_images, size), &upstream, None);
        // Evaluation, image by image, gives the same features bit for bit.
        let evaluated = top.for_evaluation().pooled(input, n_images, size).unwrap();
        assert_eq!(
            evaluated.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            pooled.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn drop_path_gradients_equal_candle_autograd() {
        // Reference: candle's autograd with each residual branch multiplied
        // by its image's scale before the skip connection is added.
        let n_images = 3;
        let (mut rng, top, size, input) = small_case(23, n_images, (7, 7));
        let upstream = uniform(&mut rng, n_images * top.feature_dim(), 1.0);
        // Image 0 skips the residual block's branch, 1 and 2 keep it (scaled).
        let draw = DropPathDraw {
            scales: vec![None, Some(vec![0.0, 1.25, 1.25])],
        };
        let forward = top
            .forward_with_drop_path(input.clone(), n_images, size, &draw)
            .unwrap();
        let dropped = forward.pooled().to_vec();
        backward_matches_candle(
            &top,
            forward,
            (&input, n_images, size),
            &upstream,
            Some(&draw),
        );
        // The draw changed the answer: not the plain forward pass.
        let plain = top.forward(input.clone(), n_images, size).unwrap();
        let changed = plain
            .pooled()
            .iter()
            .zip(&dropped)
            .any(|(a, b)| (a - b).abs() > 1e-3);
        assert!(changed);
        // A draw for other images or blocks is refused.
        let wrong = DropPathDraw {
            scales: vec![None, Some(vec![1.0; 2])],
        };
        assert!(
            top.forward_with_drop_path(input, n_images, size, &wrong)
                .is_err()
        );
    }

    #[test]
    fn drop_path_draws_follow_the_depth_and_split_into_micro_batches() {
        // Lite0's top after block 4: blocks 5..=15 of 16; the rate grows
        // linearly with the block's index in the encoder.
        let top = TopBlocks::from_encoder(&random_lite0(), 4).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n_images = 4000;
        let draw = top.draw_drop_path(0.4, n_images, &mut rng);
        for (index, (block, scales)) in top.blocks.iter().zip(&draw.scales).enumerate() {
            let Some(scales) = scales else {
                assert!(!block.residual, "residual block {index} without a draw");
                continue;
            };
            let rate = 0.4 * (5 + index) as f64 / 16.0;
            let dropped = scales.iter().filter(|s| **s == 0.0).count() as f64 / n_images as f64;
            assert!(
                (dropped - rate).abs() < 0.03,
                "block {}: {dropped} for {rate}",
                5 + index
            );
            let kept = (1.0 / (1.0 - rate)) as f32;
            assert!(scales.iter().all(|s| *s == 0.0 || *s == kept));
        }
        // A batch drawn in two micro-batches draws what it draws whole.
        let mut whole = ChaCha8Rng::seed_from_u64(9);
        let mut split = ChaCha8Rng::seed_from_u64(9);
        let all = top.draw_drop_path(0.2, 10, &mut whole);
        let first = top.draw_drop_path(0.2, 6, &mut split);
        let second = top.draw_drop_path(0.2, 4, &mut split);
        for ((a, f), s) in all.scales.iter().zip(&first.scales).zip(&second.scales) {
            let joined = f
                .as_ref()
                .map(|f| [f.as_slice(), s.as_ref().unwrap()].concat());
            assert_eq!(a, &joined);
        }
        // Rate 0 draws nothing: every block runs.
        let none = top.draw_drop_path(0.0, 3, &mut whole);
        assert!(none.scales.iter().all(Option::is_none));
    }

    #[test]
    fn an_image_the_head_is_sure_of_adds_nothing() {
        // Image 1's d pooled features below 2^-80 (a confident softmax's)
        // are dropped whole: every gradient equals the one with that
        // image's upstream exactly 0, bit for bit. At 1e-20 the image still
        // counts. A subnormal delta never reaches a product.
        let n_images = 3;
        let (_, top, size, input) = small_case(41, n_images, (9, 7));
        let features = top.feature_dim();
        let gradients_with = |image_1: f32| {
            let mut upstream = uniform(&mut ChaCha8Rng::seed_from_u64(7), n_images * features, 1.0);
            for g in &mut upstream[features..2 * features] {
                *g *= image_1;
            }
            let forward = top.forward(input.clone(), n_images, size).unwrap();
            let mut gradients = top.zero_gradients();
            let input_gradient = top
                .backward(forward, &upstream, &mut gradients, InputGradient::Compute)
                .unwrap()
                .expect("asked for the input gradient");
            assert!(
                input_gradient.iter().all(|g| !g.is_subnormal()),
                "a subnormal input gradient at scale {image_1}"
            );
            (gradients, input_gradient)
        };
        let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let (without, without_input) = gradients_with(0.0);
        for (scale, dropped) in [(1e-26, true), (1e-20, false)] {
            let (gradients, input_gradient) = gradients_with(scale);
            let same = gradients
                .values
                .iter()
                .zip(&without.values)
                .all(|(a, b)| bits(a) == bits(b))
                && bits(&input_gradient) == bits(&without_input);
            assert_eq!(same, dropped, "image 1's upstream at {scale}");
        }
    }

    #[test]
    fn training_the_blocks_alone_lowers_the_loss() {
        // Two classes of maps told apart by a shift in half the channels; a
        // fixed random linear layer on the pooled features, so only the
        // blocks' updates can lower the cross-entropy.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut top = small_blocks(&mut rng);
        let size = MapSize {
            height: 6,
            width: 6,
        };
        let n_images = 16;
        let channels = top.in_channels();
        let labels: Vec<usize> = (0..n_images).map(|i| i % 2).collect();
        let mut maps = Vec::new();
        for &label in &labels {
            let mut map = uniform(&mut rng, channels * size.pixels(), 1.0);
            if label == 1 {
                for v in &mut map[..channels / 2 * size.pixels()] {
                    *v += 1.0;
                }
            }
            append_channels_last(&map, channels, size, &mut maps);
        }
        let features = top.feature_dim();
        let linear = uniform(&mut rng, 2 * features, 0.3);
        // Mean cross-entropy and d loss / d pooled.
        let loss_and_gradient = |pooled: &[f32]| -> (f32, Vec<f32>) {
            let mut loss = 0.0;
            let mut gradient = vec![0f32; pooled.len()];
            for ((row, &label), g) in pooled
                .chunks_exact(features)
                .zip(&labels)
                .zip(gradient.chunks_exact_mut(features))
            {
                let logits: Vec<f32> = linear
                    .chunks_exact(features)
                    .map(|w| w.iter().zip(row).map(|(a, b)| a * b).sum())
                    .collect();
                let max = logits[0].max(logits[1]);
                let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f32 = exps.iter().sum();
                loss -= (exps[label] / total).ln() / n_images as f32;
                for (class, w) in linear.chunks_exact(features).enumerate() {
                    let delta = (exps[class] / total - f32::from(u8::from(class == label)))
                        / n_images as f32;
                    for (g, w) in g.iter_mut().zip(w) {
                        *g += delta * w;
                    }
                }
            }
            (loss, gradient)
        };
        let mut optimizer = BlocksOptimizer::new(&top);
        let mut gradients = top.zero_gradients();
        let mut losses = Vec::new();
        for _ in 0..30 {
            let forward = top.forward(maps.clone(), n_images, size).unwrap();
            let (loss, pooled_gradient) = loss_and_gradient(forward.pooled());
            losses.push(loss);
            gradients.zero();
            top.backward(
                forward,
                &pooled_gradient,
                &mut gradients,
                InputGradient::Skip,
            )
            .unwrap();
            optimizer.update(
                &mut top,
                &gradients,
                BlocksStep {
                    lr: 1e-2,
                    weight_decay: 1e-4,
                    scale: 1.0,
                },
            );
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(first > 0.3, "the problem starts unsolved: {losses:?}");
        assert!(last < 0.25 * first, "losses {losses:?}");
        assert_eq!(optimizer.updates(), 30);
    }

    /// `steps` AdamW steps of `top` on a fixed batch against a fixed
    /// upstream gradient.
    fn train_steps(
        top: &mut TopBlocks,
        optimizer: &mut BlocksOptimizer,
        (input, upstream): (&[f32], &[f32]),
        steps: usize,
    ) {
        let size = MapSize {
            height: 9,
            width: 7,
        };
        let mut gradients = top.zero_gradients();
        for _ in 0..steps {
            let forward = top.forward(input.to_vec(), 2, size).unwrap();
            gradients.zero();
            top.backward(forward, upstream, &mut gradients, InputGradient::Skip)
                .unwrap();
            optimizer.update(
                top,
                &gradients,
                BlocksStep {
                    lr: 1e-2,
                    weight_decay: 1e-2,
                    scale: 1.0,
                },
            );
        }
    }

    #[test]
    fn saved_blocks_and_moments_resume_to_the_same_weights() {
        // Two steps, a save through safetensors bytes, a restore into the
        // untrained blocks, two more steps: the weights of four steps in a
        // row, bit for bit.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let start = small_blocks(&mut rng);
        let input = uniform(&mut rng, 2 * 9 * 7 * start.in_channels(), 2.0);
        let upstream = uniform(&mut rng, 2 * start.feature_dim(), 1.0);
        let batch = (input.as_slice(), upstream.as_slice());

        let mut straight = start.clone();
        let mut straight_optimizer = BlocksOptimizer::new(&straight);
        train_steps(&mut straight, &mut straight_optimizer, batch, 4);

        let mut first = start.clone();
        let mut first_optimizer = BlocksOptimizer::new(&first);
        train_steps(&mut first, &mut first_optimizer, batch, 2);
        let mut named = first.tensors("blocks.").unwrap();
        named.extend(first_optimizer.tensors(&first, "blocks.").unwrap());
        let bytes = crate::train::checkpoint::safetensors_bytes(&named, None).unwrap();
        let path = Path::new("checkpoint.safetensors");
        let tensors =
            crate::train::checkpoint::tensors_from_bytes(&bytes, path, &Device::Cpu).unwrap();

        let mut resumed = start.clone();
        resumed.load_tensors(&tensors, "blocks.", path).unwrap();
        assert_eq!(resumed.parameters(), first.parameters());
        let mut resumed_optimizer =
            BlocksOptimizer::from_tensors(&resumed, &tensors, "blocks.", 2, path).unwrap();
        train_steps(&mut resumed, &mut resumed_optimizer, batch, 2);
        assert_eq!(resumed.parameters(), straight.parameters());
        assert_ne!(resumed.parameters(), start.parameters());

        // A missing tensor and a tensor of another shape: refused by name,
        // the blocks unchanged.
        let mut missing = tensors.clone();
        missing.remove("blocks.block5.depthwise.weight");
        let mut target = start.clone();
        let error = target
            .load_tensors(&missing, "blocks.", path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("checkpoint.safetensors")
                && error.contains("no tensor blocks.block5.depthwise.weight"),
            "{error}"
        );
        let mut reshaped = tensors.clone();
        reshaped.insert(
            "blocks.head.bias".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let error = target
            .load_tensors(&reshaped, "blocks.", path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tensor blocks.head.bias is [3], where [20] is expected"),
            "{error}"
        );
        assert_eq!(target.parameters(), start.parameters());
    }
}
