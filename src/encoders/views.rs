//! Cached views (`enqueue --views`): flipped and rotated copies of an
//! image's preprocessed input square, encoded beside the image itself so
//! that training can sample one per epoch (augmentation) and evaluation
//! and prediction can average over them (test-time augmentation).
//!
//! A view is an exact permutation of the pixels of the input square, applied
//! to the CHW tensor after decoding, resizing, cropping and normalising, so
//! it works for every pooled encoder family and costs no resampling. The
//! views of a set, in the order shards store an image's rows:
//!
//! - `1`: the image alone (every folder before `--views`).
//! - `flips` (4): identity, horizontal flip (left-right mirror), vertical
//!   flip (top-bottom), both flips (the 180° rotation).
//! - `dihedral` (8): the rotations by 0°, 90°, 180° and 270° clockwise,
//!   then each of them followed by a transpose (the flip about the main
//!   diagonal, `out[y][x] = in[x][y]`): the eight symmetries of a square.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::EncoderError;

/// A set of views of the input square; see the module's note for the order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViewSet {
    /// The image alone.
    #[default]
    Single,
    /// Identity, horizontal flip, vertical flip, both.
    Flips,
    /// The four rotations, then each transposed.
    Dihedral,
}

impl ViewSet {
    /// Every view set, in the order of their sizes.
    pub const ALL: [ViewSet; 3] = [ViewSet::Single, ViewSet::Flips, ViewSet::Dihedral];

    /// Views per image: rows per image in a shard.
    pub fn count(self) -> usize {
        match self {
            ViewSet::Single => 1,
            ViewSet::Flips => 4,
            ViewSet::Dihedral => 8,
        }
    }

    /// The name as `--views` and shard metadata spell it.
    pub fn name(self) -> &'static str {
        match self {
            ViewSet::Single => "1",
            ViewSet::Flips => "flips",
            ViewSet::Dihedral => "dihedral",
        }
    }

    pub fn is_single(&self) -> bool {
        *self == ViewSet::Single
    }

    /// Where output pixel (`y`, `x`) of view `view` comes from in a square
    /// of side `side`: (row, column) of the input.
    fn source(self, view: usize, y: usize, x: usize, side: usize) -> (usize, usize) {
        let last = side - 1;
        match self {
            ViewSet::Single => (y, x),
            ViewSet::Flips => match view {
                0 => (y, x),
                1 => (y, last - x),
                2 => (last - y, x),
                _ => (last - y, last - x),
            },
            ViewSet::Dihedral => {
                // Views 4-7 transpose the rotation's output: read it at (x, y).
                let (y, x) = if view >= 4 { (x, y) } else { (y, x) };
                match view % 4 {
                    0 => (y, x),
                    // 90° clockwise: the output's top row is the input's
                    // left column read bottom to top.
                    1 => (last - x, y),
                    2 => (last - y, last - x),
                    _ => (x, last - y),
                }
            }
        }
    }

    /// View `view` of a square map stored channels-last (`[side, side,
    /// channels]`), as `apply` makes it of a channels-first image.
    pub fn apply_channels_last(
        self,
        view: usize,
        hwc: &[f32],
        side: usize,
        channels: usize,
    ) -> Vec<f32> {
        debug_assert_eq!(hwc.len(), side * side * channels);
        let mut out = vec![0f32; hwc.len()];
        for y in 0..side {
            for x in 0..side {
                let (sy, sx) = self.source(view, y, x, side);
                let from = (sy * side + sx) * channels;
                let to = (y * side + x) * channels;
                out[to..to + channels].copy_from_slice(&hwc[from..from + channels]);
            }
        }
        out
    }

    /// View `view` (0-based, below `count()`) of `chw`, an image of
    /// `channels` planes of `side` x `side` values, row-major.
    pub fn apply(self, view: usize, chw: &[f32], side: usize) -> Vec<f32> {
        debug_assert!(view < self.count(), "view {view} of {}", self.name());
        let plane = side * side;
        debug_assert_eq!(chw.len() % plane.max(1), 0);
        let mut out = vec![0f32; chw.len()];
        for (input, output) in chw.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
            for y in 0..side {
                for x in 0..side {
                    let (sy, sx) = self.source(view, y, x, side);
                    output[y * side + x] = input[sy * side + sx];
                }
            }
        }
        out
    }

    /// Every view of `chw`, one after the other in view order (the input
    /// itself first).
    pub fn apply_all(self, chw: &[f32], side: usize) -> Vec<f32> {
        if self.is_single() {
            return chw.to_vec();
        }
        let mut out = Vec::with_capacity(chw.len() * self.count());
        for view in 0..self.count() {
            out.extend(self.apply(view, chw, side));
        }
        out
    }
}

impl fmt::Display for ViewSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ViewSet {
    type Err = EncoderError;

    fn from_str(value: &str) -> Result<Self, EncoderError> {
        ViewSet::ALL
            .into_iter()
            .find(|views| views.name() == value.trim())
            .ok_or_else(|| EncoderError::Views {
                value: value.to_string(),
            })
    }
}

impl Serialize for ViewSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ViewSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3-channel square whose every value is distinct, so no symmetry
    /// maps it onto itself.
    fn distinct(side: usize) -> Vec<f32> {
        (0..3 * side * side).map(|i| i as f32).collect()
    }

    #[test]
    fn dihedral_views_are_eight_distinct_bijections() {
        for side in [1usize, 2, 3, 5] {
            let input = distinct(side);
            let views: Vec<Vec<f32>> = (0..8)
                .map(|view| ViewSet::Dihedral.apply(view, &input, side))
                .collect();
            for (view, values) in views.iter().enumerate() {
                // A bijection: every input value appears exactly once.
                let mut sorted = values.clone();
                sorted.sort_by(f32::total_cmp);
                assert_eq!(sorted, input, "view {view} at side {side}");
            }
            if side >= 2 {
                for a in 0..8 {
                    for b in a + 1..8 {
                        assert_ne!(views[a], views[b], "views {a} and {b} at side {side}");
                    }
                }
            }
        }
    }

    #[test]
    fn views_follow_the_documented_order() {
        // One plane of 2 x 2: a b / c d.
        let square = [1.0, 2.0, 3.0, 4.0];
        let view = |set: ViewSet, k: usize| set.apply(k, &square, 2);
        assert_eq!(view(ViewSet::Flips, 0), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(view(ViewSet::Flips, 1), [2.0, 1.0, 4.0, 3.0]);
        assert_eq!(view(ViewSet::Flips, 2), [3.0, 4.0, 1.0, 2.0]);
        assert_eq!(view(ViewSet::Flips, 3), [4.0, 3.0, 2.0, 1.0]);
        // Clockwise: a b / c d turns to c a / d b.
        assert_eq!(view(ViewSet::Dihedral, 1), [3.0, 1.0, 4.0, 2.0]);
        assert_eq!(view(ViewSet::Dihedral, 2), [4.0, 3.0, 2.0, 1.0]);
        assert_eq!(view(ViewSet::Dihedral, 3), [2.0, 4.0, 1.0, 3.0]);
        // Transposed: a c / b d, then the rotations transposed.
        assert_eq!(view(ViewSet::Dihedral, 4), [1.0, 3.0, 2.0, 4.0]);
        assert_eq!(view(ViewSet::Dihedral, 5), [3.0, 4.0, 1.0, 2.0]);
        // The flips are the dihedral group's identity, its two mirrors and
        // its 180° rotation.
        let flips: Vec<Vec<f32>> = (0..4).map(|k| view(ViewSet::Flips, k)).collect();
        let dihedral: Vec<Vec<f32>> = (0..8).map(|k| view(ViewSet::Dihedral, k)).collect();
        assert!(flips.iter().all(|f| dihedral.contains(f)));
        // Every plane is permuted alike.
        let two = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(
            ViewSet::Flips.apply(1, &two, 2),
            [2.0, 1.0, 4.0, 3.0, 6.0, 5.0, 8.0, 7.0]
        );
        assert_eq!(
            ViewSet::Flips.apply_all(&square, 2),
            [
                1.0, 2.0, 3.0, 4.0, 2.0, 1.0, 4.0, 3.0, 3.0, 4.0, 1.0, 2.0, 4.0, 3.0, 2.0, 1.0
            ]
        );
    }

    #[test]
    fn names_parse_and_unknown_values_name_the_choices() {
        for views in ViewSet::ALL {
            assert_eq!(views.name().parse::<ViewSet>().unwrap(), views);
            let json = serde_json::to_string(&views).unwrap();
            assert_eq!(serde_json::from_str::<ViewSet>(&json).unwrap(), views);
        }
        assert_eq!(ViewSet::Dihedral.count(), 8);
        let error = "x".parse::<ViewSet>().unwrap_err().to_string();
        assert!(
            error.contains("'x'") && error.contains("1, flips or dihedral"),
            "{error}"
        );
    }

    #[test]
    fn channels_last_views_permute_pixels_as_channels_first_views_do() {
        let (side, channels) = (5, 3);
        let chw = distinct(side);
        let to_hwc = |chw: &[f32]| -> Vec<f32> {
            let plane = side * side;
            (0..plane)
                .flat_map(|pixel| (0..channels).map(move |c| (c, pixel)))
                .map(|(c, pixel)| chw[c * plane + pixel])
                .collect()
        };
        for views in [ViewSet::Flips, ViewSet::Dihedral] {
            for view in 0..views.count() {
                assert_eq!(
                    views.apply_channels_last(view, &to_hwc(&chw), side, channels),
                    to_hwc(&views.apply(view, &chw, side)),
                    "{views} view {view}"
                );
            }
        }
    }
}
