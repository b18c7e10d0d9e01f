//! `lazarus review` on synthetic features: overlapping classes (so the head
//! gets some images wrong) and an unlabeled dataset. Scores are checked
//! against `lazarus predict`'s probabilities for the same images, computed
//! here by hand (margin p1 - p2, entropy -sum p ln p, mean KL to the mean).

use crate::support;

use std::collections::HashMap;
use std::path::Path;

use support::{
    Synthetic, fails, gaussian_noise, json, lazarus, ok, synthetic_features, write_features,
};

fn train(root: &Path, head: &str, seed: &str) -> String {
    let report = json(&ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--head",
            head,
            "--epochs",
            "5",
            "--lr",
            "0.01",
            "--seed",
            seed,
            "--json",
        ],
    )));
    report["run_id"].as_str().unwrap().to_string()
}

/// Every class probability of every image of `dataset`, by path, from `predict`.
fn probabilities(root: &Path, run: &str, dataset: &str) -> HashMap<String, Vec<(String, f64)>> {
    let predictions = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--run",
            run,
            "--dataset",
            dataset,
            "--top-k",
            "3",
            "--json",
        ],
    )));
    predictions
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let top = p["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t[0].as_str().unwrap().to_string(), t[1].as_f64().unwrap()))
                .collect();
            (p["path"].as_str().unwrap().to_string(), top)
        })
        .collect()
}

fn review(root: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["review", "--dataset", "toy", "--json"];
    all.extend_from_slice(args);
    json(&ok(lazarus(root, &all)))
}

#[test]
fn review_ranks_mispredicted_and_unlabeled_images_and_writes_a_contact_sheet() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    synthetic_features(
        root,
        &Synthetic {
            name: "toy",
            counts: &[30, 30, 30],
            dim: 8,
            separation: 1.0,
        },
    );
    let linear = train(root, "linear", "0");
    let mlp = train(root, "mlp", "1");
    let by_predict = probabilities(root, &linear, "toy");
    let label_of = |path: &str| {
        Path::new(path)
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let mut wrong: Vec<(f64, String)> = by_predict
        .iter()
        .filter(|(path, top)| top[0].0 != label_of(path))
        .map(|(path, top)| (top[0].1 - top[1].1, path.clone()))
        .collect();
    wrong.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        wrong.len() >= 5,
        "too few mispredictions to rank: {}",
        wrong.len()
    );

    // Margin: every mispredicted image is a candidate, smallest p1 - p2 first.
    let out = root.join("sheet");
    let margin = review(
        root,
        &[
            "--run",
            &linear,
            "--strategy",
            "margin",
            "--top",
            "5",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(margin["scored"], 90);
    assert_eq!(margin["candidates"].as_u64().unwrap() as usize, wrong.len());
    let items = margin["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    for (rank, (item, (expected, path))) in items.iter().zip(&wrong).enumerate() {
        assert_eq!(item["rank"], rank + 1);
        assert_eq!(item["path"].as_str().unwrap(), path);
        assert!(item["mispredicted"].as_bool().unwrap());
        assert_eq!(item["true_label"].as_str().unwrap(), label_of(path));
        assert_eq!(item["predicted"].as_str().unwrap(), by_predict[path][0].0);
        let score = item["score"].as_f64().unwrap();
        assert!((score - expected).abs() < 1e-5, "{score} vs {expected}");
    }

    // The contact sheet: CSV, HTML with relative thumbnails that exist.
    let csv = std::fs::read_to_string(out.join("review.csv")).unwrap();
    assert!(csv.starts_with("rank,path,true_label,predicted,probability,score,mispredicted\n"));
    assert_eq!(csv.lines().count(), 6, "{csv}");
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert_eq!(html.matches("class=\"card mispredicted\"").count(), 5);
    for rank in 1..=5 {
        let name = format!("thumbs/{rank:04}.jpg");
        assert!(
            html.contains(&format!("src=\"{name}\"")),
            "{name} not linked"
        );
        let thumbnail = image::open(out.join(&name)).unwrap();
        assert_eq!(thumbnail.width().max(thumbnail.height()), 160);
    }
    assert!(
        !html.contains(root.join("sheet").to_str().unwrap()),
        "links must be relative"
    );
    // A second review replaces the first; a folder that is not a review is refused.
    review(
        root,
        &[
            "--run",
            &linear,
            "--top",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("review.csv"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    assert!(!out.join("thumbs/0005.jpg").exists());
    std::fs::create_dir_all(root.join("notes")).unwrap();
    std::fs::write(root.join("notes/todo.txt"), "keep").unwrap();
    let message = fails(lazarus(
        root,
        &[
            "review",
            "--run",
            &linear,
            "--dataset",
            "toy",
            "--out",
            root.join("notes").to_str().unwrap(),
        ],
    ));
    assert!(
        message.contains("holds files lazarus review did not write (todo.txt)"),
        "{message}"
    );

    // Entropy: highest -sum p ln p first, as computed from predict's probabilities.
    let entropy = review(
        root,
        &["--run", &linear, "--strategy", "entropy", "--top", "3"],
    );
    let mut expected: Vec<(f64, &String)> = wrong
        .iter()
        .map(|(_, path)| {
            let h: f64 = by_predict[path].iter().map(|(_, p)| -p * p.ln()).sum();
            (h, path)
        })
        .collect();
    expected.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (item, (h, path)) in entropy["items"].as_array().unwrap().iter().zip(&expected) {
        assert_eq!(item["path"].as_str().unwrap(), path.as_str());
        assert!((item["score"].as_f64().unwrap() - h).abs() < 1e-5);
    }

    // Disagreement: needs two runs; the score is the mean KL to the consensus.
    let message = fails(lazarus(
        root,
        &[
            "review",
            "--run",
            &linear,
            "--dataset",
            "toy",
            "--strategy",
            "disagreement",
        ],
    ));
    assert!(
        message.contains("give at least 2 with --run, got 1"),
        "{message}"
    );
    let committee = review(
        root,
        &[
            "--run",
            &linear,
            "--run",
            &mlp,
            "--strategy",
            "disagreement",
            "--top",
            "4",
        ],
    );
    let by_mlp = probabilities(root, &mlp, "toy");
    let items = committee["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    let mut previous = f64::INFINITY;
    for item in items {
        let path = item["path"].as_str().unwrap();
        let distribution = |top: &[(String, f64)]| {
            let mut p: Vec<(String, f64)> = top.to_vec();
            p.sort_by(|x, y| x.0.cmp(&y.0));
            p.into_iter().map(|(_, v)| v).collect::<Vec<f64>>()
        };
        let (a, b) = (distribution(&by_predict[path]), distribution(&by_mlp[path]));
        let mean: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect();
        let kl = |p: &[f64]| -> f64 {
            p.iter()
                .zip(&mean)
                .filter(|(v, _)| **v > 0.0)
                .map(|(v, m)| v * (v / m).ln())
                .sum()
        };
        let expected = (kl(&a) + kl(&b)) / 2.0;
        let score = item["score"].as_f64().unwrap();
        assert!(
            (score - expected).abs() < 1e-5,
            "{path}: {score} vs {expected}"
        );
        assert!(score <= previous);
        previous = score;
    }

    // Unlabeled images are candidates whatever the prediction.
    let incoming = root.join("incoming");
    for i in 0..6 {
        support::write_image(
            &incoming.join(format!("new{i}.png")),
            1000 + i,
            image::ImageFormat::Png,
        );
    }
    ok(lazarus(
        root,
        &["dataset", "add", "incoming", incoming.to_str().unwrap()],
    ));
    write_features(root, "incoming", 8, |record, d| {
        gaussian_noise((record.index * 1_000 + d) as u64 * 4 + 7)
    });
    let unlabeled = json(&ok(lazarus(
        root,
        &[
            "review",
            "--run",
            &linear,
            "--dataset",
            "incoming",
            "--strategy",
            "entropy",
            "--json",
        ],
    )));
    assert_eq!(unlabeled["candidates"], 6);
    assert!(
        unlabeled["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["true_label"].is_null() && !i["mispredicted"].as_bool().unwrap())
    );
    let message = fails(lazarus(
        root,
        &["review", "--run", "nope", "--dataset", "toy"],
    ));
    assert!(message.contains("run nope not found"), "{message}");
}
