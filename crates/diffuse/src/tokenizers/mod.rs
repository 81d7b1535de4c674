//! Text tokenizers of the text encoders that condition diffusion models.

pub mod clip;

pub use clip::{ClipEncoding, ClipTokenizer};
