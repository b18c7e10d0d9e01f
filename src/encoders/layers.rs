//! Which outputs of an encoder its pooled features are made of
//! (`enqueue --layers`).
//!
//! `last` is the encoder's own pooled features (what every fingerprint
//! before `--layers` holds). EfficientNet-Lite encoders can also pool the
//! output of any of their seven stages: a list of stage numbers (1–7) and
//! `head` (the head convolution, i.e. `last`), each averaged over its pixels
//! and concatenated in that order. Early stages keep what the ImageNet head
//! throws away (thin cracks, texture): Head2Toe (2022) matches fine-tuning
//! on average on VTAB with such features. `all` is every stage and `head`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::efficientnet_lite;
use super::{EncoderError, EncoderSpec};

/// Stages an EfficientNet-Lite encoder can pool (1-based in `--layers`).
const LITE_STAGES: usize = 7;

/// A validated choice of layers, in canonical order: stages ascending,
/// then the head.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PooledLayers {
    /// 1-based stage numbers, ascending, no repeats.
    stages: Vec<usize>,
    head: bool,
}

impl Default for PooledLayers {
    fn default() -> Self {
        Self::last()
    }
}

impl PooledLayers {
    /// The encoder's own pooled features.
    pub fn last() -> Self {
        PooledLayers {
            stages: Vec::new(),
            head: true,
        }
    }

    /// Every stage and the head.
    pub fn all() -> Self {
        PooledLayers {
            stages: (1..=LITE_STAGES).collect(),
            head: true,
        }
    }

    pub fn is_last(&self) -> bool {
        self.stages.is_empty() && self.head
    }

    pub fn head(&self) -> bool {
        self.head
    }

    /// Parses `last`, `all` or a comma-separated list of stage numbers
    /// (1–7) and `head`, in any order.
    pub fn parse(value: &str) -> Result<Self, EncoderError> {
        let bad = |reason: String| EncoderError::Layers {
            value: value.to_string(),
            reason,
        };
        match value.trim() {
            "last" => return Ok(Self::last()),
            "all" => return Ok(Self::all()),
            _ => {}
        }
        let mut stages = Vec::new();
        let mut head = false;
        for item in value.split(',').map(str::trim) {
            if item == "head" || item == "last" {
                if head {
                    return Err(bad("`head` is named twice".into()));
                }
                head = true;
                continue;
            }
            let stage: usize = item.parse().map_err(|_| {
                bad(format!(
                    "'{item}' is not a stage number (1-{LITE_STAGES}) or `head`; use `last`, `all` or a list such as `5,6,7,head`"
                ))
            })?;
            if !(1..=LITE_STAGES).contains(&stage) {
                return Err(bad(format!(
                    "stage {stage} is outside 1-{LITE_STAGES} (EfficientNet-Lite has {LITE_STAGES} stages)"
                )));
            }
            if stages.contains(&stage) {
                return Err(bad(format!("stage {stage} is named twice")));
            }
            stages.push(stage);
        }
        stages.sort_unstable();
        Ok(PooledLayers { stages, head })
    }

    /// Refuses layers `spec`'s family cannot pool.
    pub fn check(&self, spec: &EncoderSpec) -> Result<(), EncoderError> {
        if self.is_last() || efficientnet_lite::Config::for_name(spec.name).is_some() {
            return Ok(());
        }
        Err(EncoderError::Layers {
            value: self.to_string(),
            reason: format!(
                "encoder {} gives the pooled features of its last layer only; layers other than `last` need an efficientnet-lite encoder",
                spec.name
            ),
        })
    }

    /// Width of the pooled features of `spec` with these layers.
    pub fn feature_dim(&self, spec: &EncoderSpec) -> usize {
        let head = if self.head { spec.feature_dim } else { 0 };
        if self.stages.is_empty() {
            return head;
        }
        let channels = efficientnet_lite::Config::for_name(spec.name)
            .map(|config| config.stage_channels())
            .unwrap_or_default();
        head + self
            .stages
            .iter()
            .map(|&stage| channels.get(stage - 1).copied().unwrap_or(0))
            .sum::<usize>()
    }

    /// `(offset, width)` of each chosen stage in the concatenation of every
    /// stage's pooled output (`efficientnet_lite::Features::stages`).
    pub(crate) fn stage_columns(&self, stage_channels: &[usize]) -> Vec<(usize, usize)> {
        self.stages
            .iter()
            .map(|&stage| {
                let offset: usize = stage_channels[..stage - 1].iter().sum();
                (offset, stage_channels[stage - 1])
            })
            .collect()
    }
}

impl fmt::Display for PooledLayers {
    /// `last`, or the canonical list (`1,2,3,4,5,6,7,head` for `all`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_last() {
            return f.write_str("last");
        }
        let mut items: Vec<String> = self.stages.iter().map(usize::to_string).collect();
        if self.head {
            items.push("head".into());
        }
        f.write_str(&items.join(","))
    }
}

impl Serialize for PooledLayers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PooledLayers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PooledLayers::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_is_canonical() {
        assert!(PooledLayers::parse("last").unwrap().is_last());
        assert!(PooledLayers::parse("head").unwrap().is_last());
        let all = PooledLayers::parse("all").unwrap();
        assert_eq!(all.to_string(), "1,2,3,4,5,6,7,head");
        assert_eq!(PooledLayers::parse("head,7,1,2,3,4,5,6").unwrap(), all);
        assert_eq!(PooledLayers::parse("6, 5").unwrap().to_string(), "5,6");
        for bad in ["0", "8", "5,5", "head,last", "conv", ""] {
            let error = PooledLayers::parse(bad).unwrap_err().to_string();
            assert!(error.contains(&format!("'{bad}'")), "{bad}: {error}");
        }
    }

    #[test]
    fn widths_follow_the_stage_channels() {
        let lite0 = crate::encoders::lookup("efficientnet-lite0").unwrap();
        // 16+24+40+80+112+192+320 stage channels, 1280 head channels.
        assert_eq!(PooledLayers::all().feature_dim(&lite0), 2064);
        assert_eq!(PooledLayers::last().feature_dim(&lite0), 1280);
        assert_eq!(PooledLayers::parse("6,7").unwrap().feature_dim(&lite0), 512);
        let resnet = crate::encoders::lookup("resnet18").unwrap();
        assert!(PooledLayers::last().check(&resnet).is_ok());
        let error = PooledLayers::all().check(&resnet).unwrap_err().to_string();
        assert!(error.contains("resnet18"), "{error}");
    }
}
