//! Plots of runs and sweeps, each written as SVG and PNG (atomically).
//!
//! - [`learning_curves`]: train and validation loss, and the validation metric, per epoch.
//! - [`confusion_matrix`]: counts, shaded by the share of each true class.
//! - [`sweep_chart`]: one point per configuration, mean ± std over seeds.
//! - [`roc_curves`]: ROC curves of anomaly scores, one per split, with their AUC.
//!
//! Text in PNGs is rasterised by plotters' `ab_glyph` backend from DejaVu Sans
//! embedded in the binary (the `dejavu` crate), so no system font library
//! (fontconfig, freetype) is needed. SVGs name the `sans-serif` family and
//! leave the glyphs to the viewer.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use super::{AblationReport, ExperimentsError, io_error};

const FONT: &str = "sans-serif";
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VALIDATION_COLOR: RGBColor = RGBColor(255, 127, 14);
const METRIC_COLOR: RGBColor = RGBColor(44, 160, 44);
const BEST_COLOR: RGBColor = RGBColor(214, 39, 40);

fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are a valid TTF shipped by the dejavu crate; a failure here is a build defect.
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            panic!("the embedded DejaVu Sans font does not parse");
        }
    });
}

/// Metrics of one epoch; `None` where a value was not computed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochPoint {
    pub epoch: u64,
    pub train_loss: Option<f64>,
    pub validation_loss: Option<f64>,
    pub validation_metric: Option<f64>,
}

/// Input of [`learning_curves`].
#[derive(Debug, Clone)]
pub struct LearningCurves<'a> {
    /// Name of the validation metric on the right panel, such as `val_accuracy`.
    pub metric_name: &'a str,
    pub epochs: &'a [EpochPoint],
}

/// One configuration of a sweep: its label, and the metric over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    pub label: String,
    pub mean: f64,
    pub std: Option<f64>,
    pub n: usize,
}

impl SweepPoint {
    /// One point per row of an ablation table, labelled `key=value, ...`.
    pub fn from_ablation(report: &AblationReport) -> Vec<SweepPoint> {
        report
            .rows
            .iter()
            .map(|row| SweepPoint {
                label: report
                    .by
                    .iter()
                    .zip(&row.levels)
                    .map(|(key, level)| {
                        let value = level.as_ref().map_or("-".to_string(), |v| v.to_string());
                        format!("{key}={value}")
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                mean: row.mean,
                std: row.std,
                n: row.n,
            })
            .collect()
    }
}

/// Writes `learning_curves.svg` and `learning_curves.png` into `dir`.
pub fn learning_curves(
    dir: &Path,
    curves: &LearningCurves<'_>,
) -> Result<Vec<PathBuf>, ExperimentsError> {
    let stem = dir.join("learning_curves");
    if curves.epochs.is_empty() {
        return Err(ExperimentsError::Plot {
            path: stem,
            message: "no epochs to plot".into(),
        });
    }
    render(&stem, (1100, 440), &CurvesFigure(curves))
}

/// Writes `confusion_matrix.svg` and `confusion_matrix.png` into `dir`.
/// `matrix[true][predicted]` counts validation (or test) images.
pub fn confusion_matrix(
    dir: &Path,
    class_names: &[String],
    matrix: &[Vec<u64>],
) -> Result<Vec<PathBuf>, ExperimentsError> {
    let stem = dir.join("confusion_matrix");
    let n = class_names.len();
    if n == 0 || matrix.len() != n || matrix.iter().any(|row| row.len() != n) {
        return Err(ExperimentsError::Plot {
            path: stem,
            message: format!(
                "the matrix must be {n}x{n} for {n} classes, got {} rows of lengths {:?}",
                matrix.len(),
                matrix.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        });
    }
    let side = (120 + 90 * n as u32).clamp(420, 1400);
    let figure = ConfusionFigure {
        class_names,
        matrix,
    };
    render(&stem, (side + 120, side), &figure)
}

/// Writes `<stem>.svg` and `<stem>.png`: the sweep's configurations, mean ± std
/// of `metric`, the best one highlighted (lowest for metrics ending in `loss`).
pub fn sweep_chart(
    stem: &Path,
    metric: &str,
    points: &[SweepPoint],
) -> Result<Vec<PathBuf>, ExperimentsError> {
    if points.is_empty() {
        return Err(ExperimentsError::Plot {
            path: stem.to_path_buf(),
            message: "no configurations to plot".into(),
        });
    }
    let height = 120 + 34 * points.len() as u32;
    render(stem, (1000, height), &SweepFigure { metric, points })
}

/// One ROC curve: (false positive rate, true positive rate) points and its area.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RocCurve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub auc: f64,
}

/// Writes `roc_curve.svg` and `roc_curve.png` into `dir`: every curve, and
/// the diagonal of a score that knows nothing.
pub fn roc_curves(dir: &Path, curves: &[RocCurve]) -> Result<Vec<PathBuf>, ExperimentsError> {
    let stem = dir.join("roc_curve");
    if curves.is_empty() || curves.iter().any(|c| c.points.is_empty()) {
        return Err(ExperimentsError::Plot {
            path: stem,
            message: "no ROC points to plot".into(),
        });
    }
    render(&stem, (620, 560), &RocFigure(curves))
}

/// Draws the same figure into an SVG string and an RGB buffer and writes both.
fn render(
    stem: &Path,
    size: (u32, u32),
    figure: &impl Figure,
) -> Result<Vec<PathBuf>, ExperimentsError> {
    register_font();
    let fail = |message: String| ExperimentsError::Plot {
        path: stem.to_path_buf(),
        message,
    };
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        figure.draw(&area).map_err(fail)?;
        area.present().map_err(|e| fail(e.to_string()))?;
    }
    let mut pixels = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let area = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        figure.draw(&area).map_err(fail)?;
        area.present().map_err(|e| fail(e.to_string()))?;
    }
    let image = image::RgbImage::from_raw(size.0, size.1, pixels)
        .ok_or_else(|| fail("pixel buffer does not match the image size".into()))?;
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))?;
    let svg_path = stem.with_extension("svg");
    let png_path = stem.with_extension("png");
    if let Some(parent) = stem.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    crate::atomic::write_file(&svg_path, svg.as_bytes()).map_err(io_error(&svg_path))?;
    crate::atomic::write_file(&png_path, &png).map_err(io_error(&png_path))?;
    Ok(vec![svg_path, png_path])
}

/// A figure drawn once into the SVG backend and once into the bitmap backend.
trait Figure {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

struct CurvesFigure<'a>(&'a LearningCurves<'a>);

impl Figure for CurvesFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        draw_learning_curves(area, self.0)
    }
}

struct ConfusionFigure<'a> {
    class_names: &'a [String],
    matrix: &'a [Vec<u64>],
}

impl Figure for ConfusionFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        draw_confusion(area, self.class_names, self.matrix)
    }
}

struct SweepFigure<'a> {
    metric: &'a str,
    points: &'a [SweepPoint],
}

impl Figure for SweepFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        draw_sweep(area, self.metric, self.points)
    }
}

struct RocFigure<'a>(&'a [RocCurve]);

impl Figure for RocFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        draw_roc(area, self.0)
    }
}

fn text_error(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// `[lo, hi]` of the values, widened by 5% (or ±0.5 around a single value).
fn padded_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return None;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    Some((lo - pad, hi + pad))
}

fn draw_learning_curves<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    curves: &LearningCurves<'_>,
) -> Result<(), String> {
    area.fill(&WHITE).map_err(text_error)?;
    let (left, right) = area.split_horizontally(area.dim_in_pixel().0 / 2);
    let epochs = curves.epochs;
    let first = epochs.iter().map(|e| e.epoch).min().unwrap_or(0) as f64;
    let last = epochs.iter().map(|e| e.epoch).max().unwrap_or(1) as f64;
    let x_range = if last > first {
        first..last
    } else {
        first - 0.5..last + 0.5
    };
    type Series = (&'static str, RGBColor, fn(&EpochPoint) -> Option<f64>);
    let loss_series: Vec<Series> = vec![
        ("train loss", TRAIN_COLOR, |e| e.train_loss),
        ("validation loss", VALIDATION_COLOR, |e| e.validation_loss),
    ];
    let metric_series: Vec<Series> = vec![("validation", METRIC_COLOR, |e| e.validation_metric)];
    let panels = [
        (&left, "Loss", "loss", loss_series),
        (
            &right,
            curves.metric_name,
            curves.metric_name,
            metric_series,
        ),
    ];
    for (panel, title, y_name, series) in panels {
        let values = epochs
            .iter()
            .flat_map(|e| series.iter().filter_map(move |(_, _, get)| get(e)));
        let Some((lo, hi)) = padded_range(values) else {
            panel
                .draw(&Text::new(
                    format!("{title}: no values recorded"),
                    (40, 40),
                    (FONT, 18).into_font(),
                ))
                .map_err(text_error)?;
            continue;
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, (FONT, 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone(), lo..hi)
            .map_err(text_error)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_name)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(text_error)?;
        for (label, color, get) in series {
            let points: Vec<(f64, f64)> = epochs
                .iter()
                .filter_map(|e| get(e).map(|v| (e.epoch as f64, v)))
                .collect();
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(text_error)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if points.len() <= 60 {
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|&point| Circle::new(point, 3, color.filled())),
                    )
                    .map_err(text_error)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT, 14))
            .draw()
            .map_err(text_error)?;
    }
    Ok(())
}

fn shorten(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        label.to_string()
    } else {
        let head: String = label.chars().take(max - 1).collect();
        format!("{head}…")
    }
}

fn draw_confusion<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    class_names: &[String],
    matrix: &[Vec<u64>],
) -> Result<(), String> {
    area.fill(&WHITE).map_err(text_error)?;
    let n = class_names.len() as u32;
    let names: Vec<String> = class_names.iter().map(|c| shorten(c, 14)).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("Confusion matrix (rows: true class)", (FONT, 22))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(130)
        // Integer ranges are inclusive: 0..n-1 gives exactly n segments.
        .build_cartesian_2d(
            (0..n.max(2) - 1).into_segmented(),
            (0..n.max(2) - 1).into_segmented(),
        )
        .map_err(text_error)?;
    let label = |value: &SegmentValue<u32>, flip: bool| match value {
        SegmentValue::CenterOf(i) if *i < n => {
            let index = if flip { n - 1 - i } else { *i };
            names[index as usize].clone()
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("predicted class")
        .y_desc("true class")
        .x_labels(n as usize)
        .y_labels(n as usize)
        .x_label_formatter(&|v| label(v, false))
        .y_label_formatter(&|v| label(v, true))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(text_error)?;
    let cell_font = (FONT, if n <= 8 { 20 } else { 13 });
    for (truth, row) in matrix.iter().enumerate() {
        let total: u64 = row.iter().sum();
        let y = n - 1 - truth as u32;
        for (predicted, &count) in row.iter().enumerate() {
            let share = if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            };
            // White to a dark blue, by the share of the true class.
            let shade = |full: u8| (255.0 - share * (255.0 - full as f64)).round() as u8;
            let fill = RGBColor(shade(8), shade(48), shade(107));
            let x = predicted as u32;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    fill.filled(),
                )))
                .map_err(text_error)?;
            let ink = if share > 0.5 { WHITE } else { BLACK };
            chart
                .draw_series(std::iter::once(Text::new(
                    count.to_string(),
                    (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                    cell_font
                        .into_font()
                        .color(&ink)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )))
                .map_err(text_error)?;
        }
    }
    Ok(())
}

fn draw_sweep<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    metric: &str,
    points: &[SweepPoint],
) -> Result<(), String> {
    area.fill(&WHITE).map_err(text_error)?;
    let n = points.len() as u32;
    let low = |p: &SweepPoint| p.mean - p.std.unwrap_or(0.0);
    let high = |p: &SweepPoint| p.mean + p.std.unwrap_or(0.0);
    let (lo, hi) = padded_range(points.iter().flat_map(|p| [low(p), high(p)]))
        .ok_or_else(|| "no finite values".to_string())?;
    let best = match super::direction_of(metric) {
        super::Direction::HigherIsBetter => points
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.mean.total_cmp(&b.1.mean)),
        super::Direction::LowerIsBetter => points
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.mean.total_cmp(&b.1.mean)),
    }
    .map(|(i, _)| i);
    let labels: Vec<String> = points.iter().map(|p| shorten(&p.label, 40)).collect();
    let widest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as u32;
    // Room for the value text right of the widest interval.
    let x_hi = hi + (hi - lo) * 0.35;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{metric}: mean ± std over seeds"), (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size((widest * 8 + 20).min(360))
        .build_cartesian_2d(lo..x_hi, (0..n.max(2) - 1).into_segmented())
        .map_err(text_error)?;
    chart
        .configure_mesh()
        .y_labels(n as usize)
        .y_label_formatter(&|v| match v {
            // Row 0 at the top: the first configuration (the baseline) first.
            SegmentValue::CenterOf(i) if *i < n => labels[(n - 1 - i) as usize].clone(),
            _ => String::new(),
        })
        .x_desc(metric)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(text_error)?;
    for (index, point) in points.iter().enumerate() {
        let row = n - 1 - index as u32;
        let color = if Some(index) == best {
            BEST_COLOR
        } else {
            TRAIN_COLOR
        };
        let y = SegmentValue::CenterOf(row);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(low(point), y.clone()), (high(point), y.clone())],
                color.stroke_width(3),
            )))
            .map_err(text_error)?;
        chart
            .draw_series(std::iter::once(Circle::new(
                (point.mean, y.clone()),
                6,
                color.filled(),
            )))
            .map_err(text_error)?;
        let text = match point.std {
            Some(std) => format!("{:.4} ± {:.4} (n={})", point.mean, std, point.n),
            None => format!("{:.4} (n={})", point.mean, point.n),
        };
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (high(point) + (hi - lo) * 0.02, y),
                (FONT, 14)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            )))
            .map_err(text_error)?;
    }
    Ok(())
}

fn draw_roc<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    curves: &[RocCurve],
) -> Result<(), String> {
    area.fill(&WHITE).map_err(text_error)?;
    let mut chart = ChartBuilder::on(area)
        .caption("ROC curve (anomalous = positive)", (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(text_error)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(text_error)?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 0.0), (1.0, 1.0)],
            BLACK.mix(0.3).stroke_width(1),
        ))
        .map_err(text_error)?;
    let colors = [VALIDATION_COLOR, TRAIN_COLOR, METRIC_COLOR, BEST_COLOR];
    for (curve, color) in curves.iter().zip(colors.iter().cycle()) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(curve.points.clone(), color.stroke_width(2)))
            .map_err(text_error)?
            .label(format!("{} (AUC {:.4})", curve.label, curve.auc))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 14))
        .draw()
        .map_err(text_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_size(path: &Path) -> (u32, u32) {
        let image = image::open(path).unwrap();
        (image.width(), image.height())
    }

    /// Pixels that are neither white nor nearly white: text and lines were drawn.
    fn ink(path: &Path) -> usize {
        let image = image::open(path).unwrap().to_rgb8();
        image
            .pixels()
            .filter(|p| p.0.iter().any(|&c| c < 200))
            .count()
    }

    #[test]
    fn learning_curves_write_svg_and_png_with_text() {
        let dir = tempfile::tempdir().unwrap();
        let epochs: Vec<EpochPoint> = (1..=10)
            .map(|epoch| EpochPoint {
                epoch,
                train_loss: Some(1.0 / epoch as f64),
                validation_loss: Some(1.2 / epoch as f64 + 0.05),
                validation_metric: Some(0.5 + 0.04 * epoch as f64),
            })
            .collect();
        let written = learning_curves(
            dir.path(),
            &LearningCurves {
                metric_name: "val_accuracy",
                epochs: &epochs,
            },
        )
        .unwrap();
        assert_eq!(
            written,
            vec![
                dir.path().join("learning_curves.svg"),
                dir.path().join("learning_curves.png")
            ]
        );
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(
            svg.contains("val_accuracy") && svg.contains("train loss"),
            "{svg}"
        );
        assert_eq!(png_size(&written[1]), (1100, 440));
        assert!(ink(&written[1]) > 2000);
    }

    #[test]
    fn one_epoch_without_validation_metric_still_plots() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = [EpochPoint {
            epoch: 1,
            train_loss: Some(0.7),
            validation_loss: None,
            validation_metric: None,
        }];
        let written = learning_curves(
            dir.path(),
            &LearningCurves {
                metric_name: "val/accuracy",
                epochs: &epochs,
            },
        )
        .unwrap();
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.contains("val/accuracy: no values recorded"), "{svg}");
        let err = learning_curves(
            dir.path(),
            &LearningCurves {
                metric_name: "val/accuracy",
                epochs: &[],
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("no epochs to plot"), "{err}");
    }

    #[test]
    fn png_text_is_rasterised_from_the_embedded_font() {
        // The same figure with and without a caption differs only by the
        // caption's glyphs: if no font were available, no pixels would differ.
        register_font();
        let draw = |caption: bool| {
            let mut pixels = vec![255u8; 300 * 80 * 3];
            {
                let backend = BitMapBackend::with_buffer(&mut pixels, (300, 80));
                let area = backend.into_drawing_area();
                if caption {
                    area.draw(&Text::new(
                        "Accuracy 0.93",
                        (10, 20),
                        (FONT, 24).into_font(),
                    ))
                    .unwrap();
                }
                area.present().unwrap();
            }
            pixels
        };
        let with = draw(true);
        let without = draw(false);
        let differing = with.iter().zip(&without).filter(|(a, b)| a != b).count();
        assert!(differing > 300, "only {differing} bytes differ");
    }

    #[test]
    fn confusion_matrix_checks_its_shape() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["functional".to_string(), "defective".to_string()];
        let written = confusion_matrix(dir.path(), &names, &[vec![40, 3], vec![5, 12]]).unwrap();
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.contains("defective") && svg.contains("\n40\n"), "{svg}");
        assert!(ink(&written[1]) > 1000);
        let err = confusion_matrix(dir.path(), &names, &[vec![1, 2, 3]]).unwrap_err();
        assert!(err.to_string().contains("must be 2x2"), "{err}");
    }

    #[test]
    fn sweep_chart_writes_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let points = vec![
            SweepPoint {
                label: "head=linear".into(),
                mean: 0.81,
                std: Some(0.01),
                n: 3,
            },
            SweepPoint {
                label: "head=mlp".into(),
                mean: 0.86,
                std: None,
                n: 1,
            },
        ];
        let written = sweep_chart(&dir.path().join("sweep"), "val_accuracy", &points).unwrap();
        assert!(written.iter().all(|p| p.exists()));
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(
            svg.contains("head=mlp") && svg.contains("0.8100 ± 0.0100 (n=3)"),
            "{svg}"
        );
    }

    #[test]
    fn roc_curves_write_both_formats_with_their_areas() {
        let dir = tempfile::tempdir().unwrap();
        let curve = RocCurve {
            label: "test".into(),
            points: vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)],
            auc: 0.875,
        };
        let written = roc_curves(dir.path(), &[curve]).unwrap();
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.contains("test (AUC 0.8750)"), "{svg}");
        assert_eq!(png_size(&written[1]), (620, 560));
        assert!(ink(&written[1]) > 1000);
        let err = roc_curves(dir.path(), &[]).unwrap_err();
        assert!(err.to_string().contains("no ROC points"), "{err}");
    }
}
