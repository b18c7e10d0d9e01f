//! `lazarus review`: arguments to a `ReviewConfig`; the work is in `lazarus::review`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use lazarus::layout::Layout;
use lazarus::review::{ReviewConfig, Strategy, review, write_sheet};

use super::queue::DeviceArg;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    /// Smallest top-1 minus top-2 probability.
    Margin,
    /// Highest predictive entropy.
    Entropy,
    /// Query by committee: mean KL divergence of the runs from their consensus (2+ runs).
    Disagreement,
}

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// A finished run; repeat for a committee (their mean is the consensus).
    #[arg(long = "run", value_name = "RUN", required = true)]
    pub runs: Vec<String>,
    /// The registered dataset to review (its cached features are scored).
    #[arg(long, value_name = "NAME")]
    pub dataset: String,
    #[arg(long, value_enum, default_value = "margin")]
    pub strategy: StrategyArg,
    /// How many images to list.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub top: u64,
    /// Write review.csv and a contact sheet (index.html, thumbs/) into DIR;
    /// a previous review there is replaced, a folder holding anything else is refused.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also replace a review folder from a lazarus too old to mark its folders.
    #[arg(long, requires = "out")]
    pub force: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Review the images that have features when some lack them (extraction
    /// unfinished or failed), instead of refusing.
    #[arg(long)]
    pub allow_partial: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(layout: &Layout, args: ReviewArgs) -> anyhow::Result<()> {
    let config = ReviewConfig {
        strategy: match args.strategy {
            StrategyArg::Margin => Strategy::Margin,
            StrategyArg::Entropy => Strategy::Entropy,
            StrategyArg::Disagreement => Strategy::Disagreement,
        },
        top: args.top as usize,
        device: super::queue::device(args.device)?,
        allow_partial: args.allow_partial,
    };
    let report = review(layout, &args.runs, &args.dataset, &config)?;
    if let Some(out) = &args.out {
        let options = lazarus::output_dir::ReplaceOptions { force: args.force };
        write_sheet(&report, out, options)?;
    }
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "{} of {} scored images of {} are unlabeled or mispredicted; top {} by {}:",
        report.candidates,
        report.scored,
        report.dataset,
        report.items.len(),
        report.strategy.name()
    );
    let mut table = lazarus::experiments::Table::new([
        "rank",
        "score",
        "predicted",
        "probability",
        "true label",
        "path",
    ]);
    for item in &report.items {
        use lazarus::experiments::Cell;
        table.push(vec![
            Cell::text(item.rank.to_string()),
            Cell::text(format!("{:.4}", item.score)),
            Cell::text(item.predicted.clone()),
            Cell::text(format!("{:.3}", item.probability)),
            Cell::text(item.true_label.clone().unwrap_or_else(|| "-".into())),
            Cell::text(item.path.display().to_string()),
        ]);
    }
    print!("{}", table.to_text());
    if let Some(out) = &args.out {
        println!(
            "contact sheet: {}; CSV: {}",
            out.join(lazarus::review::HTML_FILE).display(),
            out.join(lazarus::review::CSV_FILE).display()
        );
    }
    Ok(())
}
