//! `runs/RUN/index.html`: everything about one run.

use std::fmt::Write;

use super::html::{escape, note, status_badge, url_path};
use super::model::is_headline;
use super::pages::{Context, chart_box, curve_groups, duration_text, metric_cell, param_text};
use super::svg::{self, LineChart, Marker, Reference, Series, Shape};
use super::{FILES_DIR, FileState, RunFolder};
use crate::experiments::run_files::{ImageDice, ScoreCurves};
use crate::experiments::table::format_number;
use crate::experiments::{RunSnapshot, RunStatus};

/// Image files shown as pictures (heat maps, overlays) when not under plots/.
const PICTURES: [&str; 4] = [".png", ".jpg", ".jpeg", ".webp"];

/// Most pictures a run page shows; the artifacts table lists them all.
const MAX_PICTURES: usize = 24;

/// Worst images listed under the Dice chart.
const WORST_IMAGES: usize = 10;

pub fn render(ctx: &Context<'_>, index: usize) -> String {
    let run = ctx.run(index);
    let folder = &ctx.folders[index];
    let record = &run.detail.run;
    let footer = ctx.footer();
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<h1>Run {} {}</h1><p class=\"sub\">experiment {} · dataset {} · started {} · {} · \
         <a href=\"../../index.html\">all runs</a></p>",
        escape(&record.id),
        status_badge(record.status.as_str()),
        ctx.experiment_link(&record.experiment, 2),
        escape(&record.dataset),
        escape(&record.started()),
        escape(&duration_text(record)),
    );
    match record.status {
        RunStatus::Running => body.push_str(&note(
            "info",
            &format!(
                "Still <strong>RUNNING</strong> on {} (pid {}): the curves show the steps logged so far; \
                 summary metrics and most files appear when it finishes.",
                escape(&record.host),
                record.pid
            ),
        )),
        RunStatus::Failed | RunStatus::Killed => body.push_str(&note(
            "warn",
            &format!(
                "This run ended <strong>{}</strong>: it has the steps it logged before that, \
                 and no summary metrics unless it recorded some.",
                record.status
            ),
        )),
        RunStatus::Finished => {}
    }
    if !folder.warnings.is_empty() {
        let items: String = folder
            .warnings
            .iter()
            .map(|w| format!("<li>{}</li>", escape(w)))
            .collect();
        body.push_str(&note(
            "warn",
            &format!(
                "<strong>Missing or unreadable files</strong><ul class=\"plain\">{items}</ul>"
            ),
        ));
    }

    // Headline cards: the experiment's metrics in its order.
    let experiment = ctx
        .model
        .experiments
        .iter()
        .find(|e| e.name == record.experiment);
    let card_metrics: Vec<&String> = experiment
        .map(|e| e.metrics.iter().collect())
        .unwrap_or_default();
    let cards: Vec<&&String> = card_metrics
        .iter()
        .filter(|m| run.detail.summary.contains_key(m.as_str()))
        .take(6)
        .collect();
    if !cards.is_empty() {
        body.push_str("<div class=\"cards\">");
        for metric in cards {
            let best = experiment.and_then(|e| e.best.get(metric.as_str())) == Some(&index);
            let _ = write!(
                body,
                "<div class=\"card\"><div class=\"label\">{}{}</div><div class=\"value\">{}</div></div>",
                escape(metric),
                if best { " ★ best" } else { "" },
                format_number(run.detail.summary[metric.as_str()])
            );
        }
        body.push_str("</div>\n");
    }

    body.push_str("<div class=\"charts\">");
    body.push_str(&fields_panel(run));
    body.push_str(&params_panel(run));
    body.push_str("</div>\n");

    body.push_str(&summary_section(ctx, index));
    body.push_str(&curves_section(run));
    if let Some((names, matrix)) = &folder.parsed.confusion {
        body.push_str(&confusion_section(run, names, matrix));
    }
    if let Some(curves) = &folder.parsed.curves {
        body.push_str(&score_curves_section(curves));
    }
    if let Some(dice) = &folder.parsed.dice {
        let paths = ctx.datasets.get(&record.dataset);
        body.push_str(&dice_section(dice, paths.map(Vec::as_slice)));
    }
    body.push_str(&pictures_section(folder));
    if let Some(card) = &folder.parsed.model_card {
        body.push_str("<h2>Model card</h2>\n<div class=\"panel\">");
        body.push_str(&json_html(card, 0));
        body.push_str("</div>\n");
    }
    body.push_str(&artifacts_section(folder));
    ctx.page(&format!("Run {}", record.id), 2, &footer)
        .render(&body)
}

fn kv_row(key: &str, value_html: &str) -> String {
    format!("<tr><th>{}</th><td>{value_html}</td></tr>", escape(key))
}

fn fields_panel(run: &RunSnapshot) -> String {
    let record = &run.detail.run;
    let mut html = String::from("<div class=\"panel\"><h3>Run</h3><table class=\"kv\">");
    let ended = record.end_ms.map_or("-".to_string(), |ms| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
        )
        .to_string()
    });
    for (key, value) in [
        ("id", record.id.clone()),
        ("experiment", record.experiment.clone()),
        ("status", record.status.to_string()),
        ("started", record.started()),
        ("ended", ended),
        ("duration", duration_text(record)),
        ("dataset", record.dataset.clone()),
        ("encoder fingerprint", record.encoder_fingerprint.clone()),
        ("config hash", record.config_hash.clone()),
        (
            "git revision",
            record.git_revision.clone().unwrap_or_else(|| "-".into()),
        ),
        ("host", format!("{} (pid {})", record.host, record.pid)),
    ] {
        html.push_str(&kv_row(key, &format!("<code>{}</code>", escape(&value))));
    }
    html.push_str("</table></div>");
    html
}

fn params_panel(run: &RunSnapshot) -> String {
    let mut html = String::from("<div class=\"panel\"><h3>Parameters</h3><table class=\"kv\">");
    if run.detail.params.is_empty() {
        html.push_str("<tr><td>none recorded</td></tr>");
    }
    for (key, value) in &run.detail.params {
        html.push_str(&kv_row(
            key,
            &format!("<code>{}</code>", escape(&param_text(Some(value)))),
        ));
    }
    html.push_str("</table>");
    if !run.detail.tags.is_empty() {
        html.push_str("<h3>Tags</h3><table class=\"kv\">");
        for (key, value) in &run.detail.tags {
            html.push_str(&kv_row(key, &format!("<code>{}</code>", escape(value))));
        }
        html.push_str("</table>");
    }
    html.push_str("</div>");
    html
}

fn summary_section(ctx: &Context<'_>, index: usize) -> String {
    let run = ctx.run(index);
    let mut html = String::from("<h2>Summary metrics</h2>\n");
    if run.detail.summary.is_empty() {
        html.push_str(&note("info", "No summary metrics recorded."));
        return html;
    }
    let experiment = ctx
        .model
        .experiments
        .iter()
        .find(|e| e.name == run.detail.run.experiment);
    let ordered: Vec<&String> = ctx
        .model
        .metrics
        .iter()
        .filter(|m| run.detail.summary.contains_key(m.as_str()))
        .collect();
    let (headline, per_class): (Vec<&String>, Vec<&String>) =
        ordered.into_iter().partition(|m| is_headline(m));
    let table = |metrics: &[&String]| {
        let mut html = String::from(
            "<table class=\"data\"><thead><tr><th>metric</th><th class=\"num\">value</th></tr></thead><tbody>",
        );
        for metric in metrics {
            let best = experiment.and_then(|e| e.best.get(metric.as_str())) == Some(&index);
            let _ = write!(
                html,
                "<tr><td>{}</td>{}</tr>",
                escape(metric),
                metric_cell(run.detail.summary.get(metric.as_str()).copied(), best)
            );
        }
        html.push_str("</tbody></table>");
        html
    };
    html.push_str("<p class=\"sub\">★: the best finished run of its experiment for that metric.</p><div class=\"charts\"><div>");
    html.push_str(&table(&headline));
    html.push_str("</div>");
    if !per_class.is_empty() {
        html.push_str("<div>");
        html.push_str(&table(&per_class));
        html.push_str("</div>");
    }
    html.push_str("</div>\n");
    html
}

/// Learning curves from the per-step metrics: losses, validation metrics,
/// the rest; per-class curves folded.
fn curves_section(run: &RunSnapshot) -> String {
    let mut html = String::from("<h2>Learning curves</h2>\n");
    if run.history.is_empty() {
        html.push_str(&note("info", "No per-step metrics logged."));
        return html;
    }
    let marker = run.detail.summary.get("best_epoch").map(|&epoch| Marker {
        x: epoch,
        label: format!("kept epoch {epoch}"),
    });
    // One step (an anomaly fit) is a value, not a curve.
    if run.history.values().all(|points| points.len() <= 1) {
        let values: Vec<String> = run
            .history
            .iter()
            .filter_map(|(key, points)| {
                let point = points.first()?;
                Some(format!(
                    "{key} = {} (step {})",
                    format_number(point.value),
                    point.step
                ))
            })
            .collect();
        let _ = writeln!(
            html,
            "<p class=\"sub\">One step logged: <code>{}</code>.</p>",
            escape(&values.join(", "))
        );
        return html;
    }
    let groups = curve_groups(run.history.keys());
    let mut constant = Vec::new();
    html.push_str("<div class=\"charts\">");
    for (title, keys) in &groups.headline {
        if keys.len() == 1
            && let Some(value) = constant_value(run, &keys[0])
        {
            constant.push(format!("{} = {}", keys[0], format_number(value)));
            continue;
        }
        html.push_str(&history_chart(run, title, keys, marker.clone(), |key| {
            key.to_string()
        }));
    }
    html.push_str("</div>\n");
    if !constant.is_empty() {
        let _ = writeln!(
            html,
            "<p class=\"sub\">The same at every step: <code>{}</code>.</p>",
            escape(&constant.join(", "))
        );
    }
    if !groups.per_class.is_empty() {
        html.push_str("<details><summary>Per-class curves</summary><div class=\"charts\">");
        for (family, keys) in &groups.per_class {
            let prefix = format!("{family}/");
            html.push_str(&history_chart(run, family, keys, marker.clone(), |key| {
                key.strip_prefix(&prefix).unwrap_or(key).to_string()
            }));
        }
        html.push_str("</div></details>\n");
    }
    html
}

fn constant_value(run: &RunSnapshot, key: &str) -> Option<f64> {
    let points = run.history.get(key)?;
    let first = points.first()?.value;
    points.iter().all(|p| p.value == first).then_some(first)
}

fn history_chart(
    run: &RunSnapshot,
    title: &str,
    keys: &[String],
    marker: Option<Marker>,
    label: impl Fn(&str) -> String,
) -> String {
    let y_label = if keys.len() == 1 {
        keys[0].as_str()
    } else {
        title
    };
    let mut chart = LineChart::new(title, "epoch", y_label);
    chart.integer_x = true;
    chart.marker = marker;
    // Dots with hover values on the headline charts; per-class ones stay light.
    chart.point_markers = keys.len() <= 3;
    // The learning rate spans decades under decay schedules.
    chart.log_y = keys.len() == 1 && keys[0].ends_with("learning_rate");
    let mut legend = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        let Some(points) = run.history.get(key) else {
            continue;
        };
        let name = label(key);
        chart.series.push(Series {
            label: name.clone(),
            color: svg::color(n),
            points: points.iter().map(|p| (p.step as f64, p.value)).collect(),
            title: None,
            href: None,
        });
        legend.push((name, svg::color(n)));
    }
    if legend.len() == 1 {
        legend.clear();
    }
    chart_box(&chart.render(), &legend)
}

/// The test confusion matrix, shaded by the share of each true class, with
/// the per-class precision, recall and F1 the run recorded.
fn confusion_section(run: &RunSnapshot, names: &[String], matrix: &[Vec<u64>]) -> String {
    let mut html = String::from(
        "<h2>Confusion matrix</h2>\n<p class=\"sub\">Test split; rows: true class, columns: predicted class; \
         shade: share of the true class. Precision, recall and F1 as the run recorded them.</p>\n\
         <div class=\"panel\"><table class=\"confusion\"><thead><tr><th>true \\ predicted</th>",
    );
    for name in names {
        let _ = write!(html, "<th>{}</th>", escape(name));
    }
    html.push_str("<th>n</th><th>precision</th><th>recall</th><th>F1</th></tr></thead><tbody>");
    for (truth, row) in matrix.iter().enumerate() {
        let total: u64 = row.iter().sum();
        let name = &names[truth];
        let _ = write!(html, "<tr><th>{}</th>", escape(name));
        for &count in row {
            let share = if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            };
            // White to dark blue (30, 58, 138) by the share.
            let shade = |full: f64| (255.0 - share * (255.0 - full)).round() as u8;
            let ink = if share > 0.5 { "#fff" } else { "#111827" };
            let _ = write!(
                html,
                "<td style=\"background:rgb({},{},{});color:{ink}\" title=\"{:.1}% of {}\">{count}</td>",
                shade(30.0),
                shade(58.0),
                shade(138.0),
                share * 100.0,
                escape(name)
            );
        }
        let metric = |what: &str| {
            run.detail
                .summary
                .get(&format!("test/{what}/{name}"))
                .map_or("-".to_string(), |v| format_number(*v))
        };
        let _ = write!(
            html,
            "<td>{total}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            metric("precision"),
            metric("recall"),
            metric("f1")
        );
    }
    html.push_str("</tbody></table></div>\n");
    html
}

/// ROC and precision-recall curves per split.
fn score_curves_section(curves: &ScoreCurves) -> String {
    let mut html = format!(
        "<h2>ROC and precision-recall</h2>\n<p class=\"sub\">Positive: <code>{}</code>.</p>\n<div class=\"charts\">",
        escape(&curves.positive)
    );
    // Both axes are rates: 0 to 1, square-ish.
    let unit_chart = |title: String, x_label: &str, y_label: &str| {
        let mut chart = LineChart::new(title, x_label, y_label);
        (chart.width, chart.height) = (420, 380);
        chart.x_range = Some((0.0, 1.0));
        chart.y_range = Some((0.0, 1.0));
        chart
    };
    let mut roc = unit_chart(
        format!("ROC ({} positive)", curves.positive),
        "false positive rate",
        "true positive rate",
    );
    roc.references.push(Reference {
        from: (0.0, 0.0),
        to: (1.0, 1.0),
        label: "chance".to_string(),
    });
    let mut pr = unit_chart(
        format!("Precision-recall ({} positive)", curves.positive),
        "recall",
        "precision",
    );
    pr.shape = Shape::Steps;
    let mut roc_legend = Vec::new();
    let mut pr_legend = Vec::new();
    for (n, split) in curves.splits.iter().enumerate() {
        let color = svg::color(n);
        let counts = format!("{} positive, {} negative", split.positives, split.negatives);
        if !split.roc.is_empty() {
            let label = format!(
                "{}: AUC {} ({counts})",
                split.split,
                split.roc_auc.map_or("-".into(), format_number)
            );
            roc.series.push(Series {
                label: label.clone(),
                color,
                points: split.roc.iter().map(|p| (p[0], p[1])).collect(),
                title: None,
                href: None,
            });
            roc_legend.push((label, color));
        }
        if !split.precision_recall.is_empty() {
            let label = format!(
                "{}: AP {} ({counts})",
                split.split,
                split.average_precision.map_or("-".into(), format_number)
            );
            pr.series.push(Series {
                label: label.clone(),
                color,
                points: split
                    .precision_recall
                    .iter()
                    .map(|p| (p[0], p[1]))
                    .collect(),
                title: None,
                href: None,
            });
            pr_legend.push((label, color));
            let total = split.positives + split.negatives;
            if n == 0 && total > 0 {
                let prevalence = split.positives as f64 / total as f64;
                pr.references.push(Reference {
                    from: (0.0, prevalence),
                    to: (1.0, prevalence),
                    label: format!("{} prevalence", split.split),
                });
            }
        }
    }
    if roc.series.is_empty() && pr.series.is_empty() {
        return format!(
            "<h2>ROC and precision-recall</h2>\n{}",
            note(
                "info",
                "No split had both positives and negatives: no curves to draw."
            )
        );
    }
    html.push_str(&chart_box(&roc.render(), &roc_legend));
    html.push_str(&chart_box(&pr.render(), &pr_legend));
    html.push_str("</div>\n");
    html
}

/// Dice per test image, sorted, and the worst images.
fn dice_section(images: &[ImageDice], paths: Option<&[std::path::PathBuf]>) -> String {
    let mut html = String::from("<h2>Dice per test image</h2>\n");
    if images.is_empty() {
        html.push_str(&note("info", "The run scored no test image."));
        return html;
    }
    let name = |image: &ImageDice| {
        paths.and_then(|p| p.get(image.image_index)).map_or_else(
            || format!("image {}", image.image_index),
            |path| path.display().to_string(),
        )
    };
    let values: Vec<(String, f64)> = images.iter().map(|i| (name(i), i.dice)).collect();
    html.push_str("<div class=\"charts\">");
    html.push_str(&chart_box(
        &svg::sorted_bars("Dice per test image", "Dice", &values),
        &[],
    ));
    let mut worst: Vec<&ImageDice> = images.iter().collect();
    worst.sort_by(|a, b| a.dice.total_cmp(&b.dice));
    html.push_str(
        "<div><h3>Lowest Dice</h3><table class=\"data\"><thead><tr><th>image</th><th class=\"num\">tiles</th>\
         <th class=\"num\">Dice</th><th class=\"num\">IoU</th></tr></thead><tbody>",
    );
    for image in worst.into_iter().take(WORST_IMAGES) {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"num\">{}</td>{}{}</tr>",
            escape(&name(image)),
            image.tiles,
            metric_cell(Some(image.dice), false),
            metric_cell(Some(image.iou), false)
        );
    }
    html.push_str("</tbody></table></div></div>\n");
    html
}

/// Pictures the run wrote besides its plots (heat maps, overlays).
fn pictures_section(folder: &RunFolder) -> String {
    let pictures: Vec<&super::RunFile> = folder
        .files
        .iter()
        .filter(|f| f.state == FileState::Copied && !f.path.starts_with("plots/"))
        .filter(|f| {
            let lower = f.path.to_ascii_lowercase();
            PICTURES.iter().any(|ext| lower.ends_with(ext))
        })
        .collect();
    if pictures.is_empty() {
        return String::new();
    }
    let mut html = format!(
        "<h2>Images</h2>\n<p class=\"sub\">{} image{} the run wrote{}.</p><div class=\"gallery\">",
        pictures.len(),
        if pictures.len() == 1 { "" } else { "s" },
        if pictures.len() > MAX_PICTURES {
            format!(" (the first {MAX_PICTURES} shown; all are under Files)")
        } else {
            String::new()
        }
    );
    for picture in pictures.into_iter().take(MAX_PICTURES) {
        let href = format!("{FILES_DIR}/{}", url_path(&picture.path));
        let _ = write!(
            html,
            "<figure><a href=\"{href}\"><img src=\"{href}\" alt=\"{0}\" loading=\"lazy\"></a><figcaption>{0}</figcaption></figure>",
            escape(&picture.path)
        );
    }
    html.push_str("</div>\n");
    html
}

fn artifacts_section(folder: &RunFolder) -> String {
    let mut html = String::from("<h2>Files</h2>\n");
    if !folder.exists {
        html.push_str(&note(
            "warn",
            &format!(
                "The run folder {} is missing: no files to show.",
                escape(&folder.dir.display().to_string())
            ),
        ));
        return html;
    }
    let _ = write!(
        html,
        "<p class=\"sub\">From <code>{}</code>: text files are shown below, pictures copied \
         into this report.</p>\n<table class=\"data\"><thead><tr><th>file</th>\
         <th class=\"num\">bytes</th><th>in this report</th></tr></thead><tbody>",
        escape(&folder.dir.display().to_string())
    );
    let mut shown = String::new();
    let checkpoints: Vec<&super::RunFile> = folder
        .files
        .iter()
        .filter(|f| f.state == FileState::Checkpoint)
        .collect();
    for file in folder
        .files
        .iter()
        .filter(|f| f.state != FileState::Checkpoint)
    {
        let (name, state) = match file.state {
            FileState::Copied => (
                format!(
                    "<a href=\"{FILES_DIR}/{}\">{}</a>",
                    url_path(&file.path),
                    escape(&file.path)
                ),
                "copied".to_string(),
            ),
            FileState::Embedded => match folder.read(&file.path) {
                Some(Ok(bytes)) => {
                    let id = file_anchor(&file.path);
                    let _ = writeln!(
                        shown,
                        "<details id=\"{id}\"><summary>{} <span class=\"sub\">({} bytes)</span></summary>\
                         <pre class=\"file\">{}</pre></details>",
                        escape(&file.path),
                        file.bytes,
                        escape(&String::from_utf8_lossy(&bytes))
                    );
                    (
                        format!("<a href=\"#{id}\">{}</a>", escape(&file.path)),
                        file.state.reason().to_string(),
                    )
                }
                _ => (
                    escape(&file.path),
                    "unreadable (see the warnings above)".to_string(),
                ),
            },
            state => (escape(&file.path), state.reason().to_string()),
        };
        let _ = write!(
            html,
            "<tr><td>{name}</td><td class=\"num\">{}</td><td>{state}</td></tr>",
            file.bytes
        );
    }
    if !checkpoints.is_empty() {
        let bytes: u64 = checkpoints.iter().map(|f| f.bytes).sum();
        let _ = write!(
            html,
            "<tr><td>checkpoints/ ({} files)</td><td class=\"num\">{bytes}</td><td>{}</td></tr>",
            checkpoints.len(),
            FileState::Checkpoint.reason()
        );
    }
    for missing in &folder.missing {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"num\">-</td><td><span class=\"warn-icon\">⚠</span> recorded, missing from the folder</td></tr>",
            escape(missing)
        );
    }
    html.push_str("</tbody></table>\n");
    html.push_str(&shown);
    html
}

/// The id of a shown file's block: `file-` and the path, other characters as `-`.
fn file_anchor(path: &str) -> String {
    let safe: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("file-{safe}")
}

/// A JSON value as nested key-value tables.
fn json_html(value: &serde_json::Value, depth: usize) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) if depth < 4 => {
            let mut html = String::from("<table class=\"kv\">");
            for (key, value) in map {
                html.push_str(&kv_row(key, &json_html(value, depth + 1)));
            }
            html.push_str("</table>");
            html
        }
        Value::Array(items) if items.iter().all(|v| !v.is_object() && !v.is_array()) => {
            let shown: Vec<String> = items.iter().take(50).map(scalar_text).collect();
            let more = if items.len() > 50 {
                format!(", … ({} in all)", items.len())
            } else {
                String::new()
            };
            format!("{}{more}", escape(&shown.join(", ")))
        }
        Value::Array(_) | Value::Object(_) => {
            format!("<code>{}</code>", escape(&value.to_string()))
        }
        scalar => escape(&scalar_text(scalar)),
    }
}

fn scalar_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Number(number) => number
            .as_f64()
            .filter(|v| v.fract() != 0.0)
            .map_or_else(|| number.to_string(), format_number),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}
