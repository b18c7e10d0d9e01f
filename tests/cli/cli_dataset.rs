//! `lazarus dataset add|list|show` through the real binary on generated data.

use crate::support;

use std::collections::BTreeMap;
use std::fs;

use image::ImageFormat;
use support::{fails, image_folder, image_rows, json, lazarus, ok, write_image};

#[test]
fn image_folder_manifest_lists_every_image_with_id_label_and_split() {
    let dir = tempfile::tempdir().unwrap();
    let tree = image_folder(dir.path(), &[20, 10, 5]);
    let root = dir.path().join("root");
    let out = ok(lazarus(
        &root,
        &["dataset", "add", "plants", tree.to_str().unwrap()],
    ));
    assert!(
        out.contains("Registered dataset 'plants': 35 images (image-folder)"),
        "{out}"
    );
    assert!(
        out.contains("imbalance ratio (largest / smallest class): 4.00"),
        "{out}"
    );

    let rows = image_rows(&root, "plants");
    assert_eq!(rows.len(), 35);
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row[0], index.to_string());
        // The id is the file's whole sha256 (issue 18; 16 digits before).
        assert_eq!(
            row[1],
            lazarus::digest::sha256_hex(&fs::read(&row[2]).unwrap()),
            "{row:?}"
        );
        assert!(
            row[2].ends_with(".png") && row[2].contains(&format!("/{}/", row[3])),
            "{row:?}"
        );
        assert!(["train", "val", "test"].contains(&row[4].as_str()));
    }
    // Class folders in sorted order, files sorted within each.
    assert!(rows[0][2].ends_with("class0/img000.png"));
    assert!(rows[34][2].ends_with("class2/img004.png"));

    let summary = json(&ok(lazarus(
        &root,
        &["dataset", "show", "plants", "--json"],
    )));
    assert_eq!(summary["images"], 35);
    assert_eq!(summary["classes"]["class0"], 20);
    assert_eq!(summary["classes"]["class2"], 5);
    assert_eq!(
        summary["splits"]["train"].as_u64().unwrap()
            + summary["splits"]["val"].as_u64().unwrap()
            + summary["splits"]["test"].as_u64().unwrap(),
        35
    );

    let listed = json(&ok(lazarus(&root, &["dataset", "list", "--json"])));
    assert_eq!(listed["datasets"][0]["name"], "plants");
}

#[test]
fn stratified_split_is_identical_across_runs_and_roots() {
    let dir = tempfile::tempdir().unwrap();
    let tree = image_folder(dir.path(), &[40, 20]);
    let splits = |root: &str, name: &str| -> BTreeMap<String, String> {
        let root = dir.path().join(root);
        ok(lazarus(
            &root,
            &["dataset", "add", name, tree.to_str().unwrap()],
        ));
        image_rows(&root, name)
            .into_iter()
            .map(|row| (row[1].clone(), row[4].clone()))
            .collect()
    };
    let first = splits("a", "one");
    let second = splits("b", "two");
    assert_eq!(first, second);

    // Stratified: 80/10/10 within each class (40 -> 32/4/4, 20 -> 16/2/2).
    let rows = image_rows(&dir.path().join("a"), "one");
    let count = |label: &str, split: &str| {
        rows.iter()
            .filter(|r| r[3] == label && r[4] == split)
            .count()
    };
    assert_eq!(
        (
            count("class0", "train"),
            count("class0", "val"),
            count("class0", "test")
        ),
        (32, 4, 4)
    );
    assert_eq!(
        (
            count("class1", "train"),
            count("class1", "val"),
            count("class1", "test")
        ),
        (16, 2, 2)
    );

    // Another seed moves images between splits.
    let root = dir.path().join("c");
    ok(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "three",
            tree.to_str().unwrap(),
            "--seed",
            "9",
        ],
    ));
    let reseeded: BTreeMap<String, String> = image_rows(&root, "three")
        .into_iter()
        .map(|row| (row[1].clone(), row[4].clone()))
        .collect();
    assert_ne!(first, reseeded);
}

#[test]
fn duplicates_are_detected_and_non_images_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let tree = image_folder(dir.path(), &[3, 3]);
    // An exact copy under another name and class, a text file posing as an image, an empty file.
    fs::copy(tree.join("class0/img000.png"), tree.join("class1/copy.png")).unwrap();
    fs::write(tree.join("class0/notes.jpg"), "this is not an image").unwrap();
    fs::write(tree.join("class1/empty.png"), "").unwrap();
    let root = dir.path().join("root");
    let out = ok(lazarus(
        &root,
        &["dataset", "add", "d", tree.to_str().unwrap()],
    ));
    assert!(
        out.contains("duplicates: 1 exact copies dropped in 1 groups"),
        "{out}"
    );
    assert!(out.contains("copy.png duplicates"), "{out}");
    assert!(out.contains("(different labels!)"), "{out}");
    assert!(out.contains("skipped: 2 files"), "{out}");
    assert!(
        out.contains("notes.jpg: not a recognised image format"),
        "{out}"
    );
    assert!(out.contains("empty.png: empty file (0 bytes)"), "{out}");

    let summary = json(&ok(lazarus(&root, &["dataset", "show", "d", "--json"])));
    assert_eq!(summary["images"], 6);
    assert_eq!(
        summary["duplicates"][0]["dropped"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(summary["duplicates"][0]["conflicting_labels"], true);
    assert_eq!(summary["skipped"].as_array().unwrap().len(), 2);
}

#[test]
fn csv_manifest_with_header_split_and_mask_columns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut manifest = String::from("image,class,split,mask\n");
    for i in 0..6 {
        write_image(&data.join(format!("img/{i}.png")), i, ImageFormat::Png);
        write_image(
            &data.join(format!("masks/{i}.png")),
            100 + i,
            ImageFormat::Png,
        );
        let split = ["train", "train", "val", "test", "train", "validation"][i as usize];
        manifest.push_str(&format!(
            "img/{i}.png,{},{split},masks/{i}.png\n",
            ["cat", "dog"][i as usize % 2]
        ));
    }
    fs::write(data.join("manifest.csv"), manifest).unwrap();
    let root = dir.path().join("root");
    ok(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "m",
            data.join("manifest.csv").to_str().unwrap(),
        ],
    ));
    let rows = image_rows(&root, "m");
    let splits: Vec<&str> = rows.iter().map(|r| r[4].as_str()).collect();
    assert_eq!(splits, ["train", "train", "val", "test", "train", "val"]);
    assert!(rows[3][5].ends_with("masks/3.png"), "{:?}", rows[3]);
    let summary = json(&ok(lazarus(&root, &["dataset", "show", "m", "--json"])));
    assert_eq!(summary["split_source"], "manifest");
    assert_eq!(summary["has_masks"], true);
    assert_eq!(summary["classes"]["dog"], 3);
}

#[test]
fn tsv_without_header_and_whitespace_label_file_with_label_column() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut tsv = String::new();
    let mut labels = String::new();
    for i in 0..8 {
        write_image(
            &data.join(format!("images/cell{i}.png")),
            i,
            ImageFormat::Png,
        );
        tsv.push_str(&format!("images/cell{i}.png\t{}\n", i % 2));
        // elpv-style: path, defect probability, type, padded with spaces.
        labels.push_str(&format!(
            "images/cell{i}.png  {}     {}\n",
            ["0.0", "1.0", "0.3333333333333333", "0.6666666666666666"][i as usize % 4],
            ["mono", "poly"][i as usize % 2]
        ));
    }
    fs::write(data.join("list.tsv"), tsv).unwrap();
    fs::write(data.join("labels.csv"), labels).unwrap();
    let root = dir.path().join("root");

    ok(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "t",
            data.join("list.tsv").to_str().unwrap(),
        ],
    ));
    let summary = json(&ok(lazarus(&root, &["dataset", "show", "t", "--json"])));
    assert_eq!(summary["format"], "manifest");
    assert_eq!(summary["classes"]["0"], 4);

    let labels_path = data.join("labels.csv");
    ok(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "grade",
            labels_path.to_str().unwrap(),
            "--label-column",
            "2",
        ],
    ));
    let summary = json(&ok(lazarus(&root, &["dataset", "show", "grade", "--json"])));
    assert_eq!(summary["format"], "label-file");
    assert_eq!(summary["classes"].as_object().unwrap().len(), 4);
    // Numeric labels are ordered by value.
    assert_eq!(
        summary["class_order"],
        serde_json::json!(["0.0", "0.3333333333333333", "0.6666666666666666", "1.0"])
    );

    ok(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "kind",
            labels_path.to_str().unwrap(),
            "--label-column",
            "3",
        ],
    ));
    let summary = json(&ok(lazarus(&root, &["dataset", "show", "kind", "--json"])));
    assert_eq!(
        summary["classes"],
        serde_json::json!({"mono": 4, "poly": 4})
    );
}

#[test]
fn unlabeled_folder_and_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("new");
    let formats = [
        ("a.png", ImageFormat::Png),
        ("b.jpg", ImageFormat::Jpeg),
        ("c.tiff", ImageFormat::Tiff),
        ("d.bmp", ImageFormat::Bmp),
        ("e.webp", ImageFormat::WebP),
    ];
    for (i, (name, format)) in formats.iter().enumerate() {
        write_image(&folder.join(name), i as u32, *format);
    }
    // 16-bit grayscale PNG.
    let gray16 = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(9, 9, |x, y| {
        image::Luma([(x * 7000 + y) as u16])
    });
    gray16.save(folder.join("f16.png")).unwrap();
    let root = dir.path().join("root");
    let out = ok(lazarus(
        &root,
        &["dataset", "add", "incoming", folder.to_str().unwrap()],
    ));
    assert!(out.contains("6 images (unlabeled)"), "{out}");
    let rows = image_rows(&root, "incoming");
    assert!(rows.iter().all(|r| r[3].is_empty()));
    assert_eq!(rows[5][6], "9", "width of the 16-bit image: {:?}", rows[5]);
}

#[test]
fn bad_inputs_name_the_file_and_line_and_leave_datasets_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let tree = image_folder(dir.path(), &[2, 2]);
    ok(lazarus(
        &root,
        &["dataset", "add", "keep", tree.to_str().unwrap()],
    ));
    let record = root.join("jobs/datasets/keep/dataset.json");
    let before = fs::read(&record).unwrap();
    let images_before = fs::read(root.join("jobs/datasets/keep/images.csv")).unwrap();

    // Missing source.
    let err = fails(lazarus(&root, &["dataset", "add", "x", "/no/such/place"]));
    assert!(
        err.contains("source /no/such/place does not exist"),
        "{err}"
    );

    // Empty folder.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = fails(lazarus(
        &root,
        &["dataset", "add", "x", empty.to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!("{}: no images found", empty.display())),
        "{err}"
    );

    // CSV row with too few columns, at line 3.
    let data = dir.path().join("data");
    write_image(&data.join("a.png"), 1, ImageFormat::Png);
    write_image(&data.join("b.png"), 2, ImageFormat::Png);
    let short = data.join("short.csv");
    fs::write(&short, "path,label\na.png,x\nb.png\n").unwrap();
    let err = fails(lazarus(
        &root,
        &["dataset", "add", "x", short.to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!(
            "{}:3: expected at least 2 columns, found 1",
            short.display()
        )),
        "{err}"
    );

    // Unknown label column, by name and by number.
    let good = data.join("good.csv");
    fs::write(&good, "path,label\na.png,x\nb.png,y\n").unwrap();
    let err = fails(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "x",
            good.to_str().unwrap(),
            "--label-column",
            "grade",
        ],
    ));
    assert!(
        err.contains(&format!(
            "{}:1: unknown label column 'grade'; columns: path, label",
            good.display()
        )),
        "{err}"
    );
    let err = fails(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "x",
            good.to_str().unwrap(),
            "--label-column",
            "5",
        ],
    ));
    assert!(err.contains("unknown label column 5"), "{err}");

    // A path outside the manifest's folder is fine (issue 18), but one
    // naming no file is skipped, named with the manifest's line.
    let escape = data.join("escape.csv");
    fs::write(&escape, "../tree/class0/no-such-image.png,x\n").unwrap();
    let err = fails(lazarus(
        &root,
        &["dataset", "add", "x", escape.to_str().unwrap()],
    ));
    assert!(
        err.contains("no-such-image.png: file not found")
            && err.contains(&format!("(named at {}:1)", escape.display())),
        "{err}"
    );

    // Duplicate dataset name.
    let err = fails(lazarus(
        &root,
        &["dataset", "add", "keep", tree.to_str().unwrap()],
    ));
    assert!(err.contains("dataset 'keep' already exists"), "{err}");

    // Each error is one line, and nothing registered before changed or was added.
    for bad in [&short, &good, &escape] {
        let err = fails(lazarus(
            &root,
            &[
                "dataset",
                "add",
                "x",
                bad.to_str().unwrap(),
                "--label-column",
                "grade",
            ],
        ));
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert_eq!(fs::read(&record).unwrap(), before);
    assert_eq!(
        fs::read(root.join("jobs/datasets/keep/images.csv")).unwrap(),
        images_before
    );
    let names: Vec<_> = fs::read_dir(root.join("jobs/datasets"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("keep")]);

    // Unknown dataset.
    let err = fails(lazarus(&root, &["dataset", "show", "nope"]));
    assert!(
        err.contains("dataset 'nope' is not registered") && err.contains("registered: keep"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2_and_help_lists_every_verb() {
    let dir = tempfile::tempdir().unwrap();
    let out = lazarus(dir.path(), &["dataset", "add"]);
    assert_eq!(out.status.code(), Some(2));
    let out = lazarus(dir.path(), &["no-such-verb"]);
    assert_eq!(out.status.code(), Some(2));
    let version = ok(lazarus(dir.path(), &["--version"]));
    assert!(version.starts_with("lazarus "), "{version}");
    let help = ok(lazarus(dir.path(), &["--help"]));
    for verb in [
        "dataset",
        "enqueue",
        "run-worker",
        "status",
        "verify",
        "train",
        "sweep",
        "experiments",
        "predict",
        "encoders",
        "weights",
    ] {
        assert!(help.contains(verb), "--help lists {verb}: {help}");
    }
}

/// `lazarus --root ROOT ARGS...`, killed (and the test failed) if it takes
/// longer than a minute: the way a hang shows up as a failure.
fn lazarus_within_a_minute(root: &std::path::Path, args: &[&str]) -> std::process::Output {
    use std::time::{Duration, Instant};
    let mut child = support::queue_command(root, None)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("lazarus {args:?} hung for a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Issue 19, item 7: only regular files are read. A FIFO among the images
/// (which a plain read would wait on for ever) is listed as skipped with
/// its kind; so are links to folders, which are never followed (no scan
/// can loop), and broken links. Links to files are followed wherever they
/// point, as a manifest's paths may.
#[test]
fn only_regular_files_are_read_and_links_to_folders_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let folder = dir.path().join("incoming");
    write_image(&folder.join("a.png"), 1, ImageFormat::Png);
    write_image(&folder.join("b.png"), 2, ImageFormat::Png);
    mkfifo(&folder.join("pipe.png"));
    let outside = dir.path().join("elsewhere");
    write_image(&outside.join("c.png"), 3, ImageFormat::Png);
    std::os::unix::fs::symlink(outside.join("c.png"), folder.join("c-link.png")).unwrap();
    std::os::unix::fs::symlink(&outside, folder.join("more")).unwrap();
    std::os::unix::fs::symlink(folder.join("gone.png"), folder.join("broken.png")).unwrap();
    let out = lazarus_within_a_minute(
        &root,
        &[
            "dataset",
            "add",
            "incoming",
            folder.to_str().unwrap(),
            "--json",
        ],
    );
    let summary = json(&ok(out));
    assert_eq!(summary["images"], 3, "a, b and the linked c: {summary}");
    let skipped: BTreeMap<String, String> = summary["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let path = s["path"].as_str().unwrap();
            let name = path.rsplit('/').next().unwrap().to_string();
            (name, s["reason"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        skipped["pipe.png"], "not a regular file (FIFO)",
        "{skipped:?}"
    );
    assert!(skipped["more"].contains("symbolic link to a folder: not followed"));
    assert!(skipped["broken.png"].contains("broken symbolic link"));
    let rows = image_rows(&root, "incoming");
    assert!(
        rows.iter().any(|r| r[2].ends_with("c-link.png")),
        "{rows:?}"
    );

    // A manifest naming the FIFO skips it the same way.
    let manifest = dir.path().join("list.csv");
    fs::write(
        &manifest,
        "path,label\nincoming/a.png,x\nincoming/pipe.png,y\n",
    )
    .unwrap();
    let out = lazarus_within_a_minute(
        &root,
        &[
            "dataset",
            "add",
            "listed",
            manifest.to_str().unwrap(),
            "--json",
        ],
    );
    let summary = json(&ok(out));
    assert_eq!(summary["images"], 1);
    assert_eq!(summary["skipped"][0]["reason"], "not a regular file (FIFO)");
    // And a FIFO given as the source itself is refused, not waited on.
    let err = fails(lazarus_within_a_minute(
        &root,
        &[
            "dataset",
            "add",
            "pipe",
            folder.join("pipe.png").to_str().unwrap(),
        ],
    ));
    assert!(err.contains("not a regular file (FIFO)"), "{err}");
}

/// Issue 19, item 10: a whitespace label file whose columns are tab
/// separated is read as a TSV manifest by detection; its error now says how
/// to read it as a label file.
#[test]
fn a_label_file_with_tabs_is_pointed_to_format_label_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let data = dir.path().join("cells");
    write_image(&data.join("images/a.png"), 1, ImageFormat::Png);
    write_image(&data.join("images/b.png"), 2, ImageFormat::Png);
    let labels = data.join("labels.csv");
    fs::write(
        &labels,
        "images/a.png\t1.0\tmono\nimages/b.png\t0.0\tpoly\n",
    )
    .unwrap();
    let err = fails(lazarus(
        &root,
        &["dataset", "add", "cells", labels.to_str().unwrap()],
    ));
    assert!(
        err.contains("unknown split 'mono'") && err.contains("--format label-file"),
        "{err}"
    );
    let summary = json(&ok(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "cells",
            labels.to_str().unwrap(),
            "--format",
            "label-file",
            "--json",
        ],
    )));
    assert_eq!(summary["images"], 2);
    assert_eq!(summary["class_order"], serde_json::json!(["0.0", "1.0"]));
}
