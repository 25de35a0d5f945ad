//! Atomic checkpoints: the model weights (and their moving average, when the run keeps one),
//! optimiser state and `state.json` are written into a temporary directory that is renamed
//! into place, and then the small pointer files `last.json` / `best.json` are replaced by
//! rename. A crash at any moment leaves the previous complete checkpoint reachable. Older
//! checkpoints other than the best are removed. Checkpoints are taken at the end of each epoch
//! (`epoch-NNNN`) and, with `checkpoint_every`, within one (`epoch-NNNN-batch-NNNNNN`: the
//! batches done of the next epoch and that epoch's running totals, to resume mid-epoch).

use crate::error::io;
use crate::optim::Optimizer;
use crate::{Error, Result};
use sae_models::{Model, TensorFile};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Progress saved with each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimiser steps taken.
    pub step: usize,
    /// Best eval top-1 so far, %.
    pub best_top1: f64,
    /// Epoch of the best eval top-1.
    pub best_epoch: usize,
    /// Batches done of epoch `epoch` (0-based; the epoch after the completed ones): non-zero
    /// in a checkpoint taken within an epoch.
    #[serde(default)]
    pub batch: usize,
    /// The running totals of that unfinished epoch.
    #[serde(default)]
    pub partial: PartialEpoch,
    /// Processes training the run (data parallelism); a resume needs as many.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl Default for CheckpointState {
    fn default() -> Self {
        Self {
            epoch: 0,
            step: 0,
            best_top1: 0.0,
            best_epoch: 0,
            batch: 0,
            partial: PartialEpoch::default(),
            world_size: 1,
        }
    }
}

/// Running totals of an epoch's training batches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Σ loss · batch size.
    pub loss_sum: f64,
    /// Images seen.
    pub images: usize,
    /// Of which classified right (top-1).
    pub correct: usize,
    /// Training seconds so far.
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct Pointer {
    dir: String,
}

fn checkpoints(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn dir_name(epoch: usize, batch: usize) -> String {
    match batch {
        0 => format!("epoch-{epoch:04}"),
        b => format!("epoch-{epoch:04}-batch-{b:06}"),
    }
}

fn write_pointer(run: &Path, which: &str, dir: &str) -> Result<()> {
    let json = serde_json::to_string(&Pointer { dir: dir.to_string() }).expect("pointer serialises");
    Ok(sae_fs::write_atomic(&checkpoints(run).join(format!("{which}.json")), json.as_bytes())?)
}

fn read_pointer(run: &Path, which: &str) -> Result<Option<String>> {
    let path = checkpoints(run).join(format!("{which}.json"));
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let p: Pointer =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint { path: path.clone(), reason: e.to_string() })?;
    // Only a checkpoint directory beside the pointer, never a path elsewhere.
    if !p.dir.starts_with("epoch-") || p.dir.contains(['/', '\\']) || p.dir.contains("..") {
        return Err(Error::Checkpoint { path, reason: format!("names {:?}, not a checkpoint directory", p.dir) });
    }
    Ok(Some(p.dir))
}

/// Saves the checkpoint of `state` (`state.epoch` completed epochs and `state.batch` batches
/// of the next); at the end of an epoch `eval_top1` updates `best` when it beats it. `ema` is
/// the moving average of the weights, when the run keeps one.
pub fn save(
    run: &Path,
    model: &Model,
    ema: Option<&Model>,
    optimizer: &dyn Optimizer,
    state: &mut CheckpointState,
    eval_top1: Option<f64>,
) -> Result<()> {
    let root = checkpoints(run);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = dir_name(state.epoch, state.batch);
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let is_best = eval_top1.is_some_and(|top1| state.best_epoch == 0 || top1 > state.best_top1);
    if let (true, Some(top1)) = (is_best, eval_top1) {
        state.best_top1 = top1;
        state.best_epoch = state.epoch;
    }
    model.save(&tmp.join("model.safetensors"))?;
    if let Some(ema) = ema {
        ema.save(&tmp.join("ema.safetensors"))?;
    }
    optimizer.save_state(&tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(tmp.join("state.json"), json).map_err(io(&tmp))?;
    sae_fs::replace_dir(&tmp, &root.join(&name))?;
    write_pointer(run, "last", &name)?;
    if is_best {
        write_pointer(run, "best", &name)?;
    }
    // Keep only the last and the best.
    let best = dir_name(state.best_epoch, 0);
    for entry in std::fs::read_dir(&root).map_err(io(&root))?.flatten() {
        let n = entry.file_name().to_string_lossy().to_string();
        if n.starts_with("epoch-") && !n.ends_with(".tmp") && n != name && n != best {
            std::fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

/// Loads the checkpoint `last.json` names into `model` and `optimizer`; `None` when the run
/// has none yet.
pub fn load_last(
    run: &Path,
    model: &Model,
    ema: Option<&Model>,
    optimizer: &mut dyn Optimizer,
) -> Result<Option<CheckpointState>> {
    let Some(name) = read_pointer(run, "last")? else { return Ok(None) };
    load_dir(&checkpoints(run).join(name), model, ema, optimizer).map(Some)
}

/// The checkpoint directory `best.json` names (the best eval top-1 at an epoch's end); `None`
/// when there is none yet.
pub fn best_dir(run: &Path) -> Result<Option<PathBuf>> {
    Ok(read_pointer(run, "best")?.map(|n| checkpoints(run).join(n)))
}

/// The checkpoint directory `last.json` names; `None` when the run has no checkpoint.
pub fn last_dir(run: &Path) -> Result<Option<PathBuf>> {
    Ok(read_pointer(run, "last")?.map(|n| checkpoints(run).join(n)))
}

/// The weights a run is evaluated with: its best checkpoint's (the last's with `last`, or
/// while it has no best), the exponential moving average where the run kept one, as its own
/// evaluation used.
pub fn run_weights(run: &Path, last: bool) -> Result<PathBuf> {
    let best = if last { None } else { best_dir(run)? };
    let dir = match best {
        Some(dir) => dir,
        None => last_dir(run)?.ok_or_else(|| Error::Checkpoint {
            path: run.to_path_buf(),
            reason: "the run has no checkpoint yet".into(),
        })?,
    };
    let ema = dir.join("ema.safetensors");
    Ok(if ema.is_file() { ema } else { dir.join("model.safetensors") })
}

/// Loads one checkpoint directory.
pub fn load_dir(
    dir: &Path,
    model: &Model,
    ema: Option<&Model>,
    optimizer: &mut dyn Optimizer,
) -> Result<CheckpointState> {
    let bad = |reason: String| Error::Checkpoint { path: dir.to_path_buf(), reason };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    model.load_weights(&dir.join("model.safetensors"))?;
    if let Some(ema) = ema {
        ema.load_weights(&dir.join("ema.safetensors"))?;
    }
    let opt_path = dir.join("optimizer.safetensors");
    // One tensor at a time: the whole file is twice the weights (Adam's two moments).
    let mut file = TensorFile::open(&opt_path)?;
    optimizer.load_state(&mut |name| Ok(file.read(name, model.device())?), &opt_path)?;
    if optimizer.steps() as usize != state.step {
        return Err(bad(format!("optimiser is at step {} but state.json says {}", optimizer.steps(), state.step)));
    }
    Ok(state)
}
