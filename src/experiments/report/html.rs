//! HTML pieces of the report: the page frame, the shared style sheet and
//! the small inline script of sortable, filterable tables.

use std::fmt::Write;

pub use crate::html::{escape, url_path};

/// Where the style sheet lives in the report.
pub const STYLE_FILE: &str = "assets/report.css";

/// What a page needs besides its body.
pub struct Page<'a> {
    pub title: &'a str,
    /// How many folders below the report's root the page is (0 for index.html).
    pub depth: usize,
    /// The line under the navigation: what was selected, when, from where.
    pub footer: &'a str,
    /// Include the table script.
    pub script: bool,
}

impl Page<'_> {
    /// `../` repeated `depth` times.
    pub fn root(&self) -> String {
        "../".repeat(self.depth)
    }

    pub fn render(&self, body: &str) -> String {
        let root = self.root();
        let mut html = String::with_capacity(body.len() + 4096);
        let _ = write!(
            html,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>{title} · lazarus report</title>\n\
             <link rel=\"stylesheet\" href=\"{root}{STYLE_FILE}\">\n</head>\n<body>\n\
             <header class=\"top\"><a class=\"brand\" href=\"{root}index.html\">lazarus report</a>\
             <nav><a href=\"{root}index.html\">Runs</a><a href=\"{root}index.html#experiments\">Experiments</a>\
             <a href=\"{root}index.html#comparisons\">Comparisons</a></nav></header>\n<main>\n",
            title = escape(self.title),
        );
        html.push_str(body);
        let _ = write!(
            html,
            "\n</main>\n<footer>{}</footer>\n",
            escape(self.footer)
        );
        if self.script {
            html.push_str("<script>\n");
            html.push_str(TABLE_SCRIPT);
            html.push_str("</script>\n");
        }
        html.push_str("</body>\n</html>\n");
        html
    }
}

/// A status badge.
pub fn status_badge(status: &str) -> String {
    format!(
        "<span class=\"badge status-{}\">{}</span>",
        escape(&status.to_ascii_lowercase()),
        escape(status)
    )
}

/// A note box (`info`, `warn`, `empty`).
pub fn note(kind: &str, html_content: &str) -> String {
    format!("<div class=\"note {kind}\">{html_content}</div>\n")
}

/// Sorting (click a header; numbers compare as numbers, blanks last) and
/// filtering (every word must appear in the row; `key=value` words match
/// one column) of `table.runs`, with a status select and a row count.
pub const TABLE_SCRIPT: &str = r#"(function () {
  function cellValue(row, index) {
    var cell = row.cells[index];
    if (!cell) return null;
    var v = cell.getAttribute('data-v');
    if (v === null) v = cell.textContent.trim();
    if (v === '' || v === '-') return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, index) {
      th.addEventListener('click', function () {
        var descending = th.getAttribute('aria-sort') === 'ascending';
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a, index), y = cellValue(b, index);
          if (x === null && y === null) return 0;
          if (x === null) return 1;
          if (y === null) return -1;
          var order = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0)
                                              : (typeof x === 'number' ? -1 : 1);
          return descending ? -order : order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  document.querySelectorAll('[data-filter-for]').forEach(function (box) {
    var table = document.getElementById(box.getAttribute('data-filter-for'));
    var text = box.querySelector('input');
    var status = box.querySelector('select');
    var count = box.querySelector('.count');
    var names = Array.prototype.map.call(table.tHead.rows[0].cells, function (th) {
      return (th.getAttribute('data-key') || th.textContent).trim().toLowerCase();
    });
    function apply() {
      var words = text.value.toLowerCase().split(/\s+/).filter(Boolean);
      var wanted = status ? status.value : '';
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var ok = !wanted || row.getAttribute('data-status') === wanted;
        var all = row.textContent.toLowerCase();
        words.forEach(function (word) {
          var eq = word.indexOf('=');
          if (eq > 0) {
            var column = names.indexOf(word.slice(0, eq));
            var cell = column >= 0 ? row.cells[column] : null;
            ok = ok && cell !== null && cell.textContent.trim().toLowerCase() === word.slice(eq + 1);
          } else {
            ok = ok && all.indexOf(word) >= 0;
          }
        });
        row.hidden = !ok;
        if (ok) shown += 1;
      });
      if (count) count.textContent = shown + ' of ' + table.tBodies[0].rows.length + ' runs';
    }
    text.addEventListener('input', apply);
    if (status) status.addEventListener('change', apply);
    apply();
  });
  // A link to a shown file opens its block.
  function openTarget() {
    var target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (target && target.tagName === 'DETAILS') target.open = true;
  }
  window.addEventListener('hashchange', openTarget);
  openTarget();
  document.querySelectorAll('select[data-switch]').forEach(function (select) {
    var group = select.getAttribute('data-switch');
    function show() {
      document.querySelectorAll('[data-group="' + group + '"]').forEach(function (element) {
        element.hidden = element.getAttribute('data-option') !== select.value;
      });
    }
    select.addEventListener('change', show);
    show();
  });
})();
"#;

/// The report's style sheet.
pub const STYLE: &str = r#":root {
  --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --panel: #ffffff; --page: #f6f7f9;
  --accent: #2563eb; --best: #fef3c7; --best-ink: #92400e;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header.top { display: flex; align-items: center; gap: 24px; padding: 10px 24px;
  background: #111827; color: #fff; position: sticky; top: 0; z-index: 5; }
header.top .brand { color: #fff; font-weight: 700; letter-spacing: .02em; }
header.top nav a { color: #cbd5e1; margin-right: 16px; }
main { max-width: 1440px; margin: 0 auto; padding: 18px 24px 40px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 0 24px 24px; }
h1 { font-size: 22px; margin: 6px 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); scroll-margin-top: 56px; }
h3 { font-size: 14px; margin: 18px 0 8px; color: #374151; }
.sub { color: var(--muted); margin: 0 0 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card .label { color: var(--muted); font-size: 12px; }
.card .value { font-size: 20px; font-weight: 650; font-variant-numeric: tabular-nums; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; margin: 10px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.chart-box { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 6px; }
svg.chart { display: block; max-width: 100%; height: auto; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; color: #374151; padding: 2px 8px 6px; max-width: 560px; }
.legend span.swatch { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 5px; border-radius: 2px; }
.wide { overflow-x: auto; max-width: 100%; }
.scroll { overflow: auto; max-height: 78vh; border: 1px solid var(--line); border-radius: 8px; background: var(--panel); }
table { border-collapse: collapse; font-size: 13px; }
table.data { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; border-collapse: separate; border-spacing: 0; margin-bottom: 6px; }
.scroll table.data { border: 0; width: 100%; border-radius: 0; }
table.data th, table.data td { padding: 5px 9px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
table.data thead th { position: sticky; top: 0; background: #f9fafb; z-index: 2; font-weight: 600; color: #374151; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th[aria-sort=ascending]::after { content: " ▲"; font-size: 10px; }
table.sortable thead th[aria-sort=descending]::after { content: " ▼"; font-size: 10px; }
table.data tbody tr:hover td { background: #f3f4f6; }
table.data td.num, table.data th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data td.first, table.data th.first { position: sticky; left: 0; background: var(--panel); z-index: 1; }
table.data thead th.first { z-index: 3; background: #f9fafb; }
table.data th.metric { color: #1e3a8a; }
td.best { background: var(--best) !important; color: var(--best-ink); font-weight: 650; }
td.best::before { content: "★ "; }
td.baseline { color: var(--muted); }
.pos { color: #15803d; } .neg { color: #b91c1c; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 11px; font-weight: 650; letter-spacing: .02em; }
.status-finished { background: #dcfce7; color: #166534; }
.status-running { background: #dbeafe; color: #1e40af; }
.status-failed { background: #fee2e2; color: #991b1b; }
.status-killed { background: #e5e7eb; color: #374151; }
.note { border-radius: 8px; padding: 10px 14px; margin: 10px 0; border: 1px solid; }
.note.info { background: #eff6ff; border-color: #bfdbfe; }
.note.warn { background: #fffbeb; border-color: #fcd34d; }
.note.empty { background: #f9fafb; border-color: var(--line); font-size: 15px; padding: 24px; text-align: center; }
.warn-icon { color: #b45309; font-weight: 700; }
.toolbar { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin: 8px 0; }
.toolbar input { padding: 6px 10px; border: 1px solid #d1d5db; border-radius: 6px; min-width: 320px; font: inherit; }
.toolbar select { padding: 5px 8px; border: 1px solid #d1d5db; border-radius: 6px; font: inherit; background: #fff; }
.toolbar .count { color: var(--muted); }
table.confusion td { width: 56px; height: 40px; text-align: center; border: 1px solid #fff; font-variant-numeric: tabular-nums; }
table.confusion th { padding: 4px 8px; font-weight: 600; color: #374151; }
table.kv td, table.kv th { padding: 3px 10px 3px 0; vertical-align: top; text-align: left; border: 0; }
table.kv th { color: var(--muted); font-weight: 500; white-space: nowrap; }
table.kv table.kv { margin: 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { margin: 0; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 6px; }
.gallery img { display: block; max-width: 260px; max-height: 220px; }
.gallery figcaption { font-size: 11px; color: var(--muted); max-width: 260px; overflow-wrap: anywhere; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #374151; font-weight: 600; }
pre.file { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; max-height: 480px; overflow: auto; font-size: 12px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
ul.plain { padding-left: 18px; margin: 6px 0; }
"#;
