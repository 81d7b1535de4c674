//! `diffuse info FILE.png`: the generation parameters a PNG carries (its `parameters` text
//! chunk, as diffuse and the AUTOMATIC1111 web UI write it), raw or parsed as JSON.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use diffuse::pipelines::metadata::{parse_infotext, read_png_parameters};

#[derive(clap::Args)]
pub struct InfoArgs {
    /// A PNG written by diffuse (or by the AUTOMATIC1111 web UI).
    file: PathBuf,
    /// Print the parameters parsed, as JSON (prompt, negative_prompt, steps, sampler, ...;
    /// clip_skip in diffusers' numbering; settings diffuse does not know under "extra").
    #[arg(long)]
    json: bool,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let text = read_png_parameters(&args.file)?.ok_or_else(|| {
        anyhow!("{}: the PNG has no generation parameters (no `parameters` text chunk)", args.file.display())
    })?;
    if args.json {
        let params = parse_infotext(&text).with_context(|| args.file.display().to_string())?;
        outln!("{}", serde_json::to_string_pretty(&params)?);
    } else {
        outln!("{text}");
    }
    Ok(())
}
