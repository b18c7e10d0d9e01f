//! Which spatial maps an `enqueue --spatial` folder holds (`--maps`).
//!
//! The default, `16,32`, is every map the encoder family exposes by itself
//! (Lite's stride-16 and stride-32 maps, DINOv2's patch tokens): what every
//! spatial folder from before `--maps` holds. EfficientNet-Lite encoders can
//! also keep the full outputs of their second and third stages (stride 4 and
//! 8: 24 and 40 channels for Lite0), computed in the same forward pass, and
//! any subset of the four strides.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::efficientnet_lite;
use super::{EncoderError, EncoderSpec};

/// Strides a Lite encoder can keep, ascending.
pub const LITE_STRIDES: [usize; 4] = [4, 8, 16, 32];

/// A validated choice of maps: strides ascending, no repeats.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpatialMaps {
    strides: Vec<usize>,
}

impl Default for SpatialMaps {
    fn default() -> Self {
        SpatialMaps {
            strides: vec![16, 32],
        }
    }
}

impl SpatialMaps {
    /// `16,32`: the family's own maps.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The strides, ascending (finest first).
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// The finest stride.
    pub fn finest(&self) -> usize {
        self.strides[0]
    }

    /// Parses a comma-separated list of strides from {4, 8, 16, 32}, in any
    /// order.
    pub fn parse(value: &str) -> Result<Self, EncoderError> {
        let bad = |reason: String| EncoderError::Maps {
            value: value.to_string(),
            reason,
        };
        let mut strides = Vec::new();
        for item in value.split(',').map(str::trim) {
            let stride: usize = item.parse().map_err(|_| {
                bad(format!(
                    "'{item}' is not a stride; use a list of 4, 8, 16 and 32 such as `4,8,16,32`"
                ))
            })?;
            if !LITE_STRIDES.contains(&stride) {
                return Err(bad(format!(
                    "stride {stride} is not one of 4, 8, 16 and 32"
                )));
            }
            if strides.contains(&stride) {
                return Err(bad(format!("stride {stride} is named twice")));
            }
            strides.push(stride);
        }
        strides.sort_unstable();
        Ok(SpatialMaps { strides })
    }

    /// The maps `enqueue --cache-at K` keeps: the one that is block K's
    /// output of EfficientNet-Lite `encoder` (lite0: K 2, 4 or 10 for
    /// strides 4, 8 and 16), beside `also` (what --maps asked for) if given.
    pub fn cache_at(
        encoder: &str,
        after_block: usize,
        also: Option<SpatialMaps>,
    ) -> Result<Self, EncoderError> {
        let refused = |reason: String| EncoderError::CacheAt {
            after_block,
            reason,
        };
        let config = efficientnet_lite::Config::for_name(encoder).ok_or_else(|| {
            refused(format!(
                "encoder {encoder} is not an EfficientNet-Lite; only those cache a block's output"
            ))
        })?;
        let stride = config
            .map_after_block(after_block)
            .map_err(|why| refused(format!("for {encoder}, {why}")))?;
        let mut strides = also.map_or_else(Vec::new, |maps| maps.strides);
        if !strides.contains(&stride) {
            strides.push(stride);
            strides.sort_unstable();
        }
        Ok(SpatialMaps { strides })
    }

    /// Refuses maps `spec`'s family cannot give.
    pub fn check(&self, spec: &EncoderSpec) -> Result<(), EncoderError> {
        if self.is_default() || efficientnet_lite::Config::for_name(spec.name).is_some() {
            return Ok(());
        }
        Err(EncoderError::Maps {
            value: self.to_string(),
            reason: format!(
                "encoder {} gives its own maps only (`16,32`, the default); strides {} need an efficientnet-lite encoder",
                spec.name, self
            ),
        })
    }
}

impl fmt::Display for SpatialMaps {
    /// The canonical list, `16,32` by default.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.strides.iter().map(usize::to_string).collect();
        f.write_str(&items.join(","))
    }
}

impl Serialize for SpatialMaps {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SpatialMaps {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        SpatialMaps::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_is_canonical() {
        assert!(SpatialMaps::parse("16,32").unwrap().is_default());
        assert!(SpatialMaps::parse("32, 16").unwrap().is_default());
        let fine = SpatialMaps::parse("32,4,16,8").unwrap();
        assert_eq!(fine.to_string(), "4,8,16,32");
        assert_eq!(fine.finest(), 4);
        for bad in ["2", "64", "4,4", "s4", ""] {
            let error = SpatialMaps::parse(bad).unwrap_err().to_string();
            assert!(error.contains(&format!("'{bad}'")), "{bad}: {error}");
        }
    }

    #[test]
    fn fine_maps_need_a_lite_encoder() {
        let fine = SpatialMaps::parse("4,8,16,32").unwrap();
        let lite0 = crate::encoders::lookup("efficientnet-lite0").unwrap();
        assert!(fine.check(&lite0).is_ok());
        let dino = crate::encoders::lookup("dinov2-vits14").unwrap();
        assert!(SpatialMaps::default().check(&dino).is_ok());
        let error = fine.check(&dino).unwrap_err().to_string();
        assert!(
            error.contains("dinov2-vits14") && error.contains("'4,8,16,32'"),
            "{error}"
        );
    }
}
