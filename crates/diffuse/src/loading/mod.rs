//! Reading what users have on disk: config files and safetensors weights.

pub mod config;
pub mod hub;
