//! The index, experiment and comparison pages, and the pieces run pages share.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use super::html::{Page, escape, note, status_badge};
use super::model::{ComparisonModel, ExperimentModel, Model, ablation, is_headline, is_score};
use super::svg::{self, LineChart, ParallelAxis, ParallelChart, ParallelLine, Series};
use super::{RunFolder, Selection};
use crate::experiments::query::comparison_from;
use crate::experiments::table::format_number;
use crate::experiments::{
    AblationReport, Cell, Direction, ParamValue, RunSnapshot, RunStatus, Snapshot, Table,
    direction_of,
};

/// Everything a page may need.
pub struct Context<'a> {
    pub model: &'a Model,
    pub snapshot: &'a Snapshot,
    pub folders: &'a [RunFolder],
    /// Image paths by manifest index, per dataset name.
    pub datasets: &'a HashMap<String, Vec<PathBuf>>,
    pub selection: &'a Selection,
    pub database: Option<PathBuf>,
    pub root: PathBuf,
    pub written_at: String,
}

impl Context<'_> {
    pub fn run(&self, index: usize) -> &RunSnapshot {
        &self.snapshot.runs[index]
    }

    /// What the report covers, in words.
    pub fn selection_text(&self) -> String {
        let mut parts = Vec::new();
        if !self.selection.experiments.is_empty() {
            parts.push(format!(
                "experiment {}",
                self.selection.experiments.join(" or ")
            ));
        }
        for clause in &self.selection.wheres {
            parts.push(format!("{}={}", clause.key, clause.value));
        }
        if parts.is_empty() {
            "all runs".to_string()
        } else {
            parts.join(", ")
        }
    }

    pub fn page<'p>(&'p self, title: &'p str, depth: usize, footer: &'p str) -> Page<'p> {
        Page {
            title,
            depth,
            footer,
            script: true,
        }
    }

    pub fn footer(&self) -> String {
        format!(
            "Written by lazarus {} at {} from {} · {}",
            crate::VERSION,
            self.written_at,
            self.database.as_ref().map_or_else(
                || self.root.display().to_string(),
                |p| p.display().to_string()
            ),
            self.selection_text()
        )
    }

    /// A link to a run's page from a page `depth` folders down, flagged when
    /// the run's folder lacks something.
    pub fn run_link(&self, index: usize, depth: usize) -> String {
        let id = &self.run(index).detail.run.id;
        let warning = if self.folders[index].warnings.is_empty() {
            String::new()
        } else {
            format!(
                " <span class=\"warn-icon\" title=\"{}\">⚠</span>",
                escape(&self.folders[index].warnings.join("; "))
            )
        };
        format!(
            "<a href=\"{}runs/{id}/index.html\">{id}</a>{warning}",
            "../".repeat(depth)
        )
    }

    pub fn experiment_link(&self, name: &str, depth: usize) -> String {
        match self.model.experiments.iter().find(|e| e.name == name) {
            Some(experiment) => format!(
                "<a href=\"{}experiments/{}.html\">{}</a>",
                "../".repeat(depth),
                experiment.slug,
                escape(name)
            ),
            None => escape(name),
        }
    }
}

pub fn param_text(value: Option<&ParamValue>) -> String {
    value.map_or_else(|| "-".to_string(), ParamValue::to_string)
}

/// A metric cell: shown as the terminal tables show it, full precision on hover and for sorting.
pub fn metric_cell(value: Option<f64>, best: bool) -> String {
    match value {
        Some(v) => format!(
            "<td class=\"num{}\" data-v=\"{v}\" title=\"{v}\">{}</td>",
            if best { " best" } else { "" },
            format_number(v)
        ),
        None => "<td class=\"num\" data-v=\"\">-</td>".to_string(),
    }
}

pub fn duration_text(run: &crate::experiments::RunRecord) -> String {
    match run.end_ms {
        Some(end) => humantime::format_duration(Duration::from_secs(
            ((end - run.start_ms).max(0) / 1000) as u64,
        ))
        .to_string(),
        None => "running".to_string(),
    }
}

fn short(text: &str) -> String {
    text.chars().take(12).collect()
}

/// A query report's table (what the terminal prints), as HTML; `extra`
/// gives added classes per (row, column).
pub fn table_html(
    table: &Table,
    extra: &dyn Fn(usize, usize) -> &'static str,
    header_html: Option<&[String]>,
) -> String {
    let numeric: Vec<bool> = (0..table.headers.len())
        .map(|c| {
            !table.rows.is_empty()
                && table.rows.iter().all(|row| {
                    row[c].is_numeric() || matches!(row[c], Cell::Missing | Cell::Difference(_))
                })
        })
        .collect();
    let mut html = String::from("<table class=\"data\"><thead><tr>");
    for (c, header) in table.headers.iter().enumerate() {
        let content = header_html
            .and_then(|h| h.get(c).cloned())
            .unwrap_or_else(|| escape(header));
        let _ = write!(
            html,
            "<th{}>{content}</th>",
            if numeric[c] { " class=\"num\"" } else { "" }
        );
    }
    html.push_str("</tr></thead><tbody>");
    for (r, row) in table.rows.iter().enumerate() {
        html.push_str("<tr>");
        for (c, cell) in row.iter().enumerate() {
            let mut classes: Vec<&str> = Vec::new();
            if numeric[c] {
                classes.push("num");
            }
            let added = extra(r, c);
            if !added.is_empty() {
                classes.push(added);
            }
            let class = if classes.is_empty() {
                String::new()
            } else {
                format!(" class=\"{}\"", classes.join(" "))
            };
            let full = match cell {
                Cell::Number(v) | Cell::PlusMinus(v) | Cell::Difference(v) => {
                    format!(" data-v=\"{v}\" title=\"{v}\"")
                }
                _ => String::new(),
            };
            let _ = write!(html, "<td{class}{full}>{}</td>", escape(&cell.for_text()));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>\n");
    html
}

/// A chart with its legend below.
pub fn chart_box(svg: &str, legend: &[(String, &str)]) -> String {
    let mut html = String::from("<div class=\"chart-box\">");
    html.push_str(svg);
    if !legend.is_empty() {
        html.push_str("<div class=\"legend\">");
        for (label, color) in legend {
            let _ = write!(
                html,
                "<span><span class=\"swatch\" style=\"background:{color}\"></span>{}</span>",
                escape(label)
            );
        }
        html.push_str("</div>");
    }
    html.push_str("</div>\n");
    html
}

/// The sortable, filterable runs table.
pub struct RunsTable<'a> {
    pub id: &'a str,
    pub members: &'a [usize],
    pub params: &'a [String],
    pub metrics: &'a [String],
    pub best: &'a BTreeMap<String, usize>,
    pub depth: usize,
}

pub fn runs_table(ctx: &Context<'_>, table: &RunsTable<'_>) -> String {
    let mut html = String::new();
    let _ = writeln!(
        html,
        "<div class=\"toolbar\" data-filter-for=\"{id}\"><input type=\"search\" \
         placeholder=\"Filter: words, or key=value such as head=mlp\" aria-label=\"Filter runs\">\
         <select aria-label=\"Status\"><option value=\"\">any status</option>\
         <option>FINISHED</option><option>RUNNING</option><option>FAILED</option><option>KILLED</option>\
         </select><span class=\"count\"></span></div>",
        id = table.id
    );
    let _ = write!(
        html,
        "<div class=\"scroll\"><table class=\"data sortable runs\" id=\"{}\"><thead><tr>",
        table.id
    );
    let fixed = [
        "run",
        "experiment",
        "status",
        "dataset",
        "encoder",
        "started",
        "duration",
    ];
    for (i, name) in fixed.iter().enumerate() {
        let _ = write!(
            html,
            "<th data-key=\"{name}\"{}>{name}</th>",
            if i == 0 { " class=\"first\"" } else { "" }
        );
    }
    for param in table.params {
        let _ = write!(html, "<th data-key=\"{0}\">{0}</th>", escape(param));
    }
    for metric in table.metrics {
        let _ = write!(
            html,
            "<th class=\"num metric\" data-key=\"{0}\" title=\"{1}\">{0}</th>",
            escape(metric),
            match direction_of(metric) {
                Direction::HigherIsBetter => "higher is better",
                Direction::LowerIsBetter => "lower is better",
            }
        );
    }
    html.push_str("</tr></thead><tbody>\n");
    for &index in table.members {
        let run = ctx.run(index);
        let record = &run.detail.run;
        let _ = write!(
            html,
            "<tr data-run=\"{}\" data-status=\"{}\"><td class=\"first\">{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td title=\"{}\"><code>{}</code></td><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td>",
            record.id,
            record.status,
            ctx.run_link(index, table.depth),
            ctx.experiment_link(&record.experiment, table.depth),
            status_badge(record.status.as_str()),
            escape(&record.dataset),
            escape(&record.encoder_fingerprint),
            escape(&short(&record.encoder_fingerprint)),
            record.start_ms,
            escape(&record.started()),
            record
                .end_ms
                .map_or(String::new(), |end| (end - record.start_ms).to_string()),
            escape(&duration_text(record)),
        );
        for param in table.params {
            let value = run.detail.params.get(param);
            match value {
                Some(ParamValue::Number(n)) => {
                    let _ = write!(
                        html,
                        "<td class=\"num\" data-v=\"{n}\">{}</td>",
                        escape(&param_text(value))
                    );
                }
                _ => {
                    let _ = write!(html, "<td>{}</td>", escape(&param_text(value)));
                }
            }
        }
        for metric in table.metrics {
            html.push_str(&metric_cell(
                run.detail.summary.get(metric).copied(),
                table.best.get(metric) == Some(&index),
            ));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody></table></div>\n");
    html
}

/// The runs table as CSV, full precision (`runs.csv`).
pub fn runs_csv(ctx: &Context<'_>) -> String {
    let model = ctx.model;
    let mut headers: Vec<String> = [
        "run",
        "experiment",
        "status",
        "started",
        "ended",
        "dataset",
        "encoder_fingerprint",
        "config_hash",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    headers.extend(model.params.iter().cloned());
    headers.extend(model.metrics.iter().cloned());
    let mut table = Table::new(headers);
    for run in &ctx.snapshot.runs {
        let record = &run.detail.run;
        let mut row = vec![
            Cell::text(&record.id),
            Cell::text(&record.experiment),
            Cell::text(record.status.as_str()),
            Cell::text(record.started()),
            record.end_ms.map_or(Cell::Missing, |ms| {
                Cell::text(
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
                    )
                    .to_string(),
                )
            }),
            Cell::text(&record.dataset),
            Cell::text(&record.encoder_fingerprint),
            Cell::text(&record.config_hash),
        ];
        for param in &model.params {
            row.push(
                run.detail
                    .params
                    .get(param)
                    .map_or(Cell::Missing, |v| Cell::text(v.to_string())),
            );
        }
        for metric in &model.metrics {
            row.push(
                run.detail
                    .summary
                    .get(metric)
                    .map_or(Cell::Missing, |v| Cell::Number(*v)),
            );
        }
        table.push(row);
    }
    table.to_csv()
}

/// "Best run per metric" rows: metric, run, value, experiment, its varying params.
fn best_table(
    ctx: &Context<'_>,
    best: &BTreeMap<String, usize>,
    metrics: &[String],
    depth: usize,
) -> String {
    let mut html = String::from(
        "<div class=\"wide\"><table class=\"data\"><thead><tr><th>metric</th><th>best</th><th class=\"num\">value</th>\
         <th>run</th><th>experiment</th><th>parameters</th></tr></thead><tbody>",
    );
    for metric in metrics {
        let Some(&index) = best.get(metric) else {
            continue;
        };
        let run = ctx.run(index);
        // The parameters that vary within the run's experiment.
        let params = ctx
            .model
            .experiments
            .iter()
            .find(|e| e.name == run.detail.run.experiment)
            .map_or(&[][..], |e| e.params.as_slice());
        let settings: Vec<String> = params
            .iter()
            .filter_map(|p| run.detail.params.get(p).map(|v| format!("{p}={v}")))
            .collect();
        let value = run.detail.summary[metric];
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td class=\"num best\" data-v=\"{value}\" title=\"{value}\">{}</td>\
             <td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            escape(metric),
            match direction_of(metric) {
                Direction::HigherIsBetter => "highest",
                Direction::LowerIsBetter => "lowest",
            },
            format_number(value),
            ctx.run_link(index, depth),
            ctx.experiment_link(&run.detail.run.experiment, depth),
            escape(&settings.join(" "))
        );
    }
    html.push_str("</tbody></table></div>\n");
    html
}

fn count_status(ctx: &Context<'_>, members: &[usize], status: RunStatus) -> usize {
    members
        .iter()
        .filter(|&&i| ctx.run(i).detail.run.status == status)
        .count()
}

fn card(label: &str, value: &str) -> String {
    format!(
        "<div class=\"card\"><div class=\"label\">{}</div><div class=\"value\">{}</div></div>",
        escape(label),
        escape(value)
    )
}

fn status_cards(ctx: &Context<'_>, members: &[usize]) -> String {
    let mut html = String::from("<div class=\"cards\">");
    html.push_str(&card("runs", &members.len().to_string()));
    for (label, status) in [
        ("finished", RunStatus::Finished),
        ("running", RunStatus::Running),
        ("failed", RunStatus::Failed),
        ("killed", RunStatus::Killed),
    ] {
        let n = count_status(ctx, members, status);
        if n > 0 || status == RunStatus::Finished {
            html.push_str(&card(label, &n.to_string()));
        }
    }
    html
}

/// `index.html`.
pub fn index(ctx: &Context<'_>) -> String {
    let model = ctx.model;
    let footer = ctx.footer();
    let mut body = String::new();
    let all: Vec<usize> = (0..ctx.snapshot.runs.len()).collect();
    let _ = writeln!(
        body,
        "<h1>Experiments</h1><p class=\"sub\">{} run{} in {} experiment{} · {}</p>",
        all.len(),
        if all.len() == 1 { "" } else { "s" },
        model.experiments.len(),
        if model.experiments.len() == 1 {
            ""
        } else {
            "s"
        },
        escape(&ctx.selection_text())
    );
    if all.is_empty() {
        body.push_str(&empty_note(ctx));
        return ctx.page("Experiments", 0, &footer).render(&body);
    }
    body.push_str(&status_cards(ctx, &all));
    if let Some(metric) = &model.primary
        && let Some(&best) = model.best.get(metric)
    {
        body.push_str(&card(
            &format!("best {metric}"),
            &format_number(ctx.run(best).detail.summary[metric]),
        ));
    }
    body.push_str("</div>\n");
    let warned: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| !ctx.folders[i].warnings.is_empty())
        .collect();
    if !warned.is_empty() {
        let mut items = String::new();
        for &i in &warned {
            let _ = write!(
                items,
                "<li>{}: {}</li>",
                ctx.run_link(i, 0),
                escape(&ctx.folders[i].warnings.join("; "))
            );
        }
        body.push_str(&note(
            "warn",
            &format!(
                "<strong>{} run{} with missing or unreadable files</strong> (their pages say what is missing; the rest is reported):<ul class=\"plain\">{items}</ul>",
                warned.len(),
                if warned.len() == 1 { "" } else { "s" }
            ),
        ));
    }
    let running = count_status(ctx, &all, RunStatus::Running);
    if running > 0 {
        body.push_str(&note(
            "info",
            &format!(
                "{running} run{} still RUNNING: shown with the metrics logged so far; \
                 best-run marks and ablations use FINISHED runs only.",
                if running == 1 { " is" } else { "s are" }
            ),
        ));
    }

    body.push_str("<h2 id=\"experiments\">Experiments</h2>\n<table class=\"data\"><thead><tr><th>experiment</th><th class=\"num\">runs</th><th class=\"num\">finished</th><th class=\"num\">running</th><th>datasets</th><th>metric</th><th class=\"num\">best</th><th>best run</th></tr></thead><tbody>");
    for experiment in &model.experiments {
        let mut datasets: Vec<&str> = experiment
            .runs
            .iter()
            .map(|&i| ctx.run(i).detail.run.dataset.as_str())
            .collect();
        datasets.sort_unstable();
        datasets.dedup();
        let (metric, best_value, best_run) = match experiment
            .primary
            .as_ref()
            .and_then(|m| experiment.best.get(m).map(|&i| (m, i)))
        {
            Some((metric, i)) => (
                escape(metric),
                format_number(ctx.run(i).detail.summary[metric]),
                ctx.run_link(i, 0),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{metric}</td><td class=\"num\">{best_value}</td><td>{best_run}</td></tr>",
            ctx.experiment_link(&experiment.name, 0),
            experiment.runs.len(),
            count_status(ctx, &experiment.runs, RunStatus::Finished),
            count_status(ctx, &experiment.runs, RunStatus::Running),
            escape(&datasets.join(", ")),
        );
    }
    body.push_str("</tbody></table>\n");

    body.push_str("<h2 id=\"comparisons\">Comparisons</h2>\n");
    if model.comparisons.is_empty() {
        body.push_str(&note(
            "info",
            "No comparison pages: an experiment needs two finished runs with a metric, or pass <code>--compare RUN,RUN</code>.",
        ));
    } else {
        body.push_str("<ul class=\"plain\">");
        for comparison in &model.comparisons {
            let _ = write!(
                body,
                "<li><a href=\"compare/{}.html\">{}</a> <span class=\"sub\">({} runs)</span></li>",
                comparison.slug,
                escape(&comparison.title),
                comparison.runs.len()
            );
        }
        body.push_str("</ul>\n");
    }

    let _ = write!(
        body,
        "<h2 id=\"runs\">Runs</h2>\n<p class=\"sub\">Click a header to sort; ★ marks the best finished run per metric. \
         Columns: every parameter that varies and every summary metric. <a href=\"runs.csv\">runs.csv</a> has the same table at full precision.</p>\n"
    );
    body.push_str(&runs_table(
        ctx,
        &RunsTable {
            id: "runs-table",
            members: &all,
            params: &model.params,
            metrics: &model.metrics,
            best: &model.best,
            depth: 0,
        },
    ));
    let headline: Vec<String> = model
        .metrics
        .iter()
        .filter(|m| is_headline(m) && is_score(m))
        .cloned()
        .collect();
    let per_class: Vec<String> = model
        .metrics
        .iter()
        .filter(|m| !is_headline(m) && is_score(m))
        .cloned()
        .collect();
    body.push_str("<h2 id=\"best\">Best run per metric</h2>\n<p class=\"sub\">Among FINISHED runs, as <code>lazarus experiments best --metric METRIC</code> ranks them (lowest first for metrics ending in <code>loss</code>).</p>\n");
    if model.best.is_empty() {
        body.push_str(&note("info", "No finished run has summary metrics yet."));
    } else {
        body.push_str(&best_table(ctx, &model.best, &headline, 0));
        if !per_class.is_empty() {
            body.push_str("<details><summary>Per-class metrics</summary>");
            body.push_str(&best_table(ctx, &model.best, &per_class, 0));
            body.push_str("</details>\n");
        }
    }

    ctx.page("Experiments", 0, &footer).render(&body)
}

fn empty_note(ctx: &Context<'_>) -> String {
    let snapshot = ctx.snapshot;
    let text = match &ctx.database {
        None => format!(
            "<strong>No runs recorded yet.</strong><br>There is no experiments database under {} \
             (<code>lazarus train</code> or <code>lazarus sweep</code> creates it).",
            escape(&ctx.root.display().to_string())
        ),
        Some(path) if snapshot.total_runs == 0 => format!(
            "<strong>No runs recorded yet.</strong><br>{} holds no runs.",
            escape(&path.display().to_string())
        ),
        Some(_) => {
            let mut text = format!(
                "<strong>No run matches the selection</strong> ({}).<br>The database holds {} run{}",
                escape(&ctx.selection_text()),
                snapshot.total_runs,
                if snapshot.total_runs == 1 { "" } else { "s" }
            );
            if !snapshot.known_experiments.is_empty() {
                let _ = write!(
                    text,
                    " in experiments: {}",
                    escape(&snapshot.known_experiments.join(", "))
                );
            }
            if !snapshot.known_params.is_empty() {
                let _ = write!(
                    text,
                    "; parameters: {}",
                    escape(&snapshot.known_params.join(", "))
                );
            }
            text.push('.');
            text
        }
    };
    note("empty", &text)
}

/// `experiments/SLUG.html`.
pub fn experiment(ctx: &Context<'_>, experiment: &ExperimentModel) -> String {
    let footer = ctx.footer();
    let runs = &ctx.snapshot.runs;
    let mut body = String::new();
    let mut datasets: Vec<&str> = experiment
        .runs
        .iter()
        .map(|&i| runs[i].detail.run.dataset.as_str())
        .collect();
    datasets.sort_unstable();
    datasets.dedup();
    let first = experiment
        .runs
        .iter()
        .map(|&i| runs[i].detail.run.start_ms)
        .min()
        .unwrap_or(0);
    let last = experiment
        .runs
        .iter()
        .map(|&i| {
            runs[i]
                .detail
                .run
                .end_ms
                .unwrap_or(runs[i].detail.run.start_ms)
        })
        .max()
        .unwrap_or(0);
    let span = |ms: i64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
        )
        .to_string()
    };
    let _ = writeln!(
        body,
        "<h1>{}</h1><p class=\"sub\">Experiment · dataset {} · {} to {} · <a href=\"../index.html\">all runs</a></p>",
        escape(&experiment.name),
        escape(&datasets.join(", ")),
        span(first),
        span(last)
    );
    body.push_str(&status_cards(ctx, &experiment.runs));
    if let Some(metric) = &experiment.primary
        && let Some(&best) = experiment.best.get(metric)
    {
        body.push_str(&card(
            &format!("best {metric}"),
            &format_number(runs[best].detail.summary[metric]),
        ));
    }
    body.push_str("</div>\n");
    let varying = if experiment.params.is_empty() {
        "none".to_string()
    } else {
        experiment.params.join(", ")
    };
    let _ = writeln!(
        body,
        "<p class=\"sub\">Parameters that vary: <code>{}</code>. Seeds are pooled: each level is the mean ± sample std over its runs.</p>",
        escape(&varying)
    );

    if experiment.metrics.is_empty() {
        body.push_str(&note(
            "info",
            "No finished run of this experiment has summary metrics yet.",
        ));
    } else {
        body.push_str("<h2 id=\"best\">Best runs</h2>\n<p class=\"sub\">As <code>lazarus experiments best --metric METRIC --where experiment=NAME</code> ranks FINISHED runs.</p>\n");
        body.push_str(&best_table(ctx, &experiment.best, &experiment.metrics, 1));
        body.push_str(&metric_switch(
            experiment,
            "pc",
            "Parameters against a metric",
        ));
        if experiment.axes.is_empty() {
            body.push_str(&note(
                "info",
                "Every run has the same parameters (apart from the seed): no axes to draw.",
            ));
        } else {
            for metric in &experiment.metrics {
                let _ = write!(
                    body,
                    "<div data-group=\"pc\" data-option=\"{}\">",
                    escape(metric)
                );
                body.push_str(&parallel(ctx, experiment, metric));
                body.push_str("</div>\n");
            }
        }
        body.push_str(&metric_switch(experiment, "ab", "Ablations"));
        body.push_str("<p class=\"sub\">The tables of <code>lazarus experiments ablate --by PARAM --metric METRIC --where experiment=NAME</code>: mean ± std over FINISHED runs per level, difference from the baseline (the first level); ★ marks the best level.</p>\n");
        for metric in &experiment.metrics {
            let _ = write!(
                body,
                "<div data-group=\"ab\" data-option=\"{}\">",
                escape(metric)
            );
            let mut groupings: Vec<Vec<String>> =
                experiment.axes.iter().map(|a| vec![a.clone()]).collect();
            if experiment.axes.len() >= 2 {
                groupings.push(experiment.axes.clone());
            }
            if groupings.is_empty() {
                groupings.push(vec![super::model::SEED_PARAM.to_string()]);
            }
            for by in groupings {
                if by.len() == 1 && !experiment.params.contains(&by[0]) {
                    continue;
                }
                if let Some(report) = ablation(runs, &experiment.runs, &by, metric) {
                    let _ = write!(
                        body,
                        "<h3>by {} · {}</h3>",
                        escape(&by.join(", ")),
                        escape(metric)
                    );
                    body.push_str(&ablation_html(&report));
                }
            }
            body.push_str("</div>\n");
        }
    }
    body.push_str("<h2 id=\"runs\">Runs</h2>\n");
    body.push_str(&runs_table(
        ctx,
        &RunsTable {
            id: "runs-table",
            members: &experiment.runs,
            params: &experiment.params,
            metrics: &experiment.metrics,
            best: &experiment.best,
            depth: 1,
        },
    ));
    ctx.page(&experiment.name, 1, &footer).render(&body)
}

fn metric_switch(experiment: &ExperimentModel, group: &str, title: &str) -> String {
    let mut html = format!(
        "<h2 id=\"{group}\">{title}</h2>\n<div class=\"toolbar\"><label>metric <select data-switch=\"{group}\">"
    );
    for metric in &experiment.metrics {
        let _ = write!(
            html,
            "<option value=\"{0}\"{1}>{0}</option>",
            escape(metric),
            if Some(metric) == experiment.primary.as_ref() {
                " selected"
            } else {
                ""
            }
        );
    }
    html.push_str("</select></label></div>\n");
    html
}

/// An ablation table with the best level starred and differences coloured
/// by whether they are improvements.
pub fn ablation_html(report: &AblationReport) -> String {
    let table = report.table();
    let mean_column = report.by.len() + 1;
    let diff_column = report.by.len() + 3;
    // The first level with the best mean (ties keep the earlier level).
    let mut best_row: Option<usize> = None;
    for (i, row) in report.rows.iter().enumerate() {
        let better = best_row.is_none_or(|b| match report.direction {
            Direction::HigherIsBetter => row.mean > report.rows[b].mean,
            Direction::LowerIsBetter => row.mean < report.rows[b].mean,
        });
        if better {
            best_row = Some(i);
        }
    }
    // Levels all alike: none is better.
    if best_row.is_some_and(|b| report.rows.iter().all(|r| r.mean == report.rows[b].mean)) {
        best_row = None;
    }
    let direction = report.direction;
    table_html(
        &table,
        &|row, column| {
            if column == mean_column && Some(row) == best_row {
                "best"
            } else if column == diff_column {
                let diff = report.rows[row].diff;
                let better = match direction {
                    Direction::HigherIsBetter => diff > 0.0,
                    Direction::LowerIsBetter => diff < 0.0,
                };
                if report.rows[row].levels == report.baseline {
                    "baseline"
                } else if diff == 0.0 {
                    ""
                } else if better {
                    "pos"
                } else {
                    "neg"
                }
            } else {
                ""
            }
        },
        None,
    )
}

/// Parallel coordinates of the experiment's axes against one metric.
fn parallel(ctx: &Context<'_>, experiment: &ExperimentModel, metric: &str) -> String {
    let runs = &ctx.snapshot.runs;
    let members: Vec<usize> = experiment
        .runs
        .iter()
        .copied()
        .filter(|&i| {
            runs[i].detail.run.status == RunStatus::Finished
                && runs[i].detail.summary.contains_key(metric)
        })
        .collect();
    if members.is_empty() {
        return note("info", &format!("No finished run has {}.", escape(metric)));
    }
    let mut axes = Vec::new();
    let mut positions: Vec<Vec<svg::AxisValue>> = vec![Vec::new(); members.len()];
    for param in &experiment.axes {
        let values: Vec<Option<&ParamValue>> = members
            .iter()
            .map(|&i| runs[i].detail.params.get(param))
            .collect();
        let all_numbers = values
            .iter()
            .all(|v| matches!(v, Some(ParamValue::Number(_))));
        let distinct_numbers = {
            let mut numbers: Vec<f64> = values
                .iter()
                .filter_map(|v| match v {
                    Some(ParamValue::Number(n)) => Some(*n),
                    _ => None,
                })
                .collect();
            numbers.sort_by(f64::total_cmp);
            numbers.dedup();
            numbers
        };
        if all_numbers && distinct_numbers.len() > 8 {
            axes.push(ParallelAxis::numeric(
                param.clone(),
                distinct_numbers.iter().copied(),
            ));
            for (position, value) in positions.iter_mut().zip(&values) {
                if let Some(ParamValue::Number(n)) = value {
                    position.push(svg::AxisValue::Number(*n));
                }
            }
        } else {
            // The ablation's level order: numbers, then text, then missing.
            let report = ablation(runs, &members, std::slice::from_ref(param), metric);
            let levels: Vec<Option<ParamValue>> = report
                .map(|r| {
                    r.rows
                        .into_iter()
                        .map(|row| row.levels[0].clone())
                        .collect()
                })
                .unwrap_or_default();
            let labels: Vec<String> = levels.iter().map(|l| param_text(l.as_ref())).collect();
            for (position, value) in positions.iter_mut().zip(&values) {
                let index = levels
                    .iter()
                    .position(|l| l.as_ref() == *value)
                    .unwrap_or(0);
                position.push(svg::AxisValue::Level(index));
            }
            axes.push(ParallelAxis {
                label: param.clone(),
                kind: svg::AxisKind::Levels(labels),
            });
        }
    }
    let values: Vec<f64> = members
        .iter()
        .map(|&i| runs[i].detail.summary[metric])
        .collect();
    axes.push(ParallelAxis::numeric(
        metric.to_string(),
        values.iter().copied(),
    ));
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    let direction = direction_of(metric);
    let mut lines = Vec::with_capacity(members.len());
    for ((&i, mut position), value) in members.iter().zip(positions).zip(&values) {
        position.push(svg::AxisValue::Number(*value));
        let share = if hi > lo {
            (value - lo) / (hi - lo)
        } else {
            1.0
        };
        let settings: Vec<String> = experiment
            .params
            .iter()
            .filter_map(|p| runs[i].detail.params.get(p).map(|v| format!("{p}={v}")))
            .collect();
        lines.push(ParallelLine {
            values: position,
            goodness: match direction {
                Direction::HigherIsBetter => share,
                Direction::LowerIsBetter => 1.0 - share,
            },
            title: format!(
                "{}: {metric} {} · {}",
                runs[i].detail.run.id,
                format_number(*value),
                settings.join(" ")
            ),
            href: Some(format!("../runs/{}/index.html", runs[i].detail.run.id)),
        });
    }
    let best = experiment
        .best
        .get(metric)
        .and_then(|b| members.iter().position(|i| i == b));
    let chart = ParallelChart {
        title: format!("{} runs: parameters against {metric}", members.len()),
        axes,
        lines,
        best,
    };
    let legend = vec![
        ("best run".to_string(), "#dc2626"),
        (format!("better {metric}"), "#fde725"),
        (format!("worse {metric}"), "#440154"),
    ];
    format!(
        "<div class=\"charts\">{}</div><p class=\"sub\">One line per finished run (hover for its id, click to open it); colour by {}.</p>\n",
        chart_box(&chart.render(), &legend),
        escape(metric)
    )
}

/// Per-step metric keys of runs, as the charts group them.
pub struct CurveGroups {
    /// `(title, keys)` of the headline charts: losses, validation metrics, the rest.
    pub headline: Vec<(String, Vec<String>)>,
    /// `(family, keys)` of per-class curves (`val/recall` -> `val/recall/cat`, ...).
    pub per_class: Vec<(String, Vec<String>)>,
}

pub fn curve_groups<'k>(keys: impl Iterator<Item = &'k String>) -> CurveGroups {
    let mut losses = Vec::new();
    let mut validation = Vec::new();
    let mut training = Vec::new();
    let mut others: Vec<(String, Vec<String>)> = Vec::new();
    let mut families: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut keys: Vec<&String> = keys.collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        if !is_headline(key) {
            let family = key.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
            families.entry(family).or_default().push(key.clone());
        } else if key.ends_with("loss") {
            losses.push(key.clone());
        } else if key.starts_with("val/") && is_score(key) {
            validation.push(key.clone());
        } else if key.starts_with("train/")
            && !["learning_rate", "loss_scale", "skipped_steps"]
                .iter()
                .any(|bookkeeping| key.ends_with(bookkeeping))
        {
            training.push(key.clone());
        } else {
            others.push((key.clone(), vec![key.clone()]));
        }
    }
    let mut headline = Vec::new();
    if !losses.is_empty() {
        headline.push(("Loss".to_string(), losses));
    }
    if !validation.is_empty() {
        headline.push(("Validation metrics".to_string(), validation));
    }
    if !training.is_empty() {
        headline.push(("Training-split metrics".to_string(), training));
    }
    headline.extend(others);
    CurveGroups {
        headline,
        per_class: families.into_iter().collect(),
    }
}

/// `compare/SLUG.html`.
pub fn comparison(ctx: &Context<'_>, comparison: &ComparisonModel) -> String {
    let footer = ctx.footer();
    let runs = &ctx.snapshot.runs;
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<h1>{}</h1><p class=\"sub\">{} <code>{}</code> · <a href=\"../index.html\">all runs</a></p>",
        escape(&comparison.title),
        escape(&comparison.why),
        escape(&comparison.command)
    );
    let ids: Vec<String> = comparison
        .runs
        .iter()
        .map(|&i| runs[i].detail.run.id.clone())
        .collect();
    let records: Vec<_> = comparison
        .runs
        .iter()
        .map(|&i| runs[i].detail.run.clone())
        .collect();
    let params: Vec<_> = comparison
        .runs
        .iter()
        .map(|&i| runs[i].detail.params.clone())
        .collect();
    let summaries: Vec<_> = comparison
        .runs
        .iter()
        .map(|&i| runs[i].detail.summary.clone())
        .collect();
    let compared = comparison_from(&ids, &records, &params, &summaries);
    let table = compared.table();
    let mut headers: Vec<String> = vec!["kind".into(), "key".into()];
    headers.extend(comparison.runs.iter().map(|&i| ctx.run_link(i, 1)));
    // The best run per metric row (finished runs only, as everywhere).
    let best_column: Vec<Option<usize>> = compared
        .rows
        .iter()
        .map(|row| {
            if row.kind != "metric" || !is_score(&row.key) {
                return None;
            }
            let mut found: Vec<(usize, f64)> = row
                .values
                .iter()
                .enumerate()
                .filter(|(c, _)| records[*c].status == RunStatus::Finished)
                .filter_map(|(c, v)| match v {
                    Some(ParamValue::Number(n)) => Some((c, *n)),
                    _ => None,
                })
                .collect();
            crate::experiments::query::rank_by(&mut found, direction_of(&row.key), |(_, v)| *v);
            // All alike: none is best.
            if found
                .first()
                .is_some_and(|(_, v)| found.iter().all(|(_, w)| w == v))
            {
                return None;
            }
            found.first().map(|(c, _)| *c + 2)
        })
        .collect();
    body.push_str("<h2>Side by side</h2>\n<p class=\"sub\">Run fields, the parameters that differ, and every summary metric (★: best of these runs).</p>\n<div class=\"scroll\">");
    // Per-class rows folded below the rest, each table keeping compare's row order.
    let (main_rows, per_class_rows): (Vec<usize>, Vec<usize>) = (0..compared.rows.len())
        .partition(|&r| compared.rows[r].kind != "metric" || is_headline(&compared.rows[r].key));
    let part = |rows: &[usize]| {
        let mut part = Table::new(table.headers.clone());
        for &r in rows {
            part.push(table.rows[r].clone());
        }
        table_html(
            &part,
            &|row, column| {
                if best_column[rows[row]] == Some(column) {
                    "best"
                } else {
                    ""
                }
            },
            Some(&headers),
        )
    };
    body.push_str(&part(&main_rows));
    body.push_str("</div>\n");
    if !per_class_rows.is_empty() {
        body.push_str("<details><summary>Per-class metrics</summary><div class=\"scroll\">");
        body.push_str(&part(&per_class_rows));
        body.push_str("</div></details>\n");
    }
    if !compared.same_params.is_empty() {
        body.push_str("<h3>Parameters all of them share</h3><p><code>");
        let shared: Vec<String> = compared
            .same_params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        body.push_str(&escape(&shared.join(" ")));
        body.push_str("</code></p>\n");
    }
    body.push_str("<h2>Learning curves, overlaid</h2>\n");
    let groups = curve_groups(comparison.runs.iter().flat_map(|&i| runs[i].history.keys()));
    if groups.headline.is_empty() {
        body.push_str(&note("info", "These runs logged no per-step metrics."));
    }
    let mut keys: Vec<String> = Vec::new();
    for (_, group) in &groups.headline {
        keys.extend(group.iter().cloned());
    }
    body.push_str("<div class=\"charts\">");
    for key in keys {
        let mut chart = LineChart::new(key.clone(), "epoch", key.clone());
        chart.integer_x = true;
        let mut legend = Vec::new();
        for (n, &i) in comparison.runs.iter().enumerate() {
            let Some(points) = runs[i].history.get(&key) else {
                continue;
            };
            let id = &runs[i].detail.run.id;
            chart.series.push(Series {
                label: id.clone(),
                color: svg::color(n),
                points: points.iter().map(|p| (p.step as f64, p.value)).collect(),
                title: Some(format!("{id}: {key}")),
                href: Some(format!("../runs/{id}/index.html")),
            });
            legend.push((id.clone(), svg::color(n)));
        }
        if chart.series.is_empty() {
            continue;
        }
        body.push_str(&chart_box(&chart.render(), &legend));
    }
    body.push_str("</div>\n");
    ctx.page(&comparison.title, 1, &footer).render(&body)
}
