//! Devices by name, as PyTorch spells them: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
//!
//! The CPU runs the project's own kernels (`ops`); every other device runs candle's tensor
//! operations, the path `DIFFUSE_ISA=tensor` tests on the CPU. CUDA and Metal need the crate's
//! `cuda` / `metal` features, and are checked only where such a GPU is available.

use candle_core::Device;

use crate::{Error, Result};

/// The device `name` names; an unknown name, an unbuilt backend or a missing GPU is an error
/// that says which.
pub fn parse(name: &str) -> Result<Device> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((kind, index)) => {
            let ordinal = index
                .parse::<usize>()
                .map_err(|_| Error::invalid(format!("device `{name}`: `{index}` is not a device number (cuda:0, cuda:1, ...)")))?;
            (kind, ordinal)
        }
        None => (name, 0),
    };
    let unbuilt = |feature: &str| {
        Error::invalid(format!(
            "device `{name}`: this build of diffuse has no {} support (build it with `--features {feature}`)",
            feature.to_uppercase()
        ))
    };
    let unavailable = |e: candle_core::Error| Error::invalid(format!("device `{name}` cannot be opened: {}", crate::error::first_line(&e)));
    match kind {
        "cpu" if name == "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Device::new_cuda(ordinal).map_err(unavailable),
        "cuda" => Err(unbuilt("cuda")),
        "metal" if cfg!(feature = "metal") => Device::new_metal(ordinal).map_err(unavailable),
        "metal" => Err(unbuilt("metal")),
        _ => Err(Error::invalid(format!("device `{name}` is not one of cpu, cuda, cuda:N, metal, metal:N"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse("cpu").unwrap().is_cpu());
        for (name, says) in [
            ("tpu", "not one of cpu, cuda"),
            ("cpu:1", "not one of cpu"),
            ("cuda:x", "`x` is not a device number"),
            ("cuda:-1", "is not a device number"),
        ] {
            let message = parse(name).unwrap_err().to_string();
            assert!(message.contains(says), "{name}: {message}");
        }
        #[cfg(not(feature = "cuda"))]
        assert!(parse("cuda:0").unwrap_err().to_string().contains("--features cuda"));
        #[cfg(not(feature = "metal"))]
        assert!(parse("metal").unwrap_err().to_string().contains("--features metal"));
    }
}
