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
use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use sae_models::Model;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
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
    let mut file = TensorFile::open(&opt_path)?;
    optimizer.load_state(&mut |name| file.read(name, model.device()), &opt_path)?;
    if optimizer.steps() as usize != state.step {
        return Err(bad(format!("optimiser is at step {} but state.json says {}", optimizer.steps(), state.step)));
    }
    Ok(state)
}

/// A safetensors file read one tensor at a time. An optimiser's state is twice the weights
/// (Adam's two moments); read whole, all of it sat beside the moments it was being loaded into
/// while a run resumed (SENetV2-ResNet-50: ~230 MB above the fresh run's needs). The header is
/// checked against the file's length when it is opened, so a truncated file fails there.
struct TensorFile {
    file: File,
    path: PathBuf,
    /// Where the data after the header begins.
    data_start: u64,
    metadata: safetensors::tensor::Metadata,
}

impl TensorFile {
    fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a valid safetensors file: {reason}"),
        };
        let mut file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut header_len = [0u8; 8];
        file.read_exact(&mut header_len).map_err(|_| bad(format!("{len} bytes, too short for a header")))?;
        let header_len = u64::from_le_bytes(header_len);
        // safetensors' own limit on a header (100 MB).
        if header_len > (len - 8).min(100_000_000) {
            return Err(bad(format!("a header of {header_len} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io(path))?;
        // Deserialising checks that the tensors' byte ranges follow one another and fit their
        // shapes and dtypes.
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = metadata.tensors().values().map(|info| info.data_offsets.1 as u64).max().unwrap_or(0);
        if data_start + data_len != len {
            return Err(bad(format!(
                "its header describes {data_len} bytes of tensors, the file holds {}",
                len - data_start
            )));
        }
        Ok(Self { file, path: path.to_path_buf(), data_start, metadata })
    }

    /// The tensor `name` on `device`, or `None` where the file has none of that name.
    fn read(&mut self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(info) = self.metadata.info(name) else { return Ok(None) };
        let (start, end) = info.data_offsets;
        let mut data = vec![0u8; end - start];
        self.file.seek(SeekFrom::Start(self.data_start + start as u64)).map_err(io(&self.path))?;
        self.file.read_exact(&mut data).map_err(io(&self.path))?;
        let bad =
            |e: &dyn std::fmt::Display| Error::Checkpoint { path: self.path.clone(), reason: format!("{name}: {e}") };
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &data).map_err(|e| bad(&e))?;
        view.load(device).map(Some).map_err(|e| bad(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use std::collections::HashMap;

    fn tmp_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    /// Every tensor read alone equals what Candle's whole-file loader reads, in f32, bf16 and
    /// i64, whatever the order of the requests; an absent name is `None`.
    #[test]
    fn tensors_read_one_at_a_time_equal_the_whole_file() {
        let device = Device::Cpu;
        let values = |n: usize| Tensor::arange(0f32, n as f32, &device).unwrap().affine(0.37, -1.5).unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("a.m".to_string(), values(60).reshape((5, 3, 4)).unwrap()),
            ("b".to_string(), values(7).to_dtype(DType::BF16).unwrap()),
            ("step".to_string(), Tensor::new(&[42i64], &device).unwrap()),
        ]
        .into();
        let (_dir, path) = tmp_file("state.safetensors", &[]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let whole = candle_core::safetensors::load(&path, &device).unwrap();
        let mut file = TensorFile::open(&path).unwrap();
        for name in ["step", "b", "a.m", "b"] {
            let got = file.read(name, &device).unwrap().unwrap();
            let want = &whole[name];
            assert_eq!((got.dtype(), got.dims()), (want.dtype(), want.dims()), "{name}");
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(bits(&got), bits(want), "{name}");
        }
        assert!(file.read("a.v", &device).unwrap().is_none());
    }

    /// Damaged files fail when opened, naming the file and what is wrong.
    #[test]
    fn damaged_files_are_named() {
        let device = Device::Cpu;
        let tensors: HashMap<String, Tensor> =
            [("w".to_string(), Tensor::ones((4, 4), DType::F32, &device).unwrap())].into();
        let (_dir, path) = tmp_file("good.safetensors", &[]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut bad_json = good.clone();
        bad_json[8] = b'x';
        let mut huge_header = good.clone();
        huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("short", good[..5].to_vec(), "too short for a header"),
            ("truncated", good[..good.len() - 1].to_vec(), "64 bytes of tensors, the file holds 63"),
            ("longer", [good.as_slice(), &[0u8; 3]].concat(), "the file holds 67"),
            ("bad-json", bad_json, "header:"),
            ("huge-header", huge_header, "a header of 18446744073709551615 bytes"),
        ];
        assert!(header_len + 8 + 64 == good.len());
        for (name, bytes, what) in cases {
            let (_dir, path) = tmp_file(&format!("{name}.safetensors"), &bytes);
            let err = TensorFile::open(&path).err().unwrap_or_else(|| panic!("{name} opened")).to_string();
            assert!(
                err.contains(&format!("{name}.safetensors"))
                    && err.contains("not a valid safetensors file")
                    && err.contains(what),
                "{name}: {err}"
            );
        }
    }
}
