//! The training loop and its run directory.
//!
//! A run directory holds `config.json` (the resolved [`TrainConfig`]), `summary.csv` (one row
//! per epoch), `train.log`, and `checkpoints/epoch-NNNN/{model,optimizer}.safetensors` +
//! `state.json`, with `checkpoints/last.json` and `checkpoints/best.json` naming the latest
//! and the best (by eval top-1). Every file is written to a temporary name and renamed, so a
//! killed run leaves the last complete checkpoint, and `resume` continues from it with the
//! same result as an uninterrupted run (shuffles and augmentation depend only on seed, epoch
//! and index).

use crate::checkpoint::{self, CheckpointState};
use crate::error::io;
use crate::metrics::{cross_entropy, Accuracy};
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use crate::{Error, Result};
use candle_core::{Device, ModuleT, Tensor};
use sae_data::{
    Batch, Cifar, CifarKind, Dataset, ImageFolder, LabelSet, Loader, LoaderConfig, Normalize, Split, Subset, Transform,
};
use sae_models::{Model, ModelConfig};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Which dataset a run reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// CIFAR-10 binary directory.
    Cifar10,
    /// CIFAR-100 binary directory, 100 fine labels.
    Cifar100Fine,
    /// CIFAR-100 binary directory, 20 coarse labels.
    Cifar100Coarse,
    /// ImageNet-style folder with `train/` and `val/`.
    Folder,
}

/// Data settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// The dataset.
    pub dataset: DatasetKind,
    /// Where it is.
    pub dir: PathBuf,
    /// Input side length.
    pub input_size: usize,
    /// Train on this many images (a seeded uniform subset), or all.
    pub train_images: Option<usize>,
    /// Evaluate on this many images (a seeded uniform subset), or all.
    pub eval_images: Option<usize>,
}

/// Everything that determines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// The optimiser.
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Epochs.
    pub epochs: usize,
    /// Training batch size.
    pub batch_size: usize,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Label smoothing ε (0 for none).
    pub label_smoothing: f64,
}

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
        let bad = || Error::Checkpoint { path: path.to_path_buf(), reason: format!("bad summary row {line:?}") };
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

/// Reads a run's `summary.csv`.
pub fn read_summary(dir: &Path) -> Result<Vec<EpochSummary>> {
    let path = dir.join("summary.csv");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    text.lines().skip(1).filter(|l| !l.trim().is_empty()).map(|l| EpochSummary::parse(l, &path)).collect()
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    std::fs::write(&tmp, contents).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Where progress goes: a progress bar on a terminal, plain log lines otherwise.
pub trait Progress {
    /// Start of an epoch with `batches` training batches.
    fn epoch_start(&mut self, epoch: usize, batches: usize);
    /// After a training batch.
    fn batch(&mut self, loss: f64, top1: f64, images_per_second: f64);
    /// End of an epoch.
    fn epoch_end(&mut self, summary: &EpochSummary);
}

/// Plain lines for logs: the running loss, top-1 and images/s ten times per epoch, and the
/// epoch's summary at its end.
#[derive(Debug, Default)]
pub struct LogLines {
    epoch: usize,
    batches: usize,
    done: usize,
}

impl Progress for LogLines {
    fn epoch_start(&mut self, epoch: usize, batches: usize) {
        *self = LogLines { epoch, batches, done: 0 };
    }
    fn batch(&mut self, loss: f64, top1: f64, ips: f64) {
        self.done += 1;
        if self.done.is_multiple_of(self.batches.div_ceil(10).max(1)) && self.done < self.batches {
            eprintln!(
                "epoch {:>3} batch {}/{}: loss {loss:.4} top-1 {top1:.2}% {ips:.1} img/s",
                self.epoch, self.done, self.batches
            );
        }
    }
    fn epoch_end(&mut self, s: &EpochSummary) {
        eprintln!("{}", epoch_line(s));
    }
}

/// An `indicatif` bar with loss, accuracy, images/s and ETA.
#[derive(Default)]
pub struct Bar(Option<indicatif::ProgressBar>);

impl Progress for Bar {
    fn epoch_start(&mut self, epoch: usize, batches: usize) {
        let bar = indicatif::ProgressBar::new(batches as u64);
        let style = indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .expect("valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(epoch.to_string());
        self.0 = Some(bar);
    }
    fn batch(&mut self, loss: f64, top1: f64, ips: f64) {
        if let Some(bar) = &self.0 {
            bar.set_message(format!("loss {loss:.4} top-1 {top1:.2}% {ips:.1} img/s"));
            bar.inc(1);
        }
    }
    fn epoch_end(&mut self, s: &EpochSummary) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
        eprintln!("{}", epoch_line(s));
    }
}

/// The progress reporter suited to stderr: a bar on a terminal, log lines otherwise.
pub fn default_progress() -> Box<dyn Progress> {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        Box::new(Bar::default())
    } else {
        Box::new(LogLines::default())
    }
}

fn epoch_line(s: &EpochSummary) -> String {
    format!(
        "epoch {:>3}: train loss {:.4} top-1 {:.2}% | eval loss {:.4} top-1 {:.2}% top-5 {:.2}% | lr {:.3e} | {:.1}s, {:.1} img/s",
        s.epoch, s.train_loss, s.train_top1, s.eval_loss, s.eval_top1, s.eval_top5, s.lr, s.seconds, s.images_per_second
    )
}

impl TrainConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.epochs == 0 || self.batch_size == 0 || self.data.input_size == 0 {
            return Err(Error::Config("epochs, batch_size and input_size must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::Config(format!("label_smoothing must be in [0, 1), got {}", self.label_smoothing)));
        }
        Ok(())
    }

    /// Reads a run's `config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
    }
}

/// The two splits of a run's data with their transforms.
struct Splits {
    train: Box<dyn Dataset>,
    eval: Box<dyn Dataset>,
    train_transform: Transform,
    eval_transform: Transform,
    normalize: Normalize,
}

fn datasets(cfg: &DataConfig, seed: u64) -> Result<Splits> {
    fn subset<D: Dataset + 'static>(d: D, limit: Option<usize>, seed: u64) -> Box<dyn Dataset> {
        match limit {
            Some(n) if n < d.len() => Box::new(Subset::new(Arc::new(d), n, seed)),
            _ => Box::new(d),
        }
    }
    let size = cfg.input_size;
    let cifar = |kind| -> Result<_> {
        let train = Cifar::load(&cfg.dir, kind, Split::Train)?;
        let test = Cifar::load(&cfg.dir, kind, Split::Test)?;
        let norm = if kind == CifarKind::Cifar10 { Normalize::CIFAR10 } else { Normalize::CIFAR100 };
        Ok(Splits {
            train: subset(train, cfg.train_images, seed),
            eval: subset(test, cfg.eval_images, seed ^ 1),
            train_transform: Transform::PadCropFlip { pad: 4, size },
            eval_transform: Transform::ResizeCenterCrop { resize: size, size },
            normalize: norm,
        })
    };
    match cfg.dataset {
        DatasetKind::Cifar10 => cifar(CifarKind::Cifar10),
        DatasetKind::Cifar100Fine => cifar(CifarKind::Cifar100(LabelSet::Fine)),
        DatasetKind::Cifar100Coarse => cifar(CifarKind::Cifar100(LabelSet::Coarse)),
        DatasetKind::Folder => {
            let train = ImageFolder::open(&cfg.dir.join("train"))?;
            let val = ImageFolder::open(&cfg.dir.join("val"))?;
            if train.classes != val.classes {
                return Err(Error::Config(format!(
                    "{}: train and val have different class folders",
                    cfg.dir.display()
                )));
            }
            Ok(Splits {
                train: subset(train, cfg.train_images, seed),
                eval: subset(val, cfg.eval_images, seed ^ 1),
                train_transform: Transform::RandomResizedCropFlip { size },
                eval_transform: Transform::ResizeCenterCrop { resize: (size * 256 + 112) / 224, size },
                normalize: Normalize::IMAGENET,
            })
        }
    }
}

fn to_tensors(batch: &Batch, device: &Device) -> Result<(Tensor, Tensor)> {
    let x = Tensor::from_slice(&batch.images, &batch.shape, device)?;
    let y = Tensor::from_slice(&batch.labels, batch.labels.len(), device)?;
    Ok((x, y))
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
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config_path = dir.join("config.json");
    let model = Model::new(cfg.model.clone(), cfg.seed, device)?;
    let mut optimizer = Optimizer::new(cfg.optimizer.clone(), model.trainable_vars());
    let mut history = Vec::new();
    let mut state = CheckpointState::default();
    if resume {
        let saved = TrainConfig::read(dir)?;
        if (TrainConfig { epochs: cfg.epochs, ..saved }) != *cfg {
            return Err(Error::Config(format!("{}: the run was made with a different config", config_path.display())));
        }
        if let Some(s) = checkpoint::load_last(dir, &model, &mut optimizer)? {
            state = s;
            history = read_summary(dir)?;
            history.truncate(state.epoch);
        }
    } else if config_path.exists() {
        return Err(Error::Config(format!(
            "{} already holds a run; resume it or choose another directory",
            dir.display()
        )));
    }
    write_atomic(&config_path, serde_json::to_string_pretty(cfg).expect("config serialises").as_bytes())?;

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
    let batches = train_loader.batches_per_epoch();
    if batches == 0 {
        return Err(Error::Config(format!("fewer training images than one batch of {}", cfg.batch_size)));
    }
    let log_path = dir.join("train.log");
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io(&log_path))?;

    for epoch in state.epoch..cfg.epochs {
        let start = Instant::now();
        progress.epoch_start(epoch + 1, batches);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let mut acc = Accuracy::default();
        for (i, batch) in train_loader.epoch(epoch as u64).enumerate() {
            let batch = batch?;
            optimizer.set_lr(cfg.schedule.lr(cfg.optimizer.lr(), epoch as f64 + i as f64 / batches as f64));
            let (x, y) = to_tensors(&batch, device)?;
            let global_step = state.step;
            // Forward and backward inside Candle's own CPU thread pool (a no-op on GPUs).
            let (logits, value, grads) = device.with_context(|| -> Result<_> {
                let logits = model.forward_t(&x, true)?;
                let loss = cross_entropy(&logits, &y, cfg.label_smoothing)?;
                let value = loss.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(Error::NonFiniteLoss { value, epoch, step: global_step, dir: dir.to_path_buf() });
                }
                let grads = loss.backward()?;
                Ok((logits, value, grads))
            })?;
            optimizer.step(&grads)?;
            state.step += 1;
            loss_sum += value as f64 * batch.labels.len() as f64;
            seen += batch.labels.len();
            acc.update(&logits, &batch.labels)?;
            progress.batch(loss_sum / seen as f64, acc.top1(), seen as f64 / start.elapsed().as_secs_f64());
        }
        let train_seconds = start.elapsed().as_secs_f64();
        let (eval_loss, eval_top1, eval_top5) = device.with_context(|| evaluate(&model, &eval_loader, device))?;
        let summary = EpochSummary {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_top1: acc.top1(),
            eval_loss,
            eval_top1,
            eval_top5,
            lr: optimizer.lr(),
            seconds: start.elapsed().as_secs_f64(),
            images_per_second: seen as f64 / train_seconds,
        };
        progress.epoch_end(&summary);
        writeln!(log, "{}", epoch_line(&summary)).map_err(io(&log_path))?;
        history.push(summary);
        let csv: String = std::iter::once(CSV_HEADER.to_string())
            .chain(history.iter().map(EpochSummary::csv_row))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        write_atomic(&dir.join("summary.csv"), csv.as_bytes())?;
        crate::plot::plot_run(&history, &cfg.model.name, &dir.join("curves.png"))?;
        state.epoch = epoch + 1;
        checkpoint::save(dir, &model, &optimizer, &mut state, eval_top1)?;
    }
    Ok(history)
}
