//! lazarus: run a frozen image encoder once, in resumable micro-jobs, and train
//! small heads on the cached features.
//!
//! The library holds all logic; the `lazarus` binary only parses arguments,
//! validates them into settings and calls one function per verb.
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod atomic;
pub mod bundle;
pub mod dataset;
pub mod digest;
pub mod drift;
pub mod encoders;
pub mod experiments;
pub mod extract;
pub mod features;
pub mod files;
pub mod html;
pub mod layout;
pub mod memory;
pub mod output_dir;
pub mod predict;
pub mod preprocess;
pub mod queue;
pub mod review;
pub mod runs;
pub mod segment;
pub mod serve;
pub mod spatial;
pub mod sqlite;
pub mod train;
pub mod weights;

/// The version recorded in every artifact lazarus writes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Top-level module -> the top-level modules its non-test code names
    /// (`crate::NAME`, or `NAME` inside `use crate::{...}`), as
    /// /work/shared/tools/modgraph.py reads them.
    fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
        fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    files(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut paths = Vec::new();
        files(src, &mut paths);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for path in paths {
            let relative = path.strip_prefix(src).unwrap();
            let first = relative.components().next().unwrap();
            let first = first.as_os_str().to_str().unwrap();
            let module = first.strip_suffix(".rs").unwrap_or(first).to_string();
            if module == "main" || module == "lib" || module == "cli" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap();
            let mut named = BTreeSet::new();
            for (at, _) in text.match_indices("crate::") {
                let rest = &text[at + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    let inner = &group[..group.find('}').unwrap_or(group.len())];
                    for item in inner.split(',') {
                        let name = item.trim().split("::").next().unwrap_or("").trim();
                        named.insert(name.to_string());
                    }
                } else {
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    named.insert(rest[..end].to_string());
                }
            }
            let entry = graph.entry(module.clone()).or_default();
            for name in named {
                if !name.is_empty() && name != module && name != "self" && name != "super" {
                    entry.insert(name);
                }
            }
        }
        graph
    }

    /// A cycle through `start`, if any, as the modules on it.
    fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
        let mut stack = vec![(start.to_string(), vec![start.to_string()])];
        let mut seen = BTreeSet::new();
        while let Some((module, path)) = stack.pop() {
            for next in graph.get(&module).into_iter().flatten() {
                if next == start {
                    return Some(path.clone());
                }
                if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
        None
    }

    #[test]
    fn top_level_modules_import_no_cycle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let graph = module_graph(&src);
        for module in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, module) {
                panic!("import cycle: {} -> {module}", cycle.join(" -> "));
            }
        }
        // The layers ARCHITECTURE.md draws: geometry below the tasks and
        // extraction, the engine below segmentation, and only the modules
        // above both trainers pick a trainer by task.
        let below = |module: &str, forbidden: &[&str]| {
            let imports = graph.get(module).cloned().unwrap_or_default();
            for name in forbidden {
                assert!(
                    !imports.contains(*name),
                    "{module} imports {name}: {imports:?}"
                );
            }
        };
        below(
            "spatial",
            &["extract", "segment", "train", "predict", "runs"],
        );
        below("extract", &["segment", "train", "predict"]);
        below("train", &["segment", "predict", "runs", "bundle"]);
        below("segment", &["predict", "runs", "bundle"]);
        below("predict", &["runs", "bundle", "review"]);
        // The SQLite helper is plumbing under the two SQL speakers.
        below("sqlite", &["queue", "experiments"]);
    }
}
