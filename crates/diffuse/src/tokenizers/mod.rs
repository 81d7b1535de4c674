//! Text tokenizers of the text encoders that condition diffusion models.

pub mod builtin;
pub mod clip;

pub use clip::{ClipEncoding, ClipTokenizer};
