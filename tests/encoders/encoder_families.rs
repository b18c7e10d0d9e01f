//! Every family builds with random weights and produces the shapes its spec
//! documents; weights files with a missing or mis-shaped tensor are refused
//! with a message naming the tensor and both shapes.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use lazarus::encoders::{
    self, EncoderSpec, WeightsSource, clip, convnext, dinov2, efficientnet, efficientnet_lite,
    resnet,
};
use lazarus::weights::{self, pth::NamedTensor};

fn images(spec: &EncoderSpec, n: usize) -> Tensor {
    let size = spec.input_size as usize;
    Tensor::randn(0f32, 1.0, (n, 3, size, size), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn smallest_variant_of_each_family_gives_documented_shapes() {
    for name in [
        "efficientnet-lite0",
        "resnet18",
        "efficientnet-b0",
        "convnext-atto",
        "dinov2-vits14",
        "clip-vit-b32",
    ] {
        let spec = encoders::lookup(name).unwrap();
        let encoder =
            encoders::load_encoder(&spec, WeightsSource::Random { seed: 1 }, &Device::Cpu).unwrap();
        // Batches of two where batching has its own code path (DINOv2 runs per image).
        let n = if name == "dinov2-vits14" || name == "efficientnet-lite0" {
            2
        } else {
            1
        };
        let output = encoder.forward(&images(&spec, n)).unwrap();
        assert_eq!(output.pooled.dims(), &[n, spec.feature_dim], "{name}");
        let finite = output.pooled.to_vec2::<f32>().unwrap();
        assert!(finite.iter().flatten().all(|v| v.is_finite()), "{name}");
        match (spec.spatial, output.spatial) {
            (None, None) => {}
            (Some(shape), Some(map)) => {
                assert_eq!(
                    map.dims(),
                    &[n, shape.channels, shape.height, shape.width],
                    "{name}"
                );
            }
            (documented, got) => panic!(
                "{name}: spec says spatial {documented:?}, forward gave {:?}",
                got.map(|t| t.dims().to_vec())
            ),
        }
        let pooled_only = encoder.forward_pooled(&images(&spec, 1)).unwrap();
        assert_eq!(pooled_only.dims(), &[1, spec.feature_dim], "{name}");
    }
}

#[test]
fn random_weights_depend_only_on_the_seed() {
    let spec = encoders::lookup("efficientnet-lite0").unwrap();
    let x = images(&spec, 1);
    let run = |seed| {
        encoders::load_encoder(&spec, WeightsSource::Random { seed }, &Device::Cpu)
            .unwrap()
            .forward_pooled(&x)
            .unwrap()
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(max_abs(&(&a - &b).unwrap()), 0.0);
    assert!(max_abs(&(&a - &c).unwrap()) > 0.0);
}

/// Zero weights: builds even the largest variants in a blink, for shape checks.
struct Zeros;

impl SimpleBackend for Zeros {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn zeros() -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Zeros), DType::F32, Device::Cpu)
}

fn small(size: usize) -> Tensor {
    Tensor::zeros((1, 3, size, size), DType::F32, &Device::Cpu).unwrap()
}

/// The large variants, built from zeros and run at a small input: the
/// feature widths the registry documents are the ones the networks produce.
#[test]
fn large_variants_produce_their_registered_widths() {
    let dim = |name: &str| encoders::lookup(name).unwrap().feature_dim;
    for (name, config) in [
        ("resnet34", resnet::Config::Resnet34),
        ("resnet50", resnet::Config::Resnet50),
    ] {
        let out = resnet::ResNet::new(config, zeros())
            .unwrap()
            .forward(&small(32))
            .unwrap();
        assert_eq!(out.dims(), &[1, dim(name)], "{name}");
    }
    for variant in 1..=7u8 {
        let name = format!("efficientnet-b{variant}");
        let model = efficientnet::EfficientNet::new(
            efficientnet::Config { variant },
            Box::new(Zeros),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            model.forward(&small(32)).unwrap().dims(),
            &[1, dim(&name)],
            "{name}"
        );
    }
    for (name, config) in [
        ("convnext-femto", convnext::Config::Femto),
        ("convnext-pico", convnext::Config::Pico),
        ("convnext-nano", convnext::Config::Nano),
        ("convnext-tiny", convnext::Config::Tiny),
        ("convnext-small", convnext::Config::Small),
        ("convnext-base", convnext::Config::Base),
    ] {
        let out = convnext::ConvNeXt::new(config, zeros())
            .unwrap()
            .forward(&small(32))
            .unwrap();
        assert_eq!(out.dims(), &[1, dim(name)], "{name}");
    }
    let vitb =
        dinov2::DinoV2::new(dinov2::Config::VitBase14, Box::new(Zeros), &Device::Cpu).unwrap();
    assert_eq!(vitb.pooled(&small(28)).unwrap().dims(), &[1, 768]);
    assert_eq!(
        vitb.patch_tokens(&small(56)).unwrap().dims(),
        &[1, 768, 4, 4]
    );
    assert_eq!(dim("clip-vit-b32"), clip::ClipVision::feature_dim());
    for (name, config) in [
        ("efficientnet-lite1", efficientnet_lite::Config::lite1()),
        ("efficientnet-lite2", efficientnet_lite::Config::lite2()),
        ("efficientnet-lite3", efficientnet_lite::Config::lite3()),
        ("efficientnet-lite4", efficientnet_lite::Config::lite4()),
    ] {
        let spec = encoders::lookup(name).unwrap();
        let model = efficientnet_lite::EfficientNetLite::new(config, zeros()).unwrap();
        let size = spec.input_size as usize;
        let features = model.features(&small(size), &[4, 8, 16]).unwrap();
        let spatial = spec.spatial.unwrap();
        assert_eq!(features.pooled.dims(), &[1, spec.feature_dim], "{name}");
        assert_eq!(
            features.stride32.dims(),
            &[1, spatial.channels, spatial.height, spatial.width],
            "{name}"
        );
        let side16 = size.div_ceil(16);
        assert_eq!(
            features.maps[2].dims(),
            &[1, config.stride16_channels(), side16, side16],
            "{name}"
        );
        // The stride-4 and -8 maps: the second and third stages' outputs.
        let stages = config.stage_channels();
        for (map, stride, channels) in [(0, 4, stages[1]), (1, 8, stages[2])] {
            let side = size.div_ceil(stride);
            assert_eq!(
                features.maps[map].dims(),
                &[1, channels, side, side],
                "{name} stride {stride}"
            );
            assert_eq!(config.map_channels(stride), Some(channels), "{name}");
        }
    }
}

fn write_weights(tensors: Vec<(&str, Tensor)>) -> (tempfile::TempDir, std::path::PathBuf) {
    let named: Vec<NamedTensor> = tensors
        .into_iter()
        .map(|(name, tensor)| NamedTensor {
            name: name.to_string(),
            tensor,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    std::fs::write(&path, weights::to_safetensors(&named).unwrap()).unwrap();
    (dir, path)
}

#[test]
fn mis_shaped_tensor_is_named_with_both_shapes() {
    let wrong = Tensor::zeros((64, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let (_dir, path) = write_weights(vec![("conv1.weight", wrong)]);
    let spec = encoders::lookup("resnet18").unwrap();
    let err = encoders::load_encoder(&spec, WeightsSource::File(path), &Device::Cpu)
        .err()
        .expect("a mis-shaped tensor must be refused")
        .to_string();
    assert!(err.contains("conv1.weight"), "{err}");
    assert!(err.contains("[64, 3, 7, 7]"), "{err}");
    assert!(err.contains("[64, 3, 3, 3]"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let stem = Tensor::zeros((32, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let (_dir, path) = write_weights(vec![("_conv_stem.weight", stem)]);
    let spec = encoders::lookup("efficientnet-lite0").unwrap();
    let err = encoders::load_encoder(&spec, WeightsSource::File(path), &Device::Cpu)
        .err()
        .expect("a missing tensor must be refused")
        .to_string();
    assert!(err.contains("'_bn0.weight' is missing"), "{err}");
}

#[test]
fn wrong_input_size_is_refused() {
    let spec = encoders::lookup("efficientnet-lite0").unwrap();
    let encoder =
        encoders::load_encoder(&spec, WeightsSource::Random { seed: 0 }, &Device::Cpu).unwrap();
    let err = encoder.forward(&small(32)).unwrap_err().to_string();
    assert!(
        err.contains("[1, 3, 32, 32]") && err.contains("224"),
        "{err}"
    );
}

#[test]
fn encoders_list_json_reports_every_encoder_without_weights() {
    let cache = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lazarus"))
        .args(["encoders", "list", "--json"])
        .env("LAZARUS_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rows.len(), encoders::registry().len());
    let lite0 = &rows[0];
    assert_eq!(lite0["name"], "efficientnet-lite0");
    assert_eq!(lite0["input_size"], 224);
    assert_eq!(lite0["feature_dim"], 1280);
    assert_eq!(lite0["spatial"]["height"], 7);
    assert!(lite0["weights"].is_null());
}
