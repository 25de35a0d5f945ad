//! Loss and accuracy.

use crate::Result;
use candle_core::{Tensor, D};

/// Softmax cross-entropy of `logits` (N, K) against class indices `labels` (N), averaged over
/// the batch, with label smoothing ε: `(1 − ε)·NLL + ε·mean_k(−log p_k)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = candle_nn::loss::nll(&log_p, labels)?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = log_p.mean(D::Minus1)?.mean_all()?.neg()?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}

/// Running top-1 and top-5 counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Accuracy {
    /// Images seen.
    pub count: usize,
    /// Correct at rank 1.
    pub correct1: usize,
    /// Correct within the first five.
    pub correct5: usize,
}

impl Accuracy {
    /// Adds a batch of logits (N, K) and labels (N).
    pub fn update(&mut self, logits: &Tensor, labels: &[u32]) -> Result<()> {
        let rows: Vec<Vec<f32>> =
            logits.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        for (row, &label) in rows.iter().zip(labels) {
            let target = row[label as usize];
            // Rank = number of classes scoring strictly higher (ties count in the label's favour).
            let rank = row.iter().filter(|&&v| v > target).count();
            self.count += 1;
            self.correct1 += (rank < 1) as usize;
            self.correct5 += (rank < 5) as usize;
        }
        Ok(())
    }

    /// Top-1 accuracy in percent.
    pub fn top1(&self) -> f64 {
        100.0 * self.correct1 as f64 / self.count.max(1) as f64
    }

    /// Top-5 accuracy in percent.
    pub fn top5(&self) -> f64 {
        100.0 * self.correct5 as f64 / self.count.max(1) as f64
    }
}
