//! Folders lazarus writes whole (`review --out`, `export --out`): they carry
//! a marker of lazarus's own, a folder holding any file lazarus did not
//! write is never replaced (not even with --force), a folder from before
//! markers is replaced only with --force and only if every file in it is one
//! lazarus writes there. Also: HTML in image file names is escaped in the
//! contact sheet.

use crate::support;

use std::fs;
use std::path::Path;

use image::ImageFormat;
use support::{fails, gaussian_noise, json, lazarus, ok, write_features, write_image};

const MARKER: &str = ".lazarus-output.json";

/// A two-class dataset with one hostile file name, features and a trained
/// linear head; returns the run id.
fn setup(root: &Path) -> String {
    let tree = root.join("tree");
    for class in 0..2 {
        for i in 0..30 {
            let name = if class == 0 && i == 0 {
                "<img src=x onerror=alert(1)>&.png".to_string()
            } else {
                format!("img{i:02}.png")
            };
            write_image(
                &tree.join(format!("class{class}")).join(name),
                class * 100 + i,
                ImageFormat::Png,
            );
        }
    }
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let dataset = lazarus::dataset::load(&lazarus::layout::Layout::new(root), "toy").unwrap();
    write_features(root, "toy", 4, |record, d| {
        let mut class = dataset
            .class_index(record.label.as_deref().unwrap())
            .unwrap();
        // The first three images of each class (the hostile name among
        // them) look like the other class: mispredicted, so reviewed.
        let name = record.path.file_name().unwrap().to_string_lossy();
        if name.starts_with("<img") || name.starts_with("img01") || name.starts_with("img02") {
            class = 1 - class;
        }
        let centre = if d == class { 3.0 } else { 0.0 };
        centre + gaussian_noise((record.index * 100 + d) as u64)
    });
    let report = json(&ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--epochs",
            "2",
            "--json",
        ],
    )));
    report["run_id"].as_str().unwrap().to_string()
}

/// `review --out OUT` of the top `top` images, with `extra` flags.
fn review(root: &Path, run: &str, out: &Path, top: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "review",
        "--run",
        run,
        "--dataset",
        "toy",
        "--top",
        top,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

/// Every file under `dir` with its content.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                out.push((name, fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn review_never_replaces_a_folder_holding_files_lazarus_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let run = setup(root);

    // The reproduction: a folder that holds index.html and review.csv (so it
    // looked like a previous review) and the user's thesis.
    let thesis = root.join("thesis");
    fs::create_dir_all(&thesis).unwrap();
    fs::write(thesis.join("index.html"), "<p>my site</p>").unwrap();
    fs::write(thesis.join("review.csv"), "my,notes\n").unwrap();
    fs::write(thesis.join("thesis.tex"), "\\section{Results}").unwrap();
    let before = snapshot(&thesis);
    for force in [&[][..], &["--force"][..]] {
        let message = fails(review(root, &run, &thesis, "60", force));
        assert!(
            message.contains("holds files lazarus review did not write (thesis.tex)"),
            "{message}"
        );
        assert_eq!(snapshot(&thesis), before, "nothing was touched");
    }

    // A review lazarus wrote (with its marker) is replaced; a file the user
    // adds to it later blocks the next replacement.
    let sheet = root.join("sheet");
    ok(review(root, &run, &sheet, "60", &[]));
    let marker = json(&fs::read_to_string(sheet.join(MARKER)).unwrap());
    assert_eq!(marker["written_by"], "lazarus review");
    let listed: Vec<&str> = marker["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(listed.contains(&"review.csv") && listed.contains(&"index.html"));
    assert!(listed.iter().any(|f| f.starts_with("thumbs/")));
    ok(review(root, &run, &sheet, "2", &[]));
    let csv = fs::read_to_string(sheet.join("review.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "replaced: {csv}");
    fs::write(sheet.join("notes.txt"), "mine").unwrap();
    let message = fails(review(root, &run, &sheet, "60", &["--force"]));
    assert!(message.contains("(notes.txt)"), "{message}");
    assert_eq!(fs::read_to_string(sheet.join("notes.txt")).unwrap(), "mine");

    // An empty folder is used as is.
    let empty = root.join("empty");
    fs::create_dir(&empty).unwrap();
    ok(review(root, &run, &empty, "60", &[]));
    assert!(empty.join("index.html").is_file());
}

#[test]
fn a_review_from_before_markers_is_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let run = setup(root);
    let old = root.join("old-review");
    ok(review(root, &run, &old, "60", &[]));
    // What older lazarus wrote: the same files, no marker.
    fs::remove_file(old.join(MARKER)).unwrap();
    let before = snapshot(&old);
    let message = fails(review(root, &run, &old, "60", &[]));
    assert!(message.contains("has no .lazarus-output.json"), "{message}");
    assert!(message.contains("--force replaces it"), "{message}");
    assert_eq!(snapshot(&old), before);
    ok(review(root, &run, &old, "1", &["--force"]));
    assert!(old.join(MARKER).is_file());
    assert_eq!(
        fs::read_to_string(old.join("review.csv"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let leftovers: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn export_replaces_a_bundle_only_with_force_and_never_a_folder_with_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A bundle names its encoder: real extraction, random weights.
    support::extract_toy(root, &[8, 8]);
    let trained = json(&ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--epochs",
            "2",
            "--json",
        ],
    )));
    let run = trained["run_id"].as_str().unwrap().to_string();
    let bundle = root.join("bundle");
    let export = |extra: &[&str]| {
        let mut args = vec!["export", run.as_str(), "--out", bundle.to_str().unwrap()];
        args.extend_from_slice(extra);
        lazarus(root, &args)
    };
    ok(export(&[]));
    assert!(bundle.join(MARKER).is_file());
    let message = fails(export(&[]));
    assert!(
        message.contains("was written by lazarus export already; --force replaces it"),
        "{message}"
    );
    ok(export(&["--force"]));
    // The bundle still opens: the marker is not part of its manifest.
    ok(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            bundle.to_str().unwrap(),
            "--dataset",
            "toy",
        ],
    ));
    fs::write(bundle.join("README.txt"), "how we deploy").unwrap();
    let message = fails(export(&["--force"]));
    assert!(message.contains("did not write (README.txt)"), "{message}");
    assert_eq!(
        fs::read_to_string(bundle.join("README.txt")).unwrap(),
        "how we deploy"
    );
    // A file where the folder should be is not a folder to write into.
    let file = root.join("a-file");
    fs::write(&file, "x").unwrap();
    let message = fails(lazarus(
        root,
        &["export", &run, "--out", file.to_str().unwrap(), "--force"],
    ));
    assert!(message.contains("is not a folder"), "{message}");
}

#[test]
fn html_in_file_names_is_escaped_in_the_contact_sheet() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let run = setup(root);
    let sheet = root.join("sheet");
    ok(review(root, &run, &sheet, "60", &[]));
    let html = fs::read_to_string(sheet.join("index.html")).unwrap();
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;&amp;.png"),
        "the hostile name is in the sheet, escaped"
    );
    assert!(!html.contains("<img src=x"), "never as markup");
}
