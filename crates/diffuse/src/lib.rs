//! diffuse: diffusion models in Rust on candle, numerically matching diffusers.

pub mod configs;
pub mod default_model;
pub mod error;
pub mod evaluation;
pub mod files;
pub mod loading;
pub mod lora;
pub mod models;
pub mod ops;
pub mod pipelines;
pub mod prompts;
pub mod rng;
pub mod schedulers;
pub mod tokenizers;
pub mod training;

pub use error::{Error, Result};
