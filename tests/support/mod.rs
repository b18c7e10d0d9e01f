//! Shared helpers for CLI tests: run the real binary, generate small images.
#![allow(dead_code)] // each test file uses a different subset

pub mod assets;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{ImageFormat, Rgb, RgbImage};

/// The name the test harness gives the test `name` of the module whose
/// `module_path!()` is `module`: the test binary's own name is not part of
/// it (`training::experiments_db` → `experiments_db::name`). Tests that run
/// themselves again in a child process select themselves by it.
pub fn harness_name(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_, inner)) => format!("{inner}::{name}"),
        None => name.to_string(),
    }
}

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
    // Nor a shared feature store test shards; tests that use one pass it.
    command.env_remove("LAZARUS_FEATURE_STORE");
    command
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The folder of the only run under ROOT/experiments/runs and its newest
/// complete checkpoint (epochs done), once it has one.
fn newest_checkpoint(root: &Path) -> Option<(PathBuf, usize)> {
    let run = std::fs::read_dir(root.join("experiments/runs"))
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.path().is_dir())?
        .path();
    let newest = std::fs::read_dir(run.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("epoch-")?
                .strip_suffix(".json")?
                .parse::<usize>()
                .ok()
        })
        .max()?;
    Some((run, newest))
}

/// Starts `lazarus --root ROOT ARGS...` (a training run, the only one under
/// ROOT), kills it with SIGKILL once it has checkpointed `epochs` epochs,
/// mid-run, and returns its run folder.
pub fn kill_after_checkpoint(root: &Path, args: &[&str], epochs: usize) -> PathBuf {
    let mut child = queue_command(root, None)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let run_dir = loop {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        if let Some((run, epoch)) = newest_checkpoint(root)
            && epoch >= epochs
        {
            break run;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Child::kill is SIGKILL on Unix.
    child.kill().unwrap();
    child.wait().unwrap();
    let runs = std::fs::read_dir(root.join("experiments/runs"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(runs, 1, "one run under {}", root.display());
    assert!(
        !run_dir.join("metrics.json").exists(),
        "killed mid-run, before its final write"
    );
    run_dir
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

/// The same pixels as `from` in a PNG of other bytes: a new content id,
/// so no feature cache holds it and `predict` runs the encoder on it.
pub fn reencoded_png(from: &Path, to: &Path) {
    let pixels = image::open(from).unwrap().to_rgb8();
    let mut bytes = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new_with_quality(
            &mut bytes,
            image::codecs::png::CompressionType::Best,
            image::codecs::png::FilterType::NoFilter,
        ),
        pixels.as_raw(),
        pixels.width(),
        pixels.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    assert_ne!(bytes, std::fs::read(from).unwrap(), "{}", from.display());
    std::fs::write(to, bytes).unwrap();
}

/// Registers `image_folder(root, counts)` as dataset `toy` and extracts it
/// with efficientnet-lite0 at random weights (seed 3), for tests that need a
/// run's real encoder (predict, export, anomaly scorers).
pub fn extract_toy(root: &Path, counts: &[usize]) {
    let tree = image_folder(root, counts);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:3",
        ],
    ));
    ok(lazarus(root, &["run-worker", "--until-empty"]));
}

/// An ImageFolder tree: `counts[i]` PNGs in class folder `class{i}`; returns the tree's root.
pub fn image_folder(dir: &Path, counts: &[usize]) -> PathBuf {
    image_folder_from(dir, counts, 0)
}

/// [`image_folder`] with seeds after `first_seed`: trees made with seeds
/// that do not overlap hold different images (the same seeds give the same
/// content, and feature rows belong to content).
pub fn image_folder_from(dir: &Path, counts: &[usize], first_seed: u32) -> PathBuf {
    let root = dir.join("tree");
    let mut seed = first_seed;
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

/// A deterministic uniform number in [0, 1) from a key (splitmix64).
pub fn hash_unit(key: u64) -> f32 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// What `synthetic_features` generates.
pub struct Synthetic<'a> {
    pub name: &'a str,
    /// Images per class (class folders class0, class1, ...).
    pub counts: &'a [usize],
    pub dim: usize,
    /// Distance of each class mean from the origin, in noise standard deviations.
    pub separation: f32,
}

/// Registers an ImageFolder dataset of tiny images and writes f16 features
/// for it in shards of 64 rows (as workers would): class c is centred at
/// `separation` in dimension c (mod dim) with unit, roughly Gaussian noise
/// (sum of four uniforms, rescaled). Returns the number of feature rows.
/// Each dataset name gets images of its own (the same in every root, so
/// splits agree between roots), and each dimension a fingerprint folder of
/// its own (`fp1` for 8 dimensions, as `write_features` uses; one encoder
/// gives one dimension).
pub fn synthetic_features(root: &Path, spec: &Synthetic) -> usize {
    let tree = image_folder_from(&root.join(spec.name), spec.counts, name_seed(spec.name));
    ok(lazarus(
        root,
        &["dataset", "add", spec.name, tree.to_str().unwrap()],
    ));
    let dataset = lazarus::dataset::load(&lazarus::layout::Layout::new(root), spec.name).unwrap();
    let fingerprint = if spec.dim == 8 {
        "fp1".to_string()
    } else {
        format!("fp1-dim{}", spec.dim)
    };
    write_features_as(
        root,
        spec.name,
        (&fingerprint, "toy-encoder"),
        spec.dim,
        |record, d| {
            let class = dataset
                .class_index(record.label.as_deref().unwrap())
                .unwrap();
            let centre = if d == class % spec.dim {
                spec.separation
            } else {
                0.0
            };
            centre + gaussian_noise((record.index * 1_000 + d) as u64 * 4)
        },
    )
}

/// A first seed for a dataset's images from its name (FNV-1a, in steps of
/// 2^20 seeds): one name, the same images in every root.
pub fn name_seed(name: &str) -> u32 {
    let mut hash = 0x811c_9dc5u32;
    for byte in name.bytes() {
        hash = (hash ^ byte as u32).wrapping_mul(0x0100_0193);
    }
    (hash >> 12) << 20
}

/// Roughly standard normal noise from a key: the sum of four uniforms
/// (std 1/sqrt(3)), rescaled.
pub fn gaussian_noise(key: u64) -> f32 {
    let sum: f32 = (0..4).map(|k| hash_unit(key + k)).sum::<f32>() - 2.0;
    sum * 3f32.sqrt()
}

/// Writes f16 features `value(record, dimension)` for every image of the
/// registered dataset `name`, in shards of 64 rows under fingerprint `fp1`
/// with encoder `toy-encoder` in the metadata. Returns the number of rows.
pub fn write_features(
    root: &Path,
    name: &str,
    dim: usize,
    value: impl Fn(&lazarus::dataset::ImageRecord, usize) -> f32,
) -> usize {
    write_features_as(root, name, ("fp1", "toy-encoder"), dim, value)
}

/// The sha256 of an image file: the content id its feature rows carry.
pub fn file_sha256(path: &Path) -> [u8; 32] {
    lazarus::digest::sha256(&std::fs::read(path).unwrap())
}

/// [`write_features`] under another (fingerprint, encoder name), as a
/// worker writes them: in `features/FINGERPRINT`, each row named by the
/// sha256 of its image file, shard indices after those already there.
pub fn write_features_as(
    root: &Path,
    name: &str,
    (fingerprint, encoder): (&str, &str),
    dim: usize,
    value: impl Fn(&lazarus::dataset::ImageRecord, usize) -> f32,
) -> usize {
    write_view_features_as(
        root,
        name,
        (fingerprint, encoder),
        ("1", 1),
        dim,
        |record, _, d| value(record, d),
    )
}

/// [`write_features_as`] with `views` rows per image, as `enqueue --views
/// NAME` writes them (view 0 first, a `view` tensor, `views` in the
/// metadata when not 1): `value(record, view, dimension)`.
pub fn write_view_features_as(
    root: &Path,
    name: &str,
    (fingerprint, encoder): (&str, &str),
    (views_name, views): (&str, usize),
    dim: usize,
    value: impl Fn(&lazarus::dataset::ImageRecord, usize, usize) -> f32,
) -> usize {
    use lazarus::features::{self, JobRef, ShardData};
    let layout = lazarus::layout::Layout::new(root);
    let dataset = lazarus::dataset::load(&layout, name).unwrap();
    let dir = features::feature_dir(&layout, fingerprint);
    let first = features::marked_shards(&dir)
        .unwrap()
        .last()
        .map_or(0, |last| last + 1);
    let mut metadata =
        std::collections::HashMap::from([("encoder".to_string(), encoder.to_string())]);
    if views > 1 {
        metadata.insert("views".to_string(), views_name.to_string());
    }
    for (shard, records) in dataset.images.chunks(64).enumerate() {
        let mut content_ids = Vec::new();
        let mut pooled = Vec::new();
        let mut view_of_row = Vec::new();
        for record in records {
            for view in 0..views {
                content_ids.push(file_sha256(&record.path));
                view_of_row.push(view as u8);
                for d in 0..dim {
                    pooled.push(half::f16::from_f32(value(record, view, d)));
                }
            }
        }
        let data = ShardData {
            content_ids: &content_ids,
            pooled: &pooled,
            feature_dim: dim,
            spatial: None,
            views: (views > 1).then_some(view_of_row.as_slice()),
        };
        let shard_index = first + shard as u64;
        features::write_shard(
            &dir,
            shard_index,
            &data,
            metadata.clone(),
            JobRef {
                job_id: shard_index as i64 + 1,
                attempt: 1,
            },
        )
        .unwrap();
    }
    dataset.images.len()
}

/// Every file under `dir` (in its subfolders too), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// A `LAZARUS_CACHE` under `dir` whose installed Lite0 weights are a file
/// that is not the real one (and not even a safetensors file), recorded
/// with its own sha256 so the install itself is consistent. Returns the
/// cache folder and that sha256: a predictor that loads these weights
/// fails on the file; one that checks them first names both sums.
pub fn other_weights_cache(dir: &Path) -> (PathBuf, String) {
    let cache = dir.join("other-weights-cache");
    let weights = cache.join("weights/efficientnet-lite0");
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::write(weights.join("model.safetensors"), b"other weights").unwrap();
    let installed = lazarus::digest::sha256_hex(b"other weights");
    std::fs::write(weights.join("model.sha256"), &installed).unwrap();
    (cache, installed)
}

/// Copies the files of folder `from` (not its subfolders) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The files a bundle's `manifest.json` lists, sorted.
pub fn manifest_files(bundle: &Path) -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let mut listed: Vec<String> = manifest["files"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    listed.sort();
    listed
}

/// `lazarus --root ROOT ARGS...` with `LAZARUS_CACHE` set to `cache`.
pub fn lazarus_with_cache(root: &Path, cache: &Path, args: &[&str]) -> Output {
    queue_command(root, None)
        .env("LAZARUS_CACHE", cache)
        .args(args)
        .output()
        .expect("the lazarus binary runs")
}
