//! Deterministic stratified train/val/test splits.
//!
//! Within each class, images are ordered by sha256(seed, image id) and cut at
//! the configured fractions. The order depends only on the seed and the
//! content ids, so the same files always land in the same split, whatever
//! their names or the order they were found in.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which part of a dataset an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = String;

    /// Accepts the usual spellings found in manifests.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "val" | "valid" | "validation" | "dev" => Ok(Split::Val),
            "test" | "testing" => Ok(Split::Test),
            other => Err(format!(
                "unknown split '{other}' (expected train, val or test)"
            )),
        }
    }
}

/// Split fractions and the seed that orders images within each class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub train: f64,
    pub val: f64,
    pub test: f64,
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            train: 0.8,
            val: 0.1,
            test: 0.1,
            seed: 0,
        }
    }
}

impl SplitConfig {
    /// Fractions must be non-negative, sum to 1 and give train a share.
    pub fn validate(&self) -> Result<(), String> {
        let fractions = [self.train, self.val, self.test];
        if fractions.iter().any(|f| !f.is_finite() || *f < 0.0) {
            return Err(format!(
                "split fractions must be non-negative: train {} val {} test {}",
                self.train, self.val, self.test
            ));
        }
        let sum: f64 = fractions.iter().sum();
        if (sum - 1.0).abs() > 1e-6 || self.train <= 0.0 {
            return Err(format!(
                "split fractions must sum to 1 with train > 0: train {} + val {} + test {} = {sum}",
                self.train, self.val, self.test
            ));
        }
        Ok(())
    }

    /// Parses "80/10/10" or "0.8/0.1/0.1".
    pub fn parse_fractions(text: &str) -> Result<(f64, f64, f64), String> {
        let parts: Vec<f64> = text
            .split('/')
            .map(|p| p.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                format!("invalid split '{text}': expected TRAIN/VAL/TEST such as 80/10/10")
            })?;
        let [train, val, test] = parts[..] else {
            return Err(format!(
                "invalid split '{text}': expected three parts such as 80/10/10"
            ));
        };
        let sum = train + val + test;
        if sum <= 0.0 {
            return Err(format!("invalid split '{text}': parts sum to {sum}"));
        }
        Ok((train / sum, val / sum, test / sum))
    }
}

/// Counts for one class of `n` images: (train, val, test), train first to get
/// any rounding slack, so every class with at least one image has train data.
fn counts(n: usize, config: &SplitConfig) -> (usize, usize, usize) {
    let n_val = (n as f64 * config.val).round() as usize;
    let n_test = (n as f64 * config.test).round() as usize;
    let (mut n_val, mut n_test) = (n_val.min(n), n_test.min(n));
    while n > 0 && n_val + n_test >= n {
        if n_test >= n_val && n_test > 0 {
            n_test -= 1;
        } else if n_val > 0 {
            n_val -= 1;
        } else {
            break;
        }
    }
    (n - n_val - n_test, n_val, n_test)
}

fn order_key(seed: u64, id: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(id.as_bytes());
    hasher.finalize().into()
}

/// Assigns a split to every item. `items` are (stratum, image id); the stratum
/// is the label (or one common stratum for unlabeled data).
pub fn assign(items: &[(Option<&str>, &str)], config: &SplitConfig) -> Vec<Split> {
    let mut by_stratum: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (position, (stratum, _)) in items.iter().enumerate() {
        by_stratum.entry(*stratum).or_default().push(position);
    }
    let mut result = vec![Split::Train; items.len()];
    for positions in by_stratum.values_mut() {
        positions.sort_by_cached_key(|&p| (order_key(config.seed, items[p].1), p));
        let (n_train, n_val, _) = counts(positions.len(), config);
        for (rank, &position) in positions.iter().enumerate() {
            result[position] = if rank < n_train {
                Split::Train
            } else if rank < n_train + n_val {
                Split::Val
            } else {
                Split::Test
            };
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_fractions_and_keep_train() {
        let config = SplitConfig::default();
        assert_eq!(counts(100, &config), (80, 10, 10));
        assert_eq!(counts(1, &config), (1, 0, 0));
        assert_eq!(counts(2, &config), (2, 0, 0));
        assert_eq!(counts(5, &config), (3, 1, 1));
        assert_eq!(counts(0, &config), (0, 0, 0));
    }

    #[test]
    fn assignment_is_stratified_and_independent_of_order() {
        let ids: Vec<String> = (0..200).map(|i| format!("{i:016x}")).collect();
        let mut items: Vec<(Option<&str>, &str)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    Some(if i % 4 == 0 { "rare" } else { "common" }),
                    id.as_str(),
                )
            })
            .collect();
        let config = SplitConfig::default();
        let first = assign(&items, &config);
        let rare_val = items
            .iter()
            .zip(&first)
            .filter(|((label, _), split)| *label == Some("rare") && **split == Split::Val)
            .count();
        assert_eq!(rare_val, 5); // 50 rare images, 10% to val

        let before: BTreeMap<&str, Split> = items.iter().map(|i| i.1).zip(first).collect();
        items.reverse();
        let second = assign(&items, &config);
        let after: BTreeMap<&str, Split> = items.iter().map(|i| i.1).zip(second).collect();
        assert_eq!(before, after);

        let reseeded = assign(&items, &SplitConfig { seed: 7, ..config });
        let moved: BTreeMap<&str, Split> = items.iter().map(|i| i.1).zip(reseeded).collect();
        assert_ne!(before, moved);
    }

    #[test]
    fn parses_fractions_and_split_names() {
        assert_eq!(
            SplitConfig::parse_fractions("80/10/10").unwrap(),
            (0.8, 0.1, 0.1)
        );
        assert!(SplitConfig::parse_fractions("80/20").is_err());
        assert_eq!("Validation".parse::<Split>().unwrap(), Split::Val);
        assert!("holdout".parse::<Split>().is_err());
    }
}
