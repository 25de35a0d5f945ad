//! `summary.csv`: one row per finished epoch, rewritten whole (atomically) after each.

use crate::error::io;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One row of `summary.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training top-1 accuracy, %.
    pub train_top1: f64,
    /// Evaluation loss.
    pub eval_loss: f64,
    /// Evaluation top-1, %.
    pub eval_top1: f64,
    /// Evaluation top-5, %.
    pub eval_top5: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time of the epoch (train + eval), seconds.
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

const CSV_HEADER: &str = "epoch,train_loss,train_top1,eval_loss,eval_top1,eval_top5,lr,seconds,images_per_second";

impl EpochSummary {
    fn csv_row(&self) -> String {
        format!(
            "{},{:.6},{:.4},{:.6},{:.4},{:.4},{:.6e},{:.2},{:.2}",
            self.epoch,
            self.train_loss,
            self.train_top1,
            self.eval_loss,
            self.eval_top1,
            self.eval_top5,
            self.lr,
            self.seconds,
            self.images_per_second
        )
    }

    fn parse(line: &str, path: &Path) -> Result<Self> {
        let bad = || Error::Summary { path: path.to_path_buf(), reason: format!("bad row {line:?}") };
        let f: Vec<f64> =
            line.split(',').map(|v| v.parse::<f64>()).collect::<std::result::Result<_, _>>().map_err(|_| bad())?;
        if f.len() != 9 {
            return Err(bad());
        }
        Ok(Self {
            epoch: f[0] as usize,
            train_loss: f[1],
            train_top1: f[2],
            eval_loss: f[3],
            eval_top1: f[4],
            eval_top5: f[5],
            lr: f[6],
            seconds: f[7],
            images_per_second: f[8],
        })
    }
}

/// A run's evaluation top-1 averaged over its last three epochs (steadier than the last epoch
/// alone); 0 for a run without epochs.
pub fn last_three_top1(history: &[EpochSummary]) -> f64 {
    let tail = &history[history.len().saturating_sub(3)..];
    tail.iter().map(|s| s.eval_top1).sum::<f64>() / tail.len().max(1) as f64
}

/// Reads a run's `summary.csv`.
pub fn read_summary(dir: &Path) -> Result<Vec<EpochSummary>> {
    let path = dir.join("summary.csv");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    text.lines().skip(1).filter(|l| !l.trim().is_empty()).map(|l| EpochSummary::parse(l, &path)).collect()
}

/// Writes `history` as a run's `summary.csv`.
pub fn write_summary(dir: &Path, history: &[EpochSummary]) -> Result<()> {
    let csv: String = std::iter::once(CSV_HEADER.to_string())
        .chain(history.iter().map(EpochSummary::csv_row))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    Ok(sae_fs::write_atomic(&dir.join("summary.csv"), csv.as_bytes())?)
}
