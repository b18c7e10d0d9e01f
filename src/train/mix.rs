//! Mixing of fine-tuning's training maps (`train --mix-maps`): mixup and
//! CutMix on block K's cached output (Zhang et al. 2018; Yun et al. 2019;
//! on hidden maps as manifold mixup, Verma et al. 2019). Each batch draws
//! a shuffled partner for every map and one weight from Beta(alpha, alpha);
//! the caller mixes the targets with the same weight
//! (`InputStep::mix_targets`) and each micro-batch's maps with their
//! partners' (`MixDraw::apply`). Everything comes from the rng the
//! caller seeds per epoch, so resumed runs draw what uninterrupted ones did.

use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

use super::config::MapMix;

/// One batch's mixing: each map's partner (a position in the same batch),
/// the weight of its own targets, and where the maps mix.
#[derive(Debug, Clone, PartialEq)]
pub struct MixDraw {
    pub partners: Vec<usize>,
    pub weight: f32,
    region: Region,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Region {
    /// Every value blended (mixup).
    Whole,
    /// Rows `y0..y1` and columns `x0..x1` taken from the partner (CutMix).
    Box {
        y0: usize,
        y1: usize,
        x0: usize,
        x1: usize,
    },
}

/// Draws the mixing of a batch of `n` square maps of `side` x `side`;
/// `None` for `MapMix::None`. Drawn per batch, so micro-batches mix as the
/// whole batch would.
pub fn draw(mix: MapMix, n: usize, side: usize, rng: &mut ChaCha8Rng) -> Option<MixDraw> {
    let alpha = match mix {
        MapMix::None => return None,
        MapMix::Mixup { alpha } | MapMix::Cutmix { alpha } => alpha,
    };
    let mut partners: Vec<usize> = (0..n).collect();
    partners.shuffle(rng);
    let beta = Beta::new(alpha, alpha).expect("MapMix::parse keeps alpha positive and finite");
    let drawn: f64 = beta.sample(rng);
    let (weight, region) = match mix {
        MapMix::None => unreachable!("returned above"),
        MapMix::Mixup { .. } => (drawn as f32, Region::Whole),
        MapMix::Cutmix { .. } => {
            // A box of about (1 - drawn) of the map's area, centred anywhere
            // and clipped at the edges; the weight is what is left of the
            // map's own pixels.
            let cut = ((1.0 - drawn).sqrt() * side as f64).round() as usize;
            let centre_y = rng.random_range(0..side);
            let centre_x = rng.random_range(0..side);
            let span = |centre: usize| {
                (
                    centre.saturating_sub(cut / 2),
                    (centre + cut.div_ceil(2)).min(side),
                )
            };
            let ((y0, y1), (x0, x1)) = (span(centre_y), span(centre_x));
            let weight = 1.0 - ((y1 - y0) * (x1 - x0)) as f32 / (side * side) as f32;
            (weight, Region::Box { y0, y1, x0, x1 })
        }
    };
    Some(MixDraw {
        partners,
        weight,
        region,
    })
}

impl MixDraw {
    /// Mixes `maps` (channels-last `side` x `side` x `channels` maps) with
    /// `partner_maps`, the same number of maps in the same order: map i's
    /// partner's map.
    pub fn apply(&self, maps: &mut [f32], partner_maps: &[f32], side: usize, channels: usize) {
        assert_eq!(maps.len(), partner_maps.len(), "one partner map per map");
        let per_map = side * side * channels;
        let weight = self.weight;
        for (map, theirs) in maps
            .chunks_exact_mut(per_map)
            .zip(partner_maps.chunks_exact(per_map))
        {
            match self.region {
                Region::Whole => {
                    for (value, &other) in map.iter_mut().zip(theirs) {
                        *value = weight * *value + (1.0 - weight) * other;
                    }
                }
                Region::Box { y0, y1, x0, x1 } => {
                    for y in y0..y1 {
                        let row = (y * side + x0) * channels..(y * side + x1) * channels;
                        map[row.clone()].copy_from_slice(&theirs[row]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::run::seeded;

    /// Four 4 x 4 maps of 2 channels, map i filled with the value i, and
    /// the partners' maps in the same order.
    fn maps(partners: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let fill = |i: usize| vec![i as f32; 32];
        (
            (0..4).flat_map(fill).collect(),
            partners.iter().flat_map(|&i| fill(i)).collect(),
        )
    }

    #[test]
    fn mixup_blends_each_map_with_its_partner_by_the_drawn_weight() {
        let mix = MapMix::Mixup { alpha: 0.4 };
        let drawn = draw(mix, 4, 4, &mut seeded(5, 9)).unwrap();
        let mut sorted = drawn.partners.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3]);
        let weight = drawn.weight;
        assert!((0.0..=1.0).contains(&weight));
        let (mut mixed, partner_maps) = maps(&drawn.partners);
        drawn.apply(&mut mixed, &partner_maps, 4, 2);
        for (i, map) in mixed.chunks_exact(32).enumerate() {
            let expected = weight * i as f32 + (1.0 - weight) * drawn.partners[i] as f32;
            assert!(map.iter().all(|&v| (v - expected).abs() < 1e-6), "map {i}");
        }
        // The same stream draws the same mix.
        assert_eq!(draw(mix, 4, 4, &mut seeded(5, 9)).unwrap(), drawn);
        assert_eq!(draw(MapMix::None, 4, 4, &mut seeded(5, 9)), None);
    }

    #[test]
    fn cutmix_pastes_one_box_whose_share_of_pixels_is_the_partners_weight() {
        let mut seen_partial = false;
        for stream in 0..20 {
            let drawn = draw(MapMix::Cutmix { alpha: 1.0 }, 4, 4, &mut seeded(1, stream)).unwrap();
            let (mut mixed, partner_maps) = maps(&drawn.partners);
            drawn.apply(&mut mixed, &partner_maps, 4, 2);
            for (i, map) in mixed.chunks_exact(32).enumerate() {
                let partner = drawn.partners[i];
                if partner == i {
                    assert!(map.iter().all(|&v| v == i as f32));
                    continue;
                }
                // Pixels (both channels alike) from the partner, the rest own.
                let from_partner = map
                    .chunks_exact(2)
                    .filter(|pixel| {
                        assert_eq!(pixel[0], pixel[1]);
                        pixel[0] == partner as f32
                    })
                    .count();
                let share = 1.0 - from_partner as f32 / 16.0;
                assert_eq!(drawn.weight, share, "stream {stream}, map {i}");
                seen_partial |= from_partner > 0 && from_partner < 16;
            }
        }
        assert!(seen_partial, "some boxes cover part of the map");
    }
}
