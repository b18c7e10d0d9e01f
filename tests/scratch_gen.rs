mod support;
use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use std::path::{Path, PathBuf};
use support::hash_unit;
fn blob_image(seed: u64, width: u32, height: u32) -> (RgbImage, GrayImage) {
    let unit = |k: u64| hash_unit(seed * 1_000 + k);
    let blobs = 1 + (unit(0) * 3.0) as usize;
    let ellipses: Vec<[f32; 4]> = (0..blobs as u64)
        .map(|b| {
            let rx = 25.0 + unit(10 + 4 * b) * 35.0;
            let ry = 25.0 + unit(11 + 4 * b) * 35.0;
            let cx = rx + unit(12 + 4 * b) * (width as f32 - 2.0 * rx);
            let cy = ry + unit(13 + 4 * b) * (height as f32 - 2.0 * ry);
            [cx, cy, rx, ry]
        })
        .collect();
    let inside = |x: u32, y: u32| {
        ellipses.iter().any(|[cx, cy, rx, ry]| {
            let dx = (x as f32 + 0.5 - cx) / rx;
            let dy = (y as f32 + 0.5 - cy) / ry;
            dx * dx + dy * dy <= 1.0
        })
    };
    let (fx, fy) = (0.05 + unit(1) * 0.2, 0.05 + unit(2) * 0.2);
    let tint = [unit(3), unit(4), unit(5)];
    let image = RgbImage::from_fn(width, height, |x, y| {
        let noise = hash_unit(seed * 7_919 + (y * width + x) as u64) - 0.5;
        let texture = 95.0 + 30.0 * (x as f32 * fx).sin() * (y as f32 * fy).cos() + 40.0 * noise;
        let value = if inside(x, y) {
            205.0 + 30.0 * noise
        } else {
            texture
        };
        Rgb(std::array::from_fn(|c| {
            (value * (0.85 + 0.3 * tint[c])).clamp(0.0, 255.0) as u8
        }))
    });
    let mask = GrayImage::from_fn(width, height, |x, y| {
        Luma([if inside(x, y) { 255 } else { 0 }])
    });
    (image, mask)
}

/// images/NNN.png with masks/NNN.png (a few as 16-bit PNG or TIFF masks).
fn write_dataset(dir: &Path, small: usize, large: usize) -> Vec<(PathBuf, GrayImage)> {
    let images = dir.join("images");
    let masks = dir.join("masks");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    let mut out = Vec::new();
    for i in 0..small + large {
        let (width, height) = if i < small { (224, 224) } else { (600, 400) };
        let (image, mask) = blob_image(i as u64 + 1, width, height);
        let path = images.join(format!("{i:03}.png"));
        image.save_with_format(&path, ImageFormat::Png).unwrap();
        match i % 10 {
            // 16-bit masks: foreground is any value above 0.
            3 => {
                let wide =
                    image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(width, height, |x, y| {
                        Luma([if mask.get_pixel(x, y)[0] > 0 { 1000 } else { 0 }])
                    });
                wide.save_with_format(masks.join(format!("{i:03}.png")), ImageFormat::Png)
                    .unwrap();
            }
            7 => mask
                .save_with_format(masks.join(format!("{i:03}.tiff")), ImageFormat::Tiff)
                .unwrap(),
            _ => mask
                .save_with_format(masks.join(format!("{i:03}.png")), ImageFormat::Png)
                .unwrap(),
        }
        out.push((path, mask));
    }
    out
}

#[test]
fn generate() {
    let _ = std::fs::remove_dir_all("/tmp/segdata");
    write_dataset(Path::new("/tmp/segdata/blobs"), 120, 6);
}
