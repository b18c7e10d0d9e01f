//! CPU kernels of the EfficientNet-Lite forward pass on f32 in NHWC (channels
//! last), with the widest SIMD the CPU has: AVX-512, AVX2+FMA, or scalar code,
//! chosen at run time through `pulp` (capped by `LAZARUS_SIMD`, see
//! [`SimdLevel`]).
//!
//! - [`gemm`]: 1×1 convolutions as matrix products over pixels, against
//!   weights packed once at load into panels of whole vectors, with the bias,
//!   ReLU6 and residual add applied to the register tile before its one store.
//! - [`depthwise`]: k×k depthwise convolution of one output row, vectorised
//!   over channels and slid along the row so each input vector feeds several
//!   outputs from registers.
//! - [`network`]: the whole network per image. Each inverted-residual block
//!   runs expand → depthwise → project per band of rows, so the expanded
//!   activations (6× the block's channels) live only in a small ring of rows
//!   that stays in cache; the stem is fused into the first block the same way.
//!   A batch is spread over threads one image per task: no thread waits on
//!   another between layers.
//! - [`matmul`]: dense products for the training steps (heads, fine-tuned
//!   blocks) on the pointwise kernel, each element summed in one fixed order.
//! - [`bf16`]: the same products with bf16 operands and f32 sums
//!   (`vdpbf16ps` on AVX-512 BF16), for the fine-tuned blocks' mixed
//!   precision.

pub mod bf16;
pub mod depthwise;
pub mod gemm;
pub mod matmul;
pub mod neighbours;
pub mod network;
pub mod resample;
pub mod scratch;
pub mod training;

use std::sync::OnceLock;

use pulp::Arch;

/// TF "same" padding for one axis: (before, after), the extra pixel going after.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let output = input.div_ceil(stride);
    let total = ((output - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

/// The instruction set the CPU kernels use.
///
/// By default the widest the CPU has. The environment variable `LAZARUS_SIMD`
/// (`avx512`, `avx2` or `scalar`), read once per process, caps it: to measure
/// or test the AVX2+FMA path on an AVX-512 machine, for instance. A level
/// above what the CPU has falls back to the best it does have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 with FMA (x86-64-v3): 8 lanes of f32, 16 vector registers.
    Avx2,
    /// AVX-512 F/VL/DQ/BW/CD (x86-64-v4): 16 lanes of f32, 32 vector registers.
    Avx512,
}

/// The environment variable that caps [`SimdLevel`].
pub const SIMD_ENV: &str = "LAZARUS_SIMD";

impl SimdLevel {
    /// The widest level this CPU runs.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if pulp::x86::V4::try_new().is_some() {
                return SimdLevel::Avx512;
            }
            if pulp::x86::V3::try_new().is_some() {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    }

    /// The level in force for this process: [`SimdLevel::detected`], capped by
    /// `LAZARUS_SIMD` when it is set. Read once; an unknown value is an error
    /// naming the variable and the value.
    pub fn from_env() -> Result<Self, String> {
        static LEVEL: OnceLock<Result<SimdLevel, String>> = OnceLock::new();
        LEVEL
            .get_or_init(|| {
                let detected = Self::detected();
                match std::env::var(SIMD_ENV) {
                    Err(_) => Ok(detected),
                    Ok(value) => Self::parse(&value).map(|cap| cap.min(detected)),
                }
            })
            .clone()
    }

    /// [`SimdLevel::from_env`], or [`SimdLevel::detected`] when the variable
    /// holds an unknown value (the encoder reports that error when it
    /// loads): the level the training products and loops run at.
    pub fn in_force() -> Self {
        Self::from_env().unwrap_or_else(|_| Self::detected())
    }

    /// `pulp`'s dispatcher at [`SimdLevel::in_force`], for the training
    /// loops.
    pub(crate) fn in_force_arch() -> Arch {
        Self::in_force().arch().expect("a level this CPU runs")
    }

    /// `avx512`, `avx2` or `scalar` (case-insensitive).
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx-512" => Ok(SimdLevel::Avx512),
            "avx2" => Ok(SimdLevel::Avx2),
            "scalar" => Ok(SimdLevel::Scalar),
            _ => Err(format!(
                "{SIMD_ENV}={value:?}: expected avx512, avx2 or scalar"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Scalar => "scalar",
        }
    }

    /// `pulp`'s dispatcher for this level, or `None` when the CPU lacks it.
    pub fn arch(self) -> Option<Arch> {
        match self {
            SimdLevel::Scalar => Some(Arch::Scalar),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => pulp::x86::V3::try_new().map(Arch::V3),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => pulp::x86::V4::try_new().map(Arch::V4),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        }
    }

    /// f32 values per vector at this level.
    pub fn lanes(self) -> usize {
        match self {
            SimdLevel::Avx512 => 16,
            SimdLevel::Avx2 => 8,
            SimdLevel::Scalar => 1,
        }
    }

    /// Every level this CPU runs, narrowest first (for tests).
    pub fn available() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|level| *level <= Self::detected())
            .collect()
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_levels_parse_and_cap() {
        assert_eq!(SimdLevel::parse("AVX2"), Ok(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse("avx512"), Ok(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse(" scalar "), Ok(SimdLevel::Scalar));
        let err = SimdLevel::parse("sse9").unwrap_err();
        assert!(
            err.contains("LAZARUS_SIMD") && err.contains("sse9"),
            "{err}"
        );
        assert!(SimdLevel::Avx2 < SimdLevel::Avx512);
        for level in SimdLevel::available() {
            assert!(level.arch().is_some(), "{level} listed but not runnable");
        }
    }

    #[test]
    fn same_padding_matches_the_reference_formula() {
        // Reference: pad = max((ceil(i/s)-1)*s + k - i, 0), split (p//2, p - p//2).
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 3, 1), (1, 1));
        assert_eq!(same_padding(56, 5, 2), (1, 2));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
        assert_eq!(same_padding(7, 1, 1), (0, 0));
    }
}
