//! Reading what users have on disk: config files, safetensors weights (diffusers folders and
//! single-file checkpoints), and models named by Hugging Face repo id.

pub mod config;
pub mod hub;
pub mod mapped;
pub mod single_file;
pub mod weights;
