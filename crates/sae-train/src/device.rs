//! The device a run trains on, by the name users type (`--device cpu|cuda|metal`), with an
//! error that says what is missing: the build's feature, or a usable GPU.

use crate::{Error, Result};
use candle_core::Device;

/// The device called `name` (`cpu`, `cuda` or `metal`); for `cuda` and `metal`, GPU number
/// `ordinal`.
pub fn device(name: &str, ordinal: usize) -> Result<Device> {
    let rebuild = |feature: &str, needs: &str| {
        Error::Device(format!(
            "--device {feature}: this build has no {} support; rebuild with the `{feature}` cargo feature \
             (`cargo install --path crates/sae-cli --features {feature}`, or \
             `cargo run --release -p xtask --features {feature} -- reproduce-table3 …`){needs}",
            feature.to_uppercase().replace("METAL", "Metal")
        ))
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if !cfg!(feature = "cuda") => Err(rebuild("cuda", ", which needs the CUDA toolkit's nvcc")),
        "metal" if !cfg!(feature = "metal") => Err(rebuild("metal", " on macOS")),
        // The CUDA libraries are linked: without them the program stops at start, the loader
        // naming the missing one.
        "cuda" => Device::new_cuda(ordinal).map_err(|e| {
            Error::Device(format!(
                "--device cuda: GPU {ordinal} is not usable (no NVIDIA driver, no libcuda, or no such device): {e}"
            ))
        }),
        "metal" => Device::new_metal(ordinal)
            .map_err(|e| Error::Device(format!("--device metal: no usable Metal device {ordinal}: {e}"))),
        other => Err(Error::Device(format!("unknown device {other:?}; the devices are cpu, cuda and metal"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_devices_or_say_what_is_missing() {
        assert!(device("cpu", 0).unwrap().is_cpu());
        let err = device("tpu", 0).unwrap_err().to_string();
        assert!(err.contains("\"tpu\"") && err.contains("cpu, cuda and metal"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = device("cuda", 0).unwrap_err().to_string();
            assert!(err.contains("no CUDA support") && err.contains("--features cuda"), "{err}");
        }
        if !cfg!(feature = "metal") {
            let err = device("metal", 0).unwrap_err().to_string();
            assert!(err.contains("no Metal support") && err.contains("--features metal"), "{err}");
        }
    }
}
