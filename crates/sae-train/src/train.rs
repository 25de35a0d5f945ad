//! The training loop.
//!
//! A run directory holds `config.json` (the resolved [`TrainConfig`]), `classes.txt` (the
//! data's class names in label order), `summary.csv` (one row per epoch), TensorBoard's
//! `events.out.tfevents.*` (the same scalars and each step's, [`crate::tensorboard`]), `train.log`,
//! `curves.png`, and `checkpoints/epoch-NNNN/` (`model.safetensors`,
//! `optimizer.safetensors`, `state.json`), with `checkpoints/last.json` and
//! `checkpoints/best.json` naming the latest and the best (by eval top-1). Every file is written to a temporary name and renamed, so a
//! killed run leaves the last complete checkpoint, and `resume` continues from it with the
//! same result as an uninterrupted run (shuffles and augmentation depend only on seed, epoch
//! and index).
//!
//! With several processes ([`train_with`] and a [`Collective`] of world size W), each trains on
//! its shard of every batch (`batch_size` images per process, W·`batch_size` per step), their
//! gradients are averaged before each step, and rank 0 alone writes the run directory.

use crate::checkpoint::{self, CheckpointState, PartialEpoch};
use crate::config::{TrainConfig, CLASSES_FILE, CONFIG_FILE};
use crate::data::{datasets, to_tensors};
use crate::dist::{
    average_gradients, broadcast_vars, bucket_bytes, BatchNormSum, Collective, GradientBuckets, SingleProcess,
};
use crate::error::io;
use crate::metrics::{cross_entropy, Accuracy, Evaluation, EvaluationSum};
use crate::optim::Optimizer;
use crate::progress::{epoch_line, Progress};
use crate::summary::{read_summary, write_summary, EpochSummary};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, ModuleT, Tensor, TensorId};
use sae_data::{Dataset, Loader, LoaderConfig, Mixed};
use sae_models::Model;
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One batch's forward pass and loss: the logits' values (detached from the graph), the
/// loss's value (cross-entropy with `label_smoothing`, or the mixed images' blend of two) and
/// the loss divided by `batches_per_step`, the one tensor of the graph it returns, ready for
/// the backward pass (`backward_consuming`, or [`backward_with_step`]; accumulated over a
/// step's batches, the gradients are those of their mean loss).
///
/// No tensor of the graph outlives the forward pass but the loss: the accuracy needs only the
/// logits' values, and the backward pass then frees each activation once its gradient has
/// been passed on, so the step's peak memory is not the activations and their gradients
/// together (the activations of a ResNet-50 step at 140×140 are most of its memory).
pub fn forward_loss(
    forward: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    labels: &Tensor,
    mixed: Option<&Mixed>,
    label_smoothing: f64,
    batches_per_step: usize,
) -> Result<(Tensor, f32, Tensor)> {
    let logits = forward(x)?;
    let mut loss = cross_entropy(&logits, labels, label_smoothing)?;
    if let Some(mixed) = mixed {
        // λ·CE(y) + (1 − λ)·CE(y of the images mixed in).
        let partner = Tensor::from_slice(&mixed.partner_labels, mixed.partner_labels.len(), labels.device())?;
        let other = cross_entropy(&logits, &partner, label_smoothing)?;
        let lambda = mixed.lambda as f64;
        loss = ((loss * lambda)? + (other * (1.0 - lambda))?)?;
    }
    let value = loss.to_scalar::<f32>()?;
    let logits_values = logits.detach();
    drop(logits);
    let loss = if batches_per_step > 1 { (loss / batches_per_step as f64)? } else { loss };
    Ok((logits_values, value, loss))
}

/// The backward pass of `loss` with `optimizer`'s step taken during it: each variable is
/// updated as soon as its gradient is complete (`Tensor::backward_consuming_with`), and the
/// gradient dropped, so that the step never holds all the gradients at once and reads each
/// one while it is fresh in the cache. Same values as `backward_consuming` followed by
/// [`Optimizer::step`] (each variable's update depends only on its own gradient); returns the
/// gradients of the variables the optimiser does not hold.
pub fn backward_with_step(loss: Tensor, optimizer: &mut dyn Optimizer) -> Result<GradStore> {
    let vars = optimizer.variable_ids().into_iter().collect();
    backward_with_averaged_step(loss, optimizer, &vars, &SingleProcess, 0, None)
}

/// [`backward_with_step`] for one of several data-parallel ranks, and for the last batch of
/// an accumulated step: each gradient is first added to its sum over the step's `earlier`
/// batches ([`backward_adding_into`]), then the gradients are averaged over the ranks in
/// buckets of about `bucket_bytes` as the pass completes them, and each bucket's variables
/// updated (`dist::GradientBuckets`). `vars` are the optimiser's variables'
/// ([`Optimizer::variable_ids`]). The same values as `backward_consuming`, the sum,
/// `average_gradients` and [`Optimizer::step`].
pub(crate) fn backward_with_averaged_step(
    loss: Tensor,
    optimizer: &mut dyn Optimizer,
    vars: &HashSet<TensorId>,
    collective: &dyn Collective,
    bucket_bytes: usize,
    mut earlier: Option<GradStore>,
) -> Result<GradStore> {
    optimizer.begin_step();
    let mut buckets = GradientBuckets::new(collective, bucket_bytes);
    // Candle's pass returns Candle's errors: the optimiser's or collective's own is kept here.
    let mut failed = None;
    let grads = loss.backward_consuming_with(&mut |var, grad| {
        if !vars.contains(&var.id()) {
            return Ok(Some(grad));
        }
        let grad = plus_earlier(earlier.as_mut(), var, grad)?;
        match buckets.push(var.id(), grad, optimizer) {
            Ok(()) => Ok(None),
            Err(e) => {
                let message = e.to_string();
                failed = Some(e);
                Err(candle_core::Error::Msg(message))
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let grads = grads?;
    // Variables with a gradient from the earlier batches only, in the optimiser's order.
    if let Some(earlier) = earlier {
        for id in optimizer.variable_ids() {
            if let Some(sum) = earlier.get_id(id) {
                buckets.push(id, sum.clone(), optimizer)?;
            }
        }
    }
    buckets.flush(optimizer)?;
    Ok(grads)
}

/// The backward pass of one of an accumulated step's batches but its last: the gradient of
/// each variable in `vars` (the optimiser's) is added to its sum in `sum` as soon as it is
/// complete, so that the batch's gradients are never all held beside the sum.
fn backward_adding_into(loss: Tensor, sum: &mut GradStore, vars: &HashSet<TensorId>) -> Result<()> {
    loss.backward_consuming_with(&mut |var, grad| {
        if !vars.contains(&var.id()) {
            return Ok(Some(grad));
        }
        let total = plus_earlier(Some(sum), var, grad)?;
        sum.insert(var, total);
        Ok(None)
    })?;
    Ok(())
}

/// `grad` plus `var`'s sum over a step's earlier batches, taken out of `sum`; `grad` itself
/// where there is none.
fn plus_earlier(sum: Option<&mut GradStore>, var: &Tensor, grad: Tensor) -> candle_core::Result<Tensor> {
    match sum.and_then(|sum| sum.remove(var)) {
        Some(earlier) => earlier + grad,
        None => Ok(grad),
    }
}

/// Trains as `cfg` says, in `dir`. With `resume`, continues the run in `dir` from its last
/// checkpoint (its `config.json` must match `cfg` except for `epochs`), mid-epoch when that
/// checkpoint was taken within one. Without, `dir` must not already hold a run. Returns every
/// epoch's summary.
pub fn train(
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<Vec<EpochSummary>> {
    train_with(cfg, dir, device, resume, progress, Arc::new(SingleProcess))
}

/// [`train`] as one rank of `collective`: every rank calls it with the same arguments. Rank 0
/// opens (or resumes) the run and hands its weights, optimiser state and progress to the
/// others; it alone reports `progress` and writes `dir`. A resumed run must have the world
/// size it was trained with.
pub fn train_with(
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    resume: bool,
    progress: &mut dyn Progress,
    collective: Arc<dyn Collective>,
) -> Result<Vec<EpochSummary>> {
    cfg.validate()?;
    let (rank, world) = (collective.rank(), collective.world_size());
    let is_root = rank == 0;
    let mut silent = Silent;
    let progress: &mut dyn Progress = if is_root { progress } else { &mut silent };
    let new_model = || -> Result<Model> {
        let mut model = Model::new(cfg.model.clone(), cfg.seed, device)?;
        model.set_precision(cfg.precision);
        Ok(model)
    };
    let model = new_model()?;
    let ema = match cfg.steps.ema_decay {
        Some(_) => Some(new_model()?),
        None => None,
    };
    // The run's one kernel switch reaches the optimiser's update too.
    let mut optimizer = cfg.optimizer.build(model.trainable_vars(), cfg.model.kernels);
    // A fresh start: the init weights, and the moving average from them. Before a new run
    // writes anything (a bad init file leaves no run behind); after a resume that found no
    // checkpoint yet.
    let start_fresh = || -> Result<()> {
        if let Some(init) = &cfg.steps.init {
            load_init(&model, init)?;
        }
        match &ema {
            Some(ema) => copy_weights(&model, ema),
            None => Ok(()),
        }
    };
    let mut run = Run {
        cfg,
        dir,
        device,
        model: &model,
        ema: ema.as_ref(),
        state: CheckpointState { world_size: world, ..CheckpointState::default() },
        collective: collective.clone(),
        events: None,
    };
    // Every rank reads its data first, so that data that cannot be read leaves no run behind
    // (as a bad init file does not). Rank 0 then opens the run; the others learn how that went
    // (an error included, so that they stop too), and then take its weights.
    let data = datasets(&cfg.data, cfg.seed).and_then(|splits| match splits.train.classes().len() {
        classes if classes == cfg.model.num_classes => Ok(splits),
        classes => Err(Error::Config(format!(
            "the dataset has {classes} classes but the model has {} outputs",
            cfg.model.num_classes
        ))),
    });
    let (splits, opened) = match data {
        Err(e) => (None, Err(e)),
        Ok(splits) if is_root => {
            let classes = splits.train.classes().join("\n") + "\n";
            let opened = (|| {
                if !resume {
                    start_fresh()?;
                }
                let history = run.open(resume, optimizer.as_mut())?;
                // A resume that found no checkpoint yet starts as a new run does.
                if resume && run.state.epoch == 0 && run.state.step == 0 {
                    start_fresh()?;
                }
                // Written on every opening, so that a run from before it was kept gains it.
                sae_fs::write_atomic(&dir.join(CLASSES_FILE), classes.as_bytes())?;
                Ok(history)
            })();
            (Some(splits), opened)
        }
        Ok(splits) => (Some(splits), Ok(Vec::new())),
    };
    let mut history = share_opening(&mut run, opened, optimizer.as_mut())?;
    let splits = splits.expect("share_opening returns this rank's data error");
    let loader_cfg =
        LoaderConfig { batch_size: cfg.batch_size, shuffle: true, drop_last: true, seed: cfg.seed, prefetch: 3 };
    let train_loader = Loader::new(Arc::new(splits.train), splits.train_transform, splits.eval.normalize, loader_cfg)?
        .with_augmentation(cfg.augment.trivial_augment, cfg.augment.mixing())
        .with_shard(rank, world)?;
    let eval_cfg = LoaderConfig { shuffle: false, drop_last: false, ..loader_cfg };
    let eval_loader = Loader::new(Arc::new(splits.eval.data), splits.eval.transform, splits.eval.normalize, eval_cfg)?
        .with_shard(rank, world)?;
    if train_loader.batches_per_epoch() == 0 {
        return Err(Error::Config(format!(
            "fewer training images than one batch of {} × {world} processes",
            cfg.batch_size
        )));
    }
    let log_path = dir.join("train.log");
    let mut log = match is_root {
        true => Some(std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io(&log_path))?),
        false => None,
    };
    if let Some(log) = &mut log {
        let what = if resume { "resumed" } else { "started" };
        writeln!(log, "# run {what} at epoch {}: precision {}", run.state.epoch, cfg.precision.describe(device))
            .map_err(io(&log_path))?;
    }

    for epoch in run.state.epoch..cfg.epochs {
        let trained = run.train_epoch(optimizer.as_mut(), &train_loader, epoch, progress)?;
        let start = Instant::now();
        let evaluated = ema.as_ref().unwrap_or(&model);
        run.synchronised(|| recalibrate_bn(evaluated, &train_loader, epoch, cfg.steps.recalibrate_bn, device))?;
        let evaluation = device.with_context(|| evaluate_sharded(evaluated, &eval_loader, device, &*collective))?;
        let (eval_loss, eval_top1, eval_top5) = (evaluation.loss, evaluation.top1, evaluation.top5);
        let summary = EpochSummary {
            epoch: epoch + 1,
            train_loss: trained.loss_sum / trained.images.max(1) as f64,
            train_top1: 100.0 * trained.correct as f64 / trained.images.max(1) as f64,
            eval_loss,
            eval_top1,
            eval_top5,
            lr: optimizer.lr(),
            seconds: trained.seconds + start.elapsed().as_secs_f64(),
            images_per_second: trained.images as f64 / trained.seconds,
        };
        progress.epoch_end(&summary);
        history.push(summary);
        run.state.epoch = epoch + 1;
        run.state.batch = 0;
        run.state.partial = PartialEpoch::default();
        if let Some(log) = &mut log {
            writeln!(log, "{}", epoch_line(history.last().expect("just pushed"))).map_err(io(&log_path))?;
            write_summary(dir, &history)?;
            crate::plot::plot_run(&history, &cfg.model.name, &dir.join("curves.png"))?;
            checkpoint::save(dir, &model, ema.as_ref(), optimizer.as_ref(), &mut run.state, Some(eval_top1))?;
            // After the checkpoint: a resume logs no epoch twice.
            let first_step = run.state.step as u64 + 1;
            run.events(first_step)?.epoch(history.last().expect("just pushed"))?;
        }
    }
    // The others wait for rank 0's last files, so that what they read next is complete.
    collective.barrier()?;
    Ok(history)
}

/// Hands rank 0's opening of the run to the other ranks: its error, or its progress
/// (`CheckpointState`), weights, weight average and optimiser state. Returns rank 0's
/// history (empty on the others, which write no summaries).
fn share_opening(
    run: &mut Run,
    opened: Result<Vec<EpochSummary>>,
    optimizer: &mut dyn Optimizer,
) -> Result<Vec<EpochSummary>> {
    let collective = run.collective.clone();
    if collective.world_size() == 1 {
        return opened;
    }
    let is_root = collective.rank() == 0;
    let mut message = match (&opened, is_root) {
        (Err(e), true) => format!("error: {e}").into_bytes(),
        (Ok(_), true) => serde_json::to_vec(&run.state).expect("state serialises"),
        _ => Vec::new(),
    };
    collective.broadcast_bytes(&mut message, 0)?;
    let history = opened?;
    if !is_root {
        let text = String::from_utf8_lossy(&message);
        if let Some(e) = text.strip_prefix("error: ") {
            return Err(Error::Distributed(format!("rank 0 could not open the run: {e}")));
        }
        run.state = serde_json::from_slice(&message)
            .map_err(|e| Error::Distributed(format!("rank 0 sent an unreadable run state: {e}")))?;
    }
    let vars: Vec<_> = run.model.named_vars().into_iter().collect();
    broadcast_vars(&*collective, &vars, 0)?;
    if let Some(ema) = run.ema {
        broadcast_vars(&*collective, &ema.named_vars().into_iter().collect::<Vec<_>>(), 0)?;
    }
    crate::dist::broadcast_optimizer_state(&*collective, optimizer, 0)?;
    Ok(history)
}

/// Progress of the ranks other than 0: none.
struct Silent;

impl Progress for Silent {
    fn epoch_start(&mut self, _epoch: usize, _batches: usize) {}
    fn batch(&mut self, _loss: f64, _top1: f64, _images_per_second: f64) {}
    fn epoch_end(&mut self, _summary: &EpochSummary) {}
}

/// Loads the `init` weights into `model`: safetensors or a PyTorch checkpoint, or `hf:…` from
/// the Hub (`sae_data::resolve_weights`). A classifier head whose class count differs keeps the
/// model's fresh initialisation (fine-tuning), and so do the excitation modules where the
/// weights are a plain ResNet's; every other tensor must match.
fn load_init(model: &Model, init: &Path) -> Result<()> {
    let path = sae_data::resolve_weights(init)?;
    let mut tensors = sae_models::read_state_dict(&path)?;
    // A plain ResNet's weights start an SE-ResNet or SENetV2: its excitation modules, of which
    // the file has none, keep their initialisation (a file with some is loaded strictly).
    let is_excitation = |name: &str| name.contains(".se.");
    let plain = !tensors.keys().any(|name| is_excitation(name));
    for (name, var) in model.named_vars() {
        let is_head = name.starts_with("fc.") || name.starts_with("classifier.");
        let new_head = is_head && tensors.get(&name).is_some_and(|t| t.dims() != var.dims());
        if new_head || (plain && is_excitation(&name)) {
            tensors.insert(name, var.as_tensor().copy()?);
        }
    }
    Ok(model.load_state_dict(tensors, &path)?)
}

/// Runs the first `batches` training batches of `epoch` through `model` in training mode,
/// without gradients, so that BatchNorm's running statistics follow the current weights.
fn recalibrate_bn<D: Dataset + 'static>(
    model: &Model,
    loader: &Loader<D>,
    epoch: usize,
    batches: usize,
    device: &Device,
) -> Result<()> {
    for batch in loader.epoch(epoch as u64).take(batches) {
        let (x, _) = to_tensors(&batch?, device)?;
        device.with_context(|| model.forward_without_graph(&x, true))?;
    }
    Ok(())
}

/// Sets every variable of `to` (weights and BatchNorm statistics) to `from`'s.
fn copy_weights(from: &Model, to: &Model) -> Result<()> {
    let to_vars = to.named_vars();
    for (name, var) in from.named_vars() {
        if let Some(dst) = to_vars.get(&name) {
            dst.set(var.as_tensor())?;
        }
    }
    Ok(())
}

/// A run in progress: its config, directory, model (and weight average), progress, and the
/// processes training it.
struct Run<'a> {
    cfg: &'a TrainConfig,
    dir: &'a Path,
    device: &'a Device,
    model: &'a Model,
    ema: Option<&'a Model>,
    state: CheckpointState,
    collective: Arc<dyn Collective>,
    /// Rank 0's TensorBoard file of this opening, created at the first step it logs.
    events: Option<crate::tensorboard::EventWriter>,
}

impl Run<'_> {
    /// Rank 0's event file, created on first use with its START at `first_step`.
    fn events(&mut self, first_step: u64) -> Result<&mut crate::tensorboard::EventWriter> {
        if self.events.is_none() {
            self.events = Some(crate::tensorboard::EventWriter::create(self.dir, first_step)?);
        }
        Ok(self.events.as_mut().expect("just created"))
    }

    /// Runs `f` with BatchNorm's statistics taken over all ranks, when the run asks for that.
    fn synchronised<R>(&self, f: impl FnOnce() -> R) -> R {
        match self.cfg.steps.sync_bn && self.collective.world_size() > 1 {
            true => sae_models::with_sync_batch_norm(Arc::new(BatchNormSum(self.collective.clone())), f),
            false => f(),
        }
    }

    /// Starts the run (writing its config) or, with `resume`, loads its last checkpoint into
    /// the model and `optimizer`; returns the finished epochs' summaries.
    fn open(&mut self, resume: bool, optimizer: &mut dyn Optimizer) -> Result<Vec<EpochSummary>> {
        let (cfg, dir) = (self.cfg, self.dir);
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config_path = dir.join(CONFIG_FILE);
        let mut history = Vec::new();
        if resume {
            let saved = TrainConfig::read(dir)?;
            if (TrainConfig { epochs: cfg.epochs, ..saved }) != *cfg {
                return Err(Error::Config(format!(
                    "{}: the run was made with a different config",
                    config_path.display()
                )));
            }
            if let Some(state) = checkpoint::load_last(dir, self.model, self.ema, optimizer)? {
                let world = self.collective.world_size();
                if state.world_size != world {
                    return Err(Error::Distributed(format!(
                        "{} was trained by {} process(es) and is resumed by {world}; resume it with as many \
                         (`mpirun -np {}`), since the world size is part of the batch",
                        dir.display(),
                        state.world_size,
                        state.world_size
                    )));
                }
                // A checkpoint within the first epoch comes before any summary.
                if state.epoch > 0 {
                    history = read_summary(dir)?;
                    history.truncate(state.epoch);
                }
                self.state = state;
            }
        } else if config_path.exists() {
            return Err(Error::Config(format!(
                "{} already holds a run; resume it or choose another directory",
                dir.display()
            )));
        }
        sae_fs::write_atomic(&config_path, serde_json::to_string_pretty(cfg).expect("config serialises").as_bytes())?;
        Ok(history)
    }

    /// One epoch of training from `state.batch` on; `state` counts steps and batches, and
    /// holds the epoch's running totals, which it returns at the end.
    fn train_epoch<D: Dataset + 'static>(
        &mut self,
        optimizer: &mut dyn Optimizer,
        loader: &Loader<D>,
        epoch: usize,
        progress: &mut dyn Progress,
    ) -> Result<PartialEpoch> {
        let (cfg, steps) = (self.cfg, &self.cfg.steps);
        let start = Instant::now();
        let batches = loader.batches_per_epoch();
        let per_step = steps.batches_per_step();
        let first = self.state.batch;
        let mut totals = std::mem::take(&mut self.state.partial);
        let seconds_before = totals.seconds;
        progress.epoch_start(epoch + 1, batches);
        // Without clipping by the global norm, which needs every gradient first, each variable
        // is updated during the backward pass of a step's last batch, as soon as its gradient
        // is complete (and summed over the step's batches, and averaged over the ranks in its
        // bucket): `backward_with_averaged_step`; the batches before add theirs to the sum
        // during their own passes (`backward_adding_into`).
        let update_in_backward = steps.clip_grad_norm.is_none();
        let optimizer_vars: HashSet<TensorId> = optimizer.variable_ids().into_iter().collect();
        let mut accumulated: Option<GradStore> = None;
        // The current step's loss sum, images and correct top-1 over its batches (and ranks).
        let mut step_sums = [0.0f64; 3];
        for (i, batch) in (first..).zip(loader.epoch_from(epoch as u64, first)) {
            let batch = batch?;
            optimizer.set_lr(cfg.schedule.lr(cfg.optimizer.lr(), epoch as f64 + i as f64 / batches as f64));
            let (x, y) = to_tensors(&batch, self.device)?;
            // Forward and backward inside Candle's own CPU thread pool (a no-op on GPUs).
            let (logits, loss, loss_tensor) = self.device.with_context(|| {
                let forward = |x: &Tensor| self.synchronised(|| self.model.forward_t(x, true));
                forward_loss(forward, &x, &y, batch.mixed.as_ref(), cfg.label_smoothing, per_step)
            })?;
            // The batch's totals over all ranks, so that every rank sees the same loss and
            // stops together when it is not finite.
            let mut accuracy = Accuracy::default();
            accuracy.update(&logits, &batch.labels)?;
            let n = batch.labels.len() as f32;
            let mut sums = [loss * n, n, accuracy.correct1 as f32];
            self.collective.all_reduce_sum(&mut sums)?;
            let [loss_sum, images, correct] = sums.map(f64::from);
            let loss = (loss_sum / images) as f32;
            if !loss.is_finite() {
                let step = self.state.step;
                return Err(Error::NonFiniteLoss { value: loss, epoch, step, dir: self.dir.to_path_buf() });
            }
            // A step after every `per_step` batches, and after the epoch's last batch.
            let last_of_step = (i + 1).is_multiple_of(per_step) || i + 1 == batches;
            if update_in_backward && last_of_step {
                let (vars, collective, earlier) = (&optimizer_vars, &*self.collective, accumulated.take());
                self.device.with_context(|| {
                    backward_with_averaged_step(loss_tensor, optimizer, vars, collective, bucket_bytes(), earlier)
                })?;
            } else if update_in_backward {
                let sum = accumulated.get_or_insert_with(GradStore::default);
                self.device.with_context(|| backward_adding_into(loss_tensor, sum, &optimizer_vars))?;
            } else {
                let grads = self.device.with_context(|| loss_tensor.backward_consuming())?;
                accumulated = Some(match accumulated.take() {
                    None => grads,
                    Some(sum) => add_gradients(sum, &grads, self.model)?,
                });
            }
            totals.loss_sum += loss_sum;
            totals.images += images as usize;
            totals.correct += correct as usize;
            step_sums = [step_sums[0] + loss_sum, step_sums[1] + images, step_sums[2] + correct];
            totals.seconds = seconds_before + start.elapsed().as_secs_f64();
            self.state.batch = i + 1;
            if last_of_step {
                // None where the update ran in the backward pass.
                let mut grads = accumulated.take();
                if let Some(grads) = &mut grads {
                    average_gradients(&*self.collective, grads, &self.model.trainable_vars(), bucket_bytes())?;
                    if let Some(max_norm) = steps.clip_grad_norm {
                        clip_grad_norm(grads, self.model, max_norm)?;
                    }
                }
                // In the pool the forward and backward ran in: the global pool's threads, woken
                // for the update, would spin beside that pool's (`results/train-profile.md`).
                self.device.with_context(|| -> Result<()> {
                    if let Some(grads) = &grads {
                        optimizer.step(grads)?;
                    }
                    if let (Some(ema), Some(decay)) = (self.ema, steps.ema_decay) {
                        update_ema(ema, self.model, decay)?;
                    }
                    Ok(())
                })?;
                self.state.step += 1;
                let [loss_sum, images, correct] = std::mem::take(&mut step_sums);
                if self.collective.rank() == 0 {
                    let step = self.state.step as u64;
                    self.events(step)?.step(step, loss_sum / images, 100.0 * correct / images, optimizer.lr())?;
                }
                let due = steps.checkpoint_every.is_some_and(|n| self.state.step.is_multiple_of(n));
                if due && i + 1 < batches && self.collective.rank() == 0 {
                    self.state.partial = totals.clone();
                    checkpoint::save(self.dir, self.model, self.ema, optimizer, &mut self.state, None)?;
                    self.state.partial = PartialEpoch::default();
                }
            }
            let top1 = 100.0 * totals.correct as f64 / totals.images as f64;
            let images_per_second = totals.images as f64 / totals.seconds.max(f64::EPSILON);
            progress.batch(totals.loss_sum / totals.images as f64, top1, images_per_second);
        }
        Ok(totals)
    }
}

/// `sum + grads` for every trainable variable of `model`.
fn add_gradients(mut sum: GradStore, grads: &GradStore, model: &Model) -> Result<GradStore> {
    for (_, var) in model.trainable_vars() {
        if let Some(g) = grads.get(&var) {
            let total = match sum.get(&var) {
                Some(s) => (s + g)?,
                None => g.clone(),
            };
            sum.insert(&var, total);
        }
    }
    Ok(sum)
}

/// Scales the gradients of `model`'s trainable variables so that their global L2 norm is at
/// most `max_norm` (PyTorch's `clip_grad_norm_`).
fn clip_grad_norm(grads: &mut GradStore, model: &Model, max_norm: f64) -> Result<()> {
    let vars = model.trainable_vars();
    let mut squares = 0f64;
    for (_, var) in &vars {
        if let Some(g) = grads.get(var) {
            squares += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = squares.sqrt();
    if norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for (_, var) in &vars {
            if let Some(g) = grads.get(var) {
                let scaled = (g * factor)?;
                grads.insert(var, scaled);
            }
        }
    }
    Ok(())
}

/// `ema ← decay·ema + (1 − decay)·model` for every variable, BatchNorm statistics included.
fn update_ema(ema: &Model, model: &Model, decay: f64) -> Result<()> {
    let vars = model.named_vars();
    for (name, avg) in ema.named_vars() {
        if let Some(w) = vars.get(&name) {
            avg.set(&((avg.as_tensor() * decay)? + (w.as_tensor().detach() * (1.0 - decay))?)?)?;
        }
    }
    Ok(())
}

/// Evaluates `model` (eval mode) on each rank's shard of the evaluation set (`loader`) and
/// sums the counts over the ranks: every rank gets the evaluation of the whole set.
pub fn evaluate_sharded<D: Dataset + 'static>(
    model: &Model,
    loader: &Loader<D>,
    device: &Device,
    collective: &dyn Collective,
) -> Result<Evaluation> {
    let mut sum = evaluation_sum(model, loader, device, &mut |_| {})?;
    sum.all_reduce(collective)?;
    Ok(sum.finish())
}

/// Evaluates `model` (eval mode) on `loader`: (loss, top-1 %, top-5 %).
pub fn evaluate<D: Dataset + 'static>(model: &Model, loader: &Loader<D>, device: &Device) -> Result<(f64, f64, f64)> {
    let e = evaluate_all(model, loader, device)?;
    Ok((e.loss, e.top1, e.top5))
}

/// Evaluates `model` (eval mode) on `loader`, with per-class accuracy and the confusion matrix.
pub fn evaluate_all<D: Dataset + 'static>(model: &Model, loader: &Loader<D>, device: &Device) -> Result<Evaluation> {
    evaluate_all_with(model, loader, device, &mut |_| {})
}

/// [`evaluate_all`], calling `on_batch(images)` after each batch (for progress reports).
pub fn evaluate_all_with<D: Dataset + 'static>(
    model: &Model,
    loader: &Loader<D>,
    device: &Device,
    on_batch: &mut dyn FnMut(usize),
) -> Result<Evaluation> {
    Ok(evaluation_sum(model, loader, device, on_batch)?.finish())
}

fn evaluation_sum<D: Dataset + 'static>(
    model: &Model,
    loader: &Loader<D>,
    device: &Device,
    on_batch: &mut dyn FnMut(usize),
) -> Result<EvaluationSum> {
    let mut sum = EvaluationSum::new(model.config().num_classes);
    for batch in loader.epoch(0) {
        let batch = batch?;
        on_batch(batch.labels.len());
        let (x, y) = to_tensors(&batch, device)?;
        let logits = model.forward_without_graph(&x, false)?;
        let loss = cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()? as f64;
        sum.update(&logits, &batch.labels, loss)?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use sae_models::config;

    fn images(n: usize) -> Tensor {
        let v: Vec<f32> = (0..n * 3 * 16 * 16).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        Tensor::from_vec(v, (n, 3, 16, 16), &Device::Cpu).unwrap()
    }

    fn gradients(model: &Model, x: &Tensor, labels: &[u32], scale: f64) -> GradStore {
        // Eval mode: BatchNorm per image, so the mean loss over a batch is the mean of halves.
        let y = Tensor::new(labels, &Device::Cpu).unwrap();
        let loss = cross_entropy(&model.forward_t(x, false).unwrap(), &y, 0.0).unwrap();
        (loss * scale).unwrap().backward().unwrap()
    }

    #[test]
    fn accumulated_half_batches_equal_the_whole_batch() {
        let model = Model::new(config("seresnet14b", 5).unwrap(), 3, &Device::Cpu).unwrap();
        let (x, labels) = (images(4), [0u32, 3, 1, 4]);
        let whole = gradients(&model, &x, &labels, 1.0);
        let first = gradients(&model, &x.narrow(0, 0, 2).unwrap(), &labels[..2], 0.5);
        let second = gradients(&model, &x.narrow(0, 2, 2).unwrap(), &labels[2..], 0.5);
        let sum = add_gradients(first, &second, &model).unwrap();
        for (name, var) in model.trainable_vars() {
            let (a, b) = (whole.get(&var).unwrap(), sum.get(&var).unwrap());
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale + 1e-7, "{name}: {diff} (scale {scale})");
        }
    }

    #[test]
    fn clipping_scales_to_the_global_norm_and_keeps_the_direction() {
        let model = Model::new(config("resnet14b", 5).unwrap(), 3, &Device::Cpu).unwrap();
        let norm = |g: &GradStore| -> f64 {
            model
                .trainable_vars()
                .iter()
                .filter_map(|(_, v)| g.get(v))
                .map(|t| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
                .sum::<f64>()
                .sqrt()
        };
        let original = gradients(&model, &images(2), &[1, 2], 1.0);
        let before = norm(&original);
        let mut clipped = gradients(&model, &images(2), &[1, 2], 1.0);
        clip_grad_norm(&mut clipped, &model, before / 4.0).unwrap();
        assert!((norm(&clipped) - before / 4.0).abs() <= 1e-4 * before, "{} vs {}", norm(&clipped), before / 4.0);
        let (_, fc) = model.trainable_vars().into_iter().find(|(n, _)| n == "fc.weight").unwrap();
        let ratio = (original.get(&fc).unwrap() / 4.0).unwrap();
        let diff = (ratio - clipped.get(&fc).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        // Below the limit nothing changes.
        let mut untouched = gradients(&model, &images(2), &[1, 2], 1.0);
        clip_grad_norm(&mut untouched, &model, before * 2.0).unwrap();
        assert_eq!(norm(&untouched), before);
    }

    #[test]
    fn recalibration_runs_the_epochs_first_batches_in_training_mode() {
        let dir = tempfile::Builder::new().prefix("sae-recalibrate-").tempdir().unwrap();
        let dir = dir.path();
        // A CIFAR-10 directory of 20 images.
        let record = |i: usize| -> Vec<u8> {
            let mut r = vec![(i % 10) as u8];
            r.extend((0..3072).map(|p| ((p * 7 + i * 31) % 251) as u8));
            r
        };
        for (f, name) in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
            .iter()
            .enumerate()
        {
            let bytes: Vec<u8> = (0..4).flat_map(|i| record(i + 4 * f)).collect();
            std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
        }
        std::fs::write(dir.join("batches.meta.txt"), (0..10).map(|k| format!("c{k}\n")).collect::<String>()).unwrap();
        let data = crate::DataConfig {
            dataset: crate::DatasetKind::Cifar10,
            dir: dir.to_path_buf(),
            input_size: 16,
            train_images: None,
            eval_images: None,
            val_fraction: None,
        };
        let splits = crate::data::datasets(&data, 4).unwrap();
        let cfg = LoaderConfig { batch_size: 4, shuffle: true, drop_last: true, seed: 4, prefetch: 1 };
        let loader = Loader::new(Arc::new(splits.train), splits.train_transform, splits.eval.normalize, cfg).unwrap();
        let model = |seed| Model::new(config("resnet14b", 10).unwrap(), seed, &Device::Cpu).unwrap();
        let (recalibrated, by_hand) = (model(1), model(1));
        recalibrate_bn(&recalibrated, &loader, 2, 3, &Device::Cpu).unwrap();
        for batch in loader.epoch(2).take(3) {
            let (x, _) = to_tensors(&batch.unwrap(), &Device::Cpu).unwrap();
            by_hand.forward_t(&x, true).unwrap();
        }
        let stat = |m: &Model| m.named_vars()["layer2.0.bn1.running_mean"].to_vec1::<f32>().unwrap();
        assert_eq!(stat(&recalibrated), stat(&by_hand));
        assert_ne!(stat(&recalibrated), stat(&model(1)), "the statistics moved");
    }

    #[test]
    fn the_weight_average_follows_its_formula() {
        let model = Model::new(config("resnet14b", 5).unwrap(), 1, &Device::Cpu).unwrap();
        let ema = Model::new(config("resnet14b", 5).unwrap(), 2, &Device::Cpu).unwrap();
        let value = |m: &Model, name: &str| m.named_vars()[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()[7];
        let (w, e) = (value(&model, "layer2.0.conv2.weight"), value(&ema, "layer2.0.conv2.weight"));
        update_ema(&ema, &model, 0.75).unwrap();
        let expected = 0.75 * e + 0.25 * w;
        assert!((value(&ema, "layer2.0.conv2.weight") - expected).abs() < 1e-7);
        // Running statistics are averaged too (they start equal, so they stay equal).
        assert_eq!(value(&ema, "bn1.running_var"), value(&model, "bn1.running_var"));
        copy_weights(&model, &ema).unwrap();
        assert_eq!(value(&ema, "fc.weight"), value(&model, "fc.weight"));
    }
}
