//! Encoders: every registered family, ImageNet photos, spatial maps, and
//! parity with the PyTorch reference.

mod encoder_families;
mod encoder_imagenet;
mod encoder_maps;
mod encoder_parity;
