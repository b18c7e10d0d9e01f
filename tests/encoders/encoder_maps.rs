//! `Encoder::forward_maps`, the output mode of `enqueue --spatial`: Lite
//! gives its stride-16 and stride-32 maps finest first, DINOv2 its patch
//! tokens, pooled-only families no maps; the pooled features are those of
//! `forward_pooled`, bit for bit (the pooled path does not change).

use candle_core::{Device, Tensor};
use lazarus::encoders::{self, WeightsSource};

/// (stride, [channels, height, width]) of each map, finest first.
type MapShapes = &'static [(usize, [usize; 3])];

#[test]
fn forward_maps_gives_each_family_its_maps_and_the_same_pooled_features() {
    let cases: [(&str, MapShapes); 3] = [
        (
            "efficientnet-lite0",
            &[(16, [112, 14, 14]), (32, [1280, 7, 7])],
        ),
        ("dinov2-vits14", &[(14, [384, 16, 16])]),
        ("resnet18", &[]),
    ];
    for (name, expected) in cases {
        let spec = encoders::lookup(name).unwrap();
        let encoder =
            encoders::load_encoder(&spec, WeightsSource::Random { seed: 3 }, &Device::Cpu).unwrap();
        let size = spec.input_size as usize;
        let images = Tensor::randn(0f32, 1.0, (2, 3, size, size), &Device::Cpu).unwrap();
        let maps = encoder.forward_maps(&images).unwrap();
        let shapes: Vec<(usize, [usize; 3])> = maps
            .maps
            .iter()
            .map(|m| {
                let (n, c, h, w) = m.values.dims4().unwrap();
                assert_eq!(n, 2, "{name}");
                (m.stride, [c, h, w])
            })
            .collect();
        assert_eq!(shapes, expected, "{name}");
        let pooled = encoder.forward_pooled(&images).unwrap();
        assert_eq!(
            maps.pooled.to_vec2::<f32>().unwrap(),
            pooled.to_vec2::<f32>().unwrap(),
            "{name}"
        );
    }
}
