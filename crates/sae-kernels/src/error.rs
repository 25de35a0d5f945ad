//! The crate's error type for parsing options; ops themselves return `candle_core::Error`,
//! like the rest of Candle, so they compose with `?` inside models.

/// Errors of option parsing in `sae-kernels`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kernel implementation name that is neither `reference` nor `fused`.
    #[error("unknown kernel implementation {0:?} (known: reference, fused)")]
    UnknownImplementation(String),
    /// A gate mode name that is neither `s` nor `one_plus_s`.
    #[error("unknown gate mode {0:?} (known: s, one_plus_s)")]
    UnknownGate(String),
}
