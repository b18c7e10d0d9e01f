//! Trained runs on new images: predict, bundles, review and serve.

mod bundle;
mod predict_images;
mod review;
mod serve;
