//! `lazarus serve` end to end: the real binary on an ephemeral loopback
//! port, driven by a real HTTP client (ureq). Models of every task are
//! trained on generated 64x64 images with a random-weight Lite0 (woven
//! texture; "blob" images carry a bright disc, their masks are the disc):
//! a classifier (run and exported bundle), image-level and patch-level
//! anomaly runs, and a segmentation run.
//!
//! The reference for every number is `lazarus predict` on the same images
//! and run: answers must equal it bit for bit (one image per `predict`
//! call where `predict` scores a call's images together).

use crate::support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use serde_json::Value;
use support::{hash_unit, json, lazarus, ok, queue_command};

const ENCODER: &str = "efficientnet-lite0";
const WEIGHTS: &str = "random:3";

/// Woven texture with per-pixel noise, and a bright disc when `blob` is
/// set; the mask is the disc.
fn part_image(seed: u64, width: u32, height: u32, blob: bool) -> (RgbImage, GrayImage) {
    let (cx, cy, r) = (
        width as f32 * (0.3 + 0.4 * hash_unit(seed * 31 + 2)),
        height as f32 * (0.3 + 0.4 * hash_unit(seed * 31 + 3)),
        8.0 + 4.0 * hash_unit(seed * 31 + 1),
    );
    let inside = |x: u32, y: u32| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        blob && dx * dx + dy * dy <= r * r
    };
    let image = RgbImage::from_fn(width, height, |x, y| {
        let noise = hash_unit(seed * 7_919 + (y * width + x) as u64) - 0.5;
        let weave = (x as f32 * 0.8).sin() * (y as f32 * 0.8).cos();
        let value = if inside(x, y) {
            230.0 + 20.0 * noise
        } else {
            100.0 + 35.0 * weave + 30.0 * noise
        };
        let v = value.clamp(0.0, 255.0) as u8;
        Rgb([v, v, (v as f32 * 0.9) as u8])
    });
    let mask = GrayImage::from_fn(width, height, |x, y| {
        Luma([if inside(x, y) { 255 } else { 0 }])
    });
    (image, mask)
}

fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
        .unwrap();
    bytes
}

/// (split, good count, blob count).
const SPLITS: [(&str, usize, usize); 3] = [("train", 12, 4), ("val", 4, 4), ("test", 4, 4)];

/// The dataset `parts`: images, masks and manifest under `dir`.
fn write_dataset(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut manifest = String::from("path,label,split,mask\n");
    let mut seed = 0u64;
    for (split, good, blobs) in SPLITS {
        for i in 0..good + blobs {
            seed += 1;
            let blob = i >= good;
            let (image, mask) = part_image(seed, 64, 64, blob);
            let name = format!("{split}-{i:02}");
            image
                .save_with_format(dir.join(format!("{name}.png")), ImageFormat::Png)
                .unwrap();
            mask.save_with_format(dir.join(format!("{name}-mask.png")), ImageFormat::Png)
                .unwrap();
            let label = if blob { "blob" } else { "good" };
            manifest.push_str(&format!("{name}.png,{label},{split},{name}-mask.png\n"));
        }
    }
    let path = dir.join("manifest.csv");
    std::fs::write(&path, manifest).unwrap();
    path
}

/// The run id of a `train ... --json` report.
fn train(root: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", "--dataset", "parts", "--encoder", ENCODER];
    args.extend_from_slice(extra);
    args.push("--json");
    let report = json(&ok(lazarus(root, &args)));
    report["run_id"].as_str().unwrap().to_string()
}

/// Registers `parts` and extracts its pooled features.
fn dataset_root(root: &Path, data: &Path) {
    let manifest = write_dataset(data);
    ok(lazarus(
        root,
        &["dataset", "add", "parts", manifest.to_str().unwrap()],
    ));
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "parts",
            "--encoder",
            ENCODER,
            "--weights",
            WEIGHTS,
        ],
    ));
    ok(lazarus(root, &["run-worker", "--until-empty"]));
}

/// `dataset_root`, then a classifier trained on it.
fn classifier_root(root: &Path, data: &Path) -> String {
    dataset_root(root, data);
    train(root, &["--epochs", "3"])
}

/// A running `lazarus serve`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `lazarus --root ROOT serve --addr 127.0.0.1:0 ARGS...` and
    /// waits until it listens and every model is loaded. These tests check
    /// answers, not latency: a generous request timeout keeps a loaded test
    /// machine from turning slow answers into 504s.
    fn start(root: &Path, args: &[&str]) -> Server {
        let mut child = queue_command(root, None)
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(["--request-timeout-secs", "300"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
        let lines = output.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = addr_sender.send(addr.parse::<SocketAddr>().unwrap());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let errors = output.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                errors.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        let addr = addr_receiver
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no listening line: {:?}", output.lock().unwrap()));
        let server = Server {
            child,
            addr,
            output,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let (status, _) = server.get("/readyz");
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "/readyz while loading");
            assert!(
                Instant::now() < deadline,
                "not ready: {:?}",
                server.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn output(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = agent().get(&self.url(path)).call().unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    /// POSTs `body` with `content_type` to the model's predict route.
    fn predict(&self, model: &str, query: &str, content_type: &str, body: &[u8]) -> Answer {
        let url = self.url(&format!("/v1/models/{model}/predict{query}"));
        let mut response = agent()
            .post(&url)
            .header("Content-Type", content_type)
            .send(body)
            .unwrap();
        Answer::from_response(&mut response)
    }

    /// SIGTERM, then the exit code.
    fn terminate(mut self) -> (Option<i32>, Vec<String>) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (status.code(), self.output());
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// A response: status, Retry-After and the JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

impl Answer {
    fn from_response(response: &mut ureq::http::Response<ureq::Body>) -> Answer {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            retry_after,
            body,
        }
    }

    fn ok(self) -> Value {
        assert_eq!(self.status, 200, "{:#}", self.body);
        self.body
    }

    /// The error message of a refusal with `status`.
    fn refused(self, status: u16) -> String {
        assert_eq!(self.status, status, "{:#}", self.body);
        assert_eq!(self.body["error"]["status"], status, "{:#}", self.body);
        self.body["error"]["message"].as_str().unwrap().to_string()
    }
}

/// A multipart/form-data body of PNG parts; returns (content type, body).
fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "lazarus-test-boundary-7f3a9c";
    let mut body = Vec::new();
    for (filename, bytes) in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .unwrap();
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The one prediction of a single-image answer.
fn single(answer: &Value) -> &Value {
    let predictions = answer["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 1, "{answer:#}");
    &predictions[0]
}

/// An answer without what differs between two requests of the same images.
fn comparable(answer: &Value) -> Value {
    let mut answer = answer.clone();
    let object = answer.as_object_mut().unwrap();
    object.remove("request_id");
    object.remove("latency_ms");
    answer
}

/// Decoded 8-bit gray pixels of a PNG (base64 in an answer, or a file).
fn gray_pixels(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let image = image::load_from_memory(png).unwrap().to_luma8();
    (image.width(), image.height(), image.into_raw())
}

fn base64_png(value: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap())
        .unwrap()
}

/// A metric's value in `/metrics`' text, by its series line prefix.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Two images of the dataset (cached features) and three new ones (the
/// encoder), one of them 320x160 (21 tiles of 64 px: two groups of 16).
fn request_images(temp: &Path) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let images_dir = temp.join("requests");
    std::fs::create_dir_all(&images_dir).unwrap();
    let mut images: Vec<PathBuf> = ["test-00.png", "test-05.png"]
        .iter()
        .map(|name| temp.join("parts").join(name))
        .collect();
    for (i, (width, height, blob)) in [(64, 64, false), (96, 80, true), (320, 160, true)]
        .into_iter()
        .enumerate()
    {
        let path = images_dir.join(format!("new-{i}.png"));
        let (image, _) = part_image(1_000 + i as u64, width, height, blob);
        image.save_with_format(&path, ImageFormat::Png).unwrap();
        images.push(path);
    }
    let bytes = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    (images, bytes)
}

/// 32 concurrent clients, each sending five requests over `models` and
/// `bytes`: every answer equals the same request sent alone, and every
/// model ran batches of two or more images.
fn concurrent_answers_equal_alone(server: &Server, models: &[&str], bytes: &[Vec<u8>]) {
    let query = "?mask=true&heatmap=true";
    let alone: Vec<Vec<Value>> = models
        .iter()
        .map(|model| {
            bytes
                .iter()
                .map(|b| comparable(&server.predict(model, query, "image/png", b).ok()))
                .collect()
        })
        .collect();
    let start = Barrier::new(32);
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..32)
            .map(|client| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    let mut answers = Vec::new();
                    for round in 0..5 {
                        let model = (client + round) % models.len();
                        let image = (client / models.len() + round) % bytes.len();
                        let answer = server
                            .predict(models[model], query, "image/png", &bytes[image])
                            .ok();
                        answers.push((model, image, comparable(&answer)));
                    }
                    answers
                })
            })
            .collect();
        for client in clients {
            for (model, image, answer) in client.join().unwrap() {
                assert_eq!(
                    answer, alone[model][image],
                    "{} image {image}",
                    models[model]
                );
            }
        }
    });
    let (_, metrics) = server.get("/metrics");
    for model in models {
        let series = format!("lazarus_serve_batch_size_bucket{{model=\"{model}\",le=\"1\"}}");
        let alone_batches = metric(&metrics, &series);
        let batches = metric(
            &metrics,
            &format!("lazarus_serve_batch_size_count{{model=\"{model}\"}}"),
        );
        assert!(
            batches > alone_batches,
            "{model}: no batch of two or more images ({batches} batches)"
        );
        assert!(
            metrics.contains(&format!("lazarus_serve_queue_depth{{model=\"{model}\"}} 0")),
            "{metrics}"
        );
    }
    assert!(metrics.contains("# TYPE lazarus_serve_request_duration_seconds histogram"));
}

#[test]
fn classification_runs_and_bundles_answer_as_predict_does_alone_or_batched() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let classifier = classifier_root(&root, &temp.path().join("parts"));
    let bundle = temp.path().join("parts-bundle");
    ok(lazarus(
        &root,
        &["export", &classifier, "--out", bundle.to_str().unwrap()],
    ));
    let (images, bytes) = request_images(temp.path());
    let bundle_arg = format!("cls={}", bundle.display());
    let server = Server::start(
        &root,
        &[
            "--bundle",
            &bundle_arg,
            "--run",
            &format!("run-cls={classifier}"),
            "--max-wait-ms",
            "50",
        ],
    );

    // The models' descriptions.
    let (status, listed) = server.get("/v1/models");
    assert_eq!(status, 200);
    let listed = json(&listed);
    assert_eq!(listed["ready"], true);
    let names: Vec<(&str, &str)> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["task"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("cls", "classify"), ("run-cls", "classify")]);
    let (status, shown) = server.get("/v1/models/cls");
    assert_eq!(status, 200);
    let shown = json(&shown);
    let manifest = std::fs::read(bundle.join("manifest.json")).unwrap();
    assert_eq!(
        shown["model_sha256"],
        lazarus::digest::sha256_hex(&manifest)
    );
    assert_eq!(shown["classes"], serde_json::json!(["blob", "good"]));
    assert_eq!(shown["encoder"]["name"], ENCODER);
    assert_eq!(shown["encoder"]["weights"], WEIGHTS);
    assert_eq!(
        shown["model_card"]["run_id"].as_str(),
        Some(classifier.as_str())
    );
    let (status, shown) = server.get("/v1/models/run-cls");
    assert_eq!(status, 200);
    assert_eq!(json(&shown)["model_sha256"].as_str().unwrap().len(), 64);
    let (status, _) = server.get("/v1/models/nope");
    assert_eq!(status, 404);

    // `predict --batch-size 1` scores each image's row alone, as the server
    // does (the head's matmul rounds differently with more rows).
    let paths: Vec<&str> = images.iter().map(|p| p.to_str().unwrap()).collect();
    for (model, source) in [
        ("cls", ["--bundle", bundle.to_str().unwrap()]),
        ("run-cls", ["--run", classifier.as_str()]),
    ] {
        let mut args = vec![
            "predict",
            source[0],
            source[1],
            "--batch-size",
            "1",
            "--json",
        ];
        args.extend_from_slice(&paths);
        let expected = json(&ok(lazarus(&root, &args)));
        for (i, body) in bytes.iter().enumerate() {
            let answer = server.predict(model, "?top_k=2", "image/png", body).ok();
            assert_eq!(answer["task"], "classify");
            assert_eq!(answer["model"], model);
            assert_eq!(answer["request_id"].as_str().unwrap().len(), 32);
            let got = single(&answer);
            let want = &expected[i];
            assert_eq!(got["image_id"], want["image_id"], "{model} image {i}");
            assert_eq!(got["top"], want["top"], "{model} image {i}");
            assert_eq!(
                got["features_from"], want["features_from"],
                "{model} image {i}"
            );
            let probabilities = got["probabilities"].as_object().unwrap();
            for pair in want["top"].as_array().unwrap() {
                assert_eq!(probabilities[pair[0].as_str().unwrap()], pair[1]);
            }
        }
    }
    // The run reuses its cache for the dataset's images; the bundle has none.
    let from = |model: &str, i: usize| {
        single(&server.predict(model, "", "image/png", &bytes[i]).ok())["features_from"].clone()
    };
    assert_eq!(from("run-cls", 0), "cache");
    assert_eq!(from("run-cls", 2), "encoder");
    assert_eq!(from("cls", 0), "encoder");

    // Several images in one multipart request: the same answers, in order,
    // named by their parts' file names.
    let parts: Vec<(&str, &[u8])> = vec![("a.png", &bytes[0]), ("b.png", &bytes[3])];
    let (content_type, body) = multipart(&parts);
    let together = server.predict("run-cls", "", &content_type, &body).ok();
    let predictions = together["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2);
    for (k, i) in [0, 3].into_iter().enumerate() {
        let alone = server.predict("run-cls", "", "image/png", &bytes[i]).ok();
        let mut with_name = single(&alone).clone();
        with_name["index"] = k.into();
        with_name["filename"] = parts[k].0.into();
        assert_eq!(predictions[k], with_name);
    }

    concurrent_answers_equal_alone(&server, &["cls", "run-cls"], &bytes);
    let (_, metrics) = server.get("/metrics");
    let answered = metric(
        &metrics,
        "lazarus_serve_requests_total{model=\"cls\",status=\"200\"}",
    );
    assert!(answered >= 5.0 + 1.0 + 80.0 + 5.0, "{answered}");
    let (code, output) = server.terminate();
    assert_eq!(code, Some(0), "{output:?}");
}

#[test]
fn anomaly_and_segmentation_runs_answer_as_predict_does_alone_or_batched() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    dataset_root(&root, &temp.path().join("parts"));
    let anomaly = train(
        &root,
        &["--task", "anomaly", "--normal-label", "good", "--k", "1"],
    );
    // Spatial features in 64-pixel tiles, so larger images have many.
    ok(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "parts",
            "--encoder",
            ENCODER,
            "--weights",
            WEIGHTS,
            "--spatial",
            "--tile-size",
            "64",
            "--tile-overlap",
            "16",
        ],
    ));
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let patch = train(
        &root,
        &[
            "--task",
            "anomaly",
            "--normal-label",
            "good",
            "--spatial",
            "--k",
            "1",
        ],
    );
    let segment = train(&root, &["--task", "segment", "--epochs", "2"]);
    let (images, bytes) = request_images(temp.path());
    // Each run exported too: its bundle is served beside it.
    let mut bundle_args = Vec::new();
    for (name, run) in [
        ("anomaly", &anomaly),
        ("patch", &patch),
        ("segment", &segment),
    ] {
        let bundle = temp.path().join(format!("{name}-bundle"));
        ok(lazarus(
            &root,
            &["export", run, "--out", bundle.to_str().unwrap()],
        ));
        bundle_args.push("--bundle".to_string());
        bundle_args.push(format!("{name}-bundle={}", bundle.display()));
    }
    let mut args: Vec<String> = [
        "--run",
        &format!("anomaly={anomaly}"),
        "--run",
        &format!("patch={patch}"),
        "--run",
        &format!("segment={segment}"),
        "--max-wait-ms",
        "50",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(bundle_args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&root, &args);
    let (_, shown) = server.get("/v1/models/patch-bundle");
    let shown = json(&shown);
    assert_eq!(shown["task"], "anomaly");
    assert_eq!(shown["patch_level"], true);
    assert!(shown["feature_cache"].is_null(), "{shown:#}");
    let (_, shown) = server.get("/v1/models/patch");
    let shown = json(&shown);
    assert_eq!(shown["task"], "anomaly");
    assert_eq!(shown["patch_level"], true);

    // Image-level anomaly: `predict` scores a call's images together, so
    // one call per image.
    for (i, path) in images.iter().enumerate() {
        let expected = json(&ok(lazarus(
            &root,
            &[
                "predict",
                "--run",
                &anomaly,
                path.to_str().unwrap(),
                "--json",
            ],
        )));
        let want = &expected["images"][0];
        let answer = server.predict("anomaly", "", "image/png", &bytes[i]).ok();
        assert_eq!(answer["task"], "anomaly");
        let got = single(&answer);
        assert_eq!(got["score"], want["score"], "anomaly image {i}");
        assert_eq!(got["anomalous"], want["anomalous"], "anomaly image {i}");
        assert_eq!(got["threshold"], expected["threshold"]);
        assert_eq!(got["features_from"], want["features_from"]);
    }

    // Patch-level anomaly and segmentation: scores, peaks, heat maps and
    // masks as `predict` writes them.
    let out = temp.path().join("predicted");
    let paths: Vec<&str> = images.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec![
        "predict",
        "--run",
        &patch,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(&paths);
    let expected = json(&ok(lazarus(&root, &args)));
    for (i, path) in images.iter().enumerate() {
        let want = &expected["images"][i];
        let answer = server
            .predict("patch", "?heatmap=true", "image/png", &bytes[i])
            .ok();
        let got = single(&answer);
        assert_eq!(got["score"], want["score"], "patch image {i}");
        assert_eq!(got["peak"], want["peak"], "patch image {i}");
        assert_eq!(got["features_from"], want["features_from"]);
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let file = std::fs::read(out.join(format!("{stem}.heatmap.png"))).unwrap();
        assert_eq!(
            gray_pixels(&base64_png(&got["heatmap_png"])),
            gray_pixels(&file),
            "patch image {i}"
        );
    }
    let mut args = vec![
        "predict",
        "--run",
        &segment,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(&paths);
    let expected = json(&ok(lazarus(&root, &args)));
    for (i, path) in images.iter().enumerate() {
        let want = &expected[i];
        let answer = server
            .predict("segment", "?mask=true", "image/png", &bytes[i])
            .ok();
        let got = single(&answer);
        for key in [
            "width",
            "height",
            "tiles",
            "foreground_fraction",
            "features_from",
        ] {
            assert_eq!(got[key], want[key], "segment image {i}: {key}");
        }
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let file = std::fs::read(out.join(format!("{stem}.mask.png"))).unwrap();
        assert_eq!(
            gray_pixels(&base64_png(&got["mask_png"])),
            gray_pixels(&file),
            "segment image {i}"
        );
    }
    assert_eq!(
        single(&server.predict("segment", "", "image/png", &bytes[4]).ok())["tiles"],
        21
    );

    // Several images in one multipart request: the same answers, in order.
    let parts: Vec<(&str, &[u8])> = vec![("a.png", &bytes[2]), ("b.png", &bytes[3])];
    let (content_type, body) = multipart(&parts);
    let together = server
        .predict("segment", "?mask=true", &content_type, &body)
        .ok();
    let predictions = together["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2);
    for (k, i) in [2, 3].into_iter().enumerate() {
        let alone = server
            .predict("segment", "?mask=true", "image/png", &bytes[i])
            .ok();
        let mut with_name = single(&alone).clone();
        with_name["index"] = k.into();
        with_name["filename"] = parts[k].0.into();
        assert_eq!(predictions[k], with_name);
    }

    // A bundle answers as its run: the same numbers and pictures for the
    // new images; the dataset's images through the encoder (a bundle has
    // no cache).
    let query = "?mask=true&heatmap=true";
    for model in ["anomaly", "patch", "segment"] {
        let bundle_model = format!("{model}-bundle");
        for (i, image_bytes) in bytes.iter().enumerate() {
            let from_run = server.predict(model, query, "image/png", image_bytes).ok();
            let from_bundle = server
                .predict(&bundle_model, query, "image/png", image_bytes)
                .ok();
            assert_eq!(from_bundle["task"], from_run["task"]);
            let (from_run, from_bundle) = (single(&from_run), single(&from_bundle));
            assert_eq!(from_bundle["features_from"], "encoder", "{model} image {i}");
            if from_run["features_from"] == "encoder" {
                assert_eq!(from_bundle, from_run, "{model} image {i}");
            }
        }
    }

    concurrent_answers_equal_alone(
        &server,
        &["anomaly", "patch", "segment", "segment-bundle"],
        &bytes,
    );
    let (code, output) = server.terminate();
    assert_eq!(code, Some(0), "{output:?}");
}

/// A PNG whose header claims `width` x `height` and whose pixels are cut
/// short (signature, IHDR, a tiny IDAT, IEND; CRCs correct).
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &byte in bytes {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let chunk = |out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut typed = kind.to_vec();
        typed.extend_from_slice(data);
        out.extend_from_slice(&typed);
        out.extend_from_slice(&crc32(&typed).to_be_bytes());
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &header);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn bad_requests_get_their_status_and_the_server_keeps_serving() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let run = classifier_root(&root, &temp.path().join("parts"));
    let server = Server::start(
        &root,
        &[
            "--run",
            &format!("m={run}"),
            "--no-audit",
            "--max-body",
            "1MiB",
            "--max-images",
            "3",
            "--max-queue",
            "4",
            "--max-batch",
            "1",
        ],
    );
    let (image, _) = part_image(77, 64, 64, true);
    let good = png_bytes(&image);
    let serves = |server: &Server| {
        let answer = server.predict("m", "", "image/png", &good).ok();
        assert_eq!(single(&answer)["top"].as_array().unwrap().len(), 2);
    };
    serves(&server);

    let random: Vec<u8> = (0..5_000u64)
        .map(|i| (hash_unit(i) * 256.0) as u8)
        .collect();
    let message = server.predict("m", "", "image/png", &random).refused(422);
    assert!(
        message.contains("not a recognised image format"),
        "{message}"
    );
    serves(&server);

    let truncated = &good[..good.len() / 2];
    let message = server.predict("m", "", "image/png", truncated).refused(422);
    assert!(message.contains("cannot decode"), "{message}");
    serves(&server);

    let message = server.predict("m", "", "image/png", b"").refused(400);
    assert!(message.contains("empty body"), "{message}");

    let bomb = png_claiming(40_000, 40_000);
    let message = server.predict("m", "", "image/png", &bomb).refused(422);
    assert!(
        message.contains("40000x40000") && message.contains("decompression-bomb guard"),
        "{message}"
    );
    serves(&server);

    let message = server.predict("m", "", "text/plain", &good).refused(415);
    assert!(message.contains("text/plain is not an image"), "{message}");
    let message = server.predict("m", "", "image/gif", &good).refused(415);
    assert!(message.contains("image/gif"), "{message}");
    let mut response = agent()
        .post(&server.url("/v1/models/m/predict"))
        .send(&good[..])
        .unwrap();
    let message = Answer::from_response(&mut response).refused(415);
    assert!(message.contains("no Content-Type"), "{message}");

    let message = server.predict("nope", "", "image/png", &good).refused(404);
    assert!(
        message.contains("\"nope\"") && message.contains("m"),
        "{message}"
    );
    let message = server
        .predict("m", "?top_k=many", "image/png", &good)
        .refused(400);
    assert!(message.contains("top_k"), "{message}");
    let message = server
        .predict("m", "?colour=red", "image/png", &good)
        .refused(400);
    assert!(message.contains("colour"), "{message}");

    // 100 MB, announced by its length: refused before the body is sent
    // (the client waits for 100-continue, as curl does for large bodies).
    let huge = vec![0u8; 100 << 20];
    let mut response = agent()
        .post(&server.url("/v1/models/m/predict"))
        .header("Content-Type", "image/png")
        .header("Expect", "100-continue")
        .send(&huge[..])
        .unwrap();
    let message = Answer::from_response(&mut response).refused(413);
    assert!(
        message.contains("104857600 bytes") && message.contains("1048576"),
        "{message}"
    );
    serves(&server);
    // Without a length (chunked): refused once the limit is passed.
    let mut response = agent()
        .post(&server.url("/v1/models/m/predict"))
        .header("Content-Type", "image/png")
        .send(ureq::SendBody::from_reader(&mut &huge[..2 << 20]))
        .unwrap();
    let message = Answer::from_response(&mut response).refused(413);
    assert!(
        message.contains("exceeds the limit of 1048576 bytes"),
        "{message}"
    );
    serves(&server);

    // Multipart: too many images, a part that is not an image, none at all.
    let (content_type, body) = multipart(&[
        ("a.png", &good),
        ("b.png", &good),
        ("c.png", &good),
        ("d.png", &good),
    ]);
    let message = server.predict("m", "", &content_type, &body).refused(413);
    assert!(message.contains("more than 3 images"), "{message}");
    let boundary = "xyz";
    let text_part = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    );
    let message = server
        .predict(
            "m",
            "",
            &format!("multipart/form-data; boundary={boundary}"),
            text_part.as_bytes(),
        )
        .refused(415);
    assert!(message.contains("part 0 (note)"), "{message}");
    let message = server
        .predict(
            "m",
            "",
            &format!("multipart/form-data; boundary={boundary}"),
            format!("--{boundary}--\r\n").as_bytes(),
        )
        .refused(400);
    assert!(message.contains("no images"), "{message}");
    let (content_type, body) = multipart(&[("a.png", &good), ("bad.png", b"not an image")]);
    let message = server.predict("m", "", &content_type, &body).refused(422);
    assert!(message.contains("part 1 (bad.png)"), "{message}");
    serves(&server);

    // A client that disconnects mid-upload.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "POST /v1/models/m/predict HTTP/1.1\r\nHost: {}\r\nContent-Type: image/png\r\nContent-Length: 500000\r\n\r\n",
        server.addr
    )
    .unwrap();
    stream.write_all(&good[..good.len() / 2]).unwrap();
    drop(stream);
    // A client that sends half a body and waits: 408 after the timeout is
    // not waited for here; the server answers others meanwhile.
    serves(&server);

    // A full queue: 503 with Retry-After (4 images wait at most, one per batch).
    let start = Arc::new(Barrier::new(24));
    let server = Arc::new(server);
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let (start, server, good) = (start.clone(), server.clone(), good.clone());
            std::thread::spawn(move || {
                start.wait();
                let answer = server.predict("m", "", "image/png", &good);
                (answer.status, answer.retry_after)
            })
        })
        .collect();
    let statuses: Vec<(u16, Option<String>)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    assert!(
        statuses
            .iter()
            .any(|(s, retry)| *s == 503 && retry.as_deref() == Some("1")),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|(s, _)| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    serves(&server);

    // Every refusal is counted, under the model's name (unknown: "").
    let (_, metrics) = server.get("/metrics");
    for (status, least) in [
        ("200", 9.0),
        ("400", 4.0),
        ("413", 3.0),
        ("415", 4.0),
        ("422", 4.0),
        ("503", 1.0),
    ] {
        let count = metric(
            &metrics,
            &format!("lazarus_serve_requests_total{{model=\"m\",status=\"{status}\"}}"),
        );
        assert!(count >= least, "status {status}: {count}\n{metrics}");
    }
    assert_eq!(
        metric(
            &metrics,
            "lazarus_serve_requests_total{model=\"\",status=\"404\"}"
        ),
        1.0
    );

    // The page, and nothing fetched from elsewhere.
    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>lazarus serve</title>"));
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"));
    let (status, health) = server.get("/healthz");
    assert_eq!(
        (status, json(&health)["status"].as_str()),
        (200, Some("ok"))
    );
    let (status, _) = server.get("/no/such/route");
    assert_eq!(status, 404);
    assert!(!root.join("serving").exists(), "--no-audit writes no trail");
    let server = Arc::try_unwrap(server).ok().unwrap();
    let (code, output) = server.terminate();
    assert_eq!(code, Some(0), "{output:?}");
}

/// An audit row: model, model sha256, image sha256, answer, latency, client.
type RecordRow = (String, String, String, String, f64, String);

#[test]
fn sigterm_under_load_answers_accepted_requests_and_keeps_every_answer_in_the_audit_trail() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let run = classifier_root(&root, &temp.path().join("parts"));
    let bundle = temp.path().join("bundle");
    ok(lazarus(
        &root,
        &["export", &run, "--out", bundle.to_str().unwrap()],
    ));
    let server = Server::start(
        &root,
        &[
            "--bundle",
            bundle.to_str().unwrap(),
            "--run",
            &run,
            "--max-batch",
            "4",
        ],
    );
    let images: Vec<Vec<u8>> = (0..8)
        .map(|i| png_bytes(&part_image(500 + i, 64, 64, i % 2 == 0).0))
        .collect();
    let models = ["bundle".to_string(), run.clone()];

    // 16 clients send until the server stops answering; each keeps the
    // request ids of its 2xx answers.
    let server = Arc::new(server);
    let images = Arc::new(images);
    let stop_at = Instant::now() + Duration::from_secs(60);
    let clients: Vec<_> = (0..16)
        .map(|client| {
            let (server, images, models) = (server.clone(), images.clone(), models.clone());
            std::thread::spawn(move || {
                let mut answered = Vec::new();
                let mut round = 0;
                while Instant::now() < stop_at {
                    round += 1;
                    let model = &models[(client + round) % 2];
                    let image = &images[(client * 3 + round) % images.len()];
                    let url = server.url(&format!("/v1/models/{model}/predict"));
                    let result = if round % 3 == 0 {
                        let (content_type, body) = multipart(&[("x.png", image), ("y.png", image)]);
                        agent()
                            .post(&url)
                            .header("Content-Type", content_type)
                            .send(&body[..])
                    } else {
                        agent()
                            .post(&url)
                            .header("Content-Type", "image/png")
                            .send(&image[..])
                    };
                    match result {
                        Ok(mut response) => {
                            let answer = Answer::from_response(&mut response);
                            if (200..300).contains(&answer.status) {
                                answered.push(answer.body);
                            }
                        }
                        // Refused connections: the server has stopped listening.
                        Err(_) => break,
                    }
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2_500));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    let answers: Vec<Value> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let mut server = Arc::try_unwrap(server).ok().unwrap();
    let status = server.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let output = server.output();
    assert_eq!(status.code(), Some(0), "{output:?}");
    assert!(
        output.iter().any(|l| l.starts_with("stopping (SIGTERM)")),
        "{output:?}"
    );
    assert!(
        answers.len() > 16,
        "only {} answers before SIGTERM",
        answers.len()
    );

    // Every answered image is in the trail, whole; nothing else is.
    let db = rusqlite::Connection::open(root.join("serving/inference_records.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let mut rows: BTreeMap<(String, u32), RecordRow> = BTreeMap::new();
    let mut statement = db
        .prepare("SELECT request_id, image_index, model, model_sha256, image_sha256, answer, latency_ms, client FROM inference_records")
        .unwrap();
    let mut query = statement.query([]).unwrap();
    while let Some(row) = query.next().unwrap() {
        rows.insert(
            (row.get(0).unwrap(), row.get(1).unwrap()),
            (
                row.get(2).unwrap(),
                row.get(3).unwrap(),
                row.get(4).unwrap(),
                row.get(5).unwrap(),
                row.get(6).unwrap(),
                row.get(7).unwrap(),
            ),
        );
    }
    let mut images_answered = 0;
    for answer in &answers {
        let request = answer["request_id"].as_str().unwrap();
        for prediction in answer["predictions"].as_array().unwrap() {
            images_answered += 1;
            let index = prediction["index"].as_u64().unwrap() as u32;
            let (model, model_sha256, image_sha256, recorded, latency, client) =
                rows.get(&(request.to_string(), index)).unwrap_or_else(|| {
                    panic!(
                        "request {request} image {index} answered 2xx but not in the audit trail"
                    )
                });
            assert_eq!(model, answer["model"].as_str().unwrap());
            assert_eq!(model_sha256, answer["model_sha256"].as_str().unwrap());
            assert_eq!(image_sha256, prediction["image_id"].as_str().unwrap());
            assert_eq!(model_sha256.len(), 64);
            let recorded: Value = serde_json::from_str(recorded).unwrap();
            assert_eq!(recorded["top"], prediction["top"]);
            assert!(*latency > 0.0);
            assert!(client.starts_with("127.0.0.1:"), "{client}");
        }
    }
    assert_eq!(
        rows.len(),
        images_answered,
        "the trail holds exactly the answered images"
    );

    // serve-log reads it back: filters, JSON and CSV.
    let some = answers[0]["request_id"].as_str().unwrap().to_string();
    let logged = json(&ok(lazarus(
        &root,
        &["serve-log", "--request", &some, "--json"],
    )));
    assert_eq!(
        logged.as_array().unwrap().len(),
        answers[0]["predictions"].as_array().unwrap().len()
    );
    assert_eq!(logged[0]["request_id"], some.as_str());
    let bundle_rows = json(&ok(lazarus(
        &root,
        &["serve-log", "--model", "bundle", "--limit", "0", "--json"],
    )));
    let expected = rows.values().filter(|r| r.0 == "bundle").count();
    assert_eq!(bundle_rows.as_array().unwrap().len(), expected);
    let newest = json(&ok(lazarus(
        &root,
        &["serve-log", "--limit", "3", "--json"],
    )));
    let times: Vec<i64> = newest
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["time_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(times.len(), 3);
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    let csv = ok(lazarus(
        &root,
        &["serve-log", "--since", "1h", "--limit", "0", "--csv"],
    ));
    assert!(csv.starts_with("time,request_id,image_index,model,task,image_sha256,answer,latency_ms,client,model_sha256"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + rows.len());
    let text = ok(lazarus(&root, &["serve-log", "--limit", "2"]));
    assert!(
        text.lines().nth(2).unwrap().contains("good")
            || text.lines().nth(2).unwrap().contains("blob"),
        "{text}"
    );
    let none = json(&ok(lazarus(
        &root,
        &["serve-log", "--until", "2000-01-01T00:00:00Z", "--json"],
    )));
    assert_eq!(none, serde_json::json!([]));
    let error = support::fails(lazarus(&root, &["serve-log", "--since", "yesterdayish"]));
    assert!(error.contains("--since \"yesterdayish\""), "{error}");
}

#[test]
fn a_model_that_cannot_load_stops_the_server_with_its_error() {
    let temp = tempfile::tempdir().unwrap();
    let bundle = temp.path().join("not-a-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let output = queue_command(temp.path(), None)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--bundle",
            bundle.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("model not-a-bundle") && stderr.contains("manifest.json is missing"),
        "{stderr}"
    );
    let mut stdout = String::new();
    output
        .stdout
        .as_slice()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(
        stdout.starts_with("listening on http://127.0.0.1:"),
        "{stdout}"
    );

    let output = queue_command(temp.path(), None)
        .args(["serve", "--run", "a", "--run", "b", "--name", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("NAME=RUN"));
    let output = queue_command(temp.path(), None)
        .args(["serve", "--run", "a", "--run", "b=a", "--bundle", "a=x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("two models are named \"a\""));
}
