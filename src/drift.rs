//! `lazarus drift`: does a candidate dataset look like a reference dataset,
//! as the encoder sees them? Compares the cached pooled features of the two.
//!
//! - Per dimension: the standardised mean difference
//!   (mean_c - mean_r) / sqrt((var_r + var_c) / 2), the fraction of
//!   dimensions whose |SMD| exceeds a threshold (0.2 by default, Cohen's
//!   "small" effect) and the most shifted dimensions.
//! - A two-sample test on a projection: both samples are centred on the
//!   reference mean and projected on the reference's top principal
//!   components (subspace iteration); each component gets a two-sample
//!   Kolmogorov-Smirnov test with the asymptotic Kolmogorov p-value
//!   (`scipy.stats.kstwobign.sf(sqrt(n m / (n + m)) D)`), and the components
//!   are combined with a Bonferroni correction (min(1, k min p)).
//!
//! The verdict is "drift" when the combined p-value is below alpha (0.05).
//! Samples larger than `max_rows` are thinned to an even stride.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::features::catalog::{self, FeatureKind, FeatureRequest};
use crate::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("dataset {dataset}: no finished features: {message}")]
    NoFeatures { dataset: String, message: String },
    #[error("incomplete features: {0}")]
    Incomplete(String),
    #[error(
        "the features are not comparable: reference {reference} ({reference_made_by}) and \
         candidate {candidate} ({candidate_made_by}) come from different encoders or weights; \
         pick one with --encoder"
    )]
    EncoderMismatch {
        reference: String,
        reference_made_by: String,
        candidate: String,
        candidate_made_by: String,
    },
    #[error(
        "reference {reference} has {reference_dim}-dimensional features, candidate {candidate} \
         has {candidate_dim}"
    )]
    DimensionMismatch {
        reference: String,
        reference_dim: usize,
        candidate: String,
        candidate_dim: usize,
    },
    #[error("dataset {dataset} has {rows} feature rows; a comparison needs at least 2")]
    TooFewRows { dataset: String, rows: usize },
    #[error("invalid drift setting: {0}")]
    Invalid(String),
    #[error(transparent)]
    Features(#[from] crate::features::FeatureError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// How to compare.
#[derive(Debug, Clone)]
pub struct DriftConfig {
    /// Compare the features of this encoder (needed when a dataset has several).
    pub encoder: Option<String>,
    /// Compare pooled features extracted with these options (`--layers`,
    /// `--image-size`, `--resize`; needed when a dataset has several).
    pub pooled: catalog::PooledChoice,
    /// |SMD| above which a dimension counts as shifted.
    pub smd_threshold: f64,
    /// Principal components of the reference to test on.
    pub components: usize,
    /// Significance level of the combined test.
    pub alpha: f64,
    /// Rows used per dataset (an even stride over larger caches).
    pub max_rows: usize,
    /// How many of the most shifted dimensions to list.
    pub top_dims: usize,
    /// Compare the images that have features when some lack them, instead
    /// of refusing.
    pub allow_partial: bool,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            encoder: None,
            pooled: catalog::PooledChoice::default(),
            smd_threshold: 0.2,
            components: 5,
            alpha: 0.05,
            max_rows: 10_000,
            top_dims: 10,
            allow_partial: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub dataset: String,
    pub fingerprint: String,
    pub encoder: Option<String>,
    /// Images with features: one row each (a views folder's rows are
    /// averaged per image).
    pub rows: usize,
    /// Rows used (after thinning to `max_rows`).
    pub rows_used: usize,
    /// Images of the dataset without features (with `allow_partial`).
    pub images_lacking: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DimensionShift {
    pub dimension: usize,
    pub reference_mean: f64,
    pub candidate_mean: f64,
    /// Standardised mean difference.
    pub smd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentTest {
    /// 1 for the reference's first principal component.
    pub component: usize,
    /// Share of the reference's total variance along this component.
    pub explained_variance_ratio: f64,
    /// Kolmogorov-Smirnov statistic D.
    pub statistic: f64,
    pub p_value: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    pub reference: Sample,
    pub candidate: Sample,
    pub feature_dim: usize,
    pub smd_threshold: f64,
    /// Dimensions with |SMD| above the threshold.
    pub shifted_dimensions: usize,
    pub shifted_fraction: f64,
    pub mean_abs_smd: f64,
    /// The most shifted dimensions, largest |SMD| first.
    pub top_dimensions: Vec<DimensionShift>,
    pub test: String,
    pub components: Vec<ComponentTest>,
    /// Bonferroni-combined p-value of the component tests.
    pub p_value: f64,
    pub alpha: f64,
    pub drift: bool,
    /// One plain sentence.
    pub verdict: String,
}

/// One dataset's feature rows, as f32, row-major.
struct Rows {
    sample: Sample,
    metadata: std::collections::HashMap<String, String>,
    dim: usize,
    values: Vec<f32>,
}

impl Rows {
    fn count(&self) -> usize {
        self.values.len() / self.dim
    }
}

fn open(layout: &Layout, dataset: &str, config: &DriftConfig) -> Result<Rows, DriftError> {
    let no_features = |message: String| DriftError::NoFeatures {
        dataset: dataset.to_string(),
        message,
    };
    let opened = catalog::open(
        layout,
        &FeatureRequest {
            dataset,
            encoder: config.encoder.as_deref(),
            kind: Some(FeatureKind::Pooled),
            pooled: Some(&config.pooled),
            ..FeatureRequest::default()
        },
    )
    .map_err(|e| match e {
        crate::features::FeatureError::NoFeatures(message) => no_features(message),
        other => DriftError::Features(other),
    })?;
    let fingerprint = opened.fingerprint.clone();
    if !opened.lacking.is_empty() && !config.allow_partial {
        return Err(DriftError::Incomplete(catalog::lacking_message(
            dataset,
            opened.info.version,
            &fingerprint,
            opened.lacking_by_split(),
            opened.info.images,
        )));
    }
    let images_lacking = opened.lacking.len();
    let features = opened.features;
    // A views folder holds each image's views as consecutive rows; the
    // tests compare images, so an image is the mean of its views (counting
    // each view as a sample would shrink every p-value by the number of
    // views).
    let views = features.views()?.count();
    let total = features.len() / views;
    if total < 2 {
        return Err(DriftError::TooFewRows {
            dataset: dataset.to_string(),
            rows: total,
        });
    }
    let dim = features.feature_dim();
    let stride = total.div_ceil(config.max_rows.max(2));
    let mut values = Vec::with_capacity(total.div_ceil(stride) * dim);
    for image in (0..total).step_by(stride) {
        let first = image * views;
        features.check_view_rows(first, views)?;
        let start = values.len();
        values.resize(start + dim, 0.0);
        let mean = &mut values[start..];
        for row in first..first + views {
            for (sum, value) in mean.iter_mut().zip(features.pooled(row)) {
                *sum += value.to_f32();
            }
        }
        mean.iter_mut().for_each(|sum| *sum /= views as f32);
    }
    let rows_used = values.len() / dim;
    Ok(Rows {
        sample: Sample {
            dataset: dataset.to_string(),
            fingerprint,
            encoder: features.metadata().get("encoder").cloned(),
            rows: total,
            rows_used,
            images_lacking,
        },
        metadata: features.metadata().clone(),
        dim,
        values,
    })
}

/// What made a feature folder, for comparing two of them.
fn made_by(rows: &Rows) -> String {
    let get = |key: &str| rows.metadata.get(key).map_or("?", String::as_str);
    format!("encoder {}, weights {}", get("encoder"), get("weights"))
}

/// Compares the cached features of `candidate` with those of `reference`.
pub fn drift(
    layout: &Layout,
    reference: &str,
    candidate: &str,
    config: &DriftConfig,
) -> Result<DriftReport, DriftError> {
    if !(config.alpha > 0.0 && config.alpha < 1.0) {
        return Err(DriftError::Invalid(format!(
            "alpha {} must be in (0, 1)",
            config.alpha
        )));
    }
    if config.components == 0 {
        return Err(DriftError::Invalid("components must be at least 1".into()));
    }
    let reference_rows = open(layout, reference, config)?;
    let candidate_rows = open(layout, candidate, config)?;
    for key in ["encoder", "weights", "preprocess"] {
        if reference_rows.metadata.get(key) != candidate_rows.metadata.get(key) {
            return Err(DriftError::EncoderMismatch {
                reference: reference.to_string(),
                reference_made_by: made_by(&reference_rows),
                candidate: candidate.to_string(),
                candidate_made_by: made_by(&candidate_rows),
            });
        }
    }
    if reference_rows.dim != candidate_rows.dim {
        return Err(DriftError::DimensionMismatch {
            reference: reference.to_string(),
            reference_dim: reference_rows.dim,
            candidate: candidate.to_string(),
            candidate_dim: candidate_rows.dim,
        });
    }
    let dim = reference_rows.dim;
    let (reference_mean, reference_var) = moments(&reference_rows);
    let (candidate_mean, candidate_var) = moments(&candidate_rows);
    let mut shifts: Vec<DimensionShift> = (0..dim)
        .map(|d| {
            let pooled_sd = ((reference_var[d] + candidate_var[d]) / 2.0)
                .sqrt()
                .max(1e-6);
            DimensionShift {
                dimension: d,
                reference_mean: reference_mean[d],
                candidate_mean: candidate_mean[d],
                smd: (candidate_mean[d] - reference_mean[d]) / pooled_sd,
            }
        })
        .collect();
    let shifted = shifts
        .iter()
        .filter(|s| s.smd.abs() > config.smd_threshold)
        .count();
    let mean_abs_smd = shifts.iter().map(|s| s.smd.abs()).sum::<f64>() / dim as f64;
    shifts.sort_by(|a, b| {
        b.smd
            .abs()
            .total_cmp(&a.smd.abs())
            .then(a.dimension.cmp(&b.dimension))
    });
    shifts.truncate(config.top_dims);

    // Both samples centred on the reference mean, projected on its top components.
    let device = Device::Cpu;
    let centre = |rows: &Rows| -> Result<Tensor, DriftError> {
        let mean: Vec<f32> = reference_mean.iter().map(|&m| m as f32).collect();
        let x = Tensor::from_slice(&rows.values, (rows.count(), dim), &device)?;
        Ok(x.broadcast_sub(&Tensor::from_vec(mean, dim, &device)?)?)
    };
    let reference_centred = centre(&reference_rows)?;
    let candidate_centred = centre(&candidate_rows)?;
    let components = config.components.min(dim).min(reference_rows.count() - 1);
    let (basis, variances) = principal_components(&reference_centred, components)?;
    let total_variance: f64 = reference_var.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let reference_scores = reference_centred.matmul(&basis)?.t()?.to_vec2::<f32>()?;
    let candidate_scores = candidate_centred.matmul(&basis)?.t()?.to_vec2::<f32>()?;
    let mut tests = Vec::with_capacity(components);
    for (k, (a, b)) in reference_scores.iter().zip(&candidate_scores).enumerate() {
        let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let statistic = ks_statistic(&a, &b);
        tests.push(ComponentTest {
            component: k + 1,
            explained_variance_ratio: variances[k] / total_variance,
            statistic,
            p_value: ks_p_value(statistic, a.len(), b.len()),
        });
    }
    let min_p = tests.iter().map(|t| t.p_value).fold(1.0f64, f64::min);
    let p_value = (min_p * tests.len() as f64).min(1.0);
    let drift = p_value < config.alpha;
    let verdict = if drift {
        format!(
            "drift: candidate {candidate} does not look like reference {reference} \
             (p = {p_value:.3e} < {alpha}; {shifted} of {dim} dimensions shifted by more than \
             {threshold} pooled standard deviations)",
            alpha = config.alpha,
            threshold = config.smd_threshold
        )
    } else {
        format!(
            "no drift: candidate {candidate} looks like reference {reference} \
             (p = {p_value:.3} >= {alpha}; {shifted} of {dim} dimensions shifted by more than \
             {threshold} pooled standard deviations)",
            alpha = config.alpha,
            threshold = config.smd_threshold
        )
    };
    Ok(DriftReport {
        reference: reference_rows.sample,
        candidate: candidate_rows.sample,
        feature_dim: dim,
        smd_threshold: config.smd_threshold,
        shifted_dimensions: shifted,
        shifted_fraction: shifted as f64 / dim as f64,
        mean_abs_smd,
        top_dimensions: shifts,
        test: format!(
            "two-sample Kolmogorov-Smirnov on the reference's top {components} principal \
             components, Bonferroni-combined"
        ),
        components: tests,
        p_value,
        alpha: config.alpha,
        drift,
        verdict,
    })
}

/// Per-dimension mean and (n - 1) variance, accumulated in f64.
fn moments(rows: &Rows) -> (Vec<f64>, Vec<f64>) {
    let (n, dim) = (rows.count(), rows.dim);
    let mut mean = vec![0f64; dim];
    for row in rows.values.chunks(dim) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0f64; dim];
    for row in rows.values.chunks(dim) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (v as f64 - m).powi(2);
        }
    }
    var.iter_mut().for_each(|s| *s /= (n - 1) as f64);
    (mean, var)
}

/// The top `k` principal directions of centred rows `x` [n, d] (as the
/// columns of a [d, k] tensor) and their variances, by subspace iteration
/// on xᵀx with Gram-Schmidt re-orthonormalisation (seeded start).
fn principal_components(x: &Tensor, k: usize) -> Result<(Tensor, Vec<f64>), DriftError> {
    const ITERATIONS: usize = 60;
    let (n, d) = x.dims2()?;
    let device = x.device();
    let xt = x.t()?.contiguous()?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut basis: Vec<f64> = (0..d * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    orthonormalise_columns(&mut basis, d, k);
    for _ in 0..ITERATIONS {
        let q = Tensor::from_vec(
            basis.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
            (d, k),
            device,
        )?;
        let z = xt.matmul(&x.matmul(&q)?)?;
        basis = z
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v as f64)
            .collect();
        orthonormalise_columns(&mut basis, d, k);
    }
    let q = Tensor::from_vec(
        basis.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
        (d, k),
        device,
    )?;
    // Variance along each direction: |x q|^2 / (n - 1).
    let scores = x.matmul(&q)?;
    let variances = scores
        .sqr()?
        .sum(0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|s| s as f64 / (n - 1) as f64)
        .collect();
    Ok((q, variances))
}

/// Modified Gram-Schmidt on the `k` columns of a row-major [d, k] matrix; a
/// column that vanishes is replaced by a unit vector orthogonal to the others.
fn orthonormalise_columns(m: &mut [f64], d: usize, k: usize) {
    for j in 0..k {
        for i in 0..j {
            let dot: f64 = (0..d).map(|r| m[r * k + i] * m[r * k + j]).sum();
            for r in 0..d {
                m[r * k + j] -= dot * m[r * k + i];
            }
        }
        let norm = (0..d).map(|r| m[r * k + j].powi(2)).sum::<f64>().sqrt();
        if norm > 1e-12 {
            for r in 0..d {
                m[r * k + j] /= norm;
            }
        } else {
            // Degenerate (rank below k): any direction orthogonal to the others.
            for r in 0..d {
                m[r * k + j] = if r == j % d { 1.0 } else { 0.0 };
            }
            for i in 0..j {
                let dot: f64 = (0..d).map(|r| m[r * k + i] * m[r * k + j]).sum();
                for r in 0..d {
                    m[r * k + j] -= dot * m[r * k + i];
                }
            }
            let norm = (0..d)
                .map(|r| m[r * k + j].powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            for r in 0..d {
                m[r * k + j] /= norm;
            }
        }
    }
}

/// The two-sample Kolmogorov-Smirnov statistic: the largest distance between
/// the two empirical distribution functions.
pub fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        // Step past every copy of the smaller value in both samples (ties).
        let value = a[i].min(b[j]);
        while i < a.len() && a[i] <= value {
            i += 1;
        }
        while j < b.len() && b[j] <= value {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// The asymptotic two-sided p-value of a two-sample KS statistic: the
/// Kolmogorov distribution's survival function at sqrt(n m / (n + m)) D,
/// Q(t) = 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 t^2) (as
/// `scipy.stats.kstwobign.sf`).
pub fn ks_p_value(statistic: f64, n: usize, m: usize) -> f64 {
    let effective = (n * m) as f64 / (n + m) as f64;
    let t = effective.sqrt() * statistic;
    if t < 0.2 {
        return 1.0; // the series converges slowly here; the value is 1 to 1e-9
    }
    let mut sum = 0f64;
    for j in 1..=100 {
        let term = (-2.0 * (j * j) as f64 * t * t).exp();
        sum += if j % 2 == 1 { term } else { -term };
        if term < 1e-16 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ks_matches_scipy() {
        // scipy 1.17.1: ks_2samp(x, y, method="asymp").statistic and
        // kstwobign.sf(sqrt(n m / (n + m)) * D) for these generated samples.
        let x: Vec<f64> = (0..40).map(|i| (i as f64 * 0.618034) % 1.0).collect();
        let y: Vec<f64> = (0..30)
            .map(|i| (i as f64 * 0.414214) % 1.0 + 0.15)
            .collect();
        let d = ks_statistic(&x, &y);
        assert!((d - 0.175).abs() < 1e-12, "{d}");
        let p = ks_p_value(d, 40, 30);
        assert!((p - 0.670_041_622_589_229_4).abs() < 1e-9, "{p}");
        let x: Vec<f64> = (0..500).map(|i| (i as f64 * 0.618034) % 1.0).collect();
        let y: Vec<f64> = (0..400)
            .map(|i| (i as f64 * 0.414214) % 1.0 + 0.05)
            .collect();
        let d = ks_statistic(&x, &y);
        assert!((d - 0.054).abs() < 1e-12, "{d}");
        let p = ks_p_value(d, 500, 400);
        assert!((p - 0.536_054_321_732_735_7).abs() < 1e-9, "{p}");
        // Identical samples: D = 0, p = 1; disjoint samples: D = 1.
        assert_eq!(ks_statistic(&x, &x), 0.0);
        assert_eq!(ks_p_value(0.0, 500, 500), 1.0);
        let far: Vec<f64> = x.iter().map(|v| v + 10.0).collect();
        assert_eq!(ks_statistic(&x, &far), 1.0);
    }

    #[test]
    fn principal_components_find_the_dominant_axes() {
        // Rows spread 3 along (1, 1, 0)/sqrt 2, 1 along z, 0.1 along (1, -1, 0)/sqrt 2,
        // from three exactly uncorrelated zero-mean waves of unit variance:
        // the first component is (1, 1, 0)/sqrt 2, the second z.
        let mut values = Vec::new();
        for i in 0..200 {
            let angle = 2.0 * std::f32::consts::PI * i as f32 / 200.0;
            let r2 = std::f32::consts::SQRT_2;
            let (a, b, c) = (r2 * angle.cos(), r2 * angle.sin(), r2 * (2.0 * angle).cos());
            let s = std::f32::consts::FRAC_1_SQRT_2;
            values.extend([3.0 * a * s + 0.1 * c * s, 3.0 * a * s - 0.1 * c * s, b]);
        }
        let x = Tensor::from_vec(values, (200, 3), &Device::Cpu).unwrap();
        let mean = x.mean_keepdim(0).unwrap();
        let x = x.broadcast_sub(&mean).unwrap();
        let (q, variances) = principal_components(&x, 2).unwrap();
        let q = q.to_vec2::<f32>().unwrap();
        assert!(
            (q[0][0].abs() - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-3
                && (q[1][0].abs() - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-3
        );
        assert!(q[2][0].abs() < 1e-3);
        assert!((q[2][1].abs() - 1.0).abs() < 1e-3);
        // Sums of squares over whole periods: 9 * 200 / 199 and 200 / 199.
        assert!(
            (variances[0] - 9.0 * 200.0 / 199.0).abs() < 1e-3,
            "{variances:?}"
        );
        assert!((variances[1] - 200.0 / 199.0).abs() < 1e-3, "{variances:?}");
    }
}
