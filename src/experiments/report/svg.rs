//! Plain SVG charts for the report, written as text: line charts
//! (learning curves, overlays, ROC), precision-recall steps, parallel
//! coordinates and sorted bars. No script, no external font: the page's
//! `sans-serif` draws the text, so they render the same from `file://`.

use std::fmt::Write;

use super::html::escape;

/// Categorical colours (Tableau 10), one per series.
pub const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// The colour of series `index`.
pub fn color(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

const AXIS: &str = "#4b5563";
const GRID: &str = "#e5e7eb";
const MUTED: &str = "#9ca3af";

/// Most points a curve keeps; longer ones are thinned evenly (first and last kept).
const MAX_POINTS: usize = 1_500;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    /// Hover text of the whole line (a run id, say); the label when `None`.
    pub title: Option<String>,
    /// Where a click on the line goes.
    pub href: Option<String>,
}

/// A vertical marker (the kept epoch).
#[derive(Debug, Clone)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// A dashed reference line from one point to another, labelled at its end.
#[derive(Debug, Clone)]
pub struct Reference {
    pub from: (f64, f64),
    pub to: (f64, f64),
    pub label: String,
}

/// How a line joins its points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Straight,
    /// Precision-recall steps: precision p_i holds from the previous recall to r_i.
    Steps,
}

/// A line chart with numeric axes.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub width: u32,
    pub height: u32,
    /// Fixed axis ranges (ROC and PR: 0 to 1); from the data when `None`.
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Integer ticks on the x axis (steps, epochs).
    pub integer_x: bool,
    pub log_y: bool,
    pub marker: Option<Marker>,
    /// Dashed reference lines, such as the ROC diagonal.
    pub references: Vec<Reference>,
    pub shape: Shape,
    /// A dot with its value on hover at each point of short curves.
    pub point_markers: bool,
}

impl LineChart {
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series: Vec::new(),
            width: 560,
            height: 300,
            x_range: None,
            y_range: None,
            integer_x: false,
            log_y: false,
            marker: None,
            references: Vec::new(),
            shape: Shape::Straight,
            point_markers: true,
        }
    }

    /// The chart as an `<svg>` element.
    pub fn render(&self) -> String {
        let (width, height) = (self.width as f64, self.height as f64);
        let (left, right, top, bottom) = (62.0, 16.0, 30.0, 42.0);
        let plot = Plot {
            left,
            top,
            width: width - left - right,
            height: height - top - bottom,
        };
        let mut svg = open_svg(self.width, self.height, &self.title);
        text(
            &mut svg,
            width / 2.0,
            18.0,
            "middle",
            13.0,
            "600",
            &self.title,
        );
        let finite = |v: &f64| v.is_finite() && (!self.log_y || *v > 0.0);
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(finite);
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(finite);
        let x_range = self.x_range.or_else(|| span(xs));
        let y_range = self.y_range.or_else(|| span(ys));
        let (Some((x_lo, x_hi)), Some((y_lo, y_hi))) = (x_range, y_range) else {
            text(
                &mut svg,
                width / 2.0,
                height / 2.0,
                "middle",
                12.0,
                "400",
                "no finite values recorded",
            );
            svg.push_str("</svg>");
            return svg;
        };
        let x_axis = Axis::linear(x_lo, x_hi, self.x_range.is_none(), self.integer_x);
        let y_axis = if self.log_y {
            Axis::log(y_lo, y_hi)
        } else {
            Axis::linear(y_lo, y_hi, self.y_range.is_none(), false)
        };
        let x_of = |x: f64| plot.left + x_axis.fraction(x) * plot.width;
        let y_of = |y: f64| plot.top + plot.height - y_axis.fraction(y) * plot.height;
        // Grid and ticks.
        for &(value, ref label) in &y_axis.ticks {
            plot.y_tick(&mut svg, y_of(value), label);
        }
        for &(value, ref label) in &x_axis.ticks {
            let x = x_of(value);
            line(
                &mut svg,
                (x, plot.top),
                (x, plot.top + plot.height),
                GRID,
                1.0,
                None,
            );
            text(
                &mut svg,
                x,
                plot.top + plot.height + 15.0,
                "middle",
                11.0,
                "400",
                label,
            );
        }
        plot.frame(&mut svg);
        text(
            &mut svg,
            plot.left + plot.width / 2.0,
            height - 6.0,
            "middle",
            11.0,
            "400",
            &self.x_label,
        );
        let _ = write!(
            svg,
            r#"<text x="14" y="{:.1}" text-anchor="middle" font-size="11" fill="{AXIS}" transform="rotate(-90 14 {:.1})">{}</text>"#,
            plot.top + plot.height / 2.0,
            plot.top + plot.height / 2.0,
            escape(&self.y_label)
        );
        for Reference { from, to, label } in &self.references {
            let (a, b) = ((x_of(from.0), y_of(from.1)), (x_of(to.0), y_of(to.1)));
            line(&mut svg, a, b, MUTED, 1.0, Some("4 4"));
            if !label.is_empty() {
                text(&mut svg, b.0 - 4.0, b.1 - 4.0, "end", 10.0, "400", label);
            }
        }
        if let Some(marker) = &self.marker
            && marker.x >= x_lo
            && marker.x <= x_hi
        {
            let x = x_of(marker.x);
            line(
                &mut svg,
                (x, plot.top),
                (x, plot.top + plot.height),
                "#6b7280",
                1.0,
                Some("3 3"),
            );
            text(
                &mut svg,
                x + 4.0,
                plot.top + 11.0,
                "start",
                10.0,
                "400",
                &marker.label,
            );
        }
        for series in &self.series {
            let points: Vec<(f64, f64)> = thin(&series.points)
                .into_iter()
                .filter(|(x, y)| finite(x) && finite(y))
                .collect();
            if points.is_empty() {
                continue;
            }
            let path = match self.shape {
                Shape::Straight => polyline_path(points.iter().map(|&(x, y)| (x_of(x), y_of(y)))),
                Shape::Steps => {
                    let mut previous_x = 0.0;
                    let mut steps = Vec::with_capacity(points.len() * 2);
                    for &(x, y) in &points {
                        steps.push((x_of(previous_x), y_of(y)));
                        steps.push((x_of(x), y_of(y)));
                        previous_x = x;
                    }
                    polyline_path(steps.into_iter())
                }
            };
            let title = series.title.as_deref().unwrap_or(&series.label);
            let element = format!(
                r#"<path d="{path}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"><title>{}</title></path>"#,
                series.color,
                escape(title)
            );
            push_linked(&mut svg, &series.href, &element);
            if self.point_markers && points.len() <= 40 && self.shape == Shape::Straight {
                for &(x, y) in &points {
                    let _ = write!(
                        svg,
                        r#"<circle cx="{}" cy="{}" r="2.6" fill="{}"><title>{}: {} at {}</title></circle>"#,
                        Px(x_of(x)),
                        Px(y_of(y)),
                        series.color,
                        escape(&series.label),
                        format_value(y),
                        format_value(x)
                    );
                }
            }
        }
        svg.push_str("</svg>");
        svg
    }
}

/// A parallel-coordinates chart: one vertical axis per parameter and a
/// last one for the metric, one line per run, coloured by the metric
/// (dark: worst, yellow: best), the best run drawn on top in red.
#[derive(Debug, Clone)]
pub struct ParallelChart {
    pub title: String,
    pub axes: Vec<ParallelAxis>,
    pub lines: Vec<ParallelLine>,
    /// The best run's line, drawn last, in red.
    pub best: Option<usize>,
}

/// One axis: categorical (evenly spaced levels, in the ablation's level
/// order) or numeric (linear, or log for positive values over a wide range).
#[derive(Debug, Clone)]
pub struct ParallelAxis {
    pub label: String,
    pub kind: AxisKind,
}

#[derive(Debug, Clone)]
pub enum AxisKind {
    Levels(Vec<String>),
    Numeric { lo: f64, hi: f64, log: bool },
}

/// A run's position on each axis: a level index or a number.
#[derive(Debug, Clone)]
pub struct ParallelLine {
    pub values: Vec<AxisValue>,
    /// In [0, 1], 1 the best value of the metric: the line's colour.
    pub goodness: f64,
    pub title: String,
    pub href: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub enum AxisValue {
    Level(usize),
    Number(f64),
}

impl ParallelAxis {
    /// Numeric axis over these values: log when all are positive and span 20x or more.
    pub fn numeric(label: impl Into<String>, values: impl Iterator<Item = f64> + Clone) -> Self {
        let (lo, hi) = span(values.clone().filter(|v| v.is_finite())).unwrap_or((0.0, 1.0));
        let log = lo > 0.0 && hi / lo >= 20.0;
        Self {
            label: label.into(),
            kind: AxisKind::Numeric { lo, hi, log },
        }
    }

    fn fraction(&self, value: AxisValue) -> f64 {
        match (&self.kind, value) {
            (AxisKind::Levels(levels), AxisValue::Level(index)) => {
                if levels.len() <= 1 {
                    0.5
                } else {
                    index as f64 / (levels.len() - 1) as f64
                }
            }
            (AxisKind::Numeric { lo, hi, log }, AxisValue::Number(v)) => {
                let (lo, hi, v) = if *log {
                    (lo.log10(), hi.log10(), v.max(*lo).log10())
                } else {
                    (*lo, *hi, v)
                };
                if hi > lo { (v - lo) / (hi - lo) } else { 0.5 }
            }
            _ => 0.5,
        }
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        match &self.kind {
            AxisKind::Levels(levels) => levels
                .iter()
                .enumerate()
                .map(|(i, level)| (self.fraction(AxisValue::Level(i)), level.clone()))
                .collect(),
            AxisKind::Numeric { lo, hi, log } => {
                let axis = if *log {
                    Axis::log(*lo, *hi)
                } else {
                    Axis::linear(*lo, *hi, false, false)
                };
                axis.ticks
                    .into_iter()
                    .map(|(v, label)| (self.fraction(AxisValue::Number(v)), label))
                    .collect()
            }
        }
    }
}

impl ParallelChart {
    pub fn render(&self) -> String {
        let spacing = 190.0;
        let (left, right, top, bottom) = (80.0, 70.0, 62.0, 26.0);
        let width = (left + right + spacing * (self.axes.len().max(2) - 1) as f64).max(720.0);
        let height = 400.0;
        let plot = Plot {
            left,
            top,
            width: width - left - right,
            height: height - top - bottom,
        };
        let mut svg = open_svg(width as u32, height as u32, &self.title);
        text(
            &mut svg,
            width / 2.0,
            18.0,
            "middle",
            13.0,
            "600",
            &self.title,
        );
        let axis_x = |i: usize| {
            if self.axes.len() <= 1 {
                plot.left + plot.width / 2.0
            } else {
                plot.left + plot.width * i as f64 / (self.axes.len() - 1) as f64
            }
        };
        let y_of = |fraction: f64| plot.top + plot.height - fraction * plot.height;
        // Worst lines first, so the best ones stay visible.
        let mut order: Vec<usize> = (0..self.lines.len()).collect();
        order.sort_by(|&a, &b| self.lines[a].goodness.total_cmp(&self.lines[b].goodness));
        for index in order.into_iter().filter(|&i| Some(i) != self.best) {
            self.push_line(
                &mut svg,
                index,
                &axis_x,
                &y_of,
                &gradient(self.lines[index].goodness),
                1.4,
                0.75,
            );
        }
        if let Some(best) = self.best {
            self.push_line(&mut svg, best, &axis_x, &y_of, "#dc2626", 3.0, 1.0);
        }
        for (i, axis) in self.axes.iter().enumerate() {
            let x = axis_x(i);
            line(
                &mut svg,
                (x, plot.top),
                (x, plot.top + plot.height),
                AXIS,
                1.2,
                None,
            );
            text(
                &mut svg,
                x,
                plot.top - 14.0,
                "middle",
                12.0,
                "600",
                &axis.label,
            );
            for (fraction, label) in axis.ticks() {
                let y = y_of(fraction);
                line(&mut svg, (x - 3.0, y), (x + 3.0, y), AXIS, 1.0, None);
                let _ = write!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10.5" fill="{AXIS}" paint-order="stroke" stroke="#fff" stroke-width="3">{}</text>"##,
                    x - 6.0,
                    y + 3.5,
                    escape(&shorten(&label, 18))
                );
            }
        }
        svg.push_str("</svg>");
        svg
    }

    #[allow(clippy::too_many_arguments)]
    fn push_line(
        &self,
        svg: &mut String,
        index: usize,
        axis_x: &dyn Fn(usize) -> f64,
        y_of: &dyn Fn(f64) -> f64,
        color: &str,
        stroke_width: f64,
        opacity: f64,
    ) {
        let item = &self.lines[index];
        let points = item
            .values
            .iter()
            .zip(&self.axes)
            .enumerate()
            .map(|(i, (value, axis))| (axis_x(i), y_of(axis.fraction(*value))));
        let element = format!(
            r#"<path d="{}" fill="none" stroke="{color}" stroke-width="{stroke_width}" stroke-opacity="{opacity}"><title>{}</title></path>"#,
            polyline_path(points),
            escape(&item.title)
        );
        push_linked(svg, &item.href, &element);
    }
}

/// Sorted bars of one value per item (Dice per image), lowest first, with
/// the mean as a dashed line.
pub fn sorted_bars(title: &str, y_label: &str, values: &[(String, f64)]) -> String {
    let (width, height) = (640.0, 280.0);
    let plot = Plot {
        left: 52.0,
        top: 30.0,
        width: width - 52.0 - 16.0,
        height: height - 30.0 - 34.0,
    };
    let mut svg = open_svg(width as u32, height as u32, title);
    text(&mut svg, width / 2.0, 18.0, "middle", 13.0, "600", title);
    let mut sorted: Vec<&(String, f64)> = values.iter().filter(|(_, v)| v.is_finite()).collect();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
    let y_of = |v: f64| plot.top + plot.height - v.clamp(0.0, 1.0) * plot.height;
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        plot.y_tick(&mut svg, y_of(tick), &format!("{tick:.2}"));
    }
    plot.frame(&mut svg);
    text(
        &mut svg,
        plot.left + plot.width / 2.0,
        height - 8.0,
        "middle",
        11.0,
        "400",
        &format!("{} test images, sorted by {y_label}", sorted.len()),
    );
    if sorted.is_empty() {
        svg.push_str("</svg>");
        return svg;
    }
    let bar = plot.width / sorted.len() as f64;
    for (i, (label, value)) in sorted.iter().enumerate() {
        let y = y_of(*value);
        let _ = write!(
            svg,
            r##"<rect x="{:.2}" y="{:.1}" width="{:.2}" height="{:.1}" fill="#3b82f6"><title>{}: {} {}</title></rect>"##,
            plot.left + bar * i as f64,
            y,
            (bar - if bar > 3.0 { 1.0 } else { 0.0 }).max(0.5),
            plot.top + plot.height - y,
            escape(label),
            escape(y_label),
            format_value(*value)
        );
    }
    let mean = sorted.iter().map(|(_, v)| v).sum::<f64>() / sorted.len() as f64;
    let y = y_of(mean);
    line(
        &mut svg,
        (plot.left, y),
        (plot.left + plot.width, y),
        "#dc2626",
        1.2,
        Some("5 4"),
    );
    text(
        &mut svg,
        plot.left + 6.0,
        y - 5.0,
        "start",
        11.0,
        "600",
        &format!("mean {}", format_value(mean)),
    );
    svg.push_str("</svg>");
    svg
}

/// The plotting rectangle inside a chart.
struct Plot {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

impl Plot {
    /// A horizontal grid line at `y` with its label left of the plot.
    fn y_tick(&self, svg: &mut String, y: f64, label: &str) {
        line(
            svg,
            (self.left, y),
            (self.left + self.width, y),
            GRID,
            1.0,
            None,
        );
        text(svg, self.left - 6.0, y + 4.0, "end", 11.0, "400", label);
    }

    fn frame(&self, svg: &mut String) {
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="{AXIS}" stroke-width="1"/>"#,
            self.left, self.top, self.width, self.height
        );
    }
}

/// Ticks of one axis and how a value maps to [0, 1] along it.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// A linear axis; `widen` rounds the range out to whole tick steps.
    fn linear(lo: f64, hi: f64, widen: bool, integer: bool) -> Self {
        let (mut lo, mut hi) = if hi > lo {
            (lo, hi)
        } else if lo == 0.0 {
            (-1.0, 1.0)
        } else {
            (lo - lo.abs() * 0.1, hi + hi.abs() * 0.1)
        };
        let mut step = nice_step((hi - lo) / 5.0);
        if integer {
            step = step.max(1.0).round();
        }
        if widen && !integer {
            lo = (lo / step).floor() * step;
            hi = (hi / step).ceil() * step;
        }
        let mut ticks = Vec::new();
        let mut tick = (lo / step).ceil() * step;
        while tick <= hi + step * 1e-9 && ticks.len() < 50 {
            // Avoid printing -0.
            let value = if tick.abs() < step * 1e-9 { 0.0 } else { tick };
            ticks.push((value, format_tick(value, step)));
            tick += step;
        }
        Self {
            lo,
            hi,
            log: false,
            ticks,
        }
    }

    /// A log10 axis over positive values, ticks at powers of ten.
    fn log(lo: f64, hi: f64) -> Self {
        let lo_exp = lo.log10().floor();
        let hi_exp = hi.log10().ceil().max(lo_exp + 1.0);
        let ticks = (lo_exp as i32..=hi_exp as i32)
            .map(|e| (10f64.powi(e), format_value(10f64.powi(e))))
            .collect();
        Self {
            lo: 10f64.powf(lo_exp),
            hi: 10f64.powf(hi_exp),
            log: true,
            ticks,
        }
    }

    fn fraction(&self, value: f64) -> f64 {
        if self.log {
            (value.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (value - self.lo) / (self.hi - self.lo)
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

/// A tick label with as many decimals as the step needs.
fn format_tick(value: f64, step: f64) -> String {
    if value != 0.0 && (value.abs() >= 1e6 || step < 1e-4) {
        return format!("{value:.1e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{value:.decimals$}")
}

/// A value for hover text: four significant decimals, or scientific.
pub fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 || (1e-3..1e6).contains(&magnitude) {
        // Rounded, then the shortest text: fixed-precision formatting is far slower.
        format!("{}", (value * 1e4).round() / 1e4)
    } else {
        format!("{value:.3e}")
    }
}

/// A pixel coordinate with one decimal, formatted through integers (the
/// fixed-precision float formatter dominated the time of large reports).
#[derive(Clone, Copy)]
struct Px(f64);

impl std::fmt::Display for Px {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenths = (self.0 * 10.0).round() as i64;
        let sign = if tenths < 0 { "-" } else { "" };
        let tenths = tenths.unsigned_abs();
        write!(f, "{sign}{}.{}", tenths / 10, tenths % 10)
    }
}

/// `[lo, hi]` of the values, `None` when there are none.
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    (lo <= hi).then_some((lo, hi))
}

/// At most [`MAX_POINTS`], evenly spaced, first and last kept.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let stride = points.len() as f64 / (MAX_POINTS - 1) as f64;
    let mut kept: Vec<(f64, f64)> = (0..MAX_POINTS - 1)
        .map(|i| points[(i as f64 * stride) as usize])
        .collect();
    kept.push(points[points.len() - 1]);
    kept
}

/// Viridis-like colour of a goodness in [0, 1].
fn gradient(goodness: f64) -> String {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if goodness.is_finite() {
        goodness.clamp(0.0, 1.0)
    } else {
        0.0
    } * (STOPS.len() - 1) as f64;
    let index = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - index as f64;
    let (a, b) = (STOPS[index], STOPS[index + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(a.0, b.0),
        mix(a.1, b.1),
        mix(a.2, b.2)
    )
}

/// The CSS-free opening of an accessible inline chart.
fn open_svg(width: u32, height: u32, title: &str) -> String {
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{}" font-family="system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"><rect width="{width}" height="{height}" fill="#fff"/>"##,
        escape(title)
    )
}

fn text(svg: &mut String, x: f64, y: f64, anchor: &str, size: f64, weight: &str, content: &str) {
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="{anchor}" font-size="{size}" font-weight="{weight}" fill="{AXIS}">{}</text>"#,
        Px(x),
        Px(y),
        escape(content)
    );
}

fn line(
    svg: &mut String,
    from: (f64, f64),
    to: (f64, f64),
    color: &str,
    width: f64,
    dash: Option<&str>,
) {
    let dash = dash.map_or(String::new(), |d| format!(r#" stroke-dasharray="{d}""#));
    let _ = write!(
        svg,
        r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="{width}"{dash}/>"#,
        Px(from.0),
        Px(from.1),
        Px(to.0),
        Px(to.1)
    );
}

fn polyline_path(points: impl Iterator<Item = (f64, f64)>) -> String {
    let mut path = String::new();
    for (i, (x, y)) in points.enumerate() {
        let _ = write!(
            path,
            "{}{} {}",
            if i == 0 { "M" } else { " L" },
            Px(x),
            Px(y)
        );
    }
    path
}

fn push_linked(svg: &mut String, href: &Option<String>, element: &str) {
    match href {
        Some(href) => {
            let _ = write!(svg, r#"<a href="{}">{element}</a>"#, escape(href));
        }
        None => svg.push_str(element),
    }
}

fn shorten(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        label.to_string()
    } else {
        let head: String = label.chars().take(max - 1).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_or_five() {
        assert_eq!(nice_step(0.13), 0.2);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.0007), 0.001);
        assert_eq!(format_tick(0.25, 0.05), "0.25");
        assert_eq!(format_tick(3.0, 1.0), "3");
    }

    #[test]
    fn line_chart_draws_every_series_and_the_marker() {
        let mut chart = LineChart::new("Loss", "epoch", "loss");
        chart.integer_x = true;
        chart.marker = Some(Marker {
            x: 2.0,
            label: "kept epoch 2".into(),
        });
        for (i, name) in ["train/loss", "val/loss"].into_iter().enumerate() {
            chart.series.push(Series {
                label: name.into(),
                color: color(i),
                points: (1..=4)
                    .map(|e| (e as f64, 1.0 / e as f64 + i as f64))
                    .collect(),
                title: None,
                href: None,
            });
        }
        let svg = chart.render();
        assert_eq!(svg.matches("<path ").count(), 2, "{svg}");
        assert_eq!(svg.matches("<circle ").count(), 8);
        assert!(svg.contains("kept epoch 2") && svg.contains("val/loss"));
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>"));
    }

    #[test]
    fn empty_chart_says_so() {
        let chart = LineChart::new("Empty", "x", "y");
        assert!(chart.render().contains("no finite values recorded"));
    }

    #[test]
    fn long_curves_are_thinned_keeping_the_ends() {
        let points: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, i as f64)).collect();
        let kept = thin(&points);
        assert_eq!(kept.len(), MAX_POINTS);
        assert_eq!(kept[0], (0.0, 0.0));
        assert_eq!(kept[MAX_POINTS - 1], (9_999.0, 9_999.0));
    }

    #[test]
    fn pixels_and_values_format_like_fixed_precision() {
        for (value, text) in [
            (12.34, "12.3"),
            (-0.04, "0.0"),
            (-0.06, "-0.1"),
            (0.0, "0.0"),
            (99.96, "100.0"),
        ] {
            assert_eq!(Px(value).to_string(), text, "{value}");
        }
        assert_eq!(format_value(0.123456), "0.1235");
        assert_eq!(format_value(2.0), "2");
        assert_eq!(format_value(1.5e-5), "1.500e-5");
    }

    #[test]
    fn gradient_runs_from_purple_to_yellow() {
        assert_eq!(gradient(0.0), "#440154");
        assert_eq!(gradient(1.0), "#fde725");
    }
}
