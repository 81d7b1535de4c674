//! Port of diffusers/image_processor.py (`VaeImageProcessor.preprocess` for PIL images): init
//! images and masks as diffusers' image-to-image and inpainting pipelines prepare them, with
//! PIL's own Lanczos resampling (Pillow's libImaging/Resample.c) and grayscale conversion
//! (libImaging/Convert.c) so that the pixels the VAE sees are the same bytes.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// An 8-bit image with interleaved channels (1 = PIL's "L", 3 = "RGB"), row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Channels per pixel: 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// `height × width × channels` bytes, row by row, channels interleaved.
    pub pixels: Vec<u8>,
}

impl Image8 {
    /// Opens a PNG or JPEG file as diffusers' `load_image` does: turned upright by its EXIF
    /// orientation (`ImageOps.exif_transpose`), then `convert("RGB")` (gray is replicated,
    /// alpha is dropped).
    pub fn load_rgb(path: &Path) -> Result<Self> {
        let reader = image::ImageReader::open(path).map_err(|e| Error::io(path, e))?;
        let reader = reader.with_guessed_format().map_err(|e| Error::io(path, e))?;
        Self::decode_rgb_from(reader, &path.display().to_string())
    }

    /// [`Self::load_rgb`] for an image file's bytes held in memory (PNG or JPEG, told by its
    /// content); `name` names it in errors.
    pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<Self> {
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes));
        let reader = reader.with_guessed_format().map_err(|e| Error::invalid(format!("{name}: cannot read the image: {e}")))?;
        if reader.format().is_none() {
            return Err(Error::invalid(format!("{name}: cannot decode the image: not a PNG or JPEG file")));
        }
        Self::decode_rgb_from(reader, name)
    }

    fn decode_rgb_from<R: std::io::BufRead + std::io::Seek>(reader: image::ImageReader<R>, name: &str) -> Result<Self> {
        use image::ImageDecoder;
        let cannot = |reason: String| Error::invalid(format!("{name}: cannot decode the image: {reason}"));
        let mut decoder = reader.into_decoder().map_err(|e| cannot(e.to_string()))?;
        let orientation = decoder.orientation().map_err(|e| cannot(e.to_string()))?;
        let mut decoded = image::DynamicImage::from_decoder(decoder).map_err(|e| cannot(e.to_string()))?;
        decoded.apply_orientation(orientation);
        let rgb = decoded.into_rgb8();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        if width == 0 || height == 0 {
            return Err(cannot("it has no pixels".into()));
        }
        Ok(Image8 { width, height, channels: 3, pixels: rgb.into_raw() })
    }

    /// PIL's `Image.resize((width, height), Image.LANCZOS)`: a separable Lanczos-3 filter
    /// widened by the downscale factor, in two passes with 22-bit fixed-point coefficients
    /// and the intermediate rounded to 8 bits (Pillow 13's ImagingResampleInner). The
    /// horizontal pass goes first unless the height shrinks by more than twice as many pixels
    /// as the width does.
    pub fn resize_lanczos(&self, width: usize, height: usize) -> Image8 {
        let shrink_height = self.height as i64 - height as i64;
        let shrink_width = self.width as i64 - width as i64;
        let horizontal_first = !(shrink_height > 0 && shrink_height > shrink_width * 2);
        let mut passes = [Axis::Horizontal, Axis::Vertical];
        if !horizontal_first {
            passes.reverse();
        }
        let mut image = self.clone();
        for axis in passes {
            image = match axis {
                Axis::Horizontal if width != self.width => resample(&image, &pil_coefficients(self.width, width), axis),
                Axis::Vertical if height != self.height => resample(&image, &pil_coefficients(self.height, height), axis),
                _ => image,
            };
        }
        image
    }

    /// PIL's `convert("L")` of an RGB image: ITU-R 601-2 luma in 16-bit fixed point
    /// (Convert.c `L24`: (R·19595 + G·38470 + B·7471 + 0x8000) >> 16).
    pub fn to_grayscale(&self) -> Image8 {
        if self.channels == 1 {
            return self.clone();
        }
        let pixels = self
            .pixels
            .chunks_exact(self.channels)
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
            .collect();
        Image8 { width: self.width, height: self.height, channels: 1, pixels }
    }

    /// `[1, C, H, W]` float32 in [0, 1]: `np.array(image).astype(np.float32) / 255.0`, NCHW.
    fn to_unit_tensor(&self, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = self.pixels.iter().map(|&v| v as f32 / 255.0).collect();
        let hwc = Tensor::from_vec(values, (self.height, self.width, self.channels), device)?;
        Ok(hwc.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
    }
}

/// diffusers' `VaeImageProcessor` for PIL input, with the settings the Stable Diffusion
/// pipelines use: `image_processor` (resize, normalise to [-1, 1]) and `mask_processor`
/// (resize, grayscale, binarise at 0.5, no normalisation).
#[derive(Clone, Copy, Debug)]
pub struct VaeImageProcessor {
    /// Pixels per latent element (diffusers' `vae_scale_factor`, 8 for Stable Diffusion): images
    /// are resized to multiples of it.
    pub vae_scale_factor: usize,
}

impl VaeImageProcessor {
    /// A processor for a VAE with this scale factor.
    pub fn new(vae_scale_factor: usize) -> Self {
        VaeImageProcessor { vae_scale_factor }
    }

    /// `get_default_height_width`: the requested size, or the image's own, rounded down to a
    /// multiple of the VAE scale factor. Returns (height, width).
    pub fn default_height_width(&self, image: &Image8, height: Option<usize>, width: Option<usize>) -> Result<(usize, usize)> {
        let factor = self.vae_scale_factor.max(1);
        let height = height.unwrap_or(image.height);
        let width = width.unwrap_or(image.width);
        let (height, width) = (height - height % factor, width - width % factor);
        if height == 0 || width == 0 {
            return Err(Error::invalid(format!(
                "a {}x{} image is smaller than the VAE's {factor}-pixel latent grid",
                image.width, image.height
            )));
        }
        Ok((height, width))
    }

    /// `image_processor.preprocess(image, height, width)`: resized with Lanczos, then
    /// `2 * x - 1`; `[1, 3, H, W]` float32.
    pub fn preprocess(&self, image: &Image8, height: Option<usize>, width: Option<usize>, device: &Device) -> Result<Tensor> {
        let (height, width) = self.default_height_width(image, height, width)?;
        let unit = image.resize_lanczos(width, height).to_unit_tensor(device)?;
        Ok(((unit * 2.0)? - 1.0)?)
    }

    /// `mask_processor.preprocess(mask, height, width)`: resized with Lanczos, converted to
    /// grayscale, then 0 below 0.5 and 1 from 0.5 up; `[1, 1, H, W]` float32 (1 = repaint).
    pub fn preprocess_mask(&self, mask: &Image8, height: Option<usize>, width: Option<usize>, device: &Device) -> Result<Tensor> {
        let (height, width) = self.default_height_width(mask, height, width)?;
        let unit = mask.resize_lanczos(width, height).to_grayscale().to_unit_tensor(device)?;
        Ok(unit.ge(0.5f32)?.to_dtype(candle_core::DType::F32)?)
    }
}

// ---- Pillow's resampling (libImaging/Resample.c), 8 bits per channel ----

/// Pillow's `PRECISION_BITS`: coefficients are fixed point with 22 fractional bits.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Lanczos-3: sinc(x) · sinc(x / 3) on [-3, 3).
fn lanczos_filter(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}
const LANCZOS_SUPPORT: f64 = 3.0;

/// For each output pixel: the first input pixel it reads and its fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` then `normalize_coeffs_8bpc`: each output pixel's centre mapped into
/// the input, the filter stretched by the downscale factor, the weights normalised to sum to
/// 1 in double and rounded half away from zero to fixed point.
fn pil_coefficients(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax).map(|x| lanczos_filter((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = weights.iter().sum();
            let weights = weights
                .into_iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let fixed = w * (1u32 << PRECISION_BITS) as f64;
                    (if w < 0.0 { -0.5 + fixed } else { 0.5 + fixed }) as i32
                })
                .collect();
            Taps { first: xmin, weights }
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Axis {
    Horizontal,
    Vertical,
}

/// One pass of `ImagingResampleHorizontal_8bpc` / `ImagingResampleVertical_8bpc`.
fn resample(image: &Image8, taps: &[Taps], axis: Axis) -> Image8 {
    let channels = image.channels;
    let (out_width, out_height) = match axis {
        Axis::Horizontal => (taps.len(), image.height),
        Axis::Vertical => (image.width, taps.len()),
    };
    let mut pixels = vec![0u8; out_width * out_height * channels];
    for y in 0..out_height {
        for x in 0..out_width {
            // Where the tap's first input pixel is, and how far apart its inputs are.
            let (tap, start, stride) = match axis {
                Axis::Horizontal => (&taps[x], (y * image.width + taps[x].first) * channels, channels),
                Axis::Vertical => (&taps[y], (taps[y].first * image.width + x) * channels, image.width * channels),
            };
            for c in 0..channels {
                // C's int accumulator, starting at one half for rounding.
                let mut sum: i32 = 1 << (PRECISION_BITS - 1);
                for (k, &weight) in tap.weights.iter().enumerate() {
                    let value = image.pixels[start + k * stride + c] as i32;
                    sum = sum.wrapping_add(value.wrapping_mul(weight));
                }
                pixels[(y * out_width + x) * channels + c] = (sum >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    Image8 { width: out_width, height: out_height, channels, pixels }
}
