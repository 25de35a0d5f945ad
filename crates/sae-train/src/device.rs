//! The device a run trains on, by the name users type (`--device cpu|cuda|metal`), with an
//! error that says what is missing: the build's feature, the CUDA libraries, or a usable GPU.

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
        // cudarc loads the driver and cuBLAS at run time and panics when one is missing.
        "cuda" => match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
            Ok(device) => device.map_err(|e| {
                Error::Device(format!("--device cuda: GPU {ordinal} is not usable (no GPU, or no such device): {e}"))
            }),
            Err(panic) => Err(Error::Device(format!(
                "--device cuda: the CUDA libraries could not be loaded ({}); install the NVIDIA driver (libcuda.so.1) \
                 and CUDA's cuBLAS and cuRAND (a CUDA toolkit, or PyTorch's nvidia-* wheels), and put their \
                 directories on LD_LIBRARY_PATH",
                panic_message(panic.as_ref())
            ))),
        },
        "metal" => Device::new_metal(ordinal)
            .map_err(|e| Error::Device(format!("--device metal: no usable Metal device {ordinal}: {e}"))),
        other => Err(Error::Device(format!("unknown device {other:?}; the devices are cpu, cuda and metal"))),
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "no message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_panic_is_read_into_the_error() {
        let payload = std::panic::catch_unwind(|| panic!("Unable to dynamically load the \"cublas\" shared library"))
            .unwrap_err();
        assert_eq!(panic_message(payload.as_ref()), "Unable to dynamically load the \"cublas\" shared library");
        let payload = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(payload.as_ref()), "no message");
    }

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
