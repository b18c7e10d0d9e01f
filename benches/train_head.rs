//! Benchmark: head-only training on generated f16 feature caches, through the
//! release `lazarus train` binary.
//!
//! - `cargo bench --bench train_head -- speed`: 60,000 x 1,280 features,
//!   10 classes, linear head, 10 epochs (batch 256, AdamW); prints seconds
//!   and samples/s (best of 3). scripts/bench_train_compare.sh runs it back to
//!   back with the same loop in PyTorch (scripts/bench_train_pytorch.py).
//! - `cargo bench --bench train_head -- memory`: a cache of 2,400,000 x 1,280
//!   f16 features (6.1 GB, shards of 1,024 rows), evicted from the page
//!   cache, trained with `--memory-budget 1GiB` inside a memory cgroup
//!   limited to 1 GiB (v1 or v2, below this process's own; root needed),
//!   which proves the budget: the run must finish without an OOM kill.
//!   Prints the cgroup's peak and the run's own figures (peak anonymous
//!   memory, peak mapped feature pages, VmHWM). Without a cgroup it falls
//!   back to asserting the run's anonymous plus mapped peaks.
//!
//! - `cargo bench --bench train_head -- sweep`: the 24-head sweep of issue 8
//!   (linear and MLP x 3 learning rates x 2 class weightings x 2 seeds, 20
//!   epochs) on 10,000 x 1,280 features, against one linear and one MLP
//!   head trained alone for the same epochs, in the same run.
//!
//! Caches are generated once under `target/bench-train/` (or
//! `$LAZARUS_BENCH_DIR`) and reused. Class c is centred at 0.5 in dimensions
//! [128c, 128c + 128) with unit noise, so the task is learnable but not trivial.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use half::f16;
use lazarus::dataset::{DatasetInfo, ImageRecord, Split, SplitConfig, write_images_csv};
use lazarus::features::{self, JobRef, ShardData};
use lazarus::layout::Layout;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 1280;
const CLASSES: usize = 10;

struct Cache {
    name: &'static str,
    rows: usize,
    rows_per_shard: usize,
}

fn bench_dir() -> PathBuf {
    std::env::var_os("LAZARUS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-train"))
}

/// The split and class of a row, from the row alone.
fn row_label(index: usize) -> (usize, Split) {
    let mut rng = ChaCha8Rng::seed_from_u64(index as u64);
    let class = rng.random_range(0..CLASSES);
    let split = match rng.random_range(0..10) {
        0 => Split::Val,
        1 => Split::Test,
        _ => Split::Train,
    };
    (class, split)
}

/// Generates the dataset manifest and feature shards once; returns the root.
fn ensure_cache(cache: &Cache) -> PathBuf {
    let root = bench_dir().join(cache.name);
    let layout = Layout::new(&root);
    // v2: shards name rows by content id (issue 18); older caches regenerate.
    let marker = root.join("complete-v2");
    if marker.exists() {
        return root;
    }
    let _ = std::fs::remove_dir_all(&root);
    eprintln!(
        "generating {} rows x {DIM} f16 features in {} (once)",
        cache.rows,
        root.display()
    );
    let started = Instant::now();
    let class_names: Vec<String> = (0..CLASSES).map(|c| format!("class{c}")).collect();
    let mut images = Vec::with_capacity(cache.rows);
    let mut classes = BTreeMap::new();
    let mut splits = BTreeMap::new();
    for index in 0..cache.rows {
        let (class, split) = row_label(index);
        *classes.entry(class_names[class].clone()).or_insert(0) += 1;
        *splits.entry(split.as_str().to_string()).or_insert(0) += 1;
        images.push(ImageRecord {
            index,
            id: hex::encode(generated_id(index)),
            path: PathBuf::from(format!("generated/{index}.png")),
            label: Some(class_names[class].clone()),
            split,
            mask: None,
            width: 224,
            height: 224,
            added: 1,
            removed: None,
        });
    }
    let info = DatasetInfo {
        name: cache.name.to_string(),
        source: PathBuf::from("generated"),
        format: lazarus::dataset::SourceFormat::Manifest,
        created_at: "generated".into(),
        lazarus_version: lazarus::VERSION.into(),
        images: cache.rows,
        classes,
        class_order: class_names.clone(),
        imbalance_ratio: Some(1.0),
        splits,
        split_source: "manifest".into(),
        split_config: SplitConfig::default(),
        has_masks: false,
        mask_kind: Default::default(),
        duplicates: Vec::new(),
        skipped: Vec::new(),
        version: 1,
        versions: Vec::new(),
        label_map: BTreeMap::new(),
        label_column: None,
        base_dir: None,
    };
    let dataset_dir = layout.dataset_dir(cache.name);
    std::fs::create_dir_all(&dataset_dir).unwrap();
    std::fs::write(
        dataset_dir.join("dataset.json"),
        serde_json::to_vec_pretty(&info).unwrap(),
    )
    .unwrap();
    let mut csv = Vec::new();
    write_images_csv(&images, &mut csv).unwrap();
    std::fs::write(dataset_dir.join("images.csv"), csv).unwrap();
    drop(images);

    let dir = features::feature_dir(&layout, "generated");
    let metadata =
        std::collections::HashMap::from([("encoder".to_string(), "generated".to_string())]);
    let shards = cache.rows.div_ceil(cache.rows_per_shard);
    for shard in 0..shards {
        let start = shard * cache.rows_per_shard;
        let end = (start + cache.rows_per_shard).min(cache.rows);
        let mut rng = ChaCha8Rng::seed_from_u64(1_000_000 + shard as u64);
        let mut pooled = Vec::with_capacity((end - start) * DIM);
        for index in start..end {
            let (class, _) = row_label(index);
            for d in 0..DIM {
                // Sum of 4 uniforms, rescaled: roughly Gaussian with unit variance.
                let noise: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
                let centre = if d / 128 == class { 0.5 } else { 0.0 };
                pooled.push(f16::from_f32(centre + noise * 3f32.sqrt()));
            }
        }
        let content_ids: Vec<[u8; 32]> = (start..end).map(generated_id).collect();
        features::write_shard(
            &dir,
            shard as u64,
            &ShardData {
                content_ids: &content_ids,
                pooled: &pooled,
                feature_dim: DIM,
                spatial: None,
                views: None,
            },
            metadata.clone(),
            JobRef {
                job_id: shard as i64 + 1,
                attempt: 1,
            },
        )
        .unwrap();
    }
    std::fs::write(&marker, b"").unwrap();
    eprintln!("generated in {:.0} s", started.elapsed().as_secs_f64());
    root
}

/// The content id of generated row `index` (there is no image file).
fn generated_id(index: usize) -> [u8; 32] {
    lazarus::digest::sha256(format!("generated row {index}").as_bytes())
}

/// Runs `lazarus train` with the shared settings plus `extra`.
fn train(root: &Path, dataset: &str, extra: &[&str]) -> (f64, serde_json::Value) {
    let started = Instant::now();
    let output = train_command(root, dataset, extra).output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "lazarus train failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (seconds, serde_json::from_slice(&output.stdout).unwrap())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn speed() {
    let cache = Cache {
        name: "speed",
        rows: 60_000,
        rows_per_shard: 64,
    };
    let root = ensure_cache(&cache);
    println!("load average before: {}", load_average());
    let mut best = f64::INFINITY;
    let mut accuracy = 0.0;
    for _ in 0..3 {
        let (seconds, report) = train(
            &root,
            cache.name,
            &[
                "--epochs",
                "10",
                "--head",
                "linear",
                "--checkpoint-every",
                "0",
            ],
        );
        best = best.min(seconds);
        accuracy = report["test"]["test/accuracy"].as_f64().unwrap();
    }
    let train_rows = (0..cache.rows)
        .filter(|&i| row_label(i).1 == Split::Train)
        .count();
    println!("load average after: {}", load_average());
    println!(
        "lazarus train: 60000 x 1280 f16, 10 classes, linear, 10 epochs, batch 256 \
         (whole process: load, checks, per-epoch train+val metrics, test): \
         best {best:.2} s, {:.0} training samples/s, test accuracy {accuracy:.4}",
        train_rows as f64 * 10.0 / best
    );
}

/// The budget the memory benchmark proves.
const MEMORY_BUDGET: u64 = 1 << 30;

fn memory() {
    let cache = Cache {
        name: "memory",
        rows: 2_400_000,
        rows_per_shard: 1024,
    };
    let root = ensure_cache(&cache);
    let bytes = cache.rows * DIM * 2;
    let args = [
        "--epochs",
        "2",
        "--memory-budget",
        "1GiB",
        "--head",
        "linear",
        "--checkpoint-every",
        "0",
    ];
    // The run must read its features from disk, not from pages another
    // process already brought into the page cache (and was charged for).
    evict_from_page_cache(&features::feature_dir(&Layout::new(&root), "generated"));
    println!("load average before: {}", load_average());
    let cgroup = match LimitedCgroup::create(MEMORY_BUDGET) {
        Ok(cgroup) => Some(cgroup),
        Err(why) => {
            println!("no memory cgroup ({why}): falling back to the run's own RSS figures");
            None
        }
    };
    let started = Instant::now();
    let output = match &cgroup {
        Some(cgroup) => cgroup.command(&root, cache.name, &args).output().unwrap(),
        None => train_command(&root, cache.name, &args).output().unwrap(),
    };
    let seconds = started.elapsed().as_secs_f64();
    let cgroup_figures = cgroup.as_ref().map(LimitedCgroup::figures);
    println!("load average after: {}", load_average());
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    if let Some(figures) = &cgroup_figures {
        println!(
            "cgroup v{} {}: limit {:.0} MiB, peak {:.0} MiB (page cache charged to it included), \
             OOM kills {}",
            figures.version,
            figures.path,
            mib(MEMORY_BUDGET),
            mib(figures.peak_bytes),
            figures.oom_kills
        );
    }
    assert!(
        output.status.success(),
        "lazarus train failed ({:?}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let memory = &report["memory"];
    let anonymous = memory["peak_anonymous_bytes"].as_u64().unwrap_or(0);
    let file_backed = memory["peak_file_backed_bytes"].as_u64().unwrap_or(0);
    let rss = report["peak_rss_bytes"].as_u64().unwrap_or(0);
    println!(
        "lazarus train --memory-budget 1GiB on a {:.2} GB cache (2400000 x 1280 f16), read \
         from disk: {seconds:.0} s for 2 epochs; peak anonymous {:.0} MiB ({:.1}% of the \
         budget), peak mapped feature pages {:.0} MiB, VmHWM {:.0} MiB; plan {}, test \
         accuracy {:.4}",
        bytes as f64 / 1e9,
        mib(anonymous),
        100.0 * anonymous as f64 / MEMORY_BUDGET as f64,
        mib(file_backed),
        mib(rss),
        report["plan"],
        report["test"]["test/accuracy"].as_f64().unwrap_or(f64::NAN)
    );
    match cgroup_figures {
        // The kernel enforced the budget: the run finished inside it.
        Some(figures) => {
            assert_eq!(figures.oom_kills, 0, "the run was OOM-killed in its cgroup");
            assert!(figures.peak_bytes <= MEMORY_BUDGET);
        }
        None => assert!(
            anonymous > 0 && anonymous + file_backed < MEMORY_BUDGET,
            "anonymous {anonymous} + mapped {file_backed} bytes exceed the 1 GiB budget"
        ),
    }
    assert!(
        anonymous > 0 && anonymous < MEMORY_BUDGET,
        "peak anonymous memory {anonymous} bytes is over the budget"
    );
}

/// Drops the page-cache pages of every file in `dir` (`dd iflag=nocache
/// count=0` advises the kernel per file; only clean pages of these files go).
fn evict_from_page_cache(dir: &Path) {
    let started = Instant::now();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let status = Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .unwrap();
        assert!(status.success(), "dd could not evict {}", path.display());
        files += 1;
    }
    println!(
        "evicted {files} files of {} from the page cache in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
}

/// `lazarus train` on a generated cache, with the shared settings plus `extra`.
fn train_command(root: &Path, dataset: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lazarus"));
    command
        .arg("--root")
        .arg(root)
        .args(train_args(dataset))
        .args(extra);
    command
}

fn train_args(dataset: &str) -> Vec<&str> {
    vec![
        "train",
        "--dataset",
        dataset,
        "--encoder",
        "generated",
        "--lr",
        "0.001",
        "--batch-size",
        "256",
        "--json",
    ]
}

/// A memory cgroup of our own, below this process's, with a hard limit
/// (cgroup v1 `memory.limit_in_bytes` or v2 `memory.max`); removed on drop.
struct LimitedCgroup {
    version: u8,
    dir: PathBuf,
}

/// What the kernel recorded for a cgroup.
struct CgroupFigures {
    version: u8,
    path: String,
    peak_bytes: u64,
    oom_kills: u64,
}

impl LimitedCgroup {
    fn create(limit: u64) -> Result<Self, String> {
        let membership = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let v1 = membership.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.trim_start_matches('/').to_string())
        });
        let name = format!("lazarus-bench-{}", std::process::id());
        let write = |path: PathBuf, value: &str| {
            std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))
        };
        let (version, parent) = match v1 {
            Some(relative) => (1, PathBuf::from("/sys/fs/cgroup/memory").join(relative)),
            None => {
                let relative = membership
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .ok_or("no memory cgroup in /proc/self/cgroup")?;
                let parent = PathBuf::from("/sys/fs/cgroup").join(relative.trim_start_matches('/'));
                // A v2 child only gets the memory controller if the parent hands it down.
                let controllers = std::fs::read_to_string(parent.join("cgroup.subtree_control"))
                    .unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == "memory") {
                    write(parent.join("cgroup.subtree_control"), "+memory")?;
                }
                (2, parent)
            }
        };
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cgroup = LimitedCgroup { version, dir };
        let limit = limit.to_string();
        if version == 1 {
            write(cgroup.dir.join("memory.limit_in_bytes"), &limit)?;
        } else {
            write(cgroup.dir.join("memory.max"), &limit)?;
            let _ = write(cgroup.dir.join("memory.swap.max"), "0");
        }
        Ok(cgroup)
    }

    /// `lazarus train` that moves itself into the cgroup before it starts.
    fn command(&self, root: &Path, dataset: &str, extra: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.dir)
            .arg(env!("CARGO_BIN_EXE_lazarus"))
            .arg("--root")
            .arg(root)
            .args(train_args(dataset))
            .args(extra);
        command
    }

    fn figures(&self) -> CgroupFigures {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (peak, oom_kills) = if self.version == 1 {
            (
                read("memory.max_usage_in_bytes")
                    .trim()
                    .parse()
                    .unwrap_or(0),
                field(&read("memory.oom_control"), "oom_kill "),
            )
        } else {
            (
                read("memory.peak").trim().parse().unwrap_or(0),
                field(&read("memory.events"), "oom_kill "),
            )
        };
        CgroupFigures {
            version: self.version,
            path: self.dir.display().to_string(),
            peak_bytes: peak,
            oom_kills,
        }
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        // Empty once the run exited; a cgroup folder is removed with rmdir.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn sweep() {
    let cache = Cache {
        name: "sweep",
        rows: 10_000,
        rows_per_shard: 64,
    };
    let root = ensure_cache(&cache);
    let file = root.join("sweep.toml");
    std::fs::write(
        &file,
        "name = \"bench-sweep\"\ndataset = \"sweep\"\nencoder = \"generated\"\nepochs = 20\n\
         [grid]\nhead = [\"linear\", \"mlp\"]\nlr = [0.001, 0.003, 0.01]\n\
         class_weights = [\"none\", \"balanced\"]\nseed = [0, 1]\n",
    )
    .unwrap();
    println!("load average before: {}", load_average());
    let alone = |head: &str| {
        // Checkpoints every epoch, as the sweep's runs.
        let (seconds, _) = train(
            &root,
            cache.name,
            &["--epochs", "20", "--head", head, "--checkpoint-every", "1"],
        );
        seconds
    };
    let linear = alone("linear");
    let mlp = alone("mlp");
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .arg("--root")
        .arg(&root)
        .args(["sweep", file.to_str().unwrap(), "--force", "--json"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "lazarus sweep failed");
    let swept = started.elapsed().as_secs_f64();
    println!("load average after: {}", load_average());
    println!(
        "sweep of 24 heads (linear+mlp x 3 lr x 2 class weights x 2 seeds), 20 epochs, \
         10000 x 1280 f16: {swept:.1} s; one linear head alone {linear:.1} s ({:.1}x), \
         one MLP head (256 hidden) alone {mlp:.1} s ({:.1}x); 24 separate runs would take \
         about {:.1} s",
        swept / linear,
        swept / mlp,
        12.0 * (linear + mlp)
    );
    arithmetic_floor(cache.rows, 20, swept, mlp);
}

/// The least time the sweep's multiply-adds take at this machine's best
/// measured f32 matmul rate: what no scheduling of the heads can beat.
fn arithmetic_floor(rows: usize, epochs: usize, swept: f64, mlp_alone: f64) {
    let (mut train_rows, mut val_rows) = (0usize, 0usize);
    for index in 0..rows {
        match row_label(index).1 {
            Split::Train => train_rows += 1,
            Split::Val => val_rows += 1,
            Split::Test => {}
        }
    }
    // Per epoch a layer of `inputs x outputs` costs, per training row, its
    // forward product and its weight gradient (plus the input gradient
    // below the first layer), and per row of the train and val evaluation
    // one forward product. The final test evaluation is left out.
    let layer = |inputs: usize, outputs: usize, first: bool| -> f64 {
        let passes = if first { 2.0 } else { 3.0 };
        let per_epoch = (passes * train_rows as f64 + (train_rows + val_rows) as f64)
            * inputs as f64
            * outputs as f64;
        per_epoch * epochs as f64
    };
    let linear = layer(DIM, CLASSES, true);
    let mlp = layer(DIM, 256, true) + layer(256, CLASSES, false);
    let grid = 12.0 * (linear + mlp);
    let rate = best_matmul_rate();
    let floor = grid / rate;
    println!(
        "arithmetic: one MLP head {:.0} G multiply-adds, the 24-head grid {:.0} G; best f32 \
         matmul rate on this machine ({} threads, the kernels crate's) {:.1} G multiply-adds/s: the grid \
         needs at least {floor:.1} s ({:.1}x one MLP head alone); the sweep ran at {:.0}% \
         of that rate, one MLP head alone at {:.0}%",
        mlp / 1e9,
        grid / 1e9,
        rayon::current_num_threads(),
        rate / 1e9,
        floor / mlp_alone,
        100.0 * floor / swept,
        100.0 * (mlp / rate) / mlp_alone,
    );
}

/// Multiply-adds per second of the training steps' f32 matmul (the kernels
/// crate's) on all threads, the best of a few shapes near the sweep's (a
/// micro-batch of 256 rows against stacked first layers) and one large
/// square product.
fn best_matmul_rate() -> f64 {
    use lazarus_kernels::matmul::{Accumulate, Matrix, Parallelism, matmul};
    let shapes = [(256, DIM, 256), (256, DIM, 1536), (1024, 1024, 1024)];
    let mut best = 0.0f64;
    for (rows, inner, cols) in shapes {
        let a: Vec<f32> = (0..rows * inner)
            .map(|at| ((at / inner * 7 + at % inner) % 13) as f32 * 0.1)
            .collect();
        let b: Vec<f32> = (0..inner * cols)
            .map(|at| ((at / cols + at % cols * 3) % 11) as f32 * 0.1)
            .collect();
        let mut out = vec![0f32; rows * cols];
        let work = (rows * inner * cols) as f64;
        let repeats = (4e9 / work).ceil() as usize;
        for _ in 0..3 {
            let started = Instant::now();
            for _ in 0..repeats {
                matmul(
                    &mut out,
                    Accumulate::Replace,
                    Matrix::row_major(&a, rows, inner),
                    Matrix::row_major(&b, inner, cols),
                    Parallelism::Pool,
                );
            }
            best = best.max(work * repeats as f64 / started.elapsed().as_secs_f64());
        }
    }
    best
}

fn main() {
    let mode = std::env::args()
        .skip(1)
        .find(|a| a == "speed" || a == "memory" || a == "sweep");
    match mode.as_deref() {
        Some("memory") => memory(),
        Some("speed") => speed(),
        Some("sweep") => sweep(),
        _ => {
            speed();
            memory();
            sweep();
        }
    }
}
