//! `diffuse generate`'s SDXL flags: the second prompts, the micro-conditioning (sizes, crop,
//! aesthetic scores) and the refiner; their infotext keys (A1111's `Refiner` and `Refiner
//! switch at`, diffuse's own for the rest) and `--from`'s reading of them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use diffuse::pipelines::metadata::GenerationParameters;
use diffuse::pipelines::stable_diffusion::{StableDiffusionPipeline, TextToImageOptions};

#[derive(clap::Args, Clone)]
pub struct XlArgs {
    /// SDXL: the prompt for the second text encoder (OpenCLIP bigG); default: --prompt.
    #[arg(long)]
    pub(crate) prompt_2: Option<String>,
    /// SDXL: the negative prompt for the second text encoder; default: --negative-prompt.
    #[arg(long)]
    pub(crate) negative_prompt_2: Option<String>,
    /// SDXL micro-conditioning: the size the model is told the training image had (default:
    /// the output size). Smaller sizes look like upscaled small images.
    #[arg(long, value_name = "WxH")]
    pub(crate) original_size: Option<String>,
    /// SDXL micro-conditioning: the size aimed at (default: the output size).
    #[arg(long, value_name = "WxH")]
    pub(crate) target_size: Option<String>,
    /// SDXL micro-conditioning: the top-left corner of the crop the model is told the training
    /// image was cut at (default 0,0: centred, uncropped subjects).
    #[arg(long, value_name = "TOP,LEFT")]
    pub(crate) crops_coords_top_left: Option<String>,
    /// SDXL: the original size the negative conditioning is told (with --negative-target-size;
    /// e.g. 512x512 steers away from low-resolution images).
    #[arg(long, value_name = "WxH")]
    pub(crate) negative_original_size: Option<String>,
    /// SDXL: the target size of the negative conditioning.
    #[arg(long, value_name = "WxH")]
    pub(crate) negative_target_size: Option<String>,
    /// SDXL: the crop corner of the negative conditioning (default 0,0).
    #[arg(long, value_name = "TOP,LEFT")]
    pub(crate) negative_crops_coords_top_left: Option<String>,
    /// The SDXL refiner's aesthetic conditioning (a refiner folder, or --refiner): default 6.0.
    #[arg(long)]
    pub(crate) aesthetic_score: Option<f64>,
    /// The refiner's negative aesthetic score: default 2.5.
    #[arg(long)]
    pub(crate) negative_aesthetic_score: Option<f64>,
    /// SDXL: an SDXL refiner (folder, single file or repo id) that finishes the image: the base
    /// runs the first --refiner-switch of the schedule and hands its latents over (diffusers'
    /// ensemble of expert denoisers, one generator).
    #[arg(long, value_name = "MODEL")]
    pub(crate) refiner: Option<String>,
    /// With --refiner: the fraction of the schedule the base runs, between 0 and 1.
    #[arg(long, value_name = "F", default_value_t = 0.8)]
    pub(crate) refiner_switch: f64,
}

/// `WIDTHxHEIGHT` (as --width/--height and the infotext's `Size`) to diffusers' (height, width).
fn parse_size(text: &str) -> std::result::Result<(usize, usize), String> {
    let parsed = text.split_once(['x', 'X']).and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some((width, height)) if width > 0 && height > 0 => Ok((height, width)),
        _ => Err(format!("`{text}` is not WIDTHxHEIGHT with positive whole numbers (e.g. 1024x1024)")),
    }
}

/// `TOP,LEFT` to (top, left).
fn parse_coords(text: &str) -> std::result::Result<(usize, usize), String> {
    text.split_once(',')
        .and_then(|(top, left)| Some((top.trim().parse().ok()?, left.trim().parse().ok()?)))
        .ok_or_else(|| format!("`{text}` is not TOP,LEFT with whole numbers (e.g. 0,0)"))
}

fn show_size((height, width): (usize, usize)) -> String {
    format!("{width}x{height}")
}

fn show_coords((top, left): (usize, usize)) -> String {
    format!("{top},{left}")
}

/// Infotext keys: A1111's for the refiner, diffuse's own for the rest.
const PROMPT_2: &str = "Prompt 2";
const NEGATIVE_PROMPT_2: &str = "Negative prompt 2";
const ORIGINAL_SIZE: &str = "Original size";
const TARGET_SIZE: &str = "Target size";
const CROP: &str = "Crop top left";
const NEGATIVE_ORIGINAL_SIZE: &str = "Negative original size";
const NEGATIVE_TARGET_SIZE: &str = "Negative target size";
const NEGATIVE_CROP: &str = "Negative crop top left";
const AESTHETIC_SCORE: &str = "Aesthetic score";
const NEGATIVE_AESTHETIC_SCORE: &str = "Negative aesthetic score";
const REFINER: &str = "Refiner";
const REFINER_SWITCH: &str = "Refiner switch at";

/// Every key this module reads back (so that `--from` does not call them unknown).
pub(crate) const KEYS: [&str; 12] = [
    PROMPT_2,
    NEGATIVE_PROMPT_2,
    ORIGINAL_SIZE,
    TARGET_SIZE,
    CROP,
    NEGATIVE_ORIGINAL_SIZE,
    NEGATIVE_TARGET_SIZE,
    NEGATIVE_CROP,
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    REFINER,
    REFINER_SWITCH,
];

impl XlArgs {
    /// Whether any SDXL-only flag was given (the refiner switch has a default).
    fn any(&self) -> bool {
        self.prompt_2.is_some()
            || self.negative_prompt_2.is_some()
            || self.original_size.is_some()
            || self.target_size.is_some()
            || self.crops_coords_top_left.is_some()
            || self.negative_original_size.is_some()
            || self.negative_target_size.is_some()
            || self.negative_crops_coords_top_left.is_some()
            || self.aesthetic_score.is_some()
            || self.negative_aesthetic_score.is_some()
            || self.refiner.is_some()
    }

    /// Refuses SDXL flags for other models, and a refiner switch outside (0, 1).
    pub(crate) fn check(&self, pipeline: &StableDiffusionPipeline) -> Result<()> {
        if self.any() && !pipeline.is_xl() {
            bail!(
                "--prompt-2, --original-size, --target-size, --crops-coords-top-left, the aesthetic scores and --refiner \
                 are for SDXL models; {} is not one (its UNet has no addition_embed_type `text_time`)",
                pipeline.model_dir.display()
            );
        }
        if !(self.refiner_switch > 0.0 && self.refiner_switch < 1.0) {
            bail!("--refiner-switch must be between 0 and 1 (exclusive), got {}", self.refiner_switch);
        }
        for (flag, score) in [("--aesthetic-score", self.aesthetic_score), ("--negative-aesthetic-score", self.negative_aesthetic_score)] {
            if score.is_some_and(|s| !s.is_finite()) {
                bail!("{flag} must be a finite number");
            }
        }
        self.micro_conditioning().map(|_| ())
    }

    /// The sizes and crops as diffusers takes them, each (height, width) or (top, left), in
    /// the order original, crop, target, and the negative ones; an error names the flag.
    fn micro_conditioning(&self) -> Result<[Option<(usize, usize)>; 6]> {
        let parse = |flag: &str, value: &Option<String>, parser: fn(&str) -> std::result::Result<(usize, usize), String>| {
            value.as_deref().map(|text| parser(text).map_err(|why| anyhow::anyhow!("--{flag} {why}"))).transpose()
        };
        Ok([
            parse("original-size", &self.original_size, parse_size)?,
            parse("crops-coords-top-left", &self.crops_coords_top_left, parse_coords)?,
            parse("target-size", &self.target_size, parse_size)?,
            parse("negative-original-size", &self.negative_original_size, parse_size)?,
            parse("negative-crops-coords-top-left", &self.negative_crops_coords_top_left, parse_coords)?,
            parse("negative-target-size", &self.negative_target_size, parse_size)?,
        ])
    }

    /// The options these flags set (after [`Self::check`]).
    pub(crate) fn apply(&self, options: &mut TextToImageOptions) -> Result<()> {
        let defaults = TextToImageOptions::default();
        let [original, crop, target, negative_original, negative_crop, negative_target] = self.micro_conditioning()?;
        options.prompt_2 = self.prompt_2.clone();
        options.negative_prompt_2 = self.negative_prompt_2.clone();
        options.original_size = original;
        options.target_size = target;
        options.crops_coords_top_left = crop.unwrap_or_default();
        options.negative_original_size = negative_original;
        options.negative_target_size = negative_target;
        options.negative_crops_coords_top_left = negative_crop.unwrap_or_default();
        options.aesthetic_score = self.aesthetic_score.unwrap_or(defaults.aesthetic_score);
        options.negative_aesthetic_score = self.negative_aesthetic_score.unwrap_or(defaults.negative_aesthetic_score);
        Ok(())
    }

    /// The infotext entries for what was given (the refiner by its name, as A1111 records it).
    pub(crate) fn infotext_entries(&self) -> Vec<(String, String)> {
        let mut entries = Vec::new();
        let mut push = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                entries.push((key.to_string(), value));
            }
        };
        push(PROMPT_2, self.prompt_2.clone());
        push(NEGATIVE_PROMPT_2, self.negative_prompt_2.clone());
        // (Checked before the run: what does not parse is not recorded.)
        let [original, crop, target, negative_original, negative_crop, negative_target] =
            self.micro_conditioning().unwrap_or_default();
        push(ORIGINAL_SIZE, original.map(show_size));
        push(TARGET_SIZE, target.map(show_size));
        push(CROP, crop.map(show_coords));
        push(NEGATIVE_ORIGINAL_SIZE, negative_original.map(show_size));
        push(NEGATIVE_TARGET_SIZE, negative_target.map(show_size));
        push(NEGATIVE_CROP, negative_crop.map(show_coords));
        push(AESTHETIC_SCORE, self.aesthetic_score.map(|v| v.to_string()));
        push(NEGATIVE_AESTHETIC_SCORE, self.negative_aesthetic_score.map(|v| v.to_string()));
        push(REFINER, self.refiner.as_deref().map(super::parameters::model_name));
        push(REFINER_SWITCH, self.refiner.as_ref().map(|_| self.refiner_switch.to_string()));
        entries
    }

    /// `--from`: the recorded values, for the flags not given (`given` says which were). A
    /// refiner given by a local path is recorded by name only: it must be given again.
    pub(crate) fn recall(&mut self, params: &GenerationParameters, given: &dyn Fn(&str) -> bool, png: &Path) -> Result<()> {
        let recorded = |key: &str| params.extra.iter().find(|(k, _)| k == key).map(|(_, value)| value.clone());
        let context = |key: &str| format!("--from {}: `{key}`", png.display());
        let checked = |key: &str, parser: fn(&str) -> std::result::Result<(usize, usize), String>| -> Result<Option<String>> {
            recorded(key).map(|v| parser(&v).map(|_| v).map_err(anyhow::Error::msg).with_context(|| context(key))).transpose()
        };
        let size = |key: &str| checked(key, parse_size);
        let coords = |key: &str| checked(key, parse_coords);
        let number = |key: &str| -> Result<Option<f64>> {
            recorded(key).map(|v| v.trim().parse::<f64>().with_context(|| context(key))).transpose()
        };
        macro_rules! fill {
            ($id:literal, $field:ident, $value:expr) => {
                if !given($id) {
                    if let Some(value) = $value {
                        self.$field = Some(value);
                    }
                }
            };
        }
        fill!("prompt_2", prompt_2, recorded(PROMPT_2));
        fill!("negative_prompt_2", negative_prompt_2, recorded(NEGATIVE_PROMPT_2));
        fill!("original_size", original_size, size(ORIGINAL_SIZE)?);
        fill!("target_size", target_size, size(TARGET_SIZE)?);
        fill!("crops_coords_top_left", crops_coords_top_left, coords(CROP)?);
        fill!("negative_original_size", negative_original_size, size(NEGATIVE_ORIGINAL_SIZE)?);
        fill!("negative_target_size", negative_target_size, size(NEGATIVE_TARGET_SIZE)?);
        fill!("negative_crops_coords_top_left", negative_crops_coords_top_left, coords(NEGATIVE_CROP)?);
        fill!("aesthetic_score", aesthetic_score, number(AESTHETIC_SCORE)?);
        fill!("negative_aesthetic_score", negative_aesthetic_score, number(NEGATIVE_AESTHETIC_SCORE)?);
        if let (Some(refiner), false) = (recorded(REFINER), given("refiner")) {
            if !Path::new(&refiner).exists() && !refiner.contains('/') {
                bail!(
                    "--from {}: the image was refined by `{refiner}`, recorded by name only: give its folder or file with --refiner",
                    png.display()
                );
            }
            self.refiner = Some(refiner);
        }
        if let (Some(switch), false) = (number(REFINER_SWITCH)?, given("refiner_switch")) {
            self.refiner_switch = switch;
        }
        Ok(())
    }
}
