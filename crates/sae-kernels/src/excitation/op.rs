//! The excitation op's descriptor: what the CPU, CUDA and Metal kernels all compute from
//! (channels, hidden width, gate) and the layout of its packed parameter vector. A leaf: the
//! backends depend on it, never on each other or on the public API in `mod.rs`.

/// How the gates scale the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Gate {
    /// `u ⊙ s`, the original SENet.
    #[serde(rename = "s")]
    S,
    /// `u + u ⊙ s`, as in the SENetV2 authors' published code (the paper presets).
    #[serde(rename = "one_plus_s")]
    OnePlusS,
}

impl Gate {
    /// The config spelling: `s` or `one_plus_s`.
    pub fn name(self) -> &'static str {
        match self {
            Gate::S => "s",
            Gate::OnePlusS => "one_plus_s",
        }
    }

    /// Scale factor for a gate value `s`.
    #[inline(always)]
    pub(crate) fn factor(self, s: f32) -> f32 {
        match self {
            Gate::S => s,
            Gate::OnePlusS => 1.0 + s,
        }
    }

    /// Numeric code of the gate mode for the GPU kernels (0: `s`, 1: `one_plus_s`).
    #[allow(dead_code)] // Used by the `cuda` and `metal` features only.
    pub(crate) fn code(self) -> u32 {
        match self {
            Gate::S => 0,
            Gate::OnePlusS => 1,
        }
    }
}

impl std::str::FromStr for Gate {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "s" => Ok(Gate::S),
            "one_plus_s" => Ok(Gate::OnePlusS),
            other => Err(crate::error::Error::UnknownGate(other.to_string())),
        }
    }
}

/// Forward op: (x, packed params) → scaled x.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExcitationOp {
    pub channels: usize,
    pub hidden: usize,
    /// The reduction layer's branches of `hidden / branches` rows each, multiplied one by one
    /// in the CPU forward (1 where they differ in size): so the packed op and the one that
    /// reads the branches in place (`ExcitationUnpacked`) compute the same bit for bit — the
    /// `gemm` crate sums in another order for a product of fewer rows.
    pub branches: usize,
    pub gate: Gate,
}

/// Backward op: (x, packed params, output gradient) → dx on the CPU, with the parameters'
/// gradient (f32, in a buffer of its own) left in the slot (`.1`): a custom op returns one
/// storage of one dtype, and a gradient of its own is not copied again by the gradient store.
/// On CUDA and Metal → `[dx | dparams]` packed in one 1-D tensor.
#[derive(Debug)]
pub(crate) struct ExcitationBackwardOp(pub ExcitationOp, pub crate::cpu::GradientSlot);

/// Offsets of the four parameter blocks inside the packed parameter vector.
pub(crate) struct ParamOffsets {
    pub b1: usize,
    pub w2: usize,
    pub b2: usize,
    pub len: usize,
}

impl ExcitationOp {
    pub fn offsets(&self) -> ParamOffsets {
        let (c, h) = (self.channels, self.hidden);
        ParamOffsets { b1: h * c, w2: h * c + h, b2: 2 * h * c + h, len: 2 * h * c + h + c }
    }
}
