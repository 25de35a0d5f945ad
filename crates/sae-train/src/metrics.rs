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

/// A full evaluation: loss, top-1 and top-5, per-class accuracy and the confusion matrix.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1, %.
    pub top1: f64,
    /// Top-5, %.
    pub top5: f64,
    /// Images evaluated.
    pub images: usize,
    /// `confusion[true][predicted]`: image counts.
    pub confusion: Vec<Vec<usize>>,
}

impl Evaluation {
    /// Accuracy of each class in percent (its images classified right), `None` for a class
    /// without images.
    pub fn per_class(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let total: usize = row.iter().sum();
                (total > 0).then(|| 100.0 * row[c] as f64 / total as f64)
            })
            .collect()
    }
}

/// Accumulates an [`Evaluation`] batch by batch.
#[derive(Debug, Clone)]
pub struct EvaluationSum {
    loss_sum: f64,
    accuracy: Accuracy,
    confusion: Vec<Vec<usize>>,
}

impl EvaluationSum {
    /// Nothing seen yet, for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self { loss_sum: 0.0, accuracy: Accuracy::default(), confusion: vec![vec![0; classes]; classes] }
    }

    /// Adds a batch: logits (N, K), labels (N), and the batch's mean loss.
    pub fn update(&mut self, logits: &Tensor, labels: &[u32], mean_loss: f64) -> Result<()> {
        self.loss_sum += mean_loss * labels.len() as f64;
        self.accuracy.update(logits, labels)?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (&t, &p) in labels.iter().zip(&predicted) {
            if let Some(cell) = self.confusion.get_mut(t as usize).and_then(|row| row.get_mut(p as usize)) {
                *cell += 1;
            }
        }
        Ok(())
    }

    /// Sums the counts over the ranks of `collective` (each rank having evaluated its shard).
    /// Counts travel as `f32`, exact below 2²⁴ images.
    pub fn all_reduce(&mut self, collective: &dyn crate::Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        let a = &self.accuracy;
        let mut values = vec![self.loss_sum as f32, a.count as f32, a.correct1 as f32, a.correct5 as f32];
        values.extend(self.confusion.iter().flatten().map(|&c| c as f32));
        collective.all_reduce_sum(&mut values)?;
        self.loss_sum = values[0] as f64;
        self.accuracy =
            Accuracy { count: values[1] as usize, correct1: values[2] as usize, correct5: values[3] as usize };
        for (cell, v) in self.confusion.iter_mut().flatten().zip(&values[4..]) {
            *cell = *v as usize;
        }
        Ok(())
    }

    /// The evaluation so far.
    pub fn finish(self) -> Evaluation {
        let a = self.accuracy;
        Evaluation {
            loss: self.loss_sum / a.count.max(1) as f64,
            top1: a.top1(),
            top5: a.top5(),
            images: a.count,
            confusion: self.confusion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn evaluation_counts_match_a_hand_count() {
        // Three classes, four images. Predictions (argmax): 0, 2, 2, 1; labels 0, 1, 2, 1.
        let logits =
            Tensor::new(&[[3.0f32, 1.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.0, 1.0], [0.0, 2.0, 1.0]], &Device::Cpu)
                .unwrap();
        let mut sum = EvaluationSum::new(3);
        sum.update(&logits, &[0, 1, 2, 1], 0.5).unwrap();
        sum.update(&logits.narrow(0, 0, 1).unwrap(), &[2], 1.5).unwrap();
        let e = sum.finish();
        // Fifth image: label 2, predicted 0, and 2 is its worst class (rank 2: still top-5).
        assert_eq!(e.confusion, vec![vec![1, 0, 0], vec![0, 1, 1], vec![1, 0, 1]]);
        assert_eq!(e.images, 5);
        assert!((e.top1 - 60.0).abs() < 1e-9 && (e.top5 - 100.0).abs() < 1e-9);
        assert!((e.loss - (0.5 * 4.0 + 1.5) / 5.0).abs() < 1e-9);
        assert_eq!(e.per_class(), vec![Some(100.0), Some(50.0), Some(50.0)]);
        assert_eq!(EvaluationSum::new(2).finish().per_class(), vec![None, None]);
    }
}
