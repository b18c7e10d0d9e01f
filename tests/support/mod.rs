//! Shared helpers for CLI tests: run the real binary, generate small images.
#![allow(dead_code)] // each test file uses a different subset

pub mod assets;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{ImageFormat, Rgb, RgbImage};

/// Runs `lazarus --root ROOT ARGS...` and returns its output.
pub fn lazarus(root: &Path, args: &[&str]) -> Output {
    lazarus_on(root, None, args)
}

/// `lazarus ...` with its queue in `queue` (a PostgreSQL URL), or in the
/// root's SQLite file when `None`.
pub fn lazarus_on(root: &Path, queue: Option<&str>, args: &[&str]) -> Output {
    queue_command(root, queue)
        .args(args)
        .output()
        .expect("the lazarus binary runs")
}

/// `lazarus --root ROOT` with its queue set as in [`lazarus_on`].
pub fn queue_command(root: &Path, queue: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lazarus"));
    command.arg("--root").arg(root);
    // A developer's shared queue must never receive test jobs.
    match queue {
        Some(url) => command.env("LAZARUS_QUEUE", url),
        None => command.env_remove("LAZARUS_QUEUE"),
    };
    command
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Asserts exit code 1 and returns stderr.
pub fn fails(output: Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected failure (exit 1)\nstdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    stderr(&output)
}

/// A small image whose pixels depend on `seed`, so every seed gives distinct content.
pub fn write_image(path: &Path, seed: u32, format: ImageFormat) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let image = RgbImage::from_fn(12, 10, |x, y| {
        let v = seed
            .wrapping_mul(2_654_435_761)
            .wrapping_add(x * 31 + y * 17);
        Rgb([
            (v & 255) as u8,
            ((v >> 8) & 255) as u8,
            ((v >> 16) & 255) as u8,
        ])
    });
    image.save_with_format(path, format).unwrap();
}

/// An ImageFolder tree: `counts[i]` PNGs in class folder `class{i}`; returns the tree's root.
pub fn image_folder(dir: &Path, counts: &[usize]) -> PathBuf {
    let root = dir.join("tree");
    let mut seed = 0;
    for (class, &count) in counts.iter().enumerate() {
        for i in 0..count {
            seed += 1;
            write_image(
                &root
                    .join(format!("class{class}"))
                    .join(format!("img{i:03}.png")),
                seed,
                ImageFormat::Png,
            );
        }
    }
    root
}

/// Parses `dataset show NAME --images --csv` into rows of cells.
pub fn image_rows(root: &Path, name: &str) -> Vec<Vec<String>> {
    let text = ok(lazarus(
        root,
        &["dataset", "show", name, "--images", "--csv"],
    ));
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(&header[..5], ["index", "id", "path", "label", "split"]);
    reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
