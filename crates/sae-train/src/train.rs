//! The training loop.
//!
//! A run directory holds `config.json` (the resolved [`TrainConfig`]), `summary.csv` (one row
//! per epoch), `train.log`, `curves.png`, and `checkpoints/epoch-NNNN/` (`model.safetensors`,
//! `optimizer.safetensors`, `state.json`), with `checkpoints/last.json` and `checkpoints/best.json` naming the latest
//! and the best (by eval top-1). Every file is written to a temporary name and renamed, so a
//! killed run leaves the last complete checkpoint, and `resume` continues from it with the
//! same result as an uninterrupted run (shuffles and augmentation depend only on seed, epoch
//! and index).

use crate::checkpoint::{self, CheckpointState};
use crate::config::{TrainConfig, CONFIG_FILE};
use crate::data::{datasets, to_tensors};
use crate::error::io;
use crate::metrics::{cross_entropy, Accuracy};
use crate::optim::Optimizer;
use crate::progress::{epoch_line, Progress};
use crate::summary::{read_summary, write_summary, EpochSummary};
use crate::{Error, Result};
use candle_core::{Device, ModuleT};
use sae_data::{Dataset, Loader, LoaderConfig};
use sae_models::Model;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Trains as `cfg` says, in `dir`. With `resume`, continues the run in `dir` from its last
/// checkpoint (its `config.json` must match `cfg` except for `epochs`). Without, `dir` must
/// not already hold a run. Returns every epoch's summary.
pub fn train(
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<Vec<EpochSummary>> {
    cfg.validate()?;
    let model = Model::new(cfg.model.clone(), cfg.seed, device)?;
    // The run's one kernel switch reaches the optimiser's update too.
    let mut optimizer = cfg.optimizer.build(model.trainable_vars(), cfg.model.kernels);
    let (mut state, mut history) = open_run(cfg, dir, resume, &model, optimizer.as_mut())?;

    let splits = datasets(&cfg.data, cfg.seed)?;
    let classes = splits.train.classes().len();
    if classes != cfg.model.num_classes {
        return Err(Error::Config(format!(
            "the dataset has {classes} classes but the model has {} outputs",
            cfg.model.num_classes
        )));
    }
    let loader_cfg =
        LoaderConfig { batch_size: cfg.batch_size, shuffle: true, drop_last: true, seed: cfg.seed, prefetch: 3 };
    let train_loader = Loader::new(Arc::new(splits.train), splits.train_transform, splits.normalize, loader_cfg)?;
    let eval_cfg = LoaderConfig { shuffle: false, drop_last: false, ..loader_cfg };
    let eval_loader = Loader::new(Arc::new(splits.eval), splits.eval_transform, splits.normalize, eval_cfg)?;
    if train_loader.batches_per_epoch() == 0 {
        return Err(Error::Config(format!("fewer training images than one batch of {}", cfg.batch_size)));
    }
    let log_path = dir.join("train.log");
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io(&log_path))?;

    for epoch in state.epoch..cfg.epochs {
        let start = Instant::now();
        let trained =
            train_epoch(cfg, dir, device, &model, optimizer.as_mut(), &train_loader, epoch, &mut state, progress)?;
        let train_seconds = start.elapsed().as_secs_f64();
        let (eval_loss, eval_top1, eval_top5) = device.with_context(|| evaluate(&model, &eval_loader, device))?;
        let summary = EpochSummary {
            epoch: epoch + 1,
            train_loss: trained.loss_sum / trained.images.max(1) as f64,
            train_top1: trained.accuracy.top1(),
            eval_loss,
            eval_top1,
            eval_top5,
            lr: optimizer.lr(),
            seconds: start.elapsed().as_secs_f64(),
            images_per_second: trained.images as f64 / train_seconds,
        };
        progress.epoch_end(&summary);
        writeln!(log, "{}", epoch_line(&summary)).map_err(io(&log_path))?;
        history.push(summary);
        write_summary(dir, &history)?;
        crate::plot::plot_run(&history, &cfg.model.name, &dir.join("curves.png"))?;
        state.epoch = epoch + 1;
        checkpoint::save(dir, &model, optimizer.as_ref(), &mut state, eval_top1)?;
    }
    Ok(history)
}

/// Starts a run in `dir` (writing its config) or, with `resume`, loads its last checkpoint
/// into `model` and `optimizer`; returns the progress so far and the finished epochs.
fn open_run(
    cfg: &TrainConfig,
    dir: &Path,
    resume: bool,
    model: &Model,
    optimizer: &mut dyn Optimizer,
) -> Result<(CheckpointState, Vec<EpochSummary>)> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config_path = dir.join(CONFIG_FILE);
    let mut progress = (CheckpointState::default(), Vec::new());
    if resume {
        let saved = TrainConfig::read(dir)?;
        if (TrainConfig { epochs: cfg.epochs, ..saved }) != *cfg {
            return Err(Error::Config(format!("{}: the run was made with a different config", config_path.display())));
        }
        if let Some(state) = checkpoint::load_last(dir, model, optimizer)? {
            let mut history = read_summary(dir)?;
            history.truncate(state.epoch);
            progress = (state, history);
        }
    } else if config_path.exists() {
        return Err(Error::Config(format!(
            "{} already holds a run; resume it or choose another directory",
            dir.display()
        )));
    }
    sae_fs::write_atomic(&config_path, serde_json::to_string_pretty(cfg).expect("config serialises").as_bytes())?;
    Ok(progress)
}

/// What one epoch of training saw.
struct EpochTraining {
    loss_sum: f64,
    images: usize,
    accuracy: Accuracy,
}

/// One epoch of training steps; `state.step` counts them.
#[allow(clippy::too_many_arguments)]
fn train_epoch<D: Dataset + 'static>(
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    model: &Model,
    optimizer: &mut dyn Optimizer,
    loader: &Loader<D>,
    epoch: usize,
    state: &mut CheckpointState,
    progress: &mut dyn Progress,
) -> Result<EpochTraining> {
    let start = Instant::now();
    let batches = loader.batches_per_epoch();
    progress.epoch_start(epoch + 1, batches);
    let mut seen = EpochTraining { loss_sum: 0.0, images: 0, accuracy: Accuracy::default() };
    for (i, batch) in loader.epoch(epoch as u64).enumerate() {
        let batch = batch?;
        optimizer.set_lr(cfg.schedule.lr(cfg.optimizer.lr(), epoch as f64 + i as f64 / batches as f64));
        let (x, y) = to_tensors(&batch, device)?;
        // Forward and backward inside Candle's own CPU thread pool (a no-op on GPUs).
        let (logits, loss, grads) = device.with_context(|| -> Result<_> {
            let logits = model.forward_t(&x, true)?;
            let loss = cross_entropy(&logits, &y, cfg.label_smoothing)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss { value, epoch, step: state.step, dir: dir.to_path_buf() });
            }
            let grads = loss.backward()?;
            Ok((logits, value, grads))
        })?;
        optimizer.step(&grads)?;
        state.step += 1;
        seen.loss_sum += loss as f64 * batch.labels.len() as f64;
        seen.images += batch.labels.len();
        seen.accuracy.update(&logits, &batch.labels)?;
        let images_per_second = seen.images as f64 / start.elapsed().as_secs_f64();
        progress.batch(seen.loss_sum / seen.images as f64, seen.accuracy.top1(), images_per_second);
    }
    Ok(seen)
}

/// Evaluates `model` (eval mode) on `loader`: (loss, top-1 %, top-5 %).
pub fn evaluate<D: Dataset + 'static>(model: &Model, loader: &Loader<D>, device: &Device) -> Result<(f64, f64, f64)> {
    let mut acc = Accuracy::default();
    let mut loss_sum = 0.0;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let (x, y) = to_tensors(&batch, device)?;
        let logits = model.forward_t(&x, false)?;
        loss_sum += cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()? as f64 * batch.labels.len() as f64;
        acc.update(&logits, &batch.labels)?;
    }
    Ok((loss_sum / acc.count.max(1) as f64, acc.top1(), acc.top5()))
}
