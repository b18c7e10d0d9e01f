//! The input square pooled features are computed at (`enqueue --image-size
//! N --resize crop|stretch|pad`).
//!
//! Registered encoders read a fixed square (224 for Lite0), cut from the
//! image by resizing its shorter side to size / 0.875 and cropping the
//! center: ImageNet's evaluation crop. That cuts the border off images that
//! are already square and small (elpv cells are 300 × 300 with the busbars
//! at the edge) and blurs thin cracks. EfficientNet-Lite is fully
//! convolutional, so it can read any square: the native size, stretched
//! (the whole image, aspect ratio ignored), padded (the whole image, aspect
//! ratio kept) or cropped as before.

use serde::{Deserialize, Serialize};

use super::{EncoderError, EncoderSpec, SpatialShape, efficientnet_lite};
use crate::preprocess::{PreprocessConfig, ResizePolicy};

/// Smallest and largest input squares `--image-size` accepts.
pub const MIN_IMAGE_SIZE: u32 = 32;
pub const MAX_IMAGE_SIZE: u32 = 1024;

/// How an image becomes the input square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputResize {
    /// Shorter side to size / 0.875, then the center square (ImageNet's
    /// evaluation crop, the registry's default).
    Crop,
    /// Both sides to the size: the whole image, aspect ratio ignored; an
    /// image already of the size passes through untouched.
    Stretch,
    /// The longer side to the size, aspect ratio kept, centered on the
    /// normalisation's mean colour: the whole image, undistorted.
    Pad,
}

impl InputResize {
    /// As `--resize` spells it.
    pub fn name(self) -> &'static str {
        match self {
            InputResize::Crop => "crop",
            InputResize::Stretch => "stretch",
            InputResize::Pad => "pad",
        }
    }
}

/// An input square other than the registry's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputChoice {
    pub size: u32,
    pub resize: InputResize,
}

impl InputChoice {
    /// The preprocessing of `spec` at this input.
    pub fn preprocess(&self, spec: &EncoderSpec) -> PreprocessConfig {
        let resize = match self.resize {
            InputResize::Crop => ResizePolicy::ShorterSideThenCenterCrop {
                resize_shorter_to: (self.size as f32 / 0.875).round() as u32,
            },
            InputResize::Stretch => ResizePolicy::Stretch,
            InputResize::Pad => ResizePolicy::Pad,
        };
        PreprocessConfig {
            input_size: self.size,
            resize,
            ..spec.preprocess.clone()
        }
    }

    /// Refuses sizes out of range and encoders that read one size only.
    pub fn check(&self, spec: &EncoderSpec) -> Result<(), EncoderError> {
        let refuse = |reason: String| EncoderError::InputChoice {
            encoder: spec.name.to_string(),
            reason,
        };
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&self.size) {
            return Err(refuse(format!(
                "--image-size {} is outside {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE}",
                self.size
            )));
        }
        let same = self.preprocess(spec) == spec.preprocess;
        if !same && efficientnet_lite::Config::for_name(spec.name).is_none() {
            return Err(refuse(format!(
                "it reads {0} × {0} images prepared its own way; --image-size and --resize need an efficientnet-lite encoder",
                spec.input_size
            )));
        }
        Ok(())
    }
}

impl EncoderSpec {
    /// This encoder reading the square `preprocess` makes: the input size
    /// (and the spatial map's side) follow it. What a feature folder's
    /// recorded preprocessing rebuilds.
    pub fn with_preprocess(&self, preprocess: &PreprocessConfig) -> EncoderSpec {
        let mut spec = self.clone();
        if let Some(spatial) = &mut spec.spatial
            && preprocess.input_size != self.input_size
        {
            // Lite's map has one cell per 32 input pixels.
            let side = (preprocess.input_size as usize).div_ceil(32);
            *spatial = SpatialShape {
                channels: spatial.channels,
                height: side,
                width: side,
            };
        }
        spec.input_size = preprocess.input_size;
        spec.preprocess = preprocess.clone();
        spec
    }

    /// This encoder at `input` (`None`: as registered).
    pub fn with_input(&self, input: Option<&InputChoice>) -> Result<EncoderSpec, EncoderError> {
        match input {
            None => Ok(self.clone()),
            Some(input) => {
                input.check(self)?;
                Ok(self.with_preprocess(&input.preprocess(self)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_crop_is_the_default_input() {
        let lite0 = crate::encoders::lookup("efficientnet-lite0").unwrap();
        let same = InputChoice {
            size: 224,
            resize: InputResize::Crop,
        };
        assert_eq!(same.preprocess(&lite0), lite0.preprocess);
        let native = InputChoice {
            size: 300,
            resize: InputResize::Stretch,
        };
        let spec = lite0.with_input(Some(&native)).unwrap();
        assert_eq!(spec.input_size, 300);
        assert_eq!(spec.preprocess.resize, ResizePolicy::Stretch);
        assert_eq!(spec.spatial.unwrap().height, 10);
        // Another family reads its own square only, except as registered.
        let resnet = crate::encoders::lookup("resnet18").unwrap();
        let error = resnet.with_input(Some(&native)).unwrap_err().to_string();
        assert!(error.contains("resnet18"), "{error}");
        assert!(resnet.with_input(Some(&same)).is_ok());
        let tiny = InputChoice {
            size: 8,
            resize: InputResize::Crop,
        };
        let error = lite0.with_input(Some(&tiny)).unwrap_err().to_string();
        assert!(error.contains("--image-size 8"), "{error}");
    }
}
