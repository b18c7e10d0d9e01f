//! `Encoder::forward_maps`, the output mode of `enqueue --spatial`: Lite
//! gives its stride-16 and stride-32 maps finest first, DINOv2 its patch
//! tokens, pooled-only families no maps; the pooled features are those of
//! `forward_pooled`, bit for bit (the pooled path does not change). With
//! `--maps`, Lite also gives its stride-4 and stride-8 maps, and refuses
//! other families by name.

use candle_core::{Device, Tensor};
use lazarus::encoders::{self, SpatialMaps, WeightsSource};

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
        let maps = encoder
            .forward_maps(&images, &SpatialMaps::default())
            .unwrap();
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

#[test]
fn lite_gives_the_maps_asked_for_in_one_pass() {
    let spec = encoders::lookup("efficientnet-lite0").unwrap();
    let encoder =
        encoders::load_encoder(&spec, WeightsSource::Random { seed: 3 }, &Device::Cpu).unwrap();
    let images = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &Device::Cpu).unwrap();
    let fine = SpatialMaps::parse("32,4,8,16").unwrap();
    let all = encoder.forward_maps(&images, &fine).unwrap();
    let shapes: Vec<(usize, [usize; 3])> = all
        .maps
        .iter()
        .map(|m| {
            let (_, c, h, w) = m.values.dims4().unwrap();
            (m.stride, [c, h, w])
        })
        .collect();
    // Lite0's stage outputs: 24 channels at stride 4, 40 at 8 (TF block strings).
    assert_eq!(
        shapes,
        [
            (4, [24, 56, 56]),
            (8, [40, 28, 28]),
            (16, [112, 14, 14]),
            (32, [1280, 7, 7])
        ]
    );
    // The default maps are the same bits inside the longer list.
    let default = encoder
        .forward_maps(&images, &SpatialMaps::default())
        .unwrap();
    for (d, a) in default.maps.iter().zip(&all.maps[2..]) {
        assert_eq!(d.stride, a.stride);
        assert_eq!(
            d.values.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            a.values.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    let stride4 = SpatialMaps::parse("4").unwrap();
    let only = encoder.forward_maps(&images, &stride4).unwrap();
    assert_eq!(only.maps.len(), 1);
    assert_eq!(only.maps[0].stride, 4);

    let dino = encoders::lookup("dinov2-vits14").unwrap();
    let dino =
        encoders::load_encoder(&dino, WeightsSource::Random { seed: 3 }, &Device::Cpu).unwrap();
    let error = dino
        .forward_maps(&images, &fine)
        .expect_err("dinov2 has no stride-4 map")
        .to_string();
    assert!(
        error.contains("'4,8,16,32'") && error.contains("dinov2-vits14"),
        "{error}"
    );
}
