//! `lazarus drift`: arguments to a `DriftConfig`; the work is in `lazarus::drift`.

use clap::Args;
use lazarus::drift::{DriftConfig, drift};
use lazarus::layout::Layout;

#[derive(Debug, Args)]
pub struct DriftArgs {
    /// The dataset the candidate is compared with.
    #[arg(long, value_name = "DATASET")]
    pub reference: String,
    /// The dataset to check.
    #[arg(long, value_name = "DATASET")]
    pub candidate: String,
    /// Compare the features of this encoder (needed when a dataset has several).
    #[arg(long, value_name = "ENCODER")]
    pub encoder: Option<String>,
    #[command(flatten)]
    pub folder: super::queue::PooledFolderArgs,
    /// |standardised mean difference| above which a dimension counts as shifted.
    #[arg(long, default_value_t = 0.2)]
    pub threshold: f64,
    /// Principal components of the reference the two-sample tests run on.
    #[arg(long, default_value_t = 5)]
    pub components: usize,
    /// Significance level of the combined test.
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
    /// At most this many rows per dataset (an even stride over larger caches).
    #[arg(long, default_value_t = 10_000)]
    pub max_rows: usize,
    /// Compare the images that have features when some lack them (extraction
    /// unfinished or failed), instead of refusing.
    #[arg(long)]
    pub allow_partial: bool,
    #[arg(long)]
    pub json: bool,
}

/// Exits 0 whether or not there is drift; the verdict is in the output.
pub fn run(layout: &Layout, args: DriftArgs) -> anyhow::Result<()> {
    let config = DriftConfig {
        encoder: args.encoder.clone(),
        pooled: args.folder.choice()?,
        smd_threshold: args.threshold,
        components: args.components,
        alpha: args.alpha,
        max_rows: args.max_rows,
        allow_partial: args.allow_partial,
        ..DriftConfig::default()
    };
    let report = drift(layout, &args.reference, &args.candidate, &config)?;
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "reference {} ({} rows), candidate {} ({} rows), {} features of {}",
        report.reference.dataset,
        report.reference.rows_used,
        report.candidate.dataset,
        report.candidate.rows_used,
        report.feature_dim,
        report
            .reference
            .encoder
            .as_deref()
            .unwrap_or("an unnamed encoder")
    );
    println!(
        "per dimension: {} of {} ({:.1}%) shifted by more than {} pooled SD; mean |SMD| {:.3}",
        report.shifted_dimensions,
        report.feature_dim,
        100.0 * report.shifted_fraction,
        report.smd_threshold,
        report.mean_abs_smd
    );
    use lazarus::experiments::{Cell, Table};
    let mut dims = Table::new(["dimension", "reference mean", "candidate mean", "SMD"]);
    for shift in report.top_dimensions.iter().take(5) {
        dims.push(vec![
            Cell::text(shift.dimension.to_string()),
            Cell::text(format!("{:.4}", shift.reference_mean)),
            Cell::text(format!("{:.4}", shift.candidate_mean)),
            Cell::text(format!("{:+.3}", shift.smd)),
        ]);
    }
    print!("{}", dims.to_text());
    println!("{}:", report.test);
    let mut tests = Table::new(["component", "variance share", "KS D", "p-value"]);
    for test in &report.components {
        tests.push(vec![
            Cell::text(test.component.to_string()),
            Cell::text(format!("{:.3}", test.explained_variance_ratio)),
            Cell::text(format!("{:.4}", test.statistic)),
            Cell::text(format!("{:.3e}", test.p_value)),
        ]);
    }
    print!("{}", tests.to_text());
    println!("{}", report.verdict);
    Ok(())
}
